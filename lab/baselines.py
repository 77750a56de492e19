"""Baseline detectors that need no decoder, scored like DeDe (higher = more suspicious) so they go
through the same calibration and metrics code:

  knn_distance   mean cosine distance of an image's embedding to its k nearest auxiliary embeddings
                 (a triggered embedding sits at the attacker's target, far from natural images... or
                 not, for a distribution-aligned attack)
  strip          STRIP-style: blend the image with several clean auxiliary images; a trigger that
                 dominates the embedding keeps it stable under blending, so LOW variance = suspicious:
                 the score is minus the mean per-dimension variance of the unit embeddings
  embedding_norm the embedding's L2 norm: if this separates, the attack leaves a cue
  activation_norm_<stage>, activation_mean_<stage>  the squared norm and the mean of the input's
                 feature map at each stage (layer1-4 of a ResNet): an attack that inflates (or
                 shifts) intermediate activations on triggered inputs leaves this cue

A cue with AUROC far BELOW 0.5 is a cue too (the opposite sign separates): reports give
max(AUROC, 1 - AUROC) beside it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lab.probe import embed_nchw
from models.encoders import LoadedEncoder
from models.feature_taps import TappedEncoder, default_stages

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


@torch.no_grad()
def activation_scores(
    encoder: LoadedEncoder,
    images_nchw_uint8: np.ndarray,
    stages: list[str] | None = None,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """`activation_norm_<stage>` (squared norm of the feature map) and `activation_mean_<stage>` of
    each image, for every stage (default: layer1-4 of a ResNet). No decoder involved."""
    module = encoder.module
    if module is None:
        raise ValueError("activation cues need a torch encoder (this one is an ONNX black box)")
    if stages is None:
        names = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
        resnet = [f"layer{i}" for i in range(1, 5)]
        stages = resnet if set(resnet) <= names else default_stages(module)
    tapped = TappedEncoder(module, stages)
    out: dict[str, list[np.ndarray]] = {f"activation_{k}_{s}": [] for s in stages for k in ("norm", "mean")}
    try:
        module.eval()
        for start in range(0, len(images_nchw_uint8), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images_nchw_uint8[start : start + batch_size]))
            x = batch.float() / 255.0
            mean = torch.tensor(encoder.mean).view(1, 3, 1, 1)
            std = torch.tensor(encoder.std).view(1, 3, 1, 1)
            _, features = tapped((x - mean) / std)
            for stage, feature in zip(stages, features, strict=True):
                flat = feature.float().flatten(1)
                out[f"activation_norm_{stage}"].append(flat.pow(2).sum(1).numpy())
                out[f"activation_mean_{stage}"].append(flat.mean(1).numpy())
    finally:
        tapped.remove()
    return {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in out.items()}


def cue_scores(
    encoder: LoadedEncoder,
    sets: tuple[tuple[str, np.ndarray], ...],
    aux_nchw_uint8: np.ndarray,
    knn_k: int,
    strip_blends: int,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Every decoder-free cue on each named image set: the baselines and the activation cues."""
    arrays = baseline_scores(encoder, sets, aux_nchw_uint8, knn_k, strip_blends, seed)
    for split, images in sets:
        for method, scores in activation_scores(encoder, images).items():
            arrays[f"{method}/{split}"] = scores
    return arrays


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
