"""The model bundle: the one contract between the offline (torch) and online (service) halves.

A bundle is a directory (or a .tar of one) holding
  detector.onnx   uint8 images [N, 3, H, W] in, `score` [N] float32 first out; bundles with an
                  `explain` entry in the manifest also give `rebuild` uint8 [N, 3, H, W] (the
                  reconstruction in pixel space) and `discrepancy_map` float32 [N, h, w] (each
                  location's contribution to the score); older ones may give `reconstruction`
  manifest.json   this module's `Manifest`, with the sha256 of every other file

This module imports no torch. It also holds the image preprocessing both halves share
(`to_rgb`, `prepare_image`), so the service scores exactly what training and calibration scored.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import tarfile
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ONNX_NAME = "detector.onnx"
ONNX_INPUT = "images"
ONNX_SCORE = "score"
ONNX_RECONSTRUCTION = "reconstruction"  # bundles before explanations: normalized float, unused online
ONNX_REBUILD = "rebuild"
ONNX_DISCREPANCY_MAP = "discrepancy_map"

ResizeRule = Literal["resize", "shorter_side_center_crop"]


class BundleError(Exception):
    """A bundle is missing, malformed or tampered with. The message names the file and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class InputSpec(_Strict):
    """What the graph takes and how any image becomes it."""

    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[3] = 3
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["uint8"] = "uint8"
    resize: ResizeRule = "resize"
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    # Normalization runs inside the graph; recorded here so a reader knows what the encoder saw.
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class EncoderIdentity(_Strict):
    architecture: str
    kind: str  # cifar_resnet, torchvision_resnet, torchscript, onnx, factory
    source: str  # file name or factory path it was loaded from
    sha256: str | None  # of the weights file; None for a factory without a file
    embedding_dim: int = Field(gt=0)
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # The encoder's own way from any image to its input size (CLIP: bicubic, shorter side, centre crop).
    resize: ResizeRule = "resize"
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"

    def input_spec(self) -> InputSpec:
        """The InputSpec of a detector around this encoder: fitting, calibration and serving share it."""
        return InputSpec(
            height=self.input_size[0],
            width=self.input_size[1],
            mean=self.mean,
            std=self.std,
            resize=self.resize,
            interpolation=self.interpolation,
        )


class DecoderSpec(_Strict):
    """Enough to rebuild the decoder and to know exactly which patches the graph sees."""

    preset: str
    config: dict[str, float | int | str | bool]
    score: str  # how the discrepancy is computed, e.g. "sse_masked_normalized", "feature_robust_z_mean"
    visible_patches: list[int]  # the fixed test-time mask: indices of the patches the decoder sees
    num_patches: int = Field(gt=0)
    # The feature score's stages and clean statistics (models/detector.py), when it is the score.
    feature: dict[str, list[int] | list[float] | list[str] | str | int] | None = None

    @model_validator(mode="after")
    def _indices_in_range(self) -> DecoderSpec:
        if any(i < 0 or i >= self.num_patches for i in self.visible_patches):
            raise ValueError("visible_patches holds an index outside [0, num_patches)")
        if len(set(self.visible_patches)) != len(self.visible_patches):
            raise ValueError("visible_patches holds a repeated index")
        return self


class Threshold(_Strict):
    value: float
    fpr_target: float = Field(gt=0, lt=1)
    n_calibration: int = Field(gt=0)
    calibration_source: str
    # "clean": images known to be clean (out-of-distribution auxiliary or the user's own);
    # "unlabelled_robust": a sample of the user's traffic that may hold a few triggered images,
    # thresholded robustly (training/calibrate.py).
    calibration_kind: Literal["clean", "unlabelled_robust"] = "clean"
    # unlabelled_robust: images set aside as outliers (before the quantile where it is trimmed; from
    # the realised FPR estimate's count always).
    n_trimmed: int | None = None
    # unlabelled_robust: "tail_shape" (the sample's median + MAD x a clean reference's tail length,
    # `tail_mads`, read on `tail_reference`) or "trimmed_quantile" (no clean reference).
    unlabelled_method: Literal["tail_shape", "trimmed_quantile"] | None = None
    tail_reference: str | None = None
    n_tail_reference: int | None = None
    tail_mads: float | None = None
    score_quantiles: dict[str, float]  # "q0.5" -> score, on the calibration split
    realised_fpr: float | None = None  # on a second clean split, or by two folds (below)
    realised_fpr_ci95: tuple[float, float] | None = None
    n_holdout: int | None = None
    # How realised_fpr was measured where not on a second split: by two folds of the calibration
    # images, each half's threshold read on the other half (training/calibrate.py).
    realised_fpr_estimate: str | None = None


