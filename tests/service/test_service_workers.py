"""Several serving processes on one port (DEDE_WORKERS): metrics summed over the workers, readiness
only when every worker is ready, a dead worker replaced, and SIGTERM drained by all of them."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import encode, random_images, start_server
from prometheus_client.multiprocess import MultiProcessCollector
from synthetic_bundle import expected_score

from service.settings import Settings
from service.workers import auto_workers, worker_settings


def test_auto_worker_count_and_thread_split() -> None:
    assert auto_workers(provider_is_cuda=True, cpu_count=16) == 8
    assert auto_workers(provider_is_cuda=True, cpu_count=4) == 4
    assert auto_workers(provider_is_cuda=False, cpu_count=1) == 1
    assert auto_workers(provider_is_cuda=False, cpu_count=2) == 2  # never one process on two cores
    assert auto_workers(provider_is_cuda=False, cpu_count=4) == 2
    assert auto_workers(provider_is_cuda=False, cpu_count=16) == 8
    settings = Settings(bundle=Path("unused"))
    assert worker_settings(settings, 2, cpu_count=8).intra_op_threads == 4
    assert worker_settings(settings, 4, cpu_count=2).intra_op_threads == 1
    assert worker_settings(settings, 1, cpu_count=8).intra_op_threads == 0  # one process: ORT decides
    pinned = Settings(bundle=Path("unused"), intra_op_threads=3)
    assert worker_settings(pinned, 2, cpu_count=8).intra_op_threads == 3  # set by the user: kept


def _worker_pids(supervisor: int) -> set[int]:
    """The supervisor's worker processes (its other child is multiprocessing's resource tracker)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return {pid for pid in map(int, children) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()}


def _count_by_pid(metrics_dir: Path, name: str) -> dict[int, float]:
    """The counter `name` (summed over its labels) per worker pid, from the multiprocess files."""
    out: dict[int, float] = {}
    for file in glob.glob(str(metrics_dir / "counter_*.db")):
        pid = int(Path(file).stem.rsplit("_", 1)[1])
        for metric in MultiProcessCollector.merge([file], accumulate=False):
            if metric.name == name:
                out[pid] = out.get(pid, 0.0) + sum(
                    s.value for s in metric.samples if s.name.endswith("_total")
                )
    return out


def _metric(text: str, line_start: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(line_start)]
    return float(line.rsplit(" ", 1)[1])


