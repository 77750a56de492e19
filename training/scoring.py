"""Scores from a torch detector, batched: the path calibration, evaluation and export parity share."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from models.detector import Detector
from training.fit import FittedRun


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
    run: FittedRun, images: np.ndarray, score_kind: str = "sse", batch_size: int = 256
) -> np.ndarray:
    """Scores for a fitted run, whatever its encoder: the fused torch detector, or for an ONNX
    black-box encoder its embeddings from ONNX Runtime fed to the torch head."""
    if run.encoder.module is not None:
        return score_images(run.detector(score_kind), images, batch_size)
    head, scores = run.head(score_kind), []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc="score", unit="batch", leave=False):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            scores.append(head(batch, run.encoder.embed(batch))[0].numpy())
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)
