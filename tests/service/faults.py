"""Start-up faults of the service, shared by the tests and the reliability benchmark.

FAULTS[name] = (break_bundle, words): `break_bundle(root)` spoils a copy of a good bundle in place
    and returns the path to serve; `words` are what the one line the process exits with must say.
run_until_exit(args): start `python -m service ARGS` on a free port, ask /readyz every 50 ms until
    the process ends; its exit status, its output lines, whether it was ever ready.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from models.bundle import MANIFEST_NAME, ONNX_NAME, write_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _rewrite_manifest(root: Path, change: Callable[[dict], None], rehash: bool = True) -> Path:
    fields = json.loads((root / MANIFEST_NAME).read_text())
    change(fields)
    if rehash:  # a consistent manifest, hashes and all: only the change itself is wrong
        fields.pop("files")
        write_manifest(root, fields)
    else:
        (root / MANIFEST_NAME).write_text(json.dumps(fields))
    return root


def _missing(root: Path) -> Path:
    return root.parent / "nowhere"


def _unparsable_manifest(root: Path) -> Path:
    (root / MANIFEST_NAME).write_bytes(b"\xff\xfe not json")
    return root


def _schema_2(root: Path) -> Path:
    return _rewrite_manifest(root, lambda fields: fields.update(schema_version=2), rehash=False)


def _changed_byte(root: Path) -> Path:
    data = bytearray((root / ONNX_NAME).read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / ONNX_NAME).write_bytes(bytes(data))
    return root


def _taller_input(root: Path) -> Path:
    return _rewrite_manifest(
        root, lambda fields: fields["input"].update(height=fields["input"]["height"] * 2)
    )


def _unreadable(root: Path) -> Path:
    (root / ONNX_NAME).chmod(0)
    return root


FAULTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing bundle": (_missing, "bundle not found"),
    "manifest not readable": (_unparsable_manifest, "is not readable JSON"),
    "wrong schema version": (_schema_2, "schema_version 2 is not supported"),
    "changed byte in detector.onnx": (_changed_byte, "does not match the manifest"),
    "input shape not the manifest's": (_taller_input, "the manifest says"),
    "file unreadable": (_unreadable, "cannot be read"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_until_exit(args: list[str], timeout_s: float = 60) -> tuple[int | None, list[str], bool]:
    """(exit status, non-empty lines of its output, whether /readyz ever said 200); a process still
    running after `timeout_s` is killed."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDE_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ready_seen = False
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            ready_seen |= httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
    output, _ = process.communicate()
    return process.returncode, [line for line in output.splitlines() if line.strip()], ready_seen
