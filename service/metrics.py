"""Prometheus metrics, prefix `dede_`, in a registry of their own per app.

One registry per app (not the global default) lets tests build several apps in one process.
With several worker processes (DEDE_WORKERS, `service.workers`) prometheus_client's multiprocess
mode is on (PROMETHEUS_MULTIPROC_DIR, set before this module is imported): each worker writes its
values to files there, and `exposition` merges them, so that any worker answers /metrics for all:
counters and histograms summed, queue depth and requests in flight summed over the live workers,
`dede_ready` the minimum over them (1 only when every live worker is ready).
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

# Seconds: from half a millisecond (a tiny model's batch) to ten seconds (a stuck queue).
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Scores only mean something relative to the calibrated threshold, so their buckets are multiples of it.
_SCORE_MULTIPLES = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 10.0)

IMAGE_OUTCOMES = ("clean", "flagged", "error")
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    sizes = {1, max_batch_size}
    size = 2
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def _score_buckets(threshold: float) -> tuple[float, ...]:
    if threshold <= 0:
        return (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
    return tuple(sorted({round(threshold * m, 12) for m in _SCORE_MULTIPLES}))


class Metrics:
    """Every metric the service exports, created on one registry."""

    def __init__(self, max_batch_size: int, threshold: float) -> None:
        disable_created_metrics()  # the *_created series only double the output; nothing reads them
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "dede_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.images = Counter("dede_images", "Images answered, by outcome", ["outcome"], registry=r)
        self.rejections = Counter(
            "dede_rejections", "Requests refused with 503, by reason", ["reason"], registry=r
        )
        self.abandoned = Counter(
            "dede_abandoned_requests",
            "Requests whose decoding and scoring were cancelled: the client went away, or the deadline passed",
            ["reason"],
            registry=r,
        )
        self.inference_failures = Counter(
            "dede_inference_failures", "Batches whose model run raised an error", registry=r
        )
        self.request_latency = Histogram(
            "dede_request_duration_seconds",
            "End-to-end request latency inside the server, by endpoint",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_time = Histogram(
            "dede_decode_seconds",
            "Time to decode the images of one request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "dede_queue_wait_seconds",
            "Time an image waited in the queue before its batch ran",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_compute = Histogram(
            "dede_batch_compute_seconds", "Model run time per batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "dede_batch_size", "Images per model run", buckets=_batch_size_buckets(max_batch_size), registry=r
        )
        self.score = Histogram(
            "dede_score", "Detection scores of answered images", buckets=_score_buckets(threshold), registry=r
        )
        self.queue_depth = Gauge(
            "dede_queue_depth", "Images waiting for the model", registry=r, multiprocess_mode="livesum"
        )
        self.in_flight = Gauge(
            "dede_requests_in_flight",
            "/detect requests being served",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ready = Gauge(
            "dede_ready",
            "1 when the service (every worker) takes work, else 0",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.model_info = Gauge(
            "dede_model_info",
            "The model being served (value is always 1)",
            ["name", "version", "provider", "threshold"],
            registry=r,
            multiprocess_mode="livemax",
        )
        for outcome in IMAGE_OUTCOMES:
            self.images.labels(outcome)  # export zeros from the start so rates work at once

    def exposition(self) -> bytes:
        """The /metrics body: this registry, or with several workers every worker's values merged."""
        if os.environ.get(MULTIPROCESS_ENV):
            merged = CollectorRegistry()
            MultiProcessCollector(merged)
            merged.register(ServiceProcessesCollector())
            return generate_latest(merged)
        return generate_latest(self.registry)

    def set_model(self, name: str, version: str, provider: str, threshold: float) -> None:
        if not os.environ.get(MULTIPROCESS_ENV):  # a worker sets it once; clear() is single-process only
            self.model_info.clear()
        self.model_info.labels(name, version, provider, repr(threshold)).set(1)


class ServiceProcessesCollector:
    """With several workers, `process_cpu_seconds_total` and `process_resident_memory_bytes` for the
    whole service: the supervisor (this worker's parent) and every process below it, summed, read
    from /proc. prometheus_client's own process collector sees one process, and in multiprocess mode
    it is left out; the dashboards' CPU and memory panels read these two names."""

    _TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    _PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def __init__(self, root: int | None = None) -> None:
        self._root = root

    def collect(self) -> Iterator[Metric]:
        root = self._root if self._root is not None else os.getppid()
        cpu_s, rss_bytes = 0.0, 0
        for pid in _process_tree(root):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone since it was listed
                continue
            cpu_s += (int(fields[11]) + int(fields[12])) / self._TICKS_PER_S  # utime + stime
            rss_bytes += int(fields[21]) * self._PAGE_BYTES
        yield CounterMetricFamily(
            "process_cpu_seconds", "User and system CPU time of the service's processes, summed", value=cpu_s
        )
        yield GaugeMetricFamily(
            "process_resident_memory_bytes",
            "Resident memory of the service's processes, summed",
            value=rss_bytes,
        )


def _process_tree(root: int) -> list[int]:
    """`root` and its descendants (workers, their decode processes), from /proc."""
    tree, frontier = [root], [root]
    while frontier:
        pid = frontier.pop()
        try:
            children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:  # not Linux, or the process is gone
            children = []
        tree += children
        frontier += children
    return tree


def ready_workers(path: str | None = None) -> int:
    """How many live worker processes report `dede_ready` 1, from the multiprocess metric files."""
    path = path or os.environ.get(MULTIPROCESS_ENV)
    if not path:
        return 0
    count = 0
    for file in glob.glob(os.path.join(path, "gauge_livemin_*.db")):
        pid = int(Path(file).stem.rsplit("_", 1)[1])
        if not _alive(pid):
            continue
        with contextlib.suppress(OSError, ValueError):  # a file being written or removed right now
            for metric in MultiProcessCollector.merge([file], accumulate=False):
                if metric.name == "dede_ready" and any(s.value == 1 for s in metric.samples):
                    count += 1
    return count


def _alive(pid: int) -> bool:
    """Whether the process runs (a killed worker not yet reaped by the supervisor is a zombie: dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rpartition(b")")[2].split()[0] not in (b"Z", b"X")
