"""Threshold calibration on clean images only, for a chosen false-positive rate.

The threshold is the smallest score t such that at most `fpr` of the calibration scores exceed t;
the realised FPR is then measured on a second, disjoint clean split, with a Wilson 95% interval.
Triggered images are never used here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)


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


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def calibrate(
    calibration_scores: np.ndarray, holdout_scores: np.ndarray, fpr: float, source: str = ""
) -> dict:
    """Threshold from one clean split, realised FPR (with its CI) on another: the manifest's fields."""
    threshold = threshold_for_fpr(calibration_scores, fpr)
    false_alarms = int((np.asarray(holdout_scores) > threshold).sum())
    low, high = wilson_interval(false_alarms, len(holdout_scores))
    return {
        "value": threshold,
        "fpr_target": fpr,
        "n_calibration": int(len(calibration_scores)),
        "calibration_source": source,
        "score_quantiles": {f"q{q}": float(np.quantile(calibration_scores, q)) for q in QUANTILES},
        "realised_fpr": false_alarms / len(holdout_scores) if len(holdout_scores) else None,
        "realised_fpr_ci95": (low, high) if len(holdout_scores) else None,
        "n_holdout": int(len(holdout_scores)),
    }


def calibrate_run(
    run_dir: Path,
    images: np.ndarray,
    fpr: float,
    source: str,
    score_kind: str = "sse",
    seed: int = 0,
) -> dict:
    """Score clean images with a fitted run, split them in two (threshold / realised FPR), and
    record the result (and a parity sample for the export check) in the run directory."""
    from training.export import CALIBRATION_FILE, PARITY_IMAGES
    from training.fit import load_run
    from training.scoring import score_run

    if len(images) < 4:
        raise ValueError(f"calibration needs at least 4 clean images, got {len(images)}")
    run = load_run(run_dir)
    scores = score_run(run, images, score_kind)
    order = np.random.default_rng(seed).permutation(len(images))
    half = len(order) // 2
    calibration_idx, holdout_idx = order[:half], order[half:]
    threshold = calibrate(scores[calibration_idx], scores[holdout_idx], fpr, source)
    result = {"score_kind": score_kind, "seed": seed, "threshold": threshold}
    (run_dir / CALIBRATION_FILE).write_text(json.dumps(result, indent=2) + "\n")
    # Parity images come from the held-out half first: none of them defines the threshold.
    np.save(run_dir / PARITY_IMAGES, images[np.concatenate([holdout_idx, calibration_idx])[:256]])
    return result
