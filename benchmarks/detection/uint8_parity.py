"""The export's parity check for a uint8-input ONNX encoder, per feature rule, on a trained encoder.

A uint8 encoder gets the rebuild rounded to pixels before it sees it, and ONNX Runtime and torch
can round a half-way value apart; the parity check (training/export.py, 1e-4 of a clean standard
deviation) must still pass on a real fit. The relative figures' clean spread is narrower than the
squared ones', so the rules that read them (max_all_relative, the default max_all_both, and
max_all_both_balanced) have the margin in question. This takes the lab-heldout clean encoder,
exports it as an ONNX black box that takes raw uint8 NHWC pixels (normalization inside the graph,
a common export form), taps two inner ReLU tensors by name, fits the conv decoder with `dede fit`'s
defaults on 2,000 Tiny-ImageNet images, and exports it under each rule (the statistics restated,
the decoder the same), recording the parity figures.

    python -m benchmarks.detection.uint8_parity
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from benchmarks.detection.shipped import N_CAL, N_FIT, SPLIT_SEED, case_data
from benchmarks.provenance import REPO_ROOT, run_record
from models.bundle import prepare_array
from models.encoders import load_encoder
from training.calibrate import calibrate_run
from training.export import export_bundle
from training.fit import FitSettings, fit_decoder, load_run

CLEAN_ENCODER = "runs/lab-heldout/simclr_clean/encoder.safetensors"
RULES = ("max_all", "max_all_relative", "max_all_both", "max_all_both_balanced")


class RawPixels(nn.Module):
    """uint8 NHWC pixels -> the encoder's embedding, its normalization inside (a common export form;
    the tests export their uint8 encoders with it too)."""

    def __init__(self, encoder: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float() / 255.0
        return self.encoder((x - self.mean) / self.std)


def export_uint8_encoder(path: Path) -> list[str]:
    """The clean encoder as a uint8 NHWC ONNX graph; returns two inner tensors (the middle and the
    last ReLU), the names a user would pass to `dede fit --feature-stages`."""
    loaded = load_encoder(str(REPO_ROOT / CLEAN_ENCODER))
    module = RawPixels(loaded.module.eval(), loaded.mean, loaded.std).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(2, 32, 32, 3, dtype=torch.uint8),),
            str(path),
            input_names=["pixels"],
            output_names=["embedding"],
            dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=18,
            dynamo=False,
        )
    relus = [n.output[0] for n in onnx.load(str(path)).graph.node if n.op_type == "Relu"]
    return [relus[len(relus) // 2], relus[-1]]


def main() -> None:
    started = time.time()
    work = REPO_ROOT / "runs" / "uint8-parity"
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / "encoder_uint8_nhwc.onnx"
    tensors = export_uint8_encoder(onnx_path)
    encoder = load_encoder(str(onnx_path), feature_tensors=tensors)
    spec = encoder.identity.input_spec()
    data = case_data()
    fit_images = prepare_array(data["tiny"][:N_FIT], spec)
    id_cal = prepare_array(data["id_cal"], spec)
    settings = FitSettings(data_source=f"tinyimagenet_val[:{N_FIT}]", feature_stages=",".join(tensors))
    rules = {}
    for rule in RULES:
        run_dir = work / "run"
        fit_decoder(encoder, fit_images, run_dir, replace(settings, feature_rule=rule))
        calibrate_run(run_dir, id_cal, 0.01, f"cifar10_train ({N_CAL} drawn at random, seed {SPLIT_SEED})")
        run = load_run(run_dir)
        manifest = export_bundle(run, work / f"bundle-{rule}", model_name=f"uint8-{rule}", overwrite=True)
        scale = np.array(run.feature_stats["scale"]) / np.abs(np.array(run.feature_stats["centre"]))
        rules[rule] = {
            "score": manifest.decoder.score,
            "parity": manifest.parity,
            "depths": run.feature_stats["depths"],
            "clean_spread_over_centre": [round(float(v), 4) for v in scale],
        }
        print(rule, manifest.parity, flush=True)
    info = json.loads((work / "run" / "run.json").read_text())
    out = REPO_ROOT / "benchmarks" / "detection" / "uint8_parity.json"
    result = {
        "encoder": f"{CLEAN_ENCODER} exported as uint8 NHWC ONNX, normalization inside",
        "feature_tensors": tensors,
        "fit": info.get("result"),
        "rules": rules,
        "wall_seconds": round(time.time() - started, 1),
        **run_record(),
    }
    out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
