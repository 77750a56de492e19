"""fit -> calibrate -> export -> score, through the library and through the `dede` command line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import training.fit as fit_module
from models.bundle import InputSpec, load_bundle, load_image_file
from models.encoders import load_encoder
from training import DEFAULT_FEATURE_RULE
from training.cli import main
from training.export import DEPTHS_SCORE_NAMES, ExportError, export_bundle
from training.fit import FitSettings, fit_decoder, load_run


def _images(path: Path, limit: int = 200) -> np.ndarray:
    x = np.load(path)["x"][:limit]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def test_a_killed_fit_resumes_to_the_same_weights(
    tiny_data: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    encoder = load_encoder("random:cifar_resnet18", width=8)
    images = _images(tiny_data["aux"])
    settings = FitSettings(preset="tiny", epochs=3, batch_size=64, eval_every=2, patience=100)
    straight = fit_decoder(encoder, images, tmp_path / "straight", settings)

    calls = {"n": 0}
    real_loss = fit_module.training_loss

    def crash_midway(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] > 6:  # past the first checkpoints (every 2 steps), before the 9th step
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(fit_module, "training_loss", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        fit_decoder(encoder, images, tmp_path / "resumed", settings)
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["progress"]["step"]
    assert 0 < saved < 9
    monkeypatch.setattr(fit_module, "training_loss", real_loss)
    resumed = fit_decoder(encoder, images, tmp_path / "resumed", settings)

    from safetensors.torch import load_file

    a, b = load_file(str(straight)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(tmp_path / "resumed" / "log.csv") as handle:
        log = list(csv.DictReader(handle))
    assert [row["step"] for row in log] == ["2", "4", "6", "8", "9"]  # 3 epochs of 3 steps


def test_a_fit_refuses_to_resume_over_another_encoder_at_the_same_path(
    tiny_data: dict[str, Path], tmp_path: Path
) -> None:
    """A retrained encoder saved over the old file: rerunning the fit into the same folder must not
    keep the old encoder's decoder (the path alone is the same)."""
    from models.architectures import build_architecture
    from models.encoders import save_encoder

    path = tmp_path / "encoder.safetensors"
    torch.manual_seed(1)
    save_encoder(path, build_architecture("cifar_resnet18", 8).eval(), "cifar_resnet18", 8)
    images = _images(tiny_data["aux"], limit=100)
    settings = FitSettings(preset="tiny", epochs=1, batch_size=64, eval_every=2, patience=100)
    fit_decoder(load_encoder(str(path)), images, tmp_path / "run", settings)
    assert fit_decoder(load_encoder(str(path)), images, tmp_path / "run", settings).is_file()  # same file
    torch.manual_seed(2)
    save_encoder(path, build_architecture("cifar_resnet18", 8).eval(), "cifar_resnet18", 8)
    with pytest.raises(fit_module.RunError, match="the encoder file changed: sha256"):
        fit_decoder(load_encoder(str(path)), images, tmp_path / "run", settings)


