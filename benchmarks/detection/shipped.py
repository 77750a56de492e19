"""The shipped detector as a user runs it, on backdoored encoders: the README's commands with their
defaults, every figure through the exported bundle (ONNX Runtime), beside the decoder-free
baselines.

For each case `NAME=ENCODER[@TRIGGER][#PRESET]` (TRIGGER: a trigger family of lab/attacks/triggers.py,
`patch` by default, e.g. `checker`, `blend`, `warp`, `noise@random`, or a trigger file;
PRESET: the decoder preset, `dede fit`'s default unless given, e.g. `#lab` for the MAE decoder under
the same step and time budget):
  fit        `dede fit` defaults on 2,000 Tiny-ImageNet images (out of distribution for CIFAR-10);
  calibrate  three ways, none with a triggered image known as such:
               ood        1,000 clean Tiny-ImageNet views the fit never saw: native 32 px corner
                          crops of the 64 px images (the set has 2,000 images, all fitted on
                          resized to 32 px), the paper's out-of-distribution setting
               ood_holdout the fit's own held-out Tiny-ImageNet images (its 10% validation split,
                          resized as the fit's images are, never trained on): `dede calibrate
                          --holdout`, the paper's setting with no other data (since 2026-12-06)
               id         1,000 clean CIFAR-10 train images (the user's own distribution)
               unlabelled 1,000 CIFAR-10 train images with 0%, 1% or 5% of them triggered, robust
  export     the bundle (calibrated `id`), whose graph scores everything below;
  test       2,000 clean CIFAR-10 test images (not of the target class) and the same triggered.
Every CIFAR-10 subset and the crops are drawn at random (`case_data`): the data sets are sorted by class.
Each case also scores the pixel-space `sse` of the same fit (the method's own score) and the
baselines: activation norms of the stages the feature score taps, embedding norm, kNN, STRIP.

    python -m benchmarks.detection.shipped --case badencoder=bundles/demo-work/badencoder/encoder.safetensors \
        --case clean=bundles/demo-work/simclr/encoder.safetensors --out benchmarks/detection/shipped

Fits resume from runs/shipped/<name>; results.json and REPORT.md are written to --out, with the
machine, commit and command. The clean encoder's case is the control: its AUROC is the score's
reaction to the trigger's pixels alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.provenance import REPO_ROOT, run_record
from lab.attacks.triggers import make_trigger
from lab.baselines import baseline_scores
from lab.evaluate import auprc, auroc, tpr_at_fpr
from models.bundle import InputSpec, prepare_array
from models.detector import PIXEL_SCALE_FACTORS
from models.encoders import load_encoder
from models.feature_taps import TappedEncoder
from training.calibrate import calibrate, calibrate_run, wilson_interval
from training.data import data_dir, load_npz
from training.export import export_bundle
from training.fit import (
    SHIFT_NOTE_UNITS,
    FitSettings,
    depth_discrepancies,
    depth_scale,
    fit_decoder,
    held_out_split,
    load_holdout_images,
    load_run,
)
from training.offline_score import score_array
from training.scoring import score_run

TARGET_CLASS = 0
N_FIT, N_CAL, N_TEST = 2000, 1000, 2000
SPLIT_SEED = 0
# Every case's result records its split; results made before the random split have none.
SPLIT = "random"
CONTAMINATIONS = (0.0, 0.01, 0.05)
FPR = 0.01


def _nchw(images_nhwc: np.ndarray, spec: InputSpec) -> np.ndarray:
    return prepare_array(images_nhwc, spec)


def _bundle_scores(bundle: Path, images: np.ndarray) -> np.ndarray:
    return score_array(bundle / "detector.onnx", images)


@torch.no_grad()
def _activation_norms(run, images: np.ndarray) -> dict[str, np.ndarray]:  # noqa: ANN001
    """The squared norm of each tapped stage's feature map of the input: no decoder involved."""
    if run.encoder.module is None or not run.feature_stats:
        return {}
    tapped = TappedEncoder(run.encoder.module, run.feature_stats["stages"])
    out: dict[str, list[np.ndarray]] = {s: [] for s in tapped.stages}
    try:
        for i in range(0, len(images), 256):
            batch = run.encoder.normalize(torch.from_numpy(images[i : i + 256]))
            _, features = tapped(batch)
            for stage, f in zip(tapped.stages, features, strict=True):
                out[stage].append(f.pow(2).flatten(1).sum(1).numpy())
    finally:
        tapped.remove()
    return {f"activation_norm_{s}": np.concatenate(v) for s, v in out.items()}


# Variants of the feature score measured beside the shipped one, from the same fit, each depth's
# d ** 0.25 standardised by the median and 1.4826 MAD (or, for max_all_tail, the 95th percentile
# minus the median) on the fit's clean held-out auxiliary images:
#   dede_feature_robust_z_mean   rule mean_stages: the stages alone, mean;
#   dede_depths_robust_z_max     rule max_all: the pixels at four scales and the stages, max;
#   all depths max               the full-resolution pixels and the stages, max (a candidate fixed on
#                                2026-12-06 after the adaptive attack, before the DeDe-aware one);
#   pixel scales max, stages max the two halves of max_all, to show what each adds;
#   dede_depths_tail_z_max       rule max_all_tail: max_all's depths scaled by their clean tails;
#   dede_depths_both_robust_z_max      rule max_all_both: max_all's and max_all_relative's z-scores
#                                together, the max (the sixth test's candidate, README);
#   dede_depths_relative_robust_z_max  rule max_all_relative: max_all with each depth's discrepancy over
#                                the two maps' mean squares (the fifth test's candidate, README).
# The rule the bundle ships is scored through the bundle and not again here.
MEAN_STAGES, MAX_ALL = "dede_feature_robust_z_mean", "dede_depths_robust_z_max"
MAX_ALL_RELATIVE = "dede_depths_relative_robust_z_max"
MAX_ALL_BOTH = "dede_depths_both_robust_z_max"
MAX_ALL_BOTH_BALANCED = "dede_depths_both_balanced_z_max"
# max_all with each depth's median and MAD taken on the calibration images that set each threshold
# (`dede calibrate --standardise-on calibration`; the eighth test's candidate, README): one score per
# threshold setting, its AUROC read under the id calibration's statistics (`_calibrated_entry`).
MAX_ALL_CALIBRATED = "dede_depths_calibrated_z_max"
# The same, gated (`dede calibrate --standardise-on auto`; the tenth test's candidate, README): per
# threshold setting, the calibration images' statistics where the widest depth's median shift in the
# auxiliary units reaches SHIFT_NOTE_UNITS, else max_all's own figures (`_auto_entry`).
MAX_ALL_AUTO = "dede_depths_auto_z_max"
# max_all_both (the sixth test's candidate, withheld for the CLIP towers) under the same gate:
# recorded from the tenth test's cases on, for a later test to read.
MAX_ALL_BOTH_AUTO = "dede_depths_both_auto_z_max"
VARIANTS = {
    MEAN_STAGES: ("stages", "mean", "mad", "squared"),
    MAX_ALL: ("pixels+stages", "max", "mad", "squared"),
    "dede_all_depths_max (earlier candidate)": ("pixels/1+stages", "max", "mad", "squared"),
    "dede_pixel_scales_max": ("pixels", "max", "mad", "squared"),
    "dede_stages_max": ("stages", "max", "mad", "squared"),
    "dede_depths_tail_z_max": ("pixels+stages", "max", "q95", "squared"),
    MAX_ALL_RELATIVE: ("pixels+stages", "max", "mad", "relative"),
    MAX_ALL_BOTH: ("pixels+stages", "max", "mad", "both"),
    MAX_ALL_BOTH_BALANCED: ("pixels+stages", "max", "mad_views", "both"),
}


def _depth_variants(
    run, sets: dict[str, np.ndarray], fit_images: np.ndarray, settings: FitSettings, shipped: str
) -> dict:  # noqa: ANN001
    stages = run.feature_stats["stages"]
    factors = PIXEL_SCALE_FACTORS
    head = run.head("sse")

    def roots(images: np.ndarray, discrepancy: str) -> np.ndarray:
        d = depth_discrepancies(
            run.encoder,
            head,
            stages,
            images,
            torch.device("cpu"),
            pixel_factors=factors,
            discrepancy=discrepancy,
        )
        return np.sqrt(np.sqrt(d))

    val_idx, _ = held_out_split(len(fit_images), settings)
    centres, scales, measured = {}, {}, {}
    for discrepancy in sorted({v[3] for v in VARIANTS.values()}):
        reference = roots(fit_images[val_idx], discrepancy)
        centres[discrepancy] = centre = np.median(reference, axis=0)
        for kind in ("mad", "q95", "mad_views"):
            views = 2 if discrepancy == "both" else 1
            scales[discrepancy, kind] = depth_scale(reference, centre, kind, views=views)
        measured[discrepancy] = {k: roots(v, discrepancy) for k, v in sets.items()}
    p = len(factors)
    columns = {"stages": slice(p, None), "pixels": slice(0, p), "pixels+stages": slice(None)}
    out = {}
    for name, (depths, combine, scaling, discrepancy) in VARIANTS.items():
        if name == f"dede_{shipped}":
            continue
        for split, r in measured[discrepancy].items():
            values = (r - centres[discrepancy]) / scales[discrepancy, scaling]
            picked = (
                np.column_stack([values[:, :1], values[:, p:]])
                if depths == "pixels/1+stages"
                else values[:, columns[depths]]
            )
            out.setdefault(name, {})[split] = picked.max(axis=1) if combine == "max" else picked.mean(axis=1)
    # Every view's roots and the auxiliary statistics (1.4826 MAD) each is standardised with.
    return out, measured, {k: (centres[k], scales[k, "mad"]) for k in measured}


def _calibrated_entry(
    roots: dict[str, np.ndarray], holdout_order: np.ndarray, auxiliary: tuple[np.ndarray, np.ndarray]
) -> dict:
    """max_all's table entry with every threshold's statistics set on its own calibration half, as
    `dede calibrate --standardise-on calibration` sets them: per setting, each depth's median and
    1.4826 MAD of d ** 0.25 over the images that set the threshold, then the max of the z-scores of
    every image. The same halves, contamination draws and robust kind as the other methods' entries
    (its own generator, so theirs are unchanged); AUROC under the id calibration's statistics. Each
    setting's widest median shift in the `auxiliary` (centre, scale) units is recorded beside
    (`widest_shift`), as `dede calibrate` measures it: what `--standardise-on auto` decides on."""

    def scorer(reference: np.ndarray):  # noqa: ANN202
        centre = np.median(reference, axis=0)
        scale = depth_scale(reference, centre, "mad")
        return lambda r: ((r - centre) / scale).max(axis=1)

    def entry(setting: np.ndarray, rest: np.ndarray, kind: str = "clean") -> tuple[dict, object]:
        score = scorer(setting)
        threshold = calibrate(score(setting), score(rest), FPR, kind=kind)["value"]
        shift = np.median((setting - auxiliary[0]) / auxiliary[1], axis=0)
        widest = float(shift[np.argmax(np.abs(shift))])
        return _at(threshold, score(roots["clean"]), score(roots["triggered"])) | {
            "widest_shift": widest
        }, score

    half = len(roots["ood_holdout_cal"]) // 2
    id_entry, id_score = entry(roots["id_cal"][:500], roots["id_cal"][500:])
    clean, triggered = id_score(roots["clean"]), id_score(roots["triggered"])
    table = {
        "auroc": auroc(clean, triggered),
        "auprc": auprc(clean, triggered),
        "tpr_at_1pct_fpr": tpr_at_fpr(clean, triggered, FPR),
        "ood": entry(roots["ood_cal"][:500], roots["ood_cal"][500:])[0],
        "ood_holdout": entry(
            roots["ood_holdout_cal"][holdout_order[:half]], roots["ood_holdout_cal"][holdout_order[half:]]
        )[0],
        "id": id_entry,
        "standardised_on": "each threshold's own calibration half (AUROC: the id calibration's)",
    }
    rng = np.random.default_rng(0)
    for share in CONTAMINATIONS:
        k = int(share * N_CAL)
        traffic = roots["traffic"].copy()
        chosen = rng.choice(N_CAL, k, replace=False)
        if k:
            traffic[chosen] = roots["triggered"][rng.choice(len(roots["triggered"]), k, replace=False)]
        order = rng.permutation(N_CAL)
        table[f"unlabelled_{int(share * 100)}pct"] = entry(
            traffic[order[:500]], traffic[order[500:]], "unlabelled_robust"
        )[0]
    return table


