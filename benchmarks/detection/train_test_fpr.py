"""Is the realised FPR above target on the CLIP towers a property of the score, or of where the
lab's calibration images come from? Clean images only: no triggered image is read.

The shipped cases set the id threshold on clean CIFAR-10 train images and read the realised FPR on
clean CIFAR-10 test images. Both lab encoder families were trained on CIFAR-10 train (the SimCLR
encoders on its images, the CLIP towers on its images and captions), so a threshold set on train
images and read on test images also measures how much better the encoder's own training images are
rebuilt. Here, on each family's clean control (runs/shipped, fitted by `shipped.py`), the id
threshold is set as `shipped.py` sets it (1% FPR on the first 500 of the cases' 1,000 id images;
under `max_all`'s auxiliary statistics, and under `dede calibrate --standardise-on auto`'s choice)
and read on three clean sets: the other 500 id images, the cases' 1,000 other train images (the
unlabelled-traffic draw) and the 2,000 test images; and, as `dede calibrate` now sets it, on all
1,000 id images (its two-fold estimate beside), read on the other train and the test images.

    python -m benchmarks.detection.train_test_fpr
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.detection.depth_shift import depth_roots, fitted_case
from benchmarks.detection.shipped import FPR, _nchw, case_data
from benchmarks.provenance import run_record
from training.calibrate import calibrate, calibrate_two_fold, wilson_interval
from training.fit import SHIFT_NOTE_UNITS, load_run

# A family's clean control: the clean tower or encoder, fitted by shipped.py (any trigger: only its
# clean images are read here).
CASES = {
    "simclr (lab-heldout clean encoder)": "heldout_clean_checker",
    "clip (clean tower, 64 px)": "clip_clean_blend",
}
OUT = Path(__file__).resolve().parent / "train_test_fpr.json"


def _reading(scores: np.ndarray, threshold: float) -> dict:
    false_alarms = int((scores > threshold).sum())
    low, high = wilson_interval(false_alarms, len(scores))
    return {
        "n": int(len(scores)),
        "realised_fpr": false_alarms / len(scores),
        "ci95": [round(low, 4), round(high, 4)],
    }


def measure(run_dir: Path, data: dict[str, np.ndarray]) -> dict:
    run = load_run(run_dir)
    spec = run.encoder.identity.input_spec()
    stats = run.feature_stats.get("auxiliary") or run.feature_stats  # the fit's own auxiliary statistics
    aux_centre, aux_scale = np.array(stats["centre"]), np.array(stats["scale"])
    sets = {
        name: depth_roots(run, _nchw(data[key], spec))
        for name, key in (("id", "id_cal"), ("other_train", "traffic"), ("test", "test"))
    }
    setting = sets["id"][:500]
    shift = np.median((setting - aux_centre) / aux_scale, axis=0)
    opened = bool(np.abs(shift).max() >= SHIFT_NOTE_UNITS)
    out = {"widest_shift": round(float(shift[np.argmax(np.abs(shift))]), 3), "gate_open": opened}
    own_centre = np.median(setting, axis=0)
    own_scale = 1.4826 * np.median(np.abs(setting - own_centre), axis=0)
    for rule, (centre, scale) in (
        ("max_all", (aux_centre, aux_scale)),
        ("auto", (own_centre, own_scale) if opened else (aux_centre, aux_scale)),
    ):
        scores = {name: ((roots - centre) / scale).max(axis=1) for name, roots in sets.items()}
        threshold = calibrate(scores["id"][:500], scores["id"][500:], FPR)["value"]
        out[rule] = {
            "threshold": threshold,
            "id_other_half": _reading(scores["id"][500:], threshold),
            "other_train": _reading(scores["other_train"], threshold),
            "test": _reading(scores["test"], threshold),
        }
        # `dede calibrate` since 258deb2: the statistics (where the gate opens) and the threshold from
        # all 1,000 id images, two folds to check it.
        if rule == "auto" and opened:
            centre = np.median(sets["id"], axis=0)
            scale = 1.4826 * np.median(np.abs(sets["id"] - centre), axis=0)
            scores = {name: ((roots - centre) / scale).max(axis=1) for name, roots in sets.items()}
        every = calibrate_two_fold(scores["id"], np.arange(len(scores["id"])), FPR)
        out[rule]["threshold_from_all_1000"] = {
            "threshold": every["value"],
            "two_fold_estimate": every["realised_fpr"],
            "other_train": _reading(scores["other_train"], every["value"]),
            "test": _reading(scores["test"], every["value"]),
        }
    return out


def main() -> None:
    data = case_data()
    results = {}
    for label, case in CASES.items():
        results[label] = {"case": case, **measure(fitted_case(case), data)}
        print(label, json.dumps(results[label], indent=1))
    OUT.write_text(
        json.dumps(
            {
                **run_record(outputs=(OUT,)),
                "threshold": "1% FPR on the first 500 of the cases' 1,000 clean CIFAR-10 train images (shipped.py's id threshold)",
                "cases": results,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
