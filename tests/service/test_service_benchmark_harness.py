"""The serving benchmark's own pieces: the bodies it sends, its goal arithmetic and its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT

from benchmarks.serving.loadgen import BOUNDARY, multipart_body
from benchmarks.serving.report import write_report
from benchmarks.serving.run import goals
from service.uploads import _MultipartImages


def test_the_generators_bodies_parse_as_the_service_reads_them() -> None:
    body = multipart_body([b"first", b"second\r\n--not-a-boundary"], ["a.png", "b.png"])
    parser = _MultipartImages(BOUNDARY.encode(), max_images=8)
    for start in range(0, len(body), 7):  # fed in small chunks, as a socket would
        parser.feed(body[start : start + 7])
    uploads = parser.finish()
    assert [(u.filename, u.data) for u in uploads] == [
        ("a.png", b"first"),
        ("b.png", b"second\r\n--not-a-boundary"),
    ]


def fake_point(concurrency: int, ipr: int, images_per_s: float, p50: float = 10.0, p99: float = 20.0) -> dict:
    return {
        "mode": "closed", "concurrency": concurrency, "images_per_request": ipr, "seconds": 1.0,
        "requests": 10, "errors": 0, "images_per_s": images_per_s, "requests_per_s": images_per_s / ipr,
        "p50_ms": p50, "p95_ms": p99, "p99_ms": p99, "mean_ms": p50, "generator_cpu_cores": 0.2,
        "target_rps": None, "statuses": {"200": 10}, "server_cpu_cores": 1.0, "mean_batch_size": 4.0,
        "machine_load_1m": 1.0,
    }  # fmt: skip


def fake_results() -> dict:
    batched = [fake_point(c, ipr, 100.0 * c**0.5 * ipr) for ipr in (1, 8) for c in (1, 32)]
    batch1 = [fake_point(c, ipr, 50.0 * ipr) for ipr in (1, 8) for c in (1, 32)]
    return {
        "command": "python -m benchmarks.serving.run", "commit": "abc", "date": "today",
        "machine": {"cpu": "test cpu", "logical_cores": 2, "python": "3.11", "load_average_at_start": [0, 0, 0]},
        "bundle": {"model_name": "m", "model_version": "1", "encoder": "e", "input": [32, 32]},
        "protocol": {"images": "cifar", "load_generator": "httpx", "seconds_per_point": 1, "warmup_s": 1},
        "raw_session": {"provider": "CPU", "images_per_s_by_batch": {"1": 500.0, "8": 1000.0},
                        "best_batch_size": 8, "ceiling_images_per_s": 1000.0},
        "servers": {
            "batched": {"settings": {"max_batch_size": 8}, "scores_match_raw_session": True, "points": batched,
                        "half_load": [fake_point(64, 1, 280.0, p50=10.0, p99=25.0)]},
            "batch1": {"settings": {"max_batch_size": 1}, "scores_match_raw_session": True, "points": batch1},
        },
    }  # fmt: skip


def test_goal_arithmetic() -> None:
    result = goals(fake_results())
    saturation = 100.0 * 32**0.5 * 8
    assert result["saturation_images_per_s"] == saturation
    assert result["saturation_vs_ceiling"] == round(saturation / 1000.0, 3)
    assert result["batched_vs_batch1_at_32_x1"] == round(100.0 * 32**0.5 / 50.0, 2)
    assert result["p99_over_p50_at_half_load_x1"] == 2.5
    assert result["raw_best_over_raw_batch1"] == 2.0


def test_report_and_plot_are_written(tmp_path: Path) -> None:
    results = fake_results()
    half_load = results["servers"]["batched"]["half_load"][0]
    for key in ("server_cpu_cores", "mean_batch_size", "machine_load_1m"):  # not collected in open loop
        del half_load[key]
    results["goals"] = goals(results)
    write_report(results, tmp_path)
    report = (tmp_path / "REPORT.md").read_text()
    open_loop_row = next(line for line in report.splitlines() if line.startswith("| 64 | 1 | 280 |"))
    assert open_loop_row.count("| - ") == 4  # batch, server CPU, load, ceiling: dashes, not zeros
    assert "misses >= 0.9" in report or "meets >= 0.9" in report
    assert "p99/p50 at half of saturation" in report and "(meets <= 3)" in report
    assert (tmp_path / "throughput.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_tiny_synthetic_run_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(
        [sys.executable, "-m", "benchmarks.serving.run", "--synthetic", "--seconds", "0.5", "--warmup", "0.2",
         "--concurrency", "1,4", "--images-per-request", "1", "--out", str(tmp_path)],
        cwd=REPO_ROOT, env=env, check=True, timeout=300,
    )  # fmt: skip
    assert (tmp_path / "results.json").exists() and (tmp_path / "REPORT.md").exists()


def test_the_cuda_check_fails_where_cuda_is_not_used(
    synthetic_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run where ONNX Runtime has no usable CUDA, the check writes what it saw and exits 1: a CPU
    run cannot stand in for the GPU figures. Its CPU section still compares real scores."""
    from benchmarks.serving import cuda_check

    data = tmp_path / "data"
    data.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, size=(512, 32, 32, 3), dtype=np.uint8)
    np.savez(data / "cifar10_test.npz", x=pixels, y=np.zeros(512, dtype=np.int64))
    monkeypatch.setenv("DEDE_DATA_DIR", str(data))
    monkeypatch.setattr(cuda_check, "resolve_providers", lambda requested: ["CPUExecutionProvider"])
    out = tmp_path / "out"
    assert (
        cuda_check.main(["--bundle", str(synthetic_bundle), "--out", str(out), "--max-batch-size", "8"]) == 1
    )
    result = json.loads((out / "cuda_check.json").read_text())
    assert result["provider_in_use"] == "CPUExecutionProvider" and result["io_binding"] is False
    assert not {"cudnn_conv_algo_search", "cuda_batch_invariance", "shape_switch"} & set(result)
    cpu = result["cpu_batch_invariance"]
    assert all(v["identical"] for v in cpu["vs_batch_1"].values())
    assert cpu["other_images_shuffled_at_32"]["identical"]
    assert result["cuda_vs_cpu"]["score_range"][0] < result["cuda_vs_cpu"]["score_range"][1]


