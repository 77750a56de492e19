"""What explanations cost on a CPU: the demo-shaped detector (width-16 CIFAR ResNet-18 encoder,
`lab` decoder, random weights: cost does not depend on the weights) exported as the service exports
it, then, side by side in one process and interleaved round by round:

  score_only_graph  the export's graph without the evidence outputs (a bundle from before
                    explanations), asked for the score
  explain_off       the graph with them, asked for the score alone (what /detect does by default)
  explain_on        the graph asked for all three outputs, plus the PNG data URIs (`explanation`)

and end to end over HTTP (a real `python -m service` on loopback, the same bundle): POST /detect with
8 PNGs, explain off vs on, alternating. Per-image medians, and the median of the per-round ratios
(each round runs every condition once, back to back, so a slow spell from other work on the
machine hits both sides of a ratio); those ratios are what the README cites.

    python -m benchmarks.explain.run [--rounds 40] [--out benchmarks/explain/results.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.provenance import REPO_ROOT, run_record

BATCH_SIZES = (1, 8)
HTTP_IMAGES = 8


def build_bundles(root: Path) -> tuple[Path, Path]:
    """(explaining bundle, score-only bundle) with the same weights: the export's own graph (score
    and reconstruction), then the same with the evidence outputs appended (training/evidence.py)."""
    import shutil

    import torch

    from models.bundle import ONNX_INPUT, ONNX_NAME, ONNX_RECONSTRUCTION, ONNX_SCORE, write_manifest
    from models.decoder import DeDeDecoder, fixed_visible_patches, preset_config
    from models.detector import Detector, DetectorHead
    from models.encoders import load_encoder
    from training.evidence import EVIDENCE_OUTPUTS, add_evidence_outputs
    from training.export import _export_torch, _tool_versions

    torch.manual_seed(0)
    encoder = load_encoder("random:cifar_resnet18", width=16)
    config = preset_config("lab", 32)
    visible = fixed_visible_patches(config)
    head = DetectorHead(
        DeDeDecoder(config, encoder.identity.embedding_dim), visible, encoder.mean, encoder.std
    )
    module = Detector(encoder.module, head).eval()
    threshold = 100.0
    spec = encoder.identity.input_spec()
    fields = {
        "model_name": "explain-cost",
        "model_version": "1",
        "created_at": "2026-01-01T00:00:00Z",
        "input": spec.model_dump(mode="json"),
        "encoder": encoder.identity.model_dump(mode="json"),
        "decoder": {
            "preset": "lab",
            "config": config.to_dict(),
            "score": "sse_masked_normalized",
            "visible_patches": visible,
            "num_patches": config.num_patches,
        },
        "threshold": {
            "value": threshold,
            "fpr_target": 0.01,
            "n_calibration": 1,
            "calibration_source": "none: a cost benchmark",
            "score_quantiles": {},
        },
        "opset": 18,
        "tools": _tool_versions(),
    }
    explaining, plain = root / "explaining", root / "score_only"
    plain.mkdir()
    example = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    _export_torch(module, (example,), plain / ONNX_NAME, [ONNX_INPUT])
    shutil.copytree(plain, explaining)
    write_manifest(plain, {**fields, "onnx_outputs": [ONNX_SCORE, ONNX_RECONSTRUCTION]})
    add_evidence_outputs(explaining / ONNX_NAME, spec, config.patch_size, visible)
    side = config.image_size // config.patch_size
    write_manifest(
        explaining,
        {
            **fields,
            "onnx_outputs": [ONNX_SCORE, ONNX_RECONSTRUCTION, *EVIDENCE_OUTPUTS],
            "explain": {
                "map_shape": (side, side),
                "map_scale": threshold / (config.num_patches - len(visible)),
                "map_reduction": "sum",
                "map_cells_counted": config.num_patches - len(visible),
            },
        },
    )
    return explaining, plain


def _median_ms_per_image(samples: list[float], images: int) -> float:
    return round(1000 * statistics.median(samples) / images, 4)


def in_process(explaining: Path, plain: Path, rounds: int) -> dict:
    """The service's own pieces (runtime.Detector, explain.explanation), no HTTP."""
    from models.bundle import load_bundle
    from service.batcher import Evidence
    from service.explain import explanation
    from service.runtime import CPU, Detector

    bundles = {name: load_bundle(path) for name, path in (("explaining", explaining), ("plain", plain))}
    detectors = {
        name: Detector(b.onnx_path, b.manifest.input, [CPU], intra_op_threads=1, explain=b.manifest.explain)
        for name, b in bundles.items()
    }
    spec = bundles["explaining"].manifest.explain
    rng = np.random.default_rng(0)

    def explain_on(batch: np.ndarray) -> None:
        _, rebuilds, maps = detectors["explaining"].explain(batch)
        for rebuild, cells in zip(rebuilds, maps, strict=True):
            explanation(Evidence(rebuild, cells), spec)

    conditions = {
        "score_only_graph": lambda batch: detectors["plain"].score(batch),
        "explain_off": lambda batch: detectors["explaining"].score(batch),
        "explain_on": explain_on,
    }
    results = {}
    for size in BATCH_SIZES:
        batch = rng.integers(0, 256, (size, 3, 32, 32), dtype=np.uint8)
        samples: dict[str, list[float]] = {name: [] for name in conditions}
        for run in conditions.values():  # warm-up
            run(batch)
        for _ in range(rounds):
            for name, run in conditions.items():
                started = time.perf_counter()
                run(batch)
                samples[name].append(time.perf_counter() - started)
        per_image = {name: _median_ms_per_image(s, size) for name, s in samples.items()}
        results[f"batch_{size}"] = {
            "ms_per_image": per_image,
            "explain_off_vs_score_only_graph": _round_ratio(
                samples["explain_off"], samples["score_only_graph"]
            ),
            "explain_on_vs_off": _round_ratio(samples["explain_on"], samples["explain_off"]),
            "explain_on_vs_off_ratio_of_medians": round(
                per_image["explain_on"] / per_image["explain_off"], 3
            ),
        }
    return results


