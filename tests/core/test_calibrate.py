"""Calibration math on score distributions whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from training.calibrate import calibrate, threshold_for_fpr, wilson_interval


def test_threshold_leaves_exactly_fpr_above() -> None:
    scores = np.arange(1, 1001, dtype=np.float64)  # 1..1000
    t = threshold_for_fpr(scores, 0.01)
    assert t == 990.5 and (scores > t).sum() == 10
    assert threshold_for_fpr(scores, 0.0105) == 990.5  # never more than fpr above: floor(10.5) = 10
    with pytest.raises(ValueError):
        threshold_for_fpr(scores, 0.0)


def test_realised_fpr_on_a_second_split_of_the_same_distribution() -> None:
    rng = np.random.default_rng(0)
    calibration, holdout = rng.normal(0, 1, 20_000), rng.normal(0, 1, 20_000)
    result = calibrate(calibration, holdout, fpr=0.05)
    assert result["value"] == pytest.approx(1.6449, abs=0.03)  # the normal's 95% quantile
    low, high = result["realised_fpr_ci95"]
    assert low <= 0.05 <= high and abs(result["realised_fpr"] - 0.05) < 0.006
    assert result["n_calibration"] == result["n_holdout"] == 20_000
    assert result["score_quantiles"]["q0.5"] == pytest.approx(0.0, abs=0.03)


def test_wilson_interval_known_value() -> None:
    low, high = wilson_interval(10, 100)
    assert low == pytest.approx(0.0552, abs=1e-3) and high == pytest.approx(0.1744, abs=1e-3)
    assert wilson_interval(0, 50)[0] == 0.0


def test_two_fold_calibration_thresholds_every_image_and_estimates_its_fpr_by_folds() -> None:
    """`dede calibrate`'s calibration: the threshold is the quantile of every score, the realised FPR
    the two folds' pooled false alarms (each half's own threshold read on the other half), exactly."""
    from training.calibrate import TWO_FOLD_ESTIMATE, calibrate_two_fold

    rng = np.random.default_rng(0)
    scores = rng.normal(0, 1, 40_000)
    order = rng.permutation(len(scores))
    result = calibrate_two_fold(scores, order, fpr=0.05)
    assert result["value"] == threshold_for_fpr(scores, 0.05)
    assert result["value"] == pytest.approx(1.6449, abs=0.02)
    first, second = scores[order[:20_000]], scores[order[20_000:]]
    alarms = (second > threshold_for_fpr(first, 0.05)).sum() + (first > threshold_for_fpr(second, 0.05)).sum()
    assert result["realised_fpr"] == alarms / 40_000 and abs(result["realised_fpr"] - 0.05) < 0.004
    assert result["n_calibration"] == result["n_holdout"] == 40_000
    assert result["realised_fpr_estimate"] == TWO_FOLD_ESTIMATE

    # An unlabelled sample with 3% far outliers: they are set aside before the quantile, in every fold.
    traffic = np.concatenate([rng.normal(0, 1, 9_700), rng.normal(12, 1, 300)])
    robust = calibrate_two_fold(traffic, rng.permutation(len(traffic)), 0.05, kind="unlabelled_robust")
    assert robust["n_trimmed"] >= 300 and robust["value"] == pytest.approx(1.6449, abs=0.1)
    assert abs(robust["realised_fpr"] - 0.05) < 0.01 and robust["n_holdout"] == robust["n_calibration"]
    with pytest.raises(ValueError, match="at least 4"):
        calibrate_two_fold(scores[:3], order[:3], 0.05)


def test_tail_shape_threshold_holds_where_triggered_scores_sit_inside_the_trimming_reach() -> None:
    """A clean bulk N(5, 2) whose tail has the shape of a clean reference N(0, 1): the threshold is
    5 + 2 x 2.326. With 5% of the sample at 3 deviations above (triggered images the score only
    half separates: none are trimmed), the trimmed quantile lands among them, while the median and
    the MAD barely move."""
    from training.calibrate import calibrate_two_fold, robust_inliers, tail_shape_threshold

    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, 20_000)
    clean = rng.normal(5, 2, 9_500)
    assert tail_shape_threshold(clean, reference, 0.01) == pytest.approx(5 + 2 * 2.3263, abs=0.15)
    sample = np.concatenate([clean, rng.normal(11, 0.5, 500)])
    assert robust_inliers(sample).all()
    test = rng.normal(5, 2, 100_000)
    shaped = tail_shape_threshold(sample, reference, 0.01)
    trimmed = threshold_for_fpr(sample[robust_inliers(sample)], 0.01)
    assert 0.003 < (test > shaped).mean() < 0.015 and (test > trimmed).mean() < 0.002
    # Location and scale are the sample's own: a reference anywhere, of any spread, reads the same.
    assert tail_shape_threshold(sample, 7 + 3 * reference, 0.01) == pytest.approx(shaped, rel=1e-9)

    result = calibrate_two_fold(
        sample, rng.permutation(len(sample)), 0.01, "traffic", "unlabelled_robust", reference, "clean"
    )
    assert result["value"] == pytest.approx(shaped) and result["unlabelled_method"] == "tail_shape"
    assert result["tail_mads"] == pytest.approx(2.3263, abs=0.1) and result["n_tail_reference"] == 20_000
    assert result["n_calibration"] == len(sample)
    untouched = calibrate_two_fold(sample, rng.permutation(len(sample)), 0.01, kind="unlabelled_robust")
    assert untouched["unlabelled_method"] == "trimmed_quantile" and untouched["value"] == pytest.approx(
        trimmed
    )
    with pytest.raises(ValueError, match="unlabelled_robust"):
        calibrate_two_fold(sample, np.arange(len(sample)), 0.01, kind="clean", reference=reference)
    with pytest.raises(ValueError, match="no spread"):
        tail_shape_threshold(sample, np.ones(10), 0.01)
