"""The /detect request's decode step: where each image is decoded, under which budget, and the watch
for abandoned requests.

Every image's structure and header are read first (service/structure.py, microseconds): a structure
over a DEDE_* limit is refused there, before any pixel is decoded. The rest is routed by cost
(pixels x passes):
  - at most DEDE_INPROCESS_DECODE_MAX_COST: decoded in the service process (on the event loop when
    the request's images are thumbnails, DEDE_INLINE_DECODE_MAX_PIXELS, else in the decode threads),
    as before issue 21: cheap by construction, and the hand-off to a process would cost more;
  - above it: in a worker process (service/decode_workers.py), killed past DEDE_DECODE_BUDGET_S.

`until_answered` runs a request's work against its deadline (DEDE_REQUEST_TIMEOUT_S) and the
client's connection: when the client goes away or the deadline passes, the work is cancelled, so
its images are neither decoded nor scored further (a worker decoding one of them is killed; images
queued for the model are dropped by the batcher, their futures cancelled).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from starlette.requests import Request

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


async def until_answered(request: Request, state: ServiceState, work: Awaitable[T], deadline: float) -> T:
    """`work`'s result; cancels it and raises `ServiceError` when the client disconnects (400
    client_disconnected: nobody reads it) or the loop's clock passes `deadline` (504)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    timeout = max(0.0, deadline - asyncio.get_running_loop().time())
    try:
        done, _ = await asyncio.wait({task, watch}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    if watch in done:
        state.metrics.abandoned.labels("client_gone").inc()
        raise ServiceError(400, "client_disconnected", "the client went away before its answer was ready")
    state.metrics.abandoned.labels("deadline").inc()
    timeout = state.settings.request_timeout_s
    raise ServiceError(
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
