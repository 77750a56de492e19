"""The provenance block of result files: a benchmark's own outputs do not make its record dirty."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import provenance


def test_a_commands_own_outputs_do_not_mark_the_tree_dirty(monkeypatch: pytest.MonkeyPatch) -> None:
    # as `_git` returns it: stripped, so the first line has lost its leading blank
    status = "M benchmarks/detection/shipped/results.json\n M benchmarks/detection/shipped/REPORT.md"
    monkeypatch.setattr(provenance, "_git", lambda *args: status if args[0] == "status" else "abc")
    shipped = provenance.REPO_ROOT / "benchmarks" / "detection" / "shipped"
    outputs = (shipped / "results.json", shipped / "REPORT.md")
    assert provenance.run_record([], outputs=outputs)["dirty"] is False
    assert provenance.run_record([], outputs=outputs[:1])["dirty"] is True
    assert provenance.run_record([])["dirty"] is True
    # any other change still does
    status += "\n M training/fit.py"
    assert provenance.run_record([], outputs=outputs)["dirty"] is True


def test_the_real_git_status_of_a_commands_own_output_is_read_as_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through git itself: a repository whose only change is the command's own output."""
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    out = tmp_path / "results.json"
    out.write_text("{}\n")
    subprocess.run(["git", "-C", str(tmp_path), "add", "."], check=True)
    subprocess.run(
        ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
        check=True,
    )
    out.write_text('{"a": 1}\n')
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    assert provenance.run_record([], outputs=(out,))["dirty"] is False
    # an output outside the repository (a benchmark's --out elsewhere) is no part of its status
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere.json"
    assert provenance.run_record([], outputs=(out, elsewhere))["dirty"] is False
    assert provenance.run_record([])["dirty"] is True
