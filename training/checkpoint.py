"""Per-epoch checkpoints of the long jobs (SimCLR, attacks, CLIP, decoder fits)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_checkpoint(state: dict, path: Path) -> None:
    """Write `state` with torch.save through a temporary file: a job killed while saving keeps its
    previous checkpoint whole, and resumes from it (loaded back with weights_only=True)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
