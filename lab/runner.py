"""Running a suite end to end: every stage (cached, resumable), then its results and report.

The stages live in `lab.suite` / `lab.clip_suite`, the figures in `lab.results` /
`lab.clip_suite.collect_clip_results`, the reports in `lab.report` / `lab.clip_report`; this module is
the one that joins them, so none of those imports another's report (no import cycles).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lab.clip_report import write_clip_report
from lab.clip_suite import (
    CLIP_ENCODERS,
    CLIP_FINETUNES,
    CLIP_SUITES,
    ClipLab,
    collect_clip_results,
    controlled_decoders,
    decoder_label,
)
from lab.cue_report import write_cue_report
from lab.report import write_report
from lab.results import collect_results
from lab.suite import REPO_ROOT, SUITES, Lab


def run_suite(
    suite: str,
    device: str | None = None,
    progress: bool = True,
    skip: tuple[str, ...] = (),
    report_dir: Path | None = None,
) -> dict:
    """Run (or resume) every stage of the suite, then write the results and the report.

    skip: stage-name prefixes not to run now (e.g. `simclr_ctrl`, `decoder_paper`); the report then
    says they did not run.
    """
    config = SUITES[suite]
    torch.manual_seed(config.seed)
    lab = Lab(config, device, progress)
    started = time.time()

    def allowed(name: str) -> bool:
        return not any(name.startswith(prefix) for prefix in skip)

    lab.stage_simclr_clean()
    if config.cue_encoders:
        # The cue suites (lab-hard): each attack, then at once its probe and decoder-free cues, so
        # a run cut short by its time budget still reports every attack that finished.
        for name in config.cue_encoders:
            if name != "clean" and allowed(f"attack_{name}"):
                lab.stage_attack(name)
            if lab.encoder_path(name).is_file() and allowed(f"probe_{name}"):
                lab.stage_probe(name)
            if lab.encoder_path(name).is_file() and allowed(f"cues_{name}"):
                lab.stage_cues(name)
    for name in lab.attack_specs:
        if allowed(f"attack_{name}"):
            lab.stage_attack(name)
    for name in ("clean", *lab.attack_specs):
        if lab.encoder_path(name).is_file() and allowed(f"probe_{name}"):
            lab.stage_probe(name)
    for name, aux in config.detections:
        if name == "ctrl":
            if not allowed("simclr_ctrl"):
                continue
            lab.stage_ctrl()
            if allowed("probe_ctrl"):
                lab.stage_probe("ctrl")
        if not lab.encoder_path(name).is_file() or not allowed(f"decoder_{name}_{aux}"):
            continue
        lab.stage_decoder(name, aux, config.decoder_preset, config.decoder_epochs)
        lab.stage_scores(name, aux, config.decoder_preset)
        if allowed(f"feature_scores_{name}_{aux}"):
            lab.stage_feature_scores(name, aux, config.decoder_preset)
    for name, aux, preset, epochs in config.extra_decoders:
        if allowed(f"decoder_{name}_{aux}_{preset}") and lab.encoder_path(name).is_file():
            lab.stage_decoder(name, aux, preset, epochs)
            lab.stage_scores(name, aux, preset, with_baselines=False)

    results = collect_results(lab, time.time() - started)
    _write(lab, results, report_dir or default_report_dir(lab))
    return results


def _write(lab: Lab, results: dict, out_dir: Path) -> None:
    if lab.config.cue_encoders:
        write_cue_report(lab, results, out_dir)
    else:
        write_report(lab, results, out_dir)


# Suites whose report is committed, and where; the others (smoke, in CI) write beside their runs.
COMMITTED_LAB_REPORTS = {
    "lab": Path("benchmarks/detection"),
    "lab-hard": Path("benchmarks/detection/attacks"),
    "lab-heldout": Path("benchmarks/detection/heldout"),
}


def default_report_dir(lab: Lab) -> Path:
    if lab.config.name in COMMITTED_LAB_REPORTS:
        return REPO_ROOT / COMMITTED_LAB_REPORTS[lab.config.name]
    return lab.root / "report"


def rebuild_report(suite: str, report_dir: Path | None = None) -> dict:
    """Results and report from whatever stages are cached, running nothing."""

    lab = Lab(SUITES[suite], progress=False)
    results = collect_results(lab, 0.0)
    _write(lab, results, report_dir or default_report_dir(lab))
    return results


def run_clip_suite(suite: str = "clip", progress: bool = True, report_dir: Path | None = None) -> dict:
    """Run (or resume) every stage of a CLIP suite, then write its results and report."""
    config = CLIP_SUITES[suite]
    torch.manual_seed(config.seed)
    lab = ClipLab(config, progress)
    lab.stage_clip_clean()
    lab.stage_clip_poisoned()
    for variant in CLIP_FINETUNES:
        lab.stage_attack(variant)
    for name in CLIP_ENCODERS:
        lab.stage_zero_shot(name)
    for name in CLIP_ENCODERS:
        lab.stage_decoder(name, config.decoder_preset, config.decoder_epochs)
        lab.stage_scores(name, config.decoder_preset)
    for name, preset, epochs, views in config.extra_decoders:
        lab.stage_decoder(name, preset, epochs, views)
        lab.stage_scores(name, decoder_label(config, preset, epochs, views), with_baselines=False)
    for label in controlled_decoders(config):
        for name in CLIP_ENCODERS:
            lab.stage_feature_scores(name, label)
    lab.stage_embedding_content()

    results = collect_clip_results(lab)
    write_clip_report(lab, results, report_dir or default_clip_report_dir(lab))
    return results


# Suites whose report is committed; the others (smoke) write theirs beside their runs.
COMMITTED_REPORTS = {"clip": "clip", "clip-colours": "clip_colours"}


def default_clip_report_dir(lab: ClipLab) -> Path:
    if lab.config.name in COMMITTED_REPORTS:
        return REPO_ROOT / "benchmarks" / "detection" / COMMITTED_REPORTS[lab.config.name]
    return lab.root / "report"
