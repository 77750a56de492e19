"""The /detect request's decode step: where each image is decoded, under which budget, and the watch
for abandoned requests.

Every image's structure and header are read first (service/structure.py, microseconds): a structure
over a DEDE_* limit is refused there, before any pixel is decoded. The rest is routed by cost
(pixels x passes):
  - at most DEDE_INPROCESS_DECODE_MAX_COST: decoded in the service process (on the event loop when
    the request's images are thumbnails, DEDE_INLINE_DECODE_MAX_PIXELS, else in the decode threads),
    as before issue 21: cheap by construction, and the hand-off to a process would cost more;
  - above it: in a worker process (service/decode_workers.py), killed past DEDE_DECODE_BUDGET_S.

`Abandonment` runs a request's work against its deadline (DEDE_REQUEST_TIMEOUT_S) and the
client's connection: when the client goes away or the deadline passes, the work is cancelled, so
its images are neither decoded nor scored further (a worker decoding one of them is killed; images
queued for the model are dropped by the batcher, their futures cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from starlette.requests import Request

from service.batcher import Batcher
from service.decoding import DecodeLimits, ImageRejected, decode_cost, decode_images
from service.errors import ServiceError
from service.state import ServiceState
from service.structure import StructureLimits

T = TypeVar("T")


# One DecodeLimits per service (settings do not change while it runs): built once, not per request.
_LIMITS: weakref.WeakKeyDictionary[ServiceState, DecodeLimits] = weakref.WeakKeyDictionary()


def decode_limits(state: ServiceState) -> DecodeLimits:
    limits = _LIMITS.get(state)
    if limits is None:
        limits = _LIMITS[state] = _limits_from(state)
    return limits


def _limits_from(state: ServiceState) -> DecodeLimits:
    settings = state.settings
    return DecodeLimits(
        settings.max_image_pixels,
        StructureLimits(
            jpeg_max_scans=settings.jpeg_max_scans,
            jpeg_max_segments=settings.jpeg_max_segments,
            jpeg_max_metadata_bytes=settings.jpeg_max_metadata_bytes,
            bmp_max_rle_pixels=settings.bmp_max_rle_pixels,
            png_max_chunks=settings.png_max_chunks,
            webp_max_frames=settings.webp_max_frames,
        ),
    )


@dataclass
class DecodePlan:
    """One request's images after the structure checks: each one's rejection (or None) and cost."""

    images: list[bytes]
    results: list[np.ndarray | ImageRejected | None]
    in_process: list[int]  # indices decoded in this process
    in_workers: list[int]  # indices decoded by the worker processes
    in_process_cost: int

    def inline(self, state: ServiceState) -> bool:
        """Nothing to wait for: every image is refused already or a thumbnail decoded on the loop."""
        return not self.in_workers and self.in_process_cost <= state.settings.inline_decode_max_pixels


def plan_decode(state: ServiceState, images: list[bytes]) -> DecodePlan:
    """Structure checks and cost of every image (microseconds each), and where each is decoded."""
    limits, settings, workers = decode_limits(state), state.settings, state.decode_workers
    results: list[np.ndarray | ImageRejected | None] = [None] * len(images)
    in_process: list[int] = []
    in_workers: list[int] = []
    in_process_cost = 0
    for index, data in enumerate(images):
        try:
            cost = decode_cost(data, limits)
        except ImageRejected as rejection:
            results[index] = rejection
            continue
        if workers is not None and cost > settings.inprocess_decode_max_cost:
            in_workers.append(index)
        else:
            in_process.append(index)
            in_process_cost += cost
    return DecodePlan(images, results, in_process, in_workers, in_process_cost)


def on_its_way(batcher: Batcher, plan: DecodePlan | None) -> contextlib.AbstractContextManager[None]:
    """`batcher.incoming()` while a request decodes in this process (milliseconds), so that a filling
    batch waits for its images. Not for a request with an image in the worker processes (a costly
    decode, hundreds of milliseconds): every batch would wait its full delay for it, in vain (a flood
    of costly uploads within the limits doubled good requests' median latency this way). `plan`
    None: the request has no images to decode."""
    if plan is not None and plan.in_workers:
        return contextlib.nullcontext()
    return batcher.incoming()


def decode_inline(state: ServiceState, plan: DecodePlan) -> list[np.ndarray | ImageRejected]:
    """`plan` decoded here and now (when `plan.inline`): thumbnails take microseconds, less than
    handing them to a thread, and a request with nothing to wait for needs no watching."""
    images = [plan.images[i] for i in plan.in_process]
    decoded = decode_images(images, state.bundle.manifest.input, decode_limits(state), True)
    return _filled(plan, [(plan.in_process, decoded)])


async def decode_request(state: ServiceState, plan: DecodePlan) -> list[np.ndarray | ImageRejected]:
    """Every image of `plan` decoded or rejected, in order; a failure is in its place, never raised."""
    spec, limits = state.bundle.manifest.input, decode_limits(state)
    groups: list[list[int]] = []
    pending: list[Awaitable[list]] = []
    if plan.in_process:
        groups.append(plan.in_process)
        images = [plan.images[i] for i in plan.in_process]
        loop = asyncio.get_running_loop()
        pending.append(loop.run_in_executor(state.decode_pool, decode_images, images, spec, limits, True))
    if plan.in_workers:
        workers = state.decode_workers
        assert workers is not None
        groups.append(plan.in_workers)
        pending.append(
            asyncio.gather(*(workers.decode(plan.images[i], spec, limits) for i in plan.in_workers))
        )
    decoded = await asyncio.gather(*pending)
    return _filled(plan, list(zip(groups, decoded, strict=True)))


def _filled(plan: DecodePlan, groups: list[tuple[list[int], list]]) -> list[np.ndarray | ImageRejected]:
    results = list(plan.results)
    for indices, decoded in groups:
        for index, item in zip(indices, decoded, strict=True):
            results[index] = item
    return results  # type: ignore[return-value] - every slot plan_decode did not refuse is filled here


def request_deadline(state: ServiceState) -> float:
    """The event loop's time by which the request must be answered (DEDE_REQUEST_TIMEOUT_S from now)."""
    return asyncio.get_running_loop().time() + state.settings.request_timeout_s


# A request answered this soon never needs its connection watched: the watch (a task reading the
# connection) starts only if the request is still running by then. This bounds the work a client that
# leaves can cost to this long, and spares every fast request a task and a wait (issue 21's
# throughput goal: they were most of this module's per-request cost).
WATCH_CONNECTION_AFTER_S = 0.05


class Abandonment:
    """One request's watch, from its deadline on: `guard(work)` awaits `work` in the request's own task
    and cancels it, raising `ServiceError`, when the client disconnects (400 client_disconnected: nobody
    reads the answer) or the loop's clock passes `deadline` (504). The same mechanism as
    `asyncio.timeout`: a timer that cancels the task, told apart from any other cancellation by the
    task's cancel count. Use as a context manager: leaving it stops the timers and the watch."""

    def __init__(self, request: Request, state: ServiceState, deadline: float) -> None:
        self._request, self._state = request, state
        self._task = asyncio.current_task()
        assert self._task is not None, "a request's watch belongs to the task that serves it"
        self.reason: str | None = None  # "client_gone" or "deadline", once the request is abandoned
        self._guarding = False
        self._cancelling = 0
        self._watch: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        self._timers = (
            loop.call_at(deadline, self._abandon, "deadline"),
            loop.call_later(WATCH_CONNECTION_AFTER_S, self._start_watch),
        )

    def __enter__(self) -> Abandonment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for timer in self._timers:
            timer.cancel()
        if self._watch is not None:
            self._watch.cancel()

    async def guard(self, work: Awaitable[T]) -> T:
        if self.reason is not None:
            if asyncio.iscoroutine(work):
                work.close()
            raise self._error()
        assert self._task is not None
        self._guarding, self._cancelling = True, self._task.cancelling()
        try:
            return await work
        except asyncio.CancelledError:
            # Ours (and only ours): the task's cancel count is back where it was before we cancelled.
            if self.reason is not None and self._task.uncancel() <= self._cancelling:
                raise self._error() from None
            raise
        finally:
            self._guarding = False

    def _start_watch(self) -> None:
        self._watch = asyncio.ensure_future(_disconnected(self._request))
        self._watch.add_done_callback(self._watch_done)

    def _watch_done(self, watch: asyncio.Task[None]) -> None:
        if watch.cancelled():
            return
        watch.exception()  # a broken connection (receive raised) is a client gone as well
        self._abandon("client_gone")

    def _abandon(self, reason: str) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        self._state.metrics.abandoned.labels(reason).inc()
        if self._guarding and self._task is not None:
            self._task.cancel()

    def _error(self) -> ServiceError:
        if self.reason == "client_gone":
            return ServiceError(
                400, "client_disconnected", "the client went away before its answer was ready"
            )
        timeout = self._state.settings.request_timeout_s
        return ServiceError(
            504,
            "deadline_exceeded",
            f"the request was not answered within {timeout:g} s (DEDE_REQUEST_TIMEOUT_S); its images were "
            "not scored",
        )


async def _disconnected(request: Request) -> None:
    # The body has been read: the next message the server sends this app is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
