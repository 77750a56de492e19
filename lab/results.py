"""What a suite's results.json holds: the header every suite opens with (suite, settings, commit,
machine, stage wall times) and the lab suite's figures, computed from its cached stages."""

from __future__ import annotations

import platform
import subprocess
from dataclasses import asdict

import numpy as np
import torch

from lab.evaluate import detection_metrics, downstream_after_filtering
from lab.suite import REPO_ROOT, Lab


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def results_header(config: object, stages: dict, device: str = "cpu") -> dict:
    """What every suite's results.json opens with: the suite, its settings, the commit, the machine
    and the wall time of each cached stage."""
    return {
        "suite": config.name,
        "config": asdict(config),
        "commit": _git_commit(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": device,
        },
        "stage_wall_seconds": {name: round(s["wall_seconds"], 1) for name, s in stages.items()},
    }


def collect_results(lab: Lab, session_seconds: float) -> dict:
    """Every figure, from the cached stages and score arrays."""
    c = lab.config
    stages = lab.cache.all()
    results: dict = {
        **results_header(c, stages, lab.device),
        "seeds": {"suite": c.seed, "data_splits": [c.seed + i for i in range(5)]},
        "stage_compute_seconds": {
            name: round(s["result"]["compute_seconds"], 1)
            for name, s in stages.items()
            if "compute_seconds" in s["result"]
        },
        "this_session_seconds": round(session_seconds, 1),
        "encoders": {},
        "detection": {},
        "not_run": [],
    }
    for name in lab.encoder_names():
        entry: dict = {"trigger": lab.trigger_name(name)}
        source = (
            "simclr_clean" if name == "clean" else ("simclr_ctrl" if name == "ctrl" else f"attack_{name}")
        )
        if source in stages:
            entry["training"] = stages[source]["result"]
        if f"probe_{name}" in stages:
            entry["probe"] = stages[f"probe_{name}"]["result"]
        if len(entry) > 1:
            results["encoders"][name] = entry
        else:
            results["not_run"].append(f"encoder {name}")
    try:
        from training.fit import load_run  # noqa: F401 - the DeDe part needs the core fit module
    except ImportError:
        results["not_run"].append("DeDe decoders (training.fit missing)")
    for name, aux in c.detections:
        if f"scores_{name}_{aux}" not in stages:
            results["not_run"].append(f"detection {name}/{aux}")
            continue
        scores = lab.load_scores(name, aux)
        predictions_path = lab.root / "probes" / f"{name}_cifar10_predictions.npz"
        _, _, non_target = lab.test_sets(name)
        per_method = {}
        for method, splits in scores.items():
            metrics = detection_metrics(
                splits["calibration"], splits["clean"], splits["triggered"], c.fpr_target
            )
            if predictions_path.is_file():
                with np.load(predictions_path) as p:
                    threshold = metrics["calibrated"]["threshold"]
                    metrics["downstream_cifar10"] = downstream_after_filtering(
                        p["clean_pred"],
                        p["labels"],
                        splits["clean"] > threshold,
                        p["triggered_pred"][non_target],
                        p["labels"][non_target],
                        splits["triggered"] > threshold,
                        c.target_class,
                    )
            if "holdout" in splits:  # the shipped detector's `dede calibrate --holdout` threshold
                metrics["calibrated_holdout"] = detection_metrics(
                    splits["holdout"], splits["clean"], splits["triggered"], c.fpr_target
                )["calibrated"]
            per_method[method] = metrics
        results["detection"][f"{name}/{aux}"] = per_method
    results["cues"] = {}
    for name in c.cue_encoders:
        if f"cues_{name}" not in stages:
            results["not_run"].append(f"cues {name}")
            continue
        results["cues"][name] = {
            method: detection_metrics(
                splits["calibration"], splits["clean"], splits["triggered"], c.fpr_target
            )
            for method, splits in lab.load_cues(name).items()
        }
    if c.cue_encoders:
        return results
    if not any(preset == "paper" for _, _, preset, _ in c.extra_decoders):
        results["not_run"].append("DeDe with the `paper` decoder preset (not in this suite's config)")
    for name, aux, preset, _ in c.extra_decoders:
        if f"decoder_{name}_{aux}_{preset}" not in stages:
            results["not_run"].append(f"DeDe `{preset}` decoder on {name}/{aux}")
    return results