def test_the_cuda_checks_bucket_padding_and_timings_run(synthetic_bundle: Path) -> None:
    """The check's GPU-only pieces, on a CPU session: padding to power-of-two buckets changes no
    score, and the shape-switch timings cover the sizes they claim."""
    from benchmarks.serving import cuda_check
    from models.bundle import load_bundle
    from service.runtime import CPU, Detector

    bundle = load_bundle(synthetic_bundle)
    plain = Detector(bundle.onnx_path, bundle.manifest.input, [CPU])
    served = Detector(bundle.onnx_path, bundle.manifest.input, [CPU])
    served.warm_up(8)
    bucketed = cuda_check.padded_to_buckets(
        Detector(bundle.onnx_path, bundle.manifest.input, [CPU]), [1, 2, 4, 8]
    )
    images = np.random.default_rng(1).integers(0, 256, size=(40, 3, 32, 32), dtype=np.uint8)
    np.testing.assert_array_equal(cuda_check.score_in_batches(bucketed, images, 5), plain.score(images))
    assert all(v["identical"] for v in cuda_check.invariance(bucketed, images)["vs_batch_1"].values())
    costs = cuda_check.shape_switch_costs(served, bucketed, images)
    assert costs["changing_sizes"] == list(cuda_check.CHANGING_SIZES)
    assert all(0 < costs[k]["median_ms"] <= costs[k]["max_ms"] for k in costs if k != "changing_sizes")


def test_the_benchmark_takes_service_settings_for_both_servers() -> None:
    from benchmarks.serving.run import parse_args

    args = parse_args(
        ["--server-setting", "INLINE_DECODE_MAX_PIXELS=0", "--server-setting", "decode_threads=4"]
    )
    assert args.server_settings == [("inline_decode_max_pixels", "0"), ("decode_threads", "4")]
    for wrong in ("no_such_setting=1", "decode_threads", "max_batch_size=8"):
        with pytest.raises(SystemExit):
            parse_args(["--server-setting", wrong])


