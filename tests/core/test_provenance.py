"""The provenance block of result files: a benchmark's own outputs do not make its record dirty."""

from __future__ import annotations

import pytest

from benchmarks import provenance


def test_a_commands_own_outputs_do_not_mark_the_tree_dirty(monkeypatch: pytest.MonkeyPatch) -> None:
    status = " M benchmarks/detection/shipped/results.json\n M benchmarks/detection/shipped/REPORT.md"
    monkeypatch.setattr(provenance, "_git", lambda *args: status if args[0] == "status" else "abc")
    shipped = provenance.REPO_ROOT / "benchmarks" / "detection" / "shipped"
    outputs = (shipped / "results.json", shipped / "REPORT.md")
    assert provenance.run_record([], outputs=outputs)["dirty"] is False
    assert provenance.run_record([], outputs=outputs[:1])["dirty"] is True
    assert provenance.run_record([])["dirty"] is True
    # any other change still does
    status += "\n M training/fit.py"
    assert provenance.run_record([], outputs=outputs)["dirty"] is True
