"""The lab's report: results.json (every figure) and REPORT.md with its small PNG figures.

Everything here reads cached stage results and score arrays; nothing is trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lab.figures import fmt, pct, roc_figure, score_histogram, write_report_files

if TYPE_CHECKING:
    from lab.suite import Lab

# The shipped-detector issue's goals on the lab's attacks, OOD auxiliary data, the default score:
# AUROC, and the TPR at the threshold set on clean OOD images alone, at a realised FPR of at most 2%.
GOALS = {
    "badencoder": {"auroc": 0.99, "calibrated_tpr": 0.90},
    "norm_preserving": {"auroc": 0.99, "calibrated_tpr": 0.90},
    "drupe": {"auroc": 0.99, "calibrated_tpr": 0.90},
    "ctrl": {"auroc": 0.99, "calibrated_tpr": 0.90},
}
GOAL_MAX_REALISED_FPR = 0.02
TOOK = 0.40  # probe ASR from which an attack counts (as in benchmarks/detection/shipped.py)
SHIPPED_METHOD = "dede_shipped"


def default_dede_method(lab: Lab) -> str:
    """The score the report is read on: the shipped detector where the suite measures it, else the
    method's own pixel score of the suite's decoder."""
    return SHIPPED_METHOD if lab.config.shipped_detections else f"dede_{lab.config.decoder_preset}_sse"


def write_report(lab: Lab, results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = _figures(lab, results, out_dir)
    write_report_files(out_dir, results, _markdown(lab, results, figures))


# ----------------------------------------------------------------------------------------------
# Figures.
# ----------------------------------------------------------------------------------------------


def _figures(lab: Lab, results: dict, out_dir: Path) -> dict[str, list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, list[str]] = {}
    for key in results["detection"]:
        name, aux = key.split("/")
        scores = lab.load_scores(name, aux)
        roc = f"roc_{name}_{aux}.png"
        roc_figure(plt, scores, f"ROC {name} / {aux}", out_dir / roc)
        made[key] = [roc]
        method = default_dede_method(lab)
        if method in scores:
            hist = f"hist_{name}_{aux}.png"
            threshold = results["detection"][key][method]["calibrated"]["threshold"]
            score_histogram(plt, scores[method], threshold, method, f"{name} / {aux}", out_dir / hist)
            made[key].append(hist)
    grid = _reconstruction_grid(lab, results, out_dir, plt)
    if grid:
        made["grid"] = [grid]
    return made


def _reconstruction_grid(lab: Lab, results: dict, out_dir: Path, plt) -> str | None:  # noqa: ANN001
    """Input / rebuild / |difference| for a few clean and triggered test images of one attack."""
    import torch

    from training.fit import load_run

    for key in ("badencoder/ood", *results["detection"]):
        name, aux = key.split("/")
        run_dir = lab.decoder_dir(name, aux, lab.config.decoder_preset)
        if key in results["detection"] and (run_dir / "decoder.safetensors").is_file():
            break
    else:
        return None
    fitted = load_run(run_dir)
    clean, triggered, non_target = lab.test_sets(name)
    picks = np.arange(6)
    images = np.concatenate([clean[non_target[picks]], triggered[picks]])
    with torch.no_grad():
        scores, rebuilt = fitted.detector("sse")(torch.from_numpy(images))
    mean = torch.tensor(fitted.encoder.mean).view(1, 3, 1, 1)
    std = torch.tensor(fitted.encoder.std).view(1, 3, 1, 1)
    rebuilt = (rebuilt * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    inputs = images.transpose(0, 2, 3, 1) / 255.0
    diff = np.abs(inputs - rebuilt).mean(axis=3)
    fig, axes = plt.subplots(3, len(images), figsize=(len(images) * 0.9, 3.0), dpi=50)
    for i in range(len(images)):
        for row, (img, cmap) in enumerate(((inputs[i], None), (rebuilt[i], None), (diff[i], "magma"))):
            axes[row, i].imshow(img, cmap=cmap, vmin=0, vmax=1 if cmap is None else 0.5)
            axes[row, i].axis("off")
        axes[0, i].set_title(("clean" if i < len(picks) else "trig") + f"\n{scores[i]:.0f}", fontsize=6)
    fig.suptitle(f"{name} / {aux}: input, rebuild, |difference| (score above)", fontsize=7)
    fig.tight_layout()
    path = f"reconstructions_{name}_{aux}.png"
    fig.savefig(out_dir / path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------------------------


def _markdown(lab: Lab, results: dict, figures: dict[str, list[str]]) -> str:
    c = lab.config
    lines = [
        f"# Detection lab report (suite `{c.name}`)",
        "",
        f"Made by `dede lab run --suite {c.name}` (figures rebuilt from the cache by `dede lab report "
        f"--suite {c.name}`); every number below is in `results.json` beside this file.",
        f"Commit `{results['commit'][:12]}`, {results['machine']['platform']}, torch {results['machine']['torch']}, "
        f"{results['machine']['threads']} threads, device {results['machine']['device']}; seed {c.seed}.",
        "",
        "Setup: CIFAR-style ResNet-18 (base width "
        f"{c.width}) pre-trained with SimCLR on CIFAR-10 train ({c.simclr_epochs} epochs, {c.simclr_crop or 32} px views); "
        f"attacks target class {c.target_class} (airplane); triggers applied in pixel space. DeDe decoder preset "
        f"`{c.decoder_preset}`, {c.decoder_epochs} epochs. Test: CIFAR-10 test, clean vs triggered images of "
        "the other classes. Every threshold is calibrated on clean auxiliary images only "
        f"(target FPR {c.fpr_target:.0%}); `realised FPR` is measured on clean CIFAR-10 test.",
        "",
        "## Encoders and attacks",
        "",
        "| encoder | kNN top-1 | CIFAR-10 BA | CIFAR-10 ASR | GTSRB BA | GTSRB ASR | training compute |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in results["encoders"].items():
        training = entry.get("training", {})
        probe = entry.get("probe", {})
        cifar, gtsrb = probe.get("cifar10", {}), probe.get("gtsrb", {})
        knn = training.get("final_knn_top1")
        lines.append(
            f"| {name} | {pct(knn) if knn is not None else '-'} | {pct(cifar.get('ba'))} | {pct(cifar.get('asr'))} | "
            f"{pct(gtsrb.get('ba'))} | {pct(gtsrb.get('asr'))} | {fmt(training.get('compute_seconds'), 0)} s |"
        )
    lines += [
        "",
        "ASR on the clean encoder is the base rate of the probe putting triggered images in the target class. "
        "GTSRB has no airplane class: its ASR counts triggered images sent to the class the attack's reference "
        "images fall in.",
        "",
        "## Detection",
        "",
    ]
    default = default_dede_method(lab)
    for key, per_method in results["detection"].items():
        name, aux = key.split("/")
        lines += [
            f"### {name}, auxiliary data `{aux}`"
            + (" (clean encoder: false alarms only)" if name == "clean" else ""),
            "",
            "| method | AUROC | AUPRC | TPR@1%FPR | TPR@5%FPR | calibrated TPR | realised FPR | BA before/after | ASR before/after |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for method, m in sorted(per_method.items(), key=lambda kv: (not kv[0].startswith("dede"), kv[0])):
            cal, down = m["calibrated"], m.get("downstream_cifar10", {})
            label = f"**{method}**" if method == default else method
            lines.append(
                f"| {label} | {fmt(m['auroc'])} | {fmt(m['auprc'])} | {pct(m['tpr_at_fpr_0.01'])} | "
                f"{pct(m['tpr_at_fpr_0.05'])} | {pct(cal['tpr_triggered_test'])} | "
                f"{pct(cal['realised_fpr_clean_test'])} | {pct(down.get('ba_before'))} / {pct(down.get('ba_after'))} | "
                f"{pct(down.get('asr_before'))} / {pct(down.get('asr_after'))} |"
            )
        lines.append("")
        for figure in figures.get(key, []):
            lines.append(f"![{figure}]({figure})")
        lines.append("")
    if "grid" in figures:
        lines += ["### Reconstructions", "", f"![reconstructions]({figures['grid'][0]})", ""]
    lines += _shipped_lines(lab, results)
    lines += _variant_lines(results, default)
    lines += _goal_lines(results, default)
    lines += [
        "",
        "## Wall time per stage (seconds)",
        "",
        "| stage | wall | compute (own epochs) |",
        "| --- | --- | --- |",
    ]
    for stage, seconds in results["stage_wall_seconds"].items():
        lines.append(f"| {stage} | {seconds:.0f} | {fmt(results['stage_compute_seconds'].get(stage), 0)} |")
    lines += ["", "## Did not run", ""]
    lines += [f"- {item}" for item in results["not_run"]] or ["- nothing: every stage of the suite ran"]
    return "\n".join(lines) + "\n"


def _shipped_lines(lab: Lab, results: dict) -> list[str]:
    """What `dede_shipped` is, per (encoder, aux): the fit's stop, the score's rule, the parity, and
    its figures at both OOD-only thresholds."""
    rows = []
    for name, aux in lab.config.shipped_detections:
        stage = lab.cache.load(f"shipped_{name}_{aux}")
        if stage is None:
            continue
        r, fit = stage["result"], stage["result"].get("fit") or {}
        standardisation = r.get("standardisation") or {}
        m = results["detection"].get(f"{name}/{aux}", {}).get(SHIPPED_METHOD, {})
        at = [
            f"{pct(t['tpr_triggered_test'])} / {pct(t['realised_fpr_clean_test'])}" if t else "-"
            for t in (m.get("calibrated"), m.get("calibrated_holdout"))
        ]
        rows.append(
            f"| {name} / {aux} | {r['preset']} | `{r['score']}` | {r['n_fit_images']} | "
            f"{fit.get('steps', '-')} | {fit.get('stop_reason', '-')} | {fmt(r['fit_seconds'], 0)} s | "
            f"{standardisation.get('on', '-')} | {_sci(r['parity'].get('max_relative_diff_ort_vs_torch'))} | "
            f"{fmt(m.get('auroc'))} | {at[0]} | {at[1]} |"
        )
    if not rows:
        return []
    return [
        "## The shipped detector (`dede_shipped`)",
        "",
        "`dede fit`, `dede calibrate` and `dede export` with their defaults, as the README runs them: the "
        f"decoder fitted on the first {lab.config.shipped_fit_images:,} auxiliary source images (all, where "
        "fewer; each once, no extra views), "
        "calibrated on the suite's clean calibration images, exported; every `dede_shipped` figure comes "
        "from the exported ONNX graph (ONNX Runtime, CPU). Its threshold in the tables below is set on the "
        "same calibration images as every other method's (the suite's OOD calibration set: Tiny-ImageNet "
        "images resized and their native 32 px quadrants); beside it, the threshold `dede calibrate "
        "--holdout` sets on the fit's own held-out auxiliary images (the paper's setting). TPR / realised "
        "FPR on the clean and triggered CIFAR-10 test images, target FPR 1%.",
        "",
        "| encoder / aux | decoder | score | fit images | steps | stopped because | fit wall | "
        "depth statistics | ONNX vs PyTorch (max relative difference) | AUROC | TPR / FPR, suite's OOD "
        "calibration set | TPR / FPR, held-out auxiliary images |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
    ]


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def _goal_lines(results: dict, default: str) -> list[str]:
    lines = [
        f"## Goals (OOD auxiliary data, default score `{default}`)",
        "",
        "The shipped-detector issue's: AUROC >= 0.99 and, at the threshold set on clean OOD images alone, "
        f"TPR >= 90% at a realised FPR of at most {GOAL_MAX_REALISED_FPR:.0%}; read where the attack took "
        f"(probe ASR >= {TOOK:.0%}).",
        "",
    ]
    for attack, goals in GOALS.items():
        metrics = results["detection"].get(f"{attack}/ood", {}).get(default)
        if metrics is None:
            lines.append(f"- {attack}: not measured")
            continue
        asr = results["encoders"].get(attack, {}).get("probe", {}).get("cifar10", {}).get("asr")
        if asr is not None and asr < TOOK:
            lines.append(
                f"- {attack}: the attack did not take (probe ASR {asr:.1%}): no goal read; "
                f"AUROC {metrics['auroc']:.3f}"
            )
            continue
        parts = []
        for goal, minimum in goals.items():
            cal = metrics["calibrated"]
            value = metrics["auroc"] if goal == "auroc" else cal["tpr_triggered_test"]
            met = value >= minimum
            if goal != "auroc":
                met = met and cal["realised_fpr_clean_test"] <= GOAL_MAX_REALISED_FPR
            parts.append(
                f"{goal} {value:.3f}"
                + ("" if goal == "auroc" else f" at realised FPR {cal['realised_fpr_clean_test']:.3f}")
                + f" (goal >= {minimum}: {'met' if met else 'MISSED'})"
            )
            if goal != "auroc" and "calibrated_holdout" in metrics:
                held = metrics["calibrated_holdout"]
                met = (
                    held["tpr_triggered_test"] >= minimum
                    and held["realised_fpr_clean_test"] <= GOAL_MAX_REALISED_FPR
                )
                parts.append(
                    f"at the held-out auxiliary threshold {held['tpr_triggered_test']:.3f} at realised FPR "
                    f"{held['realised_fpr_clean_test']:.3f} ({'met' if met else 'MISSED'})"
                )
        others = {
            m: v["auroc"]
            for m, v in results["detection"][f"{attack}/ood"].items()
            if not m.startswith("dede")
        }
        best_other = max(others.items(), key=lambda kv: kv[1]) if others else None
        if best_other:
            ahead = metrics["auroc"] > best_other[1]
            parts.append(
                f"best baseline {best_other[0]} AUROC {best_other[1]:.3f} ({'DeDe ahead' if ahead else 'DeDe NOT ahead'})"
            )
        variants = {m: v for m, v in results["detection"][f"{attack}/ood"].items() if m.startswith("dede")}
        best_name, best = max(variants.items(), key=lambda kv: kv[1]["auroc"])
        parts.append(
            f"best DeDe variant {best_name} AUROC {best['auroc']:.3f}, calibrated TPR "
            f"{best['calibrated']['tpr_triggered_test']:.3f}"
            + (
                f" ({'ahead of' if best['auroc'] > best_other[1] else 'NOT ahead of'} the baselines)"
                if best_other
                else ""
            )
        )
        lines.append(f"- {attack}: " + "; ".join(parts))
    return lines


def _variant_lines(results: dict, default: str) -> list[str]:
    """Every score side by side (AUROC per attack), and the clean encoder's 'AUROC' as a control:
    on an encoder with no backdoor, separating triggered from clean images means the score reacts
    to the trigger's pixels (a white square is unusual content), not to a backdoor."""
    keys = [k for k in results["detection"] if k.endswith("/ood")] + [
        k for k in results["detection"] if not k.endswith("/ood")
    ]
    methods = sorted(
        {m for k in keys for m in results["detection"][k]}, key=lambda m: (not m.startswith("dede"), m)
    )
    if not keys:
        return []
    lines = [
        "## Score variants side by side (AUROC)",
        "",
        "| method | " + " | ".join(keys) + " |",
        "| --- | " + " | ".join("---" for _ in keys) + " |",
    ]
    for method in methods:
        cells = [fmt(results["detection"][k].get(method, {}).get("auroc")) for k in keys]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    shipped = (
        f"Default: `{default}`, the shipped detector (the section above). The `dede_<preset>_*` rows are "
        "the lab's MAE-style decoders with the method's own pixel score, `sse` (sum of squared errors over "
        "the rebuilt patches), which `dede fit` shipped before the conv decoder and the feature score. "
        if default == SHIPPED_METHOD
        else f"Default: `{default}`, the method's own score (sum of squared errors over the rebuilt patches). "
    )
    lines += [
        "",
        shipped + "`max_patch` (the worst patch's error) is kept as a named option "
        "and shown beside it. `sse_mask90x4` shows the decoder 10% of the patches (the training mask) "
        "instead of none and averages four fixed masks. The `clean/...` column is the control: it uses the same trigger on an encoder "
        "WITHOUT a backdoor, so a high value there means the score reacts to the trigger's pixels, not to the "
        "backdoor; a variant is only better if it is ahead on the attacked encoders without rising on the "
        "clean one. `dede_lab_wide_*`: the same method with a decoder of more capacity (`lab_wide`: width "
        "128, 4 decoder blocks) and `dede_paper_*`: the reference-size decoder (width 192, 12+4 blocks), "
        "both trained for as many epochs as the default, where the suite lists them.",
        "",
        "`dede_lab_feature_<stage>` measures the same discrepancy in the encoder's own feature space: the "
        "squared distance between the encoder's feature maps at that ResNet stage for the input and for its "
        "rebuild (the rebuild still comes from the embedding alone). `activation_norm_<stage>` is the "
        "decoder-free cue it must be read against: the squared norm of the input's feature map at that "
        "stage. Where the activation norm separates about as well, the attack inflates intermediate "
        "activations on triggered inputs (as the plain BadEncoder inflates the embedding's norm), and most "
        "of the feature score's separation is that cue; what the decoder adds shows in the calibrated TPR, "
        "the threshold set on clean out-of-distribution images. Each row reads one stage alone, from the "
        "lab's decoder; the shipped score reads the stages and the pixels together, each standardised on "
        "clean auxiliary images, and takes the max (`dede_shipped`).",
        "",
    ]
    return lines + _trimmed_lines()


