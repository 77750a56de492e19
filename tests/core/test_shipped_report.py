"""The shipped-detector report's held-out check: goals read per attack, and kept out of the rule tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.detection import shipped


def _entry(auroc: float, tpr_id: float, fpr_id: float, tpr_ood: float, fpr_ood: float) -> dict:
    at = {"threshold": 1.0}
    return {
        "auroc": auroc,
        "auprc": auroc,
        "tpr_at_1pct_fpr": tpr_id,
        "id": {**at, "tpr": tpr_id, "realised_fpr": fpr_id},
        "ood": {**at, "tpr": tpr_ood, "realised_fpr": fpr_ood},
    }


def _case(encoder: str, shipped_auroc: float, mean_stages_auroc: float, cue_auroc: float) -> dict:
    return {
        "encoder": encoder,
        "split": shipped.SPLIT,
        "n": {"clean_test": 2000, "triggered_test": 2000},
        "methods": {
            f"{shipped.MAX_ALL} (shipped)": _entry(shipped_auroc, 0.97, 0.01, 0.92, 0.01),
            "dede_sse": _entry(0.8, 0.2, 0.01, 0.1, 0.0),
            shipped.MEAN_STAGES: _entry(mean_stages_auroc, 0.5, 0.01, 0.5, 0.01),
            shipped.MAX_ALL_TAIL: _entry(0.5, 0.01, 0.01, 0.01, 0.01),
            "embedding_norm": _entry(0.6, 0.01, 0.01, 0.01, 0.01),
            "knn_distance": _entry(cue_auroc, 0.0, 0.01, 0.0, 0.01),
        },
    }


def _demo_measured_under_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo bundle's figures under max_all and the calibrated candidate, the one-rate tests' guard."""
    demo = {"metrics": {"auroc": 0.98, "tpr_at_1pct_fpr": 0.9}}
    figures = {"max_all": tmp_path / "max_all.json", "calibrated": tmp_path / "calibrated.json"}
    for path in figures.values():
        path.write_text(json.dumps(demo))
    monkeypatch.setattr(shipped, "EIGHTH_DEMO_FIGURES", figures)


