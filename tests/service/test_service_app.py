"""The app in-process (lifespan running): states and failures that are awkward to reach over a socket."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import pytest
from conftest import encode, random_images

with warnings.catch_warnings():  # starlette nags about its httpx-based test client
    warnings.filterwarnings("ignore", message=".*httpx2", category=UserWarning)
    from fastapi.testclient import TestClient

from service import decode_step
from service.app import create_app
from service.settings import Settings


def make_client(bundle: Path, **settings: object) -> TestClient:
    return TestClient(create_app(Settings(bundle=bundle, **settings)), raise_server_exceptions=False)


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 10
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.01)


def upload() -> list:
    return [("images", ("a.png", encode(random_images(1, seed=41)[0])))]


def test_before_startup_nothing_is_ready_and_detect_is_503(synthetic_bundle: Path) -> None:
    client = make_client(synthetic_bundle, retry_after_s=3)  # no `with`: the lifespan has not run
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["ready"] is False and ready.headers["retry-after"] == "3"
    refused = client.post("/detect", files=upload())
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
    assert refused.headers["retry-after"] == "3"


def test_no_key_needed_when_none_is_set(synthetic_bundle: Path) -> None:
    with make_client(synthetic_bundle) as client:
        wait_ready(client)
        assert client.post("/detect", files=upload()).status_code == 200
        assert client.get("/v1/models").status_code == 200


def test_metrics_can_be_protected_too(synthetic_bundle: Path) -> None:
    with make_client(synthetic_bundle, api_key="k", protect_metrics=True) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"X-API-Key": "k"}).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_an_unexpected_error_is_a_500_with_an_error_id_that_is_logged(
    synthetic_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(decode_step, "decode_images", broken)
    with make_client(synthetic_bundle) as client, caplog.at_level(logging.ERROR):
        wait_ready(client)
        response = client.post("/detect", files=upload())
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal_error" and error["error_id"] in error["message"]
    assert "decoder bug" not in response.text  # internals stay in the log
    assert any(error["error_id"] in r.getMessage() and r.exc_info for r in caplog.records)
    assert response.headers["x-request-id"]


def test_a_failing_model_run_is_a_500_inference_failed_and_the_service_goes_on(
    synthetic_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class ExplodingSession:
        def run(self, *args: object) -> None:
            raise RuntimeError("kernel fault")

    with make_client(synthetic_bundle) as client, caplog.at_level(logging.ERROR):
        wait_ready(client)
        detector = client.app.state.service.detector
        healthy_session, detector._session = detector._session, ExplodingSession()
        response = client.post("/detect", files=upload())
        detector._session = healthy_session
        after = client.post("/detect", files=upload())
        metrics = client.get("/metrics").text
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "inference_failed" and any(
        error["error_id"] in r.getMessage() for r in caplog.records
    )
    assert after.status_code == 200
    assert "dede_inference_failures_total 1.0" in metrics


def test_cors_is_off_by_default_and_on_when_configured(synthetic_bundle: Path) -> None:
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"}
    with make_client(synthetic_bundle) as client:
        assert "access-control-allow-origin" not in client.options("/detect", headers=preflight).headers
    with make_client(synthetic_bundle, cors_origins=["https://ui.example"]) as client:
        allowed = client.options("/detect", headers=preflight)
        assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
