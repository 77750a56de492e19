"""DeDe at CLIP resolutions, on CPU: what the decoder costs at 64, 96 and 224 px, and whether the 224 px
path works end to end for open_clip image towers.

    DEDE_DATA_DIR=/work/shared/data python -m benchmarks.clip_scale.run
    python -m benchmarks.clip_scale.run --towers RN50      # a subset of the towers

Part 1, per decoder preset (lab, lab_wide) and input size: parameters, FLOPs per image and the
decoder head's scoring throughput (embeddings given, PyTorch, batch 32).
Part 2, per CLIP tower (openclip:ViT-B-32 and openclip:RN50, RANDOM weights: this checks mechanics
and costs, not detection): fit the `lab` decoder for one epoch on TinyImageNet images prepared by the
bundle's own preprocessing (bicubic, shorter side, centre crop), calibrate, export (with the export's
own parity check), ONNX Runtime at batch 1 vs batch 8, `python -m service` loading the bundle and
answering one request with the offline scorer's scores, its throughput under 8 clients, and ONNX
Runtime throughput of the whole graph vs the encoder alone.

Writes benchmarks/clip_scale/results.json and REPORT.md (with commit, machine and command).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.provenance import REPO_ROOT, run_record
from models.bundle import ONNX_INPUT, ONNX_SCORE, load_bundle, prepare_array
from models.clip import OPENAI_MEAN, OPENAI_STD
from models.decoder import DeDeDecoder, fixed_visible_patches, preset_config
from models.detector import DetectorHead, Normalize
from models.encoders import load_encoder

OUT_DIR = REPO_ROOT / "benchmarks" / "clip_scale"
PRESETS = ("lab", "lab_wide")
SIZES = (64, 96, 224)
TOWERS = ("ViT-B-32", "RN50")
# The decoder's only dependence on the encoder is the embedding's projection; 512 is ViT-B-32's.
EMBEDDING_DIM = 512


# ----------------------------------------------------------------------------------------------
# Measuring helpers.
# ----------------------------------------------------------------------------------------------


def count_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of one forward: matmuls and convolutions from torch's counter, plus
    the attention products (Q K^T and A V: 4 * Lq * Lk * width per image) of every
    nn.MultiheadAttention, which the counter does not see on CPU."""
    attention = 0

    def add_attention(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
        nonlocal attention
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        batch_axis, length_axis = (0, 1) if mha.batch_first else (1, 0)
        n, q_len, k_len = query.shape[batch_axis], query.shape[length_axis], key.shape[length_axis]
        attention += 4 * n * q_len * k_len * mha.embed_dim

    hooks = [
        sub.register_forward_pre_hook(add_attention, with_kwargs=True)
        for sub in module.modules()
        if isinstance(sub, nn.MultiheadAttention)
    ]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return int(counter.get_total_flops() + attention)


def seconds_per_call(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ort_session(path: Path):  # noqa: ANN201 - onnxruntime's type
    """A CPU session set up as the service sets up its own (service/runtime.py)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def relative_diff(a: np.ndarray | list, b: np.ndarray | list) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.abs(a - b) / np.maximum(np.abs(b), 1e-12)).max())


# ----------------------------------------------------------------------------------------------
# Part 1: the decoder across resolutions.
# ----------------------------------------------------------------------------------------------


def decoder_scale(batch_size: int, repeats: int) -> list[dict]:
    rows = []
    for preset in PRESETS:
        for size in SIZES:
            config = preset_config(preset, size)
            torch.manual_seed(0)
            decoder = DeDeDecoder(config, EMBEDDING_DIM)
            head = DetectorHead(decoder, fixed_visible_patches(config), OPENAI_MEAN, OPENAI_STD).eval()
            one = (
                torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8),
                torch.randn(1, EMBEDDING_DIM),
            )
            batch = (
                torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8),
                torch.randn(batch_size, EMBEDDING_DIM),
            )
            with torch.inference_mode():
                seconds = seconds_per_call(lambda head=head, batch=batch: head(*batch), repeats)
            rows.append(
                {
                    "preset": preset,
                    "image_size": size,
                    "patch_size": config.patch_size,
                    "tokens": config.num_patches,
                    "visible_patches_at_test": len(fixed_visible_patches(config)),
                    "parameters": sum(p.numel() for p in decoder.parameters()),
                    "flops_per_image": count_flops(head, *one),
                    "images_per_s_batch32": batch_size / seconds,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# Part 2: a CLIP tower at 224 px, end to end.
# ----------------------------------------------------------------------------------------------


class _EncoderAlone(nn.Module):
    """uint8 images -> embeddings: the detector graph without the decoder, for the cost split."""

    def __init__(self, encoder: nn.Module, mean: tuple, std: tuple) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.normalize(images))


def _export_encoder_alone(module: nn.Module, size: int, path: Path) -> None:
    """The same exporter and settings as training/export.py uses for the whole detector."""
    example = (torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            example,
            input_names=[ONNX_INPUT],
            output_names=["embedding"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
            opset_version=18,
            dynamo=True,
            verbose=False,
        )
        program.save(str(path), external_data=False)


def _ort_throughput(path: Path, size: int, output: str, repeats: int) -> dict[str, float]:
    session = ort_session(path)
    rng = np.random.default_rng(0)
    figures = {}
    for batch_size in (1, 16):
        images = rng.integers(0, 256, (batch_size, 3, size, size), dtype=np.uint8)
        seconds = seconds_per_call(lambda s=session, x=images: s.run([output], {ONNX_INPUT: x}), repeats)
        figures[f"images_per_s_batch{batch_size}"] = batch_size / seconds
    return figures


def _service_check(
    bundle_dir: Path, paths: list[Path], pngs: list[bytes], log_path: Path, seconds: float
) -> tuple[dict[str, float], float, dict]:
    """`python -m service` on loopback (benchmarks/serving's harness, its default settings): its
    /detect answer for the files, the seconds from process start to that answer, and its throughput
    under 8 closed-loop clients sending one PNG each per request (benchmarks/serving's load generator)."""
    import httpx

    from benchmarks.serving.loadgen import closed_loop, multipart_body
    from benchmarks.serving.run import _run_async
    from benchmarks.serving.server import BenchServer

    started = time.perf_counter()
    server = BenchServer(bundle_dir, log_path)
    try:
        server.wait_ready(timeout_s=600)
        files = [("images", (p.name, p.read_bytes())) for p in paths]
        response = httpx.post(server.url + "/detect", files=files, timeout=300)
        start_to_answer = time.perf_counter() - started
        response.raise_for_status()
        bodies = [multipart_body([png], [f"{i}.png"]) for i, png in enumerate(pngs)]
        load = _run_async(closed_loop(server.url, bodies, 1, concurrency=8, seconds=seconds, warmup_s=2.0))
    finally:
        server.stop()
    scores = {row["filename"]: row["score"] for row in response.json()["images"]}
    throughput = {
        k: getattr(load, k) for k in ("images_per_s", "p50_ms", "p99_ms", "requests", "errors", "concurrency")
    }
    return scores, start_to_answer, throughput


def clip_mechanics(
    arch: str, images_nhwc: np.ndarray, work: Path, n_fit: int, n_calibration: int, repeats: int
) -> dict:
    from training.calibrate import calibrate_run
    from training.export import export_bundle
    from training.fit import FitSettings, fit_decoder, load_run
    from training.offline_score import score_files

    timings: dict[str, float] = {}
    started = time.perf_counter()
    encoder = load_encoder(f"random:openclip:{arch}")
    spec = encoder.identity.input_spec()
    size = spec.height
    timings["build_encoder_s"] = time.perf_counter() - started

    started = time.perf_counter()
    prepared = prepare_array(images_nhwc[: n_fit + n_calibration], spec)
    timings["preprocess_s"] = time.perf_counter() - started

    run_dir = work / f"run-{arch}"
    started = time.perf_counter()
    fit_decoder(encoder, prepared[:n_fit], run_dir, FitSettings(preset="lab", epochs=1, batch_size=64))
    timings["fit_s"] = time.perf_counter() - started  # embedding the images dominates
    log = (run_dir / "log.csv").read_text().splitlines()[-1].split(",")

    started = time.perf_counter()
    calibrate_run(run_dir, prepared[n_fit:], fpr=0.05, source="tinyimagenet_val.npz")
    timings["calibrate_s"] = time.perf_counter() - started

    bundle_dir = work / f"bundle-{arch}"
    started = time.perf_counter()
    manifest = export_bundle(load_run(run_dir), bundle_dir, model_name=f"clip-{arch}", model_version="0")
    timings["export_with_parity_s"] = time.perf_counter() - started
    bundle = load_bundle(bundle_dir)

    # Batch 1 vs batch 8 through ONNX Runtime, beside the export's own batch 1 vs 64.
    session = ort_session(bundle.onnx_path)
    sample = prepared[n_fit : n_fit + 16]
    by8 = np.concatenate([session.run([ONNX_SCORE], {ONNX_INPUT: sample[i : i + 8]})[0] for i in (0, 8)])
    by1 = np.concatenate([session.run([ONNX_SCORE], {ONNX_INPUT: sample[i : i + 1]})[0] for i in range(16)])
    del session

    # The service: three files (a 64 px TinyImageNet image, a wide and a tall crop of others, so the
    # shorter-side resize and the centre crop both act) through /detect, against the offline scorer
    # (`dede score`) on the same bytes.
    paths = []
    for name, array in (
        ("square.png", images_nhwc[-1]),
        ("wide.png", images_nhwc[-2][16:48]),
        ("tall.jpg", images_nhwc[-3][:, 8:40]),
    ):
        buffer = io.BytesIO()
        fmt = "PNG" if name.endswith("png") else "JPEG"
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format=fmt)
        paths.append(work / name)
        paths[-1].write_bytes(buffer.getvalue())
    offline = {Path(r.path).name: r.score for r in score_files(bundle, paths)}
    pngs = []
    for array in images_nhwc[n_fit + n_calibration : n_fit + n_calibration + 64]:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    served, timings["service_start_to_answer_s"], service_load = _service_check(
        bundle_dir, paths, pngs, work / "server.log", seconds=max(10.0, 3.0 * repeats)
    )

    alone_path = work / f"encoder-{arch}.onnx"
    _export_encoder_alone(_EncoderAlone(encoder.module, spec.mean, spec.std).eval(), size, alone_path)
    one = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    run = load_run(run_dir)
    embedding = encoder.embed(one)
    names = [p.name for p in paths]
    return {
        "architecture": encoder.identity.architecture,
        "input": spec.model_dump(mode="json"),
        "embedding_dim": encoder.identity.embedding_dim,
        "n_fit_images": n_fit,
        "n_calibration_images": n_calibration,
        "decoder": {"preset": "lab", "patch_size": run.config.patch_size, "tokens": run.config.num_patches},
        "fit_last_epoch": {"train_loss": float(log[1]), "val_loss_test_mask": float(log[2])},
        "timings": timings,
        "export_parity": manifest.parity,
        "ort_batch1_vs_batch8_max_relative_diff": relative_diff(by1, by8),
        "service": {
            "loaded_and_answered": True,
            "scores": served,
            "offline_scores": offline,
            "identical_to_offline": served == offline,
            "closed_loop_8_clients_64px_png": service_load,
            "max_relative_diff_vs_offline": relative_diff(
                [served[n] for n in names], [offline[n] for n in names]
            ),
        },
        "bundle_onnx_mb": bundle.onnx_path.stat().st_size / 1e6,
        "flops_per_image": {
            "encoder": count_flops(encoder.module, encoder.normalize(one)),
            "decoder_head": count_flops(run.head(), one, embedding),
        },
        "parameters": {
            "encoder": sum(p.numel() for p in encoder.module.parameters()),
            "decoder": sum(p.numel() for p in run.decoder.parameters()),
        },
        "ort_cpu": {
            "encoder_and_decoder": _ort_throughput(bundle.onnx_path, size, ONNX_SCORE, repeats),
            "encoder_alone": _ort_throughput(alone_path, size, "embedding", repeats),
        },
    }


# ----------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------


def write_report(result: dict, path: Path) -> None:
    record, settings = result["provenance"], result["settings"]
    # The run measures itself, so a busy machine makes every rate a lower bound: say so when it was.
    busy = record["load_average"][1] > 0.5 * record["machine"]["cores"] + 1
    load_remark = (
        " (other jobs shared the cores: throughputs are lower bounds, timings upper bounds)" if busy else ""
    )
    lines = [
        "# DeDe at CLIP resolutions (CPU)",
        "",
        f"Command: `{record['command']}` at commit `{record['commit']}`"
        f"{' (uncommitted changes present)' if record['dirty'] else ''}, finished {record['finished_at']}.",
        f"Machine: {record['machine']['cpu']}, {record['machine']['cores']} cores; load average at the end "
        f"{record['load_average']}{load_remark}. Figures: `results.json` beside this file.",
        "",
        "## The decoder across resolutions",
        "",
        "The token grid stays 8 x 8 (`models/decoder.py`, TOKEN_GRID): the patch grows with the input, so",
        "only the patch embedding and the output head grow with the pixel count, and at the test mask",
        "(0.99) no patch is visible: the transformer blocks cost the same at every size. Decoder head alone",
        f"(embedding given, {EMBEDDING_DIM}-d), PyTorch on CPU, batch 32; FLOPs = 2 per multiply-add",
        "(torch's counter plus the attention products).",
        "",
        "| preset | px | patch | parameters | MFLOPs/image | images/s (batch 32) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["decoder_scale"]:
        lines.append(
            f"| {row['preset']} | {row['image_size']} | {row['patch_size']} | {row['parameters']:,} | "
            f"{row['flops_per_image'] / 1e6:.1f} | {row['images_per_s_batch32']:.0f} |"
        )
    towers = result["towers"]
    lines += [
        "",
        "## 224 px mechanics with open_clip towers (random weights)",
        "",
        "Random weights (nothing is downloaded), so no detection figure would mean anything: this checks",
        "that fitting, export, parity, batching and serving work at CLIP's size, and what they cost.",
        f"`lab` decoder fitted for 1 epoch on {settings['n_fit']} TinyImageNet validation images (64 px)",
        "brought to 224 px by the bundle's own preprocessing (bicubic, shorter side, centre crop);",
        f"calibrated on {settings['n_calibration']} others. Scaled down for 2 cores: a real fit",
        "would use thousands of images and the preset's 12 epochs; the per-image costs below scale to it.",
        "",
        "| | " + " | ".join(f"`{t['architecture']}`" for t in towers) + " |",
        "|---|" + "---|" * len(towers),
    ]

    def row(label: str, get: Callable[[dict], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(get(t) for t in towers) + " |")

    def rate(t: dict, part: str, batch: int) -> float:
        return t["ort_cpu"][part][f"images_per_s_batch{batch}"]

    row(
        "embedding dim; decoder patch / tokens",
        lambda t: f"{t['embedding_dim']}; {t['decoder']['patch_size']} / {t['decoder']['tokens']}",
    )
    row(
        "parameters: encoder / decoder",
        lambda t: f"{t['parameters']['encoder'] / 1e6:.1f}M / {t['parameters']['decoder'] / 1e6:.2f}M",
    )
    row(
        "GFLOPs/image: encoder / decoder",
        lambda t: (
            f"{t['flops_per_image']['encoder'] / 1e9:.2f} / {t['flops_per_image']['decoder_head'] / 1e9:.3f}"
        ),
    )
    row(
        "seconds: fit (1 epoch) / calibrate / export + parity",
        lambda t: (
            f"{t['timings']['fit_s']:.0f} / {t['timings']['calibrate_s']:.0f} / {t['timings']['export_with_parity_s']:.0f}"
        ),
    )
    row(
        "export parity: images, max rel. diff ORT vs torch",
        lambda t: (
            f"{t['export_parity']['n_images']:.0f}, {t['export_parity']['max_relative_diff_ort_vs_torch']:.1e}"
        ),
    )
    row("export parity: flag mismatches", lambda t: f"{t['export_parity']['flag_mismatches']:.0f}")
    row(
        "ORT batch 1 vs 64 (export) / batch 1 vs 8, max rel. diff",
        lambda t: (
            f"{t['export_parity']['max_relative_diff_batch1_vs_batch64']:.1e} / {t['ort_batch1_vs_batch8_max_relative_diff']:.1e}"
        ),
    )
    row(
        "`python -m service`: answered; scores vs `dede score`",
        lambda t: (
            "yes; bit-identical"
            if t["service"]["identical_to_offline"]
            else f"yes; max rel. diff {t['service']['max_relative_diff_vs_offline']:.1e}"
        ),
    )
    row("service: process start to answer, s", lambda t: f"{t['timings']['service_start_to_answer_s']:.0f}")
    row(
        "ORT images/s, batch 1: encoder+decoder / encoder alone",
        lambda t: f"{rate(t, 'encoder_and_decoder', 1):.1f} / {rate(t, 'encoder_alone', 1):.1f}",
    )
    row(
        "ORT images/s, batch 16: encoder+decoder / encoder alone",
        lambda t: f"{rate(t, 'encoder_and_decoder', 16):.1f} / {rate(t, 'encoder_alone', 16):.1f}",
    )
    row(
        "service, 8 clients x 1 PNG: images/s; p50 / p99 ms",
        lambda t: (
            f"{t['service']['closed_loop_8_clients_64px_png']['images_per_s']:.1f}; "
            f"{t['service']['closed_loop_8_clients_64px_png']['p50_ms']:.0f} / "
            f"{t['service']['closed_loop_8_clients_64px_png']['p99_ms']:.0f}"
        ),
    )
    row("bundle graph, MB", lambda t: f"{t['bundle_onnx_mb']:.0f}")
    lines += ["", *result.get("notes", [])]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--towers", nargs="*", default=list(TOWERS), help="open_clip architectures")
    parser.add_argument("--n-fit", type=int, default=256, help="images the decoder is fitted on")
    parser.add_argument("--n-calibration", type=int, default=256, help="clean images (>= 256: export)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per throughput figure")
    parser.add_argument("--work", type=Path, default=None, help="runs and bundles (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where results.json and REPORT.md go")
    args = parser.parse_args()

    from training.data import data_dir, load_npz

    result: dict = {"decoder_scale": decoder_scale(batch_size=32, repeats=args.repeats), "towers": []}
    images, _ = load_npz(data_dir() / "tinyimagenet_val.npz")
    with tempfile.TemporaryDirectory(prefix="clip-scale-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for arch in args.towers:
            result["towers"].append(
                clip_mechanics(arch, images, work, args.n_fit, args.n_calibration, args.repeats)
            )
            print(
                json.dumps({k: result["towers"][-1][k] for k in ("architecture", "export_parity")}),
                flush=True,
            )
    result["settings"] = {
        **vars(args),
        "work": None,
        "out": str(args.out),
        "torch_threads": torch.get_num_threads(),
    }
    result["provenance"] = run_record(["-m", "benchmarks.clip_scale.run", *sys.argv[1:]])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, args.out / "REPORT.md")


if __name__ == "__main__":
    main()
