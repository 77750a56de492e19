"""The README's explanation grid: `dede score --explain` on clean CIFAR-10 test images and the same
images with BadEncoder's white-square trigger, the overlay PNGs stacked into one picture.

    python -m benchmarks.explain.grid --bundle bundles/demo --out docs/explain
    python -m benchmarks.explain.grid --quick --out docs/explain   # no demo bundle: see below

--quick builds a stand-in bundle in minutes instead of the demo's (tens of minutes on 2 cores): a
random-weight width-16 CIFAR ResNet-18 and the default decoder fitted for --epochs epochs (at most
10 minutes) on 4,000 clean CIFAR-10 train images, calibrated with the default score on 1,000 test
images for 1% FPR. It has no backdoor to find and its rebuilds are coarse: the heat map then shows
where an image departs from what that decoder expects (dark or busy regions, a pasted white square). Writes grid.png and scores.csv (and the command) to --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.provenance import run_record

SAMPLES = 3  # clean images, each also with the trigger


def quick_bundle(work: Path, epochs: int) -> Path:
    from models.encoders import load_encoder
    from training.calibrate import calibrate_run
    from training.data import data_dir, limited, limited_indices, load_npz
    from training.export import export_bundle
    from training.fit import FitSettings, fit_decoder, load_run

    train_x, _ = load_npz(data_dir() / "cifar10_train.npz")
    test_x, _ = load_npz(data_dir() / "cifar10_test.npz")
    encoder = load_encoder("random:cifar_resnet18", width=16)
    # Drawn at random (training.data.limited_indices): the data sets are sorted by class.
    aux = np.ascontiguousarray(train_x[limited_indices(len(train_x), 4000)].transpose(0, 3, 1, 2))
    fit_decoder(
        encoder,
        aux,
        work / "run",
        FitSettings(epochs=epochs, max_minutes=10.0, data_source=limited("cifar10_train", 4000)),
    )
    calibration = test_x[limited_indices(len(test_x), 1000)]
    calibrate_run(
        work / "run",
        np.ascontiguousarray(calibration.transpose(0, 3, 1, 2)),
        0.01,
        limited("cifar10_test", 1000),
    )
    export_bundle(load_run(work / "run"), work / "bundle", model_name="explain-grid-quick")
    return work / "bundle"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="a bundle with evidence outputs (e.g. bundles/demo)")
    parser.add_argument("--quick", action="store_true", help="build the stand-in bundle described above")
    parser.add_argument("--epochs", type=int, default=4, help="--quick: decoder epochs")
    parser.add_argument("--out", default="docs/explain")
    args = parser.parse_args(argv)
    if not args.bundle and not args.quick:
        parser.error("give --bundle or --quick")
    from lab.attacks.triggers import white_square
    from models.bundle import load_bundle
    from training.data import data_dir, load_npz
    from training.offline_score import score_files

    provenance = run_record()  # before this run rewrites its own committed outputs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = load_bundle(args.bundle or quick_bundle(work, args.epochs))
        test_x, test_y = load_npz(data_dir() / "cifar10_test.npz")
        picks = [int(np.flatnonzero(test_y == label)[-1]) for label in (3, 5, 7)][:SAMPLES]  # cat, dog, horse
        clean = test_x[picks].transpose(0, 3, 1, 2)
        triggered = white_square((32, 32)).apply_uint8_nchw(clean)
        files = []
        for kind, images in (("clean", clean), ("triggered", triggered)):
            for i, image in enumerate(images):
                path = work / f"{kind}_{i}.png"
                Image.fromarray(image.transpose(1, 2, 0)).save(path)
                files.append(path)
        explained = work / "explained"
        results = score_files(bundle, files, explain_dir=explained)
        grids = [Image.open(p) for p in sorted(explained.iterdir())]
        gap = 6
        sheet = Image.new(
            "RGB", (grids[0].width, sum(g.height for g in grids) + gap * (len(grids) - 1)), "white"
        )
        for k, grid in enumerate(grids):
            sheet.paste(grid, (0, k * (grid.height + gap)))
        sheet.save(out / "grid.png", optimize=True)
    with open(out / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "image", "score", "flagged", "threshold"])
        for row, result in enumerate(results):
            writer.writerow(
                [
                    row,
                    Path(result.path).name,
                    f"{result.score:.6g}",
                    result.flagged,
                    f"{bundle.threshold:.6g}",
                ]
            )
    record = {"bundle": bundle.manifest.model_name, "threshold": bundle.threshold, "run": provenance}
    (out / "grid.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out / 'grid.png'} and {out / 'scores.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
