"""Security and faults: bodies refused while they stream, slow clients timed out, metrics on a port of
their own, the API key compared in constant time, and every start-up fault ends the process with one
line while readiness never goes true."""

from __future__ import annotations

import json
import os
import select
import socket
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import API_KEY, REPO_ROOT, ServerProcess, encode, free_port, random_images, start_server
from faults import FAULTS, run_until_exit
from synthetic_bundle import make_synthetic_bundle

with warnings.catch_warnings():  # starlette nags about its httpx-based test client
    warnings.filterwarnings("ignore", message=".*httpx2", category=UserWarning)
    from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


def read_answer(sock: socket.socket, wait_s: float) -> bytes:
    """Whatever the server has sent within `wait_s` seconds (until it closes, or the wait ends)."""
    received = b""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            break
        try:
            data = sock.recv(65_536)
        except ConnectionResetError:
            break
        if not data:
            break
        received += data
        if b"\r\n\r\n" in received and received.split(b"\r\n\r\n", 1)[1].rstrip().endswith(b"}"):
            break
    return received


def status_and_headers(answer: bytes) -> tuple[int, dict[str, str]]:
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), headers


def test_a_huge_chunked_body_is_refused_while_it_streams(server: ServerProcess) -> None:
    """64 MB offered without Content-Length against a 300 kB limit: the 413 comes back long before
    the body could have been buffered, and the connection is closed."""
    offered = 64 * 2**20
    chunk = b"%x\r\n" % 65_536 + bytes(65_536) + b"\r\n"
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /detect HTTP/1.1\r\nHost: test\r\nX-API-Key: " + API_KEY.encode() + b"\r\n"
            b"Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        try:
            while sent < offered:
                sock.sendall(chunk)
                sent += 65_536
                answer += read_answer(sock, 0.01) if select.select([sock], [], [], 0)[0] else b""
                if answer:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection: what it said is in the socket's buffer
        answer += read_answer(sock, 10)
    status, headers = status_and_headers(answer)
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"
    assert sent < offered // 2, f"sent {sent} bytes before the refusal"  # socket buffers hold a few MB


def test_a_declared_length_over_the_limit_is_refused_at_once_and_the_connection_stays_usable(
    server: ServerProcess,
) -> None:
    image = encode(random_images(1, seed=63)[0])
    head = b"POST /detect HTTP/1.1\r\nHost: test\r\nX-API-Key: " + API_KEY.encode() + b"\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + b"Content-Type: image/png\r\nContent-Length: 400000\r\n\r\n")
        answer = read_answer(sock, 10)  # before a single byte of the body was sent
        status, headers = status_and_headers(answer)
        assert status == 413 and headers.get("connection") != "close"
        sock.sendall(bytes(400_000))  # the client goes on sending what it declared; the server drops it
        sock.sendall(head + b"Content-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(image) + image)
        status, _ = status_and_headers(read_answer(sock, 10))
        assert status == 200  # the same connection serves the next request


def test_a_form_with_too_many_other_parts_is_refused_as_it_streams(client: httpx.Client) -> None:
    from service.uploads import MAX_OTHER_PARTS

    fields = [("note", (None, b"x")) for _ in range(MAX_OTHER_PARTS + 41)]
    response = client.post("/detect", files=fields)
    assert response.status_code == 422 and response.json()["error"]["code"] == "too_many_parts"
    image = encode(random_images(1, seed=64)[0])
    few = [("note", (None, b"x")) for _ in range(MAX_OTHER_PARTS)] + [("images", ("a.png", image))]
    assert client.post("/detect", files=few).status_code == 200


def test_beyond_the_in_flight_limit_requests_get_503_before_their_body_is_read(
    synthetic_bundle: Path, tmp_path: Path
) -> None:
    server = start_server(synthetic_bundle, tmp_path / "log", max_in_flight=2, retry_after_s=3)
    holders = []
    try:
        for _ in range(2):  # two requests in progress, their bodies still to come
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            sock.sendall(
                b"POST /detect HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
            )
            holders.append(sock)
        deadline = time.monotonic() + 10
        image = encode(random_images(1, seed=65)[0])
        while (
            refused := httpx.post(
                server.url + "/detect", content=image, headers={"Content-Type": "image/png"}
            )
        ).status_code == 200:
            assert time.monotonic() < deadline, "the two held requests never counted"
            time.sleep(0.05)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
        assert refused.json()["error"]["code"] == "busy"
        metrics = httpx.get(server.url + "/metrics").text
        assert 'dede_rejections_total{reason="busy"}' in metrics
        for sock in holders:
            sock.close()  # they go away: their slots come back
        deadline = time.monotonic() + 10
        while (
            httpx.post(
                server.url + "/detect", content=image, headers={"Content-Type": "image/png"}
            ).status_code
            != 200
        ):
            assert time.monotonic() < deadline, "slots did not come back"
            time.sleep(0.05)
    finally:
        for sock in holders:
            sock.close()
        server.terminate()


def test_a_slow_client_is_timed_out_and_holds_no_batch_slot(synthetic_bundle: Path, tmp_path: Path) -> None:
    # A batch waits up to 10 s for requests it knows are coming: were the slow request counted among
    # them, the fast request below would wait until the slow one is timed out, 3 s after it began.
    server = start_server(synthetic_bundle, tmp_path / "log", body_timeout_s=3, max_batch_delay_ms=10_000)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as slow:
            slow.sendall(
                b"POST /detect HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000\r\n\r\n\x89PNG"
            )
            time.sleep(0.2)  # the slow request is in the handler, reading its body
            image = random_images(1, seed=61)[0]
            fast = httpx.post(
                server.url + "/detect", files=[("images", ("a.png", encode(image)))], timeout=30
            )
            assert fast.status_code == 200
            assert fast.json()["timing"]["queue_ms"] < 1500, fast.json()["timing"]
            answer = b""
            for _ in range(300):  # one byte every 0.1 s, until the server gives up on it
                try:
                    slow.sendall(b"\x00")
                except (BrokenPipeError, ConnectionResetError):
                    break
                answer += read_answer(slow, 0.1)
                if answer:
                    break
            answer += read_answer(slow, 5)
        status, headers = status_and_headers(answer)
        assert status == 408 and headers["connection"] == "close"
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        assert httpx.get(server.url + "/readyz").status_code == 200
    finally:
        server.terminate()


def test_slow_headers_and_silent_connections_are_timed_out(synthetic_bundle: Path, tmp_path: Path) -> None:
    server = start_server(synthetic_bundle, tmp_path / "log", header_timeout_s=1.5)
    try:
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=30) as trickling,
            socket.create_connection(("127.0.0.1", server.port), timeout=30) as silent,
        ):
            started = time.monotonic()
            answer = b""
            for byte in b"POST /detect HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"a" * 100:
                try:
                    trickling.sendall(bytes([byte]))  # one byte every 0.1 s: never a whole header block
                except (BrokenPipeError, ConnectionResetError):
                    break
                answer += read_answer(trickling, 0.1)
                if answer:
                    break
            answer += read_answer(trickling, 2)
            trickled_s = time.monotonic() - started
            status, headers = status_and_headers(answer)
            assert status == 408 and headers["connection"] == "close"
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
            assert 1.4 < trickled_s < 5, trickled_s
            status, _ = status_and_headers(read_answer(silent, 5))  # opened, then nothing sent
            assert status == 408
        # Headers sent slowly but within the deadline, then a kept-alive second request: both served.
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as patient:
            for _ in range(2):
                for part in (b"GET /healthz HTTP/1.1\r\n", b"Host: test\r\n", b"\r\n"):
                    patient.sendall(part)
                    time.sleep(0.3)
                status, _ = status_and_headers(read_answer(patient, 5))
                assert status == 200
        metrics = httpx.get(server.url + "/metrics").text
        assert 'dede_requests_total{endpoint="other",status="408"} 2.0' in metrics
    finally:
        server.terminate()


