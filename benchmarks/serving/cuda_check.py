"""The service's CUDA path against its CPU path, on a machine with an NVIDIA GPU and onnxruntime-gpu.

    python -m benchmarks.serving.cuda_check --bundle bundles/demo --out benchmarks/serving/gpu

writes cuda_check.json: which provider the service's `Detector` chose and whether it binds I/O; the
CUDA scores of 512 CIFAR-10 test images against the CPU session's (largest absolute and relative
difference, flags that disagree at the bundle's threshold); and on CUDA whether one image gets the
same score whatever the batch size and whatever other images share its batch, both as the service
runs (each batch padded up to a warmed-up bucket) and with every batch padded to one bucket.
Exits 1 when CUDA was not used, so that a run on a machine without a GPU cannot pass for a check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.serving.run import commit, gpu_name, load_test_images
from models.bundle import Bundle, BundleError, load_bundle
from service.runtime import CPU, CUDA, CUDA_OPTIONS, Detector, batch_buckets, resolve_providers

BATCH_SIZES = (1, 3, 8, 32, 128)


def score_in_batches(detector: Detector, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate(
        [detector.score(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )


def spread(reference: np.ndarray, other: np.ndarray) -> dict:
    diff = np.abs(reference.astype(np.float64) - other.astype(np.float64))
    scale = np.maximum(np.abs(reference.astype(np.float64)), 1e-12)
    return {
        "identical": bool(np.array_equal(reference, other)),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / scale).max()),
    }


def invariance(detector: Detector, images: np.ndarray) -> dict:
    """Scores at every batch size, and with the batch's other images shuffled, against batch size 1."""
    alone = score_in_batches(detector, images, 1)
    by_batch = {str(b): spread(alone, score_in_batches(detector, images, b)) for b in BATCH_SIZES[1:]}
    order = np.random.default_rng(0).permutation(len(images))
    shuffled = np.empty_like(alone)
    shuffled[order] = score_in_batches(detector, images[order], 32)
    return {
        "vs_batch_1": by_batch,
        "other_images_shuffled_at_32": spread(score_in_batches(detector, images, 32), shuffled),
    }


def algo_search_variants(bundle: Bundle, images: np.ndarray, buckets: list[int]) -> dict:
    """For each cuDNN kernel-search mode: do two fresh sessions give identical scores (the same
    bundle served by two processes), and how fast is each at batch 1 and at the largest bucket."""
    out = {}
    for mode in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        runs = []
        for _ in range(2):
            detector = Detector(
                bundle.onnx_path,
                bundle.manifest.input,
                [CUDA, CPU],
                cuda_options={"cudnn_conv_algo_search": mode},
            )
            detector.warm_up(buckets)
            runs.append(score_in_batches(detector, images, 32))
        out[mode] = {
            "two_sessions": spread(runs[0], runs[1]),
            "images_per_s": {str(b): images_per_s(detector, images, b) for b in (1, buckets[-1])},
        }
    return out


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
        "--max-batch-size", type=_batch_size, default=128, help="the service's largest bucket (1..4096)"
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
    buckets = batch_buckets(args.max_batch_size)
    warm_up_s = cuda.warm_up(buckets)
    cpu = Detector(bundle.onnx_path, bundle.manifest.input, [CPU])
    cpu_scores = score_in_batches(cpu, images, 32)
    cuda_scores = score_in_batches(cuda, images, 32)
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
        "warm_up_s_by_bucket": {str(k): round(v, 4) for k, v in warm_up_s.items()},
        "images": f"CIFAR-10 test, first {len(images)}",
        "cuda_vs_cpu": {
            **spread(cpu_scores, cuda_scores),
            "flags_disagree": int(((cpu_scores > threshold) != (cuda_scores > threshold)).sum()),
            "threshold": threshold,
            "score_range": [float(cpu_scores.min()), float(cpu_scores.max())],
        },
        "cuda_batch_invariance": {"padded_to_warmed_buckets": invariance(cuda, images)},
        "cpu_batch_invariance": invariance(cpu, images[:128]),
    }
    cuda._pad_buckets = [args.max_batch_size]  # every batch padded to one shape
    result["cuda_batch_invariance"]["padded_to_one_bucket"] = invariance(cuda, images)
    if cuda.provider == CUDA:
        result["cudnn_conv_algo_search"] = algo_search_variants(bundle, images, buckets)
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
