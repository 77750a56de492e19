"""Ray Serve: the service's app on a local Ray with 2 replicas answers from both, batches with
@serve.batch, and gives the same scores as the single-process service.

Skipped where ray[serve] is not installed. About 20-30 s on 2 cores (Ray start ~6 s, two replicas
loading ~5 s, shutdown ~4 s), plus the session's tiny bundle when no other test built it.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image

pytest.importorskip("ray.serve", reason="ray[serve] is not installed")

REPO_ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"max_batch_size": 8, "max_batch_delay_ms": 20, "intra_op_threads": 1, "decode_threads": 1}


def png_images(count: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(count):
        scale = rng.uniform(0.2, 1.0)
        pixels = (rng.integers(0, 256, size=(32, 32, 3)) * scale).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    return blobs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_scores(bundle: Path, blobs: list[bytes]) -> list[float]:
    """The reference: the same app, as `python -m service` builds it, one image per request."""
    from service.app import create_app
    from service.settings import Settings

    with TestClient(create_app(Settings(bundle=bundle, **SETTINGS))) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the single-process app never became ready"
            time.sleep(0.05)
        answers = [
            client.post("/detect", content=blob, headers={"Content-Type": "image/png"}) for blob in blobs
        ]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return [a.json()["images"][0]["score"] for a in answers]


@pytest.fixture
def ray_serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A local Ray (2 CPUs, no dashboard) with Serve's proxy on a free loopback port; its URL."""
    import ray
    from ray import serve

    # ray-serve-notes: without these Ray writes an auth token under $HOME and reports usage.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    # Replicas are separate processes started by Ray: they import deploy/ and service/ from here.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    )
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_batch_queue_keeps_the_service_batchers_contract() -> None:
    """Bounded (QueueFull), room reserved before decoding counts against the bound (the API's
    admission path), closed on stop (BatcherClosed), a failed batch fails its images with
    InferenceFailed, and the queue-depth gauge returns to 0; no Ray needed for this part."""
    import asyncio

    from deploy.ray_app import BatchResult, RayBatchQueue
    from service.batcher import BatcherClosed, InferenceFailed, QueueFull
    from service.metrics import Metrics

    async def scenario() -> None:
        metrics = Metrics(8, 1.0)
        release = asyncio.Event()

        async def score_one(image: np.ndarray) -> BatchResult:
            await release.wait()
            if image.dtype == np.int8:  # the failing "batch"
                raise RuntimeError("boom")
            return BatchResult(float(image.sum()), time.perf_counter(), 0.001, 2)

        queue = RayBatchQueue(score_one, max_queue=3, metrics=metrics)
        ok = queue.submit([np.ones(2, np.uint8), np.full(2, 2, np.uint8)])
        assert queue.queue_depth == 2 and not queue.has_room(2)
        with pytest.raises(QueueFull):
            queue.submit([np.ones(2, np.uint8)] * 2)
        bad = queue.submit([np.ones(2, np.int8)])
        release.set()
        scored = await asyncio.gather(*ok)
        assert [s.score for s in scored] == [2.0, 4.0] and scored[0].batch_size == 2
        with pytest.raises(InferenceFailed, match="boom"):
            await bad[0]
        assert queue.queue_depth == 0

        with queue.reserve(2) as reservation:
            assert not queue.has_room(2)
            with pytest.raises(QueueFull), queue.reserve(2):
                pass
            (late,) = reservation.submit([np.full(2, 3, np.uint8)])
        assert (await late).score == 6.0 and queue.has_room(3)

        await queue.stop(1.0)
        with pytest.raises(BatcherClosed):
            queue.submit([np.ones(2, np.uint8)])
        with pytest.raises(BatcherClosed), queue.reserve(1):
            pass

    asyncio.run(scenario())


def test_serve_config_is_a_valid_ray_serve_config_for_this_app() -> None:
    from ray.serve.schema import ServeDeploySchema

    from deploy.ray_app import build

    raw = yaml.safe_load((REPO_ROOT / "deploy" / "serve_config.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    (app,) = config.applications
    assert app.import_path == "deploy.ray_app:build"
    (deployment,) = app.deployments
    assert deployment.max_ongoing_requests >= app.args["max_batch_size"]  # else Ray caps the batches
    scaling = deployment.autoscaling_config
    assert 1 <= scaling["min_replicas"] <= scaling["initial_replicas"] <= scaling["max_replicas"]
    assert scaling["target_ongoing_requests"] < deployment.max_ongoing_requests
    build(app.args)  # the args are valid service settings


def metric_total(text: str, name: str) -> float:
    return sum(
        float(v) for v in re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M)
    )


def test_two_replicas_share_the_traffic_and_score_like_the_single_process_service(
    tiny_bundle: Path, ray_serve: str
) -> None:
    from ray import serve

    from deploy.ray_app import REPLICA_HEADER, DedeDeployment

    blobs = png_images(12, seed=7)
    expected = single_process_scores(tiny_bundle, blobs)

    app = DedeDeployment.options(
        num_replicas=2, autoscaling_config=None, ray_actor_options={"num_cpus": 0.5}
    ).bind({"bundle": str(tiny_bundle), **SETTINGS})
    serve.run(app, name="dede", route_prefix="/")

    # 36 requests of 1 to 3 images from 12 concurrent clients: enough for Ray to route to both
    # replicas and for @serve.batch to gather images of different requests.
    requests = [[(i + j) % len(blobs) for j in range(1 + i % 3)] for i in range(36)]

    def post(indices: list[int]) -> httpx.Response:
        with httpx.Client(base_url=ray_serve, timeout=60) as http:
            files = [("images", (f"img{k}.png", blobs[k], "image/png")) for k in indices]
            return http.post("/detect", files=files)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(post, requests))

    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    served_by = {a.headers[REPLICA_HEADER] for a in answers}
    assert len(served_by) == 2, f"all requests went to {served_by}"
    for indices, answer in zip(requests, answers, strict=True):
        scores = [image["score"] for image in answer.json()["images"]]
        assert scores == [expected[k] for k in indices]  # bit-identical to the single process

    # Each replica exports its own metrics: fewer model runs than images means batching happened.
    # Concurrent scrapes: one client asking in turn may be routed to the same idle replica each time.
    def scrape(_: int) -> httpx.Response:
        with httpx.Client(base_url=ray_serve, timeout=30) as http:
            return http.get("/metrics")

    metrics_by_replica: dict[str, str] = {}
    with ThreadPoolExecutor(8) as pool:
        for _ in range(25):
            for response in pool.map(scrape, range(8)):
                metrics_by_replica.setdefault(response.headers[REPLICA_HEADER], response.text)
            if len(metrics_by_replica) == 2:
                break
    assert len(metrics_by_replica) == 2, f"/metrics only ever answered by {set(metrics_by_replica)}"
    batches = sum(metric_total(text, "dede_batch_size_count") for text in metrics_by_replica.values())
    images = sum(metric_total(text, "dede_batch_size_sum") for text in metrics_by_replica.values())
    assert images == sum(len(r) for r in requests)
    assert batches < images, f"{batches} model runs for {images} images: nothing was batched"
