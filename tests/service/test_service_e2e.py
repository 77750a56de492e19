"""End to end over loopback against a real `python -m service` process and the synthetic bundle."""

from __future__ import annotations

import asyncio
import io
import json
import re

import httpx
import numpy as np
import pytest
from conftest import API_KEY, ServerProcess, encode, random_images
from PIL import Image
from synthetic_bundle import THRESHOLD, expected_score

from models.bundle import InputSpec, prepare_image

SPEC = InputSpec(height=32, width=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def score_of(data: bytes) -> float:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return expected_score(prepare_image(image, SPEC))


def files(blobs: list[bytes], field: str = "images") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"img{i}.png", blob, "application/octet-stream")) for i, blob in enumerate(blobs)]


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    match = re.search(r"^" + pattern + "$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body


# -- scoring -----------------------------------------------------------------------------------


def test_many_images_in_one_request_each_get_their_own_score_in_order(client: httpx.Client) -> None:
    pixels = random_images(40, seed=11)
    blobs = [encode(p) for p in pixels]
    response = client.post("/detect", files=files(blobs))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "synthetic" and body["threshold"] == THRESHOLD
    assert [r["index"] for r in body["images"]] == list(range(40))
    assert [r["filename"] for r in body["images"]] == [f"img{i}.png" for i in range(40)]
    expected = [expected_score(p.transpose(2, 0, 1)) for p in pixels]
    np.testing.assert_allclose([r["score"] for r in body["images"]], expected, rtol=1e-5)
    assert [r["flagged"] for r in body["images"]] == [s > THRESHOLD for s in expected]
    assert any(r["flagged"] for r in body["images"]) and not all(r["flagged"] for r in body["images"])
    assert set(body["timing"]) == {"decode_ms", "queue_ms", "compute_ms", "total_ms"}
    assert body["timing"]["total_ms"] >= body["timing"]["compute_ms"] > 0


def test_concurrent_requests_are_batched_together_without_mix_ups(server: ServerProcess) -> None:
    requests = []
    for i in range(48):
        pixels = random_images(1 + i % 3, seed=100 + i, size=(32 + i % 5, 32))  # some need resizing
        blobs = [encode(p, "PNG") for p in pixels]
        requests.append((blobs, [score_of(b) for b in blobs]))

    async def send(http: httpx.AsyncClient, blobs: list[bytes]) -> list[float]:
        response = await http.post("/detect", files=files(blobs))
        assert response.status_code == 200, response.text
        return [r["score"] for r in response.json()["images"]]

    async def scenario() -> list[list[float]]:
        limits = httpx.Limits(max_connections=64)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, limits=limits, timeout=30) as http:
            return await asyncio.gather(*(send(http, blobs) for blobs, _ in requests))

    before = httpx.get(server.url + "/metrics").text
    answers = asyncio.run(scenario())
    after = httpx.get(server.url + "/metrics").text
    for got, (_, expected) in zip(answers, requests, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    images = sum(len(blobs) for blobs, _ in requests)
    batches = metric(after, "dede_batch_size_count") - metric(before, "dede_batch_size_count")
    assert batches < images, "48 concurrent requests should share batches"


def test_a_raw_image_body_is_one_image(client: httpx.Client) -> None:
    blob = encode(random_images(1, seed=12)[0], "JPEG", quality=85)
    response = client.post("/detect", content=blob, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    (result,) = response.json()["images"]
    assert result["filename"] is None
    assert result["score"] == pytest.approx(score_of(blob), rel=1e-5)


def test_one_bad_image_fails_alone_while_the_others_are_scored(client: httpx.Client) -> None:
    good = [encode(p) for p in random_images(2, seed=13)]
    gif = encode(random_images(1, seed=13)[0], "GIF")
    truncated = encode(random_images(1, seed=14, size=(64, 64))[0])[:300]
    response = client.post("/detect", files=files([good[0], gif, truncated, good[1]]))
    assert response.status_code == 200, response.text
    results = response.json()["images"]
    assert results[0]["score"] == pytest.approx(score_of(good[0]), rel=1e-5)
    assert results[3]["score"] == pytest.approx(score_of(good[1]), rel=1e-5)
    assert results[1]["error"]["code"] == "unsupported_format" and results[1]["score"] is None
    assert (
        results[2]["error"]["code"] in {"truncated_image", "corrupt_image"} and results[2]["flagged"] is None
    )


# -- every error status ------------------------------------------------------------------------


def test_401_without_or_with_a_wrong_key(server: ServerProcess) -> None:
    blob = encode(random_images(1, seed=15)[0])
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert_error(http.post("/detect", files=files([blob])), 401, "unauthorized")
        wrong = http.post("/detect", files=files([blob]), headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, "unauthorized")
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert_error(http.get("/v1/models"), 401, "unauthorized")
        assert http.post(
            "/detect", files=files([blob]), headers={"Authorization": f"Bearer {API_KEY}"}
        ).is_success
        # Health and metrics stay open.
        assert http.get("/healthz").status_code == 200 and http.get("/metrics").status_code == 200


def test_400_for_malformed_multipart(client: httpx.Client) -> None:
    no_boundary = client.post("/detect", content=b"x", headers={"Content-Type": "multipart/form-data"})
    assert_error(no_boundary, 400, "malformed_request")
    unterminated = b'--XyZ\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\nabc'
    response = client.post(
        "/detect", content=unterminated, headers={"Content-Type": "multipart/form-data; boundary=XyZ"}
    )
    assert_error(response, 400, "malformed_request")


def test_413_for_a_body_over_the_limit_declared_or_streamed(client: httpx.Client) -> None:
    big = bytes(400_000)
    declared = client.post("/detect", content=big, headers={"Content-Type": "image/png"})
    assert_error(declared, 413, "request_too_large")

    def chunks():  # no Content-Length: the limit must bite while streaming
        for _ in range(40):
            yield bytes(10_000)

    streamed = client.post("/detect", content=chunks(), headers={"Content-Type": "image/png"})
    assert_error(streamed, 413, "request_too_large")


def test_413_for_an_image_over_the_pixel_limit(client: httpx.Client) -> None:
    large = encode(np.zeros((600, 600, 3), np.uint8))  # 360k pixels > 512 * 512, yet a small file
    body = assert_error(client.post("/detect", files=files([large])), 413, "image_too_large")
    assert body["error"]["images"][0]["error"]["code"] == "image_too_large"


def test_415_for_a_refused_format_or_content_type(client: httpx.Client) -> None:
    gif = encode(random_images(1, seed=16)[0], "GIF")
    # Declared as PNG, but the bytes say GIF: the bytes win.
    response = client.post("/detect", files=[("images", ("x.png", gif, "image/png"))])
    assert_error(response, 415, "unsupported_format")
    assert_error(
        client.post("/detect", content=b"{}", headers={"Content-Type": "application/json"}),
        415,
        "unsupported_media_type",
    )


def test_422_for_no_images_or_too_many(client: httpx.Client) -> None:
    blob = encode(random_images(1, seed=17)[0])
    body = assert_error(client.post("/detect", files=files([blob], field="file")), 422, "no_images")
    assert "file" in body["error"]["message"]
    assert_error(client.post("/detect", content=b"", headers={"Content-Type": "image/png"}), 422, "no_images")
    assert_error(client.post("/detect", files=files([blob] * 41)), 422, "too_many_images")


# -- health, models, docs, metrics, request ids ------------------------------------------------


def test_health_readiness_models_and_docs(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True}
    (model,) = client.get("/v1/models").json()["models"]
    assert model["name"] == "synthetic" and model["provider"] == "CPUExecutionProvider"
    assert model["threshold"] == THRESHOLD and model["input"]["height"] == 32
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/detect"]["post"]["requestBody"]["content"]


def test_metrics_move_with_requests(client: httpx.Client) -> None:
    bright = np.full((32, 32, 3), 250, np.uint8)  # score ~0.96: flagged
    dark = np.full((32, 32, 3), 10, np.uint8)  # score ~0.0015: clean
    before = client.get("/metrics").text
    assert client.post("/detect", files=files([encode(bright), encode(dark), b"junk"])).status_code == 200
    assert client.post("/detect", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
    after = client.get("/metrics").text

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("dede_requests_total", endpoint="/detect", status="200") == 1
    assert moved("dede_requests_total", endpoint="/detect", status="415") == 1
    assert moved("dede_images_total", outcome="flagged") == 1
    assert moved("dede_images_total", outcome="clean") == 1
    assert moved("dede_images_total", outcome="error") == 1
    assert moved("dede_score_count") == 2
    assert moved("dede_batch_size_count") >= 1 and moved("dede_batch_compute_seconds_count") >= 1
    assert moved("dede_queue_wait_seconds_count") == 2
    assert moved("dede_request_duration_seconds_count", endpoint="/detect") == 2
    info = 'dede_model_info{name="synthetic",provider="CPUExecutionProvider",threshold="0.3",version="test-1"} 1.0'
    assert info in after
    assert "dede_queue_depth 0.0" in after and "dede_ready 1.0" in after


def test_request_ids_are_echoed_and_logged(client: httpx.Client, server: ServerProcess) -> None:
    generated = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    mine = client.post(
        "/detect", content=b"x", headers={"Content-Type": "text/plain", "X-Request-ID": "abc-123"}
    )
    assert mine.headers["x-request-id"] == "abc-123"
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    access = [e for e in lines if e.get("request_id") == "abc-123" and e["logger"] == "dede.access"]
    assert access and access[0]["status"] == 415
