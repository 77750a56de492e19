"""Linear probes over a frozen encoder: how the literature reports an attack's success.

BA (clean accuracy): a linear classifier trained on the frozen encoder's embeddings of a labelled
downstream train set, measured on its test set. ASR: the share of triggered test images whose true
class is not the target that the same classifier puts in the target class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.encoders import LoadedEncoder


@torch.no_grad()
def embed_nchw(encoder: LoadedEncoder, images_nchw_uint8: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """uint8 [N, 3, H, W] -> float32 [N, D] (CPU, the encoder's own normalization)."""
    out = [
        encoder.embed(torch.from_numpy(np.ascontiguousarray(images_nchw_uint8[i : i + batch_size]))).numpy()
        for i in range(0, len(images_nchw_uint8), batch_size)
    ]
    return np.concatenate(out).astype(np.float32)


@dataclass
class LinearProbe:
    """A softmax classifier on standardized embeddings."""

    mean: np.ndarray
    std: np.ndarray
    layer: nn.Linear

    @torch.no_grad()
    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        z = torch.from_numpy((embeddings - self.mean) / self.std)
        return self.layer(z).argmax(1).numpy()


def train_linear_probe(
    embeddings: np.ndarray,
    labels: np.ndarray,
    epochs: int = 100,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> LinearProbe:
    """Full-batch-free mini-batch Adam on standardized features (fast: D is small)."""
    torch.manual_seed(seed)
    mean = embeddings.mean(0, keepdims=True)
    std = embeddings.std(0, keepdims=True) + 1e-6
    z = torch.from_numpy((embeddings - mean) / std).float()
    y = torch.from_numpy(labels.astype(np.int64))
    layer = nn.Linear(z.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(z), generator=generator)
        for start in range(0, len(z), 512):
            idx = perm[start : start + 512]
            loss = F.cross_entropy(layer(z[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    return LinearProbe(mean.astype(np.float32), std.astype(np.float32), layer.eval())


def attack_success_rate(
    probe: LinearProbe, triggered_embeddings: np.ndarray, true_labels: np.ndarray, target: int
) -> float:
    """Share of triggered images of non-target classes classified as the target."""
    keep = true_labels != target
    if not keep.any():
        return float("nan")
    return float((probe.predict(triggered_embeddings[keep]) == target).mean())


def probe_report(
    probe: LinearProbe,
    test_embeddings: np.ndarray,
    test_labels: np.ndarray,
    triggered_embeddings: np.ndarray | None,
    target: int | None,
) -> dict:
    """BA and (with triggered embeddings and a target) ASR, both as fractions."""
    report = {
        "ba": float((probe.predict(test_embeddings) == test_labels).mean()),
        "n_test": int(len(test_labels)),
    }
    if triggered_embeddings is not None and target is not None:
        report["asr"] = attack_success_rate(probe, triggered_embeddings, test_labels, target)
        report["target"] = int(target)
    return report
