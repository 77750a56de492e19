"""Overload and shutdown against real server processes running a deliberately slow graph."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np
from conftest import encode, random_images, start_server
from synthetic_bundle import expected_score


def test_a_full_queue_answers_503_with_retry_after_at_once(heavy_bundle: Path, tmp_path: Path) -> None:
    server = start_server(heavy_bundle, tmp_path / "log", max_queue=4, max_batch_size=2, retry_after_s=2)
    try:
        pixels = random_images(60, seed=21)
        blobs = [encode(p) for p in pixels]

        async def send(http: httpx.AsyncClient, i: int) -> tuple[int, httpx.Response, float]:
            started = time.perf_counter()
            response = await http.post("/detect", files=[("images", ("a.png", blobs[i]))])
            return i, response, time.perf_counter() - started

        async def scenario() -> list[tuple[int, httpx.Response, float]]:
            async with httpx.AsyncClient(
                base_url=server.url, limits=httpx.Limits(max_connections=60)
            ) as http:
                return await asyncio.gather(*(send(http, i) for i in range(60)))

        outcomes = asyncio.run(scenario())
        refused = [(r, t) for _, r, t in outcomes if r.status_code == 503]
        served = [(i, r) for i, r, _ in outcomes if r.status_code == 200]
        assert refused and served, [r.status_code for _, r, _ in outcomes]
        # Refused at once, not after waiting in line: no refusal took as long as the slowest
        # accepted request (a ratio within one run, not a wall-clock bound a loaded machine breaks).
        slowest_served = max(t for _, r, t in outcomes if r.status_code == 200)
        assert max(t for _, t in refused) < slowest_served
        assert len(refused) + len(served) == 60
        for response, _ in refused:
            assert response.headers["retry-after"] == "2"
            assert response.json()["error"]["code"] == "queue_full"
        for i, response in served:
            (result,) = response.json()["images"]
            np.testing.assert_allclose(
                result["score"], expected_score(pixels[i].transpose(2, 0, 1)), rtol=1e-5
            )
        metrics = httpx.get(server.url + "/metrics").text
        assert f'dede_rejections_total{{reason="queue_full"}} {float(len(refused))}' in metrics
    finally:
        server.terminate()


def test_sigterm_under_load_loses_no_accepted_request(heavy_bundle: Path, tmp_path: Path) -> None:
    server = start_server(heavy_bundle, tmp_path / "log", max_batch_size=4, max_queue=512, log_format="json")
    pixels = random_images(16, seed=31)
    blobs = [encode(p) for p in pixels]
    expected = [expected_score(p.transpose(2, 0, 1)) for p in pixels]
    records: list[dict] = []  # one per request: when sent, when answered, what came back
    signal_sent = asyncio.Event()
    sigterm_at: list[float] = []

    async def client_loop(number: int) -> None:
        # Each simulated client has its own keep-alive connection and sends until the server is gone.
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            for turn in range(1000):
                indices = [(number + turn + k) % len(blobs) for k in range(4)]
                sent = time.perf_counter()
                record = {"sent": sent, "indices": indices}
                try:
                    upload = [("images", ("a.png", blobs[i])) for i in indices]
                    response = await http.post("/detect", files=upload)
                    record.update(status=response.status_code, body=response.json(), headers=response.headers)
                except httpx.TransportError as exc:
                    record.update(status=None, error=repr(exc))
                record["done"] = time.perf_counter()
                records.append(record)
                if record["status"] is None:
                    return
                if signal_sent.is_set() and record["status"] == 503:
                    await asyncio.sleep(0.01)

    async def terminate_midway() -> tuple[int, int]:
        while len(records) < 40:  # well under way
            await asyncio.sleep(0.01)
        sigterm_at.append(time.perf_counter())
        server.process.terminate()  # SIGTERM
        signal_sent.set()
        # Four-image requests keep about 100 images in flight: the drain outlasts this probe.
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            ready = await http.get("/readyz")
        return ready.status_code, await asyncio.to_thread(server.process.wait, 30)

    async def scenario() -> tuple[int, int]:
        clients = [asyncio.create_task(client_loop(n)) for n in range(24)]
        result = await terminate_midway()
        await asyncio.gather(*clients)
        return result

    ready_status, exit_code = asyncio.run(scenario())
    server.terminate()
    assert ready_status == 503  # readiness went false at once
    assert exit_code == 0, server.log()[-3000:]

    signalled = sigterm_at[0]
    for record in records:
        if record["status"] == 200:
            scores = [result["score"] for result in record["body"]["images"]]
            np.testing.assert_allclose(scores, [expected[i] for i in record["indices"]], rtol=1e-5)
        elif record["status"] == 503:
            assert record["body"]["error"]["code"] == "draining" and "retry-after" in record["headers"]
        else:
            # Only a request sent after SIGTERM may meet a closed connection: it was never accepted.
            assert record["status"] is None and record["sent"] > signalled, record
    finished_during_drain = [r for r in records if r["status"] == 200 and r["sent"] < signalled < r["done"]]
    assert finished_during_drain, "work accepted before SIGTERM should complete after it"
    assert any(r["status"] == 503 for r in records), "new work during the drain should get 503"
    log = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any("drained" in entry["message"] for entry in log)
    assert not any(entry["level"] == "error" for entry in log), [e for e in log if e["level"] == "error"]
