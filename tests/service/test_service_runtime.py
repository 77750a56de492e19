"""The ONNX Runtime wrapper: scores, provider choice and fallback, signature checks, GPU-only paths."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from synthetic_bundle import expected_score, make_synthetic_bundle

from models.bundle import ONNX_INPUT, load_bundle
from service.runtime import CPU, CUDA, Detector, RuntimeLoadError, batch_buckets, resolve_providers


@pytest.fixture(scope="module")
def detector(synthetic_bundle: Path) -> Detector:
    bundle = load_bundle(synthetic_bundle)
    return Detector(bundle.onnx_path, bundle.manifest.input, [CPU])


def images(count: int) -> np.ndarray:
    return np.random.default_rng(count).integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)


def test_scores_follow_the_graph(detector: Detector) -> None:
    batch = images(5)
    scores = detector.score(batch)
    assert scores.dtype == np.float32 and scores.shape == (5,)
    np.testing.assert_allclose(scores, [expected_score(i) for i in batch], rtol=1e-5)
    assert detector.provider == CPU


def test_the_gpu_paths_give_the_same_scores(detector: Detector, monkeypatch: pytest.MonkeyPatch) -> None:
    # IO binding and padding run on CUDA only; both work on the CPU provider too, so check them here.
    batch = images(5)
    plain = detector.score(batch)
    monkeypatch.setattr(detector, "_use_io_binding", True)
    monkeypatch.setattr(detector, "_pad_to", 8)
    np.testing.assert_array_equal(detector.score(batch), plain)  # padded to 8, cut back to 5


def test_batch_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(24) == [1, 2, 4, 8, 16, 24]


def test_warm_up_on_a_cpu_runs_every_bucket_and_pads_nothing(synthetic_bundle: Path) -> None:
    bundle = load_bundle(synthetic_bundle)
    detector = Detector(bundle.onnx_path, bundle.manifest.input, [CPU])
    assert sorted(detector.warm_up(4)) == [1, 2, 4]
    shapes = record_batch_shapes(detector)
    detector.score(images(3))
    assert shapes == [3]


def test_warm_up_on_cuda_fixes_one_shape_for_every_batch(synthetic_bundle: Path) -> None:
    # On CUDA each change of input shape costs cuDNN tens of milliseconds and can change the scores
    # (benchmarks/serving/gpu/README.md), so every batch runs at the warmed-up maximum.
    bundle = load_bundle(synthetic_bundle)
    detector = Detector(bundle.onnx_path, bundle.manifest.input, [CPU])
    detector.provider = CUDA  # what the CUDA provider's session reports; the arithmetic stays on CPU here
    assert list(detector.warm_up(8)) == [8]
    shapes = record_batch_shapes(detector)
    batch = images(8)
    scores = [detector.score(batch[:count]) for count in (1, 3, 8)]
    assert shapes == [8, 8, 8]
    for count, got in zip((1, 3, 8), scores, strict=True):
        np.testing.assert_array_equal(got, scores[-1][:count])


def record_batch_shapes(detector: Detector) -> list[int]:
    """The batch size of every graph run from now on."""
    shapes: list[int] = []
    session = detector._session

    class Recording:
        def run(self, names, feeds):  # noqa: ANN001, ANN202
            shapes.append(feeds[ONNX_INPUT].shape[0])
            return session.run(names, feeds)

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(session, name)

    detector._session = Recording()
    return shapes


def test_auto_is_cpu_without_a_visible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.runtime._nvidia_device_visible", lambda: False)
    assert resolve_providers(["auto"]) == [CPU]
    assert resolve_providers([CPU]) == [CPU]


def test_cuda_asked_for_but_unusable_falls_back_to_cpu_and_says_so(
    synthetic_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider to fall back from")
    bundle = load_bundle(synthetic_bundle)
    with caplog.at_level(logging.WARNING, logger="dede.runtime"):
        detector = Detector(bundle.onnx_path, bundle.manifest.input, [CUDA, CPU])
    if detector.provider == CUDA:
        pytest.skip("a GPU is usable here")
    assert detector.provider == CPU
    assert any("CUDA was requested" in r.getMessage() for r in caplog.records)


def test_the_cuda_provider_gets_the_kernel_search_options(
    synthetic_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ONNX Runtime is asked for: CUDA with the service's cuDNN options, CPU as it is."""
    import onnxruntime as ort

    asked: list = []
    real_session = ort.InferenceSession

    def recording_session(path: str, sess_options: object, providers: list) -> object:
        asked.append(providers)
        return real_session(path, sess_options=sess_options, providers=[CPU])

    monkeypatch.setattr(ort, "InferenceSession", recording_session)
    bundle = load_bundle(synthetic_bundle)
    Detector(bundle.onnx_path, bundle.manifest.input, [CUDA, CPU])
    Detector(bundle.onnx_path, bundle.manifest.input, [CUDA, CPU], cuda_options={"device_id": "0"})
    Detector(bundle.onnx_path, bundle.manifest.input, [CPU])
    assert asked == [
        [(CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), CPU],
        [(CUDA, {"device_id": "0"}), CPU],
        [CPU],
    ]


def test_a_graph_that_does_not_match_the_manifest_is_refused(tmp_path: Path) -> None:
    root = make_synthetic_bundle(tmp_path / "b", height=32, width=32)
    bundle = load_bundle(root)
    wrong_size = bundle.manifest.input.model_copy(update={"height": 64})
    with pytest.raises(RuntimeLoadError, match="manifest says"):
        Detector(bundle.onnx_path, wrong_size, [CPU])
    model = onnx.load(root / "detector.onnx")
    model.graph.output[0].name = "logits"
    model.graph.node[-1].output[0] = "logits"
    onnx.save(model, tmp_path / "renamed.onnx")
    with pytest.raises(RuntimeLoadError, match="no output named 'score'"):
        Detector(tmp_path / "renamed.onnx", bundle.manifest.input, [CPU])
    (tmp_path / "garbage.onnx").write_bytes(b"not a graph")
    with pytest.raises(RuntimeLoadError, match="cannot load the graph"):
        Detector(tmp_path / "garbage.onnx", bundle.manifest.input, [CPU])


def _thread_nice_values() -> dict[int, int]:
    values = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread of an earlier test (a client's pool) ended while the list was read
        fields = stat.rsplit(")", 1)[1].split()
        values[int(task.name)] = int(fields[16])  # field 19 of stat: nice
    return values


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread nice values are read from /proc")
def test_model_threads_run_at_lower_priority_than_the_caller(synthetic_bundle: Path) -> None:
    import threading

    bundle = load_bundle(synthetic_bundle)
    caller = _thread_nice_values()[threading.get_native_id()]  # the test run may itself be niced
    lowered = min(19, caller + 3)
    before = set(_thread_nice_values())
    detector = Detector(bundle.onnx_path, bundle.manifest.input, [CPU], intra_op_threads=2, nice_increment=3)
    pool_threads = {tid: nice for tid, nice in _thread_nice_values().items() if tid not in before}
    assert pool_threads and set(pool_threads.values()) == {lowered}  # ONNX Runtime's intra-op pool
    assert _thread_nice_values()[threading.get_native_id()] == caller  # loading left the caller alone

    seen: dict[str, int] = {}

    def score_in_worker() -> None:
        detector.score(images(2))
        seen["worker"] = _thread_nice_values()[threading.get_native_id()]

    worker = threading.Thread(target=score_in_worker)
    worker.start()
    worker.join()
    assert seen["worker"] == lowered
    np.testing.assert_allclose(detector.score(images(3)), [expected_score(i) for i in images(3)], rtol=1e-5)
