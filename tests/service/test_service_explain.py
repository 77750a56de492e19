"""explain=true on /detect: the evidence outputs of the graph, normalised, as PNGs and arrays."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import API_KEY, ServerProcess, encode, random_images, start_server
from PIL import Image
from synthetic_bundle import CELL, THRESHOLD, expected_map, expected_score, make_synthetic_bundle

from models.bundle import load_bundle
from service.batcher import Batcher, Evidence
from service.explain import HEAT_MAX, heat_rgba, overlay_grid
from service.runtime import Detector, RuntimeLoadError


@pytest.fixture(scope="module")
def explain_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_bundle(tmp_path_factory.mktemp("bundle") / "explain", explain=True)


@pytest.fixture(scope="module")
def explain_server(explain_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("logs") / "explain.log"
    process = start_server(explain_bundle, log_path, max_batch_size=8, max_batch_delay_ms=2)
    yield process
    process.terminate()


def _png(data_uri: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_uri.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(data_uri[len(prefix) :])))


def _files(images: np.ndarray) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}.png", encode(image), "image/png")) for i, image in enumerate(images)]


def _cell_means(image_hwc: np.ndarray) -> np.ndarray:
    h, w, _ = image_hwc.shape
    cells = image_hwc.astype(np.float64).reshape(h // CELL, CELL, w // CELL, CELL, 3).mean(axis=(1, 3))
    return np.repeat(np.repeat(cells, CELL, axis=0), CELL, axis=1)


def test_explanations_are_off_by_default_and_leave_scores_alone(explain_server: ServerProcess) -> None:
    images = random_images(3, seed=11)
    plain = httpx.post(explain_server.url + "/detect", files=_files(images), timeout=30).json()
    explained = httpx.post(
        explain_server.url + "/detect", params={"explain": "true"}, files=_files(images), timeout=30
    ).json()
    assert all("explanation" not in result for result in plain["images"])
    assert [r["score"] for r in explained["images"]] == [r["score"] for r in plain["images"]]
    for result, image in zip(explained["images"], images, strict=True):
        shown = result["explanation"]
        assert shown["map_shape"] == [32 // CELL, 32 // CELL]
        truth = expected_map(image.transpose(2, 0, 1)) / THRESHOLD
        assert shown["map_max"] == pytest.approx(truth.max(), rel=1e-4)
        heat = _png(shown["map_png"])
        assert (heat.mode, heat.size) == ("RGBA", (32 // CELL, 32 // CELL))
        assert np.array_equal(np.asarray(heat), heat_rgba(truth.astype(np.float32)))
        rebuild = _png(shown["rebuild_png"])
        assert (rebuild.mode, rebuild.size) == ("RGB", (32, 32))
        assert np.abs(np.asarray(rebuild, dtype=np.float64) - _cell_means(image)).max() <= 0.5 + 1e-6
        assert "map" not in shown and "rebuild" not in shown


def test_form_field_and_arrays(explain_server: ServerProcess) -> None:
    images = random_images(2, seed=12)
    answer = httpx.post(
        explain_server.url + "/detect",
        data={"explain_arrays": "true"},  # implies explain
        files=_files(images),
        timeout=30,
    ).json()
    for result, image in zip(answer["images"], images, strict=True):
        chw = image.transpose(2, 0, 1)
        assert result["score"] == pytest.approx(expected_score(chw), rel=1e-5)
        shown = result["explanation"]
        np.testing.assert_allclose(np.array(shown["map"]), expected_map(chw) / THRESHOLD, rtol=1e-3)
        rebuild = np.array(shown["rebuild"], dtype=np.float64)
        assert rebuild.shape == (3, 32, 32)
        assert np.abs(rebuild - _cell_means(image).transpose(2, 0, 1)).max() <= 0.5 + 1e-6


def test_a_bright_corner_shows_in_the_map(explain_server: ServerProcess) -> None:
    image = np.full((32, 32, 3), 40, np.uint8)
    image[:8, -8:] = 255  # the top right 8 x 8 pixels: two by two cells
    result = httpx.post(
        explain_server.url + "/detect", params={"explain": "1"}, files=_files(image[None]), timeout=30
    ).json()["images"][0]
    cells = np.array(
        httpx.post(
            explain_server.url + "/detect",
            params={"explain_arrays": "true"},
            files=_files(image[None]),
            timeout=30,
        ).json()["images"][0]["explanation"]["map"]
    )
    hot = np.argwhere(cells >= 1.0)
    assert sorted(map(tuple, hot.tolist())) == [(0, 6), (0, 7), (1, 6), (1, 7)]
    assert result["explanation"]["map_max"] == pytest.approx(1.0 / THRESHOLD, rel=1e-4)
    alpha = np.asarray(_png(result["explanation"]["map_png"]))[..., 3]
    assert alpha[0, 7] > 200 and alpha[7, 0] < 40


def test_bad_explain_value_is_a_400(explain_server: ServerProcess) -> None:
    response = httpx.post(
        explain_server.url + "/detect",
        params={"explain": "perhaps"},
        files=_files(random_images(1, seed=1)),
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_parameter"


@pytest.mark.parametrize("how", ["query", "form"])
def test_a_bundle_without_evidence_says_so(server: ServerProcess, how: str) -> None:
    """The main test server serves a bundle made before explanations: scores yes, explain a clear 400."""
    kwargs = {"params": {"explain": "true"}} if how == "query" else {"data": {"explain": "true"}}
    response = httpx.post(
        server.url + "/detect",
        files=_files(random_images(1, seed=2)),
        headers={"X-API-Key": API_KEY},
        timeout=30,
        **kwargs,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "explain_unavailable" and "re-export" in error["message"]
    plain = httpx.post(
        server.url + "/detect",
        files=_files(random_images(1, seed=2)),
        headers={"X-API-Key": API_KEY},
        timeout=30,
    )
    assert plain.status_code == 200 and plain.json()["images"][0]["score"] is not None


def test_a_batch_runs_the_explaining_graph_only_when_an_image_asks(explain_bundle: Path) -> None:
    bundle = load_bundle(explain_bundle)
    detector = Detector(
        bundle.onnx_path, bundle.manifest.input, ["CPUExecutionProvider"], 1, 0, None, bundle.manifest.explain
    )
    runs: list[str] = []

    def score(images: np.ndarray) -> np.ndarray:
        runs.append("score")
        return detector.score(images)

    def explained(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        runs.append("explain")
        return detector.explain(images)

    images = [image.transpose(2, 0, 1).copy() for image in random_images(4, seed=3)]

    async def go() -> tuple[list, list]:
        batcher = Batcher(score, run_explained=explained, max_batch_size=8, max_delay_s=0.0, max_queue=16)
        batcher.start()
        # Both submits land before the worker's first turn: one batch of four.
        mixed = [*batcher.submit(images[:2]), *batcher.submit(images[2:], explain=True)]
        first = await asyncio.gather(*mixed)
        alone = await asyncio.gather(*batcher.submit(images[:2]))
        await batcher.stop()
        return first, alone

    first, alone = asyncio.run(go())
    assert runs == ["explain", "score"]
    assert [r.evidence is None for r in first] == [True, True, False, False]
    assert all(r.evidence is None for r in alone)
    assert [r.score for r in first[:2]] == [r.score for r in alone]
    for result, image in zip(first[2:], images[2:], strict=True):
        np.testing.assert_allclose(result.evidence.discrepancy_map, expected_map(image), rtol=1e-5)


def test_a_manifest_naming_missing_outputs_is_refused(tmp_path: Path, explain_bundle: Path) -> None:
    plain = load_bundle(make_synthetic_bundle(tmp_path / "plain"))
    spec = load_bundle(explain_bundle).manifest.explain
    with pytest.raises(RuntimeLoadError, match="re-export"):
        Detector(plain.onnx_path, plain.manifest.input, ["CPUExecutionProvider"], explain=spec)


def test_heat_scale_and_overlay_grid(explain_bundle: Path) -> None:
    rgba = heat_rgba(np.array([[0.0, 1.0, HEAT_MAX, 50.0]], np.float32))
    assert rgba[0, 0, 3] == 0  # nothing unusual: transparent over the image
    assert tuple(rgba[0, 1]) == (254, 224, 144, 170)  # the threshold: the middle of the scale
    assert tuple(rgba[0, 2]) == tuple(rgba[0, 3])  # the top of the scale saturates
    spec = load_bundle(explain_bundle).manifest.explain

    image = random_images(1, seed=4)[0].transpose(2, 0, 1)
    evidence = Evidence(image, (expected_map(image)).astype(np.float32))
    grid = overlay_grid(image, evidence, spec, scale=2)
    assert grid.size == (3 * 64 + 2 * 4, 64)
    assert np.array_equal(
        np.asarray(grid)[:, :64],
        np.asarray(Image.fromarray(image.transpose(1, 2, 0)).resize((64, 64), Image.Resampling.NEAREST)),
    )
