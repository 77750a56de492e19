"""The shipped detector: the conv decoder, the feature-space score in the exported graph (a CIFAR
ResNet, a CLIP tower, an ONNX encoder with named tensors), uint8-input ONNX encoders, robust
calibration, and a fit that stops at a validation plateau."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from models.architectures import CIFAR_MEAN, CIFAR_STD, build_architecture
from models.bundle import InputSpec, load_bundle
from models.conv_decoder import ConvDecoder, conv_preset_config
from models.encoders import EncoderLoadError, load_encoder
from models.feature_taps import TappedEncoder, default_stages
from training import DEFAULT_FEATURE_RULE
from training.calibrate import calibrate, calibrate_run, robust_inliers
from training.data import load_images
from training.export import DEPTHS_SCORE_NAMES, export_bundle
from training.fit import FEATURE_RULES, FitSettings, _training_visible, fit_decoder, load_run
from training.scoring import score_run


def _ort_scores(bundle: Path, images: np.ndarray, batch: int) -> np.ndarray:
    session = ort.InferenceSession(str(bundle / "detector.onnx"), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [session.run(["score"], {"images": images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    )


def _clean(tiny_data: dict[str, Path], spec: InputSpec, n: int = 48) -> np.ndarray:
    images, _ = load_images(str(tiny_data["clean"]), spec)
    return images[:n]


def _small_cifar_fit(tiny_data: dict[str, Path]) -> tuple:
    """(a random width-8 CIFAR ResNet, its auxiliary images, 300 clean images, 20-step conv fit settings)."""
    encoder = load_encoder("random:cifar_resnet18", width=8)
    spec = encoder.identity.input_spec()
    aux, _ = load_images(str(tiny_data["aux"]), spec)
    settings = FitSettings(preset="conv_tiny", max_steps=20, batch_size=64, eval_every=10)
    return encoder, aux, _clean(tiny_data, spec, 300), settings


# ------------------------------------------------------------------------------------------------
# Parts.
# ------------------------------------------------------------------------------------------------


def test_the_tail_scaling_puts_every_depths_clean_95th_percentile_at_one() -> None:
    from training.fit import depth_scale

    rng = np.random.default_rng(0)
    # three depths: light-tailed, heavy-tailed, and one whose MAD is zero
    roots = np.column_stack(
        [rng.normal(size=2000), rng.standard_cauchy(2000), np.r_[np.zeros(1500), np.ones(500)]]
    )
    centre = np.median(roots, axis=0)
    z = (roots - centre) / depth_scale(roots, centre, "q95")
    assert np.allclose(np.quantile(z, 0.95, axis=0), 1.0)
    mad_z = (roots - centre) / depth_scale(roots, centre, "mad")
    # under MAD scaling the heavy tail's 95th percentile sits far above the light one's
    assert np.quantile(mad_z[:, 1], 0.95) > 2 * np.quantile(mad_z[:, 0], 0.95)
    assert np.isfinite(mad_z).all()
    with pytest.raises(ValueError, match="scaling"):
        depth_scale(roots, centre, "iqr")


def test_view_scaling_puts_each_views_clean_max_at_one_on_the_same_share() -> None:
    from training.fit import MIN_VIEW_TAIL, TAIL_QUANTILE, depth_scale

    rng = np.random.default_rng(0)
    # two views of three depths: a light-tailed one and a heavy-tailed one (what the squared
    # discrepancies are beside the relative ones)
    light, heavy = rng.normal(size=(4000, 3)), rng.standard_t(2, size=(4000, 3))
    roots = np.column_stack([light, heavy])
    centre = np.median(roots, axis=0)
    mad = depth_scale(roots, centre, "mad")
    mad_z = (roots - centre) / mad
    assert np.quantile(mad_z[:, 3:].max(1), 0.99) > 1.3 * np.quantile(mad_z[:, :3].max(1), 0.99)
    scale = depth_scale(roots, centre, "mad_views", views=2)
    z = (roots - centre) / scale
    for view in (slice(0, 3), slice(3, 6)):
        assert np.quantile(z[:, view].max(1), TAIL_QUANTILE) == pytest.approx(1.0)
        ratio = scale[view] / mad[view]  # one factor per view: the depths keep their MAD units
        assert np.allclose(ratio, ratio[0]) and ratio[0] >= MIN_VIEW_TAIL
    # both views now cross 1 on the same share of these images
    assert np.mean(z[:, :3].max(1) > 1) == pytest.approx(np.mean(z[:, 3:].max(1) > 1), abs=1e-3)
    # a view whose max stays near its median is not magnified
    quiet = np.column_stack([light, np.r_[np.zeros(3990), np.ones(10)][:, None] * np.ones(3)])
    q_centre = np.median(quiet, axis=0)
    q_scale = depth_scale(quiet, q_centre, "mad_views", views=2)
    assert np.allclose(q_scale[3:], depth_scale(quiet, q_centre, "mad")[3:] * MIN_VIEW_TAIL)
    with pytest.raises(ValueError, match="views"):
        depth_scale(roots, centre, "mad_views", views=4)


def test_pixel_depths_match_a_float64_reference_and_the_max_combines_them() -> None:
    from models.detector import FeatureStandardiser, pixel_scale_discrepancies

    rng = np.random.default_rng(0)
    x, r = rng.normal(size=(3, 3, 16, 16)), rng.normal(size=(3, 3, 16, 16))
    got = pixel_scale_discrepancies(
        torch.tensor(x, dtype=torch.float32), torch.tensor(r, dtype=torch.float32), (1, 4)
    )
    pooled = (x - r).reshape(3, 3, 4, 4, 4, 4).mean(axis=(3, 5))  # 4 x 4 cells of 4 x 4 pixels
    expected = np.stack([((x - r) ** 2).mean(axis=(1, 2, 3)), (pooled**2).mean(axis=(1, 2, 3))], axis=1)
    assert np.allclose(got.numpy(), expected, rtol=1e-5)
    d = torch.tensor([[16.0, 1.0], [1.0, 81.0]])  # fourth roots: [2, 1], [1, 3]
    assert FeatureStandardiser([1.0, 1.0], [1.0, 2.0], "max")(d).tolist() == [1.0, 1.0]
    assert FeatureStandardiser([1.0, 1.0], [1.0, 2.0], "mean")(d).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="combine"):
        FeatureStandardiser([1.0], [1.0], "median")


def test_conv_decoder_rebuilds_at_every_size_from_a_standardised_embedding() -> None:
    for size, grid in ((32, 4), (64, 4), (96, 6), (224, 7)):
        config = conv_preset_config("conv_tiny", size)
        assert config.grid == grid and config.grid * 2**config.stages == size
        decoder = ConvDecoder(config, 16).eval()
        assert decoder(torch.randn(2, 16)).shape == (2, 3, size, size)
    decoder = ConvDecoder(conv_preset_config("conv_tiny", 32), 4)
    z = torch.randn(500, 4) * torch.tensor([1e3, 1.0, 1e-2, 0.0]) + 7
    decoder.set_embedding_stats(z)
    standardised = (z - decoder.embedding_mean) / decoder.embedding_std
    assert torch.allclose(standardised[:, :3].std(0), torch.ones(3), atol=0.02)
    assert torch.isfinite(standardised).all()  # the constant dimension is not blown up
    with pytest.raises(ValueError, match="too small"):
        conv_preset_config("conv", 6)
    narrow = ConvDecoder(conv_preset_config("conv", 32, width=8), 16).eval()  # below min_width
    assert narrow(torch.randn(2, 16)).shape == (2, 3, 32, 32)


def test_the_stage_rule_picks_depths_one_half_three_quarters_and_the_end() -> None:
    assert default_stages(build_architecture("cifar_resnet18", 8)) == ["layer2", "layer3", "layer4"]

    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = nn.Module()
            self.transformer.resblocks = nn.Sequential(*(nn.Linear(4, 4) for _ in range(12)))

    assert default_stages(Tower()) == [
        "transformer.resblocks.5",
        "transformer.resblocks.8",
        "transformer.resblocks.11",
    ]
    with pytest.raises(ValueError, match="--feature-stages"):
        default_stages(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))


def test_tapped_encoder_returns_the_stage_maps_and_takes_its_hooks_off() -> None:
    encoder = build_architecture("cifar_resnet18", 8).eval()
    tapped = TappedEncoder(encoder, ["layer2", "layer4"])
    x = torch.randn(3, 3, 32, 32)
    z, (f2, f4) = tapped(x)
    assert torch.equal(z, encoder(x)) and f2.shape[:2] == (3, 16) and f4.shape[:2] == (3, 64)
    tapped.remove()
    assert not encoder.layer2._forward_hooks


def test_mae_decoder_trains_on_the_test_mask_for_its_share_of_batches() -> None:
    from models.decoder import DeDeDecoder, preset_config

    generator = torch.Generator().manual_seed(0)
    test_visible = torch.zeros(1, 0, dtype=torch.long)
    shares = {}
    for share in (0.0, 0.5, 1.0):
        decoder = DeDeDecoder(preset_config("tiny", 32, test_mask_share=share), 8)
        masks = [_training_visible(decoder, 4, test_visible, generator) for _ in range(200)]
        shares[share] = np.mean([m.shape[1] == 0 for m in masks])
    assert shares[0.0] == 0.0 and shares[1.0] == 1.0 and 0.35 < shares[0.5] < 0.65


# ------------------------------------------------------------------------------------------------
# Calibration.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("contamination", [0.0, 0.01, 0.05])
def test_robust_calibration_holds_its_fpr_with_triggered_images_in_the_sample(contamination: float) -> None:
    rng = np.random.default_rng(0)
    n = 4000
    clean = rng.lognormal(mean=3.0, sigma=0.3, size=n)
    triggered = rng.lognormal(mean=5.0, sigma=0.3, size=int(contamination * n))  # far above the bulk
    sample = rng.permutation(np.concatenate([clean, triggered]))
    half = len(sample) // 2
    robust = calibrate(sample[:half], sample[half:], 0.01, "traffic", kind="unlabelled_robust")
    naive = calibrate(sample[:half], sample[half:], 0.01, "traffic", kind="clean")
    fresh_clean = rng.lognormal(mean=3.0, sigma=0.3, size=200_000)
    robust_fpr = float((fresh_clean > robust["value"]).mean())
    assert 0.005 < robust_fpr < 0.02, robust_fpr
    assert robust["n_trimmed"] >= 0.9 * len(triggered)
    if contamination >= 0.05:
        # The plain quantile lands among the triggered images: it would flag almost none of them.
        assert naive["value"] > robust["value"] * 2
        assert (triggered > robust["value"]).mean() > 0.99


def test_robust_inliers_keep_a_clean_normal_sample_whole() -> None:
    clean = np.random.default_rng(1).normal(0, 1, 10_000)
    assert robust_inliers(clean).mean() > 0.9999
    assert robust_inliers(np.full(10, 3.0)).all()  # no spread: nothing is an outlier


# ------------------------------------------------------------------------------------------------
# The feature score in the exported graph.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "clip_bundle"])
def test_feature_score_exports_with_parity_and_the_same_score_at_any_batch(
    bundle_fixture: str, request: pytest.FixtureRequest, tiny_data: dict[str, Path]
) -> None:
    """tiny_bundle: a CIFAR ResNet (stages layer2-4); clip_bundle: a CLIP ViT tower (its blocks)."""
    bundle = request.getfixturevalue(bundle_fixture)
    manifest = load_bundle(bundle).manifest
    feature = manifest.decoder.feature
    stages = feature["stages"]
    assert len(stages) == len(set(stages)) >= 2  # the test CLIP tower has 2 blocks: its 1st and 2nd
    pixels, combine, _, discrepancy = FEATURE_RULES[DEFAULT_FEATURE_RULE]
    assert manifest.decoder.score == (
        DEPTHS_SCORE_NAMES[DEFAULT_FEATURE_RULE] if pixels else "feature_robust_z_mean"
    )
    assert feature["combine"] == combine and feature["pixel_factors"] == list(pixels)
    assert feature.get("discrepancy", "squared") == discrepancy
    depths = [f"pixels/{k}" for k in feature["pixel_factors"]] + stages
    if discrepancy == "both":  # each depth twice: squared, then relative
        depths += [f"{depth} relative" for depth in depths]
    assert feature["depths"] == depths
    assert len(feature["centre"]) == len(feature["depths"])
    assert manifest.parity["max_relative_diff_ort_vs_torch"] <= 1e-4
    assert manifest.parity["flag_mismatches"] == 0
    images = _clean(tiny_data, InputSpec.model_validate(manifest.input.model_dump()), 24)
    batched = _ort_scores(bundle, images, 24)
    assert np.array_equal(batched, _ort_scores(bundle, images, 1))  # bit-identical
    assert np.array_equal(batched, _ort_scores(bundle, images, 5))
    assert np.ptp(batched) > 0


def _onnx_encoder(path: Path, uint8_nhwc: bool) -> tuple[nn.Module, list[str]]:
    """A CIFAR ResNet exported as a black box; uint8_nhwc: raw uint8 NHWC pixels in, normalization
    inside the graph (a common export form). Returns the torch encoder and two inner tensor names."""
    from benchmarks.detection.uint8_parity import RawPixels

    encoder = build_architecture("cifar_resnet18", 8).eval()
    module = RawPixels(encoder, CIFAR_MEAN, CIFAR_STD) if uint8_nhwc else encoder
    example = torch.zeros(2, 32, 32, 3, dtype=torch.uint8) if uint8_nhwc else torch.zeros(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=["embedding"],
            dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=18,
            dynamo=False,
        )
    import onnx

    relus = [n.output[0] for n in onnx.load(str(path)).graph.node if n.op_type == "Relu"]
    return encoder, [relus[len(relus) // 2], relus[-1]]


# The relative rule on the float encoder only: a uint8 encoder gets its rebuild rounded to pixels,
# where ONNX Runtime and torch part on a few half-way values; against the narrow clean spread a test
# decoder that has learnt nothing leaves (below), that is over the parity check's 1e-4.
@pytest.mark.parametrize(
    ("rule", "uint8_nhwc"),
    [
        ("mean_stages", False),
        ("max_all", False),
        ("max_all_relative", False),
        ("mean_stages", True),
        ("max_all", True),
    ],
    ids=[
        "mean_stages-float-nchw",
        "max_all-float-nchw",
        "max_all_relative-float-nchw",
        "mean_stages-uint8-nhwc",
        "max_all-uint8-nhwc",
    ],
)
def test_onnx_encoder_with_named_tensors_end_to_end(
    uint8_nhwc: bool, rule: str, tiny_data: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "encoder.onnx"
    torch_encoder, tensors = _onnx_encoder(path, uint8_nhwc)
    encoder = load_encoder(str(path), feature_tensors=tensors)
    assert encoder.onnx_input_dtype == ("uint8" if uint8_nhwc else "float32")
    spec = encoder.identity.input_spec()
    images = _clean(tiny_data, spec, 300)
    with torch.no_grad():  # raw pixels are not normalised twice: the same embeddings as torch's
        expected = torch_encoder(encoder.normalize(torch.from_numpy(images[:8])))
    assert torch.allclose(encoder.embed(torch.from_numpy(images[:8])), expected, atol=1e-4)

    aux, _ = load_images(str(tiny_data["aux"]), spec)
    run_dir = tmp_path / "run"
    # The relative discrepancy's clean spread is narrow where the decoder has learnt nothing (every
    # rebuild as far from its input): 20 steps leave it so, and the float noise between ONNX Runtime
    # and torch is then over 1e-4 of it; the parity check refuses such a bundle.
    steps = 200 if rule == "max_all_relative" else 20
    settings = FitSettings(
        preset="conv_tiny", max_steps=steps, batch_size=64, eval_every=10, feature_rule=rule
    )
    fit_decoder(encoder, aux, run_dir, settings)
    run = load_run(run_dir)
    assert run.feature_stats["stages"] == tensors and run.default_score == "feature"
    assert run.feature_stats["depths"][-2:] == tensors and len(run.feature_stats["depths"]) == (
        2 if rule == "mean_stages" else 6
    )
    assert run.discrepancy == ("relative" if rule == "max_all_relative" else "squared")
    calibrate_run(run_dir, images, 0.05, "clean.npz")
    bundle = tmp_path / "bundle"
    manifest = export_bundle(load_run(run_dir), bundle)
    assert manifest.parity["max_relative_diff_ort_vs_torch"] <= 1e-4
    assert manifest.decoder.feature["stages"] == tensors
    batched = _ort_scores(bundle, images[:24], 24)
    assert np.array_equal(batched, _ort_scores(bundle, images[:24], 1))
    reference = score_run(load_run(run_dir), images[:24])
    assert np.allclose(batched, reference, rtol=1e-4, atol=1e-4)


def test_an_onnx_input_dede_cannot_feed_is_one_clear_line(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["tokens"], ["embedding"], to=TensorProto.FLOAT)],
        "text",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", 77])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 77])],
    )
    path = tmp_path / "text.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(EncoderLoadError) as caught:
        load_encoder(str(path))
    message = str(caught.value)
    assert "'tokens'" in message and "INT64" in message and "['batch', 77]" in message
    assert "\n" not in message

    from training.cli import main

    assert main(["fit", "--encoder", str(path), "--data", "x.npz", "--out", str(tmp_path / "r")]) == 2


def test_a_missing_onnx_tensor_name_is_refused_with_examples(tmp_path: Path) -> None:
    path = tmp_path / "encoder.onnx"
    _onnx_encoder(path, uint8_nhwc=False)
    with pytest.raises(EncoderLoadError, match="no tensor named nope"):
        load_encoder(str(path), feature_tensors=["nope"])


# ------------------------------------------------------------------------------------------------
# The default fit.
# ------------------------------------------------------------------------------------------------


@pytest.mark.lab
def test_the_default_fit_stops_at_a_validation_plateau_on_a_small_real_set(tmp_path: Path) -> None:
    """Smoke sizes: the test decoder on 600 Tiny-ImageNet images; the default settings otherwise
    (augmented views, plateau stop), validating every 20 steps."""
    from lab.suite import missing_data

    if missing_data():
        pytest.skip("DEDE_DATA_DIR lacks the lab's data files")
    encoder = load_encoder("random:cifar_resnet18", width=8)
    images, _ = load_images("tinyimagenet_val", encoder.identity.input_spec(), 600)
    settings = FitSettings(preset="conv_tiny", batch_size=64, eval_every=20, patience=3, max_steps=3000)
    fit_decoder(encoder, images, tmp_path / "run", settings)
    result = json.loads((tmp_path / "run" / "run.json").read_text())["result"]
    assert result["converged"] and result["stop_reason"].startswith("validation plateau"), result
    assert result["steps"] < 3000 and result["best_val_loss"] < 1.0
    assert load_run(tmp_path / "run").feature_stats["n_images"] == 60
    assert set(result["aux_embeddings"]) == {"median_cosine_to_mean", "p10_cosine_to_mean", "collapsed"}


def test_both_rules_export_and_a_fitted_run_restates_its_statistics_for_the_other(
    tiny_data: dict[str, Path], tmp_path: Path
) -> None:
    """A CIFAR ResNet fitted under mean_stages exports with parity; asked again for max_all, the
    fitted run makes its statistics again from the same held-out images (decoder untouched), and
    max_all's graph (pixels at four scales + stages, max) exports with parity, the same score at any
    batch."""
    encoder, aux, clean, settings = _small_cifar_fit(tiny_data)
    run_dir = tmp_path / "run"
    fit_decoder(encoder, aux, run_dir, replace(settings, feature_rule="mean_stages"))
    stats = load_run(run_dir).feature_stats
    assert stats["combine"] == "mean" and stats["pixel_factors"] == [] and stats["depths"] == stats["stages"]
    calibrate_run(run_dir, clean, 0.05, "clean.npz")
    manifest = export_bundle(load_run(run_dir), tmp_path / "mean_stages")
    assert manifest.decoder.score == "feature_robust_z_mean"
    assert manifest.parity["max_relative_diff_ort_vs_torch"] <= 1e-4

    weights = (run_dir / "decoder.safetensors").read_bytes()
    fit_decoder(encoder, aux, run_dir, replace(settings, feature_rule="max_all"))
    restated = load_run(run_dir).feature_stats
    assert restated["combine"] == "max"
    assert restated["depths"] == ["pixels/1", "pixels/2", "pixels/4", "pixels/8", *stats["stages"]]
    assert (
        restated["centre"][4:] == pytest.approx(stats["centre"]) and restated["n_images"] == stats["n_images"]
    )
    assert (run_dir / "decoder.safetensors").read_bytes() == weights
    calibrate_run(run_dir, clean, 0.05, "clean.npz")
    bundle = tmp_path / "max_all"
    manifest = export_bundle(load_run(run_dir), bundle)
    assert manifest.decoder.score == "depths_robust_z_max" and manifest.decoder.feature["combine"] == "max"
    assert (
        manifest.parity["max_relative_diff_ort_vs_torch"] <= 1e-4 and manifest.parity["flag_mismatches"] == 0
    )
    batched = _ort_scores(bundle, clean[:24], 24)
    assert np.array_equal(batched, _ort_scores(bundle, clean[:24], 1))
    assert np.allclose(batched, score_run(load_run(run_dir), clean[:24]), rtol=1e-4, atol=1e-4)

    fit_decoder(encoder, aux, run_dir, replace(settings, feature_rule="max_all_tail"))
    tail = load_run(run_dir).feature_stats
    assert tail["rule"].startswith("max_all_tail:") and tail["depths"] == restated["depths"]
    assert tail["centre"] == pytest.approx(restated["centre"]) and tail["scale"] != restated["scale"]
    calibrate_run(run_dir, clean, 0.05, "clean.npz")
    manifest = export_bundle(load_run(run_dir), tmp_path / "max_all_tail")
    assert manifest.decoder.score == "depths_tail_z_max" and manifest.parity["flag_mismatches"] == 0

    fit_decoder(encoder, aux, run_dir, replace(settings, feature_rule="max_all_relative"))
    relative = load_run(run_dir).feature_stats
    assert relative["rule"].startswith("max_all_relative:") and relative["discrepancy"] == "relative"
    assert relative["depths"] == restated["depths"] and relative["centre"] != pytest.approx(
        restated["centre"]
    )
    assert (run_dir / "decoder.safetensors").read_bytes() == weights
    # Exported from a decoder that has learnt something (test_onnx_encoder_with_named_tensors_end_to_end
    # says why 20 steps are not enough for this rule's parity check).
    run_dir = tmp_path / "relative_run"
    fit_decoder(encoder, aux, run_dir, replace(settings, max_steps=200, feature_rule="max_all_relative"))
    calibrate_run(run_dir, clean, 0.05, "clean.npz")
    bundle = tmp_path / "max_all_relative"
    manifest = export_bundle(load_run(run_dir), bundle)
    assert manifest.decoder.score == "depths_relative_robust_z_max"
    assert manifest.decoder.feature["discrepancy"] == "relative"
    assert (
        manifest.parity["max_relative_diff_ort_vs_torch"] <= 1e-4 and manifest.parity["flag_mismatches"] == 0
    )
    batched = _ort_scores(bundle, clean[:24], 24)
    assert np.array_equal(batched, _ort_scores(bundle, clean[:24], 1))
    assert np.allclose(batched, score_run(load_run(run_dir), clean[:24]), rtol=1e-4, atol=1e-4)
    relative_scores, relative_stats = batched, load_run(run_dir).feature_stats

    # Both views of every depth: the squared depths, then the same depths relative, max of all.
    fit_decoder(encoder, aux, run_dir, replace(settings, max_steps=200, feature_rule="max_all_both"))
    both = load_run(run_dir).feature_stats
    assert both["depths"] == restated["depths"] + [f"{d} relative" for d in restated["depths"]]
    half = len(restated["depths"])
    assert both["centre"][half:] == pytest.approx(relative_stats["centre"], rel=1e-6)
    assert both["scale"][half:] == pytest.approx(relative_stats["scale"], rel=1e-6)
    calibrate_run(run_dir, clean, 0.05, "clean.npz")
    bundle = tmp_path / "max_all_both"
    manifest = export_bundle(load_run(run_dir), bundle)
    assert manifest.decoder.score == "depths_both_robust_z_max" and manifest.parity["flag_mismatches"] == 0
    batched = _ort_scores(bundle, clean[:24], 24)
    assert np.array_equal(batched, _ort_scores(bundle, clean[:24], 1))
    assert np.allclose(batched, score_run(load_run(run_dir), clean[:24]), rtol=1e-4, atol=1e-4)
    assert (batched >= relative_scores - 1e-4).all()  # the max over a superset of this run's z-scores

    # The same fourteen z-scores, each view's divided by its max's clean upper tail: restated from
    # the same decoder in seconds, exported with parity, the same score at any batch size.
    fit_decoder(encoder, aux, run_dir, replace(settings, max_steps=200, feature_rule="max_all_both_balanced"))
    balanced = load_run(run_dir).feature_stats
    assert balanced["depths"] == both["depths"] and balanced["centre"] == pytest.approx(both["centre"])
    factors = np.array(balanced["scale"]) / np.array(both["scale"])
    assert np.allclose(factors[:half], factors[0]) and np.allclose(factors[half:], factors[half])
    assert min(factors[0], factors[half]) >= 1.0
    calibrate_run(run_dir, clean, 0.05, "clean.npz")
    bundle = tmp_path / "max_all_both_balanced"
    manifest = export_bundle(load_run(run_dir), bundle)
    assert manifest.decoder.score == "depths_both_balanced_z_max" and manifest.parity["flag_mismatches"] == 0
    assert manifest.parity["max_relative_diff_ort_vs_torch"] <= 1e-4
    balanced_scores = _ort_scores(bundle, clean[:24], 24)
    assert np.array_equal(balanced_scores, _ort_scores(bundle, clean[:24], 1))
    assert np.allclose(balanced_scores, score_run(load_run(run_dir), clean[:24]), rtol=1e-4, atol=1e-4)


def test_relative_discrepancy_matches_a_float64_reference() -> None:
    from models.detector import compared, depth_discrepancies

    rng = np.random.default_rng(0)
    x, rebuild = rng.normal(size=(2, 4, 3, 16, 16))
    maps_a, maps_b = rng.normal(size=(2, 4, 8, 4, 4)) * 3.0

    def reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        return ((a - b) ** 2).mean(1) / ((a**2).mean(1) + (b**2).mean(1))

    def pooled(t: np.ndarray, k: int) -> np.ndarray:
        n, c, h, w = t.shape
        return t.reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5))

    expected = np.column_stack(
        [reference(pooled(x, k), pooled(rebuild, k)) for k in (1, 2, 4)] + [reference(maps_a, maps_b)]
    )
    t = lambda v: torch.from_numpy(v.astype(np.float32))  # noqa: E731
    got = depth_discrepancies(t(x), t(rebuild), [t(maps_a)], [t(maps_b)], (1, 2, 4), "relative")
    assert np.allclose(got.numpy(), expected, rtol=1e-5)
    # Scale-free and bounded: the same for maps scaled alike, 0 for equal maps, 2 for opposite ones,
    # 1 against a zero map; no division by zero for two zero maps.
    a, b = t(maps_a), t(maps_b)
    assert torch.allclose(compared(a, b, "relative"), compared(100 * a, 100 * b, "relative"), rtol=1e-5)
    assert torch.allclose(compared(a, a, "relative"), torch.zeros(4))
    assert torch.allclose(compared(a, -a, "relative"), torch.full((4,), 2.0))
    assert torch.allclose(compared(a, torch.zeros_like(a), "relative"), torch.ones(4))
    assert torch.equal(compared(torch.zeros(2, 5), torch.zeros(2, 5), "relative"), torch.zeros(2))
    with pytest.raises(ValueError, match="not one of"):
        compared(a, b, "cosine")


def test_an_unknown_feature_rule_is_refused_before_any_training(tmp_path: Path) -> None:
    from training.fit import RunError

    encoder = load_encoder("random:cifar_resnet18", width=8)
    images = np.zeros((16, 3, 32, 32), np.uint8)
    with pytest.raises(RunError, match="unknown feature rule 'median'"):
        fit_decoder(encoder, images, tmp_path / "run", FitSettings(preset="conv_tiny", feature_rule="median"))
    assert not (tmp_path / "run" / "log.csv").exists()


def test_embedding_spread_tells_a_collapsed_encoder_from_a_spread_one() -> None:
    from training.fit import embedding_spread

    rng = np.random.default_rng(0)
    spread = rng.random((500, 64))  # non-negative, as after a ReLU and pooling: cosines near 0.75
    shared = rng.random(64)
    collapsed = shared + 0.01 * rng.random((500, 64))  # one embedding, a little noise
    assert (
        not embedding_spread(spread)["collapsed"] and embedding_spread(spread)["median_cosine_to_mean"] < 0.9
    )
    assert embedding_spread(collapsed)["collapsed"]
    # Scale does not matter (a warp backdoor inflated the norms 12x): only directions count.
    varied_norms = collapsed * rng.uniform(1, 20, (500, 1))
    assert embedding_spread(varied_norms) == embedding_spread(collapsed)


def test_a_fit_that_learnt_nothing_is_named_as_such(
    tiny_data: dict[str, Path], tmp_path: Path, capsys
) -> None:
    from training.fit import NARROW_SPREAD, narrow_spread

    stats = {"depths": ["pixels/1", "layer2"], "centre": [1.0, 2.0], "scale": [0.2, 0.01]}
    why = narrow_spread(stats)
    assert why is not None and "layer2 is 0.50% of its level" in why and "learnt little" in why
    assert narrow_spread({**stats, "scale": [0.2, 2 * NARROW_SPREAD * 2.0]}) is None
    assert narrow_spread(None) is None

    # A random encoder and 20 steps: every rebuild is about as far from its input (spread ~0.1%).
    encoder = load_encoder("random:cifar_resnet18", width=8)
    aux, _ = load_images(str(tiny_data["aux"]), encoder.identity.input_spec())
    settings = FitSettings(preset="conv_tiny", max_steps=20, batch_size=64, eval_every=10)
    fit_decoder(encoder, aux, tmp_path / "run", replace(settings, feature_rule="max_all_relative"))
    assert "warning: the feature score's clean spread at" in capsys.readouterr().out


def test_calibration_standardises_each_depth_on_the_images_that_set_the_threshold(
    tiny_data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dede calibrate --standardise-on calibration`: each depth's median and 1.4826 MAD are those of
    the calibration images, which set the threshold (checked against numpy on the same
    images), the auxiliary ones are kept beside and come back on request, the graph exports with
    parity and the same score at any batch size, too few images keep the auxiliary statistics, and
    an export whose statistics changed after calibration is refused."""
    from training.cli import main as dede
    from training.export import ExportError
    from training.fit import MIN_STANDARDISE_IMAGES, depth_discrepancies

    encoder, aux, clean, settings = _small_cifar_fit(tiny_data)
    run_dir = tmp_path / "run"
    fit_decoder(encoder, aux, run_dir, settings)
    auxiliary = load_run(run_dir).feature_stats

    result = calibrate_run(run_dir, clean, 0.05, "clean.npz", standardise_on="calibration")
    standardised = result["feature_standardisation"]
    assert standardised["on"] == "calibration" and standardised["n_images"] == 300
    sets_threshold = clean  # every calibration image sets the threshold (two folds check it)
    run = load_run(run_dir)
    d = depth_discrepancies(
        encoder,
        run.head("sse"),
        auxiliary["stages"],
        sets_threshold,
        torch.device("cpu"),
        pixel_factors=(1, 2, 4, 8),
    )
    roots = np.sqrt(np.sqrt(d.astype(np.float64)))
    centre = np.median(roots, axis=0)
    stats = run.feature_stats
    assert stats["centre"] == pytest.approx(centre.tolist(), rel=1e-6)
    assert stats["scale"] == pytest.approx(
        (1.4826 * np.median(np.abs(roots - centre), axis=0)).tolist(), rel=1e-5
    )
    assert stats["auxiliary"]["centre"] == auxiliary["centre"] and stats["centre"] != auxiliary["centre"]
    assert stats["source"].startswith("calibration images (clean.npz)")
    # Where these images sit at each depth in the auxiliary images' units, as depth_shift.py measures it.
    shift = np.median((roots - np.array(auxiliary["centre"])) / np.array(auxiliary["scale"]), axis=0)
    recorded = standardised["median_z_in_auxiliary_units"]
    assert list(recorded) == auxiliary["depths"]
    assert list(recorded.values()) == pytest.approx(shift.tolist(), abs=1e-3)
    widest = int(np.argmax(np.abs(shift)))
    assert standardised["widest_shift"]["depth"] == auxiliary["depths"][widest]
    # The threshold is a quantile of the scores under these statistics, on the images that set it.
    scores = score_run(run, clean)
    assert result["threshold"]["n_calibration"] == 300
    assert (scores > result["threshold"]["value"]).mean() <= 0.05

    bundle = tmp_path / "calibrated"
    manifest = export_bundle(load_run(run_dir), bundle)
    assert (
        manifest.parity["max_relative_diff_ort_vs_torch"] <= 1e-4 and manifest.parity["flag_mismatches"] == 0
    )
    assert manifest.decoder.feature["centre"] == stats["centre"]
    batched = _ort_scores(bundle, clean[:24], 24)
    assert np.array_equal(batched, _ort_scores(bundle, clean[:24], 1))
    assert np.allclose(batched, scores[:24], rtol=1e-4, atol=1e-4)

    # Back to the auxiliary statistics, from the command line.
    calibration = tmp_path / "clean.npz"
    np.savez(calibration, x=clean.transpose(0, 2, 3, 1), y=np.zeros(len(clean), np.int64))
    back = ["calibrate", "--run", str(run_dir), "--data", str(calibration), "--fpr", "0.05"]
    assert dede([*back, "--standardise-on", "auxiliary"]) == 0
    assert f"standardised on the auxiliary images ({auxiliary['n_images']})" in capsys.readouterr().out
    restored = load_run(run_dir).feature_stats
    assert restored == auxiliary
    # Images far from the auxiliary ones (uniform noise against smooth images), with the auxiliary
    # statistics named: the command says so, and names the option.
    noise = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", x=noise, y=np.zeros(len(noise), np.int64))
    noise_args = ["calibrate", "--run", str(run_dir), "--data", str(tmp_path / "noise.npz"), "--fpr", "0.05"]
    assert dede([*noise_args, "--standardise-on", "auxiliary"]) == 0
    out = capsys.readouterr().out
    assert "robust units from the auxiliary images' median" in out and "--standardise-on calibration" in out

    # Too few images to standardise on: the auxiliary statistics stay, and the calibration says why.
    few = clean[: MIN_STANDARDISE_IMAGES - 1]
    result = calibrate_run(run_dir, few, 0.05, "few", standardise_on="calibration")
    assert (
        result["feature_standardisation"]["on"] == "auxiliary"
        and "under the 100" in result["feature_standardisation"]["note"]
    )
    assert load_run(run_dir).feature_stats == auxiliary

    # Statistics restated after the threshold was set (a fit asked for another rule): refused.
    calibrate_run(run_dir, clean, 0.05, "clean.npz", standardise_on="calibration")
    fit_decoder(encoder, aux, run_dir, replace(settings, feature_rule="max_all_tail"))
    with pytest.raises(ExportError, match="changed after its threshold was set"):
        export_bundle(load_run(run_dir), tmp_path / "stale")
    with pytest.raises(SystemExit):
        dede(["calibrate", "--run", str(run_dir), "--holdout", "--standardise-on", "traffic"])
    capsys.readouterr()
    # The pixel score has no per-depth statistics: the option is said to do nothing there.
    args = [
        "calibrate",
        "--run",
        str(run_dir),
        "--holdout",
        "--score",
        "sse",
        "--standardise-on",
        "calibration",
    ]
    assert dede(args) == 0
    assert "applies to the feature score only" in capsys.readouterr().out


