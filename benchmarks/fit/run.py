"""Loss curves behind the `lab` decoder preset: fit candidates on 17k CIFAR-10 images, 2 CPU cores.

    python -m benchmarks.fit.run --encoder runs/lab/simclr_clean/encoder.safetensors

Each candidate is the lab preset with overrides; each fit records train loss (training mask) and
validation loss at the TEST-time mask (what the detector scores) per epoch, with wall time. Writes
benchmarks/fit/results.json, REPORT.md and loss_curves.png. Fits resume (runs/fit-bench/NAME).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.provenance import REPO_ROOT, run_record
from models.bundle import InputSpec
from models.decoder import DeDeDecoder, preset_config
from models.encoders import load_encoder
from training.data import load_images
from training.fit import FitSettings, fit_decoder

OUT = REPO_ROOT / "benchmarks" / "fit"
PLATEAU_BUDGET_MIN = 30  # the lab preset must plateau on 17k images within this on 2 CPU cores


def parse_candidate(text: str) -> tuple[str, dict]:
    """`lab` or `lab:width=128,patch_size=8` -> (preset, overrides)."""
    preset, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=")
        overrides[key] = float(value) if "." in value else int(value)
    return preset, overrides


def plateau_epoch(val: list[float], tolerance: float = 0.01) -> int:
    """First epoch whose val loss is within `tolerance` (relative) of the best val loss reached."""
    best = min(val)
    return next(i + 1 for i, v in enumerate(val) if v <= best * (1 + tolerance))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--data", default="cifar10_train")
    parser.add_argument("--candidates", nargs="+", default=["lab"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--work", default=str(REPO_ROOT / "runs" / "fit-bench"))
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite REPORT.md and the plot from results.json"
    )
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads((OUT / "results.json").read_text()))
        return

    torch.set_num_threads(2)
    load_before = [round(x, 2) for x in os.getloadavg()]
    encoder = load_encoder(args.encoder)
    spec = InputSpec(height=32, width=32, mean=encoder.mean, std=encoder.std)
    images, _ = load_images(args.data, spec)
    results = []
    for text in args.candidates:
        preset, overrides = parse_candidate(text)
        name = text.replace(":", "_").replace(",", "_").replace("=", "")
        run_dir = Path(args.work) / name
        started = time.time()
        fit_decoder(
            encoder,
            images,
            run_dir,
            FitSettings(preset=preset, epochs=args.epochs, data_source=args.data, config_overrides=overrides),
        )
        with open(run_dir / "log.csv") as handle:
            log = list(csv.DictReader(handle))
        config = preset_config(preset, 32, **overrides)
        val = [float(r["val_loss_test_mask"]) for r in log]
        results.append(
            {
                "candidate": text,
                "config": config.to_dict(),
                "parameters": sum(
                    p.numel() for p in DeDeDecoder(config, encoder.identity.embedding_dim).parameters()
                ),
                "epochs": len(log),
                "fit_seconds_total": sum(float(r["seconds"]) for r in log),
                "wall_seconds_this_invocation": time.time() - started,
                "train_loss": [float(r["train_loss"]) for r in log],
                "val_loss_test_mask": val,
                "epoch_seconds": [float(r["seconds"]) for r in log],
                "final_val_loss": val[-1],
                "plateau_epoch_1pct": plateau_epoch(val),
            }
        )
    record = {**run_record(), "encoder": encoder.identity.model_dump(mode="json"), "data": args.data}
    record["n_images"] = int(len(images))
    record["load_average_before"] = load_before
    record["candidates"] = results
    (OUT / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    write_report(record)


def write_report(record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for c in record["candidates"]:
        minutes = np.cumsum(c["epoch_seconds"]) / 60
        ax.plot(
            minutes, c["val_loss_test_mask"], marker="o", ms=3, label=f"{c['candidate']} (val, test mask)"
        )
        ax.plot(minutes, c["train_loss"], ls="--", alpha=0.6, label=f"{c['candidate']} (train)")
    ax.set_xlabel("wall time on this machine (minutes)")
    ax.set_ylabel("MSE per pixel (normalized)")
    ax.axvline(30, color="grey", lw=0.8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "loss_curves.png")

    lines = [
        "# Decoder fitting: the `lab` preset's loss curve on 2 CPU cores",
        "",
        f"Made by `{record['command']}` at commit `{record['commit']}` on {record['machine']['cpu']} "
        f"({record['machine']['cores']} cores), {record['finished_at']}. Encoder: "
        f"`{record['encoder']['architecture']}` ({record['encoder']['source']}); data: {record['data']} "
        f"({record['n_images']} images, 5% held out for the validation loss). Load average "
        f"(1/5/15 min) before {record.get('load_average_before')}, after {record.get('load_average')}: "
        "figures taken while other jobs share the 2 cores are slower than the preset's real cost.",
        "",
        "| candidate | parameters | epochs | fit time (min) | wall incl. embedding (min) | final val loss (test mask) "
        "| epoch within 1% of best | fit time to that epoch (min) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in record["candidates"]:
        lines.append(
            f"| `{c['candidate']}` | {c['parameters']:,} | {c['epochs']} | {c['fit_seconds_total'] / 60:.1f} | "
            f"{c['wall_seconds_this_invocation'] / 60:.1f} | {c['final_val_loss']:.4f} | "
            f"{c['plateau_epoch_1pct']} | {sum(c['epoch_seconds'][: c['plateau_epoch_1pct']]) / 60:.1f} |"
        )
    lines += ["", "![loss curves](loss_curves.png)", ""]
    for c in record["candidates"]:
        to_plateau = sum(c["epoch_seconds"][: c["plateau_epoch_1pct"]]) / 60
        verdict = "within" if to_plateau <= PLATEAU_BUDGET_MIN else "over"
        lines.append(
            f"`{c['candidate']}` reaches its plateau (validation loss at the test mask within 1% of its best) "
            f"at epoch {c['plateau_epoch_1pct']}, after {to_plateau:.1f} minutes of fitting: {verdict} the "
            f"{PLATEAU_BUDGET_MIN}-minute budget the preset is sized for. The `lab` preset's default epoch "
            "count is set from this plateau."
        )
    lines.append("")
    (OUT / "REPORT.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