@pytest.fixture
def suite_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Committed probes of two lab-heldout encoders: one attack that took, one that did not."""
    path = tmp_path / "results.json"
    probes = {"drupe": 0.98, "norm_preserving": 0.1}
    path.write_text(
        json.dumps(
            {"encoders": {n: {"probe": {"cifar10": {"asr": a, "ba": 0.6}}} for n, a in probes.items()}}
        )
    )
    monkeypatch.setitem(shipped.SUITE_RESULTS, "lab-heldout", ("heldout/results.json", path))


def test_the_held_out_check_reads_each_goal_and_the_strongest_inverted_cue(suite_results: None) -> None:
    results = {
        "cases": {
            # the shipped score meets every goal, but the kNN cue inverted (0.005) is stronger
            "heldout_drupe": _case("runs/lab-heldout/encoders/drupe/encoder.safetensors", 0.993, 0.9, 0.005),
            "heldout_norm_preserving": _case(
                "runs/lab-heldout/encoders/norm_preserving/encoder.safetensors", 0.7, 0.9, 0.5
            ),
            "heldout_clean": _case("runs/lab-heldout/simclr_clean/encoder.safetensors", 0.6, 0.6, 0.5),
        }
    }
    text = "\n".join(shipped.check_section(results, shipped.HELD_OUT_CHECK_PREFIX))
    assert "| heldout_drupe | 98.0% / 60.0% | 0.993 | 97.0% / 1.0% | 92.0% / 1.0% |" in text
    assert "knn_distance 0.005" in text
    drupe = next(line for line in text.splitlines() if line.startswith("- heldout_drupe:"))
    assert "AUROC >= 0.99 met" in drupe and "TPR id >= 95% at FPR <= 1.5% met" in drupe
    assert "ahead of every baseline (-0.0020) **missed**" in drupe
    assert "- heldout_norm_preserving: the attack did not take (probe ASR 10.0%, below 40%)" in text
    assert "- heldout_clean: the clean control; AUROC 0.600" in text


def test_no_rule_test_nor_its_guard_counts_a_held_out_check_case(suite_results: None) -> None:
    # max_all is 0.2 below mean_stages here: counted, the first test's verdict and the guard would move
    case = _case("runs/lab-heldout/encoders/drupe/encoder.safetensors", 0.7, 0.9, 0.5)
    assert shipped._probe_asr(case["encoder"]) == (0.98, "heldout/results.json")
    assert shipped.regressions({"cases": {"heldout_drupe": case}}, "max_all_tail", "max_all") == []
    assert shipped.decision({"cases": {"heldout_drupe": case}}) == []
    assert shipped.regressions({"cases": {"lab_drupe": case}}, "max_all_tail", "max_all") == [
        ("lab_drupe", 0.2)
    ]


def test_a_clip_case_records_its_zero_shot_figures_and_is_read_in_the_clip_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stages = tmp_path / "runs" / "lab-clip" / "stages"
    stages.mkdir(parents=True)
    for name, asr, ba in (("poisoned", 0.969, 0.698), ("clean", 0.077, 0.709), ("badencoder", 0.2, 0.6)):
        (stages / f"zero_shot_{name}.json").write_text(json.dumps({"result": {"asr": asr, "ba": ba}}))
    monkeypatch.setattr(shipped, "REPO_ROOT", tmp_path)
    poisoned = shipped._clip_attack("runs/lab-clip/clip_poisoned/clip.safetensors")
    assert poisoned is not None and (poisoned["encoder"], poisoned["asr"]) == ("poisoned", 0.969)
    assert shipped._clip_attack("runs/lab-heldout/encoders/drupe/encoder.safetensors") is None
    assert (
        shipped._clip_attack("runs/lab-clip/attack_norm_preserving/encoder.safetensors") is None
    )  # no stage
    # A rule test's held-out fine-tune: read by its folder's name, with no list to keep up to date.
    (stages / "zero_shot_badencoder_blend.json").write_text(json.dumps({"result": {"asr": 1.0, "ba": 0.68}}))
    blend = shipped._clip_attack("runs/lab-clip/attack_badencoder_blend/encoder.safetensors")
    assert blend is not None and (blend["encoder"], blend["asr"], blend["ba"]) == (
        "badencoder_blend",
        1.0,
        0.68,
    )

    def clip_case(folder: str, file: str) -> dict:
        path = f"runs/lab-clip/{folder}/{file}"
        return {**_case(path, 0.95, 0.9, 0.5), "attack": shipped._clip_attack(path)}

    results = {
        "cases": {
            "clip_poisoned": clip_case("clip_poisoned", "clip.safetensors"),
            "clip_clean": clip_case("clip_clean", "clip.safetensors"),
            "clip_badencoder": clip_case("attack_badencoder", "encoder.safetensors"),
        }
    }
    text = "\n".join(shipped.check_section(results, shipped.CLIP_CHECK_PREFIX))
    assert "| clip_poisoned | 96.9% / 69.8% | 0.950 |" in text
    assert "- clip_poisoned: AUROC >= 0.99 **missed**" in text
    assert "- clip_clean: the clean control; AUROC 0.950" in text
    assert "- clip_badencoder: the attack did not take (zero-shot ASR 20.0%, below 40%)" in text
    assert (
        shipped.check_section(results, shipped.HELD_OUT_CHECK_PREFIX) == []
    )  # the CLIP cases are not the held-out check's


def test_attach_attacks_gives_a_case_scored_without_its_zero_shot_figures_those_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stages = tmp_path / "runs" / "lab-clip" / "stages"
    stages.mkdir(parents=True)
    (stages / "zero_shot_badencoder_blend.json").write_text(json.dumps({"result": {"asr": 1.0, "ba": 0.68}}))
    monkeypatch.setattr(shipped, "REPO_ROOT", tmp_path)
    out = tmp_path / "shipped"
    out.mkdir()
    known = {"encoder": "badencoder", "asr": 0.99, "ba": 0.7, "source": "zero-shot"}
    cases = {
        "clip_badencoder_blend": _case(
            "runs/lab-clip/attack_badencoder_blend/encoder.safetensors", 0.9, 0.9, 0.5
        ),
        "clip_badencoder": {**_case("runs/lab-clip/attack_badencoder/encoder.safetensors", 0.9, 0.9, 0.5)},
    }
    cases["clip_badencoder"]["attack"] = known
    (out / "results.json").write_text(json.dumps({"cases": cases}))
    monkeypatch.setattr(shipped, "report", lambda results: "report\n")
    monkeypatch.setattr("sys.argv", ["shipped.py", "--attach-attacks", "--out", str(out)])
    shipped.main()
    written = json.loads((out / "results.json").read_text())["cases"]
    attached = written["clip_badencoder_blend"]["attack"]
    assert (attached["encoder"], attached["asr"], attached["ba"]) == ("badencoder_blend", 1.0, 0.68)
    assert "commit" in attached["attached"]
    assert written["clip_badencoder"]["attack"] == known  # a case with its figures keeps them
    assert (out / "REPORT.md").read_text() == "report\n"


def test_the_fifth_test_needs_a_higher_mean_a_worst_case_held_and_no_fewer_flagged() -> None:
    # (AUROC relative, AUROC max_all, TPR id relative, TPR id max_all) per counted case
    assert shipped.fifth_verdict([(0.99, 0.80, 0.5, 0.1), (0.80, 0.79, 0.1, 0.1)])[0] == "max_all_relative"
    # a higher mean, but the worst case falls by 0.05 (the attacker's choice)
    assert shipped.fifth_verdict([(0.99, 0.80, 0.5, 0.1), (0.70, 0.75, 0.1, 0.1)])[0] == "max_all"
    # ranks better on average, flags fewer at the id threshold
    verdict, lines = shipped.fifth_verdict([(0.95, 0.90, 0.2, 0.3), (0.95, 0.94, 0.2, 0.2)])
    assert verdict == "max_all" and lines[2].endswith("**not met**") and lines[0].endswith(": met")
    assert shipped.fifth_verdict([])[0] == "max_all"


def test_the_fifth_test_counts_only_its_cases_whose_attack_took(suite_results: None) -> None:
    def with_relative(encoder: str, relative_auroc: float, plain_auroc: float) -> dict:
        case = _case(encoder, plain_auroc, 0.9, 0.5)
        case["methods"][shipped.MAX_ALL_RELATIVE] = _entry(relative_auroc, 0.97, 0.01, 0.9, 0.01)
        return case

    results = {
        "cases": {
            # drupe took (0.98): counted; norm_preserving did not (0.1): shown, not counted
            "heldout_drupe_sig": with_relative(
                "runs/lab-heldout/encoders/drupe/encoder.safetensors", 0.99, 0.8
            ),
            "heldout_norm_preserving_sig": with_relative(
                "runs/lab-heldout/encoders/norm_preserving/encoder.safetensors", 0.3, 0.9
            ),
            "heldout_drupe": with_relative("runs/lab-heldout/encoders/drupe/encoder.safetensors", 0.5, 0.99),
        }
    }
    text = "\n".join(shipped.fifth_decision(results))
    assert "Over 1 counted:" in text and "**Verdict: max_all_relative.**" in text
    assert "| heldout_norm_preserving_sig | 10.0% (heldout/results.json) | no | 0.300 | 0.900 |" in text
    assert "| heldout_drupe_checker_random | not run |" in text
    assert "| heldout_drupe | 0.500 | 0.990 |" in text  # an earlier case: shown, no decision on it


def test_the_sixth_test_stays_with_max_all_unless_every_guarded_case_was_measured(
    suite_results: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def with_both(both_auroc: float, plain_auroc: float) -> dict:
        case = _case("runs/lab-heldout/encoders/drupe/encoder.safetensors", plain_auroc, 0.9, 0.5)
        case["methods"][shipped.MAX_ALL_BOTH] = _entry(both_auroc, 0.99, 0.01, 0.9, 0.01)
        return case

    demo = {"metrics": {"auroc": 0.98}, "tpr_at_bundle_threshold": 0.9, "fpr_at_bundle_threshold": 0.01}
    figures = {"max_all": tmp_path / "plain.json", "max_all_both": tmp_path / "both.json"}
    figures["max_all"].write_text(json.dumps({**demo, "backdoor": {"asr": 0.8}}))
    monkeypatch.setattr(shipped, "DEMO_FIGURES", figures)
    cases = {name: with_both(0.99, 0.9) for name in (*shipped.SIXTH_TEST, *shipped.FIFTH_TEST)}
    # the demo not yet measured under the rule: max_all stays, and the report says why
    text = "\n".join(shipped.sixth_decision({"cases": cases}))
    assert "**Verdict: max_all.**" in text and "not measured under the rule: **the demo bundle**" in text
    figures["max_all_both"].write_text(json.dumps({**demo, "metrics": {"auroc": 0.975}}))
    assert "**Verdict: max_all_both.**" in "\n".join(shipped.sixth_decision({"cases": cases}))
    # the demo falls by more than 0.01: the guard keeps max_all
    figures["max_all_both"].write_text(json.dumps({**demo, "metrics": {"auroc": 0.96}}))
    text = "\n".join(shipped.sixth_decision({"cases": cases}))
    assert "**Verdict: max_all.**" in text and "demo bundle 0.020" in text


def test_the_seventh_test_asks_more_flagged_and_no_guarded_case_worse(
    suite_results: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def with_rules(balanced: tuple[float, float], both: tuple[float, float]) -> dict:
        """(AUROC, TPR at the id threshold) under max_all_both_balanced and under max_all_both."""
        case = _case("runs/lab-heldout/encoders/drupe/encoder.safetensors", 0.9, 0.9, 0.5)
        case["methods"][shipped.MAX_ALL_BOTH_BALANCED] = _entry(balanced[0], balanced[1], 0.01, 0.5, 0.01)
        case["methods"][f"{shipped.MAX_ALL_BOTH} (shipped)"] = _entry(both[0], both[1], 0.01, 0.5, 0.01)
        return case

    demo = {"metrics": {"auroc": 0.98}, "tpr_at_bundle_threshold": 0.9, "fpr_at_bundle_threshold": 0.01}
    figures = {r: tmp_path / f"{r}.json" for r in ("max_all_both", "max_all_both_balanced")}
    figures["max_all_both"].write_text(json.dumps(demo))
    monkeypatch.setattr(shipped, "SEVENTH_DEMO_FIGURES", figures)
    cases = {name: with_rules((0.95, 0.6), (0.95, 0.1)) for name in shipped.SEVENTH_TEST}
    cases |= {
        name: with_rules((0.99, 0.9), (0.99, 0.9)) for name in (*shipped.SIXTH_TEST, *shipped.FIFTH_TEST)
    }
    # the demo not yet measured under the candidate: max_all_both stays, and the report says why
    text = "\n".join(shipped.seventh_decision({"cases": cases}))
    assert "**Verdict: max_all_both.**" in text and "**the demo bundle**" in text
    figures["max_all_both_balanced"].write_text(json.dumps(demo))
    text = "\n".join(shipped.seventh_decision({"cases": cases}))
    assert "**Verdict: max_all_both_balanced.**" in text and "Over 3 counted:" in text
    # the demo flags 3 points fewer at its threshold: over the guard's 2
    figures["max_all_both_balanced"].write_text(json.dumps({**demo, "tpr_at_bundle_threshold": 0.87}))
    text = "\n".join(shipped.seventh_decision({"cases": cases}))
    assert "**Verdict: max_all_both.**" in text and "demo bundle (+0.000 AUROC, -3.0 points)" in text
    figures["max_all_both_balanced"].write_text(json.dumps(demo))
    # more flagged but the mean AUROC 0.01 lower: over the 0.005 allowed
    cases |= {name: with_rules((0.94, 0.6), (0.95, 0.1)) for name in shipped.SEVENTH_TEST}
    text = "\n".join(shipped.seventh_decision({"cases": cases}))
    assert "**Verdict: max_all_both.**" in text and "mean AUROC 0.940 against 0.950" in text
    # no more flagged: the candidate's aim is not met
    cases |= {name: with_rules((0.95, 0.1), (0.95, 0.1)) for name in shipped.SEVENTH_TEST}
    assert "**Verdict: max_all_both.**" in "\n".join(shipped.seventh_decision({"cases": cases}))
    # a counted attack that did not take is not counted (probe ASR 10%)
    cases = {name: with_rules((0.95, 0.6), (0.95, 0.1)) for name in shipped.SEVENTH_TEST}
    cases["heldout_badencoder_sig"]["encoder"] = (
        "runs/lab-heldout/encoders/norm_preserving/encoder.safetensors"
    )
    cases |= {
        name: with_rules((0.99, 0.9), (0.99, 0.9)) for name in (*shipped.SIXTH_TEST, *shipped.FIFTH_TEST)
    }
    text = "\n".join(shipped.seventh_decision({"cases": cases}))
    assert "Over 2 counted:" in text and "**Verdict: max_all_both_balanced.**" in text


def test_the_sixth_tests_verdict_is_withheld_where_a_clip_attack_falls_past_its_guard(
    suite_results: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def with_both(both_auroc: float, plain_auroc: float, encoder: str = "drupe") -> dict:
        case = _case(f"runs/lab-heldout/encoders/{encoder}/encoder.safetensors", plain_auroc, 0.9, 0.5)
        case["methods"][shipped.MAX_ALL_BOTH] = _entry(both_auroc, 0.99, 0.01, 0.9, 0.01)
        return case

    demo = {"metrics": {"auroc": 0.98}, "tpr_at_bundle_threshold": 0.9, "fpr_at_bundle_threshold": 0.01}
    figures = {"max_all": tmp_path / "plain.json", "max_all_both": tmp_path / "both.json"}
    figures["max_all"].write_text(json.dumps({**demo, "backdoor": {"asr": 0.8}}))
    figures["max_all_both"].write_text(json.dumps(demo))
    monkeypatch.setattr(shipped, "DEMO_FIGURES", figures)
    cases = {name: with_both(0.99, 0.9) for name in (*shipped.SIXTH_TEST, *shipped.FIFTH_TEST)}
    # the clean CLIP is a control (its AUROC is the trigger's pixels alone): its fall withholds nothing
    cases["clip_clean"] = with_both(0.70, 0.85)
    text = "\n".join(shipped.sixth_decision({"cases": cases}))
    assert "**Verdict: max_all_both.**" in text and "Withheld" not in text
    cases["clip_poisoned"] = with_both(0.68, 0.77)
    text = "\n".join(shipped.sixth_decision({"cases": cases}))
    assert "**Verdict: max_all_both.**" in text and "**Withheld as the default: `max_all` stays.**" in text
    assert "clip_poisoned 0.680 against 0.770" in text and "clip_clean" not in text


def test_the_calibrated_entry_standardises_each_threshold_on_its_own_calibration_half() -> None:
    """A depth that sits 3 units lower on the deployment's images than on the auxiliary ones, where
    a trigger lifts it by 3.5: standardised on the id calibration images, it crosses the others' clean
    tail (flagged); standardised on OOD images (where it sits with the others), it does not. The id
    threshold is the one `calibrate` gives on the scores of the half that sets it."""
    rng = np.random.default_rng(1)
    shift = np.array([0, 0, 0, 0, 0, 0, -3.0])

    def deployment(n: int) -> np.ndarray:
        return rng.normal(size=(n, 7)) + shift

    triggered = deployment(2000)
    triggered[:, 6] += 3.5
    roots = {
        "ood_cal": rng.normal(size=(1000, 7)),
        "ood_holdout_cal": rng.normal(size=(200, 7)),
        "id_cal": deployment(1000),
        "traffic": deployment(1000),
        "clean": deployment(2000),
        "triggered": triggered,
    }
    auxiliary = (np.zeros(7), np.ones(7))  # the OOD images' units
    entry = shipped._calibrated_entry(roots, np.random.default_rng(0).permutation(200), auxiliary)
    assert entry["auroc"] > 0.9 and entry["id"]["tpr"] > 0.5 and entry["id"]["realised_fpr"] <= 0.03
    assert entry["ood"]["tpr"] < 0.2 and entry["unlabelled_0pct"]["tpr"] > 0.5
    # Each setting's widest median shift in the auxiliary units: the deployment's images sit 3 low.
    assert entry["id"]["widest_shift"] == pytest.approx(-3.0, abs=0.2)
    assert entry["unlabelled_5pct"]["widest_shift"] == pytest.approx(-3.0, abs=0.2)
    assert abs(entry["ood"]["widest_shift"]) < 0.3 and abs(entry["ood_holdout"]["widest_shift"]) < 0.5

    # `--standardise-on auto`: the calibrated figures where the shift reaches a unit (the id and
    # unlabelled settings), the shipped ones where it does not (the OOD settings); AUROC by the id's.
    plain = {
        "auroc": 0.6,
        "auprc": 0.6,
        "tpr_at_1pct_fpr": 0.05,
        **{s: {"threshold": 9.0, "tpr": 0.01, "realised_fpr": 0.01} for s in shipped.SETTINGS},
    }
    auto = shipped._auto_entry(entry, plain)
    assert auto["auroc"] == entry["auroc"] and auto["tpr_at_1pct_fpr"] == entry["tpr_at_1pct_fpr"]
    assert auto["id"] == entry["id"] and auto["unlabelled_1pct"] == entry["unlabelled_1pct"]
    assert auto["ood"] == plain["ood"] and auto["ood_holdout"] == plain["ood_holdout"]
    assert auto["standardised_on"]["id"] == "calibration" and auto["standardised_on"]["ood"] == "auxiliary"
    # On images the auxiliary units describe, auto is the shipped score throughout.
    near = {s: {**entry[s], "widest_shift": 0.4} for s in shipped.SETTINGS}
    assert shipped._auto_entry({**entry, **near}, plain)["auroc"] == plain["auroc"]

    reference = roots["id_cal"][:500]
    centre = np.median(reference, axis=0)
    scale = 1.4826 * np.median(np.abs(reference - centre), axis=0)
    scores = ((roots["id_cal"] - centre) / scale).max(axis=1)
    threshold = shipped.calibrate(scores[:500], scores[500:], shipped.FPR)["value"]
    assert entry["id"]["threshold"] == pytest.approx(threshold)
    assert entry["id"]["tpr"] == pytest.approx(
        (((triggered - centre) / scale).max(axis=1) > threshold).mean()
    )


def test_the_eighth_test_counts_the_new_clip_fine_tunes_and_guards_fpr(
    suite_results: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def with_both(
        calibrated: tuple[float, float, float], plain: tuple[float, float, float], asr: float = 0.9
    ) -> dict:
        """(AUROC, TPR, realised FPR at the id threshold) standardised on the calibration and as shipped."""
        case = _case("runs/lab-clip/attack_badencoder_checker/encoder.safetensors", 0.9, 0.9, 0.5)
        case["attack"] = {"encoder": "badencoder_checker", "asr": asr, "ba": 0.67, "source": "zero-shot"}
        case["methods"][f"{shipped.MAX_ALL} (shipped)"] = _entry(plain[0], plain[1], plain[2], 0.5, 0.01)
        case["methods"][shipped.MAX_ALL_CALIBRATED] = _entry(
            calibrated[0], calibrated[1], calibrated[2], 0.5, 0.01
        )
        return case

    demo = {"metrics": {"auroc": 0.98}, "tpr_at_bundle_threshold": 0.9, "fpr_at_bundle_threshold": 0.01}
    figures = {"max_all": tmp_path / "max_all.json", "calibrated": tmp_path / "calibrated.json"}
    figures["max_all"].write_text(json.dumps(demo))
    monkeypatch.setattr(shipped, "EIGHTH_DEMO_FIGURES", figures)
    cases = {name: with_both((0.97, 0.6, 0.01), (0.90, 0.1, 0.01)) for name in shipped.EIGHTH_TEST}
    cases |= {name: with_both((0.99, 0.9, 0.01), (0.99, 0.9, 0.01)) for name in shipped.EIGHTH_GUARDED}
    # the demo not yet measured with the calibration's statistics: the auxiliary ones stay
    text = "\n".join(shipped.eighth_decision({"cases": cases}))
    assert "**Verdict: auxiliary.**" in text and "**the demo bundle**" in text
    figures["calibrated"].write_text(json.dumps(demo))
    text = "\n".join(shipped.eighth_decision({"cases": cases}))
    assert "**Verdict: calibration.**" in text and "Over 2 counted:" in text
    # a guarded case's realised FPR past 1.5% where max_all's is not: the auxiliary statistics stay
    cases["clip_poisoned"] = with_both((0.99, 0.9, 0.02), (0.99, 0.9, 0.01))
    text = "\n".join(shipped.eighth_decision({"cases": cases}))
    assert "**Verdict: auxiliary.**" in text and "clip_poisoned (2.0% against 1.0%)" in text
    # ... unless max_all's is past it too
    cases["clip_poisoned"] = with_both((0.99, 0.9, 0.02), (0.99, 0.9, 0.02))
    assert "**Verdict: calibration.**" in "\n".join(shipped.eighth_decision({"cases": cases}))
    # a fine-tune that did not take (zero-shot ASR 10%) is not counted; with none counted, nothing changes
    cases |= {name: with_both((0.97, 0.6, 0.01), (0.90, 0.1, 0.01), asr=0.1) for name in shipped.EIGHTH_TEST}
    text = "\n".join(shipped.eighth_decision({"cases": cases}))
    assert "**Verdict: auxiliary.**" in text and "No counted case" in text


def test_the_ninth_test_reads_tpr_at_one_fpr_counts_in_time_and_guards_every_case(
    suite_results: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def with_both(
        calibrated: tuple[float, float, float],
        plain: tuple[float, float, float],
        asr: float = 0.9,
        finished_at: str = "2026-12-07T15:00:00+00:00",
    ) -> dict:
        """(AUROC, TPR at 1% FPR, TPR at the id threshold) standardised on the calibration and as shipped."""
        case = _case("runs/lab-clip/attack_badencoder_noise/encoder.safetensors", 0.9, 0.9, 0.5)
        case["attack"] = {"encoder": "badencoder_noise", "asr": asr, "ba": 0.67, "source": "zero-shot"}
        case["run"] = {"finished_at": finished_at}
        for name, (auroc, at_1pct, tpr_id) in (
            (f"{shipped.MAX_ALL} (shipped)", plain),
            (shipped.MAX_ALL_CALIBRATED, calibrated),
        ):
            case["methods"][name] = {**_entry(auroc, tpr_id, 0.01, 0.5, 0.01), "tpr_at_1pct_fpr": at_1pct}
        return case

    _demo_measured_under_both(tmp_path, monkeypatch)
    # new cases level at 100%; a guarded case 1.5 points below at 1% FPR though 4 below at its id threshold
    cases = {name: with_both((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)) for name in shipped.NINTH_TEST}
    cases["heldout_norm_preserving"] = with_both((0.994, 0.893, 0.866), (0.995, 0.908, 0.906))
    text = "\n".join(shipped.ninth_decision({"cases": cases}))
    assert "**Verdict: calibration.**" in text and "Over 5 counted:" in text
    # a guarded case more than 2 points below at 1% FPR: the auxiliary statistics stay
    cases["heldout_norm_preserving"] = with_both((0.994, 0.87, 0.866), (0.995, 0.908, 0.906))
    text = "\n".join(shipped.ninth_decision({"cases": cases}))
    assert "**Verdict: auxiliary.**" in text and "heldout_norm_preserving (-0.001 AUROC, -3.8 points)" in text
    del cases["heldout_norm_preserving"]
    # the new cases' mean TPR at 1% FPR more than a point below: the auxiliary statistics stay
    cases |= {name: with_both((1.0, 0.97, 1.0), (1.0, 1.0, 1.0)) for name in shipped.NINTH_TEST}
    assert "**Verdict: auxiliary.**" in "\n".join(shipped.ninth_decision({"cases": cases}))
    # a new case scored after the deadline, or whose attack did not take, is not counted
    late = with_both((1.0, 0.5, 0.5), (1.0, 1.0, 1.0), finished_at="2026-12-07T16:40:00+00:00")
    cases |= {name: with_both((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)) for name in shipped.NINTH_TEST}
    cases[shipped.NINTH_TEST[0]] = late
    cases[shipped.NINTH_TEST[1]] = with_both((0.6, 0.0, 0.0), (0.9, 0.5, 0.5), asr=0.1)
    text = "\n".join(shipped.ninth_decision({"cases": cases}))
    assert "Over 3 counted:" in text and "(scored after the deadline)" in text
    # ... but still guarded where it took: the late case is 50 points below
    assert "**Verdict: auxiliary.**" in text


def test_the_tenth_test_counts_the_gated_candidate_and_reads_the_fpr_against_its_noise(
    suite_results: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def with_rules(
        auto: tuple[float, float, float] | None,
        plain: tuple[float, float, float],
        calibrated: tuple[float, float, float] | None = None,
        asr: float = 0.9,
    ) -> dict:
        """(AUROC, TPR at 1% FPR, realised FPR at the id threshold) gated, as shipped, calibrated."""
        case = _case("runs/lab-clip/attack_badencoder_blend/encoder.safetensors", 0.9, 0.9, 0.5)
        case["attack"] = {"encoder": "badencoder_blend", "asr": asr, "ba": 0.67, "source": "zero-shot"}
        case["run"] = {"finished_at": "2026-12-07T19:00:00+00:00"}
        for name, figures in (
            (f"{shipped.MAX_ALL} (shipped)", plain),
            (shipped.MAX_ALL_AUTO, auto),
            (shipped.MAX_ALL_CALIBRATED, calibrated),
        ):
            if figures:
                auroc, at_1pct, fpr = figures
                entry = {**_entry(auroc, 0.5, fpr, 0.5, 0.01), "tpr_at_1pct_fpr": at_1pct}
                entry["id"]["widest_shift"] = 1.2
                if name == shipped.MAX_ALL_AUTO:
                    entry |= {"standardised_on": {"id": "calibration"}, "widest_shift": {"id": 1.2}}
                case["methods"][name] = entry
        return case

    _demo_measured_under_both(tmp_path, monkeypatch)
    new = {
        name: with_rules((1.0, 1.0, 0.012), (0.85, 0.05, 0.011), (1.0, 1.0, 0.012))
        for name in shipped.TENTH_TEST
    }
    # A case scored before the test: the eighth test's candidate stands in (here 34 against 23 false
    # alarms of 2,000, the ninth test's failing case: inside the noise).
    old = {"clip_badencoder_noise": with_rules(None, (0.851, 0.047, 0.0115), (1.0, 1.0, 0.017))}
    text = "\n".join(shipped.tenth_decision({"cases": new | old}))
    assert "**Verdict: auto.**" in text and "Over 2 counted:" in text
    assert "| clip_badencoder_noise | guard |" in text and "statistics from the" in text
    # A guarded case whose false alarms sit beyond max_all's noise (3% against 1%): the default stays.
    old["clip_badencoder_noise"] = with_rules(None, (0.851, 0.047, 0.01), (1.0, 1.0, 0.03))
    text = "\n".join(shipped.tenth_decision({"cases": new | old}))
    assert "**Verdict: auxiliary.**" in text and "clip_badencoder_noise (3.00% against 1.00%)" in text
    del old["clip_badencoder_noise"]
    # A new case without the gated entry is not measured: never the stand-in.
    new[shipped.TENTH_TEST[0]] = with_rules(None, (0.85, 0.05, 0.011), (1.0, 1.0, 0.012))
    text = "\n".join(shipped.tenth_decision({"cases": new}))
    assert "not measured under both" in text and "Over 1 counted:" in text
    # The gated candidate's mean TPR at 1% FPR more than a point below: the default stays.
    new = {name: with_rules((0.9, 0.02, 0.01), (0.9, 0.05, 0.01)) for name in shipped.TENTH_TEST}
    assert "**Verdict: auxiliary.**" in "\n".join(shipped.tenth_decision({"cases": new}))
    # Fine-tunes that did not take: none counted, nothing changes.
    new = {name: with_rules((1.0, 1.0, 0.01), (0.9, 0.05, 0.01), asr=0.1) for name in shipped.TENTH_TEST}
    text = "\n".join(shipped.tenth_decision({"cases": new}))
    assert "**Verdict: auxiliary.**" in text and "No counted case" in text


def test_add_missing_adds_only_the_entries_a_case_lacks_and_says_what_did_not_come_back() -> None:
    case = _case("runs/lab-clip/attack_badencoder_blend/encoder.safetensors", 0.9, 0.9, 0.5)
    case["run"] = {"finished_at": "2026-12-07T17:56:00+00:00"}
    kept = json.loads(json.dumps(case))
    fresh = json.loads(json.dumps(case))
    fresh["run"] = {"finished_at": "2026-12-07T19:30:00+00:00"}
    fresh["methods"][shipped.MAX_ALL_BOTH_AUTO] = _entry(1.0, 1.0, 0.01, 0.5, 0.01)
    assert shipped.add_missing_methods(case, fresh) == [shipped.MAX_ALL_BOTH_AUTO]
    assert case["run"] == kept["run"] and all(case["methods"][m] == v for m, v in kept["methods"].items())
    record = case["added_methods"][shipped.MAX_ALL_BOTH_AUTO]
    assert record == {"run": fresh["run"], "earlier_figures_not_reproduced": []}
    # A rescoring whose earlier figure moved: the figure kept is the recorded one, and the move is said.
    fresh["methods"]["dede_sse"] = _entry(0.7, 0.2, 0.01, 0.1, 0.0)
    fresh["methods"]["another"] = _entry(0.6, 0.1, 0.01, 0.1, 0.0)
    assert shipped.add_missing_methods(case, fresh) == ["another"]
    assert case["methods"]["dede_sse"] == kept["methods"]["dede_sse"]
    assert case["added_methods"]["another"]["earlier_figures_not_reproduced"] == ["dede_sse"]
    assert shipped.add_missing_methods(case, fresh) == []
    # A field added to an entry since it was recorded (a threshold's depth shift) is not a change.
    sse = kept["methods"]["dede_sse"]
    fresh["methods"]["dede_sse"] = sse | {"id": {**sse["id"], "widest_shift": -1.3}}
    fresh["methods"]["newest"] = _entry(0.6, 0.1, 0.01, 0.1, 0.0)
    assert shipped.add_missing_methods(case, fresh) == ["newest"]
    assert case["added_methods"]["newest"]["earlier_figures_not_reproduced"] == []
