"""Encoder loading from every source kind, and the checkpoint key layouts seen in the wild."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.architectures import build_architecture
from models.encoders import EncoderLoadError, load_encoder, save_encoder

IMAGES = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)


def _reference() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    module = build_architecture("cifar_resnet18", 8).eval()
    encoder = load_encoder("random:cifar_resnet18", width=8)
    with torch.no_grad():
        expected = module(encoder.normalize(IMAGES))
    return module, expected


def test_safetensors_round_trip_rebuilds_from_metadata(tmp_path: Path) -> None:
    module, expected = _reference()
    path = tmp_path / "enc.safetensors"
    save_encoder(path, module, "cifar_resnet18", 8)
    encoder = load_encoder(str(path))  # no --arch/--width: the metadata says
    assert encoder.identity.architecture == "cifar_resnet18(width=8)"
    assert encoder.identity.embedding_dim == 64
    assert len(encoder.identity.sha256 or "") == 64
    torch.testing.assert_close(encoder.embed(IMAGES), expected)


@pytest.mark.parametrize(
    "layout",
    ["plain", "module.backbone.", "simclr_sequential", "encoder_with_head"],
)
def test_state_dict_layouts(tmp_path: Path, layout: str) -> None:
    module, expected = _reference()
    state = module.state_dict()
    if layout == "module.backbone.":
        state = {f"module.backbone.{k}": v for k, v in state.items()}
    elif layout == "simclr_sequential":
        # SimCLR/BadEncoder code: self.f = nn.Sequential(conv1, bn1, relu, layer1..4) inside `f`.
        index = {"conv1": "0", "bn1": "1", "layer1": "3", "layer2": "4", "layer3": "5", "layer4": "6"}
        state = {f"f.f.{index[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in state.items()}
    elif layout == "encoder_with_head":
        state = {f"encoder.{k}": v for k, v in state.items()}
        state["g.0.weight"] = torch.zeros(128, 64)  # a projection head to be dropped
        state = {"state_dict": state, "epoch": 10}
    path = tmp_path / "enc.pth"
    torch.save(state, path)
    encoder = load_encoder(str(path), arch="cifar_resnet18")
    assert encoder.identity.architecture == "cifar_resnet18(width=8)"  # width read from conv1
    torch.testing.assert_close(encoder.embed(IMAGES), expected)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(1), "obj": Path("/etc/passwd")}, path)
    with pytest.raises(EncoderLoadError, match="weights_only"):
        load_encoder(str(path))


def test_wrong_architecture_names_missing_keys(tmp_path: Path) -> None:
    module, _ = _reference()
    path = tmp_path / "enc.pt"
    torch.save(module.state_dict(), path)
    with pytest.raises(EncoderLoadError, match="not found"):
        load_encoder(str(path), arch="cifar_resnet50")


def test_torchscript_and_onnx_files_give_the_same_embeddings(tmp_path: Path) -> None:
    module, expected = _reference()
    ts_path = tmp_path / "enc.ts"
    torch.jit.trace(module, torch.zeros(1, 3, 32, 32)).save(str(ts_path))
    ts = load_encoder(str(ts_path))
    assert ts.identity.kind == "torchscript"
    torch.testing.assert_close(ts.embed(IMAGES), expected)

    onnx_path = tmp_path / "enc.onnx"
    torch.onnx.export(
        module,
        (torch.zeros(2, 3, 32, 32),),
        str(onnx_path),
        input_names=["x"],
        output_names=["z"],
        dynamic_axes={"x": {0: "n"}, "z": {0: "n"}},
        dynamo=False,
    )
    black_box = load_encoder(str(onnx_path))
    assert black_box.module is None and black_box.identity.embedding_dim == 64
    torch.testing.assert_close(black_box.embed(IMAGES), expected, rtol=1e-4, atol=1e-5)


def test_torchvision_resnet_from_local_weights(tmp_path: Path) -> None:
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)  # includes fc.*, which the loader drops
    encoder = load_encoder(str(path), arch="resnet18", input_size=(64, 64))
    assert encoder.identity.embedding_dim == 512
    assert encoder.identity.mean == (0.485, 0.456, 0.406)


def test_factory_and_unknown_specs() -> None:
    encoder = load_encoder("tests.core.test_encoders:tiny_factory")
    assert encoder.identity.kind == "factory" and encoder.identity.embedding_dim == 5
    with pytest.raises(EncoderLoadError, match="no such file"):
        load_encoder("does/not/exist.pt")
    with pytest.raises(EncoderLoadError, match="unknown architecture"):
        load_encoder("random:vit_huge")


def tiny_factory() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xff\xff\xff\xff\xff\xff\x7f{}",  # a header length of 2^63
        b"\x10\x00\x00\x00\x00\x00\x00\x00{" + b'"a":{"dtype":',  # a header cut short
        b'\x02\x00\x00\x00\x00\x00\x00\x00{}{"a"',  # data after an empty header
    ],
)
def test_a_safetensors_file_with_a_bad_header_is_a_one_line_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "encoder.safetensors"
    path.write_bytes(content)
    with pytest.raises(EncoderLoadError, match="not a readable .safetensors file"):
        load_encoder(str(path))