SETTINGS = ("ood", "ood_holdout", "id", *(f"unlabelled_{int(share * 100)}pct" for share in CONTAMINATIONS))


def _auto_entry(calibrated: dict, shipped: dict) -> dict:
    """`dede calibrate --standardise-on auto`'s table entry: per threshold setting, the calibrated
    entry's figures where that setting's widest shift reaches SHIFT_NOTE_UNITS, else the shipped
    max_all's (the auxiliary statistics, through the bundle); AUROC and TPR at 1% FPR under the id
    setting's choice."""
    table, opened = {}, {}
    for setting in SETTINGS:
        opened[setting] = abs(calibrated[setting]["widest_shift"]) >= SHIFT_NOTE_UNITS
        table[setting] = calibrated[setting] if opened[setting] else shipped[setting]
    id_choice = calibrated if opened["id"] else shipped
    return {
        "auroc": id_choice["auroc"],
        "auprc": id_choice["auprc"],
        "tpr_at_1pct_fpr": id_choice["tpr_at_1pct_fpr"],
        **table,
        "standardised_on": {s: "calibration" if o else "auxiliary" for s, o in opened.items()},
        "widest_shift": {s: calibrated[s]["widest_shift"] for s in SETTINGS},
    }


def _at(threshold: float, clean: np.ndarray, triggered: np.ndarray) -> dict:
    return {
        "threshold": float(threshold),
        "tpr": float((triggered > threshold).mean()),
        "realised_fpr": float((clean > threshold).mean()),
    }


def case_data() -> dict[str, np.ndarray]:
    """The images every case uses, uint8 NHWC. The shared data sets are sorted by class, so every
    subset is drawn at random (SPLIT_SEED); before the random split the id calibration set was the first 1,000
    CIFAR-10 train images (all airplanes, the target class) and the test set the first 2,000
    non-target test images (automobiles and birds)."""
    tiny, _ = load_npz(data_dir() / "tinyimagenet_val.npz")
    train, _ = load_npz(data_dir() / "cifar10_train.npz")
    test_x, test_y = load_npz(data_dir() / "cifar10_test.npz")
    rng = np.random.default_rng(SPLIT_SEED)
    train_pick = rng.permutation(len(train))[: 2 * N_CAL]
    test_pick = np.sort(rng.permutation(np.flatnonzero(test_y != TARGET_CLASS))[:N_TEST])
    # Native 32 px crops of 1,000 random Tiny-ImageNet images: top-left of 500, bottom-right of 500.
    crop_pick = rng.permutation(len(tiny))[:1000]
    crops = np.concatenate([tiny[crop_pick[:500], :32, :32], tiny[crop_pick[500:], 32:, 32:]])
    return {
        "tiny": tiny,  # all 2,000 are fitted on, in their order (the fits cached in runs/ stay valid)
        "tiny_crops": crops,
        "id_cal": train[train_pick[:N_CAL]],
        "traffic": train[train_pick[N_CAL:]],
        "test": test_x[test_pick],
    }


def run_case(
    name: str, encoder_path: str, trigger_spec: str, runs: Path, data: dict, preset: str | None = None
) -> dict:
    started = time.time()
    encoder = load_encoder(encoder_path)
    spec = encoder.identity.input_spec()
    trigger = make_trigger(trigger_spec, (spec.height, spec.width))
    fit_images = _nchw(data["tiny"][:N_FIT], spec)
    ood_cal = _nchw(data["tiny_crops"], spec)
    id_cal = _nchw(data["id_cal"], spec)
    traffic = _nchw(data["traffic"], spec)
    clean_test = _nchw(data["test"], spec)
    triggered_test = trigger.apply_uint8_nchw(clean_test)

    run_dir = runs / name
    fit_started = time.time()
    settings = FitSettings(data_source=f"tinyimagenet_val[:{N_FIT}]")
    if preset:
        settings.preset = preset
    fit_decoder(encoder, fit_images, run_dir, settings)
    fit_wall = time.time() - fit_started
    info = json.loads((run_dir / "run.json").read_text())
    holdout = load_holdout_images(run_dir)
    # The auxiliary statistics, named: max_all as every earlier case measured it, whatever
    # `dede calibrate`'s default (the gated and calibrated variants are scored beside it).
    calibrate_run(
        run_dir,
        id_cal,
        FPR,
        f"cifar10_train ({N_CAL} drawn at random, seed {SPLIT_SEED})",
        standardise_on="auxiliary",
    )
    bundle = runs / f"{name}-bundle"
    manifest = export_bundle(load_run(run_dir), bundle, model_name=f"shipped-{name}", overwrite=True)
    run = load_run(run_dir)

    methods: dict[str, dict[str, np.ndarray]] = {}
    sets = {
        "ood_cal": ood_cal,
        "ood_holdout_cal": holdout,
        "id_cal": id_cal,
        "traffic": traffic,
        "clean": clean_test,
        "triggered": triggered_test,
    }
    shipped_name = manifest.decoder.score if run.default_score == "feature" else run.default_score
    methods[f"dede_{shipped_name} (shipped)"] = {k: _bundle_scores(bundle, v) for k, v in sets.items()}
    if run.default_score != "sse":
        methods["dede_sse"] = {k: score_run(run, v, "sse") for k, v in sets.items()}
    depth_roots = None
    if run.feature_stats:
        variants, view_roots, auxiliary = _depth_variants(run, sets, fit_images, settings, shipped_name)
        depth_roots = view_roots["squared"]
        methods.update(variants)
    norms = {k: _activation_norms(run, v) for k, v in sets.items()}
    for method in norms["clean"]:
        methods[method] = {k: norms[k][method] for k in sets}
    aux = fit_images[np.random.default_rng(SPLIT_SEED).permutation(len(fit_images))[:500]]
    base = baseline_scores(encoder, tuple(sets.items()), aux, knn_k=10, strip_blends=8)
    for key, values in base.items():
        method, split = key.split("/")
        methods.setdefault(method, {})[split] = values

    rng = np.random.default_rng(0)
    holdout_order = np.random.default_rng(0).permutation(len(holdout))  # calibrate_run's split, seed 0
    half = len(holdout) // 2
    table = {}
    for method, s in methods.items():
        entry = {
            "auroc": auroc(s["clean"], s["triggered"]),
            "auprc": auprc(s["clean"], s["triggered"]),
            # TPR where the clean test images themselves give 1% FPR: the scores compared at one FPR.
            "tpr_at_1pct_fpr": tpr_at_fpr(s["clean"], s["triggered"], FPR),
            "ood": _at(
                calibrate(s["ood_cal"][:500], s["ood_cal"][500:], FPR)["value"], s["clean"], s["triggered"]
            ),
            # Halved as `dede calibrate` halves it (threshold / realised FPR): the threshold it ships.
            "ood_holdout": _at(
                calibrate(
                    s["ood_holdout_cal"][holdout_order[:half]],
                    s["ood_holdout_cal"][holdout_order[half:]],
                    FPR,
                )["value"],
                s["clean"],
                s["triggered"],
            ),
            "id": _at(
                calibrate(s["id_cal"][:500], s["id_cal"][500:], FPR)["value"], s["clean"], s["triggered"]
            ),
        }
        for share in CONTAMINATIONS:
            # An unlabelled traffic sample: `share` of it triggered (their triggered scores).
            k = int(share * N_CAL)
            traffic_scores = s["traffic"].copy()
            chosen = rng.choice(N_CAL, k, replace=False)
            if k:
                traffic_scores[chosen] = _trigger_scores(method, s, k, rng)
            order = rng.permutation(N_CAL)
            robust = calibrate(
                traffic_scores[order[:500]], traffic_scores[order[500:]], FPR, kind="unlabelled_robust"
            )
            entry[f"unlabelled_{int(share * 100)}pct"] = _at(robust["value"], s["clean"], s["triggered"])
        table[method] = entry
    if depth_roots is not None:
        table[MAX_ALL_CALIBRATED] = _calibrated_entry(depth_roots, holdout_order, auxiliary["squared"])
        table[MAX_ALL_AUTO] = _auto_entry(table[MAX_ALL_CALIBRATED], table[f"dede_{shipped_name} (shipped)"])
        if MAX_ALL_BOTH in table:
            both = _calibrated_entry(view_roots["both"], holdout_order, auxiliary["both"])
            table[MAX_ALL_BOTH_AUTO] = _auto_entry(both, table[MAX_ALL_BOTH])
    clip_attack = _clip_attack(encoder_path)
    return {
        "encoder": encoder_path,
        **({"attack": clip_attack} if clip_attack else {}),
        "trigger": trigger_spec,
        "preset": settings.preset,
        "fit": info.get("result"),
        "fit_wall_seconds": round(fit_wall, 1),
        "feature_stages": run.feature_stats["stages"] if run.feature_stats else None,
        "bundle_parity": manifest.parity,
        "n": {
            "fit": N_FIT,
            "calibration": N_CAL,
            "ood_holdout": len(holdout),
            "clean_test": len(clean_test),
            "triggered_test": len(triggered_test),
        },
        "methods": table,
        "split": SPLIT,
        "wall_seconds": round(time.time() - started, 1),
    }