class ExplainSpec(_Strict):
    """How the graph's evidence outputs read, so the service can show them without torch.

    The graph's `discrepancy_map` [N, h, w] divided by `map_scale` gives the normalized map, in
    which 1.0 means "as unusual as the threshold". `dede export` sets `map_scale` from the clean
    calibration images: the (1 - FPR target) quantile of their counted cells, so a cell at 1.0 is
    exceeded by clean images as rarely as the threshold is by clean scores (training/evidence.py).
    """

    rebuild_output: str = ONNX_REBUILD
    map_output: str = ONNX_DISCREPANCY_MAP
    rebuild_dtype: Literal["uint8"] = "uint8"  # pixel space, same layout as the input
    map_shape: tuple[int, int]  # (h, w): cells over the image, row-major (patches, feature cells)
    map_scale: float = Field(gt=0)
    # How the map's cells become the score; "none": the score is not computed from these cells (the
    # feature score: the map is then the pixel-space evidence of the same rebuild).
    map_reduction: Literal["sum", "max", "mean", "none"]
    map_cells_counted: int = Field(gt=0)  # cells that can be non-zero (the masked patches)
    description: str = ""  # what one cell holds, for a reader


class FileEntry(_Strict):
    path: str
    sha256: str
    bytes: int = Field(ge=0)


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    model_name: str
    model_version: str
    created_at: str
    input: InputSpec
    encoder: EncoderIdentity
    decoder: DecoderSpec
    threshold: Threshold
    onnx_outputs: list[str] = [ONNX_SCORE]
    opset: int
    files: list[FileEntry]
    tools: dict[str, str]  # versions of torch, onnx, onnxruntime, dede that made it
    parity: dict[str, float] = {}  # the export check's figures (max relative score difference, n)
    # None in bundles made before explanations: they serve scores, and /detect?explain=true says why not.
    explain: ExplainSpec | None = None

    @model_validator(mode="after")
    def _explain_outputs_listed(self) -> Manifest:
        if self.explain is not None:
            missing = {self.explain.rebuild_output, self.explain.map_output} - set(self.onnx_outputs)
            if missing:
                raise ValueError(f"explain names outputs {sorted(missing)} that onnx_outputs does not list")
        return self


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Bundle:
    """A verified bundle on disk. Build it with `load_bundle`, never directly."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest

    @property
    def onnx_path(self) -> Path:
        return self.root / ONNX_NAME

    @property
    def threshold(self) -> float:
        return self.manifest.threshold.value


def _open_root(path: Path) -> Path:
    """A directory as is; a .tar unpacked (safely) into a private temporary directory."""
    if path.is_dir():
        return path
    if path.is_file() and tarfile.is_tarfile(path):
        target = Path(tempfile.mkdtemp(prefix="dede-bundle-"))
        with tarfile.open(path) as archive:
            archive.extractall(target, filter="data")  # "data" refuses links and paths out of target
        entries = [p for p in target.iterdir()]
        return entries[0] if len(entries) == 1 and entries[0].is_dir() else target
    if not path.exists():
        raise BundleError(f"bundle not found: {path} (build one with `dede export` or `dede demo`)")
    raise BundleError(f"bundle {path} is neither a directory nor a .tar archive")


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle: schema, then the hash of every file BEFORE any of them is parsed."""
    root = _open_root(Path(path))
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path} is missing: not a dede bundle")
    try:
        raw = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not readable JSON: {exc}") from exc
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{manifest_path}: schema_version {version!r} is not supported (this dede reads "
            f"{SCHEMA_VERSION}); re-export the bundle with this version of dede"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{manifest_path}: field '{where}': {first['msg']}") from exc

    listed = {entry.path for entry in manifest.files}
    if ONNX_NAME not in listed:
        raise BundleError(f"{manifest_path} lists no {ONNX_NAME}")
    for entry in manifest.files:
        file_path = (root / entry.path).resolve()
        if root.resolve() not in file_path.parents:
            raise BundleError(f"{manifest_path}: file path {entry.path!r} leaves the bundle")
        if not file_path.is_file():
            raise BundleError(f"{file_path} is listed in the manifest but missing")
        try:
            actual = sha256_file(file_path)
        except OSError as exc:
            raise BundleError(f"{file_path} cannot be read: {exc}") from exc
        if actual != entry.sha256:
            raise BundleError(
                f"{file_path}: sha256 {actual[:12]}... does not match the manifest's "
                f"{entry.sha256[:12]}...: the file was changed or corrupted; re-export the bundle"
            )
    _refuse_external_data(root / ONNX_NAME)
    return Bundle(root, manifest)


# ONNX protobuf fields that lead to tensors (onnx/onnx.proto): message -> {field: message kind}.
_ONNX_TENSOR_PATHS: dict[str, dict[int, str]] = {
    "model": {7: "graph", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _external_tensors(data: memoryview, kind: str) -> int:
    """How many tensors inside this ONNX message keep their data outside the graph file."""
    found, pos, fields = 0, 0, _ONNX_TENSOR_PATHS.get(kind, {})
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            if kind == "tensor" and field == _TENSOR_DATA_LOCATION and value != 0:
                found += 1
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("a field runs past the end of its message")
            if kind == "tensor" and field == _TENSOR_EXTERNAL_DATA:
                found += 1
            elif field in fields:
                found += _external_tensors(data[pos : pos + length], fields[field])
            pos += length
        else:
            raise ValueError(f"wire type {wire} is not used by ONNX")
    if pos != len(data):
        raise ValueError("a field runs past the end of its message")
    return min(found, 1) if kind == "tensor" else found


def _refuse_external_data(onnx_path: Path) -> None:
    """A bundle's graph holds all its weights: dede never writes external data, and a tensor whose
    data lies in another file (ONNX's external data) would be read from a path the graph names, past
    the manifest's hashes, even outside the bundle on ONNX Runtimes that do not check the path."""
    try:
        external = _external_tensors(memoryview(onnx_path.read_bytes()), "model")
    except (OSError, ValueError, RecursionError) as exc:
        raise BundleError(f"{onnx_path} is not a readable ONNX graph: {exc}") from exc
    if external:
        raise BundleError(
            f"{onnx_path}: {external} tensor(s) keep their data in external files; a bundle's graph must "
            "hold all its weights (re-export the bundle with `dede export`)"
        )


def write_manifest(root: Path, manifest_fields: dict) -> Manifest:
    """Hash every file in `root` (but the manifest) into the manifest, validate it, write it."""
    files = [
        FileEntry(path=p.name, sha256=sha256_file(p), bytes=p.stat().st_size)
        for p in sorted(root.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME
    ]
    manifest = Manifest.model_validate({**manifest_fields, "files": [f.model_dump() for f in files]})
    (root / MANIFEST_NAME).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return manifest


# ----------------------------------------------------------------------------------------------
# Image preprocessing shared by training, `dede score` and the service.
# ----------------------------------------------------------------------------------------------

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, any mode to 8-bit RGB; transparency composited onto black.

    Compositing onto black matches what `convert("RGB")` does for most modes while staying
    defined for palette and LA images with a transparency key.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale to 8 bits instead of clipping (which turns most images white).
        array = np.asarray(image, dtype=np.uint32) >> 8
        image = Image.fromarray(array.clip(0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def prepare_image(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Any PIL image -> uint8 array [3, H, W] as the detector graph takes it."""
    rgb = to_rgb(image)
    resample = _RESAMPLE[spec.interpolation]
    if rgb.size != (spec.width, spec.height):
        if spec.resize == "shorter_side_center_crop":
            scale = max(spec.width / rgb.width, spec.height / rgb.height)
            size = (max(spec.width, round(rgb.width * scale)), max(spec.height, round(rgb.height * scale)))
            rgb = rgb.resize(size, resample)
            left = (rgb.width - spec.width) // 2
            top = (rgb.height - spec.height) // 2
            rgb = rgb.crop((left, top, left + spec.width, top + spec.height))
        else:
            rgb = rgb.resize((spec.width, spec.height), resample)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))


def prepare_array(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 NHWC arrays (as in the .npz data sets) -> uint8 NCHW at the spec's size.

    Arrays already at the right size pass through untouched, which is what `prepare_image` does
    for an RGB image of that size too, so file and array paths agree.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    if images.shape[1:3] == (spec.height, spec.width):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return np.stack([prepare_image(Image.fromarray(img), spec) for img in images])


# The formats an image file may hold, offline as online (service/decoding.py): Pillow is told to try
# these alone, so a file cannot reach another of its decoders (EPS runs Ghostscript on it).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


# An offline image file larger than this is refused before it is read: the read holds the whole
# file in memory, and 64 MiB is already several times the largest photo a camera writes, and far
# more than any encoder's input needs (the service's own upload limit is 16 MiB).
MAX_IMAGE_FILE_BYTES = 64 * 1024 * 1024


def load_image_file(path: str | Path, spec: InputSpec) -> np.ndarray:
    """An image file -> uint8 [3, H, W]. Offline use; the service adds upload limits first.

    Raises OSError for a path that is not a regular file (a FIFO would block the read forever, a
    device never end), a file over MAX_IMAGE_FILE_BYTES or data that does not decode,
    UnidentifiedImageError for another format."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without waiting for a writer
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    if info.st_size > MAX_IMAGE_FILE_BYTES:
        os.close(fd)
        raise OSError(
            f"{path} has {info.st_size:,} bytes, over the {MAX_IMAGE_FILE_BYTES:,} "
            f"({MAX_IMAGE_FILE_BYTES // 2**20} MiB) an image file may have"
        )
    with os.fdopen(fd, "rb") as handle:
        data = handle.read()
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            image.load()
            return prepare_image(image, spec)
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"{path} is not a JPEG, PNG, WebP or BMP image") from None
    except (SyntaxError, EOFError, IndexError, TypeError, ValueError, struct.error) as exc:
        # Malformed headers surface from Pillow's plugins as any of these.
        raise OSError(f"{path} cannot be decoded: {exc}") from exc
