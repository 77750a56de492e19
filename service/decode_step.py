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
from collections.abc import Awaitable
from typing import TypeVar

import numpy as np
from starlette.requests import Request

from service.decoding import DecodeLimits, ImageRejected, decode_cost, decode_images
from service.errors import ServiceError
from service.state import ServiceState
from service.structure import StructureLimits

T = TypeVar("T")


def decode_limits(state: ServiceState) -> DecodeLimits:
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


async def decode_request(state: ServiceState, images: list[bytes]) -> list[np.ndarray | ImageRejected]:
    """Every image decoded or rejected, in order; a failure is returned in its place, never raised."""
    spec, limits, settings = state.bundle.manifest.input, decode_limits(state), state.settings
    results: list[np.ndarray | ImageRejected | None] = [None] * len(images)
    costs: list[int] = []
    for index, data in enumerate(images):
        try:
            costs.append(decode_cost(data, limits))
        except ImageRejected as rejection:
            results[index] = rejection
            costs.append(0)
    workers = state.decode_workers
    costly = [
        i
        for i, cost in enumerate(costs)
        if results[i] is None and workers is not None and cost > settings.inprocess_decode_max_cost
    ]
    cheap = [i for i in range(len(images)) if results[i] is None and i not in costly]
    pending: list[Awaitable[list]] = []
    if cheap:
        pending.append(_decode_here(state, [images[i] for i in cheap], sum(costs[i] for i in cheap)))
    if costly:
        assert workers is not None
        pending.append(asyncio.gather(*(workers.decode(images[i], spec, limits) for i in costly)))
    decoded = await asyncio.gather(*pending)
    groups = ([cheap] if cheap else []) + ([costly] if costly else [])
    for indices, group in zip(groups, decoded, strict=True):
        for index, item in zip(indices, group, strict=True):
            results[index] = item
    return results  # type: ignore[return-value] - every slot is filled above


async def _decode_here(state: ServiceState, images: list[bytes], cost: int) -> list:
    spec, limits = state.bundle.manifest.input, decode_limits(state)
    if cost <= state.settings.inline_decode_max_pixels:
        # Thumbnails: decoding takes microseconds, less than handing them to a thread and back.
        return decode_images(images, spec, limits)
    return await asyncio.get_running_loop().run_in_executor(
        state.decode_pool, decode_images, images, spec, limits
    )


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
