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
from models.detector import depth_discrepancies, error_patch_size
from models.encoders import onnx_with_outputs
from training.evidence import EVIDENCE_OUTPUTS, EvidenceError, add_evidence_outputs, explain_fields
from training.fit import FittedRun, narrow_spread
from training.scoring import score_run

OPSET = 18
PARITY_RTOL = 1e-4
CALIBRATION_FILE = "calibration.json"
PARITY_IMAGES = "parity_images.npy"
PARITY_COUNT = 256  # clean images the export checks ONNX Runtime against PyTorch on


# The manifest's name for each score (models/detector.py defines them).
SCORE_NAMES = {
    "sse": "sse_masked_normalized",
    "max_patch": "max_patch_masked_normalized",
    "feature": "feature_robust_z_mean",
}
# The feature scores that read the pixels at several scales beside the stages and take the max,
# by the rule of the run's statistics (training/fit.py FEATURE_RULES).
DEPTHS_SCORE_NAMES = {
    "max_all": "depths_robust_z_max",
    "max_all_tail": "depths_tail_z_max",
    "max_all_relative": "depths_relative_robust_z_max",
    "max_all_both": "depths_both_robust_z_max",
    "max_all_both_balanced": "depths_both_balanced_z_max",
}


def score_name(run: FittedRun, score_kind: str) -> str:
    """The manifest's name for the score this run ships as `score_kind`."""
    if score_kind == "feature" and run.pixel_factors:
        return DEPTHS_SCORE_NAMES[run.feature_rule]
    return SCORE_NAMES[score_kind]


def _feature_spec(run: FittedRun, standardised: dict | None) -> dict:
    s = run.feature_stats
    spec = {k: s[k] for k in ("stages", "centre", "scale", "n_images", "source", "rule")}
    spec.update({k: s[k] for k in ("pixel_factors", "depths", "combine", "discrepancy") if k in s})
    if standardised:
        # Why the statistics are these images' (`dede calibrate --standardise-on`): the calibration
        # images' widest depth shift in the auxiliary units is what `auto` decides on (a run
        # calibrated before the shift was recorded has none).
        widest = standardised.get("widest_shift")
        shift = (
            f"; the calibration images' widest depth shift {widest['median_z']:+.2f} auxiliary units, at {widest['depth']}"
            if widest
            else ""
        )
        spec["standardised_on"] = (
            f"{standardised['on']} images (asked: {standardised.get('asked', standardised['on'])}{shift})"
        )
    return spec


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


class _Prologue(torch.nn.Module):
    """uint8 images -> (normalized images, the images as float): the front of a composed graph."""

    def __init__(self, normalize: torch.nn.Module) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # images pass through (as float) so the head can read them after composition
        return self.normalize(images), images.float()