def test_export_refuses_when_onnx_disagrees(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    import training.export as export_module

    real = export_module._ort_scores
    monkeypatch.setattr(export_module, "_ort_scores", lambda *a: real(*a) * 1.001)
    with pytest.raises(ExportError, match="disagrees"):
        export_bundle(load_run(tiny_run), tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_onnx_black_box_encoder_exports_one_graph(tiny_data: dict[str, Path], tmp_path: Path) -> None:
    from training.calibrate import calibrate_run

    torch.manual_seed(0)
    module = load_encoder("random:cifar_resnet18", width=8).module
    onnx_encoder = tmp_path / "encoder.onnx"
    torch.onnx.export(
        module,
        (torch.zeros(2, 3, 32, 32),),
        str(onnx_encoder),
        input_names=["pixels"],
        output_names=["embedding"],
        dynamic_axes={"pixels": {0: "n"}, "embedding": {0: "n"}},
        dynamo=False,
    )
    encoder = load_encoder(str(onnx_encoder))
    run_dir = tmp_path / "run"
    fit_decoder(encoder, _images(tiny_data["aux"]), run_dir, FitSettings(preset="tiny", epochs=1))
    calibrate_run(run_dir, _images(tiny_data["clean"], 300), 0.05, "clean")
    manifest = export_bundle(load_run(run_dir), tmp_path / "bundle")
    assert manifest.encoder.kind == "onnx"
    assert manifest.parity["max_relative_diff_ort_vs_torch"] <= 1e-4

    import onnx

    graph = onnx.load(str(tmp_path / "bundle" / "detector.onnx")).graph
    assert [i.name for i in graph.input] == ["images"]


def test_cli_workflow_and_pytorch_equals_dede_score(
    tiny_data: dict[str, Path], tmp_path: Path, capsys
) -> None:
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    common = ["--encoder", "random:cifar_resnet18", "--width", "8"]
    assert (
        main(
            [
                "fit",
                *common,
                "--data",
                str(tiny_data["aux"]),
                "--preset",
                "tiny",
                "--epochs",
                "1",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    assert main(["calibrate", "--run", str(run), "--data", str(tiny_data["clean"]), "--fpr", "0.05"]) == 0
    assert main(["export", "--run", str(run), "--out", str(bundle)]) == 0
    assert main(["export", "--run", str(run), "--out", str(bundle)]) == 2  # exists: refused, no traceback
    assert "pass --force" in capsys.readouterr().err

    # Image files of other sizes and modes go through the one shared preprocessing function.
    files = tmp_path / "files"
    files.mkdir()
    source = np.load(tiny_data["clean"])["x"]
    Image.fromarray(source[0]).save(files / "a.png")
    Image.fromarray(source[1]).resize((50, 40)).save(files / "b.jpg", quality=90)
    Image.fromarray(source[2]).convert("L").save(files / "c.bmp")
    (files / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "scores.jsonl"
    assert (
        main(["score", "--bundle", str(bundle), str(files), "--format", "jsonl", "--output", str(out)]) == 1
    )
    rows = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["broken.png"]["error"] and rows["broken.png"]["score"] is None

    manifest = load_bundle(bundle).manifest
    spec = InputSpec.model_validate(manifest.input.model_dump())
    fitted = load_run(run)
    assert (
        fitted.default_score == "feature"
        and manifest.decoder.score == DEPTHS_SCORE_NAMES[DEFAULT_FEATURE_RULE]
    )
    detector = fitted.detector(fitted.default_score)
    for name in ("a.png", "b.jpg", "c.bmp"):
        pixels = torch.from_numpy(load_image_file(files / name, spec)).unsqueeze(0)
        with torch.no_grad():
            expected = detector(pixels)[0].item()
        # The feature score is in standard deviations: its float noise is absolute, not relative.
        assert rows[name]["score"] == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert rows[name]["flagged"] == (rows[name]["score"] > manifest.threshold.value)


def test_calibrate_holdout_sets_the_threshold_on_the_fits_held_out_images(
    tiny_data: dict[str, Path], tiny_run: Path, tmp_path: Path, capsys
) -> None:
    from training.calibrate import calibrate_two_fold
    from training.data import load_images
    from training.fit import HOLDOUT_IMAGES_FILE, held_out_split
    from training.scoring import score_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # calibrating rewrites the run's calibration
    fitted = load_run(run)
    images, _ = load_images(str(tiny_data["aux"]), fitted.encoder.identity.input_spec())
    settings = FitSettings(preset="tiny", epochs=2, batch_size=128)  # the fixture's fit
    val_idx, train_idx = held_out_split(len(images), settings)
    holdout = np.load(run / HOLDOUT_IMAGES_FILE)
    assert holdout.dtype == np.uint8 and np.array_equal(holdout, images[val_idx])
    assert not np.isin(val_idx, train_idx).any()

    assert main(["calibrate", "--run", str(run), "--holdout", "--fpr", "0.05"]) == 0
    recorded = json.loads((run / "calibration.json").read_text())["threshold"]
    scores = score_run(fitted, holdout)
    order = np.random.default_rng(0).permutation(len(holdout))  # the command's folds, seed 0
    expected = calibrate_two_fold(scores, order, 0.05)
    assert recorded["value"] == pytest.approx(expected["value"], rel=1e-6)
    assert recorded["realised_fpr"] == pytest.approx(expected["realised_fpr"])
    assert recorded["n_calibration"] == recorded["n_holdout"] == len(val_idx)
    assert "held-out auxiliary images" in recorded["calibration_source"]
    assert (
        "the threshold is rough" in capsys.readouterr().out
    )  # too few held-out images for 5%: a handful lie above
    # The export's parity check needs 256 images; a held-out split of 200 (of 2,000) fills the
    # sample with its mirror images, and the export then goes through.
    from training.calibrate import calibrate_run
    from training.export import PARITY_IMAGES

    some = np.concatenate([holdout] * 4)[:130]
    calibrate_run(run, some, 0.05, "held-out", mirror_parity=True)
    parity = np.load(run / PARITY_IMAGES)
    assert len(parity) == 256 and np.array_equal(parity[130:], parity[:126, :, :, ::-1])
    export_bundle(load_run(run), tmp_path / "bundle")

    assert main(["calibrate", "--run", str(run), "--holdout", "--limit", "10"]) == 2
    assert "--limit applies to --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one source or the other, never both
        main(["calibrate", "--run", str(run), "--holdout", "--data", str(tiny_data["clean"])])
    info = json.loads((run / "run.json").read_text())
    info["fit"]["poison_rate"] = 0.01  # a fit on a partly triggered auxiliary set (the lab's option)
    (run / "run.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert main(["calibrate", "--run", str(run), "--holdout", "--fpr", "0.05"]) == 0
    assert "add --unlabelled" in capsys.readouterr().out
    assert main(["calibrate", "--run", str(run), "--holdout", "--unlabelled", "--fpr", "0.05"]) == 0
    assert "add --unlabelled" not in capsys.readouterr().out
    # The held-out images are the sample here: no clean reference is left, so the quantile is trimmed.
    assert json.loads((run / "calibration.json").read_text())["threshold"]["unlabelled_method"] == (
        "trimmed_quantile"
    )
    # An unlabelled sample of the user's own: the clean tail's shape is read on the held-out images,
    # under the statistics the sample set, and the export carries which threshold it is.
    from training.calibrate import tail_shape_threshold
    from training.data import load_images

    assert (
        main(
            [
                "calibrate",
                "--run",
                str(run),
                "--data",
                str(tiny_data["clean"]),
                "--unlabelled",
                "--fpr",
                "0.05",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "clean tail's length" in out and "held-out images the clean tail's length is read on" in out
    recorded = json.loads((run / "calibration.json").read_text())["threshold"]
    assert recorded["unlabelled_method"] == "tail_shape" and recorded["n_tail_reference"] == len(holdout)
    sample, _ = load_images(tiny_data["clean"], fitted.encoder.identity.input_spec(), None)
    standardised = load_run(run)
    expected = tail_shape_threshold(score_run(standardised, sample), score_run(standardised, holdout), 0.05)
    assert recorded["value"] == pytest.approx(expected, rel=1e-6)
    manifest = export_bundle(standardised, tmp_path / "bundle-unlabelled")
    assert manifest.threshold.unlabelled_method == "tail_shape"
    assert manifest.threshold.tail_mads == pytest.approx(recorded["tail_mads"])
    (run / HOLDOUT_IMAGES_FILE).unlink()  # a run fitted before runs kept them
    capsys.readouterr()
    assert main(["calibrate", "--run", str(run), "--holdout"]) == 2
    assert "keeps no held-out images" in capsys.readouterr().err
    # Without them an unlabelled sample still calibrates, by the trimmed quantile, and says why.
    assert main(["calibrate", "--run", str(run), "--data", str(tiny_data["clean"]), "--unlabelled"]) == 0
    assert "kept no held-out images" in capsys.readouterr().out
    assert json.loads((run / "calibration.json").read_text())["threshold"]["unlabelled_method"] == (
        "trimmed_quantile"
    )


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "not a dede run" in capsys.readouterr().err
    assert main(["score", "--bundle", str(tmp_path / "missing"), str(tmp_path)]) == 2
    assert "bundle not found" in capsys.readouterr().err
    shutil.rmtree(tmp_path)


def test_torchscript_encoder_exports_through_the_torchscript_exporter(
    tiny_data: dict[str, Path], tmp_path: Path
) -> None:
    from training.calibrate import calibrate_run

    torch.manual_seed(0)
    module = load_encoder("random:cifar_resnet18", width=8).module
    ts_path = tmp_path / "encoder.ts"
    torch.jit.trace(module, torch.zeros(1, 3, 32, 32)).save(str(ts_path))
    run_dir = tmp_path / "run"
    fit_decoder(
        load_encoder(str(ts_path)), _images(tiny_data["aux"]), run_dir, FitSettings(preset="tiny", epochs=1)
    )
    calibrate_run(run_dir, _images(tiny_data["clean"], 300), 0.05, "clean")
    manifest = export_bundle(load_run(run_dir), tmp_path / "bundle")
    assert manifest.encoder.kind == "torchscript" and len(manifest.encoder.sha256 or "") == 64
    assert manifest.parity["max_relative_diff_ort_vs_torch"] <= 1e-4


def test_a_fit_refuses_an_encoder_whose_embeddings_are_not_finite(
    tiny_data: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """An encoder that overflows on some images would train the decoder on NaN for its whole budget."""
    real_embed = fit_module.embed_images

    def overflowing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        z = real_embed(*args, **kwargs)
        z[3, 0] = np.inf
        return z

    monkeypatch.setattr(fit_module, "embed_images", overflowing)
    encoder = load_encoder("random:cifar_resnet18", width=8)
    settings = FitSettings(preset="tiny", epochs=1, batch_size=64)
    with pytest.raises(fit_module.RunError, match="1 of .* auxiliary views hold NaN or infinite"):
        fit_decoder(encoder, _images(tiny_data["aux"], 40), tmp_path / "run", settings)
    assert not (tmp_path / "run" / "decoder.safetensors").exists()
