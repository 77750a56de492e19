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

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            return load_file(str(path)), metadata
        except Exception as exc:  # SafetensorError (bad header, truncated data) is no OSError
            raise EncoderLoadError(f"{path} is not a readable .safetensors file: {exc}") from exc
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
    `onnx_path` is set (embeddings then come from ONNX Runtime). An ONNX encoder takes either
    normalized float32 images or raw uint8 pixels (its own preprocessing inside), NCHW or NHWC;
    `feature_tensors` names intermediate tensors of its graph for the feature score.
    """

    module: nn.Module | None
    identity: EncoderIdentity
    onnx_path: Path | None = None
    onnx_input_name: str | None = None
    onnx_input_dtype: str = "float32"  # or "uint8": raw pixels, no normalization applied by dede
    onnx_layout: str = "NCHW"  # or "NHWC"
    feature_tensors: tuple[str, ...] = ()
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

    def denormalize_to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized float images -> the uint8 pixels they stand for (rounded, clamped)."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return torch.round((x.float() * std + mean) * 255.0).clamp(0, 255).to(torch.uint8)

    @torch.no_grad()
    def embed(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float32 embeddings [N, D] on the input's device."""
        if self.module is not None:
            return self.module(self.normalize(images_uint8))
        return self._run_onnx(self._onnx_feed(images_uint8, None), ())[0].to(images_uint8.device)

    @torch.no_grad()
    def embed_with_features(
        self, images_uint8: torch.Tensor, tensors: list[str]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ONNX encoder: (embeddings, the named intermediate tensors) of uint8 images."""
        out = self._run_onnx(self._onnx_feed(images_uint8, None), tuple(tensors))
        return out[0].to(images_uint8.device), [o.to(images_uint8.device) for o in out[1:]]

    @torch.no_grad()
    def features_of_normalized(self, x: torch.Tensor, tensors: list[str]) -> list[torch.Tensor]:
        """ONNX encoder: the named intermediate tensors for normalized float images (a rebuild)."""
        out = self._run_onnx(self._onnx_feed(None, x), tuple(tensors))
        return [o.to(x.device) for o in out[1:]]

    def _onnx_feed(self, images_uint8: torch.Tensor | None, normalized: torch.Tensor | None) -> np.ndarray:
        if self.onnx_input_dtype == "uint8":
            pixels = images_uint8 if images_uint8 is not None else self.denormalize_to_uint8(normalized)
            feed = pixels.cpu().numpy().astype(np.uint8)
        else:
            x = normalized if normalized is not None else self.normalize(images_uint8)
            feed = x.cpu().numpy().astype(np.float32)
        if self.onnx_layout == "NHWC":
            feed = feed.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(feed)

    def _run_onnx(self, feed: np.ndarray, tensors: tuple[str, ...]) -> list[torch.Tensor]:
        session = _onnx_session(str(self.onnx_path), tensors)
        outputs = session.run(None, {self.onnx_input_name: feed})
        return [torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in outputs]


_SESSIONS: dict[tuple[str, tuple[str, ...]], object] = {}


def _onnx_session(path: str, extra_outputs: tuple[str, ...] = ()):  # noqa: ANN202 - lazy onnxruntime
    """A CPU session for the ONNX encoder; with `extra_outputs`, the graph is given those intermediate
    tensors as further outputs (after its embedding)."""
    key = (path, extra_outputs)
    if key not in _SESSIONS:
        import onnxruntime as ort

        if extra_outputs:
            model = onnx_with_outputs(path, extra_outputs)
            _SESSIONS[key] = ort.InferenceSession(
                model.SerializeToString(), providers=["CPUExecutionProvider"]
            )
        else:
            _SESSIONS[key] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def onnx_with_outputs(path: str | Path, tensors: tuple[str, ...]):  # noqa: ANN201 - an onnx.ModelProto
    """The ONNX model at `path` with the named intermediate tensors added as graph outputs."""
    import onnx

    model = onnx.load(str(path))
    produced = {o for node in model.graph.node for o in node.output}
    missing = [name for name in tensors if name not in produced]
    if missing:
        examples = [o for node in model.graph.node for o in node.output][-8:]
        raise EncoderLoadError(
            f"{path}: no tensor named {', '.join(missing)} in the graph; some of its tensors: {', '.join(examples)}"
        )
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    existing = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in existing:
            elem = types.get(name, onnx.TensorProto.FLOAT)
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return model


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
    feature_tensors: tuple[str, ...] | list[str] | None = None,
) -> LoadedEncoder:
    """Load the encoder named by `spec` (a file, `random:ARCH`, or `package.module:factory`).

    For state-dict files the architecture comes from `arch`, else from the file's metadata
    (dede writes it into .safetensors), else cifar_resnet18. Mean/std/input size default to the
    architecture's; override them for encoders trained with other statistics. `feature_tensors`
    names intermediate tensors of an ONNX encoder's graph for the feature score.
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
    if feature_tensors:
        if encoder.onnx_path is None:
            raise EncoderLoadError(
                "feature tensors name tensors of an ONNX encoder; a torch encoder names stages"
            )
        encoder.feature_tensors = tuple(feature_tensors)
        onnx_with_outputs(encoder.onnx_path, encoder.feature_tensors)  # a missing name fails here, clearly
        encoder.load_args["feature_tensors"] = list(feature_tensors)
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


_ONNX_FEEDABLE = {1: "float32", 2: "uint8"}  # onnx.TensorProto element types dede can feed


def _load_onnx(
    path: Path,
    input_size: tuple[int, int] | None,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
) -> LoadedEncoder:
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises several kinds for a bad file
        raise EncoderLoadError(f"{path} is not a loadable ONNX file: {exc}") from exc
    graph_inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(graph_inputs) != 1 or len(model.graph.output) != 1:
        raise EncoderLoadError(f"{path}: an ONNX encoder must have one image input and one embedding output")
    tensor_type = graph_inputs[0].type.tensor_type
    dims = [d.dim_value or d.dim_param or "?" for d in tensor_type.shape.dim]
    elem = onnx.TensorProto.DataType.Name(tensor_type.elem_type) if tensor_type.elem_type else "undefined"
    layout = (
        "NCHW" if len(dims) == 4 and dims[1] == 3 else "NHWC" if len(dims) == 4 and dims[3] == 3 else None
    )
    if tensor_type.elem_type not in _ONNX_FEEDABLE or layout is None:
        raise EncoderLoadError(
            f"{path}: cannot feed input {graph_inputs[0].name!r} of type {elem} and shape {dims}: dede feeds "
            "float32 (normalized) or uint8 (raw pixels) images shaped [N, 3, H, W] or [N, H, W, 3]"
        )
    spatial = dims[2:4] if layout == "NCHW" else dims[1:3]
    if input_size is None:
        if not all(isinstance(d, int) for d in spatial):
            raise EncoderLoadError(f"{path}: input shape {dims} has no fixed H, W; pass --input-size")
        input_size = (spatial[0], spatial[1])
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
        onnx_input_dtype=_ONNX_FEEDABLE[tensor_type.elem_type],
        onnx_layout=layout,
    )
    try:
        out = encoder.embed(torch.zeros(2, 3, *input_size, dtype=torch.uint8))
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors name the node, not the cause
        raise EncoderLoadError(
            f"{path}: ONNX Runtime cannot run the encoder on {encoder.onnx_input_dtype} "
            f"{encoder.onnx_layout} images of {input_size[0]}x{input_size[1]}: {str(exc).splitlines()[0]}"
        ) from exc
    if out.ndim != 2:
        raise EncoderLoadError(
            f"{path}: the encoder returns shape {tuple(out.shape)}; expected [N, D] embeddings"
        )
    encoder.identity = encoder.identity.model_copy(update={"embedding_dim": int(out.shape[1])})
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
