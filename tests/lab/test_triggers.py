"""Triggers act in pixel space: the patch replaces exactly its pixels, CTRL's is a small, fixed change."""

from __future__ import annotations

import numpy as np

from lab.attacks.ctrl import poison_with_ctrl
from lab.attacks.triggers import FrequencyTrigger, apply_to_nhwc, dct_matrix, make_trigger


def smooth_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3]: blocky colour fields plus noise (cheap, image-like)."""
    rng = np.random.default_rng(seed)
    images = np.kron(rng.random((n, 4, 4, 3)), np.ones((1, size // 4, size // 4, 1)))
    return (np.clip(images + rng.normal(0, 0.03, images.shape), 0, 1) * 255).astype(np.uint8)


def test_patch_is_white_square_in_pixel_space() -> None:
    images = smooth_images(4).transpose(0, 3, 1, 2).copy()
    triggered = make_trigger("patch").apply_uint8_nchw(images)
    assert (triggered[:, :, 21:31, 21:31] == 255).all()
    outside = np.ones((32, 32), bool)
    outside[21:31, 21:31] = False
    # Untouched outside the patch: the reference code's post-normalization paste would change them.
    assert (triggered[:, :, outside] == images[:, :, outside]).all()


def test_dct_is_orthonormal() -> None:
    c = dct_matrix(32)
    assert np.allclose(c @ c.T, np.eye(32), atol=1e-10)


def test_ctrl_trigger_is_small_deterministic_and_visible_to_the_dct() -> None:
    images = smooth_images(3).transpose(0, 3, 1, 2).copy()
    trigger = FrequencyTrigger()
    once, twice = trigger.apply_uint8_nchw(images), trigger.apply_uint8_nchw(images)
    assert (once == twice).all()
    change = np.abs(once.astype(int) - images.astype(int))
    assert 0 < change.mean() < 10 and change.max() <= 40
    # A zero-magnitude trigger leaves the image as it was (up to rounding of the colour transform).
    same = FrequencyTrigger(magnitude=0.0).apply_uint8_nchw(images)
    assert np.abs(same.astype(int) - images.astype(int)).max() <= 1


def test_ctrl_poisons_only_target_class_at_rate() -> None:
    images = smooth_images(200)
    labels = np.repeat(np.arange(4), 50)
    poisoned, chosen = poison_with_ctrl(images, labels, target_class=2, rate=0.05)
    assert len(chosen) == 10 and (labels[chosen] == 2).all()
    changed = np.flatnonzero((poisoned != images).any(axis=(1, 2, 3)))
    assert set(changed) <= set(chosen)
    assert (apply_to_nhwc(FrequencyTrigger(), images[chosen]) == poisoned[chosen]).all()
