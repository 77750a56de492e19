"""CLIP image towers as dede encoders: the `openclip:<name>` architectures, the files they load from and
the preprocessing they carry. Tiny lab configs only (models/clip.py): no test here builds a 224 px tower."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")

from models.architectures import architecture  # noqa: E402
from models.bundle import InputSpec, prepare_array  # noqa: E402
from models.clip import OPENAI_MEAN, OPENAI_STD, build_clip, clip_preprocessing  # noqa: E402
from models.encoders import EncoderLoadError, load_encoder, save_encoder  # noqa: E402
from training.cli import main as dede  # noqa: E402


def _images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8))


@pytest.fixture(scope="module")
def rn_clip() -> torch.nn.Module:
    """A whole tiny ModifiedResNet CLIP (attention pooling, text tower) with weights unlike the
    seed-0 weights of `random:openclip:tiny-rn-32`, so a load that silently kept them would show."""
    torch.manual_seed(11)
    return build_clip("tiny-rn-32").eval()


def test_modified_resnet_tower_loads_from_every_file_layout(rn_clip: torch.nn.Module, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    images = _images()
    arch = "openclip:tiny-rn-32"
    reference = load_encoder(f"random:{arch}")
    with torch.no_grad():
        expected = rn_clip.encode_image(reference.normalize(images))
    assert not torch.allclose(reference.embed(images), expected, atol=1e-3)  # the load must matter

    whole = {k: v.clone() for k, v in rn_clip.state_dict().items()}
    assert any(k.startswith("transformer.") for k in whole)  # the text tower travels with it
    layouts = {
        "whole.pt": whole,
        # A training checkpoint: the model under "state_dict", wrapped by DistributedDataParallel.
        "wrapped.pt": {"state_dict": {f"module.{k}": v for k, v in whole.items()}},
        "tower.safetensors": {k: v.contiguous() for k, v in rn_clip.visual.state_dict().items()},
    }
    for name, state in layouts.items():
        path = tmp_path / name
        if name.endswith(".safetensors"):
            save_file(state, str(path))
        else:
            torch.save(state, path)
        loaded = load_encoder(str(path), arch=arch)
        assert loaded.identity.architecture == arch
        assert loaded.identity.kind == "state_dict"
        torch.testing.assert_close(loaded.embed(images), expected, rtol=1e-5, atol=1e-5, msg=name)

    # dede's own file: the metadata names the architecture, no --arch needed.
    saved = tmp_path / "dede.safetensors"
    tower = load_encoder(str(tmp_path / "whole.pt"), arch=arch)
    save_encoder(saved, tower.module, arch, 0, tower.mean, tower.std)
    again = load_encoder(str(saved))
    assert again.identity.architecture == arch
    torch.testing.assert_close(again.embed(images), expected, rtol=1e-5, atol=1e-5)


def test_a_file_without_the_image_tower_is_refused(rn_clip: torch.nn.Module, tmp_path: Path) -> None:
    # Text tower alone: once prefixed with `visual.`, its `transformer.resblocks.*` names are those of
    # a ViT tower's blocks (tiny-vit-32: same widths). It must not half-load onto them.
    text_only = {
        k: v for k, v in build_clip("tiny-vit-32").state_dict().items() if not k.startswith("visual.")
    }
    torch.save(text_only, tmp_path / "text.pt")
    with pytest.raises(EncoderLoadError, match="not found"):
        load_encoder(str(tmp_path / "text.pt"), arch="openclip:tiny-vit-32")

    torch.save(rn_clip.state_dict(), tmp_path / "rn.pt")  # a ResNet tower offered as a ViT one
    with pytest.raises(EncoderLoadError, match="not found"):
        load_encoder(str(tmp_path / "rn.pt"), arch="openclip:tiny-vit-32")


def test_random_spec_names_and_seeds_the_tower() -> None:
    first, second = load_encoder("random:openclip:tiny-rn-32"), load_encoder("random:openclip:tiny-rn-32")
    images = _images()
    assert torch.equal(first.embed(images), second.embed(images))
    identity = first.identity
    assert (identity.architecture, identity.kind, identity.embedding_dim) == (
        "openclip:tiny-rn-32",
        "random",
        32,
    )
    assert (identity.mean, identity.std, identity.input_size) == (OPENAI_MEAN, OPENAI_STD, (32, 32))


@pytest.mark.parametrize("name", ["RN50", "ViT-B-32", "ViT-L-14-336"])
def test_open_clip_architectures_default_to_clips_preprocessing(name: str) -> None:
    """Read from open_clip's configs without building the (large) towers."""
    defaults = architecture(f"openclip:{name}")
    size = 336 if name.endswith("336") else 224
    assert defaults is not None and defaults.input_size == (size, size)
    assert (defaults.mean, defaults.std) == (OPENAI_MEAN, OPENAI_STD)
    assert (defaults.resize, defaults.interpolation) == ("shorter_side_center_crop", "bicubic")


def test_cli_fit_prepares_images_with_the_towers_own_rule(tmp_path: Path) -> None:
    """`dede fit` on images that are not square: the tower's rule (bicubic, shorter side, centre crop)
    must be what the encoder saw, not the default squashing resize. The run's cached embeddings tell."""
    torch.manual_seed(5)
    torch.save(build_clip("tiny-vit-32").state_dict(), tmp_path / "clip.pt")
    rng = np.random.default_rng(4)
    wide = np.kron(rng.random((24, 4, 6, 3)), np.ones((1, 10, 10, 1)))  # 40 x 60, blocky
    x = (wide * 255).astype(np.uint8)
    np.savez(tmp_path / "aux.npz", x=x, y=np.zeros(len(x), np.int64))

    run = tmp_path / "run"
    argv = ["fit", "--encoder", str(tmp_path / "clip.pt"), "--arch", "openclip:tiny-vit-32"]
    argv += ["--data", str(tmp_path / "aux.npz"), "--preset", "tiny", "--epochs", "1", "--out", str(run)]
    assert dede(argv) == 0

    info = json.loads((run / "run.json").read_text())
    assert (info["encoder_identity"]["resize"], info["encoder_identity"]["interpolation"]) == (
        "shorter_side_center_crop",
        "bicubic",
    )
    encoder = load_encoder(str(tmp_path / "clip.pt"), arch="openclip:tiny-vit-32")
    spec = encoder.identity.input_spec()
    assert (spec.resize, spec.interpolation) == clip_preprocessing("tiny-vit-32")
    squashed = InputSpec(height=32, width=32, mean=spec.mean, std=spec.std)
    cached = np.load(run / "embeddings.npy")
    own = encoder.embed(torch.from_numpy(prepare_array(x, spec))).numpy()
    other = encoder.embed(torch.from_numpy(prepare_array(x, squashed))).numpy()

    # The cache holds every image as it is (and its augmented views): each of `own` is in it.
    def nearest(rows: np.ndarray) -> np.ndarray:
        return np.abs(rows[:, None, :] - cached[None, :, :]).max(axis=2).min(axis=1)

    assert nearest(own).max() < 1e-4
    assert nearest(other).max() > 1e-3