def test_metrics_can_move_to_a_port_of_their_own(synthetic_bundle: Path, tmp_path: Path) -> None:
    ops_port = free_port()
    server = start_server(synthetic_bundle, tmp_path / "log", metrics_port=ops_port)
    ops = f"http://127.0.0.1:{ops_port}"
    try:
        image = encode(random_images(1, seed=62)[0])
        assert httpx.post(server.url + "/detect", files=[("images", ("a.png", image))]).status_code == 200
        assert httpx.get(server.url + "/metrics").status_code == 404  # no longer on the public port
        metrics = httpx.get(ops + "/metrics")
        assert metrics.status_code == 200
        assert 'dede_requests_total{endpoint="/detect",status="200"} 1.0' in metrics.text
        for url in (server.url, ops):
            assert httpx.get(url + "/healthz").status_code == 200
            assert httpx.get(url + "/readyz").json() == {"ready": True}
        assert httpx.post(ops + "/detect", content=image).status_code in {404, 405}
        assert httpx.get(ops + "/docs").status_code == 404
        assert server.terminate() == 0
    finally:
        server.terminate()
    with pytest.raises(httpx.TransportError):
        httpx.get(ops + "/healthz", timeout=2)


def test_the_api_key_is_compared_in_constant_time(
    synthetic_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hmac

    from service import api

    compared: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(given: bytes, expected: bytes) -> bool:
        compared.append((given, expected))
        return original(given, expected)

    monkeypatch.setattr(api.hmac, "compare_digest", spy)
    client = TestClient(create_app(Settings(bundle=synthetic_bundle, api_key="right")))
    assert client.get("/v1/models", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer right"}).status_code == 200
    assert compared == [(b"wrong", b"right"), (b"right", b"right")]


# -- start-up faults --------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("fault", FAULTS)
def test_a_start_up_fault_exits_with_one_line_and_never_becomes_ready(
    fault: str, workers: str, tmp_path: Path
) -> None:
    if fault == "file unreadable" and os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    break_it, words = FAULTS[fault]
    bundle = break_it(make_synthetic_bundle(tmp_path / "bundle"))
    # One process, or a supervisor of two (the auto rule's choice on two cores): the same one line.
    exit_code, lines, ready_seen = run_until_exit(["--bundle", str(bundle), "--workers", workers])
    assert exit_code not in (0, None) and not ready_seen
    assert len(lines) == 1, lines  # one line, no traceback, no log noise
    assert lines[0].startswith("dede serve: ") and words in lines[0], lines[0]


def test_a_taken_metrics_port_exits_with_one_line(synthetic_bundle: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        exit_code, lines, ready_seen = run_until_exit(
            ["--bundle", str(synthetic_bundle), "--metrics-port", str(port)]
        )
    assert exit_code not in (0, None) and not ready_seen
    assert len(lines) == 1 and lines[0].startswith("dede serve: cannot listen on"), lines


def test_answers_never_show_internals_even_for_odd_paths_and_methods(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        answers = [
            http.get("/../../etc/passwd"),
            http.request("DELETE", "/detect"),
            http.get("/detect"),
            http.post("/v1/models"),
            http.get("/openapi.json/../x"),
            http.post(
                "/detect", content=b"x" * 10, headers={"Content-Type": "image/png", "X-API-Key": API_KEY}
            ),
        ]
    for answer in answers:
        assert answer.status_code < 500, answer.text
        assert "Traceback" not in answer.text and str(REPO_ROOT) not in answer.text
        assert "site-packages" not in answer.text
    assert np.all([a.headers.get("x-request-id") for a in answers])