class _RebuildHead(torch.nn.Module):
    """(images, embedding) -> (rebuild, the rebuild as the ONNX encoder's input): the middle of a
    composed feature-score graph. A uint8-input encoder gets the rebuild's pixels, rounded."""

    def __init__(self, run: FittedRun) -> None:
        super().__init__()
        self.head = run.head("sse")
        self.raw_uint8 = run.encoder.onnx_input_dtype == "uint8"
        self.nhwc = run.encoder.onnx_layout == "NHWC"

    def forward(self, images: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rebuild = self.head.rebuild(self.head.normalize(images), embedding)
        if self.raw_uint8:
            std, mean = self.head.normalize.std, self.head.normalize.mean
            encoder_input = torch.round((rebuild * std + mean) * 255.0).clamp(0, 255).to(torch.uint8)
        else:
            encoder_input = rebuild
        if self.nhwc:
            encoder_input = encoder_input.permute(0, 2, 3, 1)
        return rebuild, encoder_input


class _FeatureTail(torch.nn.Module):
    """(input's stage tensors..., rebuild's stage tensors...[, images as float, rebuild]) -> feature
    score: the graph's end. The images and the rebuild come last where the score reads pixels."""

    def __init__(self, run: FittedRun, stages: int) -> None:
        super().__init__()
        self.standardiser = run.standardiser()
        self.normalize = run.head().normalize
        self.pixel_factors = run.pixel_factors
        self.discrepancy = run.discrepancy
        self.stages = stages

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        a, b = list(tensors[: self.stages]), list(tensors[self.stages : 2 * self.stages])
        x = rebuild = torch.zeros(0)
        if self.pixel_factors:
            images, rebuild = tensors[2 * self.stages :]
            x = self.normalize(images)
        return self.standardiser(depth_discrepancies(x, rebuild, a, b, self.pixel_factors, self.discrepancy))


def _encoder_input_node(model: onnx.ModelProto, run: FittedRun) -> None:
    """Add to the prologue graph the tensor `encoder_input`: what the ONNX encoder takes (the
    normalized images, or the raw uint8 ones; transposed to NHWC where it wants that)."""
    source = ONNX_INPUT if run.encoder.onnx_input_dtype == "uint8" else "normalized"
    if run.encoder.onnx_layout == "NHWC":
        node = onnx.helper.make_node("Transpose", [source], ["encoder_input"], perm=[0, 2, 3, 1])
    else:
        node = onnx.helper.make_node("Identity", [source], ["encoder_input"])
    model.graph.node.append(node)
    elem = onnx.TensorProto.UINT8 if source == ONNX_INPUT else onnx.TensorProto.FLOAT
    model.graph.output.append(onnx.helper.make_tensor_value_info("encoder_input", elem, None))


def _aligned(*models: onnx.ModelProto) -> list[onnx.ModelProto]:
    """All graphs on one opset and IR version, as composition needs."""
    converted = [onnx.version_converter.convert_version(m, OPSET) for m in models]
    ir = max(m.ir_version for m in converted)
    for m in converted:
        m.ir_version = ir
    return converted


def _rename_outputs(model: onnx.ModelProto, names: dict[str, str]) -> None:
    for output in model.graph.output:
        if output.name in names:
            old, new = output.name, names[output.name]
            for node in model.graph.node:
                node.output[:] = [new if o == old else o for o in node.output]
                node.input[:] = [new if i == old else i for i in node.input]
            output.name = new


def _export_part(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    varargs: bool = False,
) -> onnx.ModelProto:
    """One torch part of a composed graph, batch axis dynamic. `varargs`: the module's forward
    takes `*tensors` (torch.export then sees one input, a tuple)."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = tuple({0: batch} for _ in example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            example,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=(dynamic,) if varargs else dynamic,
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        ).save(str(path))
    return onnx.load(str(path))


def _compose_onnx_encoder(
    run: FittedRun, encoder_path: Path, tmp: Path, out_path: Path, size: tuple[int, int], score_kind: str
) -> None:
    """ONNX encoder + exported torch parts -> one graph taking only uint8 images.

    Pixel scores: prologue -> encoder -> head. The feature score runs the encoder twice:
    prologue -> encoder (embedding + named tensors) -> rebuild head -> the encoder again on the
    rebuild (its named tensors) -> the standardising tail."""
    example = torch.zeros(2, 3, *size, dtype=torch.uint8)
    prologue = _export_part(
        _Prologue(run.head().normalize),
        (example,),
        tmp / "prologue.onnx",
        [ONNX_INPUT],
        ["normalized", "images_passthrough"],
    )
    _encoder_input_node(prologue, run)

    feature = score_kind == "feature"
    stages = list(run.feature_stats["stages"]) if feature else []
    encoder_model = (
        onnx_with_outputs(encoder_path, tuple(stages)) if feature else onnx.load(str(encoder_path))
    )
    initializers = {t.name for t in encoder_model.graph.initializer}
    enc_in = [i.name for i in encoder_model.graph.input if i.name not in initializers][0]
    enc_out = encoder_model.graph.output[0].name
    embedding = torch.zeros(2, run.encoder.identity.embedding_dim)

    if not feature:
        # After composition the images reach the head as float (passed through the prologue).
        head_model = _export_part(
            run.head(score_kind),
            (example.float(), embedding),
            tmp / "head.onnx",
            ["images", "embedding"],
            [ONNX_SCORE, ONNX_RECONSTRUCTION],
        )
        prologue, encoder_model, head_model = _aligned(prologue, encoder_model, head_model)
        encoder_model = onnx.compose.add_prefix(encoder_model, "encoder/")
        head_model = onnx.compose.add_prefix(head_model, "head/")
        first = onnx.compose.merge_models(
            prologue,
            encoder_model,
            io_map=[("encoder_input", f"encoder/{enc_in}")],
            outputs=[f"encoder/{enc_out}", "images_passthrough"],
        )
        merged = onnx.compose.merge_models(
            first,
            head_model,
            io_map=[(f"encoder/{enc_out}", "head/embedding"), ("images_passthrough", "head/images")],
            outputs=[f"head/{ONNX_SCORE}", f"head/{ONNX_RECONSTRUCTION}"],
        )
        _rename_outputs(
            merged, {f"head/{ONNX_SCORE}": ONNX_SCORE, f"head/{ONNX_RECONSTRUCTION}": ONNX_RECONSTRUCTION}
        )
    else:
        rebuild_model = _export_part(
            _RebuildHead(run),
            (example.float(), embedding),
            tmp / "rebuild.onnx",
            ["images", "embedding"],
            [ONNX_RECONSTRUCTION, "encoder_input"],
        )
        _, features = run.encoder.embed_with_features(example, stages)
        names = [f"a{i}" for i in range(len(stages))] + [f"b{i}" for i in range(len(stages))]
        # distinct tensors: an input passed twice would be exported as one graph input
        tail_example = tuple(f.clone() for f in features) + tuple(f.clone() for f in features)
        pixels = bool(run.pixel_factors)
        if pixels:
            names += ["images", "rebuild"]
            tail_example += (example.float(), torch.zeros(2, 3, *size))
        tail = _export_part(
            _FeatureTail(run, len(stages)),
            tail_example,
            tmp / "tail.onnx",
            names,
            [ONNX_SCORE],
            varargs=True,
        )
        prologue, enc_a, rebuild_model, enc_b, tail = _aligned(
            prologue, encoder_model, rebuild_model, encoder_model, tail
        )
        enc_a, enc_b = onnx.compose.add_prefix(enc_a, "enc_a/"), onnx.compose.add_prefix(enc_b, "enc_b/")
        rebuild_model = onnx.compose.add_prefix(rebuild_model, "rebuild/")
        tail = onnx.compose.add_prefix(tail, "tail/")
        feats_a, feats_b = [f"enc_a/{s}" for s in stages], [f"enc_b/{s}" for s in stages]
        rebuilt = f"rebuild/{ONNX_RECONSTRUCTION}"
        carried = ["images_passthrough"] if pixels else []  # the tail's pixel depths read them
        merged = onnx.compose.merge_models(
            prologue,
            enc_a,
            io_map=[("encoder_input", f"enc_a/{enc_in}")],
            outputs=[f"enc_a/{enc_out}", "images_passthrough", *feats_a],
        )
        merged = onnx.compose.merge_models(
            merged,
            rebuild_model,
            io_map=[(f"enc_a/{enc_out}", "rebuild/embedding"), ("images_passthrough", "rebuild/images")],
            outputs=[*feats_a, rebuilt, "rebuild/encoder_input", *carried],
        )
        merged = onnx.compose.merge_models(
            merged,
            enc_b,
            io_map=[("rebuild/encoder_input", f"enc_b/{enc_in}")],
            outputs=[*feats_a, rebuilt, *feats_b, *carried],
        )
        merged = onnx.compose.merge_models(
            merged,
            tail,
            io_map=[(f, f"tail/a{i}") for i, f in enumerate(feats_a)]
            + [(f, f"tail/b{i}") for i, f in enumerate(feats_b)]
            + ([("images_passthrough", "tail/images"), (rebuilt, "tail/rebuild")] if pixels else []),
            outputs=[f"tail/{ONNX_SCORE}", rebuilt],
        )
        _rename_outputs(
            merged, {f"tail/{ONNX_SCORE}": ONNX_SCORE, f"rebuild/{ONNX_RECONSTRUCTION}": ONNX_RECONSTRUCTION}
        )
    # The score first, as the bundle's contract says.
    outputs = sorted(merged.graph.output, key=lambda o: o.name != ONNX_SCORE)
    del merged.graph.output[:]
    merged.graph.output.extend(outputs)
    onnx.checker.check_model(merged)
    onnx.save(merged, str(out_path))


def export_onnx(run: FittedRun, path: Path, score_kind: str) -> None:
    size = run.encoder.identity.input_size
    example = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
    module = run.encoder.module
    if module is not None and not isinstance(module, torch.jit.ScriptModule):
        _export_torch(run.detector(score_kind), (example,), path, [ONNX_INPUT])
        return
    if module is not None and score_kind == "feature":
        raise ExportError(
            "the feature score cannot tap a TorchScript encoder's stages: give the encoder as a state "
            "dict with --arch, or as ONNX with --feature-tensors, or calibrate with a pixel score"
        )
    with tempfile.TemporaryDirectory() as tmp:
        encoder_path = run.encoder.onnx_path
        if encoder_path is None:
            encoder_path = Path(tmp) / "encoder.onnx"
            _export_torchscript_encoder(module, size, encoder_path)
        _compose_onnx_encoder(run, encoder_path, Path(tmp), path, size, score_kind)


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
    # The feature score is in standard deviations and crosses zero: its differences are taken
    # relative to the score or to one standard deviation, whichever is larger.
    floor = 1.0 if score_kind == "feature" else 1e-12
    relative = np.abs(batched - reference) / np.maximum(np.abs(reference), floor)
    batch_relative = np.abs(single - batched[:32]) / np.maximum(np.abs(batched[:32]), floor)
    flag_mismatches = int(((batched > threshold) != (reference > threshold)).sum())
    figures = {
        "n_images": float(len(images)),
        "max_relative_diff_ort_vs_torch": float(relative.max()),
        "max_relative_diff_batch1_vs_batch64": float(batch_relative.max()),
        "flag_mismatches": float(flag_mismatches),
    }
    if relative.max() > PARITY_RTOL or flag_mismatches or batch_relative.max() > PARITY_RTOL:
        why = narrow_spread(run.feature_stats) if score_kind == "feature" else None
        raise ExportError(
            f"ONNX Runtime disagrees with PyTorch; bundle not written: {json.dumps(figures)}"
            + (f"; {why} (the disagreement is float noise measured in that narrow unit)" if why else "")
        )
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
    if len(parity_images) < PARITY_COUNT:
        raise ExportError(
            f"the ONNX parity check needs >= {PARITY_COUNT} clean images; {run.run_dir} was calibrated on "
            f"{len(parity_images)}: run `dede calibrate` again with at least {PARITY_COUNT} images"
        )
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} exists; pass --force to replace it")

    score_kind = calibration["score_kind"]
    standardised = calibration.get("feature_standardisation")
    if score_kind == "feature" and standardised and run.feature_stats:
        now = (run.feature_stats["centre"], run.feature_stats["scale"])
        if now != (standardised["centre"], standardised["scale"]):
            raise ExportError(
                f"the feature score's statistics in {run.run_dir} changed after its threshold was set "
                f"(they were the {standardised['on']} images'; a fit with another rule restates them): "
                f"run `dede calibrate --run {run.run_dir}` again"
            )
    identity = run.encoder.identity
    staging = Path(
        tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent if out_dir.parent.exists() else None)
    )
    try:
        onnx_path = staging / ONNX_NAME
        export_onnx(run, onnx_path, score_kind)
        threshold = calibration["threshold"]
        parity = verify_parity(onnx_path, run, parity_images, threshold["value"], score_kind)
        # Explanations: rebuild and discrepancy map appended after the score (training/evidence.py).
        add_evidence_outputs(onnx_path, identity.input_spec(), error_patch_size(run.decoder), run.visible)
        try:
            explain, map_parity = explain_fields(
                onnx_path, parity_images, score_kind, threshold["fpr_target"], run.visible
            )
        except EvidenceError as exc:
            raise ExportError(f"{exc}; bundle not written") from exc
        parity.update(map_parity)
        fields = {
            "model_name": model_name,
            "model_version": model_version,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "input": identity.input_spec().model_dump(mode="json"),
            "encoder": identity.model_dump(mode="json"),
            "decoder": {
                "preset": run.info["preset"],
                "config": run.config.to_dict(),
                "score": score_name(run, score_kind),
                "visible_patches": run.visible,
                "num_patches": run.num_cells,
                "feature": _feature_spec(run, standardised) if score_kind == "feature" else None,
            },
            "threshold": threshold,
            "onnx_outputs": [ONNX_SCORE, ONNX_RECONSTRUCTION, *EVIDENCE_OUTPUTS],
            "explain": explain,
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
