"""The lab report's goal lines: read on the shipped score, only where the attack took."""

from __future__ import annotations

from lab.report import _goal_lines


def _metrics(auroc: float, tpr: float, fpr: float) -> dict:
    return {"auroc": auroc, "calibrated": {"tpr_triggered_test": tpr, "realised_fpr_clean_test": fpr}}


def _results(**per_attack: tuple[float, dict]) -> dict:
    return {
        "encoders": {a: {"probe": {"cifar10": {"asr": asr}}} for a, (asr, _) in per_attack.items()},
        "detection": {
            f"{a}/ood": {"dede_shipped": m, "activation_norm_layer3": {"auroc": 0.97}}
            for a, (_, m) in per_attack.items()
        },
    }


def test_goals_are_read_on_the_default_score_and_need_both_tpr_and_fpr() -> None:
    lines = _goal_lines(
        _results(
            badencoder=(0.999, _metrics(0.995, 0.93, 0.012)),
            norm_preserving=(0.99, _metrics(0.995, 0.93, 0.031)),  # TPR met, but at 3.1% FPR
            drupe=(0.98, _metrics(0.95, 0.40, 0.01)),
        ),
        "dede_shipped",
    )
    text = "\n".join(lines)
    assert "default score `dede_shipped`" in text
    badencoder = next(line for line in lines if line.startswith("- badencoder:"))
    assert "auroc 0.995 (goal >= 0.99: met)" in badencoder
    assert "calibrated_tpr 0.930 at realised FPR 0.012 (goal >= 0.9: met)" in badencoder
    assert "activation_norm_layer3 AUROC 0.970 (DeDe ahead)" in badencoder
    norm = next(line for line in lines if line.startswith("- norm_preserving:"))
    assert "calibrated_tpr 0.930 at realised FPR 0.031 (goal >= 0.9: MISSED)" in norm
    drupe = next(line for line in lines if line.startswith("- drupe:"))
    assert "auroc 0.950 (goal >= 0.99: MISSED)" in drupe and "DeDe NOT ahead" in drupe
    assert "- ctrl: not measured" in lines


def test_an_attack_that_did_not_take_is_reported_without_a_goal() -> None:
    lines = _goal_lines(_results(ctrl=(0.047, _metrics(0.51, 0.01, 0.01))), "dede_shipped")
    assert "held-out" not in "\n".join(lines)
    ctrl = next(line for line in lines if line.startswith("- ctrl:"))
    assert ctrl == "- ctrl: the attack did not take (probe ASR 4.7%): no goal read; AUROC 0.510"


def test_the_held_out_auxiliary_threshold_is_read_beside_the_calibration_set() -> None:
    metrics = _metrics(0.999, 0.30, 0.0) | {
        "calibrated_holdout": {"tpr_triggered_test": 0.96, "realised_fpr_clean_test": 0.011}
    }
    lines = _goal_lines(_results(drupe=(0.98, metrics)), "dede_shipped")
    drupe = next(line for line in lines if line.startswith("- drupe:"))
    assert "calibrated_tpr 0.300 at realised FPR 0.000 (goal >= 0.9: MISSED)" in drupe
    assert "at the held-out auxiliary threshold 0.960 at realised FPR 0.011 (met)" in drupe


def test_a_shipped_detection_outside_the_suites_detections_is_refused() -> None:
    import dataclasses

    import pytest

    from lab.suite import SUITES

    with pytest.raises(ValueError, match=r"\('drupe', 'id'\).*not among its detections"):
        dataclasses.replace(SUITES["smoke"], shipped_detections=(("drupe", "id"),))
