"""`--limit` draws its images at random: data sets sorted by class must not give one class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.bundle import InputSpec
from training.data import DataError, limited, limited_indices, load_images

SPEC = InputSpec(height=8, width=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture
def sorted_by_class(tmp_path: Path) -> Path:
    """Five classes of 100 images, class after class (as ../shared/data's files are); each image's
    pixels hold its own index, so a drawn image can be traced back."""
    index = np.arange(500)
    x = np.broadcast_to((index % 251).astype(np.uint8)[:, None, None, None], (500, 8, 8, 3)).copy()
    path = tmp_path / "sorted.npz"
    np.savez(path, x=x, y=index // 100)
    return path


def test_a_limit_draws_from_every_class_not_the_first_images(sorted_by_class: Path) -> None:
    images, labels = load_images(str(sorted_by_class), SPEC, limit=100)
    assert len(images) == 100 and set(labels.tolist()) == {0, 1, 2, 3, 4}
    assert np.all(np.diff(labels) >= 0)  # kept in source order
    again, labels_again = load_images(str(sorted_by_class), SPEC, limit=100)
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)  # the same draw


def test_the_draw_is_fixed_and_a_larger_limit_keeps_everything() -> None:
    drawn = limited_indices(1000, 10)
    assert np.array_equal(drawn, limited_indices(1000, 10)) and len(set(drawn.tolist())) == 10
    assert not np.array_equal(drawn, np.arange(10))
    assert np.array_equal(limited_indices(7, 50), np.arange(7))
    assert np.array_equal(limited_indices(7, None), np.arange(7))
    with pytest.raises(DataError, match="positive --limit"):
        limited_indices(7, 0)


def test_a_limited_source_is_named_as_drawn() -> None:
    assert limited("cifar10_test", None) == "cifar10_test"
    assert limited("cifar10_test", 1000) == "cifar10_test (1000 drawn at random, seed 0)"


def test_the_demo_sets_are_disjoint_random_draws_over_every_class() -> None:
    from lab.demo import CALIBRATION_IMAGES, FIT_IMAGES, SHADOW_IMAGES, demo_splits

    train_y, test_y = np.repeat(np.arange(10), 1700), np.repeat(np.arange(10), 1000)  # sorted by class
    splits = demo_splits(len(train_y), len(test_y))
    assert (len(splits["shadow"]), len(splits["fit"])) == (SHADOW_IMAGES, FIT_IMAGES)
    assert len(splits["calibration"]) == CALIBRATION_IMAGES
    assert not set(splits["shadow"].tolist()) & set(splits["fit"].tolist())
    assert not set(splits["calibration"].tolist()) & set(splits["evaluation"].tolist())
    assert len(splits["calibration"]) + len(splits["evaluation"]) == len(test_y)
    for name, labels in (("shadow", train_y), ("fit", train_y), ("calibration", test_y)):
        counts = np.bincount(labels[splits[name]], minlength=10)
        assert counts.min() > 0.7 * counts.mean(), (name, counts)  # no class left out or dominant
