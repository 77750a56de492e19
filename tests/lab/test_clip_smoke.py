"""The CLIP smoke suite end to end on the real data (marked `lab`; skipped without the data files)."""

from __future__ import annotations

import json

import pytest

from lab.suite import REPO_ROOT, missing_data

pytest.importorskip("open_clip")


@pytest.mark.lab
def test_clip_smoke_suite_runs_and_reports() -> None:
    if missing_data():
        pytest.skip("DEDE_DATA_DIR lacks the lab's data files")
    from lab.clip_suite import CLIP_ENCODERS, CLIP_SUITES
    from lab.runner import run_clip_suite

    results = run_clip_suite("clip-smoke", progress=False)
    assert set(results["zero_shot"]) == set(CLIP_ENCODERS)
    for name in CLIP_ENCODERS:
        metrics = results["detection"][f"{name}/ood"]
        assert {"dede_tiny_sse", "dede_tiny_max_patch", "knn_distance", "strip", "embedding_norm"} <= set(
            metrics
        )
        assert 0 <= metrics["dede_tiny_sse"]["auroc"] <= 1
        # The feature-space variant in the tower's stages (`visual.layer3`), with its decoder-free cue.
        assert {"dede_tiny_feature_layer3", "activation_norm_layer3"} <= set(metrics)
        assert (
            metrics["dede_tiny_feature_layer3"]["n_triggered_test"]
            == metrics["dede_tiny_sse"]["n_triggered_test"]
        )
        # The score split: its "both" part is the triggered score, so its AUROC (same images) is close.
        parts = results["score_parts"][f"{name}/ood"]["dede_tiny_sse"]
        assert parts["n_images"] == metrics["dede_tiny_sse"]["n_triggered_test"]
        assert set(parts) == {
            "auroc_both",
            "auroc_embedding_only",
            "auroc_pixels_only",
            "paired_rise_embedding_only",
            "paired_rise_pixels_only",
            "n_images",
        }
        assert 0 <= parts["paired_rise_embedding_only"] <= 1
    assert set(results["decoders"]) == set(CLIP_ENCODERS)
    assert all(0 < loss < 10 for d in results["decoders"].values() for loss in d.values())
    assert results["training"]["clip_clean"]["captions"] == "colours"
    assert results["training"]["clip_clean"]["n_caption_subjects"] > 10  # more than the class names
    content = results["embedding_content"]["encoders"]
    assert set(content) == {*CLIP_ENCODERS, "untrained"}
    for row in content.values():
        assert 1 <= row["participation_ratio"] <= row["embedding_dim"] and row["thumbnail_r2"] <= 1
    written = REPO_ROOT / CLIP_SUITES["clip-smoke"].root / "report" / "results.json"
    assert json.loads(written.read_text())["zero_shot"] == json.loads(json.dumps(results["zero_shot"]))
    report = (written.parent / "REPORT.md").read_text()
    assert report.count("| **dede_tiny_sse** |") == len(CLIP_ENCODERS)
    assert "## Why: the score split" in report
    assert "### How much of the image the embeddings keep" in report
