"""The cue suites' report (lab-hard): every attack x trigger family, its ASR / BA, and the AUROC of
every decoder-free cue on it, with DeDe's figures where a decoder was fitted.

Reads cached stage results and score arrays only; nothing is trained. A cue with AUROC far below
0.5 separates with the opposite sign, so the cue table gives max(AUROC, 1 - AUROC) ("cue
strength") beside the raw AUROC; the issue's bar (<= 0.75) is read on that strength.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lab.figures import fmt, pct, roc_figure, score_histogram, write_report_files

if TYPE_CHECKING:
    from lab.suite import Lab

CUE_BAR = 0.75  # the goal for every decoder-free cue on the adaptive attack
ASR_BAR, BA_POINTS = 0.90, 3.0
# The cues of the goal, in table order; the activation means are reported beside them.
MAIN_CUES = (
    "embedding_norm",
    "knn_distance",
    "strip",
    "activation_norm_layer1",
    "activation_norm_layer2",
    "activation_norm_layer3",
    "activation_norm_layer4",
)


def cue_strength(auroc: float) -> float:
    return max(auroc, 1 - auroc)


def write_cue_report(lab: Lab, results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = _figures(lab, results, out_dir)
    write_report_files(out_dir, results, _markdown(lab, results, figures))


def _figures(lab: Lab, results: dict, out_dir: Path) -> dict[str, list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, list[str]] = {}
    for name in results["cues"]:
        scores = {m: v for m, v in lab.load_cues(name).items() if m in MAIN_CUES}
        for key in results["detection"]:
            if key.split("/")[0] == name:
                scores.update(
                    {m: v for m, v in lab.load_scores(*key.split("/")).items() if m.startswith("dede")}
                )
        if not results["cues"][name]:
            # A stage marker without its scores (copied from another suite's root, or cleaned away).
            raise ValueError(
                f"the cues of {name} have no scores in {lab.root / 'scores' / 'cues'}: remove its "
                f"stage marker {lab.cache.marker(f'cues_{name}')} and run the suite again to rescore it"
            )
        roc = f"roc_{name}.png"
        roc_figure(plt, scores, f"ROC {name}", out_dir / roc)
        made[name] = [roc]
        strongest = max(results["cues"][name].items(), key=lambda kv: cue_strength(kv[1]["auroc"]))[0]
        hist = f"hist_{name}.png"
        threshold = results["cues"][name][strongest]["calibrated"]["threshold"]
        score_histogram(
            plt,
            scores.get(strongest, lab.load_cues(name)[strongest]),
            threshold,
            strongest,
            name,
            out_dir / hist,
        )
        made[name].append(hist)
    return made


def _overridden_epochs(config: dict) -> str:
    """The attacks whose own settings change the suite's fine-tune epochs, said after them."""
    epochs = {
        name: kv["epochs"] for name, kv in (config.get("attack_settings") or {}).items() if "epochs" in kv
    }
    if not epochs:
        return ""
    return " (" + ", ".join(f"{name} {n}" for name, n in epochs.items()) + " epochs)"


def _ba_asr(entry: dict) -> tuple[float | None, float | None]:
    probe = entry.get("probe", {}).get("cifar10", {})
    return probe.get("ba"), probe.get("asr")