def test_auto_standardisation_opens_only_where_the_auxiliary_units_miss_the_calibration_images(
    tiny_data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dede calibrate --standardise-on auto` (the tenth rule test's candidate): the fit's own
    auxiliary images sit near the auxiliary median, so their statistics stay; uniform noise
    sits a unit or more away at some depth, so the noise images' own statistics are taken, exactly
    as `--standardise-on calibration` takes them; the command says which and why."""
    from training.cli import main as dede
    from training.fit import SHIFT_NOTE_UNITS

    encoder, aux, _, settings = _small_cifar_fit(tiny_data)
    run_dir = tmp_path / "run"
    fit_decoder(encoder, aux, run_dir, settings)
    auxiliary = load_run(run_dir).feature_stats

    # The auxiliary images themselves (the held-out split alone is under the 100 images needed).
    np.savez(tmp_path / "aux.npz", x=aux.transpose(0, 2, 3, 1), y=np.zeros(len(aux), np.int64))
    near_args = ["calibrate", "--run", str(run_dir), "--data", str(tmp_path / "aux.npz"), "--fpr", "0.05"]
    assert dede(near_args) == 0  # auto, the default
    out = capsys.readouterr().out
    near = json.loads((run_dir / "calibration.json").read_text())["feature_standardisation"]
    assert near["on"] == "auxiliary" and near["asked"] == "auto"
    assert abs(near["widest_shift"]["median_z"]) < SHIFT_NOTE_UNITS
    assert "(auto: the widest depth shift" in out and "is under 1)" in out
    assert load_run(run_dir).feature_stats == auxiliary

    noise = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", x=noise, y=np.zeros(len(noise), np.int64))
    args = ["calibrate", "--run", str(run_dir), "--data", str(tmp_path / "noise.npz"), "--fpr", "0.05"]
    assert dede([*args, "--standardise-on", "auto"]) == 0
    out = capsys.readouterr().out
    far = json.loads((run_dir / "calibration.json").read_text())
    assert far["feature_standardisation"]["on"] == "calibration"
    assert abs(far["feature_standardisation"]["widest_shift"]["median_z"]) >= SHIFT_NOTE_UNITS
    assert "reaches 1)" in out and "robust units from the auxiliary images' median" not in out
    opened = load_run(run_dir).feature_stats
    assert opened["centre"] != auxiliary["centre"] and opened["auxiliary"]["centre"] == auxiliary["centre"]
    # The bundle's manifest says whose statistics it carries and why.
    manifest = export_bundle(load_run(run_dir), tmp_path / "auto")
    assert manifest.decoder.feature["centre"] == opened["centre"]
    assert manifest.decoder.feature["standardised_on"].startswith("calibration images (asked: auto;")
    # The same statistics and threshold as asking for the calibration images outright.
    assert dede([*args, "--standardise-on", "calibration"]) == 0
    capsys.readouterr()
    assert load_run(run_dir).feature_stats == opened
    outright = json.loads((run_dir / "calibration.json").read_text())
    assert outright["threshold"]["value"] == far["threshold"]["value"]


def test_the_manifest_says_whose_statistics_and_why_even_for_runs_calibrated_before_the_shift() -> None:
    """The bundle's feature spec names the images its statistics come from, what was asked and the
    widest depth shift; a run calibrated before the shift was recorded exports without it."""
    from types import SimpleNamespace

    from training.export import _feature_spec

    stats = {
        "stages": ["layer2"],
        "centre": [1.0],
        "scale": [0.1],
        "n_images": 200,
        "source": "x",
        "rule": "r",
    }
    run = SimpleNamespace(feature_stats=stats)
    shift = {"depth": "layer3", "median_z": -1.29}
    spec = _feature_spec(run, {"on": "calibration", "asked": "auto", "widest_shift": shift})
    assert spec["standardised_on"] == (
        "calibration images (asked: auto; the calibration images' widest depth shift -1.29 auxiliary units, at layer3)"
    )
    assert _feature_spec(run, {"on": "auxiliary"})["standardised_on"] == "auxiliary images (asked: auxiliary)"
    assert "standardised_on" not in _feature_spec(run, None)