def _trigger_scores(method: str, s: dict[str, np.ndarray], k: int, rng: np.random.Generator) -> np.ndarray:
    """Scores of k triggered images for the contaminated traffic sample, drawn from the triggered
    test scores (the same attack; these images are not among the test images' clean scores)."""
    return s["triggered"][rng.choice(len(s["triggered"]), k, replace=False)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", action="append", default=[], help="NAME=ENCODER[@TRIGGER][#PRESET]")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "detection" / "shipped"))
    parser.add_argument("--runs", default=str(REPO_ROOT / "runs" / "shipped"))
    parser.add_argument(
        "--attach-attacks",
        action="store_true",
        help="give every case scored without its CLIP attack's zero-shot figures (a fine-tune the "
        "encoder folders did not name then) those figures, from the CLIP suite's stage cache",
    )
    parser.add_argument(
        "--add-missing",
        action="store_true",
        help="for a --case already in results.json: score it again from its cached fit and add only the "
        "method entries it lacks (a variant recorded since), leaving its figures and run record as they "
        "are; each added entry's run is recorded beside, with any earlier figure that did not come back",
    )
    args = parser.parse_args()
    out = Path(args.out)
    if args.attach_attacks:
        results = json.loads((out / "results.json").read_text())
        for name, case in results["cases"].items():
            attack = None if "attack" in case else _clip_attack(case["encoder"])
            if attack:
                case["attack"] = {**attack, "attached": run_record()}
                print(
                    f"{name}: zero-shot ASR {attack['asr']:.1%}, BA {attack['ba']:.1%} ({attack['source']})"
                )
        (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    if not args.case:  # only REPORT.md again, from the committed results.json
        (out / "REPORT.md").write_text(report(json.loads((out / "results.json").read_text())))
        return

    data = case_data()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"cases": {}}
    # The commit and the tree's state are read before the first case: each case rewrites this
    # script's own committed outputs, which would mark every later case's record dirty.
    started = run_record(outputs=(results_path, out / "REPORT.md"))
    for case in args.case:
        name, _, rest = case.partition("=")
        rest, _, preset = rest.partition("#")
        encoder_path, _, trigger = rest.partition("@")
        print(f"[shipped] {name}: {encoder_path} ({trigger or 'patch'}, {preset or 'default'})", flush=True)
        case_result = run_case(name, encoder_path, trigger or "patch", Path(args.runs), data, preset or None)
        # each case keeps its own command, commit and finishing time
        case_result["run"] = {**run_record(), "commit": started["commit"], "dirty": started["dirty"]}
        # Read again before writing: another run of this script may have added cases meanwhile.
        results = json.loads(results_path.read_text()) if results_path.exists() else {"cases": {}}
        if args.add_missing and name in results["cases"]:
            added = add_missing_methods(results["cases"][name], case_result)
            print(f"[shipped] {name}: added {', '.join(added) or 'nothing'}", flush=True)
            results_path.write_text(json.dumps(results, indent=1, default=float) + "\n")
            continue
        results["cases"][name] = case_result
        results.update({**run_record(), "commit": started["commit"], "dirty": started["dirty"]})
        results_path.write_text(json.dumps(results, indent=1, default=float) + "\n")
    (out / "REPORT.md").write_text(report(results))
    print(f"wrote {results_path} and REPORT.md")


def add_missing_methods(case: dict, fresh: dict) -> list[str]:
    """Add to a recorded `case` the method entries of `fresh` (the same case scored again) that it
    lacks; every other figure and its run record stay. Records, per added entry, the fresh run and
    the earlier entries whose figures came back different (a rescoring should reproduce them)."""

    def reproduced(recorded: object, again: object) -> bool:
        # Only what was recorded is compared: a field added to an entry since is not a change.
        if isinstance(recorded, dict) and isinstance(again, dict):
            return all(k in again and reproduced(v, again[k]) for k, v in recorded.items())
        return recorded == again

    added = [m for m in fresh["methods"] if m not in case["methods"]]
    changed = [
        m
        for m in case["methods"]
        if m in fresh["methods"] and not reproduced(case["methods"][m], fresh["methods"][m])
    ]
    for method in added:
        case["methods"][method] = fresh["methods"][method]
    if added:
        case.setdefault("added_methods", {}).update(
            {m: {"run": fresh.get("run"), "earlier_figures_not_reproduced": changed} for m in added}
        )
    return added


ATTACK_RESULTS = REPO_ROOT / "benchmarks" / "detection" / "attacks" / "results.json"
# Where each suite's probes are committed: the folder under runs/ names the suite.
SUITE_RESULTS = {
    "lab-hard": ("attacks/results.json", ATTACK_RESULTS),
    "lab-heldout": (
        "heldout/results.json",
        REPO_ROOT / "benchmarks" / "detection" / "heldout" / "results.json",
    ),
    # DRUPE-style at 40 attack epochs (README, "DRUPE-style at 40 epochs"): cases heldout_drupe40_*.
    "lab-heldout-drupe40": (
        "heldout/drupe40/results.json",
        REPO_ROOT / "benchmarks" / "detection" / "heldout" / "drupe40" / "results.json",
    ),
}
# Parts of a suite whose report is committed apart from the suite's (lab/runner.py
# COMMITTED_LAB_REPORTS), read where the suite's own results lack an encoder.
PART_RESULTS = {
    "lab-heldout": (
        (
            "heldout/ninth/results.json",
            REPO_ROOT / "benchmarks" / "detection" / "heldout" / "ninth" / "results.json",
        ),
    ),
}
# The one counted case whose encoder is not in attacks/results.json now: its probe as committed then.
ASR_FROM_HISTORY = {"runs/sloppy-warp/encoders/badencoder_warp": (0.4396, "attacks/results.json at d73f04a")}
TOOK = 0.40  # probe ASR from which an attack counts in the decision (README, fixed before the run)
DECISION_TOLERANCE = 0.01


def _attack_entry(encoder_path: str) -> tuple[dict | None, str]:
    """The committed record (training, probe) of a lab suite's encoder, and where it was read."""
    parts = Path(encoder_path).parts
    for suite, record in SUITE_RESULTS.items():
        if suite not in parts or "encoders" not in parts:
            continue
        name = parts[parts.index("encoders") + 1]
        found = None, ""
        for source, path in (record, *PART_RESULTS.get(suite, ())):
            if path.exists():
                found = json.loads(path.read_text())["encoders"].get(name), source
                if found[0] is not None:
                    return found
        return found
    return None, ""


# The CLIP suite's encoders (README, "A CLIP check"): their zero-shot figures are in the suite's stage
# cache, not in a committed report, so each case records them in results.json when it is scored.
CLIP_SUITE_ROOT = "lab-clip"
# A CLIP suite's encoder folders (lab/clip_suite.py): the towers `clip_<name>`, the fine-tunes
# `attack_<name>` (the white-square ones and every rule test's held-out fine-tunes alike); each
# one's zero-shot stage is `zero_shot_<name>`.
CLIP_FOLDER_PREFIXES = ("clip_", "attack_")


def _clip_attack(encoder_path: str) -> dict | None:
    """The zero-shot BA and ASR of a CLIP suite's encoder, from the suite's stage cache."""
    parts = Path(encoder_path).parts
    if CLIP_SUITE_ROOT not in parts or len(parts) < 2 or not parts[-2].startswith(CLIP_FOLDER_PREFIXES):
        return None
    name = parts[-2].split("_", 1)[1]
    root = Path(*parts[: parts.index(CLIP_SUITE_ROOT) + 1])
    stage = REPO_ROOT / root / "stages" / f"zero_shot_{name}.json"
    if not stage.is_file():
        return None
    zero_shot = json.loads(stage.read_text())["result"]
    return {
        "encoder": name,
        "asr": zero_shot["asr"],
        "ba": zero_shot["ba"],
        "source": f"zero-shot on CIFAR-10 test ({root}/stages/zero_shot_{name}.json)",
    }


def _case_attack(case: dict) -> tuple[float | None, float | None, str]:
    """(ASR, BA, where they were read) of a case's attack; ASR None for the clean controls."""
    attack = case.get("attack")
    if attack is not None:
        if attack["encoder"] == "clean":
            return None, attack["ba"], "the clean control"
        return attack["asr"], attack["ba"], attack["source"]
    entry, _ = _attack_entry(case["encoder"])
    probe = (entry or {}).get("probe", {}).get("cifar10")
    asr, source = _probe_asr(case["encoder"])
    return asr, (probe["ba"] if probe else None), source


def _probe_asr(encoder_path: str) -> tuple[float | None, str]:
    folder = str(Path(encoder_path).parent)
    if folder in ASR_FROM_HISTORY:
        return ASR_FROM_HISTORY[folder]
    entry, source = _attack_entry(encoder_path)
    if entry and "probe" in entry:
        return entry["probe"]["cifar10"]["asr"], source
    parts = Path(encoder_path).parts
    if parts[-2:] == ("simclr_clean", "encoder.safetensors"):
        return None, "the clean control"
    return None, "no committed probe"


# The second test's cases: the lab-hard attacks never run before it was fixed (README).
HELD_OUT = ("lab_adaptive_checker", "lab_adaptive_blend", "lab_badencoder_noise_random")
# The held-out check (README, fixed 10:45 UTC before its attacks were trained): the shipped score on
# the lab-heldout suite's attacks, cases named heldout_<attack>; no decision rides on them.
HELD_OUT_CHECK_PREFIX = "heldout_"
# The CLIP check (README, fixed 16:00 UTC before its encoders were trained): cases clip_<encoder>.
CLIP_CHECK_PREFIX = "clip_"
# The goals of the shipped-detector issue, read on each attack of the check that took.
GOAL_AUROC, GOAL_TPR_ID, GOAL_FPR_ID, GOAL_TPR_OOD, GOAL_FPR_OOD = 0.99, 0.95, 0.015, 0.90, 0.02
# The baselines compared in the check (the strongest of them is shown).
BASELINE_PREFIXES = ("activation_norm_", "embedding_norm", "knn_distance", "strip")
# The third test's (README): max_all_tail against max_all, on attacks never run before it was fixed.
# Counted: those trained by its deadline (07:35 UTC); the other two were trained for the fourth test.
THIRD_TEST = ("lab_adaptive_noise_random", "lab_adaptive_invisible")
THIRD_TEST_LATE = ("lab_badencoder_noise", "lab_badencoder_checker_random")
# The fourth test's (README): the same two rules at one FPR, on attacks never run before it was fixed.
FOURTH_TEST = (
    "lab_badencoder_noise",
    "lab_badencoder_checker_random",
    "lab_adaptive_noise",
    "lab_adaptive_checker_random",
)
MAX_ALL_TAIL = "dede_depths_tail_z_max"
THIRD_AUROC_TOLERANCE = 0.005


# The guard the first two rules had and the third lacked (README, added 08:55 UTC before any case of
# the fourth test was scored): a rule replaces the other only if it is on no counted case (probe ASR
# >= 40%, random split) more than this much AUROC below it.
GUARD_AUROC = 0.01
RULE_METHODS = {"max_all": MAX_ALL, "max_all_tail": MAX_ALL_TAIL}


def regressions(results: dict, rule: str, other: str) -> list[tuple[str, float]]:
    """The counted cases where `rule`'s AUROC is more than GUARD_AUROC below `other`'s: (case, gap).
    The held-out check's cases are not among them: the guard's case set was fixed before they ran."""
    found = []
    for name, case in results["cases"].items():
        if name.startswith(HELD_OUT_CHECK_PREFIX):
            continue
        asr, _ = _probe_asr(case["encoder"])
        if case.get("split") != SPLIT or asr is None or asr < TOOK:
            continue
        methods = case["methods"]
        a, b = (
            methods[next(m for m in methods if m.startswith(RULE_METHODS[r]))]["auroc"] for r in (rule, other)
        )
        if a < b - GUARD_AUROC:
            found.append((name, round(b - a, 3)))
    return found


def _guarded(results: dict, verdict: str, standing: str) -> tuple[str, str]:
    """`verdict` if it passes the guard against `standing`; else `standing`, and why."""
    if verdict == standing:
        return verdict, ""
    below = regressions(results, verdict, standing)
    if not below:
        return verdict, ""
    shown = ", ".join(f"{name} {gap:.3f}" for name, gap in below)
    return standing, f" Guard: `{verdict}` is more than {GUARD_AUROC} AUROC below `{standing}` on {shown}."


def third_verdict(results: dict) -> str:
    """The rule the third test gives on the cases it counts, once through the guard."""
    letter = (
        "max_all_tail" if "**Verdict: max_all_tail.**" in "\n".join(third_decision(results)) else "max_all"
    )
    return _guarded(results, letter, "max_all")[0]


def _tail_and_plain(results: dict, names: tuple[str, ...]) -> list[tuple[str, tuple | None]]:
    """Per case of a test: (max_all_tail's entry, max_all's, probe ASR, its source, whether the attack
    took), or None where the case was not run."""
    out: list[tuple[str, tuple | None]] = []
    for name in names:
        case = results["cases"].get(name)
        if case is None:
            out.append((name, None))
            continue
        methods = case["methods"]
        tail = methods[next(m for m in methods if m.startswith(MAX_ALL_TAIL))]
        plain = methods[next(m for m in methods if m.startswith(MAX_ALL))]
        asr, source = _probe_asr(case["encoder"])
        out.append((name, (tail, plain, asr, source, asr is not None and asr >= TOOK)))
    return out


def third_decision(results: dict) -> list[str]:
    """max_all_tail replaces max_all iff, over the third test's cases whose attack took, its mean TPR
    at the in-distribution threshold is higher and its mean AUROC is at most 0.005 lower."""
    rows, counted = [], []
    for name, pair in _tail_and_plain(results, THIRD_TEST):
        if pair is None:
            rows.append(f"| {name} | not run | | | | | |")
            continue
        tail, plain, asr, source, takes = pair
        if takes:
            counted.append((tail["auroc"], plain["auroc"], tail["id"]["tpr"], plain["id"]["tpr"]))
        rows.append(
            f"| {name} | {100 * asr:.1f}% ({source}) | {'yes' if takes else 'no'} | {tail['auroc']:.3f} | "
            f"{plain['auroc']:.3f} | {100 * tail['id']['tpr']:.2f}% | {100 * plain['id']['tpr']:.2f}% |"
            if asr is not None
            else f"| {name} | {source} | no | {tail['auroc']:.3f} | {plain['auroc']:.3f} | | |"
        )
    rows += [
        f"| {name} | trained after the test's deadline: counted in the fourth test | | | | | |"
        for name in THIRD_TEST_LATE
    ]
    lines = [
        "## The third test, applied",
        "",
        "`max_all_tail` (max_all's depths, each scaled by its clean 95th percentile minus the median) against "
        "`max_all`, on lab-hard attacks never run before the test was fixed (benchmarks/detection/README.md): "
        "`max_all_tail` replaces `max_all` iff, over the cases whose attack took, its mean TPR at the "
        "in-distribution threshold is higher and its mean AUROC is at most 0.005 lower.",
        "",
        "| case | probe ASR | counted | AUROC max_all_tail | AUROC max_all | TPR id max_all_tail | TPR id max_all |",
        "| --- | ---: | :---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
    ]
    if not counted:
        return [*lines, "No counted case: `max_all` stays.", ""]
    a_tail, a_plain, t_tail, t_plain = (float(np.mean(c)) for c in zip(*counted, strict=True))
    ships = t_tail > t_plain and a_tail >= a_plain - THIRD_AUROC_TOLERANCE
    return [
        *lines,
        f"Over {len(counted)} counted: mean TPR id {100 * t_tail:.2f}% against {100 * t_plain:.2f}%, mean AUROC "
        f"{a_tail:.3f} against {a_plain:.3f}. **Verdict: {'max_all_tail' if ships else 'max_all'}.**",
        "",
        *(
            [
                "As written, the rule has no guard against a loss on the cases measured before it; the first "
                "two rules had one. With it (README, added before any case of the fourth test was scored):"
                + _guarded(results, "max_all_tail", "max_all")[1]
                + f" The default stays `{_guarded(results, 'max_all_tail', 'max_all')[0]}`.",
                "",
            ]
            if ships
            else []
        ),
    ]


def fourth_decision(results: dict) -> list[str]:
    """Over the fourth test's cases whose attack took, the rule with the higher mean TPR at 1% FPR (the
    threshold set on the clean test scores: both rules read at one FPR) ships if its mean AUROC is at
    most 0.005 below the other's and it passes the guard; otherwise the default stands."""
    rows, counted = [], []
    for name, pair in _tail_and_plain(results, FOURTH_TEST):
        if pair is None:
            rows.append(f"| {name} | not run | | | | | |")
            continue
        tail, plain, asr, source, takes = pair
        if takes:
            counted.append((tail["auroc"], plain["auroc"], tail["tpr_at_1pct_fpr"], plain["tpr_at_1pct_fpr"]))
        shown = f"{100 * asr:.1f}% ({source})" if asr is not None else source
        rows.append(
            f"| {name} | {shown} | {'yes' if takes else 'no'} | {tail['auroc']:.3f} | {plain['auroc']:.3f} | "
            f"{100 * tail['tpr_at_1pct_fpr']:.1f}% | {100 * plain['tpr_at_1pct_fpr']:.1f}% |"
        )
    lines = [
        "## The fourth test, applied",
        "",
        "`max_all_tail` against `max_all` again, read at one FPR, on lab-hard attacks never run before the "
        "test was fixed (benchmarks/detection/README.md): over the cases whose attack took, the rule with the "
        "higher mean TPR at 1% FPR (threshold set on the clean test scores) ships if its mean AUROC is at most "
        "0.005 below the other's and it is on no counted case of the report more than 0.01 AUROC below it.",
        "",
        "| case | probe ASR | counted | AUROC max_all_tail | AUROC max_all | TPR@1%FPR max_all_tail | TPR@1%FPR max_all |",
        "| --- | ---: | :---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
    ]
    standing = third_verdict(results)
    if not counted:
        return [
            *lines,
            f"No counted case yet: the default stands (`{standing}`: the third test re-applied, through the guard).",
            "",
        ]
    a_tail, a_plain, t_tail, t_plain = (float(np.mean(c)) for c in zip(*counted, strict=True))
    verdict = standing
    if t_tail > t_plain and a_tail >= a_plain - THIRD_AUROC_TOLERANCE:
        verdict = "max_all_tail"
    elif t_plain > t_tail and a_plain >= a_tail - THIRD_AUROC_TOLERANCE:
        verdict = "max_all"
    verdict, why = _guarded(results, verdict, standing)
    return [
        *lines,
        f"Over {len(counted)} counted: mean TPR at 1% FPR {100 * t_tail:.1f}% (max_all_tail) against "
        f"{100 * t_plain:.1f}% (max_all), mean AUROC {a_tail:.3f} against {a_plain:.3f}. The rule with the "
        "higher TPR ships if its AUROC is at most 0.005 below the other's and it passes the guard; otherwise "
        f"the default stands (`{standing}`).{why} **Verdict: {verdict}.**",
        "",
    ]


# The fifth test (README, fixed 2026-12-07 02:43 UTC before its attacks were trained): its cases in
# the order they were fixed, and how far below max_all's worst counted AUROC the candidate's may be.
FIFTH_TEST = (
    "heldout_norm_preserving_sig",
    "heldout_drupe_sig",
    "heldout_norm_preserving_warp",
    "heldout_drupe_checker_random",
    "heldout_adaptive_knn_noise",
)
FIFTH_WORST_TOLERANCE = 0.01


def fifth_verdict(counted: list[tuple[float, float, float, float]]) -> tuple[str, list[str]]:
    """(the rule, the conditions' lines) from the counted cases' (AUROC relative, AUROC max_all,
    TPR id relative, TPR id max_all): max_all_relative iff its mean AUROC is above, its worst at most
    FIFTH_WORST_TOLERANCE below max_all's worst, and its mean id TPR not below."""
    if not counted:
        return "max_all", ["No counted case: `max_all` stays."]
    auc_rel, auc_all, tpr_rel, tpr_all = (np.array(c, dtype=float) for c in zip(*counted, strict=True))
    conditions = [
        (f"mean AUROC {auc_rel.mean():.3f} against {auc_all.mean():.3f}", auc_rel.mean() > auc_all.mean()),
        (
            f"worst AUROC {auc_rel.min():.3f} against {auc_all.min():.3f} (at most {FIFTH_WORST_TOLERANCE} below)",
            auc_rel.min() >= auc_all.min() - FIFTH_WORST_TOLERANCE,
        ),
        (
            f"mean TPR at the id threshold {100 * tpr_rel.mean():.1f}% against {100 * tpr_all.mean():.1f}%",
            tpr_rel.mean() >= tpr_all.mean(),
        ),
    ]
    lines = [f"- {text}: {'met' if ok else '**not met**'}" for text, ok in conditions]
    return ("max_all_relative" if all(ok for _, ok in conditions) else "max_all"), lines


def fifth_decision(results: dict) -> list[str]:
    """The fifth test applied: `max_all_relative` against `max_all` on its cases, and the candidate's
    figures on every other case measured with it (no decision rides on those)."""
    rows, counted, others = [], [], []
    for name, case in results["cases"].items():
        rel, plain = _method(case["methods"], MAX_ALL_RELATIVE), _method(case["methods"], MAX_ALL)
        if name not in FIFTH_TEST and rel is not None and plain is not None:
            others.append(
                f"| {name} | {rel['auroc']:.3f} | {plain['auroc']:.3f} | "
                f"{_tpr_fpr(rel, 'id')} | {_tpr_fpr(plain, 'id')} |"
            )
    for name in FIFTH_TEST:
        case = results["cases"].get(name)
        if case is None:
            rows.append(f"| {name} | not run | | | | | |")
            continue
        methods = case["methods"]
        rel, plain = _method(methods, MAX_ALL_RELATIVE), _method(methods, MAX_ALL)
        asr, source = _probe_asr(case["encoder"])
        takes = asr is not None and asr >= TOOK
        if takes:
            counted.append((rel["auroc"], plain["auroc"], rel["id"]["tpr"], plain["id"]["tpr"]))
        shown = f"{100 * asr:.1f}% ({source})" if asr is not None else source
        rows.append(
            f"| {name} | {shown} | {'yes' if takes else 'no'} | {rel['auroc']:.3f} | {plain['auroc']:.3f} | "
            f"{_tpr_fpr(rel, 'id')} | {_tpr_fpr(plain, 'id')} |"
        )
    verdict, conditions = fifth_verdict(counted)
    withheld = []
    demo, demo_relative = (
        REPO_ROOT / "benchmarks" / "demo" / f for f in ("max_all.json", "max_all_relative.json")
    )
    if verdict == "max_all_relative" and demo.exists() and demo_relative.exists():
        plain, rel = (json.loads(f.read_text()) for f in (demo, demo_relative))
        withheld = [
            "**Withheld as the default.** Applied to the demo bundle (a plain BadEncoder with the white square, "
            "its decoder fitted on CIFAR-10; `python -m benchmarks.demo.run`), the rule falls: AUROC "
            f"{rel['metrics']['auroc']:.3f} against {plain['metrics']['auroc']:.3f}, "
            f"{100 * rel['tpr_at_bundle_threshold']:.1f}% flagged at its threshold against "
            f"{100 * plain['tpr_at_bundle_threshold']:.1f}% (`benchmarks/demo/max_all_relative.json` against "
            "`results.json`). The test's attacks all hold the embedding norm or hide the cues; none was a plain "
            "BadEncoder, whose triggered inputs carry more energy than clean ones (the white square's pixels, "
            "inflated activations): the squared discrepancy counts that energy, the relative one divides it away "
            "(a likely reason, not measured here). `max_all` stays the default; `max_all_relative` is `dede fit --feature-rule max_all_relative`.",
            "",
        ]
    lines = [
        "## The fifth test, applied",
        "",
        "`max_all_relative` (max_all's depths, each discrepancy over the sum of its two maps' mean squares) "
        "against `max_all`, on lab-heldout attacks trained after the test was fixed "
        '(benchmarks/detection/README.md, "A fifth test"): `max_all_relative` becomes the default iff, over '
        "the cases whose attack took, its mean AUROC is above, its worst AUROC at most "
        f"{FIFTH_WORST_TOLERANCE} below max_all's worst, and its mean TPR at the id threshold not below.",
        "",
        "| case | probe ASR | counted | AUROC max_all_relative | AUROC max_all | TPR / FPR id max_all_relative "
        "| TPR / FPR id max_all |",
        "| --- | ---: | :---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"Over {len(counted)} counted:" if counted else "",
        *conditions,
        "",
        f"**Verdict: {verdict}.**",
        "",
        *withheld,
    ]
    if others:
        lines += [
            "The candidate on the other cases measured with it (its rule was formed after the held-out "
            "cases were seen; no decision rides on these):",
            "",
            "| case | AUROC max_all_relative | AUROC max_all | TPR / FPR id max_all_relative | TPR / FPR id max_all |",
            "| --- | ---: | ---: | ---: | ---: |",
            *others,
            "",
        ]
    return lines


# The sixth test (README, fixed 2026-12-07 04:09 UTC before its attacks were trained).
SIXTH_TEST = ("heldout_badencoder_checker", "heldout_badencoder_noise_random", "heldout_drupe_warp")
SIXTH_GUARD = 0.01  # no guarded case (the demo included) more than this AUROC below max_all
DEMO_FIGURES = {
    rule: REPO_ROOT / "benchmarks" / "demo" / name
    for rule, name in (("max_all", "max_all.json"), ("max_all_both", "max_all_both.json"))
}


def sixth_decision(results: dict) -> list[str]:
    """max_all_both against max_all: the fifth test's three conditions on the sixth test's counted
    cases, and a guard over those, the fifth test's cases and the demo bundle."""
    rows, counted, guarded, unmeasured = [], [], [], []
    for name in (*SIXTH_TEST, *FIFTH_TEST):
        case = results["cases"].get(name)
        if case is None:
            rows.append(f"| {name} | {'sixth' if name in SIXTH_TEST else 'fifth'} | not run | | | | | |")
            continue
        both, plain = _method(case["methods"], MAX_ALL_BOTH), _method(case["methods"], MAX_ALL)
        if both is None:
            rows.append(f"| {name} | fifth (guard) | measured before the rule existed | | | | | |")
            unmeasured.append(name)
            continue
        asr, source = _probe_asr(case["encoder"])
        takes = asr is not None and asr >= TOOK
        if takes and name in SIXTH_TEST:
            counted.append((both["auroc"], plain["auroc"], both["id"]["tpr"], plain["id"]["tpr"]))
        if takes:
            guarded.append((name, both["auroc"], plain["auroc"]))
        shown = f"{100 * asr:.1f}% ({source})" if asr is not None else source
        rows.append(
            f"| {name} | {'sixth' if name in SIXTH_TEST else 'fifth (guard)'} | {shown} | "
            f"{'yes' if takes else 'no'} | {both['auroc']:.3f} | {plain['auroc']:.3f} | "
            f"{_tpr_fpr(both, 'id')} | {_tpr_fpr(plain, 'id')} |"
        )
    demo = {r: json.loads(p.read_text()) for r, p in DEMO_FIGURES.items() if p.exists()}
    if len(demo) == 2:
        guarded.append(
            ("demo bundle", demo["max_all_both"]["metrics"]["auroc"], demo["max_all"]["metrics"]["auroc"])
        )
        rows.append(
            f"| demo bundle | guard | plain BadEncoder, {100 * demo['max_all']['backdoor']['asr']:.1f}% | yes | "
            f"{demo['max_all_both']['metrics']['auroc']:.3f} | {demo['max_all']['metrics']['auroc']:.3f} | "
            f"{100 * demo['max_all_both']['tpr_at_bundle_threshold']:.1f}% / "
            f"{100 * demo['max_all_both']['fpr_at_bundle_threshold']:.1f}% | "
            f"{100 * demo['max_all']['tpr_at_bundle_threshold']:.1f}% / "
            f"{100 * demo['max_all']['fpr_at_bundle_threshold']:.1f}% |"
        )
    verdict, conditions = fifth_verdict(counted)
    verdict = "max_all_both" if verdict == "max_all_relative" else verdict
    below = [(n, round(p - b, 3)) for n, b, p in guarded if b < p - SIXTH_GUARD]
    if len(demo) < 2:
        unmeasured.append("the demo bundle")
    if unmeasured:
        conditions.append(f"- guarded cases not measured under the rule: **{', '.join(unmeasured)}**")
        verdict = "max_all"
    conditions.append(
        "- guard (no guarded case more than 0.01 below): "
        + ("met" if not below else "**not met**: " + ", ".join(f"{n} {g:.3f}" for n, g in below))
    )
    if below:
        verdict = "max_all"
    # As the fifth test's verdict was: a shipped case outside the test's guard that the rule drops by
    # more than the guard allows withholds it (found after the verdict, on the CLIP check's towers).
    outside = []
    for name, case in results["cases"].items():
        both, plain = _method(case["methods"], MAX_ALL_BOTH), _method(case["methods"], MAX_ALL)
        # a control's AUROC is its score's reaction to the trigger's pixels alone: lower is not worse
        if (
            name.startswith(CLIP_CHECK_PREFIX)
            and not name.endswith("_clean")
            and both
            and plain
            and both["auroc"] < plain["auroc"] - SIXTH_GUARD
        ):
            outside.append(f"{name} {both['auroc']:.3f} against {plain['auroc']:.3f}")
    withheld = []
    if verdict == "max_all_both" and outside:
        withheld = [
            "**Withheld as the default: `max_all` stays.** Scored after the verdict on the CLIP check's towers "
            "(the shipped-detector issue names CLIP towers; the test's guard left them out), the rule falls by "
            f"more than the guard's {SIXTH_GUARD}: {', '.join(outside)} (AUROC, max_all_both against max_all). "
            "Its relative figures separate poorly there, as `max_all_relative` alone shows.",
            "",
        ]
    return (
        _test_section(
            "The sixth test, applied",
            "`max_all_both` (max_all's depths squared and relative, the max of the fourteen z-scores) against "
            "`max_all`, on lab-heldout attacks trained after the test was fixed (benchmarks/detection/README.md, "
            '"A sixth test"): the fifth test\'s three conditions over its counted cases, and no guarded case (its '
            "cases, the fifth test's, the demo bundle) more than 0.01 AUROC below `max_all`.",
            ("max_all_both", "max_all"),
            rows,
            len(counted),
            conditions,
            verdict,
        )
        + withheld
    )


def _test_section(
    title: str,
    intro: str,
    rules: tuple[str, str],
    rows: list[str],
    n_counted: int,
    conditions: list[str],
    verdict: str,
) -> list[str]:
    """A rule test's report section: its table (candidate, standing rule), the conditions, the verdict."""
    new, old = rules
    return [
        f"## {title}",
        "",
        intro,
        "",
        f"| case | test | probe ASR | counted | AUROC {new} | AUROC {old} | TPR / FPR id {new} | TPR / FPR id {old} |",
        "| --- | --- | ---: | :---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"Over {n_counted} counted:" if n_counted else "",
        *conditions,
        "",
        f"**Verdict: {verdict}.**",
        "",
    ]


# The seventh test (README, fixed 2026-12-07 06:07 UTC before its attacks were trained).
SEVENTH_TEST = ("heldout_badencoder_sig", "heldout_norm_preserving_checker_random", "heldout_drupe_noise")
SEVENTH_MEAN_TOLERANCE = 0.005  # mean AUROC at most this below max_all_both's
SEVENTH_WORST_TOLERANCE = 0.01  # worst counted AUROC at most this below
SEVENTH_GUARD_AUROC = 0.01  # no guarded case more than this AUROC below
SEVENTH_GUARD_TPR = 0.02  # nor more than this TPR at the id threshold (the demo: its bundle's) below
SEVENTH_DEMO_FIGURES = {
    rule: REPO_ROOT / "benchmarks" / "demo" / f"{rule}.json"
    for rule in ("max_all_both", "max_all_both_balanced")
}


def _demo_guard(figures: dict[str, Path], new: str, old: str, rows: list[str]) -> tuple | None:
    """The demo bundle as a guarded case of a rule test: its table row appended to `rows`, and
    ("demo bundle", AUROC new, AUROC old, TPR new, TPR old at each bundle's threshold); None (no
    row) until both figure files exist."""
    demo = {r: json.loads(p.read_text()) for r, p in figures.items() if p.exists()}
    if len(demo) < 2:
        return None
    new_d, old_d = demo[new], demo[old]
    rows.append(
        f"| demo bundle | guard | plain BadEncoder | yes | {new_d['metrics']['auroc']:.3f} | "
        f"{old_d['metrics']['auroc']:.3f} | {100 * new_d['tpr_at_bundle_threshold']:.1f}% / "
        f"{100 * new_d['fpr_at_bundle_threshold']:.1f}% | {100 * old_d['tpr_at_bundle_threshold']:.1f}% / "
        f"{100 * old_d['fpr_at_bundle_threshold']:.1f}% |"
    )
    return (
        "demo bundle",
        new_d["metrics"]["auroc"],
        old_d["metrics"]["auroc"],
        new_d["tpr_at_bundle_threshold"],
        old_d["tpr_at_bundle_threshold"],
    )


def _flag_more_conditions(
    counted: list[tuple],
    guarded: list[tuple],
    tpr_reading: str = "at the id threshold",
    mean_tpr_tolerance: float | None = None,
    guard_tpr: float = SEVENTH_GUARD_TPR,
) -> list[tuple[str, bool]]:
    """The seventh to ninth tests' shared conditions, from the counted cases' (AUROC new, AUROC old,
    TPR new, TPR old; the TPR read as `tpr_reading` says) and the guarded cases' (name, the same
    four, ...): more flagged on average (`mean_tpr_tolerance` None: strictly more; else at most that
    below), mean and worst AUROC within their tolerances, no guarded case worse past the guard."""
    auc_new, auc_old, tpr_new, tpr_old = (np.array(c) for c in zip(*counted, strict=True))
    below = [
        f"{name} ({a_new - a_old:+.3f} AUROC, {100 * (t_new - t_old):+.1f} points)"
        for name, a_new, a_old, t_new, t_old, *_ in guarded
        if a_new < a_old - SEVENTH_GUARD_AUROC or t_new < t_old - guard_tpr
    ]
    mean_tpr = f"mean TPR {tpr_reading} {100 * tpr_new.mean():.1f}% against {100 * tpr_old.mean():.1f}%"
    if mean_tpr_tolerance is None:
        tpr_condition = (mean_tpr, tpr_new.mean() > tpr_old.mean())
    else:
        tpr_condition = (
            f"{mean_tpr} (at most {100 * mean_tpr_tolerance:.0f} point below)",
            tpr_new.mean() >= tpr_old.mean() - mean_tpr_tolerance,
        )
    guard_tpr_reading = "" if tpr_reading == "at the id threshold" else f" {tpr_reading}"
    return [
        tpr_condition,
        (
            f"mean AUROC {auc_new.mean():.3f} against {auc_old.mean():.3f} (at most {SEVENTH_MEAN_TOLERANCE} below)",
            auc_new.mean() >= auc_old.mean() - SEVENTH_MEAN_TOLERANCE,
        ),
        (
            f"worst AUROC {auc_new.min():.3f} against {auc_old.min():.3f} (at most {SEVENTH_WORST_TOLERANCE} below)",
            auc_new.min() >= auc_old.min() - SEVENTH_WORST_TOLERANCE,
        ),
        (
            f"guard ({len(guarded)} cases; none more than {SEVENTH_GUARD_AUROC} AUROC or "
            f"{100 * guard_tpr:.0f} points of TPR{guard_tpr_reading} below)"
            + (f": below on {', '.join(below)}" if below else ""),
            not below,
        ),
    ]


def _fpr_bound_condition(guarded: list[tuple]) -> tuple[str, bool]:
    """The eighth and ninth tests' bound: from the guarded cases' (name, four figures, realised FPR at
    the id threshold new, old; None where there is none), no case above EIGHTH_FPR_BOUND where the
    standing rule is not."""
    over = [
        f"{name} ({100 * f_new:.1f}% against {100 * f_old:.1f}%)"
        for name, _, _, _, _, f_new, f_old in guarded
        if f_new is not None and f_new > EIGHTH_FPR_BOUND >= f_old
    ]
    return (
        f"realised FPR at the id threshold nowhere above {100 * EIGHTH_FPR_BOUND:.1f}% where max_all's is not"
        + (f": above on {', '.join(over)}" if over else ""),
        not over,
    )


def seventh_verdict(
    counted: list[tuple[float, float, float, float]], guarded: list[tuple[str, float, float, float, float]]
) -> tuple[str, list[str]]:
    """(the rule, the conditions' lines) from the counted cases' (AUROC balanced, AUROC both, TPR id
    balanced, TPR id both) and the guarded cases' (name, the same four)."""
    if not counted:
        return "max_all_both", ["- No counted case: `max_all_both` stays."]
    conditions = _flag_more_conditions(counted, guarded)
    lines = [f"- {text}: {'met' if ok else '**not met**'}" for text, ok in conditions]
    return ("max_all_both_balanced" if all(ok for _, ok in conditions) else "max_all_both"), lines


def seventh_decision(results: dict) -> list[str]:
    """max_all_both_balanced against max_all_both: the counted new cases, the fifth and sixth tests'
    cases and the demo bundle as the guard."""
    rows, counted, guarded, unmeasured = [], [], [], []
    for name in (*SEVENTH_TEST, *SIXTH_TEST, *FIFTH_TEST):
        test = "seventh" if name in SEVENTH_TEST else "guard"
        case = results["cases"].get(name)
        new = _method(case["methods"], MAX_ALL_BOTH_BALANCED) if case else None
        old = _method(case["methods"], MAX_ALL_BOTH) if case else None
        if new is None or old is None:
            rows.append(
                f"| {name} | {test} | {'not run' if case is None else 'not measured under both rules'} | | | | | |"
            )
            unmeasured.append(name)
            continue
        asr, source = _probe_asr(case["encoder"])
        takes = asr is not None and asr >= TOOK
        figures = (new["auroc"], old["auroc"], new["id"]["tpr"], old["id"]["tpr"])
        if takes and name in SEVENTH_TEST:
            counted.append(figures)
        if takes:
            guarded.append((name, *figures))
        shown = f"{100 * asr:.1f}% ({source})" if asr is not None else source
        rows.append(
            f"| {name} | {test} | {shown} | {'yes' if takes else 'no'} | {new['auroc']:.3f} | {old['auroc']:.3f} | "
            f"{_tpr_fpr(new, 'id')} | {_tpr_fpr(old, 'id')} |"
        )
    demo = _demo_guard(SEVENTH_DEMO_FIGURES, "max_all_both_balanced", "max_all_both", rows)
    if demo:
        guarded.append(demo)
    else:
        unmeasured.append("the demo bundle")
    verdict, conditions = seventh_verdict(counted, guarded)
    guard_unmeasured = [n for n in unmeasured if n not in SEVENTH_TEST]
    if guard_unmeasured:
        conditions.append(f"- guarded cases not measured under both rules: **{', '.join(guard_unmeasured)}**")
        verdict = "max_all_both"
    return _test_section(
        "The seventh test, applied",
        "`max_all_both_balanced` (max_all_both's fourteen z-scores, each view's divided by the 0.95 quantile of "
        "its max over the fit's clean held-out images) against `max_all_both`, on lab-heldout attacks trained "
        'after the test was fixed (benchmarks/detection/README.md, "A seventh test").',
        ("balanced", "max_all_both"),
        rows,
        len(counted),
        conditions,
        verdict,
    )


# The eighth test (README, fixed 2026-12-07 08:39 UTC before its attacks were trained).
EIGHTH_TEST = ("clip_badencoder_checker", "clip_norm_preserving_noise")
EIGHTH_GUARDED = (
    "clip_poisoned",
    "clip_badencoder",
    "clip_norm_preserving",
    *FIFTH_TEST,
    "heldout_norm_preserving_checker_random",
    "heldout_drupe_noise",
    "heldout_norm_preserving",
    "heldout_drupe",
)
EIGHTH_FPR_BOUND = (
    0.015  # no guarded case's realised FPR at the id threshold above this where max_all's is not
)
EIGHTH_DEMO_FIGURES = {
    "max_all": REPO_ROOT / "benchmarks" / "demo" / "max_all.json",
    "calibrated": REPO_ROOT / "benchmarks" / "demo" / "max_all_calibrated.json",
}


def eighth_verdict(
    counted: list[tuple[float, float, float, float]],
    guarded: list[tuple[str, float, float, float, float, float | None, float | None]],
) -> tuple[str, list[str]]:
    """(where the statistics come from, the conditions' lines) from the counted cases' (AUROC
    calibrated, AUROC max_all, TPR id calibrated, TPR id max_all) and the guarded cases' (name, the
    same four, realised FPR at the id threshold calibrated, max_all; None for the demo)."""
    if not counted:
        return "auxiliary", ["- No counted case: the auxiliary statistics stay."]
    conditions = [*_flag_more_conditions(counted, guarded), _fpr_bound_condition(guarded)]
    lines = [f"- {text}: {'met' if ok else '**not met**'}" for text, ok in conditions]
    return ("calibration" if all(ok for _, ok in conditions) else "auxiliary"), lines


def eighth_decision(results: dict) -> list[str]:
    """max_all standardised on each threshold's calibration images against max_all as shipped (the
    auxiliary images' statistics): the new CLIP fine-tunes counted, the CLIP, SimCLR and demo cases
    as the guard."""
    rows, counted, guarded, unmeasured = [], [], [], []
    for name in (*EIGHTH_TEST, *EIGHTH_GUARDED):
        test = "eighth" if name in EIGHTH_TEST else "guard"
        case = results["cases"].get(name)
        new = case["methods"].get(MAX_ALL_CALIBRATED) if case else None
        old = _method(case["methods"], MAX_ALL) if case else None
        if new is None or old is None:
            rows.append(
                f"| {name} | {test} | {'not run' if case is None else 'not measured under both'} | | | | | |"
            )
            unmeasured.append(name)
            continue
        asr, _, source = _case_attack(case)
        takes = asr is not None and asr >= TOOK
        figures = (new["auroc"], old["auroc"], new["id"]["tpr"], old["id"]["tpr"])
        if takes and name in EIGHTH_TEST:
            counted.append(figures)
        if takes:
            guarded.append((name, *figures, new["id"]["realised_fpr"], old["id"]["realised_fpr"]))
        shown = f"{100 * asr:.1f}% ({source})" if asr is not None else source
        rows.append(
            f"| {name} | {test} | {shown} | {'yes' if takes else 'no'} | {new['auroc']:.3f} | {old['auroc']:.3f} | "
            f"{_tpr_fpr(new, 'id')} | {_tpr_fpr(old, 'id')} |"
        )
    demo = _demo_guard(EIGHTH_DEMO_FIGURES, "calibrated", "max_all", rows)
    if demo:
        guarded.append((*demo, None, None))  # the demo's realised FPR is its bundle's, not an id threshold's
    else:
        unmeasured.append("the demo bundle")
    verdict, conditions = eighth_verdict(counted, guarded)
    guard_unmeasured = [n for n in unmeasured if n not in EIGHTH_TEST]
    if guard_unmeasured:
        conditions.append(f"- guarded cases not measured under both: **{', '.join(guard_unmeasured)}**")
        verdict = "auxiliary"
    return _test_section(
        "The eighth test, applied",
        "`max_all` with each depth's median and MAD set on the calibration images that set each threshold "
        "(`dede calibrate --standardise-on calibration`; AUROC under the id calibration's statistics) against "
        "`max_all` as shipped (the fit's held-out auxiliary images' statistics), on CLIP fine-tunes trained "
        'after the test was fixed (benchmarks/detection/README.md, "An eighth test"; counted at zero-shot '
        "or probe ASR >= 40%). Verdict: where the statistics come from.",
        ("calibrated", "max_all"),
        rows,
        len(counted),
        conditions,
        verdict,
    )


# The ninth test (README, fixed 2026-12-07 14:20 UTC before its attacks were trained): the eighth
# test's candidate again, every TPR read at 1% FPR on the clean test images.
NINTH_TEST = (
    "heldout_norm_preserving_checker",
    "heldout_drupe_checker",
    "heldout_badencoder_patch_random",
    "clip_norm_preserving_checker",
    "clip_badencoder_noise",
)
NINTH_DEADLINE = "2026-12-07T16:35:00+00:00"  # a new case counts if scored by then
NINTH_MEAN_TPR_TOLERANCE = 0.01  # mean TPR at 1% FPR over the counted cases at most this below
NINTH_GUARD_TPR = 0.02  # no guarded case's TPR at 1% FPR more than this below


def _one_rate_verdict(
    counted: list[tuple], guarded: list[tuple], fpr_condition: tuple[str, bool], chosen: str
) -> tuple[str, list[str]]:
    """The ninth and tenth tests' verdict: `chosen` iff the shared conditions at 1% FPR (the
    ninth's tolerances) and the test's own FPR condition all hold, else the auxiliary statistics."""
    if not counted:
        return "auxiliary", ["- No counted case: the auxiliary statistics stay."]
    conditions = [
        *_flag_more_conditions(
            counted,
            guarded,
            tpr_reading="at 1% FPR",
            mean_tpr_tolerance=NINTH_MEAN_TPR_TOLERANCE,
            guard_tpr=NINTH_GUARD_TPR,
        ),
        fpr_condition,
    ]
    lines = [f"- {text}: {'met' if ok else '**not met**'}" for text, ok in conditions]
    return (chosen if all(ok for _, ok in conditions) else "auxiliary"), lines


def ninth_verdict(
    counted: list[tuple[float, float, float, float]],
    guarded: list[tuple[str, float, float, float, float, float | None, float | None]],
) -> tuple[str, list[str]]:
    """(where the statistics come from, the conditions' lines) from the counted cases' (AUROC
    calibrated, AUROC max_all, TPR at 1% FPR calibrated, the same max_all) and the guarded cases'
    (name, the same four, realised FPR at the id threshold calibrated, max_all; None for the demo)."""
    return _one_rate_verdict(counted, guarded, _fpr_bound_condition(guarded), "calibration")


def _one_rate_rows(
    results: dict, test_cases: tuple[str, ...], test: str, deadline: str, candidate: object
) -> tuple[list[str], list[tuple], list[tuple]]:
    """The ninth and tenth tests' table rows, counted cases (AUROC new, old, TPR at 1% FPR new, old)
    and guarded cases (name, the same four, realised FPR at the id threshold new, old, the clean test
    images' count), the demo bundle last. `candidate(name, case)` is the candidate's entry (None:
    not measured)."""
    rows, counted, guarded = [], [], []
    names = [*test_cases, *(n for n in results["cases"] if n not in test_cases)]
    for name in names:
        label = test if name in test_cases else "guard"
        case = results["cases"].get(name)
        new = candidate(name, case) if case else None
        old = _method(case["methods"], MAX_ALL) if case else None
        if new is None or old is None:
            if label == test:
                rows.append(
                    f"| {name} | {test} | {'not run' if case is None else 'not measured under both'} | | | | | |"
                )
            continue  # a guard is every case measured under both rules
        asr, _, source = _case_attack(case)
        takes = asr is not None and asr >= TOOK
        in_time = (case.get("run") or {}).get("finished_at", "") <= deadline
        figures = (new["auroc"], old["auroc"], new["tpr_at_1pct_fpr"], old["tpr_at_1pct_fpr"])
        if takes and label == test and in_time:
            counted.append(figures)
        if takes:
            fprs = (new["id"]["realised_fpr"], old["id"]["realised_fpr"], case["n"]["clean_test"])
            guarded.append((name, *figures, *fprs))
        shown = f"{100 * asr:.1f}% ({source})" if asr is not None else source
        late = "" if in_time or label == "guard" else " (scored after the deadline)"
        rows.append(
            f"| {name} | {label} | {shown} | {'yes' if takes and (in_time or label == 'guard') else 'no'}{late} | "
            f"{new['auroc']:.3f} | {old['auroc']:.3f} | {100 * figures[2]:.1f}% | {100 * figures[3]:.1f}% |"
        )
    demo = {r: json.loads(p.read_text()) for r, p in EIGHTH_DEMO_FIGURES.items() if p.exists()}
    if len(demo) == 2:
        new_m, old_m = demo["calibrated"]["metrics"], demo["max_all"]["metrics"]
        rows.append(
            f"| demo bundle | guard | plain BadEncoder | yes | {new_m['auroc']:.3f} | {old_m['auroc']:.3f} | "
            f"{100 * new_m['tpr_at_1pct_fpr']:.1f}% | {100 * old_m['tpr_at_1pct_fpr']:.1f}% |"
        )
        figures = (new_m["auroc"], old_m["auroc"], new_m["tpr_at_1pct_fpr"], old_m["tpr_at_1pct_fpr"])
        guarded.append(("demo bundle", *figures, None, None, None))
    return rows, counted, guarded


def ninth_decision(results: dict) -> list[str]:
    """The eighth test's candidate against max_all at one false-alarm rate: the new SimCLR and CLIP
    attacks counted, every case measured under both rules whose attack took and the demo as the guard."""
    rows, counted, guarded = _one_rate_rows(
        results, NINTH_TEST, "ninth", NINTH_DEADLINE, lambda _, case: case["methods"].get(MAX_ALL_CALIBRATED)
    )
    verdict, conditions = ninth_verdict(counted, [g[:7] for g in guarded])
    if not any(g[0] == "demo bundle" for g in guarded):
        conditions.append("- the demo bundle not measured under both: **the guard is incomplete**")
        verdict = "auxiliary"
    new, old = "calibrated", "max_all"
    return [
        "## The ninth test, applied",
        "",
        "The eighth test's candidate (`max_all` with each depth's median and MAD set on the calibration images "
        "that set each threshold) against `max_all` as shipped, every TPR read at 1% FPR on the 2,000 clean test "
        "images, on SimCLR and CLIP attacks trained after the test was fixed (benchmarks/detection/README.md, "
        '"A ninth test"; counted at probe or zero-shot ASR >= 40%, scored by '
        f"{NINTH_DEADLINE[:16].replace('T', ' ')} UTC). The guard is every case measured under both rules whose "
        "attack took, and the demo bundle. Verdict: where the statistics come from.",
        "",
        f"| case | test | ASR | counted | AUROC {new} | AUROC {old} | TPR at 1% FPR {new} | TPR at 1% FPR {old} |",
        "| --- | --- | ---: | :---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"Over {len(counted)} counted:",
        *conditions,
        "",
        f"**Verdict: {verdict}.**",
        "",
    ]


# The tenth test (README, fixed 2026-12-07 17:13 UTC before its attacks were trained): the eighth
# test's candidate gated by the calibration images' depth shift (`dede calibrate --standardise-on
# auto`), the FPR read against its noise.
TENTH_TEST = ("clip_norm_preserving_blend", "clip_badencoder_blend")
TENTH_DEADLINE = "2026-12-07T20:00:00+00:00"  # a new case counts if scored by then


def _tenth_candidate(name: str, case: dict) -> dict | None:
    """The gated candidate's entry; a case scored before the test has none, and the eighth test's
    candidate stands in for it (the gate open: the reading where the two rules can differ). A new
    case must have its own."""
    methods = case["methods"]
    if MAX_ALL_AUTO in methods or name in TENTH_TEST:
        return methods.get(MAX_ALL_AUTO)
    return methods.get(MAX_ALL_CALIBRATED)


def fpr_noise_condition(cases: list[tuple]) -> tuple[str, bool]:
    """The tenth test's FPR condition, from the cases' (name, four figures, realised FPR at the id
    threshold new, old, clean test images; None for the demo): on none is the candidate's false-alarm
    count's Wilson 95% interval wholly above max_all's."""
    over = []
    for name, _, _, _, _, f_new, f_old, n in cases:
        if f_new is None:
            continue
        new_low = wilson_interval(round(f_new * n), n)[0]
        old_high = wilson_interval(round(f_old * n), n)[1]
        if new_low > old_high:
            over.append(f"{name} ({100 * f_new:.2f}% against {100 * f_old:.2f}%)")
    return (
        "realised FPR at the id threshold nowhere above max_all's beyond their noise (Wilson 95% intervals "
        f"on the clean test images apart, {len(cases)} cases)"
        + (f": above on {', '.join(over)}" if over else ""),
        not over,
    )


def tenth_verdict(
    counted: list[tuple[float, float, float, float]], guarded: list[tuple]
) -> tuple[str, list[str]]:
    """(`dede calibrate --standardise-on`'s default, the conditions' lines) from the counted cases'
    (AUROC auto, AUROC max_all, TPR at 1% FPR auto, the same max_all) and the guarded cases' (name,
    the same four, realised FPR at the id threshold auto, max_all, clean test images)."""
    return _one_rate_verdict(counted, guarded, fpr_noise_condition(guarded), "auto")


def tenth_decision(results: dict) -> list[str]:
    """The gated candidate against max_all at one false-alarm rate: the new CLIP fine-tunes counted,
    every case measured under both rules whose attack took and the demo as the guard."""
    rows, counted, guarded = _one_rate_rows(results, TENTH_TEST, "tenth", TENTH_DEADLINE, _tenth_candidate)
    verdict, conditions = tenth_verdict(counted, guarded)
    if not any(g[0] == "demo bundle" for g in guarded):
        conditions.append("- the demo bundle not measured under both: **the guard is incomplete**")
        verdict = "auxiliary"
    gates = []
    for name in TENTH_TEST:
        entry = (results["cases"].get(name) or {}).get("methods", {}).get(MAX_ALL_AUTO)
        if entry:
            gates.append(
                f"- {name}: the id calibration images' widest depth shift {entry['widest_shift']['id']:+.2f} units, "
                "statistics from the "
                f"{entry['standardised_on']['id']} images"
            )
    new, old = "auto", "max_all"
    return [
        "## The tenth test, applied",
        "",
        "`dede calibrate --standardise-on auto` (each depth standardised on the calibration images where their "
        f"widest median shift in the auxiliary units reaches {SHIFT_NOTE_UNITS:g}, else the auxiliary statistics) "
        "against `max_all` as shipped, every TPR read at 1% FPR on the 2,000 clean test images, on CLIP fine-tunes "
        'trained after the test was fixed (benchmarks/detection/README.md, "A tenth test"; counted at zero-shot '
        f"ASR >= 40%, scored by {TENTH_DEADLINE[:16].replace('T', ' ')} UTC). The guard is every case measured under "
        "both rules whose attack took (cases scored before the test: the eighth test's candidate, the gate open) "
        "and the demo bundle. Verdict: `dede calibrate`'s default.",
        "",
        f"| case | test | ASR | counted | AUROC {new} | AUROC {old} | TPR at 1% FPR {new} | TPR at 1% FPR {old} |",
        "| --- | --- | ---: | :---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        *gates,
        *([""] if gates else []),
        f"Over {len(counted)} counted:",
        *conditions,
        "",
        f"**Verdict: {verdict}.**",
        "",
    ]


def decision(results: dict) -> list[str]:
    """The two decisions fixed before their runs (benchmarks/detection/README.md), applied.
    First run: max_all replaces mean_stages iff, over the cases whose attack took, its worst AUROC is
    above mean_stages's worst and it is nowhere more than 0.01 below. Second test, on held-out
    attacks: iff its mean AUROC over them is above and it is nowhere more than 0.01 below."""
    tests: dict[str, list] = {"first": [], "held_out": []}
    rows = []
    for name, case in results["cases"].items():
        if name.startswith(HELD_OUT_CHECK_PREFIX):
            continue  # no decision rides on the held-out check (its own section)
        methods = case["methods"]
        by_rule = {r: next((m for m in methods if m.startswith(r)), None) for r in (MAX_ALL, MEAN_STAGES)}
        if None in by_rule.values():
            continue
        asr, source = _probe_asr(case["encoder"])
        takes = asr is not None and asr >= TOOK
        new, old = methods[by_rule[MAX_ALL]]["auroc"], methods[by_rule[MEAN_STAGES]]["auroc"]
        tpr = [100 * methods[by_rule[r]][k]["tpr"] for r in (MAX_ALL, MEAN_STAGES) for k in ("id", "ood")]
        if name in THIRD_TEST:
            continue  # the third test's own section
        test = "held_out" if name in HELD_OUT else "first"
        if takes:
            tests[test].append((new, old))
        asr_text = f"{100 * asr:.1f}% ({source})" if asr is not None else source
        rows.append(
            f"| {name} | {test.replace('_', '-')} | {asr_text} | {'yes' if takes else 'no'} | {new:.3f} | {old:.3f} "
            f"| {tpr[0]:.1f}% / {tpr[1]:.1f}% | {tpr[2]:.1f}% / {tpr[3]:.1f}% |"
        )
    if not rows:
        return []
    lines = [
        "## The decisions fixed before the runs, applied",
        "",
        "`max_all` (the pixels at four scales and the stages, max of robust z-scores) against `mean_stages` "
        "(the stages alone, mean). Counted: cases whose attack took (probe ASR >= 40%). The first run's "
        "rule: `max_all` ships iff its worst counted AUROC is above `mean_stages`'s worst and it is on no "
        "case more than 0.01 below. The second test, on the lab-hard attacks never run before "
        "(benchmarks/detection/README.md): iff its mean counted AUROC is above and it is on no case more "
        "than 0.01 below.",
        "",
        "| case | test | probe ASR | counted | AUROC max_all | AUROC mean_stages | TPR id / ood max_all "
        "| TPR id / ood mean_stages |",
        "| --- | --- | ---: | :---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
    ]
    for test, pairs in tests.items():
        if not pairs:
            lines.append(f"- {test.replace('_', '-')}: no counted case.")
            continue
        below = sum(o - n > DECISION_TOLERANCE for n, o in pairs)
        if test == "first":
            a, b, what = min(n for n, _ in pairs), min(o for _, o in pairs), "worst"
        else:
            a, b, what = float(np.mean([n for n, _ in pairs])), float(np.mean([o for _, o in pairs])), "mean"
        verdict = "max_all" if a > b and not below else "mean_stages"
        lines.append(
            f"- {test.replace('_', '-')} ({len(pairs)} counted): {what} AUROC max_all {a:.3f}, mean_stages "
            f"{b:.3f}; cases more than 0.01 below: {below}. **Verdict: {verdict}.**"
        )
    return [*lines, ""]


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _method(methods: dict, prefix: str) -> dict | None:
    name = next((m for m in methods if m.startswith(prefix)), None)
    return methods[name] if name else None


def _tpr_fpr(method: dict, key: str) -> str:
    """TPR / realised FPR at one threshold; '-' where the case was measured before it existed."""
    at = method.get(key)
    return f"{100 * at['tpr']:.1f}% / {100 * at['realised_fpr']:.1f}%" if at else "-"


def check_section(results: dict, prefix: str) -> list[str]:
    """The shipped score (`max_all`) on the cases named `prefix`*, against the issue's goals; beside it
    the sixth test's withheld rule (`max_all_both`) where measured."""
    cases = {n: c for n, c in results["cases"].items() if n.startswith(prefix)}
    if not cases:
        return []
    rows, verdicts = [], []
    for name, case in cases.items():
        methods = case["methods"]
        shipped, sse = _method(methods, MAX_ALL), _method(methods, "dede_sse")
        if shipped is None or sse is None:
            continue
        asr, ba, source = _case_attack(case)
        takes = asr is not None and asr >= TOOK
        cues = {m: v["auroc"] for m, v in methods.items() if m.startswith(BASELINE_PREFIXES)}
        cue, cue_auroc = max(cues.items(), key=lambda kv: max(kv[1], 1 - kv[1]))
        cue_strength = max(cue_auroc, 1 - cue_auroc)
        if ba is None:
            attack = source
        elif asr is None:
            attack = f"{source}, BA {100 * ba:.1f}%"
        else:
            attack = f"{100 * asr:.1f}% / {100 * ba:.1f}%"
        both = _method(methods, MAX_ALL_BOTH)
        both_shown = f"{both['auroc']:.3f}, {_tpr_fpr(both, 'id')}" if both else "not measured"
        calibrated = methods.get(MAX_ALL_CALIBRATED)
        calibrated_shown = (
            f"{calibrated['auroc']:.3f}, {_tpr_fpr(calibrated, 'id')}" if calibrated else "not measured"
        )
        rows.append(
            f"| {name} | {attack} | {shipped['auroc']:.3f} | {100 * shipped['id']['tpr']:.1f}% / "
            f"{100 * shipped['id']['realised_fpr']:.1f}% | {100 * shipped['ood']['tpr']:.1f}% / "
            f"{100 * shipped['ood']['realised_fpr']:.1f}% | {_tpr_fpr(shipped, 'ood_holdout')} | "
            f"{_pct(shipped.get('tpr_at_1pct_fpr'))} | "
            f"{sse['auroc']:.3f} | {cue} {cue_auroc:.3f} | {both_shown} | {calibrated_shown} |"
        )
        if source == "the clean control":
            verdicts.append(
                f"- {name}: the clean control; AUROC {shipped['auroc']:.3f} is the score's reaction to the "
                f"trigger's pixels alone; realised FPR {100 * shipped['id']['realised_fpr']:.1f}% at the id "
                f"threshold, {100 * shipped['ood']['realised_fpr']:.1f}% at the ood one"
                + (
                    f", {100 * shipped['ood_holdout']['realised_fpr']:.1f}% at the held-out auxiliary one."
                    if "ood_holdout" in shipped
                    else "."
                )
            )
            continue
        if not takes:
            kind = "zero-shot ASR" if "attack" in case else "probe ASR"
            why = source if asr is None else f"{kind} {100 * asr:.1f}%, below {100 * TOOK:.0f}%"
            verdicts.append(f"- {name}: the attack did not take ({why}): no goal read.")
            continue
        checks = {
            f"AUROC >= {GOAL_AUROC}": shipped["auroc"] >= GOAL_AUROC,
            f"TPR id >= {100 * GOAL_TPR_ID:.0f}% at FPR <= {100 * GOAL_FPR_ID:.1f}%": shipped["id"]["tpr"]
            >= GOAL_TPR_ID
            and shipped["id"]["realised_fpr"] <= GOAL_FPR_ID,
            f"TPR ood >= {100 * GOAL_TPR_OOD:.0f}% at FPR <= {100 * GOAL_FPR_OOD:.0f}%": shipped["ood"]["tpr"]
            >= GOAL_TPR_OOD
            and shipped["ood"]["realised_fpr"] <= GOAL_FPR_OOD,
            **(
                {
                    f"TPR ood held-out aux >= {100 * GOAL_TPR_OOD:.0f}% at FPR <= {100 * GOAL_FPR_OOD:.0f}%": (
                        shipped["ood_holdout"]["tpr"] >= GOAL_TPR_OOD
                        and shipped["ood_holdout"]["realised_fpr"] <= GOAL_FPR_OOD
                    )
                }
                if "ood_holdout" in shipped
                else {}
            ),
            f"ahead of every baseline ({shipped['auroc'] - cue_strength:+.4f})": shipped["auroc"]
            > cue_strength,
        }
        verdicts.append(
            f"- {name}: "
            + "; ".join(f"{goal} {'met' if ok else '**missed**'}" for goal, ok in checks.items())
            + "."
        )
    title, intro = CHECK_SECTIONS[prefix]
    return [
        f"## {title}",
        "",
        intro,
        "",
        "| case | attack ASR / BA | AUROC max_all | TPR / FPR id | TPR / FPR ood (crops) "
        "| TPR / FPR ood (held-out aux) | TPR@1%FPR | AUROC pixel sse | strongest decoder-free cue "
        "| max_all_both: AUROC, TPR / FPR id | calibration statistics: AUROC, TPR / FPR id |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
        *rows,
        "",
        *verdicts,
        "",
    ]


# The check sections of the report: cases named <prefix>*, their heading and what they are.
CHECK_SECTIONS = {
    HELD_OUT_CHECK_PREFIX: (
        "The held-out check",
        "The shipped score (`max_all`; beside it, where measured, the sixth test's withheld rule "
        "`max_all_both` and `max_all` standardised on the calibration images, the eighth test's candidate) on attacks it was never run on, fixed before they were trained "
        '(benchmarks/detection/README.md, "A held-out check"): the lab-heldout suite\'s attacks '
        "(`heldout/REPORT.md`), each scored once. No decision rides on them. Attack: probe ASR / BA "
        "(`heldout/results.json`). The strongest cue is the decoder-free baseline farthest from 0.5 (an "
        "AUROC far below 0.5 separates with the opposite sign).",
    ),
    CLIP_CHECK_PREFIX: (
        "The CLIP check",
        "The shipped score (`max_all`; beside it, where measured, `max_all_both` and `max_all` standardised on "
        "the calibration images) on CLIP image "
        "towers, fixed before they were trained "
        '(benchmarks/detection/README.md, "A CLIP check"): the CLIP suite\'s clean CLIP (the control), '
        "its data-poisoned CLIP, and the BadEncoder and norm-preserving fine-tunes of the clean tower, "
        "64 px, each scored once with the README's workflow (the fit on the 2,000 Tiny-ImageNet images "
        "at 64 px; CIFAR-10 test images resized to 64 px). No decision rides on them. Attack: zero-shot "
        "ASR / BA on CIFAR-10 test, recorded in each case's result. The strongest cue is the "
        "decoder-free baseline farthest from 0.5.",
    ),
}


def report(results: dict) -> str:
    lines = [
        "# The shipped detector on backdoored encoders",
        "",
        f"Made by `{results.get('command', '')}` at commit `{results.get('commit', '')}`"
        f"{' (with uncommitted changes)' if results.get('dirty') else ''} on "
        f"{results.get('machine', {}).get('cpu', '')} ({results.get('machine', {}).get('cores', '')} cores), "
        f"finished {results.get('finished_at', '')}, load average at the end {results.get('load_average')} "
        "(the machine was shared: wall-clock fit budgets then buy fewer steps). "
        "Every DeDe figure comes through the exported bundle "
        "(ONNX Runtime); the fit is `dede fit`'s defaults on 2,000 Tiny-ImageNet images. Calibration at 1% FPR: "
        "*ood* on clean Tiny-ImageNet crops, *ood held-out aux* on the fit's own held-out Tiny-ImageNet images (`dede calibrate --holdout`), *id* on clean CIFAR-10 train, *unl. x%* robust on an unlabelled CIFAR-10 "
        "sample with x% triggered (the trimmed quantile, set on half the sample; `dede calibrate --unlabelled` "
        "sets the tail_shape threshold since its rule test, figures in `unlabelled_tail.json`). TPR / realised FPR on 2,000 clean and 2,000 triggered CIFAR-10 test images. "
        "Every CIFAR-10 subset is drawn at random (`case_data`; the data sets are sorted by class). Cases "
        "marked *class-sorted split* were measured before that: their id threshold came from 1,000 "
        "airplanes (the target class), their test images were automobiles and birds; the figures of every "
        "case before the fix are `results.json` at commit 8765d5b. Since the tenth test `dede calibrate` "
        "standardises the depths by `--standardise-on auto`: what it ships is `dede_depths_auto_z_max` "
        "(scored from the tenth test's cases on); `(shipped)` marks the bundle's own graph, calibrated on the "
        "auxiliary statistics by name so that every case reads the same `max_all`, and is the shipped score "
        "wherever the gate stays shut.",
        "",
    ]
    lines += decision(results)
    lines += third_decision(results)
    lines += fourth_decision(results)
    lines += fifth_decision(results)
    lines += sixth_decision(results)
    lines += seventh_decision(results)
    lines += eighth_decision(results)
    lines += ninth_decision(results)
    lines += tenth_decision(results)
    for prefix in CHECK_SECTIONS:
        lines += check_section(results, prefix)
    for name, case in results["cases"].items():
        fit = case.get("fit") or {}
        run = case.get("run")
        made = (
            f"Made by `{run['command']}` at `{run['commit'][:12]}`, finished {run['finished_at']}, load "
            f"average {run['load_average']}. "
            if run
            else ""
        )
        lines += [
            f"## {name}",
            "",
            made
            + f"Encoder `{case['encoder']}`, trigger `{case['trigger']}`, decoder `{case.get('preset')}`. "
            f"Fit: {fit.get('steps')} steps in "
            f"{fit.get('minutes', case['fit_wall_seconds'] / 60):.1f} min, stopped by {fit.get('stop_reason')}, best validation loss "
            f"{fit.get('best_val_loss', float('nan')):.4f}; feature stages {case['feature_stages']}; export parity "
            f"{case['bundle_parity'].get('max_relative_diff_ort_vs_torch', float('nan')):.1e}."
            + (
                ""
                if case.get("split") == SPLIT
                else " *Class-sorted split*: measured before the random split and not rerun since."
            ),
            "",
            "| method | AUROC | AUPRC | TPR / FPR ood | ood held-out aux | TPR / FPR id | TPR / FPR unl. 0% "
            "| unl. 1% | unl. 5% |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for method, m in case["methods"].items():
            cells = [f"{m['auroc']:.3f}", f"{m['auprc']:.3f}"]
            for key in ("ood", "ood_holdout", "id", "unlabelled_0pct", "unlabelled_1pct", "unlabelled_5pct"):
                cells.append(_tpr_fpr(m, key))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
