"""The ceiling: the bundle's ONNX Runtime session alone (same options the service uses), no HTTP, no decode."""

from __future__ import annotations

import time

import numpy as np

from models.bundle import Bundle
from service.runtime import Detector, resolve_providers


def raw_session_throughput(
    bundle: Bundle,
    images: np.ndarray,
    batch_sizes: list[int],
    seconds_per_size: float,
    intra_op_threads: int = 0,
) -> dict:
    """images/s for each batch size; `images` is uint8 [N, 3, H, W] with N >= max(batch_sizes)."""
    detector = Detector(
        bundle.onnx_path, bundle.manifest.input, resolve_providers(["auto"]), intra_op_threads
    )
    by_batch = {}
    for size in batch_sizes:
        batch = np.ascontiguousarray(images[:size])
        for _ in range(3):
            detector.score(batch)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds_per_size:
            detector.score(batch)
            runs += 1
        by_batch[size] = round(runs * size / (time.perf_counter() - started), 1)
    best = max(by_batch, key=by_batch.__getitem__)
    return {
        "provider": detector.provider,
        "images_per_s_by_batch": by_batch,
        "best_batch_size": best,
        "ceiling_images_per_s": by_batch[best],
    }


def reference_scores(bundle: Bundle, images: np.ndarray) -> np.ndarray:
    detector = Detector(bundle.onnx_path, bundle.manifest.input, ["CPUExecutionProvider"])
    return detector.score(images)
