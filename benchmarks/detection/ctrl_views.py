"""How much of CTRL's frequency trigger survives the SimCLR views the lab pre-trains on.

CTRL poisons images before augmentation, and SimCLR then sees random resized crops of them. The
lab makes its views at 24 px (`SuiteConfig.simclr_crop`, to halve the CPU cost); CTRL's code makes
them at the images' own 32 px. A crop is linear in the image, so the trigger's part of a view is
the view of the trigger's additive pattern (before the uint8 clamp). For the trigger as CTRL sets
it and for each of its two frequencies alone, this measures, over random crops drawn by the lab's
own `random_resized_crop_flip` (colour jitter is left out: it is the same at both sizes), the
pattern's mean square in the view over its mean square in the 32 px image.

    python -m benchmarks.detection.ctrl_views   # writes benchmarks/detection/ctrl_views.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.provenance import run_record
from lab.attacks.triggers import FrequencyTrigger
from lab.ssl import random_resized_crop_flip

OUT = Path(__file__).resolve().parent / "ctrl_views.json"
VIEWS = 4096
SIDES = (24, 32)


def trigger_pattern(trigger: FrequencyTrigger, side: int = 32) -> torch.Tensor:
    """The trigger's additive pattern on a mid-grey image, [0, 1] units, (1, 3, side, side)."""
    grey = np.full((1, 3, side, side), 127.5)
    return torch.from_numpy((trigger.apply_float255(grey) - grey) / 255.0).float()


def view_energy(pattern: torch.Tensor, side: int, seed: int = 0) -> dict[str, float]:
    """Mean square of the pattern's views (random crops at `side` px) over its own mean square."""
    generator = torch.Generator().manual_seed(seed)
    views = random_resized_crop_flip(pattern.expand(VIEWS, -1, -1, -1).contiguous(), generator, out_size=side)
    ratio = views.pow(2).flatten(1).mean(1) / pattern.pow(2).mean()
    return {
        "mean": float(ratio.mean()),
        "median": float(ratio.median()),
        "p10": float(ratio.quantile(0.1)),
        "p90": float(ratio.quantile(0.9)),
    }


def main() -> None:
    ctrl = FrequencyTrigger()
    triggers = {"ctrl": ctrl} | {
        f"frequency {r},{c} alone": FrequencyTrigger(frequencies=((r, c),)) for r, c in ctrl.frequencies
    }
    results = {
        name: {f"{side}px": view_energy(trigger_pattern(t), side) for side in SIDES}
        for name, t in triggers.items()
    }
    record = {
        "what": "the CTRL trigger's pattern in random resized crops (scale 0.2-1, the lab's SimCLR views), "
        "mean square over the pattern's own in the 32 px image, by view side",
        "views": VIEWS,
        "results": results,
        "run": run_record("python -m benchmarks.detection.ctrl_views"),
    }
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
