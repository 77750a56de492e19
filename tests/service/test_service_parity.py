"""The same image files scored by `dede score` (offline) and by the service give identical scores.

Uses the session's real exported bundles (tests/conftest.py `tiny_bundle`: a fitted decoder on a small
random encoder, exported by training/export.py), so this runs the whole offline -> online path.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO_ROOT, random_images, start_server
from PIL import Image


def write_files(folder: Path) -> list[Path]:
    """Files of several formats, modes and sizes: every preprocessing branch gets exercised."""
    folder.mkdir()
    pixels = random_images(6, seed=51, size=(32, 32))
    odd = random_images(2, seed=52, size=(45, 37))
    images = {
        "a.png": Image.fromarray(pixels[0]),
        "b.jpg": Image.fromarray(pixels[1]),
        "c.webp": Image.fromarray(pixels[2]),
        "d.bmp": Image.fromarray(pixels[3]),
        "e_rgba.png": Image.fromarray(pixels[4]).convert("RGBA"),
        "f_grey.png": Image.fromarray(pixels[5]).convert("L"),
        "g_resized.jpg": Image.fromarray(odd[0]),
        "h_resized.png": Image.fromarray(odd[1]),
    }
    paths = []
    for name, image in images.items():
        buffer = io.BytesIO()
        fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}[name.rsplit(".", 1)[1]]
        image.save(buffer, format=fmt)
        (folder / name).write_bytes(buffer.getvalue())
        paths.append(folder / name)
    return paths


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "clip_bundle"])
def test_service_and_dede_score_agree_exactly(
    bundle_fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """`clip_bundle`: a CLIP image tower with CLIP's preprocessing (bicubic, shorter side, centre
    crop), which the odd-sized files go through."""
    tiny_bundle = request.getfixturevalue(bundle_fixture)
    paths = write_files(tmp_path / "images")
    out = tmp_path / "offline.jsonl"
    subprocess.run(
        [sys.executable, "-m", "training.cli", "score", "--bundle", str(tiny_bundle), *map(str, paths),
         "--format", "jsonl", "--output", str(out)],
        cwd=REPO_ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    offline = {Path(row["path"]).name: row for row in map(json.loads, out.read_text().splitlines())}
    assert all(row["error"] is None for row in offline.values()), offline

    server = start_server(tiny_bundle, tmp_path / "server.log", max_batch_size=4)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            together = http.post("/detect", files=[("images", (p.name, p.read_bytes())) for p in paths])
            alone = [
                http.post("/detect", content=p.read_bytes(), headers={"Content-Type": "image/*"})
                for p in paths
            ]
    finally:
        server.terminate()
    assert together.status_code == 200, together.text
    for result in together.json()["images"]:
        row = offline[result["filename"]]
        assert result["score"] == row["score"], result["filename"]  # bit-identical, not approximately
        assert result["flagged"] == row["flagged"]
    for path, response in zip(paths, alone, strict=True):
        assert response.json()["images"][0]["score"] == offline[path.name]["score"], path.name
    scores = [r["score"] for r in together.json()["images"]]
    assert np.ptp(scores) > 0  # the images really got different scores
