"""Encoders under test: one loader for every source kind (the architectures are in models/architectures.py).

Every encoder here is a torch module that maps NORMALIZED float images [N, 3, H, W] to embeddings
[N, D]; normalization (mean/std) travels with it in `LoadedEncoder` and runs inside the detector
graph. Sources:
  - a state dict (.pt/.pth via torch.load(weights_only=True), or .safetensors) for a registered
    architecture: CIFAR-style ResNets (3x3 stem, no max-pool, width multiplier) and torchvision's
    ImageNet ResNets; common SimCLR/BadEncoder key layouts are accepted;
  - a TorchScript file;
  - an ONNX file, treated as a black box (fitting needs only embeddings; export composes graphs);
  - `package.module:factory` for anything else;
  - `random:ARCH`, a freshly initialised encoder (tests, demos, pre-training from scratch);
  - a Hugging Face CLIP folder (config.json + model.safetensors), its image tower (models/hf_clip.py).
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.architectures import (
    CIFAR_MEAN,
    CIFAR_STD,
    OPENCLIP_PREFIX,
    EncoderLoadError,
    architecture,
    build_architecture,
)
from models.bundle import EncoderIdentity, sha256_file
from models.hf_clip import is_hf_clip_folder

# ----------------------------------------------------------------------------------------------
# Checkpoint key layouts.
# ----------------------------------------------------------------------------------------------

_WRAPPER_PREFIXES = ("module.", "backbone.", "encoder.", "visual.", "model.", "f.", "net.")
_HEAD_PREFIXES = ("fc.", "g.", "head.", "projector.", "projection_head.", "linear.", "classifier.")
# SimCLR/BadEncoder code keeps a ResNet as nn.Sequential(conv1, bn1, relu, layer1..layer4, pool):
# their indices name the submodules.
_SEQUENTIAL_NAMES = {"0": "conv1", "1": "bn1", "3": "layer1", "4": "layer2", "5": "layer3", "6": "layer4"}


def normalize_state_dict_keys(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes, drop projection/classifier heads, map Sequential indices to names.

    The layout is accepted once its keys match the architecture's; otherwise the error lists what
    is missing so a user can see which layout the file uses.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key
        changed = True
        while changed:
            changed = False
            if name in expected:
                break
            for prefix in _WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix) :], True
                    break
        if name not in expected:
            head, _, rest = name.partition(".")
            if head in _SEQUENTIAL_NAMES and f"{_SEQUENTIAL_NAMES[head]}.{rest}" in expected:
                name = f"{_SEQUENTIAL_NAMES[head]}.{rest}"
        # torchvision names the shortcut "downsample"; the CIFAR ResNet names it "shortcut".
        if name not in expected:
            alt = name.replace("downsample.", "shortcut.")
            name = alt if alt in expected else name
        if name.startswith(_HEAD_PREFIXES) and name not in expected:
            continue
        if name in expected:
            out[name] = value
    return out


def load_state_dict_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict from .safetensors or .pt/.pth (weights_only: never unpickle arbitrary code)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a safe state dict
        raise EncoderLoadError(
            f"{path} cannot be loaded with torch.load(weights_only=True): {str(exc).splitlines()[0]}. "
            "dede never unpickles arbitrary objects; save the encoder's state_dict() instead."
        ) from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "encoder"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EncoderLoadError(f"{path} does not hold a state dict of tensors")
    return obj, {}


# ----------------------------------------------------------------------------------------------
# The loaded encoder.
# ----------------------------------------------------------------------------------------------


@dataclass
class LoadedEncoder:
    """A frozen encoder, its preprocessing and its identity.

    `module` maps normalized float images to embeddings; for an ONNX black box it is None and
    `onnx_path` is set (embeddings then come from ONNX Runtime).
    """

    module: nn.Module | None
    identity: EncoderIdentity
    onnx_path: Path | None = None
    onnx_input_name: str | None = None
    load_args: dict | None = None  # the `load_encoder` arguments that rebuild this encoder

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.identity.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.identity.std

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images_uint8.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=images_uint8.device).view(1, 3, 1, 1)
        return (images_uint8.float() / 255.0 - mean) / std

    @torch.no_grad()
    def embed(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float32 embeddings [N, D] on the input's device."""
        x = self.normalize(images_uint8)
        if self.module is not None:
            return self.module(x)
        session = _onnx_session(str(self.onnx_path))
        z = session.run(None, {self.onnx_input_name: x.cpu().numpy()})[0]
        return torch.from_numpy(np.asarray(z, dtype=np.float32)).to(images_uint8.device)


_SESSIONS: dict[str, object] = {}