def fake_workers_results() -> dict:
    """Three rounds of the workers benchmark, the second hit by a background burst."""
    from benchmarks.serving import workers

    def server(rates: list[float], cpu: float, half_load_p99s: list[float]) -> dict:
        points = []
        for round_, rate in enumerate(rates):
            for concurrency, share in ((1, 0.5), (32, 1.0)):
                point = {**fake_point(concurrency, 1, rate * share), "round": round_, "server_cpu_cores": cpu}
                point["images_per_server_cpu_s"] = round(point["images_per_s"] / cpu, 1)
                points.append(point)
        half_load = [
            {**fake_point(64, 1, 0.5 * rates[0], p50=2.0, p99=p99), "round": round_}
            for round_, p99 in enumerate(half_load_p99s)
        ]
        return {"settings": {}, "scores_match_raw_session": True, "points": points,
                "median_points": workers.median_points(points), "half_load": half_load}  # fmt: skip

    return {
        "note": "", "command": "python -m benchmarks.serving.workers", "commit": "abc", "date": "today",
        "machine": {"cpu": "test cpu", "logical_cores": 2, "load_average_at_start": [0, 0, 0]},
        "bundle": "synthetic", "protocol": {"seconds_per_point": 1, "warmup_s": 1, "images": 8, "rounds": 3},
        "servers": {
            "workers1": server([1000.0, 400.0, 1100.0], 1.0, [4.0, 14.0, 5.0]),
            "workers2": server([1500.0, 1600.0, 600.0], 1.8, [5.0, 4.0, 16.0]),
        },
        "low_load": {"median": {"batched": {"images_per_s": 99.0, "p50_ms": 1.1, "p99_ms": 2.0},
                                "batch1": {"images_per_s": 100.0, "p50_ms": 1.0, "p99_ms": 2.0}}},
    }  # fmt: skip


def test_the_workers_goals_read_medians_over_rounds(tmp_path: Path) -> None:
    from benchmarks.serving import workers

    results = fake_workers_results()
    saturation = workers._saturation(results["servers"]["workers1"], 1)
    assert saturation["concurrency"] == 32 and saturation["images_per_s"] == 1000.0  # not 400, not 1100
    assert saturation["images_per_s_range"] == [400.0, 1100.0] and saturation["rounds"] == 3
    result = workers.goals(results, fast_graph=True)
    assert result["workers2_over_workers1_x1"]["saturation_ratio"] == 1.5
    assert result["workers2_over_workers1_x1"]["images_per_server_cpu_ratio"] == round(1.5 / 1.8, 3)
    # The burst shows in its round and is kept, but does not set the median.
    assert result["workers1_p99_over_p50_at_half_load_x1"] == {"median": 2.5, "rounds": [2.0, 7.0, 2.5]}
    assert result["workers2_p99_over_p50_at_half_load_x1"]["median"] == 2.5
    assert result["low_load_images_per_s_ratio"] == 0.99
    results["goals"] = result
    workers.write_report(results, tmp_path)
    report = (tmp_path / "REPORT.md").read_text()
    assert "| workers1 | 32 | 1 | 1000 | 400-1100 |" in report
    assert "| workers1 | 1 | 2 | 500 | 2.00 | 14.00 | 7.00 |" in report  # the burst's round, shown
    rows = {row["goal"]: row for row in result["verdicts"]}
    assert rows["workers2_over_workers1_x1: saturation >= 1.25x"]["met"]
    assert not rows["workers2_over_workers1_x1: images per server CPU-s >= 0.9x"]["met"]  # 0.833
    assert rows["workers1_p99_over_p50_at_half_load_x1: median over rounds <= 3.0"]["met"]
    assert "| workers2_over_workers1_x1: saturation >= 1.25x | 1.5 | meets |" in report
