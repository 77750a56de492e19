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


# --- the trigger families beside the white square ---------------------------------------------

from lab.attacks.triggers import (  # noqa: E402
    PATCH_FAMILIES,
    TRIGGER_FAMILIES,
    AdditiveTrigger,
    BlendTrigger,
    PatchTrigger,
    WarpTrigger,
)


def _nchw(n: int = 6, seed: int = 0) -> np.ndarray:
    return smooth_images(n, seed=seed).transpose(0, 3, 1, 2).copy()


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: where any channel differs."""
    return (a != b).any(axis=1)


def test_every_family_is_deterministic_uint8_and_changes_the_image() -> None:
    images = _nchw()
    for family in (*TRIGGER_FAMILIES, *(f"{p}@random" for p in PATCH_FAMILIES)):
        trigger = make_trigger(family)
        once, twice = trigger.apply_uint8_nchw(images), trigger.apply_uint8_nchw(images)
        assert once.dtype == np.uint8 and once.shape == images.shape, family
        assert (once == twice).all(), family  # same bytes in, same bytes out
        assert _changed(once, images).any(axis=(1, 2)).all(), family  # every image carries it


def test_checker_is_a_high_contrast_pattern_only_inside_its_box() -> None:
    images = _nchw()
    triggered = make_trigger("checker").apply_uint8_nchw(images)
    box = triggered[:, :, 24:30, 24:30]
    assert set(np.unique(box)) == {0, 255}  # black and white cells, nothing else
    assert (box[:, :, 0:2, 0:2] != box[:, :, 0:2, 2:4]).all()  # neighbouring 2 px cells alternate
    outside = np.ones((32, 32), bool)
    outside[24:30, 24:30] = False
    assert (triggered[:, :, outside] == images[:, :, outside]).all()


def test_noise_patch_is_the_same_fixed_noise_on_every_image() -> None:
    triggered = make_trigger("noise").apply_uint8_nchw(_nchw())
    patch = triggered[:, :, 22:30, 22:30]
    assert (patch == patch[:1]).all()  # one fixed pattern, whatever the image
    assert patch.std() > 50  # noise: values spread over the range


def test_random_position_moves_the_same_patch() -> None:
    images = np.zeros((40, 3, 32, 32), np.uint8)  # black: the white square shows where it went
    fixed = make_trigger("patch").apply_uint8_nchw(images)
    moved = make_trigger("patch@random").apply_uint8_nchw(images)
    assert (_changed(moved, images).sum(axis=(1, 2)) == 100).all()  # the whole 10x10 square, every time
    corners = {
        tuple(np.argwhere(_changed(m[None], z[None])[0]).min(0)) for m, z in zip(moved, images, strict=True)
    }
    assert len(corners) > 10  # it moves
    assert tuple(np.argwhere(_changed(fixed, images)[0]).min(0)) == (21, 21)


def test_random_position_draws_from_the_training_generator() -> None:
    import torch

    trigger = make_trigger("noise@random")
    x = torch.zeros(8, 3, 32, 32)
    a = trigger.apply_torch(x, torch.Generator().manual_seed(1))
    b = trigger.apply_torch(x, torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)


def test_blend_is_a_full_image_alpha_blend() -> None:
    images = _nchw()
    trigger = make_trigger("blend")
    assert isinstance(trigger, BlendTrigger) and 0.1 <= trigger.alpha <= 0.2
    expected = images / 255.0 * (1 - trigger.alpha) + trigger.image * trigger.alpha
    got = trigger.apply_uint8_nchw(images).astype(np.float64) / 255.0
    assert np.abs(got - expected).max() <= 0.5 / 255 + 1e-6
    assert _changed(trigger.apply_uint8_nchw(images), images).mean() > 0.8  # the whole image


def test_invisible_trigger_is_low_amplitude_everywhere() -> None:
    images = _nchw()
    trigger = make_trigger("invisible")
    assert isinstance(trigger, AdditiveTrigger)
    change = np.abs(trigger.apply_uint8_nchw(images).astype(int) - images.astype(int))
    assert change.max() <= 6  # at most 6/255: invisible
    assert (change > 0).mean() > 0.9  # but everywhere (clamping spares only saturated pixels)


def test_sig_adds_the_same_horizontal_sine_to_every_row_and_channel() -> None:
    trigger = make_trigger("sig")
    assert isinstance(trigger, AdditiveTrigger)
    grey = np.full((2, 3, 32, 32), 128, np.uint8)  # mid-grey: no clamping
    change = trigger.apply_uint8_nchw(grey).astype(int) - 128
    columns = np.rint(20 * np.sin(2 * np.pi * 6 * np.arange(32) / 32))
    assert (np.abs(change - columns) <= 1).all()  # 20/255 amplitude, 6 periods across the width
    assert change.max() == 20 and change.min() == -20
    assert (change == change[:, :1, :1, :]).all()  # every row and channel alike


def test_warp_moves_pixels_smoothly_without_adding_any() -> None:
    import torch

    trigger = make_trigger("warp")
    assert isinstance(trigger, WarpTrigger)
    displacement_px = np.abs(trigger.flow) * (31 / 2)
    assert 0.3 < displacement_px.mean() < 2 and displacement_px.max() < 6  # about a pixel
    # Smooth: neighbouring displacements differ far less than the displacements themselves.
    assert np.abs(np.diff(trigger.flow, axis=0)).mean() < 0.2 * np.abs(trigger.flow).mean()
    # A constant image stays constant: resampling adds no pixel value.
    flat = torch.full((2, 3, 32, 32), 0.4)
    assert torch.allclose(trigger.apply_torch(flat), flat, atol=1e-6)
    # A horizontal ramp is shifted, so its values change inside the image.
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32).contiguous()
    assert (trigger.apply_torch(ramp) - ramp).abs().max() > 0.01


def test_warp_near_miss_is_the_field_plus_at_most_half_a_pixel_of_noise() -> None:
    import torch

    trigger = make_trigger("warp")
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(4, 3, 32, 32).contiguous()
    triggered = trigger.apply_torch(ramp)
    near = trigger.near_miss(ramp, torch.Generator().manual_seed(0))
    # On a ramp of 1/31 per pixel, half a pixel of horizontal displacement changes a value by at most
    # 1/62; the noise is drawn per image, so the images differ from each other as well.
    gap = (near - triggered).abs()
    assert gap.mean() > 0.002 and gap.max() <= 0.5 / 31 + 1e-6
    assert (near[0] - near[1]).abs().max() > 0.001


def test_torch_and_uint8_forms_are_one_rule() -> None:
    import torch

    images = _nchw()
    for family in ("patch", "checker", "noise", "blend", "invisible", "sig", "warp"):
        trigger = make_trigger(family)
        x = torch.from_numpy(images).float() / 255
        via_torch = np.clip(np.rint(trigger.apply_torch(x).numpy() * 255), 0, 255).astype(np.uint8)
        assert (via_torch == trigger.apply_uint8_nchw(images)).all(), family


def test_random_position_refused_for_image_wide_triggers() -> None:
    import pytest

    with pytest.raises(ValueError, match="patch families"):
        make_trigger("blend@random")
    assert isinstance(make_trigger("checker@random"), PatchTrigger)
