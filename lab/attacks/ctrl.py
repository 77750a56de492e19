"""CTRL (Li et al., ICCV 2023): clean-label poisoning of SSL pre-training with a frequency trigger.

The attacker adds the frequency trigger to a few images of the target class (`rate` of the whole
training set) and leaves the labels alone; ordinary SimCLR on the poisoned set then associates the
trigger with the target class's features.
"""

from __future__ import annotations

import numpy as np

from lab.attacks.triggers import FrequencyTrigger, apply_to_nhwc


def poison_with_ctrl(
    images_nhwc_uint8: np.ndarray,
    labels: np.ndarray,
    target_class: int,
    rate: float = 0.01,
    trigger: FrequencyTrigger | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A copy of the images with `rate * N` target-class images triggered; returns (images, indices)."""
    trigger = trigger or FrequencyTrigger()
    candidates = np.flatnonzero(labels == target_class)
    count = int(round(rate * len(images_nhwc_uint8)))
    if count > len(candidates):
        raise ValueError(f"{count} poisoned images wanted but the target class has only {len(candidates)}")
    chosen = np.sort(np.random.default_rng(seed).choice(candidates, count, replace=False))
    poisoned = images_nhwc_uint8.copy()
    poisoned[chosen] = apply_to_nhwc(trigger, images_nhwc_uint8[chosen])
    return poisoned, chosen
