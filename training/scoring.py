"""Scores from a torch detector, batched: the path calibration, evaluation and export parity share."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from models.detector import Detector
from training.fit import FittedRun, depth_discrepancies


@torch.no_grad()
def score_images(
    detector: Detector, images: np.ndarray, batch_size: int = 256, device: str | torch.device = "cpu"
) -> np.ndarray:
    """uint8 [N, 3, H, W] -> float32 scores [N]."""
    detector = detector.to(device).eval()
    scores = []
    for start in tqdm(range(0, len(images), batch_size), desc="score", unit="batch", leave=False):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
        scores.append(detector(batch)[0].float().cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def score_run(
    run: FittedRun, images: np.ndarray, score_kind: str | None = None, batch_size: int = 256
) -> np.ndarray:
    """Scores for a fitted run, whatever its encoder: the fused torch detector, or for an ONNX
    black-box encoder its embeddings (and named tensors) from ONNX Runtime fed to the torch head.
    `score_kind` None means the run's default (`FittedRun.default_score`)."""
    score_kind = score_kind or run.default_score
    if run.encoder.module is not None:
        return score_images(run.detector(score_kind), images, batch_size)
    head = run.head("sse" if score_kind == "feature" else score_kind)
    if score_kind == "feature":
        stages = run.feature_stats["stages"] if run.feature_stats else []
        if not stages:
            run.standardiser()  # raises the clear error: no statistics for the feature score
        d = depth_discrepancies(
            run.encoder,
            head,
            stages,
            images,
            torch.device("cpu"),
            batch_size,
            run.pixel_factors,
            run.discrepancy,
        )
        with torch.no_grad():
            return run.standardiser()(torch.from_numpy(d.astype(np.float32))).numpy()
    scores = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc="score", unit="batch", leave=False):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            scores.append(head(batch, run.encoder.embed(batch))[0].numpy())
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)
