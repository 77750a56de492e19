"""dede.client against a running service: chunking to the server's limits, order, typed results,
retries on 503 + Retry-After, the async client, and `dede detect` (which never imports torch)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import API_KEY, REPO_ROOT, SERVER_LIMITS, ServerProcess, encode, random_images
from synthetic_bundle import THRESHOLD, expected_score

from dede.client import AsyncClient, Client, DedeError, ServerLimits, chunks
from training.cli import main


class CountingTransport(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.detect_requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.detect_requests += request.url.path == "/detect"
        return super().handle_request(request)


def _uploads(count: int, seed: int) -> tuple[list[tuple[str, bytes]], list[float]]:
    images = random_images(count, seed=seed)
    uploads = [(f"img{i}.png", encode(image)) for i, image in enumerate(images)]
    return uploads, [expected_score(image.transpose(2, 0, 1)) for image in images]


def test_chunks_respect_count_and_bytes() -> None:
    uploads = [("a", b"x" * 1000)] * 10
    limits = ServerLimits(max_images_per_request=4, max_upload_bytes=3000)
    assert list(chunks(uploads, limits)) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert list(chunks(uploads, ServerLimits(4, 10**6))) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(chunks([("big", b"x" * 5000), ("a", b"x")], limits)) == [[0], [1]]  # too big: alone


def test_many_images_in_order_across_chunks(server: ServerProcess) -> None:
    uploads, expected = _uploads(95, seed=31)
    uploads.insert(50, ("broken.png", b"not an image"))
    expected.insert(50, None)
    transport = CountingTransport()
    with Client(server.url, api_key=API_KEY, transport=transport) as client:
        limits = client.limits()
        assert limits == ServerLimits(
            SERVER_LIMITS["max_images_per_request"], SERVER_LIMITS["max_upload_bytes"]
        )
        result = client.detect(uploads)
    assert transport.detect_requests >= 3  # 96 images, at most 40 per request
    assert result.model_name == "synthetic" and result.threshold == pytest.approx(THRESHOLD)
    assert [image.index for image in result.images] == list(range(96))
    assert [image.filename for image in result.images] == [name for name, _ in uploads]
    broken = result.images[50]
    assert broken.score is None and broken.error is not None and result.errors == [broken]
    scores = [image.score for image in result.images]
    assert scores[:50] + scores[51:] == pytest.approx(expected[:50] + expected[51:], rel=1e-5)
    assert result.flagged == [i for i in result.images if i.score is not None and i.score > THRESHOLD]


def test_async_client_gives_the_same_answer(server: ServerProcess, tmp_path: Path) -> None:
    uploads, expected = _uploads(45, seed=32)
    paths = []
    for name, data in uploads[:5]:
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)

    async def go():  # noqa: ANN202
        async with AsyncClient(server.url, api_key=API_KEY, concurrency=2) as client:
            return await client.detect([*paths, *uploads[5:]], explain=False)

    result = asyncio.run(go())
    assert [image.score for image in result.images] == pytest.approx(expected, rel=1e-5)
    assert [image.filename for image in result.images] == [name for name, _ in uploads]


def test_a_wrong_key_is_an_error_not_a_retry(server: ServerProcess) -> None:
    slept: list[float] = []
    with (
        Client(server.url, api_key="wrong", sleep=slept.append) as client,
        pytest.raises(DedeError) as caught,
    ):
        client.detect([encode(random_images(1, seed=1)[0])])
    assert caught.value.status == 401 and caught.value.code == "unauthorized" and slept == []


def _models_body() -> dict:
    return {"models": [{"max_images_per_request": 8, "max_upload_bytes": 10**6}]}


def _detect_body(count: int) -> dict:
    images = [{"index": i, "filename": f"image-{i}", "score": 0.1, "flagged": False} for i in range(count)]
    return {"model_name": "m", "model_version": "1", "threshold": 0.3, "images": images}


def test_503_is_retried_after_the_servers_retry_after() -> None:
    answers = iter([(503, {"Retry-After": "2"}), (503, {"Retry-After": "3"}), (200, {})])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=_models_body())
        status, headers = next(answers)
        if status == 503:
            return httpx.Response(
                503, headers=headers, json={"error": {"code": "queue_full", "message": "full"}}
            )
        return httpx.Response(200, json=_detect_body(1))

    slept: list[float] = []
    with Client("http://dede", transport=httpx.MockTransport(handler), sleep=slept.append) as client:
        result = client.detect([b"png"])
    assert slept == [2.0, 3.0] and result.images[0].score == 0.1


def test_retries_end_and_backoff_is_capped() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=_models_body())
        return httpx.Response(503, json={"error": {"code": "busy", "message": "busy"}})  # no Retry-After

    slept: list[float] = []
    client = Client(
        "http://dede",
        transport=httpx.MockTransport(handler),
        sleep=slept.append,
        max_retries=4,
        max_retry_wait_s=1.0,
    )
    with client, pytest.raises(DedeError) as caught:
        client.detect([b"png"])
    assert caught.value.status == 503 and caught.value.code == "busy"
    assert slept == [0.25, 0.5, 1.0, 1.0]


def test_dede_detect_command(server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uploads, expected = _uploads(3, seed=33)
    files = []
    for name, data in uploads:
        (tmp_path / name).write_bytes(data)
        files.append(str(tmp_path / name))
    assert main(["detect", server.url, *files, "--api-key", API_KEY, "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["path"] for row in rows] == files
    assert [row["score"] for row in rows] == pytest.approx(expected, rel=1e-5)
    assert main(["detect", server.url, *files]) == 2  # no key: refused, one line
    assert "401" in capsys.readouterr().err


def test_dede_detect_never_imports_torch(server: ServerProcess, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_images(1, seed=34)[0]))
    code = (
        "import sys; from training.cli import main; "
        f"status = main(['detect', {server.url!r}, {str(image)!r}, '--api-key', {API_KEY!r}]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(status)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "a.png" in done.stdout