def _markdown(lab: Lab, results: dict, figures: dict[str, list[str]]) -> str:
    c = results["config"]
    clean_ba, _ = _ba_asr(results["encoders"].get("clean", {}))
    lines = [
        f"# Attack families and cues: {results['suite']} report",
        "",
        f"Suite `{results['suite']}`, commit `{results['commit'][:12]}`, machine: "
        f"{results['machine']['platform']} ({results['machine']['processor']}, torch "
        f"{results['machine']['torch']}, {results['machine']['threads']} threads, {results['machine']['device']}).",
        f"Command: `dede lab run --suite {results['suite']}` (rebuild from the cache: `dede lab report "
        f"--suite {results['suite']}`). Every figure below is in `results.json` beside this file.",
        "",
        f"Scale: clean SimCLR encoder {c['arch']} width {c['width']}, {c['simclr_epochs']} epochs on "
        f"{c['simclr_images'] or 'all'} CIFAR-10 train images; fine-tunes {c['attack_epochs']} epochs on "
        f"{c['shadow_images']} shadow images{_overridden_epochs(c)}; probe on {c['probe_train']} labelled images; "
        f"{c['n_test']} CIFAR-10 test images (triggered: the non-target ones). Thresholds are set on "
        f"{c['ood_calibration_sources']} clean Tiny-ImageNet images (x5 views) at FPR {c['fpr_target']}.",
        "",
        "## Attacks: ASR and BA (CIFAR-10 linear probe)",
        "",
        f"Goal: ASR >= {ASR_BAR:.0%}, BA within {BA_POINTS:.0f} points of the clean encoder "
        f"({pct(clean_ba)}).",
        "",
        "| encoder | variant | trigger | BA | ASR | goal | training s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["encoders"].items():
        ba, asr = _ba_asr(entry)
        training = entry.get("training", {})
        met = "-"
        if name != "clean" and ba is not None and asr is not None and clean_ba is not None:
            met = "met" if asr >= ASR_BAR and (clean_ba - ba) * 100 <= BA_POINTS else "missed"
        lines.append(
            f"| {name} | {training.get('variant', '-' if name == 'clean' else 'badencoder')} | "
            f"{entry['trigger']} | {pct(ba)} | {pct(asr)} | {met} | {fmt(training.get('compute_seconds'), 0)} |"
        )
    lines += [
        "",
        "## Cues each attack leaves (decoder-free)",
        "",
        "AUROC of each cue, clean vs triggered CIFAR-10 test images, and in brackets its strength "
        f"max(AUROC, 1 - AUROC) when the cue separates with the opposite sign. Bar for the adaptive "
        f"attack: every cue's strength <= {CUE_BAR}. `clean` is the control: the clean encoder with "
        "the white square.",
        "",
        "| encoder | " + " | ".join(MAIN_CUES) + " | strongest cue |",
        "|---|" + "---|" * (len(MAIN_CUES) + 1),
    ]
    for name, per in results["cues"].items():
        cells = []
        for cue in MAIN_CUES:
            a = per.get(cue, {}).get("auroc")
            cells.append("-" if a is None else (fmt(a) if a >= 0.5 else f"{fmt(a)} ({fmt(1 - a)})"))
        best = max(per.items(), key=lambda kv: cue_strength(kv[1]["auroc"]))
        cells.append(f"{best[0]} {fmt(cue_strength(best[1]['auroc']))}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Activation means per stage (AUROC):", ""]
    means = [f"activation_mean_layer{i}" for i in range(1, 5)]
    lines += ["| encoder | " + " | ".join(means) + " |", "|---|" + "---|" * len(means)]
    for name, per in results["cues"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(per.get(m, {}).get("auroc")) for m in means) + " |")
    hiding = [n for n in results["cues"] if n.split("_")[0] in ("adaptive",) or n.startswith("dede_aware")]
    if hiding:
        lines += ["", "## The cue-hiding attacks against the bar", ""]
        for name in hiding:
            per = results["cues"][name]
            _, asr = _ba_asr(results["encoders"].get(name, {}))
            if asr is None or asr < ASR_BAR:
                lines.append(
                    f"- {name}: the backdoor did not take (ASR {pct(asr)} < {ASR_BAR:.0%}): that its cues "
                    "are low says nothing about a working cue-hiding attack."
                )
                continue
            over = [
                f"{m} {fmt(cue_strength(per[m]['auroc']))}"
                for m in MAIN_CUES
                if m in per and cue_strength(per[m]["auroc"]) > CUE_BAR
            ]
            lines.append(
                f"- {name}: "
                + ("every cue at or under the bar." if not over else "over the bar: " + ", ".join(over) + ".")
            )
    if results["detection"]:
        lines += ["", "## DeDe on the cue-hiding attacks (OOD auxiliary data, lab decoder)", ""]
        lines += [
            "| encoder / aux | method | AUROC | AUPRC | TPR at calibrated threshold | realised FPR |",
            "|---|---|---|---|---|---|",
        ]
        for key, per in results["detection"].items():
            for method, m in sorted(per.items()):
                if method.startswith("dede"):
                    lines.append(
                        f"| {key} | {method} | {fmt(m['auroc'])} | {fmt(m['auprc'])} | "
                        f"{pct(m['calibrated']['tpr_triggered_test'])} | {pct(m['calibrated']['realised_fpr_clean_test'])} |"
                    )
    lines += ["", "## Figures", ""]
    for name, files in figures.items():
        lines.append(f"- {name}: " + ", ".join(f"[{f}]({f})" for f in files))
    if results["not_run"]:
        lines += ["", "## Not run", "", *(f"- {item}" for item in results["not_run"])]
    lines += ["", "## Stage wall times (s)", ""]
    lines += [f"- {k}: {v}" for k, v in results["stage_wall_seconds"].items()]
    return "\n".join(lines) + "\n"
