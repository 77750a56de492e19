"""A CLIP-tower detector through the README's commands: `dede fit --arch openclip:...` on a whole CLIP
state dict, calibrate, export (ONNX Runtime vs PyTorch parity; ModifiedResNet's attention pooling in
the graph), `dede score`, and the service on a real loopback port giving the same scores."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("open_clip")

from models.bundle import load_bundle  # noqa: E402
from models.clip import OPENAI_MEAN, OPENAI_STD, build_clip, clip_preprocessing  # noqa: E402
from training.cli import main as dede  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
ARCH = "openclip:tiny-rn-32"


@pytest.fixture(scope="module")
def rn_bundle(tiny_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clip-cli")
    torch.manual_seed(7)
    torch.save(build_clip("tiny-rn-32").state_dict(), root / "clip.pt")  # text tower included
    run, bundle = root / "run", root / "bundle"
    steps = [
        ["fit", "--encoder", str(root / "clip.pt"), "--arch", ARCH, "--data", str(tiny_data["aux"])]
        + ["--limit", "128", "--preset", "tiny", "--epochs", "1", "--out", str(run)],
        ["calibrate", "--run", str(run), "--data", str(tiny_data["clean"]), "--fpr", "0.05"],
        ["export", "--run", str(run), "--out", str(bundle), "--name", "clip-rn-test", "--version", "0"],
    ]
    for argv in steps:
        assert dede(argv) == 0, argv
    return bundle


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served(rn_bundle: Path, tmp_path: Path) -> Iterator[str]:
    """`python -m service` for the bundle on a free loopback port; its base URL once ready."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDE_")}
    env.update({"DEDE_BUNDLE": str(rn_bundle), "DEDE_PORT": str(port), "DEDE_MAX_BATCH_SIZE": "4"})
    log = tmp_path / "server.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def test_manifest_carries_the_towers_preprocessing(rn_bundle: Path) -> None:
    manifest = load_bundle(rn_bundle).manifest
    assert manifest.encoder.architecture == ARCH
    assert manifest.encoder.sha256 is not None  # the CLIP file it came from
    assert (manifest.input.mean, manifest.input.std) == (OPENAI_MEAN, OPENAI_STD)
    assert (manifest.input.resize, manifest.input.interpolation) == clip_preprocessing("tiny-rn-32")
    assert (manifest.encoder.resize, manifest.encoder.interpolation) == clip_preprocessing("tiny-rn-32")
    assert manifest.parity["max_relative_diff_ort_vs_torch"] < 1e-4, manifest.parity
    assert manifest.parity["flag_mismatches"] == 0


def test_batch_of_one_equals_the_batch(rn_bundle: Path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(load_bundle(rn_bundle).onnx_path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(2).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    together = session.run(["score"], {"images": images})[0]
    alone = np.concatenate([session.run(["score"], {"images": images[i : i + 1]})[0] for i in range(8)])
    assert len(np.unique(together)) == 8  # different images, different scores
    np.testing.assert_allclose(alone, together, rtol=1e-6)


def test_an_older_manifest_without_the_encoders_preprocessing_still_loads(
    rn_bundle: Path, tmp_path: Path
) -> None:
    """Bundles written before the encoder identity carried its resize rule stay valid (schema 1)."""
    old = tmp_path / "old"
    shutil.copytree(rn_bundle, old)
    raw = json.loads((old / "manifest.json").read_text())
    for key in ("resize", "interpolation"):
        del raw["encoder"][key]
    (old / "manifest.json").write_text(json.dumps(raw))
    manifest = load_bundle(old).manifest
    assert (manifest.encoder.resize, manifest.encoder.interpolation) == ("resize", "bilinear")
    assert manifest.input == load_bundle(rn_bundle).manifest.input  # what the service uses is unchanged


def test_service_scores_equal_dede_score(rn_bundle: Path, served: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    files = {
        "square.png": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
        "wide.png": rng.integers(0, 256, (24, 50, 3), dtype=np.uint8),  # resized by the tower's rule
        "photo.jpg": rng.integers(0, 256, (64, 48, 3), dtype=np.uint8),
    }
    paths = []
    for name, pixels in files.items():
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG" if name.endswith(".png") else "JPEG")
        paths.append(tmp_path / name)
        paths[-1].write_bytes(buffer.getvalue())
    out = tmp_path / "offline.jsonl"
    assert (
        dede(
            ["score", "--bundle", str(rn_bundle), *map(str, paths), "--format", "jsonl", "--output", str(out)]
        )
        == 0
    )
    offline = {Path(row["path"]).name: row for row in map(json.loads, out.read_text().splitlines())}

    response = httpx.post(
        served + "/detect", files=[("images", (p.name, p.read_bytes())) for p in paths], timeout=60
    )
    assert response.status_code == 200, response.text
    results = response.json()["images"]
    assert [r["filename"] for r in results] == [p.name for p in paths]
    assert len({r["score"] for r in results}) == 3
    for result in results:
        assert result["score"] == offline[result["filename"]]["score"], result["filename"]  # bit-identical
        assert result["flagged"] == offline[result["filename"]]["flagged"]
