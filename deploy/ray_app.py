"""Ray Serve: the service's own FastAPI app on N replicas, each with its own ONNX Runtime session,
with Ray's request batching (`@serve.batch`) on the scoring path.

    serve run deploy/serve_config.yaml                       # autoscaling, see that file
    serve run deploy.ray_app:build bundle=bundles/demo       # one replica, defaults

What each replica runs is exactly `service.app.create_app(settings)`: the same endpoints, decoding,
limits, API key, metrics and readiness as `python -m service`. Two things change, both in this file
(service/ is not edited):
  - scoring: after the app's startup (session loaded, warm-up done), the replica swaps the app's own
    dynamic batcher for `RayBatchQueue`, which sends each image to `DedeDeployment.score_batch`, a
    `@serve.batch` method that runs one ORT batch for many requests' images;
  - every answer carries `X-Dede-Replica: <replica id>`, so a client (and the test) sees who served it.
Ray routes traffic to a replica only once its startup returned, and startup here waits for the
warm-up, so no request meets a cold replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.serve.deployment import Application
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.app import create_app
from service.batcher import BatcherClosed, InferenceFailed, QueueFull, ReservingQueue, ScoredImage
from service.metrics import Metrics
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("dede.ray")

REPLICA_HEADER = "X-Dede-Replica"

# Per replica, unless overridden: several replicas share the machine's cores, so each session gets
# one intra-op thread and decoding one thread (ray-serve-notes: replicas must not fight over cores).
RAY_DEFAULTS: dict[str, Any] = {"intra_op_threads": 1, "decode_threads": 1}

# Longest wait, at replica startup, for the session to load and warm up before giving up.
READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class BatchResult:
    score: float
    started: float  # perf_counter() when its batch's run began, to compute the queue wait
    compute_s: float
    batch_size: int


class RayBatchQueue(ReservingQueue):
    """Takes the place of `service.batcher.Batcher` in a replica: the same methods that service/api.py
    and service/state.py call (reserve and has_room from `ReservingQueue`, incoming, submit,
    queue_depth, closed, start, stop), but each image goes to a `@serve.batch` method, which gathers
    the images of concurrent requests.

    Kept from the service's batcher: the queue is bounded (a submit that does not fit raises
    `QueueFull`, the API's 503), a failed batch fails each of its images with `InferenceFailed`,
    stopping refuses new work and waits for the images already taken, and the queue-wait, depth
    metrics are kept (batch size and compute time are observed in the batch method).
    """

    def __init__(
        self, score_one: Callable[[np.ndarray], Awaitable[BatchResult]], max_queue: int, metrics: Metrics
    ) -> None:
        self._score_one = score_one
        self._max_queue = max_queue
        self._metrics = metrics
        self._pending = 0  # images submitted and not yet answered (queued in Ray or running)
        self._reserved = 0
        self._closing = False

    def start(self) -> None:
        """Nothing to start: Ray's batch queue starts with the first call."""

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new work, then wait (at most `timeout_s`) for the images already taken."""
        self._closing = True
        deadline = time.monotonic() + timeout_s
        while self._pending > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._pending > 0:
            log.error("%d image(s) still being scored after %.1f s of draining", self._pending, timeout_s)

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def queue_depth(self) -> int:
        return self._pending

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        # Ray's batch waits `batch_wait_timeout_s` for more images by itself; nothing to announce.
        yield

    def submit(self, images: Sequence[np.ndarray]) -> list[asyncio.Future[ScoredImage]]:
        """Queue the images of one request (all or none); one future per image, in order."""
        if self._closing:
            raise BatcherClosed("the service is shutting down")
        if not self.has_room(len(images)):
            raise QueueFull(f"{self._pending} images already queued (limit {self._max_queue})")
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        self._pending += len(images)
        self._metrics.queue_depth.set(self._pending)
        return [loop.create_task(self._score(image, now)) for image in images]

    async def _score(self, image: np.ndarray, enqueued_at: float) -> ScoredImage:
        try:
            result = await self._score_one(image)
        except Exception as exc:  # Ray hands the batch's exception to every image of the batch
            raise InferenceFailed(f"the model failed on this image's batch: {exc}") from exc
        finally:
            self._pending -= 1
            self._metrics.queue_depth.set(self._pending)
        queue_s = max(0.0, result.started - enqueued_at)
        self._metrics.queue_wait.observe(queue_s)
        return ScoredImage(result.score, queue_s, result.compute_s, result.batch_size)


class ReplicaHeaderMiddleware:
    """Adds `X-Dede-Replica: <id>` to every answer (plain ASGI: no per-request task or copy)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(REPLICA_HEADER, self.replica)
            await send(message)

        await self.app(scope, receive, send_with_replica)


