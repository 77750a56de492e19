"""Image sources for fitting, calibration and evaluation, all returned as uint8 NCHW arrays.

Sources: an .npz with `x` (uint8 NHWC) and `y` (as in ../shared/data), a CIFAR-10 python-batches
folder, or a folder tree of image files. Every source goes through `models.bundle` preprocessing
(the same resize rule the service applies), so fitting sees what serving will see.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.bundle import InputSpec, load_image_file, prepare_array

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
REPO_ROOT = Path(__file__).resolve().parent.parent


class DataError(Exception):
    """A data source cannot be read; the message names the path and the expected layout."""


def data_dir() -> Path:
    """Where the real data sets live: $DEDE_DATA_DIR, else ../shared/data beside the repo."""
    return Path(os.environ.get("DEDE_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def resolve_source(source: str) -> Path:
    """A path as given, or a bare data-set name (`cifar10_train`) looked up in `data_dir()`."""
    path = Path(source)
    if path.exists():
        return path
    candidate = data_dir() / (source if source.endswith(".npz") else f"{source}.npz")
    if candidate.exists():
        return candidate
    raise DataError(f"data source {source!r} not found (nor {candidate}); set DEDE_DATA_DIR or give a path")


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 NHWC, y int64) from an .npz, without unpickling."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            x = archive["x"]
            y = archive["y"] if "y" in archive.files else np.full(len(x), -1, dtype=np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not an .npz with uint8 'x' [N, H, W, 3] ({exc})") from exc
    except MemoryError as exc:  # a header may declare any shape; numpy allocates it before reading
        raise DataError(f"{path}: an array's declared shape does not fit in memory ({exc})") from exc
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"{path}: 'x' is {x.dtype} {x.shape}; expected uint8 [N, H, W, 3]")
    if 0 in x.shape[1:3]:  # resized to the encoder's input, an empty image is all NaN: the fit learns nothing
        raise DataError(f"{path}: 'x' is {x.shape}: its images have no pixels")
    if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "biu":
        raise DataError(
            f"{path}: 'y' is {y.dtype} {y.shape}; expected integer labels [{len(x)}], one per image"
        )
    return x, y.astype(np.int64)


_CIFAR_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def _load_cifar_batches(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR-10 python release (data_batch_*, test_batch): the one place dede unpickles, and
    only dicts of arrays from a data set folder the user names, with a restricted unpickler."""

    class _ArraysOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str):  # noqa: ANN201
            if (module, name) in _CIFAR_PICKLE_ALLOWED:
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data batch")

    xs, ys = [], []
    for batch in sorted(folder.glob("data_batch_*")) + sorted(folder.glob("test_batch")):
        with open(batch, "rb") as handle:
            content = _ArraysOnly(handle, encoding="bytes").load()
        xs.append(np.asarray(content[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(content[b"labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _load_folder(folder: Path, spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """Image files under `folder`; the first directory level names the class when there is one."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    classes = sorted({p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) > 1})
    class_index = {name: i for i, name in enumerate(classes)}
    images, labels = [], []
    for p in files:
        try:
            images.append(load_image_file(p, spec))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise DataError(f"{p}: not a readable image ({exc})") from exc
        parts = p.relative_to(folder).parts
        labels.append(class_index[parts[0]] if len(parts) > 1 else -1)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


# The draw behind `limit`: fixed, so that a limited source is the same images on every call (a fit
# that resumes, a calibration made again).
LIMIT_SEED = 0


def load_images(
    source: str | Path, spec: InputSpec, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Any supported source -> (uint8 [N, 3, H, W] at the spec's size, labels [N] or -1).
    `limit`: `limited(N)` images of it, drawn at random, not the first N."""
    path = resolve_source(str(source))
    if path.is_dir():
        if any(path.glob("data_batch_*")) or (path / "test_batch").exists():
            x, y = _load_cifar_batches(path)
        else:
            return _limit(*_load_folder(path, spec), limit)
    elif path.suffix == ".npz":
        x, y = load_npz(path)
    else:
        raise DataError(f"{path}: expected an .npz file, a CIFAR-10 batches folder or an image folder")
    x, y = _limit(x, y, limit)
    return prepare_array(x, spec), y


def limited_indices(count: int, limit: int | None) -> np.ndarray:
    """Which of `count` images a `limit` keeps: `limit` of them drawn at random (LIMIT_SEED), in
    their source order. Not the first ones: data sets and image folders are often sorted by class
    (../shared/data's are), and their first 1,000 images may be one class."""
    if limit is None or limit >= count:
        return np.arange(count)
    if limit < 1:
        raise DataError(f"a limit of {limit} images leaves none; give a positive --limit")
    return np.sort(np.random.default_rng(LIMIT_SEED).permutation(count)[:limit])


def limited(source: str, limit: int | None) -> str:
    """How a limited source is named in runs and manifests."""
    return source if limit is None else f"{source} ({limit} drawn at random, seed {LIMIT_SEED})"


def _limit(x: np.ndarray, y: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    keep = limited_indices(len(x), limit)
    return x[keep], y[keep]


def split_indices(n: int, fractions: tuple[float, ...], seed: int = 0) -> list[np.ndarray]:
    """Disjoint random index sets of the given fractions of n (the rest is dropped)."""
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0] + [int(round(f * n)) for f in fractions])
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
