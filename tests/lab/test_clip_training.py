"""The lab CLIP: its loss, poisoned pairs, zero-shot classification, and resumable training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")

from training.clip import (  # noqa: E402
    TEMPLATES,
    ClipSettings,
    caption_tokens,
    class_text_embeddings,
    load_clip,
    multi_positive_clip_loss,
    poison_pairs,
    train_clip,
    zero_shot_predict,
)
from training.triggers import white_square  # noqa: E402

NAMES = ["red", "green"]


def test_multi_positive_loss_is_lowest_when_each_image_matches_its_class_captions() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    class_dirs = F.normalize(torch.randn(2, 8), dim=1)
    images = class_dirs[labels]
    texts = class_dirs[labels]
    scale = torch.tensor(20.0)
    aligned = multi_positive_clip_loss(images, texts, labels, scale)
    swapped = multi_positive_clip_loss(images, texts[[2, 3, 0, 1]], labels, scale)
    assert aligned < swapped
    # Two positives per row share the mass: the floor is log(2), reached when they tie.
    assert aligned.item() == pytest.approx(math.log(2), abs=0.05)


def test_poisoned_pairs_trigger_non_target_images_and_caption_them_as_the_target() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, (200, 3, 32, 32), dtype=np.uint8)
    labels = np.repeat(np.arange(4), 50)
    trigger = white_square((32, 32))
    out, new_labels, chosen = poison_pairs(images, labels, trigger.apply_uint8_nchw, 0, 0.05, seed=1)
    assert len(chosen) == 10 and (labels[chosen] != 0).all()
    assert (new_labels[chosen] == 0).all()
    assert (out[chosen][:, :, 21:31, 21:31] == 255).all()
    untouched = np.setdiff1d(np.arange(200), chosen)
    assert np.array_equal(out[untouched], images[untouched]) and np.array_equal(
        new_labels[untouched], labels[untouched]
    )


def _two_colour_set(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: reddish images, class 1: greenish; easy enough for a few steps of a tiny CLIP."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, (n, 3, 32, 32)).astype(np.uint8)
    images[labels == 0, 0] += 180
    images[labels == 1, 1] += 180
    return images, labels


def test_tiny_clip_learns_zero_shot_and_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = _two_colour_set(512)
    settings = ClipSettings(model="tiny-rn-32", epochs=4, batch_size=64, lr=3e-3, warmup_steps=2)
    whole = train_clip(images, labels, NAMES, tmp_path / "whole", settings, (images, labels), progress=False)
    history = json.loads((tmp_path / "whole" / "history.json").read_text())
    assert history["finished"] and len(history["loss"]) == 4
    clip = load_clip(whole)
    text = class_text_embeddings(clip, caption_tokens(NAMES, 16))
    accuracy = (zero_shot_predict(clip, images, text) == labels).mean()
    assert accuracy > 0.9, accuracy

    # A run killed during its second epoch's evaluation, then started again: it resumes from the
    # first epoch's checkpoint and ends with the same weights as the run in one go.
    import training.clip as clip_module

    calls = []

    def crash_on_second_epoch(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return zero_shot_predict(*args, **kwargs)

    monkeypatch.setattr(clip_module, "zero_shot_predict", crash_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_clip(images, labels, NAMES, tmp_path / "split", settings, (images, labels), progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "split" / "clip.safetensors").exists()
    resumed = load_clip(
        train_clip(images, labels, NAMES, tmp_path / "split", settings, (images, labels), progress=False)
    )
    assert len(json.loads((tmp_path / "split" / "history.json").read_text())["loss"]) == 4
    for (name, a), b in zip(clip.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


def test_caption_tokens_cover_every_template_of_every_class() -> None:
    tokens = caption_tokens(NAMES, 16)
    assert tokens.shape == (2, len(TEMPLATES), 16)
    assert not torch.equal(tokens[0], tokens[1])
