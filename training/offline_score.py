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


def score_files(bundle: Bundle, files: list[Path], batch_size: int = 64) -> list[FileScore]:
    import onnxruntime as ort

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
            scores = session.run([ONNX_SCORE], {ONNX_INPUT: np.stack(arrays)})[0]
            for slot, score in zip(slots, scores, strict=True):
                results[slot].score = float(score)
                results[slot].flagged = bool(score > threshold)
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


def run_score_command(bundle_path: str, paths: list[str], fmt: str, out: str | None, batch_size: int) -> int:
    bundle = load_bundle(bundle_path)
    files = expand_paths(paths)
    if not files:
        raise FileNotFoundError("no image files found in the given paths")
    results = score_files(bundle, files, batch_size)
    write_results(results, fmt, Path(out) if out else None)
    return 1 if any(r.error for r in results) else 0
