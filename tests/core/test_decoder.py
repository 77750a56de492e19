"""The decoder's shapes, its deterministic test-time mask, and the detector's numerics."""

from __future__ import annotations

import numpy as np
import torch

from models.decoder import DeDeDecoder, fixed_visible_patches, patchify, preset_config, unpatchify
from models.detector import Detector, DetectorHead
from models.encoders import load_encoder


def _detector(preset: str = "tiny", **overrides: float) -> Detector:
    torch.manual_seed(0)
    encoder = load_encoder("random:cifar_resnet18", width=8)
    config = preset_config(preset, 32, **overrides)
    decoder = DeDeDecoder(config, encoder.identity.embedding_dim)
    head = DetectorHead(decoder, fixed_visible_patches(config), encoder.mean, encoder.std)
    return Detector(encoder.module, head).eval()


def test_patchify_round_trip_and_order() -> None:
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # the second patch is the top-right 4x4 block, channel-last inside the patch
    assert patches[0, 1, 0] == images[0, 0, 0, 4] and patches[0, 1, 1] == images[0, 1, 0, 4]
    assert torch.equal(unpatchify(patches, 4, 8, 8), images)


def test_presets_and_fixed_mask() -> None:
    paper = preset_config("paper", 32)
    assert (paper.width, paper.depth, paper.decoder_depth, paper.heads, paper.patch_size) == (
        192,
        12,
        4,
        3,
        4,
    )
    assert fixed_visible_patches(paper) == []  # 64 patches at mask 0.99: rebuilt from z alone
    visible = fixed_visible_patches(preset_config("lab", 32, mask_ratio_test=0.75))
    assert len(visible) == 16 and visible == fixed_visible_patches(
        preset_config("lab", 32, mask_ratio_test=0.75)
    )


def test_same_image_same_score_at_any_batch_size() -> None:
    detector = _detector(mask_ratio_test=0.75)  # some visible patches, so the mask path is exercised
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        batched = detector(images)[0]
        single = torch.cat([detector(images[i : i + 1])[0] for i in range(len(images))])
        again = detector(images)[0]
    assert torch.equal(batched, again)
    assert ((single - batched).abs() / batched.abs()).max().item() <= 1e-5


def test_float32_scores_match_a_float64_reference() -> None:
    detector = _detector()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        score32 = detector(images)[0].numpy().astype(np.float64)
        score64 = detector.double()(images)[0].numpy()
    assert np.max(np.abs(score32 - score64) / score64) < 1e-5


def test_score_is_the_sum_of_squared_errors_on_masked_patches() -> None:
    detector = _detector(mask_ratio_test=0.5)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        score, reconstruction = detector(images)
    x = detector.head.normalize(images)
    masked = torch.ones(64, dtype=torch.bool)
    masked[detector.head.visible[0]] = False
    error = patchify((reconstruction - x) ** 2, 4).sum(-1)[:, masked].sum(-1)
    torch.testing.assert_close(score, error, rtol=1e-5, atol=1e-3)
