"""The exported graph's evidence outputs agree with PyTorch, and `dede score --explain` draws them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from models.bundle import ONNX_DISCREPANCY_MAP, ONNX_INPUT, ONNX_REBUILD, ONNX_SCORE, load_bundle
from training.cli import main
from training.fit import load_run


def _evidence(bundle_path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    session = ort.InferenceSession(
        str(load_bundle(bundle_path).onnx_path), providers=["CPUExecutionProvider"]
    )
    return session.run([ONNX_SCORE, ONNX_REBUILD, ONNX_DISCREPANCY_MAP], {ONNX_INPUT: images})


def test_evidence_outputs_match_pytorch(tiny_bundle: Path, tiny_run: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    spec = bundle.manifest.explain
    assert spec is not None and bundle.manifest.onnx_outputs[0] == ONNX_SCORE
    images = np.load(tiny_run / "parity_images.npy")
    scores, rebuild, discrepancy = _evidence(tiny_bundle, images[:8])
    assert rebuild.dtype == np.uint8 and rebuild.shape == (8, 3, 32, 32)
    assert discrepancy.shape == (8, *spec.map_shape)
    run = load_run(tiny_run)
    head = run.head()
    with torch.no_grad():
        x = head.normalize(torch.from_numpy(images[:8]))
        torch_rebuild = head.rebuild(x, run.encoder.embed(torch.from_numpy(images[:8])))
        torch_map = head.patch_errors(x, torch_rebuild).reshape(8, *spec.map_shape)
        std, mean = head.normalize.std, head.normalize.mean
        torch_pixels = ((torch_rebuild * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    np.testing.assert_allclose(discrepancy, torch_map.numpy(), rtol=1e-3, atol=1e-5)
    assert np.abs(rebuild.astype(int) - torch_pixels.numpy().astype(int)).max() <= 1  # rounding at .5
    # 1.0 in the normalised map is the clean (1 - FPR) quantile of the counted cells.
    _, _, clean_maps = _evidence(tiny_bundle, images)
    counted = np.setdiff1d(np.arange(np.prod(spec.map_shape)), bundle.manifest.decoder.visible_patches)
    fpr = bundle.manifest.threshold.fpr_target
    quantile = np.quantile(clean_maps.reshape(len(images), -1)[:, counted].astype(np.float64), 1 - fpr)
    assert spec.map_scale == pytest.approx(quantile, rel=1e-5)
    pixel_reductions = {"sse_masked_normalized": "sum", "max_patch_masked_normalized": "max"}
    assert spec.map_reduction == pixel_reductions.get(bundle.manifest.decoder.score, "none")


def test_a_pixel_score_is_the_sum_of_its_map(
    tiny_run: Path, tiny_data: dict[str, Path], tmp_path: Path
) -> None:
    from training.calibrate import calibrate_run
    from training.data import load_images
    from training.export import export_bundle

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    spec = load_run(run_dir).encoder.identity.input_spec()
    clean, _ = load_images(str(tiny_data["clean"]), spec)
    calibrate_run(run_dir, clean, fpr=0.05, source="clean.npz", score_kind="sse")
    manifest = export_bundle(load_run(run_dir), tmp_path / "bundle")
    assert manifest.explain is not None and manifest.explain.map_reduction == "sum"
    assert manifest.parity["max_relative_diff_map_vs_score"] < 1e-4
    scores, _, discrepancy = _evidence(tmp_path / "bundle", np.load(run_dir / "parity_images.npy")[:16])
    np.testing.assert_allclose(discrepancy.reshape(16, -1).sum(axis=1), scores, rtol=1e-4)


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
