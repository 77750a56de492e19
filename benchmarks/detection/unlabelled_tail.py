"""The unlabelled threshold at 1%, 5% and 10% of triggered images: the trimmed quantile that
`dede calibrate --kind unlabelled_robust` set until now, against the clean tail's shape carried over
from the fit's held-out auxiliary images (benchmarks/detection/README.md, "An unlabelled threshold
that keeps the clean tail's shape").

For every case whose fit is in runs/shipped, the shipped score (`max_all` under `--standardise-on
auto`) is read on a sample of 1,000 clean CIFAR-10 train images (the cases' unlabelled traffic),
a share of them replaced by triggered images, and the threshold set on all of them as `dede
calibrate` sets it (the depths standardised on the sample where the auto gate opens). TPR and the
realised FPR on the cases' 2,000 triggered and 2,000 clean CIFAR-10 test images, the mean over
DRAWS contamination draws. The per-depth d ** 0.25 of every image set is cached beside the fits
(runs/unlabelled_tail), so a second run reads them.

    python -m benchmarks.detection.unlabelled_tail
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.detection.depth_shift import depth_roots, fitted_case
from benchmarks.detection.shipped import FPR, N_CAL, _nchw, case_data
from benchmarks.provenance import REPO_ROOT, run_record
from lab.attacks.triggers import make_trigger
from lab.evaluate import auroc
from training.calibrate import robust_inliers, tail_shape_threshold, threshold_for_fpr, wilson_interval
from training.fit import SHIFT_NOTE_UNITS, load_holdout_images, load_run

HERE = Path(__file__).resolve().parent
OUT = HERE / "unlabelled_tail.json"
CACHE = REPO_ROOT / "runs" / "unlabelled_tail"
SHIPPED = HERE / "shipped" / "results.json"
SHARES = (0.0, 0.01, 0.05, 0.10)
DRAWS = 20
SETS = ("holdout", "traffic", "clean", "triggered")


def local_cases() -> list[str]:
    """The shipped cases with a fit in runs/shipped and a feature score (the depths)."""
    cases = json.loads(SHIPPED.read_text())["cases"]
    return [
        name
        for name, case in cases.items()
        if (REPO_ROOT / "runs" / "shipped" / name / "feature_stats.json").is_file() and case.get("trigger")
    ]


def case_roots(name: str, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    path = CACHE / f"{name}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return {k: cached[k] for k in SETS}
    case = json.loads(SHIPPED.read_text())["cases"][name]
    run_dir = fitted_case(name)
    run = load_run(run_dir)
    spec = run.encoder.identity.input_spec()
    trigger = make_trigger(case["trigger"], (spec.height, spec.width))
    clean = _nchw(data["test"], spec)
    images = {
        "holdout": load_holdout_images(run_dir),
        "traffic": _nchw(data["traffic"], spec),
        "clean": clean,
        "triggered": trigger.apply_uint8_nchw(clean),
    }
    roots = {k: depth_roots(run, v) for k, v in images.items()}
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **roots)
    return roots


def _reading(threshold: float, clean: np.ndarray, triggered: np.ndarray) -> dict:
    return {"tpr": float((triggered > threshold).mean()), "realised_fpr": float((clean > threshold).mean())}


def measure(name: str, roots: dict[str, np.ndarray], auxiliary: tuple[np.ndarray, np.ndarray]) -> dict:
    """Per share, both thresholds' TPR and realised FPR, the mean over DRAWS draws (one draw at 0%)."""
    rng = np.random.default_rng(0)
    out: dict = {"auroc_aux_statistics": None, "shares": {}}
    for share in SHARES:
        k = int(round(share * N_CAL))
        rows: dict[str, list[dict]] = {"trimmed_quantile": [], "tail_shape": []}
        opened_count = 0
        for _ in range(DRAWS if k else 1):
            sample = roots["traffic"].copy()
            if k:
                chosen = rng.choice(N_CAL, k, replace=False)
                sample[chosen] = roots["triggered"][rng.choice(len(roots["triggered"]), k, replace=False)]
            # `--standardise-on auto` on the unlabelled sample, as `dede calibrate` decides it.
            shift = np.median((sample - auxiliary[0]) / auxiliary[1], axis=0)
            opened = bool(np.abs(shift).max() >= SHIFT_NOTE_UNITS)
            opened_count += opened
            if opened:
                centre = np.median(sample, axis=0)
                scale = 1.4826 * np.median(np.abs(sample - centre), axis=0)
            else:
                centre, scale = auxiliary

            def score(r: np.ndarray, centre: np.ndarray = centre, scale: np.ndarray = scale) -> np.ndarray:
                return ((r - centre) / scale).max(axis=1)

            scores, clean, triggered = score(sample), score(roots["clean"]), score(roots["triggered"])
            trimmed = threshold_for_fpr(scores[robust_inliers(scores)], FPR)
            shaped = tail_shape_threshold(scores, score(roots["holdout"]), FPR)
            rows["trimmed_quantile"].append(_reading(trimmed, clean, triggered))
            rows["tail_shape"].append(_reading(shaped, clean, triggered))
            if share == 0.0:
                out["auroc_aux_statistics" if not opened else "auroc_sample_statistics"] = auroc(
                    clean, triggered
                )
        entry: dict = {"draws": len(rows["tail_shape"]), "gate_opened": opened_count}
        for method, readings in rows.items():
            fpr = np.array([r["realised_fpr"] for r in readings])
            entry[method] = {
                "tpr": float(np.mean([r["tpr"] for r in readings])),
                "tpr_worst": float(np.min([r["tpr"] for r in readings])),
                "realised_fpr": float(fpr.mean()),
                "realised_fpr_worst": float(fpr.max()),
            }
            if k == 0:
                false_alarms = int(round(fpr[0] * len(roots["clean"])))
                entry[method]["realised_fpr_ci95"] = list(wilson_interval(false_alarms, len(roots["clean"])))
        out["shares"][f"{int(round(share * 100))}pct"] = entry
        print(name, f"{share:.0%}", json.dumps({m: entry[m] for m in rows}))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--case", action="append", default=[], help="a shipped case (default: every local one)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    cases = args.case or local_cases()
    unknown = sorted(set(cases) - set(local_cases()))
    if unknown:
        raise SystemExit(
            f"not a shipped case with a fit in runs/shipped: {', '.join(unknown)} "
            "(score it first: python -m benchmarks.detection.shipped --case NAME=ENCODER@TRIGGER)"
        )
    data = case_data()
    results = {}
    for name in cases:
        roots = case_roots(name, data)
        stats = json.loads((fitted_case(name) / "feature_stats.json").read_text())
        auxiliary = stats.get("auxiliary") or stats
        results[name] = measure(name, roots, (np.array(auxiliary["centre"]), np.array(auxiliary["scale"])))
    args.out.write_text(
        json.dumps(
            {
                **run_record(outputs=(args.out,)),
                "fpr_target": FPR,
                "n_traffic": N_CAL,
                "draws": DRAWS,
                "tail_reference": "the fit's held-out auxiliary images (runs/shipped/<case>/holdout_images.npy)",
                "cases": results,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
