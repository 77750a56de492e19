"""The smoke suite end to end on the real data (marked `lab`: run with -m lab; skipped without data)."""

from __future__ import annotations

import pytest

from lab.suite import missing_data


@pytest.mark.lab
def test_smoke_suite_runs() -> None:
    if missing_data():
        pytest.skip("DEDE_DATA_DIR lacks the lab's data files")
    from lab.runner import run_suite

    results = run_suite("smoke", progress=False)
    assert "badencoder/ood" in results["detection"]
    metrics = results["detection"]["badencoder/ood"]["dede_tiny_sse"]
    assert 0 <= metrics["auroc"] <= 1
    for method in ("dede_tiny_feature_layer3", "activation_norm_layer3"):  # the feature-space stage
        assert results["detection"]["badencoder/ood"][method]["n_clean_test"] == metrics["n_clean_test"]
    assert results["encoders"]["badencoder"]["probe"]["cifar10"]["ba"] > 0


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


def test_clip_suites_refuse_skip(capsys: pytest.CaptureFixture[str]) -> None:
    from training.cli import main

    assert main(["lab", "run", "--suite", "clip-smoke", "--skip", "clip_clean"]) == 2
    assert "--skip applies to the lab and smoke suites" in capsys.readouterr().err
