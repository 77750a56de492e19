"""The service's CUDA path against its CPU path, on a machine with an NVIDIA GPU and onnxruntime-gpu.

    python -m benchmarks.serving.cuda_check --bundle bundles/demo --out benchmarks/serving/gpu

writes cuda_check.json: which provider the service's `Detector` chose and whether it binds I/O; the
CUDA scores of 512 CIFAR-10 test images against the CPU session's (largest absolute and relative
difference, flags that disagree at the bundle's threshold); on CUDA whether one image gets the same
score whatever the batch size and whatever other images share its batch, as the service runs (every
batch padded to the maximum batch size) and, for comparison, with batches padded to power-of-two
buckets; and what a change of batch shape between runs costs in time, both ways and under each
cuDNN kernel-search mode. Exits 1 when CUDA was not used, so that a run on a machine without a GPU
cannot pass for a check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.serving.run import commit, gpu_name, load_test_images
from models.bundle import Bundle, BundleError, load_bundle
from service.runtime import CPU, CUDA, CUDA_OPTIONS, Detector, batch_buckets, resolve_providers

Scorer = Callable[[np.ndarray], np.ndarray]

BATCH_SIZES = (1, 3, 8, 32, 128)
# Batch sizes as a busy server sees them: a different size on nearly every run.
CHANGING_SIZES = (3, 5, 2, 8, 4, 7, 1, 6, 16, 30)


def score_in_batches(score: Scorer, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([score(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def spread(reference: np.ndarray, other: np.ndarray) -> dict:
    diff = np.abs(reference.astype(np.float64) - other.astype(np.float64))
    scale = np.maximum(np.abs(reference.astype(np.float64)), 1e-12)
    return {
        "identical": bool(np.array_equal(reference, other)),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / scale).max()),
    }


def invariance(score: Scorer, images: np.ndarray) -> dict:
    """Scores at every batch size, and with the batch's other images shuffled, against batch size 1."""
    alone = score_in_batches(score, images, 1)
    by_batch = {str(b): spread(alone, score_in_batches(score, images, b)) for b in BATCH_SIZES[1:]}
    order = np.random.default_rng(0).permutation(len(images))
    shuffled = np.empty_like(alone)
    shuffled[order] = score_in_batches(score, images[order], 32)
    return {
        "vs_batch_1": by_batch,
        "other_images_shuffled_at_32": spread(score_in_batches(score, images, 32), shuffled),
    }


def padded_to_buckets(detector: Detector, buckets: list[int]) -> Scorer:
    """Scores with each batch padded up to the next power-of-two bucket: the alternative to one shape.
    `detector` must not pad by itself (no warm_up)."""

    def score(images: np.ndarray) -> np.ndarray:
        count = len(images)
        bucket = next((b for b in buckets if b >= count), count)
        padding = np.zeros((bucket - count, *images.shape[1:]), dtype=images.dtype)
        return detector.score(np.concatenate([images, padding]))[:count]

    for size in buckets:  # warm each shape, as the service's warm-up would
        detector.score(np.zeros((size, 3, detector.spec.height, detector.spec.width), dtype=np.uint8))
    return score


def ms_per_batch(score: Scorer, images: np.ndarray, sizes: tuple[int, ...], runs: int = 30) -> dict:
    """Median and worst milliseconds per call, batch sizes taken in turn from `sizes`."""
    times = []
    for i in range(runs):
        batch = np.ascontiguousarray(images[: sizes[i % len(sizes)]])
        started = time.perf_counter()
        score(batch)
        times.append(1e3 * (time.perf_counter() - started))
    return {"median_ms": round(statistics.median(times), 3), "max_ms": round(max(times), 3)}


def shape_switch_costs(served: Detector, bucketed: Scorer, images: np.ndarray) -> dict:
    return {
        "changing_sizes": list(CHANGING_SIZES),
        "served_changing_sizes": ms_per_batch(served.score, images, CHANGING_SIZES),
        "buckets_changing_sizes": ms_per_batch(bucketed, images, CHANGING_SIZES),
        "buckets_fixed_size_4": ms_per_batch(bucketed, images, (4,)),
    }


