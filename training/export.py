"""Export a fitted, calibrated run as ONE ONNX graph in a verified bundle.

The graph takes uint8 images [N, 3, H, W] and holds normalization, encoder, decoder and score, so
the service cannot drift from training. Before the bundle is written, ONNX Runtime is checked
against PyTorch on real images; any score off by more than 1e-4 (relative) or any flag that
differs refuses the export.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import torch

from models.bundle import (
    ONNX_INPUT,
    ONNX_NAME,
    ONNX_RECONSTRUCTION,
    ONNX_SCORE,
    Manifest,
    load_bundle,
    write_manifest,
)
from models.decoder import fixed_visible_patches
from training.fit import FittedRun
from training.scoring import score_run

OPSET = 18
PARITY_RTOL = 1e-4
CALIBRATION_FILE = "calibration.json"
PARITY_IMAGES = "parity_images.npy"


class ExportError(Exception):
    """The export cannot be made or failed its check; the message says which figure failed."""


def _export_torch(
    module: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, names: list[str]
) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            example,
            input_names=names,
            output_names=[ONNX_SCORE, ONNX_RECONSTRUCTION],
            dynamic_shapes=tuple({0: batch} for _ in example),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        program.save(str(path), external_data=False)


def _export_torchscript_encoder(module: torch.jit.ScriptModule, size: tuple[int, int], path: Path) -> None:
    """A TorchScript encoder cannot be traced inside another module (nor by torch.export); the
    TorchScript exporter takes it alone, and the composition then treats it as an ONNX encoder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(2, 3, *size),),
            str(path),
            input_names=["pixels"],
            output_names=["embedding"],
            dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def _compose_onnx_encoder(
    run: FittedRun, encoder_path: Path, head_path: Path, out_path: Path, size: tuple[int, int]
) -> None:
    """ONNX encoder (normalized images -> embedding) + exported head ((images, embedding) -> score)
    -> one graph taking only uint8 images. Normalization is a small exported prologue."""
    encoder_model = onnx.load(str(encoder_path))
    head_model = onnx.load(str(head_path))
    prologue_path = head_path.with_name("prologue.onnx")

    class Prologue(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.normalize = run.head().normalize

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # images pass through (as float) so the head can read them after composition
            return self.normalize(images), images.float()

    example = (torch.zeros(2, 3, *size, dtype=torch.uint8),)
    program = torch.onnx.export(
        Prologue().eval(),
        example,
        input_names=[ONNX_INPUT],
        output_names=["normalized", "images_passthrough"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )
    program.save(str(prologue_path))
    prologue = onnx.load(str(prologue_path))

    # All three graphs must share one opset and IR version to be composed.
    models = [onnx.version_converter.convert_version(m, OPSET) for m in (prologue, encoder_model, head_model)]
    ir = max(m.ir_version for m in models)
    for m in models:
        m.ir_version = ir
    prologue, encoder_model, head_model = models
    encoder_model = onnx.compose.add_prefix(encoder_model, "encoder/")
    head_model = onnx.compose.add_prefix(head_model, "head/")
    enc_in = [
        i.name
        for i in encoder_model.graph.input
        if i.name not in {t.name for t in encoder_model.graph.initializer}
    ][0]
    enc_out = encoder_model.graph.output[0].name
    first = onnx.compose.merge_models(
        prologue, encoder_model, io_map=[("normalized", enc_in)], outputs=[enc_out, "images_passthrough"]
    )
    merged = onnx.compose.merge_models(
        first,
        head_model,
        io_map=[(enc_out, "head/embedding"), ("images_passthrough", "head/images")],
        outputs=[f"head/{ONNX_SCORE}", f"head/{ONNX_RECONSTRUCTION}"],
    )
    for output, name in zip(merged.graph.output, (ONNX_SCORE, ONNX_RECONSTRUCTION), strict=True):
        old = output.name
        for node in merged.graph.node:
            node.output[:] = [name if o == old else o for o in node.output]
        output.name = name
    onnx.checker.check_model(merged)
    onnx.save(merged, str(out_path))


def export_onnx(run: FittedRun, path: Path, score_kind: str) -> None:
    size = run.encoder.identity.input_size
    example = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
    module = run.encoder.module
    if module is not None and not isinstance(module, torch.jit.ScriptModule):
        _export_torch(run.detector(score_kind), (example,), path, [ONNX_INPUT])
        return
    with tempfile.TemporaryDirectory() as tmp:
        encoder_path = run.encoder.onnx_path
        if encoder_path is None:
            encoder_path = Path(tmp) / "encoder.onnx"
            _export_torchscript_encoder(module, size, encoder_path)
        head_path = Path(tmp) / "head.onnx"
        embedding = torch.zeros(2, run.encoder.identity.embedding_dim)
        # After composition the images reach the head as float (passed through the prologue).
        _export_torch(run.head(score_kind), (example.float(), embedding), head_path, ["images", "embedding"])
        _compose_onnx_encoder(run, encoder_path, head_path, path, size)


def _ort_scores(path: Path, images: np.ndarray, batch_size: int) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = [
        session.run([ONNX_SCORE], {ONNX_INPUT: images[i : i + batch_size]})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


def verify_parity(path: Path, run: FittedRun, images: np.ndarray, threshold: float, score_kind: str) -> dict:
    """ONNX Runtime vs PyTorch on `images`, and ONNX Runtime at batch 1 vs batched."""
    reference = score_run(run, images, score_kind).astype(np.float64)
    batched = _ort_scores(path, images, 64).astype(np.float64)
    single = _ort_scores(path, images[:32], 1).astype(np.float64)
    relative = np.abs(batched - reference) / np.maximum(np.abs(reference), 1e-12)
    batch_relative = np.abs(single - batched[:32]) / np.maximum(np.abs(batched[:32]), 1e-12)
    flag_mismatches = int(((batched > threshold) != (reference > threshold)).sum())
    figures = {
        "n_images": float(len(images)),
        "max_relative_diff_ort_vs_torch": float(relative.max()),
        "max_relative_diff_batch1_vs_batch64": float(batch_relative.max()),
        "flag_mismatches": float(flag_mismatches),
    }
    if relative.max() > PARITY_RTOL or flag_mismatches or batch_relative.max() > PARITY_RTOL:
        raise ExportError(f"ONNX Runtime disagrees with PyTorch; bundle not written: {json.dumps(figures)}")
    return figures


def _tool_versions() -> dict[str, str]:
    versions = {}
    for package in ("torch", "onnx", "onnxruntime-gpu", "onnxruntime", "dede"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def export_bundle(
    run: FittedRun,
    out_dir: Path,
    model_name: str = "dede-detector",
    model_version: str = "1",
    overwrite: bool = False,
) -> Manifest:
    """Write and verify `out_dir` (detector.onnx + manifest.json) from a fitted, calibrated run."""
    calibration_path = run.run_dir / CALIBRATION_FILE
    if not calibration_path.exists():
        raise ExportError(
            f"{run.run_dir} has no {CALIBRATION_FILE}: run `dede calibrate --run {run.run_dir}` first"
        )
    calibration = json.loads(calibration_path.read_text())
    parity_images = np.load(run.run_dir / PARITY_IMAGES)
    if len(parity_images) < 256:
        raise ExportError(
            f"the ONNX parity check needs >= 256 clean images; {run.run_dir} was calibrated on "
            f"{len(parity_images)}: run `dede calibrate` again with at least 256 images"
        )
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} exists; pass --force to replace it")

    score_kind = calibration["score_kind"]
    identity = run.encoder.identity
    staging = Path(
        tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent if out_dir.parent.exists() else None)
    )
    try:
        onnx_path = staging / ONNX_NAME
        export_onnx(run, onnx_path, score_kind)
        threshold = calibration["threshold"]
        parity = verify_parity(onnx_path, run, parity_images, threshold["value"], score_kind)
        fields = {
            "model_name": model_name,
            "model_version": model_version,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "input": identity.input_spec().model_dump(mode="json"),
            "encoder": identity.model_dump(mode="json"),
            "decoder": {
                "preset": run.info["preset"],
                "config": run.config.to_dict(),
                "score": f"{score_kind}_masked_normalized",
                "visible_patches": fixed_visible_patches(run.config),
                "num_patches": run.config.num_patches,
            },
            "threshold": threshold,
            "onnx_outputs": [ONNX_SCORE, ONNX_RECONSTRUCTION],
            "opset": OPSET,
            "tools": _tool_versions(),
            "parity": parity,
        }
        manifest = write_manifest(staging, fields)
        load_bundle(staging)  # the bundle as written must verify
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out_dir)
        # mkdtemp makes 0700: a bundle must be readable by the service's own (container) user.
        out_dir.chmod(0o755)
        return manifest
    finally:
        if staging.exists():
            shutil.rmtree(staging)