def _trimmed_lines() -> list[str]:
    """The trimmed-sum measurement (benchmarks/detection/trimmed_scores.py), when it has been run."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "detection" / "trimmed_scores.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    rows = data["auroc_by_dropped_patches"]
    drops = list(next(iter(rows.values())))
    lines = [
        "### Is the reaction to the trigger local?",
        "",
        f"`{data['run']['command']}` at commit `{data['run']['commit'][:12]}`: AUROC of the sum of per-patch "
        f"errors after dropping each image's k worst of {data['patches_per_image']} patches "
        f"({data['images_each']} clean and triggered test images each, `lab` decoder, OOD auxiliary data).",
        "",
        "| encoder | " + " | ".join(f"k={d}" for d in drops) + " |",
        "| --- | " + " | ".join("---" for _ in drops) + " |",
    ]
    lines += [f"| {name} | " + " | ".join(fmt(row[d]) for d in drops) + " |" for name, row in rows.items()]
    lines += [
        "",
        "Dropping the patches under the trigger changes AUROC by at most about 0.02 and leaves the clean "
        "control near 0.7: a clean encoder's embedding of a patched image moves as a whole, so its rebuild "
        "differs everywhere, not only under the white square. A trimmed sum is therefore not adopted.",
        "",
    ]
    return lines
