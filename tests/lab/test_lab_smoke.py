"""The smoke suite end to end on the real data (marked `lab`: run with -m lab; skipped without data)."""

from __future__ import annotations

import pytest

from training.lab import missing_data


@pytest.mark.lab
def test_smoke_suite_runs() -> None:
    if missing_data():
        pytest.skip("DEDE_DATA_DIR lacks the lab's data files")
    from training.lab import run_suite

    results = run_suite("smoke", progress=False)
    assert "badencoder/ood" in results["detection"]
    metrics = results["detection"]["badencoder/ood"]["dede_tiny_sse"]
    assert 0 <= metrics["auroc"] <= 1
    assert results["encoders"]["badencoder"]["probe"]["cifar10"]["ba"] > 0
