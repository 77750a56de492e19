"""How far the deployment's clean images sit from the auxiliary images, depth by depth, under the
feature score's standardisation. Clean images only: no triggered image is read.

The feature score (models/detector.py) standardises each depth's d ** 0.25 by the median and 1.4826
MAD of the fit's clean held-out auxiliary images (Tiny-ImageNet), then takes the max over depths.
Where the deployment's images (here 1,000 clean CIFAR-10 train images, the cases' id calibration
set) sit lower at some depths than at others, those depths never set the max on clean images, and
a trigger must first lift them over the others' clean tail. This measures, on the clean control of
each encoder family the shipped cases have (runs/shipped, fitted by `shipped.py`), per depth: the
deployment images' median z-score and MAD in auxiliary units, their 0.99 quantile, the share of
images whose max each depth sets, and the max's 0.99 quantile under either standardisation.

    python -m benchmarks.detection.depth_shift
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.detection.shipped import _nchw, case_data
from benchmarks.provenance import REPO_ROOT, run_record
from models.detector import PIXEL_SCALE_FACTORS
from training.fit import depth_discrepancies, load_run

CASES = {"simclr (lab-heldout clean encoder)": "heldout_clean", "clip (clean tower, 64 px)": "clip_clean"}
RUNS = REPO_ROOT / "runs" / "shipped"
OUT = Path(__file__).resolve().parent / "depth_shift.json"


def robust_z(roots: np.ndarray, reference: np.ndarray) -> np.ndarray:
    centre = np.median(reference, axis=0)
    return (roots - centre) / (1.4826 * np.median(np.abs(reference - centre), axis=0))


def depth_roots(run, images: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """max_all's per-depth d ** 0.25 of uint8 NCHW images at the encoder's input size under a
    fitted run (pixels at four scales, then the stages): what every depth's z-score standardises."""
    d = depth_discrepancies(
        run.encoder,
        run.head("sse"),
        run.feature_stats["stages"],
        images,
        torch.device("cpu"),
        pixel_factors=PIXEL_SCALE_FACTORS,
    )
    return np.sqrt(np.sqrt(d))


def measure(run_dir: Path, deployment: np.ndarray) -> dict:
    run = load_run(run_dir)
    stages = run.feature_stats["stages"]
    auxiliary = depth_roots(run, np.load(run_dir / "holdout_images.npy"))  # as the fit resized them
    ours = depth_roots(run, _nchw(deployment, run.encoder.identity.input_spec()))
    z = robust_z(ours, auxiliary)
    z_own = robust_z(ours, ours)
    depths = [f"pixels/{k}" for k in PIXEL_SCALE_FACTORS] + list(stages)
    sets_max = np.bincount(z.argmax(axis=1), minlength=len(depths)) / len(z)
    spread = 1.4826 * np.median(np.abs(ours - np.median(ours, axis=0)), axis=0)
    aux_spread = 1.4826 * np.median(np.abs(auxiliary - np.median(auxiliary, axis=0)), axis=0)
    return {
        "n_auxiliary_held_out": len(auxiliary),
        "n_deployment": len(ours),
        "depths": {
            depth: {
                "median_z": round(float(np.median(z[:, i])), 3),
                "mad_ratio": round(float(spread[i] / aux_spread[i]), 3),
                "q99_z": round(float(np.quantile(z[:, i], 0.99)), 3),
                "sets_the_max": round(float(sets_max[i]), 3),
            }
            for i, depth in enumerate(depths)
        },
        "max_q99_auxiliary_standardised": round(float(np.quantile(z.max(axis=1), 0.99)), 3),
        "max_q99_deployment_standardised": round(float(np.quantile(z_own.max(axis=1), 0.99)), 3),
    }


def fitted_case(case: str) -> Path:
    """A shipped case's fit in runs/shipped, or a one-line error naming the command that makes it."""
    if not (RUNS / case / "decoder.safetensors").is_file():
        raise SystemExit(
            f"{RUNS / case} has no fit: run `python -m benchmarks.detection.shipped --case {case}=...`"
        )
    return RUNS / case


def main() -> None:
    data = case_data()
    results = {}
    for label, case in CASES.items():
        results[label] = {"case": case, **measure(fitted_case(case), data["id_cal"])}
        print(label, json.dumps(results[label], indent=1))
    OUT.write_text(
        json.dumps(
            {
                **run_record(),
                "deployment_images": "the cases' id calibration set: 1,000 clean CIFAR-10 train images",
                "auxiliary_images": "the fit's clean held-out split of 2,000 Tiny-ImageNet images",
                "cases": results,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
