"""The smoke suite end to end on the real data (marked `lab`: run with -m lab; skipped without data)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lab.suite import missing_data


@pytest.mark.lab
def test_smoke_suite_runs() -> None:
    if missing_data():
        pytest.skip("DEDE_DATA_DIR lacks the lab's data files")
    from lab.runner import run_suite
    from lab.suite import REPO_ROOT, SUITES

    results = run_suite("smoke", progress=False)
    assert "badencoder/ood" in results["detection"]
    metrics = results["detection"]["badencoder/ood"]["dede_tiny_sse"]
    assert 0 <= metrics["auroc"] <= 1
    for method in ("dede_tiny_feature_layer3", "activation_norm_layer3"):  # the feature-space stage
        assert results["detection"]["badencoder/ood"][method]["n_clean_test"] == metrics["n_clean_test"]
    assert results["encoders"]["badencoder"]["probe"]["cifar10"]["ba"] > 0
    # The shipped detector, fitted, calibrated and exported with the product's defaults, scored
    # through its ONNX graph on the same images; the report is read on it.
    shipped = results["detection"]["badencoder/ood"]["dede_shipped"]
    assert shipped["n_clean_test"] == metrics["n_clean_test"] and 0 <= shipped["auroc"] <= 1
    # and at the threshold `dede calibrate --holdout` sets on the fit's held-out auxiliary images
    assert 0 < shipped["calibrated_holdout"]["n_calibration"] < shipped["calibrated"]["n_calibration"]
    assert "dede_shipped" not in results["detection"]["drupe/ood"]  # only where the suite asks
    report = (REPO_ROOT / SUITES["smoke"].root / "report" / "REPORT.md").read_text()
    assert "## The shipped detector (`dede_shipped`)" in report
    assert "| **dede_shipped** |" in report and "default score `dede_shipped`" in report


@pytest.mark.lab
def test_report_dir_keeps_a_partial_report_apart(tmp_path) -> None:
    """`--report-dir` sends results.json and REPORT.md elsewhere, leaving the suite's own report as it was."""
    if missing_data():
        pytest.skip("DEDE_DATA_DIR lacks the lab's data files")
    import json

    from lab.runner import run_suite
    from lab.suite import REPO_ROOT, SUITES
    from training.cli import main

    run_suite("smoke", progress=False)  # cached after the test above: only collects and reports
    own_report = REPO_ROOT / SUITES["smoke"].root / "report" / "results.json"
    before = own_report.read_bytes()
    assert main(["lab", "report", "--suite", "smoke", "--report-dir", str(tmp_path / "apart")]) == 0
    written = json.loads((tmp_path / "apart" / "results.json").read_text())
    assert written["suite"] == "smoke" and "badencoder/ood" in written["detection"]
    assert (tmp_path / "apart" / "REPORT.md").read_text().startswith("# Detection lab report")
    assert own_report.read_bytes() == before


def test_a_partial_clip_suite_trains_only_the_stages_not_skipped_and_writes_no_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--skip decoder_ scores_ feature_scores_ embedding_content` trains the CLIPs and their attacks
    (the shipped detector's CLIP check scores them) and none of the suite's own decoders."""
    import lab.runner as runner

    calls: list[str] = []

    class RecordingLab:
        def __init__(self, config, progress):  # noqa: ANN001
            self.cache = self
            self.held_out = {f"{v}_{t}": (v, t) for v, t in config.held_out_finetunes}

        def encoder_path(self, name: str):  # noqa: ANN201
            return Path(__file__)  # every encoder "exists"

        def load(self, stage: str) -> dict:
            return {"result": {"stage": stage}}

        def __getattr__(self, stage: str):  # noqa: ANN204
            return lambda *args, **kwargs: calls.append(f"{stage}{args}")

    monkeypatch.setattr(runner, "ClipLab", RecordingLab)
    monkeypatch.setattr(runner, "write_clip_report", lambda *a, **k: calls.append("report"))
    held_out = dataclasses.replace(
        runner.CLIP_SUITES["clip-smoke"], held_out_finetunes=(("badencoder", "checker"),)
    )
    monkeypatch.setitem(runner.CLIP_SUITES, "clip-smoke", held_out)
    skip = ("decoder_", "scores_", "feature_scores_", "embedding_content")
    out = runner.run_clip_suite("clip-smoke", progress=False, skip=skip)
    assert calls[:2] == ["stage_clip_clean()", "stage_clip_poisoned()"]
    assert calls[2:4] == ["stage_attack('badencoder',)", "stage_attack('norm_preserving',)"]
    # a held-out fine-tune trains after them, with its trigger, and gets its zero-shot figures
    assert calls[4] == "stage_attack('badencoder', 'checker')"
    assert all(c.startswith("stage_zero_shot") for c in calls[5:]) and len(calls) == 10
    assert "stage_zero_shot('badencoder_checker',)" in calls
    assert out["zero_shot"]["poisoned"] == {"stage": "zero_shot_poisoned"} and out["detection"] == {}
    assert out["zero_shot"]["badencoder_checker"] == {"stage": "zero_shot_badencoder_checker"}
    calls.clear()
    runner.run_clip_suite("clip-smoke", progress=False, skip=("clip_", "attack_clip_", *skip))
    assert all(c.startswith("stage_zero_shot") for c in calls) and "report" not in calls
    # A rule test's new attacks alone (clip-ninth): the clean tower and the held-out fine-tunes, no
    # poisoned CLIP, no white-square fine-tunes, no decoders, no report, with nothing skipped.
    calls.clear()
    monkeypatch.setitem(runner.CLIP_SUITES, "clip-smoke", dataclasses.replace(held_out, base_encoders=False))
    runner.run_clip_suite("clip-smoke", progress=False)
    assert calls[:2] == ["stage_clip_clean()", "stage_attack('badencoder', 'checker')"]
    assert all(c.startswith("stage_zero_shot") for c in calls[2:]) and "report" not in calls
    assert runner.CLIP_SUITES["clip-ninth"].held_out_finetunes == (
        ("norm_preserving", "checker"),
        ("badencoder", "noise"),
    )
    tenth = runner.CLIP_SUITES["clip-tenth"]
    assert tenth.held_out_finetunes == (("norm_preserving", "blend"), ("badencoder", "blend"))
    assert not tenth.base_encoders and not tenth.extra_decoders
    # The whole suite's fine-tunes hold every rule test's, each once.
    whole = runner.CLIP_SUITES["clip"].held_out_finetunes
    assert set(whole) >= {*tenth.held_out_finetunes, *runner.CLIP_SUITES["clip-ninth"].held_out_finetunes}
    assert len(set(whole)) == len(whole)
