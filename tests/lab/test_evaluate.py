"""Metric math against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from lab.evaluate import (
    auprc,
    auroc,
    detection_metrics,
    downstream_after_filtering,
    linear_r2,
    participation_ratio,
    roc_curve,
    tpr_at_fpr,
)


def test_auroc_known_values() -> None:
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    # clean {1, 3}, triggered {2, 4}: pairs won 1 (2>1), 0 (2<3), 1, 1 -> 3/4
    assert auroc(np.array([1.0, 3.0]), np.array([2.0, 4.0])) == pytest.approx(0.75)
    # a tie counts half: clean {1, 2}, triggered {2}: (1 + 0.5) / 2
    assert auroc(np.array([1.0, 2.0]), np.array([2.0])) == pytest.approx(0.75)


def test_auprc_known_values() -> None:
    assert auprc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    # ranking: T(4) C(3) T(2) C(1): AP = 0.5 * 1 + 0.5 * 2/3
    assert auprc(np.array([1.0, 3.0]), np.array([2.0, 4.0])) == pytest.approx(0.5 + 1 / 3)


def test_roc_and_tpr_at_fpr() -> None:
    clean = np.arange(100, dtype=float)  # 0..99
    triggered = np.array([98.5, 50.5, 200.0, 300.0])
    fpr, tpr = roc_curve(clean, triggered)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert tpr_at_fpr(clean, triggered, 0.0) == 0.5  # 200 and 300 are above every clean score
    assert tpr_at_fpr(clean, triggered, 0.01) == 0.75  # one clean (99) above 98.5
    assert tpr_at_fpr(clean, triggered, 0.5) == 1.0


def test_detection_metrics_calibrates_on_calibration_scores_only() -> None:
    rng = np.random.default_rng(0)
    calibration, clean = rng.normal(0, 1, 5000), rng.normal(0, 1, 5000)
    triggered = rng.normal(5, 1, 1000)
    m = detection_metrics(calibration, clean, triggered, fpr_target=0.05)
    assert m["auroc"] > 0.99
    assert abs(m["calibrated"]["realised_fpr_clean_test"] - 0.05) < 0.015
    assert m["calibrated"]["tpr_triggered_test"] > 0.99


def test_downstream_after_filtering() -> None:
    labels = np.array([0, 1, 1, 2])
    clean_pred = np.array([0, 1, 0, 2])  # 3/4 correct; the wrong one is flagged
    trig_labels = np.array([1, 1, 2, 2])
    trig_pred = np.array([0, 0, 0, 2])  # 3 hits on target 0
    out = downstream_after_filtering(
        clean_pred,
        labels,
        np.array([False, False, True, False]),
        trig_pred,
        trig_labels,
        np.array([True, True, False, False]),
        target=0,
    )
    assert out["ba_before"] == 0.75 and out["ba_after"] == 1.0
    assert out["asr_before"] == 0.75 and out["asr_after"] == 0.25


def test_participation_ratio_counts_the_dimensions_the_embeddings_spread_over() -> None:
    rng = np.random.default_rng(0)
    isotropic = rng.normal(size=(4000, 16))
    assert participation_ratio(isotropic) == pytest.approx(15, rel=0.1)  # unit sphere in 16-d: 15 free
    # Ten tight class clusters in 64 dimensions: about nine effective dimensions, whatever D is.
    centres = rng.normal(size=(10, 64))
    clustered = centres[rng.integers(0, 10, 4000)] + 0.01 * rng.normal(size=(4000, 64))
    assert 7 < participation_ratio(clustered) < 10
    # The scale of each embedding does not matter (they are L2-normalized first).
    assert participation_ratio(isotropic * rng.uniform(0.1, 10, (4000, 1))) == pytest.approx(
        participation_ratio(isotropic)
    )


def test_linear_r2_is_one_for_a_linear_map_and_zero_for_unrelated_targets() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 20))
    mixing = rng.normal(size=(20, 5))
    y = x @ mixing + 3.0
    assert linear_r2(x[:2000], y[:2000], x[2000:], y[2000:]) == pytest.approx(1.0, abs=1e-3)
    noise = rng.normal(size=(3000, 5))
    assert abs(linear_r2(x[:2000], noise[:2000], x[2000:], noise[2000:])) < 0.03
    half = np.concatenate([y[:, :1], noise[:, :1] * y[:, :1].std()], axis=1)
    assert linear_r2(x[:2000], half[:2000], x[2000:], half[2000:]) == pytest.approx(0.5, abs=0.05)