def algo_search_variants(bundle: Bundle, images: np.ndarray, max_batch_size: int) -> dict:
    """For each cuDNN kernel-search mode: do two fresh sessions give identical scores (the same
    bundle served by two processes), how fast is the served path at batch 1 (padded) and at the
    maximum, and what a change of shape costs with power-of-two buckets."""
    out = {}
    for mode in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        runs = []
        for _ in range(2):
            detector = new_cuda_detector(bundle, {"cudnn_conv_algo_search": mode})
            detector.warm_up(max_batch_size)
            runs.append(score_in_batches(detector.score, images, 32))
        bucketed = padded_to_buckets(
            new_cuda_detector(bundle, {"cudnn_conv_algo_search": mode}), batch_buckets(max_batch_size)
        )
        out[mode] = {
            "two_sessions": spread(runs[0], runs[1]),
            "images_per_s": {str(b): images_per_s(detector, images, b) for b in (1, max_batch_size)},
            "buckets_changing_sizes": ms_per_batch(bucketed, images, CHANGING_SIZES),
        }
    return out


def new_cuda_detector(bundle: Bundle, cuda_options: dict[str, str] | None = None) -> Detector:
    return Detector(bundle.onnx_path, bundle.manifest.input, [CUDA, CPU], cuda_options=cuda_options)


def images_per_s(detector: Detector, images: np.ndarray, batch_size: int, seconds: float = 1.0) -> float:
    batch = np.ascontiguousarray(images[:batch_size])
    detector.score(batch)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        detector.score(batch)
        runs += 1
    return round(runs * batch_size / (time.perf_counter() - started), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving.cuda_check", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=Path("bundles/demo"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "gpu")
    parser.add_argument(
        "--max-batch-size",
        type=_batch_size,
        default=128,
        help="the service's max batch size (1..4096); on CUDA every batch is padded to it",
    )
    args = parser.parse_args(argv)

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as exc:
        raise SystemExit(f"cuda_check: {exc}") from None
    _, images = load_test_images(bundle, 512)
    providers = resolve_providers(["auto"])
    started = time.perf_counter()
    cuda = Detector(bundle.onnx_path, bundle.manifest.input, providers)
    warm_up_s = cuda.warm_up(args.max_batch_size)
    cpu = Detector(bundle.onnx_path, bundle.manifest.input, [CPU])
    cpu_scores = score_in_batches(cpu.score, images, 32)
    cuda_scores = score_in_batches(cuda.score, images, 32)
    threshold = bundle.threshold
    result: dict = {
        "command": "python -m benchmarks.serving.cuda_check "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gpu": gpu_name(),
        "onnxruntime": {
            "package": next(
                (f"{p} {metadata.version(p)}" for p in ("onnxruntime-gpu", "onnxruntime") if _installed(p)),
                "unknown",
            ),
            "available_providers": ort.get_available_providers(),
        },
        "bundle": {"model_name": bundle.manifest.model_name, "input": bundle.manifest.input.model_dump()},
        "provider_requested": providers,
        "service_cuda_options": CUDA_OPTIONS,
        "provider_in_use": cuda.provider,
        "io_binding": cuda.provider == CUDA,
        "warm_up_s_by_batch_size": {str(k): round(v, 4) for k, v in warm_up_s.items()},
        "images": f"CIFAR-10 test, first {len(images)}",
        "cuda_vs_cpu": {
            **spread(cpu_scores, cuda_scores),
            "flags_disagree": int(((cpu_scores > threshold) != (cuda_scores > threshold)).sum()),
            "threshold": threshold,
            "score_range": [float(cpu_scores.min()), float(cpu_scores.max())],
        },
        "cpu_batch_invariance": invariance(cpu.score, images[:128]),
    }
    if cuda.provider == CUDA:
        bucketed = padded_to_buckets(new_cuda_detector(bundle), batch_buckets(args.max_batch_size))
        result["cuda_batch_invariance"] = {
            "as_served_one_shape": invariance(cuda.score, images),
            "padded_to_power_of_two_buckets": invariance(bucketed, images),
        }
        result["shape_switch"] = shape_switch_costs(cuda, bucketed, images)
        result["cudnn_conv_algo_search"] = algo_search_variants(bundle, images, args.max_batch_size)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if cuda.provider == CUDA else 1


def _batch_size(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"{value} is not in 1..4096")
    return value


def _installed(package: str) -> bool:
    try:
        metadata.version(package)
        return True
    except metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
