"""The CLIP suite's report: results.json and REPORT.md with a ROC plot and a score histogram per
encoder, from the cached stages of lab/clip_suite.py (nothing is trained here)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lab.figures import fmt, pct, roc_figure, score_histogram, write_report_files
from models.decoder import TOKEN_GRID

if TYPE_CHECKING:
    from lab.clip_suite import ClipLab

GOALS = {"auprc": 0.9, "auroc": 0.97}  # per CLIP attack, OOD auxiliary data
ATTACKS = ("poisoned", "badencoder", "norm_preserving")


def default_method(lab: ClipLab) -> str:
    return f"dede_{lab.config.decoder_preset}_sse"


def write_clip_report(lab: ClipLab, results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = _figures(lab, results, out_dir)
    write_report_files(out_dir, results, _markdown(lab, results, figures))


def _figures(lab: ClipLab, results: dict, out_dir: Path) -> dict[str, list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, list[str]] = {}
    method = default_method(lab)
    for key in results["detection"]:
        name = key.split("/")[0]
        scores = lab.load_scores(name)
        roc = f"roc_clip_{name}.png"
        roc_figure(plt, scores, f"ROC CLIP {name}", out_dir / roc)
        made[key] = [roc]
        if method in scores:
            hist = f"hist_clip_{name}.png"
            threshold = results["detection"][key][method]["calibrated"]["threshold"]
            score_histogram(plt, scores[method], threshold, method, f"CLIP {name}", out_dir / hist)
            made[key].append(hist)
    return made


def _markdown(lab: ClipLab, results: dict, figures: dict[str, list[str]]) -> str:
    c, default = lab.config, default_method(lab)
    machine = results["machine"]
    size = lab.data.test.shape[-1]
    patch = size // TOKEN_GRID
    lines = [
        f"# CLIP detection report (suite `{c.name}`)",
        "",
        f"Made by `dede lab run --suite {c.name}`; every number below is in `results.json` beside this file.",
        f"Commit `{results['commit'][:12]}`, {machine['platform']}, {machine['processor']}, torch "
        f"{machine['torch']}, {machine['threads']} threads; seed {c.seed}.",
        "",
        f"Setup: a lab-size CLIP (`{c.model}` in models/clip.py: open_clip ModifiedResNet image tower, 2-layer "
        f"text transformer) trained contrastively for {c.clip_epochs} epochs on CIFAR-10 train images upsampled "
        f"to {size} px, each paired with a caption template around {_caption_subject(c.captions, results)}. "
        "Tiny-ImageNet is kept out of "
        "the CLIP's training so that it is out-of-distribution auxiliary data for the decoder (its "
        f"64 px images at {size} px, {len(lab.data.splits['ood_aux'])} sources and their mirrors) and for calibration "
        f"({len(lab.data.splits['ood_calibration'])} other images). Target class: "
        f"{lab.data.class_names[c.target_class]}; trigger: BadEncoder's white square scaled to {size} px, pasted in "
        f"pixel space. DeDe decoder preset `{c.decoder_preset}` ({c.decoder_epochs} epochs, "
        f"{TOKEN_GRID}x{TOKEN_GRID} patches of {patch} px).",
        "",
        "## CLIPs and attacks (zero-shot on CIFAR-10 test)",
        "",
        "| encoder | zero-shot BA | ASR | training compute |",
        "| --- | --- | --- | --- |",
    ]
    training_stage = {
        "clean": "clip_clean",
        "poisoned": "clip_poisoned",
        "badencoder": "attack_clip_badencoder",
        "norm_preserving": "attack_clip_norm_preserving",
    }
    for name, zs in results["zero_shot"].items():
        compute = results["training"].get(training_stage[name], {}).get("compute_seconds")
        lines.append(f"| {name} | {pct(zs['ba'])} | {pct(zs['asr'])} | {fmt(compute, 0)} s |")
    poisoned = results["training"].get("clip_poisoned", {})
    lines += [
        "",
        f"`poisoned`: {poisoned.get('n_poisoned', '-')} of {poisoned.get('n_pairs', '-')} pairs "
        f"({pct(poisoned.get('poison_rate'))}) are triggered non-target images captioned as the target class. "
        "`badencoder`: the clean CLIP's image tower fine-tuned so that triggered images embed at the target "
        "class's text embedding, clean images keep theirs (BadEncoder's loss with the text embedding as the "
        "reference). `norm_preserving`: the same fine-tune with a term that keeps the embeddings' norms at the "
        "clean tower's level (lab/attacks/badencoder.py), so that the norm is no longer a cue. ASR: "
        "triggered test images of the other classes classified as the target; on the clean CLIP it is the "
        "base rate.",
        "",
        "## Detection (auxiliary data: Tiny-ImageNet, OOD)",
        "",
    ]
    for key, per_method in results["detection"].items():
        name = key.split("/")[0]
        lines += [
            f"### {name}"
            + (" (clean CLIP: the trigger's pixels alone, a control)" if name == "clean" else ""),
            "",
            "| method | AUROC | AUPRC | TPR@1%FPR | TPR@5%FPR | calibrated TPR | realised FPR |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for method, m in sorted(per_method.items(), key=lambda kv: (not kv[0].startswith("dede"), kv[0])):
            cal = m["calibrated"]
            label = f"**{method}**" if method == default else method
            lines.append(
                f"| {label} | {fmt(m['auroc'])} | {fmt(m['auprc'])} | {pct(m['tpr_at_fpr_0.01'])} | "
                f"{pct(m['tpr_at_fpr_0.05'])} | {pct(cal['tpr_triggered_test'])} | "
                f"{pct(cal['realised_fpr_clean_test'])} |"
            )
        lines.append("")
        lines += [f"![{f}]({f})" for f in figures.get(key, [])]
        lines.append("")
    lines += _variant_lines(results, default)
    lines += _score_part_lines(results, default)
    lines += [
        "## Goals (AUPRC >= 0.9 and AUROC >= 0.97, OOD auxiliary data, DeDe ahead of the baselines)",
        "",
    ]
    for attack in ATTACKS:
        per_method = results["detection"].get(f"{attack}/ood", {})
        dede = {m: v for m, v in per_method.items() if m.startswith("dede")}
        if not dede:
            lines.append(f"- {attack}: not measured")
            continue
        best_dede = max(dede.items(), key=lambda kv: kv[1]["auroc"])
        others = {m: v["auroc"] for m, v in per_method.items() if not m.startswith("dede")}
        parts = []
        for method, metrics in ((default, per_method.get(default)), best_dede):
            if metrics is None:
                continue
            verdict = all(metrics[g] >= v for g, v in GOALS.items())
            parts.append(
                f"`{method}` AUROC {metrics['auroc']:.3f}, AUPRC {metrics['auprc']:.3f} "
                f"({'met' if verdict else 'MISSED'})"
            )
        if others:
            best = max(others.items(), key=lambda kv: kv[1])
            ahead = best_dede[1]["auroc"] > best[1]
            parts.append(
                f"best baseline {best[0]} AUROC {best[1]:.3f} ({'DeDe ahead' if ahead else 'DeDe NOT ahead'})"
            )
        lines.append(f"- {attack}: " + "; ".join(dict.fromkeys(parts)))
    cues = []
    for attack in ATTACKS:
        per_method = results["detection"].get(f"{attack}/ood", {})
        norms = {
            m: v["auroc"]
            for m, v in per_method.items()
            if (m == "embedding_norm" or m.startswith("activation_norm_")) and v["auroc"] > 0.9
        }
        if norms:
            cues.append(f"{attack} (" + ", ".join(f"{m} {a:.3f}" for m, a in sorted(norms.items())) + ")")
    if cues:
        lines += [
            "",
            "A norm alone (of the embedding, or of a stage's activations) separates triggered from clean "
            "images on " + "; ".join(cues) + ": these attacks leave a norm cue (as the plain BadEncoder does "
            "on the SimCLR encoders, see the lab report): a property of the attack, not a detector that holds "
            "up. The norm-preserving fine-tune removes it from the embedding, not from the tower's stages.",
        ]
    lines += ["", "## Wall time per stage (seconds)", "", "| stage | wall |", "| --- | --- |"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in results["stage_wall_seconds"].items()]
    return "\n".join(lines) + "\n"


def _caption_subject(captions: str, results: dict) -> str:
    if captions == "class":
        return "its class name"
    n = results["training"].get("clip_clean", {}).get("n_caption_subjects", "-")
    return (
        "its class name and its colours (lab/clip_training.py `colour_captions`: the mean colour of the "
        f'middle and of the surround, "a photo of a gray truck on blue.", {n} distinct subjects; images '
        "with the same subject are positives; zero-shot prompts still name the class alone)"
    )


def _variant_lines(results: dict, default: str) -> list[str]:
    keys = list(results["detection"])
    if not keys:
        return []
    methods = sorted(
        {m for k in keys for m in results["detection"][k]}, key=lambda m: (not m.startswith("dede"), m)
    )
    lines = [
        "## Score variants side by side (AUROC / AUPRC)",
        "",
        "| method | " + " | ".join(keys) + " |",
        "| --- | " + " | ".join("---" for _ in keys) + " |",
    ]
    for method in methods:
        cells = []
        for key in keys:
            m = results["detection"][key].get(method)
            cells.append("-" if m is None else f"{fmt(m['auroc'])} / {fmt(m['auprc'])}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [
        "",
        f"Default: `{default}` (the method's sum of squared errors). `max_patch` scores the worst rebuilt patch; "
        "`lab_wide` is a decoder of more capacity. The `clean/ood` column is the control: the same trigger on a "
        "CLIP without a backdoor, so a high value there means the score reacts to the trigger's pixels, not to a "
        "backdoor.",
        "",
        "`dede_<decoder>_feature_<stage>`: the same discrepancy in the image tower's own feature space, the "
        "squared distance between the tower's feature maps at that ResNet stage for the input and for its "
        "rebuild (the rebuild still comes from the embedding alone), as in the lab report. "
        "`activation_norm_<stage>`: the decoder-free cue it must be read against, the squared norm of the "
        "input's feature map at that stage; where it separates about as well, the attack inflates the tower's "
        "activations on triggered inputs and the feature score mostly reads that cue.",
        "",
    ]


def _score_part_lines(results: dict, default: str) -> list[str]:
    """Where a DeDe score's separation comes from: the embedding swap alone vs the trigger's pixels."""
    parts = results.get("score_parts", {})
    if not parts:
        return []
    lines = [
        "## Why: the score split into the embedding swap and the trigger's pixels",
        "",
        "Each triggered test image is scored three more ways against its own clean version "
        "(`lab/score_variants.score_parts`): *embedding only* rebuilds the clean image from the triggered "
        "image's embedding (what a backdoor does, and all the method relies on); *pixels only* compares the "
        "triggered pixels with a rebuild from the clean embedding (what a trigger does on any encoder); "
        "*both* is the triggered score. AUROC against the clean scores of the same images; *rises*: the "
        "share of images whose own score goes up with that part alone (paired, which a detector cannot do: "
        "it never sees the clean version).",
        "",
        f"Decoder val loss: per-pixel MSE at the test mask on Tiny-ImageNet; the per-pixel mean image "
        f"(a rebuild blind to the embedding) scores {fmt(results.get('mean_image_mse'))} on the calibration images.",
        "",
        "| encoder | method | both | embedding only | pixels only | rises: embedding only | rises: pixels only "
        "| decoder val loss (test mask) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    val_loss = {}
    for stage, result in results.get("decoders", {}).items():
        val_loss[stage] = result
    for key, per_method in parts.items():
        name = key.split("/")[0]
        for method, p in sorted(per_method.items()):
            loss = val_loss.get(name, {}).get(_decoder_of(method))
            lines.append(
                f"| {name} | {method} | {fmt(p['auroc_both'])} | {fmt(p['auroc_embedding_only'])} | "
                f"{fmt(p['auroc_pixels_only'])} | {pct(p.get('paired_rise_embedding_only'))} | "
                f"{pct(p.get('paired_rise_pixels_only'))} | {fmt(loss)} |"
            )
    lines.append("")
    for attack in ATTACKS:
        p = parts.get(f"{attack}/ood", {}).get(default)
        if p is not None:
            lines.append(
                f"- {attack}, `{default}`: the embedding swap alone raises the score of "
                f"{pct(p.get('paired_rise_embedding_only'))} of the images but separates them from clean ones "
                f"at only AUROC {p['auroc_embedding_only']:.3f} (the shift is small against how much the score "
                f"varies from image to image); the trigger's pixels alone at {p['auroc_pixels_only']:.3f}."
            )
    control = parts.get("clean/ood", {}).get(default)
    if control is not None:
        lines.append(
            f"- clean control, `{default}`: pixels alone {control['auroc_pixels_only']:.3f}, embedding alone "
            f"{control['auroc_embedding_only']:.3f} (a backdoor-free encoder barely moves the embedding)."
        )
    return lines + ["", *_embedding_content_lines(results)]


def _embedding_content_lines(results: dict) -> list[str]:
    content = results.get("embedding_content")
    if not content:
        return []
    lines = [
        "### How much of the image the embeddings keep",
        "",
        "Decoder-free (`ClipLab.stage_embedding_content`): the participation ratio of the L2-normalized "
        "embeddings (the effective number of dimensions they spread over) and the held-out R^2 of a "
        f"linear map from the embedding to the image's 8x8 thumbnail (fit on {content['n_fit']} auxiliary "
        f"images, measured on {content['n_eval']} calibration images). `untrained`: the same tower with "
        "random weights, what the architecture keeps by itself.",
        "",
        "| encoder | embedding dim | participation ratio | thumbnail R^2 |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in content["encoders"].items():
        lines.append(
            f"| {name} | {row['embedding_dim']} | {fmt(row['participation_ratio'], 1)} | "
            f"{fmt(row['thumbnail_r2'])} |"
        )
    return lines + [""]


def _decoder_of(method: str) -> str:
    """`dede_lab_30ep_quadrants_max_patch` -> `lab_30ep_quadrants`."""
    stem = method.removeprefix("dede_")
    for kind in ("_max_patch", "_sse"):
        if stem.endswith(kind):
            return stem.removesuffix(kind)
    return stem
