"""Hugging Face CLIP image towers from a local folder (models/hf_clip.py): the embedding equals
transformers' own image features, the preprocessing comes from the folder, the README's commands
make a bundle whose ONNX graph agrees with PyTorch, and unsafe or foreign folders are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from models.bundle import load_bundle  # noqa: E402
from models.encoders import EncoderLoadError, load_encoder  # noqa: E402
from training.cli import main as dede  # noqa: E402

VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 16,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}
# Not CLIP's defaults, so that the test sees they come from the folder.
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _processor(folder: Path, resample: int = 3, shortest_edge: int = 32) -> None:
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": shortest_edge},
        crop_size={"height": 32, "width": 32},
        image_mean=list(MEAN),
        image_std=list(STD),
        resample=resample,
    )
    processor.save_pretrained(folder)


@pytest.fixture(scope="module")
def whole_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A whole (random) CLIP, text tower included, as `save_pretrained` writes it."""
    torch.manual_seed(5)
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
    model = transformers.CLIPModel(config).eval()
    folder = tmp_path_factory.mktemp("hf") / "tiny-clip"
    model.save_pretrained(folder)
    _processor(folder)
    return folder, model


def _reference_image_features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 wraps it


def test_whole_clip_embeds_as_transformers_does(whole_clip: tuple[Path, torch.nn.Module]) -> None:
    folder, model = whole_clip
    encoder = load_encoder(str(folder))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    expected = _reference_image_features(model, encoder.normalize(images))
    with torch.no_grad():
        got = encoder.embed(images)
    assert got.shape == (4, 24)  # the projection's dimension, not the tower's width
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    identity = encoder.identity
    assert identity.architecture == "hf-clip-vision+projection"
    assert (identity.mean, identity.std) == (MEAN, STD)
    assert (identity.resize, identity.interpolation) == ("shorter_side_center_crop", "bicubic")
    assert identity.sha256 and identity.kind == "hf_clip_folder"


def test_tower_alone_embeds_its_pooled_output(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).eval()
    model.save_pretrained(tmp_path)  # no preprocessor_config.json: CLIP's defaults apply
    encoder = load_encoder(str(tmp_path))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(pixel_values=encoder.normalize(images)).pooler_output
        torch.testing.assert_close(encoder.embed(images), expected, rtol=1e-4, atol=1e-5)
    assert encoder.identity.architecture == "hf-clip-vision"
    assert encoder.identity.mean == (0.48145466, 0.4578275, 0.40821073)


def test_readme_commands_make_a_bundle_that_agrees_with_pytorch(
    whole_clip: tuple[Path, torch.nn.Module], tiny_data: dict[str, Path], tmp_path: Path
) -> None:
    folder, _ = whole_clip
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    steps = [
        ["fit", "--encoder", str(folder), "--data", str(tiny_data["aux"]), "--limit", "128"]
        + ["--preset", "tiny", "--epochs", "1", "--out", str(run)],
        ["calibrate", "--run", str(run), "--data", str(tiny_data["clean"]), "--fpr", "0.05"],
        ["export", "--run", str(run), "--out", str(bundle), "--name", "hf-clip-test", "--version", "0"],
    ]
    for argv in steps:
        assert dede(argv) == 0, argv
    manifest = load_bundle(bundle).manifest
    assert (manifest.input.mean, manifest.input.std, manifest.input.resize) == (
        MEAN,
        STD,
        "shorter_side_center_crop",
    )
    assert manifest.parity["max_relative_diff_ort_vs_torch"] < 1e-4, manifest.parity
    assert manifest.parity["max_relative_diff_batch1_vs_batch64"] < 1e-5, manifest.parity
    assert manifest.parity["flag_mismatches"] == 0


def test_pickled_weights_are_refused(whole_clip: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    folder, model = whole_clip
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(EncoderLoadError, match="pickled .bin weights"):
        load_encoder(str(tmp_path))


def test_foreign_and_incomplete_folders_are_refused(
    whole_clip: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    folder, model = whole_clip
    foreign = tmp_path / "vit"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(EncoderLoadError, match="model_type 'vit'"):
        load_encoder(str(foreign))

    from safetensors.torch import save_file

    text_only = tmp_path / "text-only"
    text_only.mkdir()
    (text_only / "config.json").write_text((folder / "config.json").read_text())
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("text_model.")},
        str(text_only / "model.safetensors"),
    )
    with pytest.raises(EncoderLoadError, match="vision weights not found"):
        load_encoder(str(text_only))


@pytest.mark.parametrize(
    ("resample", "shortest_edge", "match"),
    [(0, 32, "resample 0"), (3, 40, "shortest edge 40")],
)
def test_preprocessing_the_bundle_cannot_state_is_refused(
    whole_clip: tuple[Path, torch.nn.Module], tmp_path: Path, resample: int, shortest_edge: int, match: str
) -> None:
    folder, _ = whole_clip
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    _processor(tmp_path, resample=resample, shortest_edge=shortest_edge)
    with pytest.raises(EncoderLoadError, match=match):
        load_encoder(str(tmp_path))


def test_same_folder_same_identity(whole_clip: tuple[Path, torch.nn.Module]) -> None:
    folder, _ = whole_clip
    first, second = load_encoder(str(folder)), load_encoder(str(folder))
    assert first.identity == second.identity
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    with torch.no_grad():
        torch.testing.assert_close(first.embed(images), second.embed(images), rtol=0, atol=0)
