"""SimCLR and the backdoor fine-tunes on a tiny encoder and generated images: losses go down,
runs resume, and the saved encoders load through models.encoders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lab.attacks.badencoder import BackdoorSettings, backdoor_encoder, sliced_wasserstein
from lab.attacks.triggers import make_trigger
from lab.ssl import knn_top1, nt_xent_loss, pretrain_simclr, simclr_view
from models.architectures import build_architecture
from models.encoders import load_encoder, save_encoder


def smooth_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3]: blocky colour fields plus noise (cheap, image-like)."""
    rng = np.random.default_rng(seed)
    images = np.kron(rng.random((n, 4, 4, 3)), np.ones((1, size // 4, size // 4, 1)))
    return (np.clip(images + rng.normal(0, 0.03, images.shape), 0, 1) * 255).astype(np.uint8)


def test_views_keep_shape_and_range() -> None:
    x = torch.rand(8, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    v = simclr_view(x, g)
    assert v.shape == x.shape and v.min() >= 0 and v.max() <= 1
    assert simclr_view(x, g, out_size=24).shape == (8, 3, 24, 24)


def test_nt_xent_prefers_matching_views() -> None:
    z = torch.randn(16, 8)
    assert nt_xent_loss(z, z + 0.01 * torch.randn_like(z)) < nt_xent_loss(z, torch.randn(16, 8))


def test_knn_top1_on_separable_embeddings() -> None:
    train = torch.cat([torch.randn(20, 4) + 5, torch.randn(20, 4) - 5])
    labels = np.repeat([0, 1], 20)
    assert knn_top1(train, labels, train, labels, k=5) == 1.0


def test_simclr_resumes(tmp_path: Path) -> None:
    images = smooth_images(32, size=16)  # small everything: the point is the checkpoint logic
    path = pretrain_simclr(images, tmp_path, width=4, epochs=1, batch_size=16, device="cpu", progress=False)
    assert load_encoder(str(path)).identity.embedding_dim == 32
    pretrain_simclr(images, tmp_path, width=4, epochs=2, batch_size=16, device="cpu", progress=False)
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["loss"]) == 2 and history["finished"]  # epoch 1 was not redone


def test_sliced_wasserstein_is_zero_for_equal_sets() -> None:
    a = torch.randn(32, 8)
    g = torch.Generator().manual_seed(0)
    assert sliced_wasserstein(a, a[torch.randperm(32)], 16, g) < 1e-10
    assert sliced_wasserstein(a, a + 3, 16, g) > 1


def _tiny_clean_encoder(tmp_path: Path, images: np.ndarray) -> Path:
    """A random encoder whose BatchNorm statistics are set on the images: without that, a fresh
    encoder in eval mode maps every image to nearly the same embedding and there is nothing to learn."""
    torch.manual_seed(0)
    module = build_architecture("cifar_resnet18", 4)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the passes below
    module.train()
    with torch.no_grad():
        module((torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.25)
    path = tmp_path / "clean.safetensors"
    save_encoder(path, module, "cifar_resnet18", 4)
    return path


def test_backdoor_variants_reduce_their_target_term(tmp_path: Path) -> None:
    shadow, reference = smooth_images(32, size=16, seed=1), smooth_images(2, size=16, seed=2)
    clean = _tiny_clean_encoder(tmp_path, shadow)
    for variant in ("badencoder", "norm_preserving", "drupe"):
        settings = BackdoorSettings(variant=variant, epochs=4, batch_size=16)
        trigger = make_trigger("patch", (16, 16))
        path = backdoor_encoder(
            clean, shadow, reference, trigger, tmp_path / variant, settings, progress=False
        )
        terms = json.loads((tmp_path / variant / "history.json").read_text())["terms"]
        assert all(np.isfinite(v) for epoch in terms for v in epoch.values())
        # The backdoor term (triggered -> reference) falls; the total is noisy at this size.
        assert terms[-1]["target"] < terms[0]["target"] - 0.05, variant
        assert load_encoder(str(path)).identity.embedding_dim == 32
