"""The bundle contract: verification refuses tampering, preprocessing is one well-defined function."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.bundle import BundleError, InputSpec, load_bundle, prepare_image, to_rgb

SPEC = InputSpec(height=32, width=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def test_bundle_verifies_and_reads(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    assert bundle.manifest.model_name == "tiny-test"
    assert bundle.manifest.input.height == 32 and bundle.manifest.decoder.visible_patches == []
    assert bundle.manifest.parity["max_relative_diff_ort_vs_torch"] <= 1e-4
    assert {f.path for f in bundle.manifest.files} == {"detector.onnx"}


def test_a_changed_byte_in_the_graph_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(tiny_bundle, tmp_path)
    data = bytearray((bundle / "detector.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "detector.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 .* does not match"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(schema_version=2), "schema_version 2 is not supported"),
        (lambda m: m["threshold"].pop("value"), "threshold.value"),
        (lambda m: m["files"].append({"path": "../x", "sha256": "0" * 64, "bytes": 1}), "leaves the bundle"),
        (lambda m: m["decoder"].update(visible_patches=[999]), "outside"),
    ],
)
def test_manifest_errors_name_the_problem(tiny_bundle: Path, tmp_path: Path, edit, message: str) -> None:
    bundle = _copy(tiny_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_missing_bundle_and_tar_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    archive = tmp_path / "bundle.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tiny_bundle, arcname="tiny")
    assert load_bundle(archive).manifest.model_name == "tiny-test"


def test_bundle_module_imports_no_torch() -> None:
    code = "import sys, models.bundle; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_preprocessing_modes_and_orientation() -> None:
    rgba = Image.new("RGBA", (32, 32), (200, 100, 50, 0))  # fully transparent: composited to black
    assert np.asarray(to_rgb(rgba)).max() == 0
    grey16 = Image.fromarray(np.full((32, 32), 65535, np.uint16))
    assert np.asarray(to_rgb(grey16)).min() == 255
    palette = Image.new("P", (32, 32), 3)
    assert prepare_image(palette, SPEC).shape == (3, 32, 32)

    # EXIF orientation 6 (rotate 90 clockwise to view): a 40x20 stored image is viewed as 20x40.
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the stored left edge
    exif = stored.getexif()
    exif[0x0112] = 6
    import io

    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif.tobytes())
    upright = to_rgb(Image.open(io.BytesIO(buffer.getvalue())))
    assert upright.size == (20, 40)
    assert np.asarray(upright)[0, 10].tolist() == [0, 0, 255]  # the left edge is now on top


def test_resize_rules() -> None:
    image = Image.new("RGB", (64, 48), (10, 20, 30))
    assert prepare_image(image, SPEC).shape == (3, 32, 32)
    crop = SPEC.model_copy(update={"resize": "shorter_side_center_crop"})
    wide = Image.new("RGB", (96, 32), (0, 0, 0))
    wide.paste((255, 255, 255), (32, 0, 64, 32))  # white centre third
    assert prepare_image(wide, crop).min() == 255  # only the centre survives the crop


def _with_external_tensor(bundle: Path, location: str, in_subgraph: bool) -> None:
    """Give the bundle's graph one more tensor whose data lies in `location` (ONNX external data), as
    an initializer or inside a Constant node's attribute, and list the graph's new hash."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(bundle / "detector.onnx"))
    tensor = helper.make_tensor("stolen", TensorProto.FLOAT, [4], vals=[0.0] * 4)
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "16"}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    if in_subgraph:
        model.graph.node.append(helper.make_node("Constant", [], ["stolen_out"], value=tensor))
    else:
        model.graph.initializer.append(tensor)
    (bundle / "detector.onnx").write_bytes(model.SerializeToString())
    manifest = json.loads((bundle / "manifest.json").read_text())
    from models.bundle import sha256_file

    for entry in manifest["files"]:
        if entry["path"] == "detector.onnx":
            entry["sha256"] = sha256_file(bundle / "detector.onnx")
            entry["bytes"] = (bundle / "detector.onnx").stat().st_size
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "location, in_subgraph",
    [("../outside.bin", False), ("/etc/hostname", False), ("weights.bin", False), ("../outside.bin", True)],
)
def test_a_graph_with_external_data_is_refused(
    tiny_bundle: Path, tmp_path: Path, location: str, in_subgraph: bool
) -> None:
    """External data is read from a path the graph names, past the manifest's hashes (a file in the
    bundle that the manifest does not list, or one outside it): refused before any session opens."""
    bundle = _copy(tiny_bundle, tmp_path)
    (tmp_path / "outside.bin").write_bytes(bytes(16))
    (bundle / "weights.bin").write_bytes(bytes(16))
    _with_external_tensor(bundle, location, in_subgraph)
    with pytest.raises(BundleError, match="1 tensor\\(s\\) keep their data in external files"):
        load_bundle(bundle)


def test_a_graph_that_is_not_protobuf_is_refused_by_the_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(tiny_bundle, tmp_path)
    (bundle / "detector.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + bytes(8))  # a field past the end
    manifest = json.loads((bundle / "manifest.json").read_text())
    from models.bundle import sha256_file

    manifest["files"][0].update(sha256=sha256_file(bundle / "detector.onnx"), bytes=14)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not a readable ONNX graph"):
        load_bundle(bundle)
