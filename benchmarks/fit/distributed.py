"""`dede fit` single-process vs under torchrun (2 CPU processes, gloo), at equal total steps.

    nice -n 10 python -m benchmarks.fit.distributed --encoder runs/shipped-encoders/simclr_clean.safetensors

Both fits run the same `dede fit` command (the second through `python -m torch.distributed.run
--standalone --nproc_per_node=2`) on the same images with the same global batch and step budget,
validation every 100 steps, no plateau stop and no time budget, so both take exactly --steps steps.
The goal (issue 23): the two-process fit's validation loss within 2% of the single-process fit's.
Writes benchmarks/fit/distributed.json: both fits' validation losses per validation, their ratio,
wall times, and the provenance block (commit, machine, command, load).

The two-process fit splits each global batch between its ranks, so the same steps see the same
images. With the MAE decoder (`--preset lab`) that is the single-process fit up to the order of
float sums; the default conv decoder's batch norm, on CPU, normalises each rank's half-batch by its
own statistics (torch syncs batch norm across processes on CUDA only), so it is the same fit in
distribution, not in every bit.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.provenance import REPO_ROOT, run_record

OUT = REPO_ROOT / "benchmarks" / "fit" / "distributed.json"
GOAL = 0.02  # |two-process / single-process validation loss - 1|


def fit(command: list[str], out: Path, threads: int) -> dict:
    """Run one `dede fit` from scratch; its wall time, validation log and result."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": str(threads)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    started = time.time()
    subprocess.run(command, env=env, check=True, cwd=REPO_ROOT)
    wall = time.time() - started
    with open(out / "log.csv") as handle:
        log = list(csv.DictReader(handle))
    info = json.loads((out / "run.json").read_text())
    return {
        "command": " ".join(command),
        "omp_threads_per_process": threads,
        "wall_seconds": round(wall, 1),
        "fit_loop_seconds": float(log[-1]["seconds"]),
        "steps": info["result"]["steps"],
        "validation": [
            {
                "step": int(r["step"]),
                "train_loss": float(r["train_loss"]),
                "val_loss": float(r["val_loss_test_mask"]),
            }
            for r in log
        ],
        "final_val_loss": float(log[-1]["val_loss_test_mask"]),
        "best_val_loss": info["result"]["best_val_loss"],
        "best_step": info["result"]["best_step"],
        "distributed": info["fit"].get("distributed"),
        "encoder_identity": info["encoder_identity"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--encoder", default=str(REPO_ROOT / "runs" / "shipped-encoders" / "simclr_clean.safetensors")
    )
    parser.add_argument("--data", default="tinyimagenet_val", help="a source `dede fit --data` reads")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--preset", default="conv")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch of both fits")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--work", default=str(REPO_ROOT / "runs" / "fit-distributed"))
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()

    work = Path(args.work) / args.preset
    cores = os.cpu_count() or 1
    load_before = [round(x, 2) for x in os.getloadavg()]

    def dede_fit(out: Path) -> list[str]:
        return [
            *("-m", "training.cli", "fit", "--encoder", args.encoder, "--data", args.data),
            *("--limit", str(args.limit), "--preset", args.preset, "--max-steps", str(args.steps)),
            *("--batch-size", str(args.batch_size), "--device", "cpu", "--max-minutes", "0"),
            *("--patience", "1000000", "--no-resume", "--out", str(out)),
        ]

    single = fit([sys.executable, *dede_fit(work / "single")], work / "single", cores)
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.procs}",
    ]
    two = fit(
        [*launcher, *dede_fit(work / f"procs{args.procs}")],
        work / f"procs{args.procs}",
        max(1, cores // args.procs),
    )

    a, b = (load_file(str(work / name / "decoder.safetensors")) for name in ("single", f"procs{args.procs}"))
    weight_gap = max(  # per tensor: the largest difference relative to the tensor's largest entry
        float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12))
        for k in a
        if a[k].is_floating_point()
    )
    ratio = two["final_val_loss"] / single["final_val_loss"]
    record = {
        **run_record(["-m", "benchmarks.fit.distributed", *sys.argv[1:]]),
        "load_average_before": load_before,
        "torch": torch.__version__,
        "data": args.data,
        "n_images": args.limit,
        "encoder": single["encoder_identity"],
        "preset": args.preset,
        "global_batch_size": args.batch_size,
        "steps": args.steps,
        "goal": f"two-process validation loss within {GOAL:.0%} of the single-process fit at equal total steps",
        "val_loss_single": single["final_val_loss"],
        f"val_loss_{args.procs}_procs": two["final_val_loss"],
        "ratio": round(ratio, 6),
        "relative_gap": round(abs(ratio - 1), 6),
        "goal_met": abs(ratio - 1) <= GOAL,
        "fitted_decoders_max_relative_weight_gap": weight_gap,
        "single": single,
        f"procs{args.procs}": two,
        "note": "wall times on a shared CPU machine, with the load averages above: the single process "
        "runs cores OMP threads, each rank cores / procs; a CPU comparison under load, not a GPU speed-up. "
        "The conv decoder's batch norm is per rank on CPU, so the fits agree in distribution, not bit for bit",
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"{args.preset}, {args.steps} steps at global batch {args.batch_size}: validation loss "
        f"{single['final_val_loss']:.5f} single vs {two['final_val_loss']:.5f} with {args.procs} processes "
        f"(ratio {ratio:.4f}, goal within {GOAL:.0%}: {'met' if abs(ratio - 1) <= GOAL else 'missed'}); "
        f"wall {single['wall_seconds']:.0f} s vs {two['wall_seconds']:.0f} s -> {args.out}"
    )


if __name__ == "__main__":
    main()
