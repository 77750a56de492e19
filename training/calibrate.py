"""Threshold calibration for a chosen false-positive rate, with no triggered image known as such.

Two kinds:
  clean              images known to be clean (out-of-distribution auxiliary images, the paper's
                     setting, or a few hundred of the user's own): the threshold is the smallest
                     score t such that at most `fpr` of the calibration scores exceed t;
  unlabelled_robust  a sample of the user's own traffic that may hold a few percent of triggered
                     images. With a clean reference (the fit's held-out auxiliary images), the
                     threshold is the sample's median plus its MAD times the reference's clean tail
                     length in MADs (`tail_shape_threshold`): the median and MAD hold with up to
                     half the sample triggered, a 1% quantile with 1% (benchmarks/detection/README.md,
                     "An unlabelled threshold that keeps the clean tail's shape"). Without one, scores
                     more than OUTLIER_MADS robust deviations above the median are set aside and the
                     same quantile is taken of the rest (the trimmed quantile).
`calibrate` sets the threshold on one split and measures the realised FPR on a second, disjoint one
(the lab's and the benchmarks' fixed splits); `calibrate_two_fold`, what `dede calibrate` ships, sets
it on every image and estimates its realised FPR by two folds (each half's threshold read on the
other half): a 1% quantile of n images steadies as n grows, and halving the images to check it
would double its variance. Either way with a Wilson 95% interval.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from training import DEFAULT_STANDARDISE_ON, STANDARDISE_ON

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)

CALIBRATION_KINDS = ("clean", "unlabelled_robust")
# How far above the median (in 1.4826 x MAD) a score must be to be set aside as an outlier: for a
# normal bulk, 4.5 deviations leave out 3 in a million clean images.
OUTLIER_MADS = 4.5


def threshold_for_fpr(scores: np.ndarray, fpr: float) -> float:
    """The (1 - fpr) quantile, taken conservatively: never more than fpr of `scores` lie above it."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    if len(scores) == 0:
        raise ValueError("no calibration scores")
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    allowed_above = math.floor(fpr * len(ordered))  # scores strictly above t
    k = len(ordered) - 1 - allowed_above
    if allowed_above == 0:
        return float(ordered[k])
    # Midway to the next score: the same count lies above, and no calibration score sits on the
    # threshold, where float noise between runtimes could flip its flag.
    return float((ordered[k] + ordered[k + 1]) / 2)


def robust_inliers(scores: np.ndarray, outlier_mads: float = OUTLIER_MADS) -> np.ndarray:
    """Boolean mask of the scores that are not far above the bulk. Scores are compared on a log
    scale when all are positive (pixel sums are right-skewed), as they are otherwise."""
    values = np.asarray(scores, dtype=np.float64)
    if len(values) == 0:
        return np.zeros(0, bool)
    t = np.log(values) if (values > 0).all() else values
    centre = np.median(t)
    spread = 1.4826 * np.median(np.abs(t - centre))
    if spread == 0:
        return np.ones(len(values), bool)
    return t <= centre + outlier_mads * spread


