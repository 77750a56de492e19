"""The lab's score variants and diagnostics against the shipped score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lab.attacks.triggers import make_trigger
from lab.score_variants import (
    feature_space_scores,
    score_parts,
    score_run_several_masks,
)
from models.bundle import InputSpec
from models.feature_taps import stage_module
from training.data import load_images
from training.fit import load_run
from training.scoring import score_run


def _images(tiny_data: dict[str, Path], run_dir: Path) -> np.ndarray:
    run = load_run(run_dir)
    spec = InputSpec(height=32, width=32, mean=run.encoder.mean, std=run.encoder.std)
    images, _ = load_images(str(tiny_data["clean"]), spec)
    return images[:40]


def test_with_no_visible_patch_every_mask_is_the_shipped_score(tiny_data: dict, tiny_run: Path) -> None:
    run, images = load_run(tiny_run), _images(tiny_data, tiny_run)
    assert int(run.config.num_patches * (1 - run.config.mask_ratio_test)) == 0  # 64 patches at 0.99
    several = score_run_several_masks(run, images, run.config.mask_ratio_test, n_masks=3)
    np.testing.assert_allclose(several, score_run(run, images, "sse"), rtol=1e-5)


def test_visible_patches_change_the_score_and_it_stays_deterministic(tiny_data: dict, tiny_run: Path) -> None:
    run, images = load_run(tiny_run), _images(tiny_data, tiny_run)
    at_09 = score_run_several_masks(run, images, 0.9, n_masks=4)
    assert not np.allclose(at_09, score_run(run, images, "sse"), rtol=1e-3)
    one_by_one = np.concatenate(
        [score_run_several_masks(run, images[i : i + 1], 0.9, n_masks=4) for i in range(len(images))]
    )
    np.testing.assert_allclose(one_by_one, at_09, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sse", "max_patch"])
def test_score_parts_mix_pixels_and_embeddings_of_the_pair(
    tiny_data: dict, tiny_run: Path, kind: str
) -> None:
    run, clean = load_run(tiny_run), _images(tiny_data, tiny_run)
    triggered = make_trigger("patch", (32, 32)).apply_uint8_nchw(clean)
    parts = score_parts(run, clean, triggered, kind, batch_size=16)
    # The pure cases are the shipped scores of each set.
    np.testing.assert_allclose(parts["own"], score_run(run, clean, kind), rtol=1e-5)
    np.testing.assert_allclose(parts["both"], score_run(run, triggered, kind), rtol=1e-5)
    # The mixed ones are neither: each differs from both pure cases.
    for mixed in ("embedding_only", "pixels_only"):
        assert not np.allclose(parts[mixed], parts["own"], rtol=1e-4)
        assert not np.allclose(parts[mixed], parts["both"], rtol=1e-4)
    # Unchanged pixels and embeddings: all four agree.
    same = score_parts(run, clean, clean, kind)
    for values in same.values():
        np.testing.assert_allclose(values, same["own"], rtol=1e-6)


def test_score_parts_refuses_unpaired_sets(tiny_data: dict, tiny_run: Path) -> None:
    run, clean = load_run(tiny_run), _images(tiny_data, tiny_run)
    with pytest.raises(ValueError, match="paired"):
        score_parts(run, clean, clean[:-1])


def _stage3(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CIFAR ResNet's layer-3 feature map, computed by hand (no hooks)."""
    out = torch.relu(encoder.bn1(encoder.conv1(x)))
    return encoder.layer3(encoder.layer2(encoder.layer1(out)))


def test_feature_space_scores_match_a_hand_computation(tiny_data: dict, tiny_run: Path) -> None:
    run, images = load_run(tiny_run), _images(tiny_data, tiny_run)[:12]
    scores = feature_space_scores(run, images, stages=("layer3",), batch_size=5)
    encoder, detector = run.encoder.module.eval(), run.detector("sse")
    with torch.no_grad():
        batch = torch.from_numpy(images)
        _, rebuild = detector(batch)
        of_input = _stage3(encoder, detector.head.normalize(batch))
        of_rebuild = _stage3(encoder, rebuild)
    expected_norm = of_input.pow(2).flatten(1).sum(1).numpy()
    expected_distance = (of_input - of_rebuild).pow(2).flatten(1).sum(1).numpy()
    np.testing.assert_allclose(scores["activation_norm_layer3"], expected_norm, rtol=1e-4)
    np.testing.assert_allclose(scores["feature_layer3"], expected_distance, rtol=1e-4)
    assert (expected_distance > 0).all()  # a rebuild is never the input itself


def test_feature_space_scores_name_a_missing_stage(tiny_data: dict, tiny_run: Path) -> None:
    run, images = load_run(tiny_run), _images(tiny_data, tiny_run)[:2]
    with pytest.raises(ValueError, match="no stage named block9"):
        feature_space_scores(run, images, stages=("layer3", "block9"))


def test_stage_module_finds_a_stage_by_its_dotted_ending_and_refuses_an_ambiguous_one() -> None:
    visual = torch.nn.ModuleDict({"layer2": torch.nn.Identity(), "layer3": torch.nn.ReLU()})
    tower = torch.nn.ModuleDict({"visual": visual})
    assert stage_module(tower, "layer3") is visual["layer3"]
    assert stage_module(tower, "visual.layer2") is visual["layer2"]
    twins = torch.nn.ModuleDict({"a": torch.nn.ModuleDict({"layer3": torch.nn.ReLU()}), "b": visual})
    with pytest.raises(ValueError, match="ambiguous.*a.layer3, b.layer3"):
        stage_module(twins, "layer3")
    with pytest.raises(ValueError, match="no stage named layer9"):
        stage_module(tower, "layer9")
