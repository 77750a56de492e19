"""Shared fixtures: small generated images and a tiny fitted run / exported bundle (session-wide,
built once through the same library calls the CLI makes)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest


def smooth_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3] with low-frequency content (blocky colour fields plus noise):
    cheap to make, and closer to natural images than white noise."""
    rng = np.random.default_rng(seed)
    cells = rng.random((n, 4, 4, 3))
    images = np.kron(cells, np.ones((1, size // 4, size // 4, 1)))
    images = images + rng.normal(0, 0.03, images.shape)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(autouse=True)
def _same_random_draws_every_run() -> None:
    """torch's default seed differs per process: a test that draws from the global generator would
    see other data on every run (one such draw failed a test once in several runs). Seeded per test,
    where torch is loaded (service tests never load it)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    aux, clean = smooth_images(400, seed=0), smooth_images(300, seed=1)
    np.savez(root / "aux.npz", x=aux, y=np.zeros(len(aux), np.int64))
    np.savez(root / "clean.npz", x=clean, y=np.zeros(len(clean), np.int64))
    return {"aux": root / "aux.npz", "clean": root / "clean.npz", "root": root}


@pytest.fixture(scope="session")
def tiny_run(tiny_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fitted and calibrated run: random width-8 CIFAR ResNet-18, `tiny` decoder, 2 epochs."""
    from models.bundle import InputSpec
    from models.encoders import load_encoder
    from training.calibrate import calibrate_run
    from training.data import load_images
    from training.fit import FitSettings, fit_decoder

    run_dir = tmp_path_factory.mktemp("run")
    encoder = load_encoder("random:cifar_resnet18", width=8)
    spec = InputSpec(height=32, width=32, mean=encoder.mean, std=encoder.std)
    images, _ = load_images(str(tiny_data["aux"]), spec)
    fit_decoder(encoder, images, run_dir, FitSettings(preset="tiny", epochs=2, batch_size=128))
    clean, _ = load_images(str(tiny_data["clean"]), spec)
    calibrate_run(run_dir, clean, fpr=0.05, source="clean.npz")
    return run_dir


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.export import export_bundle
    from training.fit import load_run

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(load_run(tiny_run), out, model_name="tiny-test", model_version="0")
    return out


@pytest.fixture(scope="session")
def clip_tower_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole (random) tiny ViT CLIP's state dict, text tower included, as a user would bring one."""
    pytest.importorskip("open_clip")
    import torch

    from models.clip import build_clip

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("clip") / "tiny-vit-clip.pt"
    torch.save(build_clip("tiny-vit-32").state_dict(), path)
    return path


@pytest.fixture(scope="session")
def clip_bundle(
    clip_tower_file: Path, tiny_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A bundle around a CLIP image tower (its own preprocessing: bicubic, shorter side, centre crop)."""
    from models.encoders import load_encoder
    from training.calibrate import calibrate_run
    from training.data import load_images
    from training.export import export_bundle
    from training.fit import FitSettings, fit_decoder, load_run

    encoder = load_encoder(str(clip_tower_file), arch="openclip:tiny-vit-32")
    spec = encoder.identity.input_spec()
    run_dir = tmp_path_factory.mktemp("clip-run")
    images, _ = load_images(str(tiny_data["aux"]), spec)
    fit_decoder(encoder, images, run_dir, FitSettings(preset="tiny", epochs=1, batch_size=128))
    clean, _ = load_images(str(tiny_data["clean"]), spec)
    calibrate_run(run_dir, clean, fpr=0.05, source="clean.npz")
    out = tmp_path_factory.mktemp("bundles") / "clip"
    export_bundle(load_run(run_dir), out, model_name="clip-tower-test", model_version="0")
    return out
