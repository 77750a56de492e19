"""A tiny, valid bundle whose graph is a known formula, built with onnx.helper (no torch).

score(image) = mean over C, H, W of (x / 255)^2, so a test can compute the exact expected score of any
image. `extra_work` adds a chain of dense layers whose result is multiplied by 0 and added to the
score: it costs compute (for timing-sensitive tests and benchmark dry runs) without changing scores.
`explain` adds the evidence outputs of the bundle contract: `discrepancy_map` [N, H/c, W/c] holds
each c x c cell's mean of (x / 255)^2 (the score is their mean), `rebuild` each cell's mean colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.bundle import (
    ONNX_DISCREPANCY_MAP,
    ONNX_INPUT,
    ONNX_NAME,
    ONNX_REBUILD,
    ONNX_SCORE,
    write_manifest,
)

OPSET = 18
IR_VERSION = 8  # onnxruntime refuses IR versions newer than it knows; 8 is read by every recent one
THRESHOLD = 0.3
CELL = 4  # pixels per side of one discrepancy-map cell


def expected_map(image_chw: np.ndarray) -> np.ndarray:
    """What the synthetic graph's `discrepancy_map` holds for one uint8 [3, H, W] image: [H/c, W/c]."""
    square = (image_chw.astype(np.float64) / 255.0) ** 2
    _, h, w = square.shape
    return square.mean(axis=0).reshape(h // CELL, CELL, w // CELL, CELL).mean(axis=(1, 3))


def _evidence_nodes(height: int, width: int) -> tuple[list, list, list]:
    """Nodes, initializers and outputs for `rebuild` and `discrepancy_map` (reading `x` and `sq`)."""
    pool = {"kernel_shape": [CELL, CELL], "strides": [CELL, CELL]}
    inits = [
        numpy_helper.from_array(np.array([1], np.int64), "channel_axis"),
        numpy_helper.from_array(np.array([1, 1, CELL, CELL], np.float32), "cell_scales"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["sq", "channel_axis"], ["sq_grey"], keepdims=1),
        helper.make_node("AveragePool", ["sq_grey"], ["cells"], **pool),
        helper.make_node("Squeeze", ["cells", "channel_axis"], [ONNX_DISCREPANCY_MAP]),
        helper.make_node("AveragePool", ["x"], ["colours"], **pool),
        helper.make_node("Resize", ["colours", "", "cell_scales"], ["blocks"], mode="nearest"),
        helper.make_node("Round", ["blocks"], ["rounded"]),
        helper.make_node("Cast", ["rounded"], [ONNX_REBUILD], to=TensorProto.UINT8),
    ]
    outputs = [
        helper.make_tensor_value_info(ONNX_REBUILD, TensorProto.UINT8, ["N", 3, height, width]),
        helper.make_tensor_value_info(
            ONNX_DISCREPANCY_MAP, TensorProto.FLOAT, ["N", height // CELL, width // CELL]
        ),
    ]
    return nodes, inits, outputs


def expected_score(image_chw: np.ndarray) -> float:
    """What the synthetic graph returns for one uint8 [3, H, W] image."""
    return float(np.mean((image_chw.astype(np.float64) / 255.0) ** 2))


def build_graph(
    height: int, width: int, extra_work: int = 0, width_hidden: int = 256, explain: bool = False
) -> onnx.ModelProto:
    images = helper.make_tensor_value_info(ONNX_INPUT, TensorProto.UINT8, ["N", 3, height, width])
    score = helper.make_tensor_value_info(ONNX_SCORE, TensorProto.FLOAT, ["N"])
    inits = [
        numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Cast", [ONNX_INPUT], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["x", "scale"], ["x01"]),
        helper.make_node("Mul", ["x01", "x01"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["formula"], keepdims=0),
    ]
    if extra_work:
        rng = np.random.default_rng(0)
        features = 3 * height * width
        inits += [
            numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        ]
        nodes.append(helper.make_node("Reshape", ["x01", "flat_shape"], ["h0"]))
        # One input layer, then one hidden weight shared by every further layer: compute grows with
        # `extra_work`, the file does not.
        for name, fan_in in (("w_in", features), ("w_hidden", width_hidden)):
            weight = rng.normal(0, 1 / np.sqrt(fan_in), (fan_in, width_hidden)).astype(np.float32)
            inits.append(numpy_helper.from_array(weight, name))
        for layer in range(extra_work):
            weight_name = "w_in" if layer == 0 else "w_hidden"
            nodes.append(helper.make_node("MatMul", [f"h{layer}", weight_name], [f"m{layer}"]))
            nodes.append(helper.make_node("Tanh", [f"m{layer}"], [f"h{layer + 1}"]))
        nodes += [
            helper.make_node("ReduceSum", [f"h{extra_work}", "axis1"], ["work"], keepdims=0),
            helper.make_node("Mul", ["work", "zero"], ["nothing"]),
            helper.make_node("Add", ["formula", "nothing"], [ONNX_SCORE]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["formula"], [ONNX_SCORE]))
    outputs = [score]
    if explain:
        more_nodes, more_inits, more_outputs = _evidence_nodes(height, width)
        nodes, inits, outputs = nodes + more_nodes, inits + more_inits, outputs + more_outputs
    graph = helper.make_graph(nodes, "synthetic_detector", [images], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def make_synthetic_bundle(
    root: Path,
    height: int = 32,
    width: int = 32,
    extra_work: int = 0,
    width_hidden: int = 256,
    name: str = "synthetic",
    explain: bool = False,
) -> Path:
    """explain=False: a bundle as made before explanations (score only, no `explain` entry)."""
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(build_graph(height, width, extra_work, width_hidden, explain), root / ONNX_NAME)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    cells = (height // CELL, width // CELL)
    evidence = {
        "onnx_outputs": [ONNX_SCORE, ONNX_REBUILD, ONNX_DISCREPANCY_MAP],
        "explain": {
            "map_shape": cells,
            "map_scale": THRESHOLD,  # the score is the map's mean: a map of THRESHOLD everywhere
            "map_reduction": "mean",
            "map_cells_counted": cells[0] * cells[1],
            "description": "mean of (pixel / 255)^2 over the cell",
        },
    }
    write_manifest(
        root,
        {
            "model_name": name,
            "model_version": "test-1",
            "created_at": "2025-01-01T00:00:00Z",
            "input": {"height": height, "width": width, "mean": mean, "std": std},
            "encoder": {
                "architecture": "formula",
                "kind": "onnx",
                "source": "tests/service/synthetic_bundle.py",
                "sha256": None,
                "embedding_dim": 1,
                "input_size": (height, width),
                "mean": mean,
                "std": std,
            },
            "decoder": {
                "preset": "none",
                "config": {"extra_work": extra_work, "width_hidden": width_hidden},
                "score": "mean_square_intensity",
                "visible_patches": [0],
                "num_patches": 1,
            },
            "threshold": {
                "value": THRESHOLD,
                "fpr_target": 0.05,
                "n_calibration": 1,
                "calibration_source": "synthetic",
                "score_quantiles": {"q0.5": 0.2},
            },
            "opset": OPSET,
            "tools": {"onnx": onnx.__version__},
            **(evidence if explain else {}),
        },
    )
    return root
