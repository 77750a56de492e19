"""Load generator: asyncio, every simulated client on its own keep-alive HTTP/1.1 connection.

Bodies are multipart-encoded once up front, and the connections speak just the HTTP the benchmark
needs (`Connection`): on 2 cores the generator competes with the server it measures, and a general
client such as httpx spends several times more CPU per request. Its CPU use is measured and
reported next to the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.parse
from dataclasses import asdict, dataclass, field

import numpy as np

BOUNDARY = "dede-bench-boundary-7b1c"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def multipart_body(images: list[bytes], filenames: list[str]) -> bytes:
    """What `curl -F images=@a.png -F images=@b.png` sends."""
    parts = []
    for data, name in zip(images, filenames, strict=True):
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


@dataclass
class LoadResult:
    mode: str  # "closed" (N clients back to back) or "open" (fixed arrival rate)
    concurrency: int
    images_per_request: int
    seconds: float
    requests: int
    errors: int
    images_per_s: float
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    generator_cpu_cores: float  # CPU seconds the generator used per wall second
    target_rps: float | None = None
    statuses: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _summarise(
    mode: str,
    concurrency: int,
    images_per_request: int,
    seconds: float,
    latencies: list[float],
    statuses: dict[str, int],
    cpu_s: float,
    target_rps: float | None = None,
) -> LoadResult:
    ok = statuses.get("200", 0)
    lat_ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return LoadResult(
        mode=mode,
        concurrency=concurrency,
        images_per_request=images_per_request,
        seconds=round(seconds, 3),
        requests=ok,
        errors=sum(statuses.values()) - ok,
        images_per_s=round(ok * images_per_request / seconds, 1),
        requests_per_s=round(ok / seconds, 1),
        p50_ms=round(float(np.percentile(lat_ms, 50)), 3),
        p95_ms=round(float(np.percentile(lat_ms, 95)), 3),
        p99_ms=round(float(np.percentile(lat_ms, 99)), 3),
        mean_ms=round(float(np.mean(lat_ms)), 3),
        generator_cpu_cores=round(cpu_s / seconds, 3),
        target_rps=target_rps,
        statuses=statuses,
    )


class TransportError(Exception):
    """The connection failed before a whole answer came back; the message is the cause's name."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


class Connection:
    """One keep-alive HTTP/1.1 connection (plain http) that sends POSTs with ready-made bodies and
    reads answers framed by Content-Length, which is all the service sends. Opened on first use and
    again after the server closes it; one request at a time."""

    def __init__(self, url: str, headers: dict[str, str], timeout_s: float = 60.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"the load generator speaks plain http to a host, not {url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self._fixed_headers = f"Host: {parts.netloc}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        self._timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def post(self, path: str, body: bytes) -> Answer:
        reused = self._writer is not None
        try:
            return await asyncio.wait_for(self._exchange(path, body), self._timeout_s)
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
            TimeoutError,
        ) as exc:
            await self.close()
            # A kept-alive connection the server closed while idle: say it again on a new one, as
            # HTTP clients do; anything else is the request's own failure.
            if reused and isinstance(exc, asyncio.IncompleteReadError) and not exc.partial:
                return await self.post(path, body)
            raise TransportError(type(exc).__name__) from exc

    async def _exchange(self, path: str, body: bytes) -> Answer:
        await self.open()
        assert self._reader is not None and self._writer is not None
        head = f"POST {path} HTTP/1.1\r\n{self._fixed_headers}Content-Length: {len(body)}\r\n\r\n"
        self._writer.writelines((head.encode("latin-1"), body))
        await self._writer.drain()
        lines = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        answer = Answer(
            status, headers, await self._reader.readexactly(int(headers.get("content-length", 0)))
        )
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return answer


async def closed_loop(
    url: str,
    bodies: list[bytes],
    images_per_request: int,
    concurrency: int,
    seconds: float,
    warmup_s: float = 1.0,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """`concurrency` clients, each sending its next request as soon as the last one is answered."""
    request_headers = {"Content-Type": CONTENT_TYPE, **(headers or {})}
    clients = [Connection(url, request_headers) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in clients))  # before the clock starts
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    async def client(number: int) -> None:
        connection, turn = clients[number], number
        while time.perf_counter() < window_end:
            body = bodies[turn % len(bodies)]
            turn += concurrency
            sent = time.perf_counter()
            try:
                status = str((await connection.post("/detect", body)).status)
            except TransportError as exc:
                status = str(exc)
            done = time.perf_counter()
            if window_start <= done <= window_end:
                statuses[status] = statuses.get(status, 0) + 1
                if status == "200":
                    latencies.append(done - sent)
        await connection.close()

    cpu_before = time.process_time()
    started = time.perf_counter()
    window_start, window_end = started + warmup_s, started + warmup_s + seconds
    await asyncio.gather(*(client(n) for n in range(concurrency)))
    cpu_s = (time.process_time() - cpu_before) * seconds / (time.perf_counter() - started)
    return _summarise("closed", concurrency, images_per_request, seconds, latencies, statuses, cpu_s)


async def open_loop(
    url: str,
    bodies: list[bytes],
    images_per_request: int,
    rate_rps: float,
    seconds: float,
    warmup_s: float = 1.0,
    headers: dict[str, str] | None = None,
    connections: int = 64,
) -> LoadResult:
    """Requests start at a fixed rate whatever the answers do, over a fixed pool of keep-alive
    connections (opened before the clock starts). Latency counts from each request's scheduled
    start, so time spent waiting for a free connection, or a generator falling behind, shows up as
    latency instead of hiding it."""
    request_headers = {"Content-Type": CONTENT_TYPE, **(headers or {})}
    pool = [Connection(url, request_headers) for _ in range(connections)]
    await asyncio.gather(*(c.open() for c in pool))  # before the clock starts
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for connection in pool:
        idle.put_nowait(connection)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def one(body: bytes, scheduled: float) -> None:
        connection = await idle.get()
        try:
            status = str((await connection.post("/detect", body)).status)
        except TransportError as exc:
            status = str(exc)
        finally:
            idle.put_nowait(connection)
        done = time.perf_counter()
        if window_start <= scheduled <= window_end:
            statuses[status] = statuses.get(status, 0) + 1
            if status == "200":
                latencies.append(done - scheduled)

    cpu_before = time.process_time()
    started = time.perf_counter()
    window_start, window_end = started + warmup_s, started + warmup_s + seconds
    interval, scheduled, turn = 1.0 / rate_rps, started, 0
    while scheduled < window_end:
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(bodies[turn % len(bodies)], scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        scheduled += interval
        turn += 1
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    cpu_s = (time.process_time() - cpu_before) * seconds / elapsed
    for connection in pool:
        await connection.close()
    return _summarise("open", connections, images_per_request, seconds, latencies, statuses, cpu_s, rate_rps)
