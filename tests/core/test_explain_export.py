"""The exported graph's evidence outputs agree with PyTorch, and `dede score --explain` draws them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from models.bundle import ONNX_DISCREPANCY_MAP, ONNX_INPUT, ONNX_REBUILD, ONNX_SCORE, load_bundle
from training.cli import main
from training.fit import load_run


def test_evidence_outputs_match_pytorch_and_add_up_to_the_score(tiny_bundle: Path, tiny_run: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    spec = bundle.manifest.explain
    assert spec is not None and bundle.manifest.onnx_outputs[0] == ONNX_SCORE
    images = np.load(tiny_run / "parity_images.npy")[:8]
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    scores, rebuild, discrepancy = session.run(
        [ONNX_SCORE, ONNX_REBUILD, ONNX_DISCREPANCY_MAP], {ONNX_INPUT: images}
    )
    assert rebuild.dtype == np.uint8 and rebuild.shape == images.shape
    assert discrepancy.shape == (8, *spec.map_shape)
    detector = load_run(tiny_run).detector()
    with torch.no_grad():
        pixels = torch.from_numpy(images)
        torch_score, torch_rebuild, torch_map = detector.head.explain(
            pixels, detector.encoder(detector.head.normalize(pixels))
        )
    np.testing.assert_allclose(discrepancy, torch_map.numpy(), rtol=1e-4, atol=1e-6)
    assert np.abs(rebuild.astype(int) - torch_rebuild.numpy().astype(int)).max() <= 1  # rounding at .5
    # sse: the score is the map's sum; a map of map_scale in every counted cell scores the threshold.
    np.testing.assert_allclose(discrepancy.reshape(8, -1).sum(axis=1), scores, rtol=1e-4)
    assert spec.map_reduction == "sum"
    assert spec.map_scale * spec.map_cells_counted == pytest.approx(bundle.threshold)
    assert (discrepancy.reshape(8, -1) > 0).sum(axis=1).max() <= spec.map_cells_counted


def test_dede_score_explain_writes_overlay_grids(
    tiny_bundle: Path, tiny_data: dict[str, Path], tmp_path: Path
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    source = np.load(tiny_data["clean"])["x"]
    Image.fromarray(source[0]).save(files / "a.png")
    Image.fromarray(source[1]).resize((50, 40)).save(files / "b.jpg")
    out = tmp_path / "explained"
    assert (
        main(["score", "--bundle", str(tiny_bundle), str(files), "--explain", str(out), "--format", "csv"])
        == 0
    )
    written = sorted(p.name for p in out.iterdir())
    assert written == ["00000_a.png", "00001_b.png"]
    grid = Image.open(out / "00000_a.png")
    assert grid.size == (3 * 128 + 2 * 8, 128)
    assert np.array_equal(np.asarray(grid)[:, :128], np.kron(source[0], np.ones((4, 4, 1), np.uint8)))
