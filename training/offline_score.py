"""`dede score`: score image files through a bundle's ONNX graph, offline (batch jobs, checks)."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from models.bundle import ONNX_INPUT, ONNX_SCORE, Bundle, load_bundle, load_image_file
from service.batcher import Evidence
from service.explain import overlay_grid
from training.data import IMAGE_SUFFIXES


@dataclass
class FileScore:
    path: str
    score: float | None
    flagged: bool | None
    error: str | None = None


def expand_paths(paths: Iterable[str]) -> list[Path]:
    """Files as given; directories walked for image files (sorted, so output order is stable)."""
    out: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.exists():
            out.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return out


def score_array(onnx_path: Path, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Scores of images already at the bundle's input (uint8 NCHW), through its ONNX graph on the
    CPU, in batches (the graph gives the same score at any batch size)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [
            session.run([ONNX_SCORE], {ONNX_INPUT: images[i : i + batch_size]})[0]
            for i in range(0, len(images), batch_size)
        ]
        or [np.zeros(0, np.float32)]
    )


def score_files(
    bundle: Bundle, files: list[Path], batch_size: int = 64, explain_dir: Path | None = None
) -> list[FileScore]:
    """explain_dir: also write one overlay PNG per image there (input | rebuild | heat map)."""
    import onnxruntime as ort

    spec_explain = bundle.manifest.explain
    if explain_dir is not None:
        if spec_explain is None:
            raise ValueError(
                f"{bundle.root} has no evidence outputs (made before explanations): re-export it to use --explain"
            )
        explain_dir.mkdir(parents=True, exist_ok=True)
        outputs = [ONNX_SCORE, spec_explain.rebuild_output, spec_explain.map_output]
    else:
        outputs = [ONNX_SCORE]

    # CPU: offline scoring must run anywhere; the service is where CUDA is chosen when present.
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    spec, threshold = bundle.manifest.input, bundle.threshold
    results: list[FileScore] = []
    for start in tqdm(
        range(0, len(files), batch_size),
        desc="score files",
        unit="batch",
        disable=len(files) < 2 * batch_size,
    ):
        chunk, arrays, slots = files[start : start + batch_size], [], []
        for path in chunk:
            try:
                arrays.append(load_image_file(path, spec))
                slots.append(len(results))
                results.append(FileScore(str(path), None, None))
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
                results.append(FileScore(str(path), None, None, f"not a readable image: {exc}"))
        if arrays:
            batch = np.stack(arrays)
            ran = session.run(outputs, {ONNX_INPUT: batch})
            for k, (slot, score) in enumerate(zip(slots, ran[0], strict=True)):
                results[slot].score = float(score)
                results[slot].flagged = bool(score > threshold)
                if explain_dir is not None:
                    assert spec_explain is not None
                    evidence = Evidence(ran[1][k], ran[2][k])
                    name = f"{slot:05d}_{Path(results[slot].path).stem}.png"
                    overlay_grid(batch[k], evidence, spec_explain).save(explain_dir / name)
    return results


def write_results(results: list[FileScore], fmt: str, out: Path | None) -> None:
    with contextlib.ExitStack() as stack:
        handle = stack.enter_context(open(out, "w", newline="")) if out else sys.stdout
        if fmt == "jsonl":
            for r in results:
                handle.write(json.dumps(r.__dict__) + "\n")
        elif fmt == "csv":
            writer = csv.writer(handle)
            writer.writerow(["path", "score", "flagged", "error"])
            for r in results:
                writer.writerow(
                    [r.path, "" if r.score is None else f"{r.score:.6f}", r.flagged, r.error or ""]
                )
        else:
            width = max([len(r.path) for r in results] + [4])
            handle.write(f"{'path':<{width}}  {'score':>12}  flagged\n")
            for r in results:
                score = "error" if r.score is None else f"{r.score:12.4f}"
                handle.write(f"{r.path:<{width}}  {score:>12}  {r.error or r.flagged}\n")


def run_score_command(
    bundle_path: str,
    paths: list[str],
    fmt: str,
    out: str | None,
    batch_size: int,
    explain_dir: str | None = None,
) -> int:
    bundle = load_bundle(bundle_path)
    files = expand_paths(paths)
    if not files:
        raise FileNotFoundError("no image files found in the given paths")
    results = score_files(bundle, files, batch_size, Path(explain_dir) if explain_dir else None)
    write_results(results, fmt, Path(out) if out else None)
    return 1 if any(r.error for r in results) else 0
