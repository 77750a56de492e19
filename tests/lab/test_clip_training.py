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

from lab.attacks.triggers import white_square  # noqa: E402
from lab.clip_training import (  # noqa: E402
    TEMPLATES,
    ClipSettings,
    caption_tokens,
    class_text_embeddings,
    colour_captions,
    colour_name,
    load_clip,
    multi_positive_clip_loss,
    poison_pairs,
    train_clip,
    zero_shot_predict,
)

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
    import lab.clip_training as clip_module

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


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((0.9, 0.1, 0.1), "red"),
        ((0.95, 0.6, 0.1), "orange"),
        ((0.5, 0.25, 0.1), "brown"),
        ((0.9, 0.9, 0.2), "yellow"),
        ((0.2, 0.7, 0.2), "green"),
        ((0.2, 0.3, 0.8), "blue"),
        ((0.6, 0.2, 0.8), "purple"),
        ((0.9, 0.3, 0.6), "pink"),
        ((0.1, 0.1, 0.12), "black"),
        ((0.4, 0.4, 0.41), "gray"),
        ((0.65, 0.65, 0.66), "silver"),
        ((0.95, 0.95, 0.94), "white"),
    ],
)
def test_colour_names(rgb: tuple[float, float, float], name: str) -> None:
    assert colour_name(rgb) == name


def _framed(middle: tuple[int, int, int], surround: tuple[int, int, int], size: int = 32) -> np.ndarray:
    """An image of one colour with a centred square of another covering its central half."""
    image = np.empty((3, size, size), np.uint8)
    image[:] = np.array(surround, np.uint8)[:, None, None]
    q = size // 4
    image[:, q : size - q, q : size - q] = np.array(middle, np.uint8)[:, None, None]
    return image


def test_colour_captions_name_the_middle_and_the_surround_and_share_ids() -> None:
    red, blue, green = (230, 25, 25), (50, 80, 210), (50, 180, 50)
    images = np.stack([_framed(red, blue), _framed(green, blue), _framed(red, blue), _framed(red, green)])
    names, ids = colour_captions(images, np.array([0, 1, 0, 0]), NAMES)
    subjects = [names[i] for i in ids]
    assert subjects == ["red red on blue", "green green on blue", "red red on blue", "red red on green"]
    assert ids[0] == ids[2] and len(set(ids.tolist())) == 3 and len(names) == 3


def test_caption_tokens_refuse_a_caption_the_text_tower_would_cut() -> None:
    with pytest.raises(ValueError, match="tokens, the text tower takes 16"):
        caption_tokens(["very " * 12 + "long name"], 16)


def test_training_pairs_each_image_with_its_own_caption_subject(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With colour captions the loss's positives are the images of the same subject, and the text
    tower reads that subject's captions, not the class's."""
    import lab.clip_training as clip_module

    images, labels = _two_colour_set(128)
    ring = np.ones((32, 32), bool)
    ring[8:-8, 8:-8] = False
    images[64:, :, ring] = np.array([40, 60, 220], np.uint8)[:, None]  # half, across both classes
    subjects, ids = colour_captions(images, labels, NAMES)
    assert len(subjects) == 4
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    build_clip = clip_module.build_clip

    def recording_clip(name: str) -> torch.nn.Module:
        model = build_clip(name)
        forward = model.forward

        def record(image: torch.Tensor, text: torch.Tensor) -> object:
            seen.append((text.clone(), None))
            return forward(image, text)

        model.forward = record
        return model

    def recording_loss(
        image_f: torch.Tensor, text_f: torch.Tensor, y: torch.Tensor, scale: torch.Tensor
    ) -> object:
        seen[-1] = (seen[-1][0], y.clone())
        return multi_positive_clip_loss(image_f, text_f, y, scale)

    monkeypatch.setattr(clip_module, "build_clip", recording_clip)
    monkeypatch.setattr(clip_module, "multi_positive_clip_loss", recording_loss)
    settings = ClipSettings(model="tiny-rn-32", epochs=1, batch_size=64, warmup_steps=1)
    train_clip(images, labels, NAMES, tmp_path / "run", settings, progress=False, captions=(subjects, ids))
    subject_tokens = caption_tokens(subjects, 16)
    assert len(seen) == 2
    for text, y in seen:
        assert set(y.tolist()) == {0, 1, 2, 3}  # subject ids, not the two classes
        for row, subject in zip(text, y.tolist(), strict=True):
            assert any(torch.equal(row, t) for t in subject_tokens[subject])
    with pytest.raises(ValueError, match="captions for"):
        train_clip(
            images, labels, NAMES, tmp_path / "bad", settings, progress=False, captions=(subjects, ids[:-1])
        )