def _round_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of numerator / denominator, both taken in the same round."""
    return round(statistics.median(a / b for a, b in zip(numerator, denominator, strict=True)), 3)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def over_http(explaining: Path, rounds: int) -> dict:
    """POST /detect with HTTP_IMAGES PNGs to a real server: explain off vs on, alternating."""
    import httpx
    from PIL import Image

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDE_")}
    env.update(
        {
            "DEDE_BUNDLE": str(explaining),
            "DEDE_PORT": str(port),
            "DEDE_HOST": "127.0.0.1",
            "DEDE_INTRA_OP_THREADS": "1",
            "DEDE_ACCESS_LOG": "false",
        }
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            rng = np.random.default_rng(1)
            files = []
            for i in range(HTTP_IMAGES):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
                files.append(("images", (f"{i}.png", buffer.getvalue(), "image/png")))
            samples: dict[str, list[float]] = {"explain_off": [], "explain_on": []}
            sizes = {}
            for _ in range(3):
                http.post("/detect", files=files).raise_for_status()
            for _ in range(rounds):
                for name, params in (("explain_off", {}), ("explain_on", {"explain": "true"})):
                    started = time.perf_counter()
                    response = http.post("/detect", files=files, params=params)
                    samples[name].append(time.perf_counter() - started)
                    response.raise_for_status()
                    sizes[name] = len(response.content)
    finally:
        server.terminate()
        server.wait(30)
    per_image = {name: _median_ms_per_image(s, HTTP_IMAGES) for name, s in samples.items()}
    return {
        "images_per_request": HTTP_IMAGES,
        "ms_per_image": per_image,
        "explain_on_vs_off": _round_ratio(samples["explain_on"], samples["explain_off"]),
        "explain_on_vs_off_ratio_of_medians": round(per_image["explain_on"] / per_image["explain_off"], 3),
        "answer_bytes": sizes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        explaining, plain = build_bundles(Path(tmp))
        results = {
            "what": "per-image cost of explanations on CPU (ONNX Runtime, 1 intra-op thread), demo-shaped detector",
            "in_process": in_process(explaining, plain, args.rounds),
            "http": over_http(explaining, args.rounds),
            "run": run_record(),
        }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
