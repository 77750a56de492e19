"""What one running service holds, and the two switches (ready, draining) that gate new work."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Request

from models.bundle import Bundle
from service.batcher import Batcher
from service.decode_workers import DecodeWorkers
from service.errors import ServiceError, unavailable
from service.metrics import Metrics
from service.runtime import Detector
from service.settings import Settings


@dataclass(eq=False)
class ServiceState:
    settings: Settings
    bundle: Bundle
    metrics: Metrics
    detector: Detector | None = None
    batcher: Batcher | None = None
    decode_pool: ThreadPoolExecutor | None = None
    decode_workers: DecodeWorkers | None = None  # the costlier images' worker processes
    ready: bool = False
    draining: bool = False
    not_ready_reason: str = "starting: loading the model"
    in_flight: int = 0  # /detect requests between admission and answer

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self.ready = ready
        self.not_ready_reason = reason
        self.metrics.ready.set(1 if ready and not self.draining else 0)

    def start_draining(self) -> None:
        self.draining = True
        self.metrics.ready.set(0)

    def refusal(self) -> ServiceError | None:
        """The 503 a new /detect request gets right now, or None when work is taken."""
        retry = self.settings.retry_after_s
        if self.draining:
            self.metrics.rejections.labels("draining").inc()
            return unavailable("draining", "the service is shutting down; retry on another replica", retry)
        if not self.ready or self.batcher is None:
            self.metrics.rejections.labels("not_ready").inc()
            return unavailable("not_ready", f"the service is not ready: {self.not_ready_reason}", retry)
        if self.in_flight >= self.settings.max_in_flight:
            # Checked before the body is read: under a flood, refusing costs next to nothing.
            self.metrics.rejections.labels("busy").inc()
            return unavailable(
                "busy",
                f"{self.in_flight} requests are already being served (DEDE_MAX_IN_FLIGHT); retry shortly",
                retry,
            )
        if not self.batcher.has_room(1):
            self.metrics.rejections.labels("queue_full").inc()
            return unavailable("queue_full", "the queue is full; retry shortly", retry)
        return None


async def service_state(request: Request) -> ServiceState:
    # async on purpose: FastAPI runs plain-def dependencies in a worker thread, a costly hop per request.
    return request.app.state.service