def robust_spread(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation: the standard deviation for a normal bulk."""
    values = np.asarray(values, dtype=np.float64)
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def tail_shape_threshold(scores: np.ndarray, reference: np.ndarray, fpr: float) -> float:
    """The threshold a clean sample shaped like `reference` would give, placed by `scores`' own
    median and MAD: med(s) + MAD(s) (q(r) - med(r)) / MAD(r), q the conservative (1 - fpr)
    quantile. The median and the MAD hold with up to half the sample triggered, a 1% quantile with
    1%; the clean tail's length in MADs is read on `reference`, images known to be clean."""
    scores = np.asarray(scores, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if len(scores) == 0 or len(reference) == 0:
        raise ValueError("the tail's shape needs scores and reference scores")
    spread, reference_spread = robust_spread(scores), robust_spread(reference)
    if spread == 0 or reference_spread == 0:
        raise ValueError("the scores or the reference scores have no spread (MAD 0)")
    tail = (threshold_for_fpr(reference, fpr) - np.median(reference)) / reference_spread
    return float(np.median(scores) + spread * tail)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _check_kind(kind: str) -> None:
    if kind not in CALIBRATION_KINDS:
        raise ValueError(f"calibration kind {kind!r} is not one of {CALIBRATION_KINDS}")


def calibrate(
    calibration_scores: np.ndarray,
    holdout_scores: np.ndarray,
    fpr: float,
    source: str = "",
    kind: str = "clean",
) -> dict:
    """Threshold from one split, realised FPR (with its CI) on another: the manifest's fields. For
    `unlabelled_robust` the outliers of each split are set aside first (the realised FPR is then
    that of the inliers: an estimate of the clean images' false alarms): the trimmed quantile, as
    the lab's recorded cases were read; `dede calibrate` ships `calibrate_two_fold`."""
    _check_kind(kind)
    calibration_scores = np.asarray(calibration_scores, dtype=np.float64)
    holdout_scores = np.asarray(holdout_scores, dtype=np.float64)
    n_trimmed = None
    if kind == "unlabelled_robust":
        keep, keep_holdout = robust_inliers(calibration_scores), robust_inliers(holdout_scores)
        n_trimmed = int((~keep).sum() + (~keep_holdout).sum())
        calibration_scores, holdout_scores = calibration_scores[keep], holdout_scores[keep_holdout]
    threshold = threshold_for_fpr(calibration_scores, fpr)
    false_alarms = int((holdout_scores > threshold).sum())
    low, high = wilson_interval(false_alarms, len(holdout_scores))
    return {
        "value": threshold,
        "fpr_target": fpr,
        "n_calibration": int(len(calibration_scores)),
        "calibration_source": source,
        "calibration_kind": kind,
        "n_trimmed": n_trimmed,
        "score_quantiles": {f"q{q}": float(np.quantile(calibration_scores, q)) for q in QUANTILES},
        "realised_fpr": false_alarms / len(holdout_scores) if len(holdout_scores) else None,
        "realised_fpr_ci95": (low, high) if len(holdout_scores) else None,
        "n_holdout": int(len(holdout_scores)),
    }


def calibrate_two_fold(
    scores: np.ndarray,
    order: np.ndarray,
    fpr: float,
    source: str = "",
    kind: str = "clean",
    reference: np.ndarray | None = None,
    reference_source: str = "",
) -> dict:
    """The threshold from every score, and its realised FPR estimated by two folds: the threshold
    set on the first half of `order` read on the second half, and the other way round, the false
    alarms pooled. The estimate is that of a threshold from half the images, so it errs wide; the
    same fields as `calibrate`. For `unlabelled_robust` the threshold is `tail_shape_threshold`
    against `reference` (clean scores) where one is given, else the trimmed quantile; either way
    the false alarms are counted on the inliers (an estimate of the clean images' rate, high by the
    triggered images that sit within OUTLIER_MADS of the bulk)."""
    _check_kind(kind)
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) < 4:
        raise ValueError(f"two folds need at least 4 scores, got {len(scores)}")
    if reference is not None and kind != "unlabelled_robust":
        raise ValueError("a tail reference applies to unlabelled_robust calibration only")
    unlabelled = kind == "unlabelled_robust"
    keep = robust_inliers(scores) if unlabelled else np.ones(len(scores), bool)

    def threshold(subset: np.ndarray) -> float:
        if unlabelled and reference is not None:
            return tail_shape_threshold(scores[subset], reference, fpr)
        return threshold_for_fpr(scores[subset][keep[subset]], fpr)

    half = len(order) // 2
    folds = (order[:half], order[half:])
    false_alarms = read = 0
    for setting, rest in (folds, folds[::-1]):
        false_alarms += int((scores[rest][keep[rest]] > threshold(setting)).sum())
        read += int(keep[rest].sum())
    inliers = scores[keep]
    low, high = wilson_interval(false_alarms, read)
    shaped = unlabelled and reference is not None
    result = {
        "value": threshold(np.arange(len(scores))),
        "fpr_target": fpr,
        # tail_shape places the threshold by every score's median and MAD; the trimmed quantile
        # reads the inliers'.
        "n_calibration": int(len(scores) if shaped else len(inliers)),
        "calibration_source": source,
        "calibration_kind": kind,
        "n_trimmed": int((~keep).sum()) if unlabelled else None,
        "score_quantiles": {f"q{q}": float(np.quantile(inliers, q)) for q in QUANTILES},
        "realised_fpr": false_alarms / read,
        "realised_fpr_ci95": (low, high),
        "n_holdout": read,
        "realised_fpr_estimate": TWO_FOLD_ESTIMATE,
    }
    if unlabelled:
        result["unlabelled_method"] = "tail_shape" if shaped else "trimmed_quantile"
    if shaped:
        tail = (threshold_for_fpr(reference, fpr) - np.median(reference)) / robust_spread(reference)
        result["tail_reference"] = reference_source
        result["n_tail_reference"] = int(len(reference))
        result["tail_mads"] = float(tail)
    return result


TWO_FOLD_ESTIMATE = "two folds: each half's threshold read on the other half"


def calibrate_run(
    run_dir: Path,
    images: np.ndarray,
    fpr: float,
    source: str,
    score_kind: str | None = None,
    seed: int = 0,
    kind: str = "clean",
    mirror_parity: bool = False,
    standardise_on: str = DEFAULT_STANDARDISE_ON,
    tail_reference_is_calibration: bool = False,
) -> dict:
    """Score images with a fitted run, set the threshold on all of them (its realised FPR by two
    folds, `calibrate_two_fold`), and record the result (and a parity sample for the export check)
    in the run directory. `score_kind` None is
    the run's default score (the feature score where the fit measured its statistics).
    `mirror_parity`: where fewer images than the export's parity check needs are given (a fit's
    held-out split: 200 of 2,000), their mirror images fill the parity sample; the threshold is
    still set on the images as given. `standardise_on` "calibration": the feature score's per-depth
    statistics are first set on the images; "auto" (the default): so where they sit a unit or more
    from the auxiliary images at some depth, else the auxiliary statistics (STANDARDISE_ON).
    `unlabelled_robust` reads the clean tail's shape on the fit's held-out auxiliary images, unless
    `tail_reference_is_calibration` (the images are those held-out images: no clean reference is
    left, and the trimmed quantile sets the threshold)."""
    from training.export import CALIBRATION_FILE, PARITY_COUNT, PARITY_IMAGES
    from training.fit import has_holdout_images, load_holdout_images, load_run, standardise_feature_score
    from training.scoring import score_run

    if len(images) < 4:
        raise ValueError(f"calibration needs at least 4 images, got {len(images)}")
    if standardise_on not in STANDARDISE_ON:
        raise ValueError(f"standardise_on must be one of {STANDARDISE_ON}, not {standardise_on!r}")
    run = load_run(run_dir)
    score_kind = score_kind or run.default_score
    order = np.random.default_rng(seed).permutation(len(images))
    standardisation = None
    if score_kind == "feature" and run.feature_stats:
        standardisation = standardise_feature_score(run, images, standardise_on, source)
        run = load_run(run_dir)  # the statistics just written
    scores = score_run(run, images, score_kind)
    reference, reference_source = None, ""
    if kind == "unlabelled_robust" and not tail_reference_is_calibration and has_holdout_images(run_dir):
        # The clean tail's shape, read on the fit's held-out auxiliary images under the same
        # statistics as the sample. A fit from before runs kept them gets the trimmed quantile,
        # and the manifest says so (`unlabelled_method`).
        reference = score_run(run, load_holdout_images(run_dir), score_kind)
        reference_source = "the fit's held-out auxiliary images"
    threshold = calibrate_two_fold(scores, order, fpr, source, kind, reference, reference_source)
    result = {"score_kind": score_kind, "seed": seed, "threshold": threshold}
    if standardisation is not None:
        result["feature_standardisation"] = standardisation
    (run_dir / CALIBRATION_FILE).write_text(json.dumps(result, indent=2) + "\n")
    parity = images[order]
    if mirror_parity and len(parity) < PARITY_COUNT:
        parity = np.concatenate([parity, parity[..., ::-1]])
    np.save(run_dir / PARITY_IMAGES, np.ascontiguousarray(parity[:PARITY_COUNT]))
    return result
