"""The lab's stage cache: a finished stage is not re-run, a failed one leaves no marker."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.suite import StageCache


def test_finished_stage_is_skipped(tmp_path: Path) -> None:
    cache, calls = StageCache(tmp_path), []

    def stage() -> dict:
        calls.append(1)
        return {"value": 3}

    assert cache.run("a", stage) == {"value": 3}
    assert cache.run("a", stage) == {"value": 3}
    assert len(calls) == 1
    assert StageCache(tmp_path).load("a")["wall_seconds"] >= 0  # survives a new process


def test_failed_stage_runs_again(tmp_path: Path) -> None:
    cache = StageCache(tmp_path)

    def broken() -> dict:
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.run("b", broken)
    assert not cache.done("b")
    assert cache.run("b", lambda: {"ok": True}) == {"ok": True}