async def wait_until_ready(state: ServiceState, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait for the app's warm-up; raise if it failed or takes too long (Ray then retries the replica)."""
    deadline = time.monotonic() + timeout_s
    while not state.ready:
        if state.not_ready_reason.startswith("warm-up failed") or time.monotonic() > deadline:
            raise RuntimeError(f"replica not ready: {state.not_ready_reason}")
        await asyncio.sleep(0.02)


def _stack_and_score(state: ServiceState, images: list[np.ndarray]) -> np.ndarray:
    assert state.detector is not None
    scores = np.asarray(state.detector.score(np.stack(images)))
    if scores.shape != (len(images),):
        raise RuntimeError(f"the model returned scores of shape {scores.shape} for {len(images)} images")
    return scores


@serve.deployment(
    name="dede",
    # At least the largest batch: Ray caps a replica's concurrent requests here, and with it what
    # @serve.batch can gather (the default of 5 would cap every batch at 5).
    max_ongoing_requests=64,
    autoscaling_config={
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 4,
        # Requests in flight per replica that trigger scaling up; well under max_ongoing_requests so
        # a new replica starts before the others refuse work.
        "target_ongoing_requests": 16,
        "upscale_delay_s": 10,
        "downscale_delay_s": 120,
    },
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    # Longer than the service's drain: queued images finish before the replica is killed.
    graceful_shutdown_timeout_s=40,
)
@serve.ingress()  # the app is built per replica, in __serve_build_asgi_app__
class DedeDeployment:
    """One replica: the service's FastAPI app around its own ONNX Runtime session."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self._settings = Settings(**{**RAY_DEFAULTS, **(settings or {})})
        self._state: ServiceState | None = None
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (unit tests of the class)
            self.replica_id = "local"
        self.score_batch.set_max_batch_size(self._settings.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(self._settings.max_batch_delay_ms / 1000)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self._settings)
        self._state = app.state.service
        app.router.lifespan_context = self._lifespan_with_ray_batching(app.router.lifespan_context)
        app.add_middleware(ReplicaHeaderMiddleware, replica=self.replica_id)
        return app

    def _lifespan_with_ray_batching(
        self, service_lifespan: Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]
    ) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            async with service_lifespan(app):  # session loaded, batcher started, warm-up begun
                state: ServiceState = app.state.service
                await wait_until_ready(state)
                own_batcher = state.batcher
                state.batcher = RayBatchQueue(self.score_batch, state.settings.max_queue, state.metrics)
                if own_batcher is not None:
                    await own_batcher.stop(0)  # idle: no request reaches a replica before this point
                log.info("replica %s ready, batching with @serve.batch", self.replica_id)
                yield
                # On exit the service's lifespan drains: it stops `state.batcher`, our queue.

        return lifespan

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)  # replaced from the settings in __init__
    async def score_batch(self, images: list[np.ndarray]) -> list[BatchResult]:
        """Many requests' images -> one ORT run, off the event loop; one result per image, in order."""
        state = self._state
        assert state is not None and state.detector is not None
        started = time.perf_counter()
        try:
            scores = await asyncio.to_thread(_stack_and_score, state, images)
        except Exception:
            state.metrics.inference_failures.inc()
            log.exception("inference failed for a batch of %d images", len(images))
            raise
        compute_s = time.perf_counter() - started
        state.metrics.batch_size.observe(len(images))
        state.metrics.batch_compute.observe(compute_s)
        return [BatchResult(float(s), started, compute_s, len(images)) for s in scores]

    def check_health(self) -> None:
        """Ray's periodic check: a replica that is neither ready nor draining gets replaced."""
        state = self._state
        if state is not None and not state.ready and not state.draining:
            raise RuntimeError(f"not ready: {state.not_ready_reason}")


def build(args: dict[str, Any] | None = None) -> Application:
    """Application builder: `args` are service settings by field name (bundle, max_batch_size, ...).

    Validated here, on the driver, so that a wrong setting fails `serve run` at once instead of in
    every replica. A relative bundle path is made absolute when it exists from the current folder
    (replicas may start in another working directory).
    """
    overrides = {key: value for key, value in (args or {}).items() if value is not None}
    bundle = overrides.get("bundle")
    if bundle is not None and not Path(bundle).is_absolute() and Path(bundle).exists():
        overrides["bundle"] = str(Path(bundle).resolve())
    Settings(**{**RAY_DEFAULTS, **overrides})  # raises a readable ValidationError
    return DedeDeployment.bind(overrides)
