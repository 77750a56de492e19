"""Load for the reliability runs: an open loop that keeps every answer (status, Retry-After, whether
its scores are right), sequential probes, and the malformed-upload sender.

Connections and bodies come from the serving benchmark's load generator (`benchmarks.serving.loadgen`):
lean keep-alive HTTP/1.1 connections, multipart bodies encoded before the clock starts.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from benchmarks.serving.loadgen import CONTENT_TYPE, Answer, Connection, TransportError, multipart_body
from benchmarks.serving.raw import reference_scores
from models.bundle import Bundle, prepare_image

RTOL = 1e-5  # scores are compared with the raw session's within this relative tolerance


@dataclass
class Workload:
    """Valid requests and the scores the bundle's graph gives their images, outside the server."""

    bodies: list[bytes]
    expected: list[np.ndarray]
    images_per_request: int


def make_workload(bundle: Bundle, pictures: list[np.ndarray], images_per_request: int) -> Workload:
    spec = bundle.manifest.input
    encoded = []
    for pixels in pictures:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    arrays = []
    for data in encoded:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            arrays.append(prepare_image(image, spec))
    scores = reference_scores(bundle, np.stack(arrays))
    bodies, expected = [], []
    for start in range(0, len(encoded) - images_per_request + 1, images_per_request):
        group = encoded[start : start + images_per_request]
        bodies.append(multipart_body(group, [f"{start + i}.png" for i in range(len(group))]))
        expected.append(scores[start : start + images_per_request])
    return Workload(bodies, expected, images_per_request)


@dataclass
class Shot:
    """One request of a run: when it was due, how it went."""

    due_s: float  # scheduled start, seconds from the start of the run
    lag_s: float  # how late the generator started it (waiting for a free connection included)
    latency_s: float  # from its scheduled start to its answer
    service_s: float  # from its actual start to its answer
    status: int | str  # HTTP status, or the transport error's name
    retry_after: str | None
    correct: bool | None  # 200 only: every score equals the graph's own


def _scores_ok(response: Answer, expected: np.ndarray) -> bool:
    try:
        got = np.array([r["score"] for r in response.json()["images"]], dtype=np.float64)
    except (ValueError, KeyError, TypeError):
        return False
    return got.shape == expected.shape and bool(np.allclose(got, expected, rtol=RTOL, atol=0))


async def _send(connection: Connection, workload: Workload, turn: int, due: float, t0: float) -> Shot:
    index = turn % len(workload.bodies)
    started = time.perf_counter()
    retry_after, correct = None, None
    try:
        response = await connection.post("/detect", workload.bodies[index])
        status: int | str = response.status
        retry_after = response.headers.get("retry-after")
        if status == 200:
            correct = _scores_ok(response, workload.expected[index])
    except TransportError as exc:
        status = str(exc)
    done = time.perf_counter()
    return Shot(due - t0, started - due, done - due, done - started, status, retry_after, correct)


async def open_loop(
    url: str,
    workload: Workload,
    rate_rps: float,
    seconds: float,
    connections: int,
) -> tuple[list[Shot], float]:
    """Requests due at a fixed rate for `seconds` over `connections` keep-alive connections, every
    answer kept; returns (shots, the time the sending window ended, on the perf_counter clock).
    Waits for every request sent before returning."""
    pool = [Connection(url, {"Content-Type": CONTENT_TYPE}) for _ in range(connections)]
    await asyncio.gather(*(c.open() for c in pool))  # before the clock starts
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for connection in pool:
        idle.put_nowait(connection)
    shots: list[Shot] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(turn: int, due: float) -> None:
        connection = await idle.get()
        try:
            shots.append(await _send(connection, workload, turn, due, t0))
        finally:
            idle.put_nowait(connection)

    t0 = time.perf_counter()
    end = t0 + seconds
    interval, due, turn = 1.0 / rate_rps, t0, 0
    while due < end:
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(turn, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        due += interval
        turn += 1
    window_end = time.perf_counter()
    await asyncio.gather(*tasks)
    for connection in pool:
        await connection.close()
    return shots, window_end


async def probe(
    url: str, workload: Workload, every_s: float, seconds: float, stop: Callable[[list[Shot]], bool]
) -> list[Shot]:
    """One request every `every_s` on one connection (never two at once) until `stop(shots)` or
    `seconds` have passed; `due_s` counts from the first probe."""
    shots: list[Shot] = []
    connection = Connection(url, {"Content-Type": CONTENT_TYPE})
    t0 = time.perf_counter()
    due = t0
    while due - t0 < seconds and not stop(shots):
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        shots.append(await _send(connection, workload, len(shots), due, t0))
        due = max(due + every_s, time.perf_counter())
    await connection.close()
    return shots


def percentiles_ms(seconds: list[float]) -> dict[str, float | int]:
    if not seconds:
        return {"count": 0}
    values = np.array(seconds) * 1000
    return {
        "count": len(values),
        "p50": round(float(np.percentile(values, 50)), 2),
        "p95": round(float(np.percentile(values, 95)), 2),
        "p99": round(float(np.percentile(values, 99)), 2),
        "max": round(float(values.max()), 2),
    }
