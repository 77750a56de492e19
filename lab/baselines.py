"""Baseline detectors that need no decoder, scored like DeDe (higher = more suspicious) so they go
through the same calibration and metrics code:

  knn_distance   mean cosine distance of an image's embedding to its k nearest auxiliary embeddings
                 (a triggered embedding sits at the attacker's target, far from natural images... or
                 not, for a distribution-aligned attack)
  strip          STRIP-style: blend the image with several clean auxiliary images; a trigger that
                 dominates the embedding keeps it stable under blending, so LOW variance = suspicious:
                 the score is minus the mean per-dimension variance of the unit embeddings
  embedding_norm the embedding's L2 norm: if this separates, the attack leaves a cue
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lab.probe import embed_nchw
from models.encoders import LoadedEncoder

BASELINES = ("knn_distance", "strip", "embedding_norm")


def embedding_norm_scores(embeddings: np.ndarray) -> np.ndarray:
    return np.linalg.norm(embeddings, axis=1).astype(np.float32)


def knn_distance_scores(embeddings: np.ndarray, aux_embeddings: np.ndarray, k: int = 10) -> np.ndarray:
    """Mean cosine distance to the k nearest auxiliary embeddings, per image."""
    aux = F.normalize(torch.from_numpy(aux_embeddings), dim=1)
    out = []
    for start in range(0, len(embeddings), 1024):
        z = F.normalize(torch.from_numpy(embeddings[start : start + 1024]), dim=1)
        top, _ = (z @ aux.t()).topk(min(k, len(aux)), dim=1)
        out.append((1 - top).mean(1).numpy())
    return np.concatenate(out).astype(np.float32)


def strip_scores(
    encoder: LoadedEncoder,
    images_nchw_uint8: np.ndarray,
    blend_pool_nchw_uint8: np.ndarray,
    blends: int = 8,
    alpha: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """-(mean variance of unit embeddings over `blends` blends with random clean pool images)."""
    rng = np.random.default_rng(seed)
    pool = blend_pool_nchw_uint8.astype(np.float32)
    out = []
    for start in range(0, len(images_nchw_uint8), 256):
        x = images_nchw_uint8[start : start + 256].astype(np.float32)
        views = []
        for _ in range(blends):
            partners = pool[rng.integers(0, len(pool), len(x))]
            mixed = np.clip(np.rint(alpha * x + (1 - alpha) * partners), 0, 255).astype(np.uint8)
            views.append(F.normalize(torch.from_numpy(embed_nchw(encoder, mixed)), dim=1))
        stacked = torch.stack(views)  # (blends, n, D)
        out.append((-stacked.var(dim=0).mean(dim=1)).numpy())
    return np.concatenate(out).astype(np.float32)


def baseline_scores(
    encoder: LoadedEncoder,
    sets: tuple[tuple[str, np.ndarray], ...],
    aux_nchw_uint8: np.ndarray,
    knn_k: int,
    strip_blends: int,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Every baseline's scores on each named image set: {"<method>/<set name>": scores}. kNN
    distances are to the auxiliary images' embeddings; STRIP blends with auxiliary images."""
    aux_z = embed_nchw(encoder, aux_nchw_uint8)
    arrays: dict[str, np.ndarray] = {}
    for split, images in sets:
        z = embed_nchw(encoder, images)
        arrays[f"embedding_norm/{split}"] = embedding_norm_scores(z)
        arrays[f"knn_distance/{split}"] = knn_distance_scores(z, aux_z, knn_k)
        arrays[f"strip/{split}"] = strip_scores(encoder, images, aux_nchw_uint8, strip_blends, seed=seed)
    return arrays
