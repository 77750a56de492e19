"""Load generator: asyncio + httpx, every simulated client on its own keep-alive connection.

Bodies are multipart-encoded once up front, so the generator's per-request CPU is httpx's alone;
its CPU use is measured and reported next to the results (on 2 cores it competes with the server).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import asdict, dataclass, field

import httpx
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


# httpx builds (and fills with CA certificates) an SSL context per client, even for http:// URLs:
# tens of milliseconds each. One shared context keeps 128 clients cheap to open.
_SSL_CONTEXT = ssl.create_default_context()


def _client(url: str, headers: dict[str, str]) -> httpx.AsyncClient:
    one_connection = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.AsyncClient(
        base_url=url, headers=headers, limits=one_connection, timeout=60, verify=_SSL_CONTEXT
    )


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
    clients = [_client(url, request_headers) for _ in range(concurrency)]  # before the clock starts
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    async def client(number: int) -> None:
        async with clients[number] as http:
            turn = number
            while time.perf_counter() < window_end:
                body = bodies[turn % len(bodies)]
                turn += concurrency
                sent = time.perf_counter()
                try:
                    status = str((await http.post("/detect", content=body)).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                done = time.perf_counter()
                if window_start <= done <= window_end:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == "200":
                        latencies.append(done - sent)

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
    pool = [_client(url, request_headers) for _ in range(connections)]
    idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
    for http in pool:
        idle.put_nowait(http)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def one(body: bytes, scheduled: float) -> None:
        http = await idle.get()
        try:
            status = str((await http.post("/detect", content=body)).status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        finally:
            idle.put_nowait(http)
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
    for http in pool:
        await http.aclose()
    return _summarise("open", connections, images_per_request, seconds, latencies, statuses, cpu_s, rate_rps)