def _onnx_session(path: str):  # noqa: ANN202 - onnxruntime is imported lazily
    if path not in _SESSIONS:
        import onnxruntime as ort

        _SESSIONS[path] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return _SESSIONS[path]


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _probe_embedding_dim(module: nn.Module, input_size: tuple[int, int]) -> int:
    with torch.no_grad():
        out = module(torch.zeros(2, 3, *input_size))
    if out.ndim != 2:
        raise EncoderLoadError(f"encoder returns shape {tuple(out.shape)}; expected [N, D] embeddings")
    return int(out.shape[1])


def load_encoder(
    spec: str,
    arch: str | None = None,
    width: int | None = None,
    input_size: tuple[int, int] | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> LoadedEncoder:
    """Load the encoder named by `spec` (a file, `random:ARCH`, or `package.module:factory`).

    For state-dict files the architecture comes from `arch`, else from the file's metadata
    (dede writes it into .safetensors), else cifar_resnet18. Mean/std/input size default to the
    architecture's; override them for encoders trained with other statistics.
    """
    encoder = _load_encoder(spec, arch, width, input_size, mean, std)
    encoder.load_args = {
        "spec": spec,
        "arch": arch,
        "width": width,
        "input_size": list(input_size) if input_size else None,
        "mean": list(mean) if mean else None,
        "std": list(std) if std else None,
    }
    return encoder


def encoder_from_args(load_args: dict) -> LoadedEncoder:
    """Rebuild an encoder from the `load_args` a run recorded."""
    args = dict(load_args)
    for key in ("input_size", "mean", "std"):
        args[key] = tuple(args[key]) if args.get(key) else None
    return load_encoder(**args)


def _load_encoder(
    spec: str,
    arch: str | None,
    width: int | None,
    input_size: tuple[int, int] | None,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
) -> LoadedEncoder:
    path = Path(spec)
    if spec.startswith("random:"):
        arch_name = spec.split(":", 1)[1]
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the same spec always means the same weights
            module = build_architecture(arch_name, width or 64)
        return _finish(module, arch_name, "random", spec, None, width, input_size, mean, std)
    if is_hf_clip_folder(path):
        return _load_hf_clip(path, input_size, mean, std)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            return _load_onnx(path, input_size, mean, std)
        if suffix in (".ts", ".torchscript", ".jit"):
            try:
                module = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:
                raise EncoderLoadError(f"{path} is not a loadable TorchScript file: {exc}") from exc
            return _finish(
                module, arch or "torchscript", "torchscript", path.name, path, None, input_size, mean, std
            )
        if suffix in (".pt", ".pth", ".safetensors", ".bin"):
            state, metadata = load_state_dict_file(path)
            arch_name = arch or metadata.get("arch") or "cifar_resnet18"
            width = width or int(metadata.get("width", 0)) or _guess_width(state) or 64
            if arch_name.startswith(OPENCLIP_PREFIX):
                width = None  # the open_clip config fixes every size
            if metadata.get("mean") and mean is None:
                mean = tuple(json.loads(metadata["mean"]))
                std = tuple(json.loads(metadata["std"])) if std is None else std
            module = build_architecture(arch_name, width or 64)
            expected = set(module.state_dict().keys())
            if arch_name.startswith(OPENCLIP_PREFIX) and not any(k.startswith("visual.") for k in state):
                state = {f"visual.{k}": v for k, v in state.items()}  # open_clip's `model.visual` alone
            mapped = normalize_state_dict_keys(state, expected)
            missing = sorted(k for k in expected - set(mapped) if not k.endswith("num_batches_tracked"))
            if missing:
                raise EncoderLoadError(
                    f"{path}: {len(missing)} weights of {arch_name} (width {width}) not found, e.g. "
                    f"{missing[:3]}; file keys look like {list(state)[:3]}. Pass --arch/--width matching "
                    "the checkpoint."
                )
            try:
                module.load_state_dict(mapped, strict=False)  # only num_batches_tracked may be absent
            except RuntimeError as exc:
                raise EncoderLoadError(
                    f"{path}: shapes do not match {arch_name} width {width}: {exc}"
                ) from exc
            return _finish(module, arch_name, "state_dict", path.name, path, width, input_size, mean, std)
        raise EncoderLoadError(
            f"{path}: unknown encoder file type {suffix!r} (.pt .pth .safetensors .ts .onnx)"
        )
    if re.fullmatch(r"[\w.]+:\w+", spec):
        module_name, factory_name = spec.split(":")
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
        except (ImportError, AttributeError) as exc:
            raise EncoderLoadError(f"cannot import factory {spec}: {exc}") from exc
        module = factory()
        if not isinstance(module, nn.Module):
            raise EncoderLoadError(f"factory {spec} returned {type(module).__name__}, not a torch module")
        return _finish(module, arch or spec, "factory", spec, None, None, input_size, mean, std)
    raise EncoderLoadError(
        f"encoder {spec!r}: no such file or Hugging Face CLIP folder, and not `random:ARCH` or `package.module:factory`"
    )


def _load_hf_clip(
    folder: Path,
    input_size: tuple[int, int] | None,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
) -> LoadedEncoder:
    """A Hugging Face CLIP folder (models/hf_clip.py): its preprocessing is the tower's own."""
    from models.hf_clip import HF_CLIP_ARCH, HfClipLoadError, folder_sha256, load_hf_clip_tower

    try:
        tower, prep = load_hf_clip_tower(folder)
        digest = folder_sha256(folder)
    except HfClipLoadError as exc:
        raise EncoderLoadError(str(exc)) from exc
    if input_size is not None and tuple(input_size) != prep.input_size:
        raise EncoderLoadError(
            f"{folder}: the tower takes {prep.input_size} inputs (its config.json); drop --input-size"
        )
    module = _freeze(tower)
    identity = EncoderIdentity(
        architecture=HF_CLIP_ARCH if tower.projection is None else f"{HF_CLIP_ARCH}+projection",
        kind="hf_clip_folder",
        source=folder.name,
        sha256=digest,
        embedding_dim=_probe_embedding_dim(module, prep.input_size),
        input_size=prep.input_size,
        mean=mean or prep.mean,
        std=std or prep.std,
        resize=prep.resize,
        interpolation=prep.interpolation,
    )
    return LoadedEncoder(module=module, identity=identity)


def _guess_width(state: dict[str, torch.Tensor]) -> int | None:
    """The stem's output channels: the first conv weight that reads 3 input channels."""
    for value in state.values():
        if value.ndim == 4 and value.shape[1] == 3:
            return int(value.shape[0])
    return None


def _finish(
    module: nn.Module,
    arch: str,
    kind: str,
    source: str,
    path: Path | None,
    width: int | None,
    input_size: tuple[int, int] | None,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
) -> LoadedEncoder:
    defaults = architecture(arch)
    input_size = input_size or (defaults.input_size if defaults else (32, 32))
    mean = mean or (defaults.mean if defaults else CIFAR_MEAN)
    std = std or (defaults.std if defaults else CIFAR_STD)
    module = _freeze(module)
    identity = EncoderIdentity(
        architecture=arch if width is None else f"{arch}(width={width})",
        kind=kind,
        source=source,
        sha256=sha256_file(path) if path else None,
        embedding_dim=_probe_embedding_dim(module, input_size),
        input_size=input_size,
        mean=mean,
        std=std,
        resize=defaults.resize if defaults else "resize",
        interpolation=defaults.interpolation if defaults else "bilinear",
    )
    return LoadedEncoder(module=module, identity=identity)


def _load_onnx(
    path: Path,
    input_size: tuple[int, int] | None,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
) -> LoadedEncoder:
    import onnx

    model = onnx.load(str(path))
    graph_inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(graph_inputs) != 1 or len(model.graph.output) != 1:
        raise EncoderLoadError(f"{path}: an ONNX encoder must have one image input and one embedding output")
    dims = [d.dim_value for d in graph_inputs[0].type.tensor_type.shape.dim]
    if input_size is None:
        if len(dims) != 4 or not dims[2] or not dims[3]:
            raise EncoderLoadError(f"{path}: input shape {dims} has no fixed H, W; pass --input-size")
        input_size = (dims[2], dims[3])
    encoder = LoadedEncoder(
        module=None,
        identity=EncoderIdentity(
            architecture="onnx",
            kind="onnx",
            source=path.name,
            sha256=sha256_file(path),
            embedding_dim=1,  # replaced below once the graph has run
            input_size=input_size,
            mean=mean or CIFAR_MEAN,
            std=std or CIFAR_STD,
        ),
        onnx_path=path,
        onnx_input_name=graph_inputs[0].name,
    )
    dim = encoder.embed(torch.zeros(2, 3, *input_size, dtype=torch.uint8)).shape[1]
    encoder.identity = encoder.identity.model_copy(update={"embedding_dim": int(dim)})
    return encoder


def save_encoder(
    path: Path,
    module: nn.Module,
    arch: str,
    width: int,
    mean: tuple[float, float, float] = CIFAR_MEAN,
    std: tuple[float, float, float] = CIFAR_STD,
) -> None:
    """Write an encoder as .safetensors with the metadata `load_encoder` needs to rebuild it."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    metadata = {
        "arch": arch,
        "width": str(width),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
