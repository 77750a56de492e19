"""Detection metrics: clean images are negatives, triggered images positives, higher score = flagged.

Threshold-free: AUROC (Mann-Whitney, ties counted half), AUPRC (average precision), TPR at a fixed
FPR on the test negatives themselves (the ROC read at 1% / 5%). With a threshold calibrated on clean
auxiliary data only (`training.calibrate.calibrate`): the realised FPR on clean test images, the TPR
on triggered ones, and the downstream BA/ASR before and after the flagged images are dropped.
"""

from __future__ import annotations

import numpy as np

from training.calibrate import calibrate


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def auroc(clean_scores: np.ndarray, triggered_scores: np.ndarray) -> float:
    """P(score(triggered) > score(clean)) + 0.5 P(equal)."""
    clean, trig = np.asarray(clean_scores, np.float64), np.asarray(triggered_scores, np.float64)
    ranks = _ranks(np.concatenate([clean, trig]))
    n_pos, n_neg = len(trig), len(clean)
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(clean_scores: np.ndarray, triggered_scores: np.ndarray) -> float:
    """Average precision with triggered images as positives: sum over thresholds of
    (recall step) x precision, thresholds at each distinct score (ties enter together)."""
    scores = np.concatenate([clean_scores, triggered_scores]).astype(np.float64)
    labels = np.concatenate([np.zeros(len(clean_scores)), np.ones(len(triggered_scores))])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_pos = np.cumsum(labels)[last_of_tie]
    predicted_pos = last_of_tie + 1
    precision = true_pos / predicted_pos
    recall = true_pos / labels.sum()
    recall_steps = np.diff(np.r_[0.0, recall])
    return float((recall_steps * precision).sum())


def roc_curve(clean_scores: np.ndarray, triggered_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) arrays from (0, 0) to (1, 1), one point per distinct threshold."""
    scores = np.concatenate([clean_scores, triggered_scores]).astype(np.float64)
    labels = np.concatenate([np.zeros(len(clean_scores)), np.ones(len(triggered_scores))])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tpr = np.cumsum(labels)[last_of_tie] / max(1, labels.sum())
    fpr = np.cumsum(1 - labels)[last_of_tie] / max(1, (1 - labels).sum())
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


def tpr_at_fpr(clean_scores: np.ndarray, triggered_scores: np.ndarray, fpr: float) -> float:
    """TPR at the largest threshold-free operating point whose FPR on `clean_scores` is <= fpr."""
    fprs, tprs = roc_curve(clean_scores, triggered_scores)
    return float(tprs[fprs <= fpr + 1e-12].max())


def detection_metrics(
    calibration_scores: np.ndarray,
    clean_test_scores: np.ndarray,
    triggered_test_scores: np.ndarray,
    fpr_target: float = 0.01,
) -> dict:
    """All detection figures for one score on one (encoder, trigger, auxiliary set)."""
    threshold = calibrate(calibration_scores, clean_test_scores, fpr_target)
    flagged_triggered = np.asarray(triggered_test_scores) > threshold["value"]
    return {
        "auroc": auroc(clean_test_scores, triggered_test_scores),
        "auprc": auprc(clean_test_scores, triggered_test_scores),
        "tpr_at_fpr_0.01": tpr_at_fpr(clean_test_scores, triggered_test_scores, 0.01),
        "tpr_at_fpr_0.05": tpr_at_fpr(clean_test_scores, triggered_test_scores, 0.05),
        "calibrated": {
            "fpr_target": fpr_target,
            "threshold": threshold["value"],
            "n_calibration": threshold["n_calibration"],
            "realised_fpr_clean_test": threshold["realised_fpr"],
            "realised_fpr_ci95": threshold["realised_fpr_ci95"],
            "tpr_triggered_test": float(flagged_triggered.mean()),
        },
        "n_clean_test": int(len(clean_test_scores)),
        "n_triggered_test": int(len(triggered_test_scores)),
        "score_medians": {
            "calibration": float(np.median(calibration_scores)),
            "clean_test": float(np.median(clean_test_scores)),
            "triggered_test": float(np.median(triggered_test_scores)),
        },
    }


def downstream_after_filtering(
    clean_pred: np.ndarray,
    clean_labels: np.ndarray,
    clean_flagged: np.ndarray,
    triggered_pred: np.ndarray,
    triggered_labels: np.ndarray,
    triggered_flagged: np.ndarray,
    target: int,
) -> dict:
    """BA/ASR of a downstream classifier before and after dropping flagged images.

    ASR after = attacks that succeed AND pass the detector, over all triggered non-target images
    (what reaches the classifier's output); BA after = accuracy on the clean images kept.
    """
    keep_t = triggered_labels != target
    hits = (triggered_pred == target) & keep_t
    kept_clean = ~clean_flagged
    correct = clean_pred == clean_labels
    return {
        "ba_before": float(correct.mean()),
        "ba_after": float(correct[kept_clean].mean()) if kept_clean.any() else float("nan"),
        "clean_kept_fraction": float(kept_clean.mean()),
        "asr_before": float(hits.sum() / max(1, keep_t.sum())),
        "asr_after": float((hits & ~triggered_flagged).sum() / max(1, keep_t.sum())),
    }


# --- How much of the image an embedding keeps -----------------------------------------------------
# DeDe can only tell a swapped embedding from the image's own if the embedding says something about
# the image beyond its class; these two figures measure that, without any decoder.


def participation_ratio(embeddings: np.ndarray) -> float:
    """Effective number of dimensions the (L2-normalized, centred) embeddings spread over:
    (sum of covariance eigenvalues)^2 / sum of their squares; 1 for a line, D for isotropic."""
    z = np.asarray(embeddings, np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    eigenvalues = np.clip(np.linalg.eigvalsh(np.cov(z - z.mean(0), rowvar=False)), 0.0, None)
    return float(eigenvalues.sum() ** 2 / max((eigenvalues**2).sum(), 1e-300))


def linear_r2(
    fit_inputs: np.ndarray,
    fit_targets: np.ndarray,
    eval_inputs: np.ndarray,
    eval_targets: np.ndarray,
    ridge: float = 1e-3,
) -> float:
    """R^2 on held-out data of a ridge regression from inputs to targets (all target columns pooled):
    1 when the targets are a linear function of the inputs, 0 for the targets' mean. `ridge` is
    relative to the mean diagonal of the standardized inputs' Gram matrix."""
    x_fit, x_eval = np.asarray(fit_inputs, np.float64), np.asarray(eval_inputs, np.float64)
    y_fit, y_eval = np.asarray(fit_targets, np.float64), np.asarray(eval_targets, np.float64)
    mean, scale = x_fit.mean(0), np.maximum(x_fit.std(0), 1e-12)
    x_fit, x_eval = (x_fit - mean) / scale, (x_eval - mean) / scale
    y_mean = y_fit.mean(0)
    gram = x_fit.T @ x_fit
    penalty = ridge * np.trace(gram) / len(gram)
    weights = np.linalg.solve(gram + penalty * np.eye(len(gram)), x_fit.T @ (y_fit - y_mean))
    residual = ((x_eval @ weights + y_mean - y_eval) ** 2).sum()
    return float(1.0 - residual / max(((y_eval - y_eval.mean(0)) ** 2).sum(), 1e-300))
