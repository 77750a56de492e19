"""Fixtures for the service tests: synthetic bundles, encoded test images, and real uvicorn processes."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from synthetic_bundle import make_synthetic_bundle

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-123"
# The main test server's limits: small, so that each error status is cheap to trigger.
SERVER_LIMITS = {"max_upload_bytes": 300_000, "max_image_pixels": 512 * 512, "max_images_per_request": 40}


def encode(array_hwc: np.ndarray, fmt: str = "PNG", **save_args: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array_hwc).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def random_images(count: int, seed: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """uint8 [count, H, W, 3] with a different brightness per image, so scores differ widely."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.2, 1.0, size=(count, 1, 1, 1))
    return (rng.integers(0, 256, size=(count, *size, 3)) * scale).astype(np.uint8)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m service` on a free loopback port, configured by DEDE_* variables."""

    def __init__(self, bundle: Path, log_path: Path, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEDE_")}
        env.update({"DEDE_BUNDLE": str(bundle), "DEDE_PORT": str(self.port), "DEDE_HOST": "127.0.0.1"})
        # One process unless a test asks for more (the auto rule starts two on two cores): what a
        # test sends then meets one queue and one registry. Several workers have their own tests.
        env["DEDE_WORKERS"] = "1"
        env.update({f"DEDE_{k.upper()}": str(v) for k, v in settings.items()})
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._log.close()


@pytest.fixture(scope="session")
def synthetic_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_bundle(tmp_path_factory.mktemp("bundle") / "synthetic", extra_work=1)


@pytest.fixture(scope="session")
def heavy_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same scores as `synthetic_bundle`, but each batch takes ~10-30 ms: queues really fill."""
    return make_synthetic_bundle(
        tmp_path_factory.mktemp("bundle") / "heavy", extra_work=40, width_hidden=1024
    )


def start_server(bundle: Path, log_path: Path, **settings: object) -> ServerProcess:
    server = ServerProcess(bundle, log_path, **settings)
    try:
        server.wait_ready()
    except Exception:
        server.terminate()
        raise
    return server


@pytest.fixture(scope="session")
def server(synthetic_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The main test server: API key on, small limits so each error status is cheap to trigger."""
    log_path = tmp_path_factory.mktemp("logs") / "server.log"
    process = start_server(
        synthetic_bundle,
        log_path,
        api_key=API_KEY,
        **SERVER_LIMITS,
        max_batch_size=16,
        max_batch_delay_ms=2,
        log_format="json",
        refusal_delay_s=0,  # hundreds of malformed images are sent to it; the hold has tests of its own
    )
    yield process
    process.terminate()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=30) as http:
        yield http
