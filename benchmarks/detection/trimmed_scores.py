"""Is DeDe's reaction to the trigger on the CLEAN encoder local to the trigger's patches?

The lab's control (the same white patch on an encoder without a backdoor) reaches AUROC ~0.7 with
the method's score: the score partly reacts to the trigger's pixels. If that reaction were confined
to the patches under the trigger, dropping each image's worst patches from the sum would remove it
while a backdoor (whose rebuild is the target's content everywhere) would still show. This measures
AUROC (clean vs triggered CIFAR-10 test images) of the sum of per-patch errors after dropping the k
worst patches, for each encoder of the lab suite, on its cached `lab` decoder (OOD auxiliary data).

    python -m benchmarks.detection.trimmed_scores        # after `dede lab run --suite lab`
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.provenance import run_record
from lab.evaluate import auroc
from lab.suite import SUITES, Lab
from models.decoder import masked_patch_error
from training.fit import load_run

HERE = Path(__file__).resolve().parent
ENCODERS = ("badencoder", "drupe", "norm_preserving", "clean")


@torch.no_grad()
def patch_errors(run_dir: Path, images: np.ndarray, batch_size: int = 200) -> np.ndarray:
    """Per-image, per-patch squared errors (N, L) of the run's detector at its test mask."""
    run = load_run(run_dir)
    head = run.head("sse")
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        embedding = run.encoder.embed(batch)
        x = head.normalize(batch)
        visible = head.visible.expand(x.shape[0], -1)
        pred = head.decoder(x, embedding.to(x.dtype), visible)
        out.append(masked_patch_error(pred, x, visible, head.decoder.config.patch_size).numpy())
    return np.concatenate(out)


def trimmed_sum(errors: np.ndarray, drop: int) -> np.ndarray:
    return np.sort(errors, axis=1)[:, : errors.shape[1] - drop].sum(axis=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="clean and triggered test images each")
    parser.add_argument("--drops", type=int, nargs="+", default=[0, 4, 9, 16, 24, 32])
    parser.add_argument("--out", type=Path, default=HERE / "trimmed_scores.json")
    args = parser.parse_args(argv)
    lab = Lab(SUITES["lab"], progress=False)
    results: dict = {
        "run": run_record(["-m", "benchmarks.detection.trimmed_scores", shlex.join(sys.argv[1:])]),
        "images_each": args.images,
        "auroc_by_dropped_patches": {},
    }
    for name in ENCODERS:
        run_dir = lab.decoder_dir(name, "ood", "lab")
        if not run_dir.is_dir():
            print(f"{name}: no cached lab decoder, skipped")
            continue
        clean, triggered, _ = lab.test_sets(name)
        clean_errors = patch_errors(run_dir, clean[: args.images])
        triggered_errors = patch_errors(run_dir, triggered[: args.images])
        row = {
            str(drop): round(auroc(trimmed_sum(clean_errors, drop), trimmed_sum(triggered_errors, drop)), 4)
            for drop in args.drops
        }
        results["auroc_by_dropped_patches"][name] = row
        print(f"{name}: {row}", flush=True)
    results["patches_per_image"] = int(clean_errors.shape[1])
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
