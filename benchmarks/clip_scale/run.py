"""CLIP towers at higher resolution: what the DeDe decoder costs at 64, 96 and 224 px, and the 224 px
mechanics on open_clip towers (fit, calibrate, export parity, serving) on CPU.

    python -m benchmarks.clip_scale.run                  # writes results.json and REPORT.md here
    python -m benchmarks.clip_scale.run --towers RN50    # a subset of the 224 px towers

Part 1, the decoder alone (presets `lab`, `lab_wide`; patches grow with the input on a fixed 8x8
token grid, models/decoder.py): parameters, FLOPs per image (torch's FLOP counter, one scoring
forward with the test mask), and scoring images/s at batch 32 given the embeddings.

Part 2, per open_clip tower with random weights (no weights are downloaded): `lab` decoder fitted
for one epoch on Tiny-ImageNet images through the tower's own preprocessing, calibrated on other
Tiny-ImageNet images, exported as one ONNX graph (the export's parity check: ONNX Runtime vs PyTorch
and batch 1 vs batched), the bundle served by `python -m service` on loopback (one request of 8
images), and ONNX Runtime throughput of the encoder alone vs encoder + decoder at batch 1 and 16.
Random weights change no cost; the detection figures of CLIP towers are the lab's (`--suite clip`).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.provenance import run_record
from models.decoder import DeDeDecoder, fixed_visible_patches, preset_config

HERE = Path(__file__).resolve().parent
SIZES = (64, 96, 224)
PRESETS = ("lab", "lab_wide")
EMBEDDING_DIM = 512  # ViT-B/32's; the decoder's input projection is a negligible share


def _images_per_second(fn, batch: int, min_seconds: float = 3.0) -> float:  # noqa: ANN001
    fn()  # warm-up
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds:
        fn()
        count += batch
    return count / (time.perf_counter() - started)


@torch.no_grad()
def decoder_costs() -> list[dict]:
    rows = []
    for preset in PRESETS:
        for size in SIZES:
            config = preset_config(preset, size)
            decoder = DeDeDecoder(config, EMBEDDING_DIM).eval()
            visible = torch.tensor(fixed_visible_patches(config)).view(1, -1)
            images = torch.randn(32, 3, size, size)
            embedding = torch.randn(32, EMBEDDING_DIM)
            batch_visible = visible.expand(32, -1)

            def run(images=images, embedding=embedding, visible=batch_visible, decoder=decoder) -> None:  # noqa: ANN001
                decoder(images, embedding, visible)

            with FlopCounterMode(display=False) as counter:
                decoder(images[:1], embedding[:1], visible)
            rows.append(
                {
                    "preset": preset,
                    "image_size": size,
                    "patch_size": config.patch_size,
                    "tokens": config.num_patches,
                    "parameters": sum(p.numel() for p in decoder.parameters()),
                    "gflops_per_image": counter.get_total_flops() / 1e9,
                    "images_per_second_batch32": _images_per_second(run, 32),
                }
            )
            print(json.dumps(rows[-1]))
    return rows


def _tiny_imagenet(spec, count: int, offset: int) -> np.ndarray:  # noqa: ANN001
    from models.bundle import prepare_array
    from training.data import data_dir, load_npz

    x, _ = load_npz(data_dir() / "tinyimagenet_val.npz")
    return prepare_array(x[offset : offset + count], spec)


def _serve_once(bundle: Path, images: np.ndarray) -> dict:
    """Start the service on the bundle, send one request of PNG files, stop it."""
    import httpx
    from PIL import Image

    from benchmarks.serving.server import start_service

    files = []
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
        files.append(("images", (f"{i}.png", buffer.getvalue(), "image/png")))
    with tempfile.TemporaryDirectory() as scratch, start_service(bundle, Path(scratch) / "server.log") as url:
        started = time.perf_counter()
        response = httpx.post(f"{url}/detect", files=files, timeout=300)
        seconds = time.perf_counter() - started
    response.raise_for_status()
    scores = [item["score"] for item in response.json()["images"]]
    return {
        "status": response.status_code,
        "n_images": len(scores),
        "request_seconds": seconds,
        "scores": scores,
    }


def tower_mechanics(tower: str, n_fit: int, n_calibration: int) -> dict:
    import onnxruntime as ort

    from models.bundle import load_bundle
    from models.encoders import load_encoder
    from training.calibrate import calibrate_run
    from training.export import export_bundle
    from training.fit import FitSettings, fit_decoder, load_run

    record: dict = {"tower": tower}
    encoder = load_encoder(f"random:openclip:{tower}")
    spec = encoder.identity.input_spec()
    record["input"] = spec.model_dump(mode="json")
    record["encoder_parameters"] = sum(p.numel() for p in encoder.module.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder.module(torch.zeros(1, 3, spec.height, spec.width))
    record["encoder_gflops_per_image"] = counter.get_total_flops() / 1e9
    work = Path(tempfile.mkdtemp(prefix=f"clip-scale-{tower}-", dir=HERE.parents[1] / "runs"))
    fit_images = _tiny_imagenet(spec, n_fit, 0)
    started = time.perf_counter()
    fit_decoder(encoder, fit_images, work / "run", FitSettings(preset="lab", epochs=1, batch_size=64))
    record["fit_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    calibrate_run(work / "run", _tiny_imagenet(spec, n_calibration, n_fit), 0.01, "tinyimagenet_val", "sse")
    record["calibrate_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    manifest = export_bundle(load_run(work / "run"), work / "bundle", model_name=f"clip-{tower}")
    record["export_seconds"] = time.perf_counter() - started
    record["parity"] = manifest.parity
    record["bundle_mb"] = sum(f.bytes for f in manifest.files) / 1e6
    bundle = load_bundle(work / "bundle")

    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    encoder_onnx = work / "encoder.onnx"
    torch.onnx.export(
        _Normalized(encoder),
        (torch.zeros(1, 3, spec.height, spec.width, dtype=torch.uint8),),
        str(encoder_onnx),
        input_names=["images"],
        dynamic_axes={"images": {0: "n"}},
        dynamo=False,
    )
    encoder_session = ort.InferenceSession(str(encoder_onnx), providers=["CPUExecutionProvider"])
    throughput = {}
    for batch in (1, 16):
        x = fit_images[:batch]
        throughput[f"detector_batch{batch}"] = _images_per_second(
            lambda x=x: session.run(None, {name: x}), batch
        )
        throughput[f"encoder_alone_batch{batch}"] = _images_per_second(
            lambda x=x: encoder_session.run(None, {"images": x}), batch
        )
    record["ort_images_per_second"] = throughput
    record["serve"] = _serve_once(work / "bundle", fit_images[:8])
    print(json.dumps({k: v for k, v in record.items() if k != "input"}))
    return record


class _Normalized(torch.nn.Module):
    """uint8 images -> embeddings, as the detector graph's encoder part sees them."""

    def __init__(self, encoder) -> None:  # noqa: ANN001
        super().__init__()
        self.module = encoder.module
        self.register_buffer("mean", torch.tensor(encoder.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(encoder.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module((images.float() / 255.0 - self.mean) / self.std)


def write_report(results: dict, out_dir: Path) -> None:
    run = results["run"]
    lines = [
        "# CLIP towers at higher resolution: costs and 224 px mechanics on CPU",
        "",
        f"Made by `{run['command']}` at commit `{(run['commit'] or 'unknown')[:12]}` on {run['machine']['cpu']} "
        f"({run['machine']['cores']} cores), load average at the end {run['load_average']}. Figures in "
        "`results.json` beside this file.",
        "",
        "## The DeDe decoder by input size",
        "",
        "Patches grow with the input on a fixed 8x8 token grid (models/decoder.py `TOKEN_GRID`): the token "
        "count, and so the transformer's cost, stays that of the 32 px lab decoder; only the patch embedding "
        "and the output projection grow with the pixels. Scoring throughput is the decoder alone at batch 32 "
        f"(embeddings given, {EMBEDDING_DIM}-d).",
        "",
        "| preset | input | patch | tokens | parameters | GFLOPs / image | images/s (batch 32) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["decoder"]:
        lines.append(
            f"| {row['preset']} | {row['image_size']} px | {row['patch_size']} | {row['tokens']} | "
            f"{row['parameters'] / 1e6:.2f}M | {row['gflops_per_image']:.3f} | {row['images_per_second_batch32']:.0f} |"
        )
    lines += ["", "## 224 px mechanics on open_clip towers (random weights)", ""]
    for record in results["towers"]:
        parity, ort_rates, serve = record["parity"], record["ort_images_per_second"], record["serve"]
        lines += [
            f"### {record['tower']}",
            "",
            f"- input: {record['input']['height']} px, `{record['input']['resize']}`, "
            f"{record['input']['interpolation']}, OpenAI mean/std; encoder {record['encoder_parameters'] / 1e6:.1f}M "
            f"parameters, {record['encoder_gflops_per_image']:.2f} GFLOPs per image",
            f"- fit (`lab` decoder, 1 epoch, {results['n_fit']} images): {record['fit_seconds']:.0f} s; calibrate "
            f"({results['n_calibration']} images): {record['calibrate_seconds']:.0f} s; export with its parity check: "
            f"{record['export_seconds']:.0f} s; bundle {record['bundle_mb']:.0f} MB",
            f"- export parity over {parity['n_images']:.0f} images: max relative difference ONNX Runtime vs PyTorch "
            f"{parity['max_relative_diff_ort_vs_torch']:.1e}, batch 1 vs batched "
            f"{parity['max_relative_diff_batch1_vs_batch64']:.1e}, flag mismatches {parity['flag_mismatches']:.0f}",
            f"- ONNX Runtime on CPU, images/s: detector {ort_rates['detector_batch1']:.1f} at batch 1, "
            f"{ort_rates['detector_batch16']:.1f} at batch 16; encoder alone {ort_rates['encoder_alone_batch1']:.1f} / "
            f"{ort_rates['encoder_alone_batch16']:.1f}: the decoder adds "
            f"{100 * (ort_rates['encoder_alone_batch16'] / ort_rates['detector_batch16'] - 1):.0f}% to the encoder's "
            "time at batch 16",
            f"- served by `python -m service`: one request of {serve['n_images']} PNG images answered {serve['status']} "
            f"in {serve['request_seconds']:.2f} s",
            "",
        ]
    (out_dir / "REPORT.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--towers", nargs="*", default=["ViT-B-32", "RN50"])
    parser.add_argument("--n-fit", type=int, default=256)
    parser.add_argument(
        "--n-calibration", type=int, default=256, help="at least 256: the export's parity set"
    )
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = {
        "decoder": decoder_costs(),
        "towers": [tower_mechanics(t, args.n_fit, args.n_calibration) for t in args.towers],
        "n_fit": args.n_fit,
        "n_calibration": args.n_calibration,
        "torch_threads": torch.get_num_threads(),
    }
    results["run"] = run_record()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_report(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
