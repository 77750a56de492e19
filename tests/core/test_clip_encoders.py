"""CLIP image towers (open_clip) as encoders: loading from a whole CLIP or the tower alone, their own
preprocessing in the bundle, and export parity of a CLIP-tower detector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")

from models.bundle import load_bundle, load_image_file  # noqa: E402
from models.clip import OPENAI_MEAN, build_clip  # noqa: E402
from models.encoders import load_encoder, save_encoder  # noqa: E402


def _clip_embeddings(clip: torch.nn.Module, images: torch.Tensor, encoder) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return clip.encode_image(encoder.normalize(images))


def test_whole_clip_and_tower_alone_load_to_the_same_image_embeddings(
    clip_tower_file: Path, tmp_path: Path
) -> None:
    clip = build_clip("tiny-vit-32")
    clip.load_state_dict(torch.load(clip_tower_file, weights_only=True))
    clip.eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)

    # A whole CLIP: its text tower's `transformer.resblocks.*` keys share names with the ViT tower's
    # own blocks once `visual.` is stripped; only the `visual.*` weights may be taken.
    whole = load_encoder(str(clip_tower_file), arch="openclip:tiny-vit-32")
    expected = _clip_embeddings(clip, images, whole)
    assert torch.allclose(whole.embed(images), expected, atol=1e-5)

    tower_only = tmp_path / "visual.pt"
    torch.save(clip.visual.state_dict(), tower_only)
    alone = load_encoder(str(tower_only), arch="openclip:tiny-vit-32")
    assert torch.allclose(alone.embed(images), expected, atol=1e-5)

    # dede's own file (metadata names the architecture): no --arch needed.
    saved = tmp_path / "tower.safetensors"
    save_encoder(saved, whole.module, "openclip:tiny-vit-32", 0, whole.mean, whole.std)
    again = load_encoder(str(saved))
    assert again.identity.architecture == "openclip:tiny-vit-32"
    assert torch.allclose(again.embed(images), expected, atol=1e-5)


def test_clip_identity_carries_clips_own_preprocessing() -> None:
    tower = load_encoder("random:openclip:tiny-vit-32")
    spec = tower.identity.input_spec()
    assert (spec.height, spec.resize, spec.interpolation) == (32, "shorter_side_center_crop", "bicubic")
    assert spec.mean == OPENAI_MEAN
    lab = load_encoder("random:openclip:tiny-rn-32").identity.input_spec()
    assert (lab.resize, lab.interpolation) == ("resize", "bilinear")  # how the lab CLIPs were trained


def test_clip_tower_bundle_exports_with_parity_and_its_preprocessing(
    clip_bundle: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(clip_bundle)
    manifest = bundle.manifest
    assert manifest.encoder.architecture == "openclip:tiny-vit-32"
    assert (manifest.input.resize, manifest.input.interpolation) == ("shorter_side_center_crop", "bicubic")
    assert manifest.parity["max_relative_diff_ort_vs_torch"] < 1e-4, manifest.parity
    assert manifest.parity["flag_mismatches"] == 0

    # Preprocessing: a wide image is centre-cropped, not squashed.
    from PIL import Image

    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255  # the white middle third becomes the whole crop
    Image.fromarray(wide).save(tmp_path / "wide.png")
    prepared = load_image_file(tmp_path / "wide.png", manifest.input)
    assert prepared.shape == (3, 32, 32) and prepared[:, :, 2:-2].min() >= 250  # squashed: black sides

    # ONNX Runtime: the same bytes give the same score at batch 1 and in a batch.
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    together = session.run(None, {session.get_inputs()[0].name: batch})[0]
    alone = np.concatenate(
        [session.run(None, {session.get_inputs()[0].name: batch[i : i + 1]})[0] for i in range(8)]
    )
    np.testing.assert_allclose(together, alone, rtol=1e-5)
    assert (
        json.loads((clip_bundle / "manifest.json").read_text())["encoder"]["resize"]
        == "shorter_side_center_crop"
    )
