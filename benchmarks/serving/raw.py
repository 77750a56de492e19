"""The ceiling: the bundle's ONNX Runtime session alone (same options the service uses), no HTTP, no decode.

On a shared machine the ceiling moves with everyone else's load, so besides the sweep over batch
sizes the benchmark re-measures it at the best batch size beside every grid point.
"""

from __future__ import annotations

import time

import numpy as np

from models.bundle import Bundle
from service.runtime import Detector, resolve_providers


class RawSession:
    def __init__(self, bundle: Bundle, images: np.ndarray, intra_op_threads: int = 0) -> None:
        """`images`: uint8 [N, 3, H, W], N at least the largest batch size to be measured."""
        self.detector = Detector(
            bundle.onnx_path, bundle.manifest.input, resolve_providers(["auto"]), intra_op_threads
        )
        self.images = images

    def images_per_s(self, batch_size: int, seconds: float) -> float:
        batch = np.ascontiguousarray(self.images[:batch_size])
        for _ in range(3):
            self.detector.score(batch)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            self.detector.score(batch)
            runs += 1
        return round(runs * batch_size / (time.perf_counter() - started), 1)

    def sweep(self, batch_sizes: list[int], seconds_per_size: float) -> dict:
        by_batch = {size: self.images_per_s(size, seconds_per_size) for size in batch_sizes}
        best = max(by_batch, key=by_batch.__getitem__)
        return {
            "provider": self.detector.provider,
            "images_per_s_by_batch": by_batch,
            "best_batch_size": best,
            "ceiling_images_per_s": by_batch[best],
        }


def reference_scores(bundle: Bundle, images: np.ndarray) -> np.ndarray:
    """The CPU session's scores: what every server's answer is compared with."""
    detector = Detector(bundle.onnx_path, bundle.manifest.input, ["CPUExecutionProvider"])
    return detector.score(images)
