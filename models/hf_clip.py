"""Hugging Face CLIP image towers from a local folder, as `save_pretrained` writes it.

The folder holds `config.json` (a whole CLIP, model_type `clip`, or its vision tower alone,
`clip_vision_model`), its weights as `model.safetensors` (or shards with their index) and, when the
model came with one, `preprocessor_config.json`. Nothing is downloaded and nothing is unpickled:
`pytorch_model.bin` folders are refused (convert them with `save_pretrained(safe_serialization=True)`).

The embedding is CLIP's image embedding: the vision tower's pooled output through
`visual_projection` when the folder has that weight (a whole CLIP, or CLIPVisionModelWithProjection),
else the pooled output itself (CLIPVisionModel). The preprocessing (shorter-side resize, centre crop,
mean/std, interpolation) comes from `preprocessor_config.json` and goes into the bundle's manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

HF_CLIP_ARCH = "hf-clip-vision"
_MODEL_TYPES = ("clip", "clip_vision_model")
# PIL resample codes as transformers records them; the bundle's preprocessing knows these two.
_INTERPOLATIONS = {2: "bilinear", 3: "bicubic"}


class HfClipLoadError(Exception):
    """The folder is not a loadable Hugging Face CLIP; the message says what to change."""


@dataclass(frozen=True)
class HfClipPreprocessing:
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str  # models.bundle.InputSpec's rule
    interpolation: str


class HfClipImageTower(nn.Module):
    """Normalized images [N, 3, H, W] -> CLIP image embeddings [N, D] (not L2-normalized)."""

    def __init__(self, vision: nn.Module, projection: nn.Linear | None) -> None:
        super().__init__()
        self.vision = vision
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.vision(pixel_values=x).pooler_output
        return pooled if self.projection is None else self.projection(pooled)


def is_hf_clip_folder(path: Path) -> bool:
    """A folder with a config.json: the loader then says whether it is a CLIP it can read."""
    return path.is_dir() and (path / "config.json").is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HfClipLoadError(f"{path}: not readable JSON ({exc})") from exc


def _weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if not shards or missing:
            raise HfClipLoadError(f"{index}: shards missing from the folder: {missing or 'none listed'}")
        return [folder / s for s in shards]
    if any(folder.glob("*.bin")):
        raise HfClipLoadError(
            f"{folder} holds pickled .bin weights, which dede never loads; save the model with "
            "save_pretrained(..., safe_serialization=True) to get model.safetensors"
        )
    raise HfClipLoadError(f"{folder}: no model.safetensors (or sharded index) found")


def folder_sha256(folder: Path) -> str:
    """One digest over config.json, the preprocessing file and every weight file, in a fixed order."""
    digest = hashlib.sha256()
    files = [folder / "config.json", folder / "preprocessor_config.json", *_weight_files(folder)]
    for path in files:
        if path.is_file():
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as handle:
                for block in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _vision_config(config: dict):  # noqa: ANN202 - transformers is imported lazily
    from transformers import CLIPVisionConfig

    model_type = config.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise HfClipLoadError(
            f"config.json has model_type {model_type!r}; dede reads CLIP folders ({', '.join(_MODEL_TYPES)})"
        )
    if model_type == "clip":
        vision = dict(config.get("vision_config") or {})
        vision["projection_dim"] = config.get("projection_dim", vision.get("projection_dim", 512))
    else:
        vision = dict(config)
    vision.pop("model_type", None)
    vision.pop("architectures", None)
    vision_config = CLIPVisionConfig(**vision)
    vision_config._attn_implementation = "eager"  # plain matmuls: the same graph in torch and ONNX
    return vision_config


def preprocessing(folder: Path, image_size: int) -> HfClipPreprocessing:
    """The tower's own preprocessing, from preprocessor_config.json (CLIP's defaults without one)."""
    from models.clip import OPENAI_MEAN, OPENAI_STD

    path = folder / "preprocessor_config.json"
    info = _read_json(path) if path.is_file() else {}
    crop = info.get("crop_size", image_size)
    crop_hw = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
    size = info.get("size", {"shortest_edge": crop_hw[0]})
    shortest = size.get("shortest_edge") if isinstance(size, dict) else int(size)
    if crop_hw != (image_size, image_size):
        raise HfClipLoadError(
            f"{path}: crop {crop_hw} differs from the tower's image_size {image_size}; the tower needs "
            f"{image_size} x {image_size} inputs"
        )
    if info.get("do_center_crop", True) is False or shortest != image_size:
        raise HfClipLoadError(
            f"{path}: resize to shortest edge {shortest} then crop {crop_hw} is not a preprocessing the "
            "bundle can state; dede supports CLIP's own (shortest edge = crop size, centre crop)"
        )
    resample = int(info.get("resample", 3))
    if resample not in _INTERPOLATIONS:
        raise HfClipLoadError(f"{path}: resample {resample} is not bilinear (2) or bicubic (3)")
    mean = tuple(float(v) for v in info.get("image_mean", OPENAI_MEAN))
    std = tuple(float(v) for v in info.get("image_std", OPENAI_STD))
    return HfClipPreprocessing(
        input_size=(image_size, image_size),
        mean=mean,
        std=std,
        resize="shorter_side_center_crop",
        interpolation=_INTERPOLATIONS[resample],
    )


def load_hf_clip_tower(folder: Path) -> tuple[HfClipImageTower, HfClipPreprocessing]:
    """The image tower of the CLIP in `folder`, with every weight it needs, and its preprocessing."""
    try:
        from safetensors.torch import load_file
        from transformers import CLIPVisionModel
    except ImportError as exc:
        raise HfClipLoadError(
            f"Hugging Face CLIP folders need the `transformers` package ({exc}); pip install transformers"
        ) from exc

    vision_config = _vision_config(_read_json(folder / "config.json"))
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        state.update(load_file(str(path)))
    vision = CLIPVisionModel(vision_config)
    # Files keep the tower under `vision_model.`; the module's own keys have that prefix or not,
    # depending on the transformers version: match on the rest. The text tower's weights are ignored.
    module_key = {k.removeprefix("vision_model."): k for k in vision.state_dict()}
    mapped = {
        module_key[short]: v
        for k, v in state.items()
        if (short := k.removeprefix("vision_model.")) in module_key
    }
    missing = sorted(k for k in module_key.values() if k not in mapped and not k.endswith("position_ids"))
    if missing:
        raise HfClipLoadError(
            f"{folder}: {len(missing)} vision weights not found, e.g. {missing[:3]}; "
            f"the file's keys look like {sorted(state)[:3]}"
        )
    try:
        vision.load_state_dict(mapped, strict=False)
    except RuntimeError as exc:
        raise HfClipLoadError(f"{folder}: weights do not match config.json: {exc}") from exc
    projection = None
    if "visual_projection.weight" in state:
        weight = state["visual_projection.weight"]
        projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        projection.weight.data.copy_(weight)
    tower = HfClipImageTower(vision, projection).eval()
    return tower, preprocessing(folder, int(vision_config.image_size))
