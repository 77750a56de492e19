"""The reliability benchmark's own pieces (benchmarks/reliability): its recovery rule, its limits, and
(marked slow) a short run of every mode on the synthetic bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from malformed import Limits

from benchmarks.reliability.load import Shot, percentiles_ms
from benchmarks.reliability.run import _recovered_at, default_limits
from service.settings import Settings


def probe(due_s: float, ms: float, status: int = 200) -> Shot:
    return Shot(due_s, 0.0, ms / 1000, ms / 1000, status, None, status == 200)


def test_recovery_starts_with_the_first_run_of_normal_probes() -> None:
    slow = [probe(0.05 * i, 400) for i in range(4)]
    broken = [probe(0.2, 10), probe(0.25, 10), probe(0.3, 10, status=503)]  # a streak cut short
    normal = [probe(0.35 + 0.05 * i, 10) for i in range(5)]
    assert _recovered_at(slow + broken + normal, threshold_s=0.02) == pytest.approx(0.35)
    assert _recovered_at(slow + broken + normal[:4], threshold_s=0.02) is None
    assert _recovered_at(normal, threshold_s=0.005) is None  # 10 ms is not normal when normal is 5 ms


def test_percentiles_in_milliseconds() -> None:
    summary = percentiles_ms([0.001 * i for i in range(1, 101)])
    assert summary["count"] == 100 and summary["max"] == 100.0
    assert summary["p50"] == pytest.approx(50.5) and summary["p99"] == pytest.approx(99.01)
    assert percentiles_ms([]) == {"count": 0}


def test_the_malformed_run_is_built_around_the_services_default_limits() -> None:
    fields = Settings.model_fields
    assert default_limits() == Limits(
        fields["max_upload_bytes"].default,
        fields["max_image_pixels"].default,
        fields["max_images_per_request"].default,
    )


@pytest.mark.slow
def test_a_short_run_of_every_mode_on_the_synthetic_bundle(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(
        [sys.executable, "-m", "benchmarks.reliability.run", "--synthetic", "--out", str(tmp_path),
         "--uploads", "400", "--fuzz-examples", "300", "--saturation-seconds", "2", "--soak-seconds", "6",
         "--overload-seconds", "3"],
        cwd=REPO_ROOT, env=env, check=True, timeout=900,
    )  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    sections = results["sections"]
    assert set(sections) == {"malformed", "soak", "overload", "faults"}
    assert sections["malformed"]["protocol"]["uploads"] == 400
    assert sections["malformed"]["server_errors_5xx"] == 0 and not sections["malformed"]["crashes"]
    assert sections["malformed"]["decoder_fuzz"]["inputs"] == 300
    assert sections["malformed"]["decoder_fuzz"]["other_exceptions"] == 0
    assert sections["soak"]["scores_wrong"] == 0 and not sections["soak"]["protocol"]["full_length"]
    assert all(f.get("skipped") or f["one_line"] for f in sections["faults"]["start_up"])
    report = (tmp_path / "REPORT.md").read_text()
    assert "Short run" in report and "## Malformed and hostile uploads" in report


def test_the_costly_structure_section_renders_every_part_and_judges_the_goals() -> None:
    from benchmarks.reliability.costly import GOALS
    from benchmarks.reliability.costly_report import costly_lines

    answer = {"status": 422, "wall_s": 0.02, "server_cpu_s": 0.01, "cpu_after_answer_s": 0.0}
    latency = {"ok": 10, "wrong_scores": 0, "latency_ms": {"p50": 5.0, "p99": 9.0}, "hostile_answers": {}}
    section = {
        "run": {"command": "python -m x", "commit": "a" * 40, "machine": {"cpu": "cpu", "cores": 2}},
        "goals": GOALS,
        "bundle": "synthetic",
        "base_ref": "b31f78f",
        "classes": {
            "repeats": 1,
            "idle_cpu_per_s": 0.0,
            "classes": {
                "jpeg_many_scans": {
                    "bytes": 10,
                    "statuses": ["422"],
                    "max_wall_s": 0.02,
                    "max_server_cpu_s": 0.01,
                    "max_cpu_after_answer_s": 0.0,
                    "answers": [answer],
                    "pillow_alone": {"cpu_s": None, "wall_s": 30.0, "outcome": "over 30 s"},
                }
            },
        },
        "under_fire": {
            "good_rate": 40,
            "seconds": 1,
            "hostile_clients": 4,
            "idle": latency,
            "issue_classes_paced": {**latency, "p99_ratio": 1.1},
            "issue_classes_back_to_back": {**latency, "p99_ratio": 3.0},
        },
        "throughput": {
            "clients": 32,
            "seconds": 1,
            "images_per_request": 8,
            "images_per_s": {"this": [99.0], "base": [100.0]},
            "median_images_per_s": {"this": 99.0, "base": 100.0},
            "ratio": 0.99,
            "median_server_cpu_ms_per_image": {"this": 0.3, "base": 0.3},
            "cpu_ratio": 1.0,
        },
        "sigterm": {
            "drain_timeout_s": 30.0,
            "hostile_clients": 4,
            "good_clients": 8,
            "good_sent_before_signal": 5,
            "good_answered_200": 5,
            "good_refused_503": 0,
            "accepted_lost": 0,
            "exit_code": 0,
            "seconds_to_exit": 1.0,
        },
    }
    text = "\n".join(costly_lines(section))
    assert "## Costly structure" in text and "over 30 s" in text
    assert "one a second: 1.1x, met" in text and "back to back: 3.0x, **missed**" in text
    assert "ratio 0.99" in text and "lost: met" in text
