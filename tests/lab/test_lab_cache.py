"""The lab's stage cache: a finished stage is not re-run, a failed one leaves no marker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def test_an_encoders_cue_table_is_its_own_not_merged_with_encoders_named_after_it(tmp_path: Path) -> None:
    from lab.suite import load_score_tables, save_score_table

    folder = tmp_path / "scores" / "cues"
    save_score_table(tmp_path, folder / "badencoder.npz", {"embedding_norm/clean": np.zeros(3)})
    save_score_table(tmp_path, folder / "badencoder_warp.npz", {"embedding_norm/clean": np.ones(3)})
    own = load_score_tables(folder, "badencoder", variants=False)
    assert (own["embedding_norm"]["clean"] == 0).all()
    merged = load_score_tables(folder, "badencoder")  # score tables: <stem>_<variant> files merge in
    assert (merged["embedding_norm"]["clean"] == 1).all()


def test_every_suites_attack_settings_name_one_of_its_attacks_and_real_fields() -> None:
    """A suite's per-attack settings reach BackdoorSettings by name: a misspelt attack would be
    ignored and a misspelt field would fail hours into a run, so both are checked here."""
    from dataclasses import fields

    from lab.attacks.badencoder import BackdoorSettings
    from lab.suite import SUITES, backdoor_settings, encoder_name

    known = {f.name for f in fields(BackdoorSettings)}
    assert SUITES["lab-heldout"].attack_settings == {
        "dede_aware": {"lambda_dede": 0.2},
        "adaptive": {"epochs": 40},
        "adaptive_natural_checker": {"epochs": 40, "lambda_probe": 0.25},
        "dede_aware_natural_checker": {"epochs": 40, "lambda_probe": 0.25, "lambda_dede": 0.2},
    }
    natural = backdoor_settings(SUITES["lab-heldout"], "adaptive_natural_checker", "adaptive_natural")
    assert (natural.epochs, natural.lambda_probe) == (40, 0.25)
    heldout = SUITES["lab-heldout"]
    assert backdoor_settings(heldout, "adaptive", "adaptive").epochs == 40  # over the suite's 20
    assert backdoor_settings(heldout, "drupe", "drupe").epochs == heldout.attack_epochs
    assert backdoor_settings(heldout, "dede_aware", "dede_aware").lambda_dede == 0.2
    for suite in SUITES.values():
        names = {encoder_name(v, t) for v, t in suite.attacks}
        for name, overrides in suite.attack_settings.items():
            assert name in names, (suite.name, name)
            assert set(overrides) <= known, (suite.name, overrides)
            BackdoorSettings(**overrides)


@pytest.mark.parametrize("whole", ["lab-hard", "lab-heldout"])
def test_a_suites_parts_split_its_attacks_and_share_its_cache(whole: str) -> None:
    """A suite's parts (each within the 3-hour bound) run exactly its attacks between them, each
    attack in one part, with its settings, in its root: what one trains, the others and the whole
    suite reuse."""
    from lab.attacks.badencoder import CUE_HIDING
    from lab.commands import LAB_SUITE_NAMES
    from lab.suite import SUITE_PARTS, SUITES, backdoor_settings, encoder_name

    suite = SUITES[whole]
    parts = [SUITES[f"{whole}-{name}"] for name in SUITE_PARTS[whole]]
    assert set(LAB_SUITE_NAMES) == set(SUITES)  # the command line offers every suite
    assert sorted(a for part in parts for a in part.attacks) == sorted(suite.attacks)
    hiding = SUITES[f"{whole}-hiding"]
    assert hiding.attacks and all(v in CUE_HIDING for v, _ in hiding.attacks)
    for part in parts:
        assert part.attacks and part.root == suite.root
        assert part.cue_encoders == ("clean", *(encoder_name(v, t) for v, t in part.attacks))
        for variant, trigger in part.attacks:
            name = encoder_name(variant, trigger)
            assert backdoor_settings(part, name, variant) == backdoor_settings(suite, name, variant)


def test_suite_hours_reads_every_stage_of_each_part_from_its_suites_report() -> None:
    from benchmarks.detection.suite_hours import SUITE_NAMES, committed_report, stage_walls, suite_stages

    assert committed_report("lab-heldout-drupe").parent.name == "heldout"
    assert committed_report("lab-hard-hiding").parent.name == "attacks"
    assert committed_report("lab-heldout-ninth").parent.name == "ninth"
    for name in SUITE_NAMES:
        assert set(suite_stages(name)) <= set(stage_walls(name)), name


def test_a_suite_part_reports_into_its_own_folder() -> None:
    from lab.runner import default_report_dir
    from lab.suite import SUITES, Lab

    parts = ("lab-heldout-badencoder", "lab-heldout-drupe", "lab-heldout-hiding")
    folders = {default_report_dir(Lab(SUITES[n], progress=False)) for n in parts}
    assert len(folders) == 3 and all(f.parent.name == "lab-heldout" for f in folders)
    assert default_report_dir(Lab(SUITES["smoke"], progress=False)).name == "report"


def test_cue_report_names_missing_cue_scores(tmp_path) -> None:
    """A cue stage marker whose scores file is absent (copied from another suite's root) stops the
    report with the file's folder and the marker to remove, not a bare max() of nothing."""
    import pytest

    from lab.cue_report import _figures
    from lab.suite import StageCache

    class _Lab:
        root = tmp_path
        cache = StageCache(tmp_path)

        def load_cues(self, name: str) -> dict:
            return {}

    with pytest.raises(ValueError, match="cues of clean have no scores .*cues_clean.json"):
        _figures(_Lab(), {"cues": {"clean": {}}, "detection": {}}, tmp_path)
