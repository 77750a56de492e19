"""The evidence outputs of the exported graph, for explanations (service/explain.py shows them).

Whatever the score (pixel or feature), the graph already gives `reconstruction`: the rebuild in the
encoder's normalized pixel space. Appended to the graph, after the score's own computation:

  rebuild          uint8 [N, 3, H, W]: the reconstruction back in pixel space (rounded, clipped);
  discrepancy_map  float32 [N, h, w]: per error cell (the decoder's patch, or the 8 x 8 grid of the
                   conv decoder), the squared difference between input and rebuild in normalized
                   pixels, summed over the cell; 0 on the patches the decoder sees.

For the pixel scores the map holds the score's own terms (`sse` is its sum, `max_patch` its
maximum: the export checks both). The feature score reads several depths (the pixels at four
scales, the encoder's feature maps) and takes the max; its map here is the pixel-space evidence of
the same rebuild, not a decomposition of the score.

The map is normalised by clean calibration statistics: `map_scale` is the (1 - FPR target)
quantile of the counted cells over the clean parity images, so 1.0 means "as unusual as the
threshold" in the threshold's own sense (a cell that clean images exceed as rarely as clean scores
exceed the threshold).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.bundle import (
    ONNX_DISCREPANCY_MAP,
    ONNX_INPUT,
    ONNX_REBUILD,
    ONNX_RECONSTRUCTION,
    ONNX_SCORE,
    InputSpec,
)

EVIDENCE_OUTPUTS = [ONNX_REBUILD, ONNX_DISCREPANCY_MAP]
MAP_RTOL = 1e-4  # a pixel score and its map's sum (or max) in ONNX Runtime


class EvidenceError(Exception):
    """The evidence outputs do not explain the score they belong to."""


def add_evidence_outputs(onnx_path: Path, spec: InputSpec, patch: int, visible: list[int]) -> None:
    """Append `rebuild` and `discrepancy_map` to the graph at `onnx_path` (rewritten in place)."""
    model = onnx.load(str(onnx_path))
    h, w = spec.height // patch, spec.width // patch
    mask = np.ones(h * w, np.float32)
    mask[visible] = 0.0
    consts = {
        "mean": np.array(spec.mean, np.float32).reshape(1, 3, 1, 1),
        "std": np.array(spec.std, np.float32).reshape(1, 3, 1, 1),
        "by255": np.array(255.0, np.float32),
        "zero": np.array(0.0, np.float32),
        "cell_area": np.array(float(patch * patch), np.float32),
        "channel_axis": np.array([1], np.int64),
        "counted": mask.reshape(1, h, w),
    }
    model.graph.initializer.extend(numpy_helper.from_array(v, f"evidence/{k}") for k, v in consts.items())

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        names = [n if n in (ONNX_INPUT, ONNX_RECONSTRUCTION) or n == "" else f"evidence/{n}" for n in inputs]
        target = output if output in EVIDENCE_OUTPUTS else f"evidence/{output}"
        model.graph.node.append(helper.make_node(op, names, [target], **attrs))
        return target

    # The input as the encoder saw it: (x / 255 - mean) / std.
    node("Cast", [ONNX_INPUT], "pixels", to=TensorProto.FLOAT)
    node("Div", ["pixels", "by255"], "unit")
    node("Sub", ["unit", "mean"], "centred")
    node("Div", ["centred", "std"], "normalized")
    # Per cell: squared error summed over channels and the cell's pixels (mean pool x area).
    node("Sub", [ONNX_RECONSTRUCTION, "normalized"], "diff")
    node("Mul", ["diff", "diff"], "square")
    node("ReduceSum", ["square", "channel_axis"], "square_c", keepdims=1)
    node("AveragePool", ["square_c"], "cell_mean", kernel_shape=[patch, patch], strides=[patch, patch])
    node("Mul", ["cell_mean", "cell_area"], "cell_sum")
    node("Squeeze", ["cell_sum", "channel_axis"], "cells")
    node("Mul", ["cells", "counted"], ONNX_DISCREPANCY_MAP)
    # The rebuild in pixels: (r * std + mean) * 255, rounded, clipped, uint8.
    node("Mul", [ONNX_RECONSTRUCTION, "std"], "scaled")
    node("Add", ["scaled", "mean"], "unit_rebuild")
    node("Mul", ["unit_rebuild", "by255"], "pixel_rebuild")
    node("Round", ["pixel_rebuild"], "rounded")
    node("Clip", ["rounded", "zero", "by255"], "clipped")
    node("Cast", ["clipped"], ONNX_REBUILD, to=TensorProto.UINT8)
    model.graph.output.extend(
        [
            helper.make_tensor_value_info(ONNX_REBUILD, TensorProto.UINT8, ["N", 3, spec.height, spec.width]),
            helper.make_tensor_value_info(ONNX_DISCREPANCY_MAP, TensorProto.FLOAT, ["N", h, w]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(onnx_path))


def explain_fields(
    onnx_path: Path, clean: np.ndarray, score_kind: str, fpr_target: float, visible: list[int]
) -> tuple[dict, dict[str, float]]:
    """(the manifest's `explain` entry, parity figures) from the graph's evidence on clean images."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    scores, maps, rebuilds = [], [], []
    for start in range(0, len(clean), 64):
        score, rebuild, cells = session.run(
            [ONNX_SCORE, ONNX_REBUILD, ONNX_DISCREPANCY_MAP], {ONNX_INPUT: clean[start : start + 64]}
        )
        scores.append(score)
        maps.append(cells)
        rebuilds.append(rebuild)
    score, cells = np.concatenate(scores).astype(np.float64), np.concatenate(maps).astype(np.float64)
    if np.concatenate(rebuilds).shape != clean.shape:
        raise EvidenceError(f"the graph's rebuild has shape {rebuilds[0].shape[1:]}, not {clean.shape[1:]}")
    n, h, w = cells.shape
    counted = np.setdiff1d(np.arange(h * w), visible)
    figures: dict[str, float] = {}
    reduction = {"sse": "sum", "max_patch": "max"}.get(score_kind, "none")
    if reduction != "none":
        flat = cells.reshape(n, -1)
        reduced = flat.sum(axis=1) if reduction == "sum" else flat.max(axis=1)
        worst = float((np.abs(reduced - score) / np.maximum(np.abs(score), 1e-12)).max())
        figures["max_relative_diff_map_vs_score"] = worst
        if worst > MAP_RTOL:
            raise EvidenceError(
                f"the discrepancy map's {reduction} is off the score by {worst:.2g} (relative)"
            )
    scale = float(np.quantile(cells.reshape(n, -1)[:, counted], 1 - fpr_target))
    if not np.isfinite(scale) or scale <= 0:
        raise EvidenceError(
            f"the clean discrepancy map's {1 - fpr_target:.3g} quantile is {scale}: cannot normalise"
        )
    entry = {
        "map_shape": (h, w),
        "map_scale": scale,
        "map_reduction": reduction,
        "map_cells_counted": len(counted),
        "description": (
            "per cell, squared difference of input and rebuild in normalized pixels; divided by map_scale, "
            f"the {1 - fpr_target:.4g} quantile of clean cells ({n} clean images)"
            + (
                ""
                if reduction != "none"
                else "; the feature score itself reads the depths that decoder.feature names"
            )
        ),
    }
    return entry, figures
