"""Where a fitted run's embeddings and rebuilds point: the probe behind the warp-trigger analysis.

    python -m benchmarks.detection.rebuild_probe runs/shipped/<case> --trigger warp --name <case>

On 500 clean CIFAR-10 test images (not of the target class), the same triggered, and 500 of the
Tiny-ImageNet images the fit embeds: the median (10th, 90th percentile) cosine of their embeddings
and of their rebuilds' embeddings to the triggered images' mean embedding direction, and each
feature stage's discrepancy. A backdoor that fires on the rebuilds shows as rebuild cosines near 1
for clean images too. Writes benchmarks/detection/rebuild_probe.json (one entry per --name).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.provenance import REPO_ROOT, run_record
from lab.attacks.triggers import make_trigger
from models.bundle import prepare_array
from models.feature_taps import TappedEncoder, stage_discrepancy
from training.data import data_dir, limited_indices, load_npz
from training.fit import load_run

N = 500


def _summary(values: np.ndarray) -> list[float]:
    return [
        round(float(np.median(values)), 4),
        round(float(np.percentile(values, 10)), 4),
        round(float(np.percentile(values, 90)), 4),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--trigger", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks" / "detection" / "rebuild_probe.json"
    )
    args = parser.parse_args()
    run = load_run(args.run_dir)
    if run.feature_stats is None or run.encoder.module is None:
        raise SystemExit(
            f"{args.run_dir}: the probe needs a torch encoder with tapped stages (a feature-score run)"
        )
    spec = run.encoder.identity.input_spec()
    x, y = load_npz(data_dir() / "cifar10_test.npz")
    not_target = np.flatnonzero(y != 0)  # drawn at random: the data set is sorted by class
    clean = prepare_array(x[not_target[limited_indices(len(not_target), N)]], spec)
    sets = {
        "clean": clean,
        "triggered": make_trigger(args.trigger, (spec.height, spec.width)).apply_uint8_nchw(clean),
        "aux": prepare_array(
            load_npz(data_dir() / "tinyimagenet_val.npz")[0][limited_indices(2000, N)], spec
        ),
    }
    stages = run.feature_stats["stages"]
    head = run.head("sse")
    tapped = TappedEncoder(run.encoder.module, stages)
    measured = {}
    with torch.no_grad():
        for name, images in sets.items():
            x_norm = head.normalize(torch.from_numpy(images))
            z, of_input = tapped(x_norm)
            z_rebuild, of_rebuild = tapped(head.rebuild(x_norm, z))
            d = torch.stack([stage_discrepancy(a, b) for a, b in zip(of_input, of_rebuild, strict=True)], 1)
            measured[name] = (z.numpy(), z_rebuild.numpy(), d.numpy())
    tapped.remove()

    def unit(z: np.ndarray) -> np.ndarray:
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    target = unit(measured["triggered"][0]).mean(axis=0)
    target /= np.linalg.norm(target)
    entry = {"run_dir": str(args.run_dir), "trigger": args.trigger, "stages": stages, "n": N}
    for name, (z, z_rebuild, d) in measured.items():
        entry[name] = {
            "embedding_cosine_to_triggered_mean": _summary(unit(z) @ target),
            "rebuild_embedding_cosine_to_triggered_mean": _summary(unit(z_rebuild) @ target),
            "stage_discrepancy": {s: _summary(d[:, i]) for i, s in enumerate(stages)},
        }
    entry["run"] = run_record()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.name] = entry
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: entry[k] for k in ("clean", "triggered", "aux")}, indent=1))


if __name__ == "__main__":
    main()
