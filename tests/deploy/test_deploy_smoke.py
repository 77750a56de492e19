"""docker/smoke.sh with real containers, from pytest: opt-in, because it needs podman (or Docker) and
takes about 30 s with a warm image cache (2-3 minutes building from scratch) on 2 cores. CI runs the
script itself after the test suite (.ci/run), with the demo bundle.

    DEDE_CONTAINER_TESTS=1 python -m pytest tests/deploy/test_deploy_smoke.py
    bash docker/smoke.sh            # the same, without pytest
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    os.environ.get("DEDE_CONTAINER_TESTS") != "1", reason="containers: set DEDE_CONTAINER_TESTS=1 to run"
)
def test_smoke_script_passes_with_real_containers(tiny_bundle: Path) -> None:
    # The demo bundle checks the flags (clean passes, triggered is flagged); without it the session's
    # tiny bundle still proves build, compose, readiness, /detect, scraping and rules.
    env = dict(os.environ)
    if not (REPO_ROOT / "bundles" / "demo" / "manifest.json").exists():
        env["DEDE_SMOKE_BUNDLE"] = str(tiny_bundle)
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "docker" / "smoke.sh")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "SMOKE PASSED" in result.stdout
