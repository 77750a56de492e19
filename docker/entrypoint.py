"""Container entry point: size the thread pools to the container's CPU limit, then run the service.

ONNX Runtime's default (`DEDE_INTRA_OP_THREADS=0`) and `os.cpu_count()` both see every core of the
host, not the container's `--cpus` quota: a 2-CPU container on a 64-core host would start 64
inference threads that fight over 2 CPUs of quota and get throttled. So, unless the variables are
already set, this sets DEDE_WORKERS (the service's auto rule, applied to the usable CPUs),
DEDE_INTRA_OP_THREADS and DEDE_DECODE_THREADS (per worker) from the cgroup quota and the CPU
affinity, whichever is smaller, and then replaces itself with `python -m service ARGS...`.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup quota (v2 `cpu.max`, else v1 CFS files); None when unlimited."""
    v2 = root / "cpu.max"
    if v2.is_file():
        quota, _, period = v2.read_text().strip().partition(" ")
        if quota == "max" or not period:
            return None
        return int(quota) / int(period)
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        quota_file, period_file = v1 / "cpu.cfs_quota_us", v1 / "cpu.cfs_period_us"
        if quota_file.is_file() and period_file.is_file():
            quota, period = int(quota_file.read_text()), int(period_file.read_text())
            return quota / period if quota > 0 and period > 0 else None
    return None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """Whole CPUs this container may use: the quota rounded up, capped by the CPU affinity."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        limit = cgroup_cpu_limit(root)
    except (OSError, ValueError):  # an unexpected cgroup layout must not stop the service
        limit = None
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def worker_count(cpus: int, environ: dict[str, str] | os._Environ[str]) -> int:
    """DEDE_WORKERS when set to a number of processes, else the service's auto rule for these CPUs
    (CUDA when DEDE_EXECUTION_PROVIDERS names it, as the GPU deployments do)."""
    from service.workers import auto_workers

    explicit = environ.get("DEDE_WORKERS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    cuda = "cuda" in environ.get("DEDE_EXECUTION_PROVIDERS", "").lower()
    return auto_workers(provider_is_cuda=cuda, cpu_count=cpus)


def thread_settings(cpus: int, workers: int = 1) -> dict[str, str]:
    """Per worker process: the usable CPUs shared among the workers for inference; decoding gets up
    to 4 threads, as the service's default."""
    share = max(1, cpus // workers)
    return {
        "DEDE_WORKERS": str(workers),
        "DEDE_INTRA_OP_THREADS": str(share),
        "DEDE_DECODE_THREADS": str(max(1, min(4, share))),
    }


def main() -> None:
    cpus = usable_cpus()
    workers = worker_count(cpus, os.environ)
    for name, value in thread_settings(cpus, workers).items():
        os.environ.setdefault(name, value)  # an explicit setting always wins
    print(
        f"dede entrypoint: {cpus} usable CPU(s); workers {os.environ['DEDE_WORKERS']}, per worker "
        f"intra-op threads {os.environ['DEDE_INTRA_OP_THREADS']}, "
        f"decode threads {os.environ['DEDE_DECODE_THREADS']}",
        file=sys.stderr,
        flush=True,
    )
    os.execv(sys.executable, [sys.executable, "-m", "service", *sys.argv[1:]])


if __name__ == "__main__":
    main()