def test_two_workers_sum_their_metrics_and_a_dead_one_is_replaced(
    heavy_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics_dir = tmp_path / "metrics"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    server = start_server(heavy_bundle, tmp_path / "log", workers=2, max_batch_size=4)
    try:
        workers = _worker_pids(server.process.pid)
        assert len(workers) == 2, workers
        pixels = random_images(48, seed=5)
        blobs = [encode(p) for p in pixels]

        async def send(i: int) -> httpx.Response:
            # A connection per request: each is accepted by whichever worker takes it first.
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                return await http.post("/detect", files=[("images", ("a.png", blobs[i]))])

        async def scenario() -> list[httpx.Response]:
            return await asyncio.gather(*(send(i) for i in range(len(blobs))))

        # Which worker accepts a connection is the kernel's choice: send rounds until both served.
        sent = 0
        for _ in range(4):
            responses = asyncio.run(scenario())
            sent += len(blobs)
            assert [r.status_code for r in responses] == [200] * len(blobs)
            for pixel, response in zip(pixels, responses, strict=True):
                (result,) = response.json()["images"]
                expected = expected_score(pixel.transpose(2, 0, 1))
                np.testing.assert_allclose(result["score"], expected, rtol=1e-5)
            per_worker = _count_by_pid(metrics_dir, "dede_images")
            if sum(1 for v in per_worker.values() if v > 0) == 2:
                break
        assert sum(per_worker.values()) == sent
        assert sum(1 for v in per_worker.values() if v > 0) == 2, (
            f"one worker took every request: {per_worker}"
        )
        # Whichever worker answers /metrics reports the sum over both.
        for _ in range(6):
            text = httpx.get(server.url + "/metrics").text
            assert (
                _metric(text, 'dede_images_total{outcome="flagged"}')
                + _metric(text, 'dede_images_total{outcome="clean"}')
                == sent
            )
            assert _metric(text, "dede_ready ") == 1.0
        # The service's CPU time and memory, summed over the supervisor and every worker.
        supervisor_and_workers = [server.process.pid, *workers]
        rss_each = [
            int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for pid in supervisor_and_workers
        ]
        text = httpx.get(server.url + "/metrics").text
        assert _metric(text, "process_cpu_seconds_total ") > 0
        assert _metric(text, "process_resident_memory_bytes ") > 0.8 * sum(rss_each)

        # A worker killed outright: not ready until its replacement is, and no count is lost.
        victim = next(iter(workers))
        os.kill(victim, signal.SIGKILL)
        statuses = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = httpx.get(server.url + "/readyz").status_code
            statuses.append(status)
            if status == 200 and 503 in statuses:
                break
            time.sleep(0.02)
        assert 503 in statuses and statuses[-1] == 200, statuses[-20:]
        replaced = _worker_pids(server.process.pid)
        assert len(replaced) == 2 and victim not in replaced
        text = httpx.get(server.url + "/metrics").text
        assert (
            _metric(text, 'dede_images_total{outcome="flagged"}')
            + _metric(text, 'dede_images_total{outcome="clean"}')
            == sent
        )
        assert "died with -9; starting a new one" in server.log()
    finally:
        assert server.terminate() == 0, server.log()[-3000:]


def test_sigterm_drains_every_worker(heavy_bundle: Path, tmp_path: Path) -> None:
    server = start_server(heavy_bundle, tmp_path / "log", workers=2, max_batch_size=4, log_format="json")
    workers = _worker_pids(server.process.pid)
    pixels = random_images(16, seed=41)
    blobs = [encode(p) for p in pixels]
    expected = [expected_score(p.transpose(2, 0, 1)) for p in pixels]
    records: list[dict] = []
    sigterm_at: list[float] = []

    async def client_loop(number: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            for turn in range(1000):
                indices = [(number + turn + k) % len(blobs) for k in range(4)]
                record: dict = {"sent": time.perf_counter(), "indices": indices}
                try:
                    upload = [("images", ("a.png", blobs[i])) for i in indices]
                    response = await http.post("/detect", files=upload)
                    record.update(status=response.status_code, body=response.json())
                except httpx.TransportError as exc:
                    record.update(status=None, error=repr(exc))
                record["done"] = time.perf_counter()
                records.append(record)
                if record["status"] is None:
                    return
                if sigterm_at and record["status"] == 503:
                    await asyncio.sleep(0.01)

    async def scenario() -> float:
        clients = [asyncio.create_task(client_loop(n)) for n in range(16)]
        while len(records) < 40:
            await asyncio.sleep(0.01)
        sigterm_at.append(time.perf_counter())
        server.process.terminate()
        await asyncio.to_thread(server.process.wait, 30)
        exited_after = time.perf_counter() - sigterm_at[0]
        await asyncio.gather(*clients)
        return exited_after

    exited_after = asyncio.run(scenario())
    status = server.terminate()
    assert status == 0, server.log()[-3000:]
    assert exited_after < Settings(bundle=Path("unused")).drain_timeout_s + 2
    assert not any(_alive(pid) for pid in workers), "a worker outlived the supervisor"
    for record in records:
        if record["status"] == 200:
            scores = [result["score"] for result in record["body"]["images"]]
            np.testing.assert_allclose(scores, [expected[i] for i in record["indices"]], rtol=1e-5)
        elif record["status"] == 503:
            assert record["body"]["error"]["code"] == "draining"
        else:  # only a request sent after SIGTERM may meet a closed connection: it was never accepted
            assert record["status"] is None and record["sent"] > sigterm_at[0], record
    assert any(r["status"] == 200 and r["sent"] < sigterm_at[0] < r["done"] for r in records)
    log = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    drained = [e for e in log if "drained" in e["message"]]
    assert len(drained) == 2, [e["message"] for e in log][-30:]  # each worker drained its own work
    assert not any(e["level"] == "error" for e in log), [e for e in log if e["level"] == "error"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")
