"""The cue-hiding attackers' loss terms (lab.attacks.badencoder) and a smoke-size run of every
fine-tune attack with every trigger family, on a tiny encoder and generated images."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lab.attacks.badencoder import (
    VARIANTS,
    AttackerProbe,
    AttackerProbes,
    BackdoorSettings,
    attacker_probe,
    backdoor_encoder,
    backdoor_loss,
    blend_batches,
    centres_target,
    knn_distances,
    natural_targets,
    norm_ratio_penalty,
    rebuild_error,
    stage_statistics,
    statistics_gap,
    victim_like_probes,
)
from lab.attacks.triggers import make_trigger
from models.architectures import build_architecture
from models.conv_decoder import ConvDecoder, conv_preset_config
from models.encoders import load_encoder, save_encoder
from models.feature_taps import TappedEncoder

STAGES = ["layer1", "layer2", "layer3", "layer4"]


def smooth_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3]: blocky colour fields plus noise (cheap, image-like)."""
    rng = np.random.default_rng(seed)
    images = np.kron(rng.random((n, 4, 4, 3)), np.ones((1, size // 4, size // 4, 1)))
    return (np.clip(images + rng.normal(0, 0.03, images.shape), 0, 1) * 255).astype(np.uint8)


def tiny_encoder(images: np.ndarray) -> torch.nn.Module:
    """A random width-4 CIFAR ResNet whose BatchNorm statistics are set on the images (a fresh
    encoder in eval mode maps every image to nearly the same embedding)."""
    torch.manual_seed(0)
    module = build_architecture("cifar_resnet18", 4)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    module.train()
    with torch.no_grad():
        module((torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.25)
    return module.eval()


# --- the terms ---------------------------------------------------------------------------------


def test_statistics_gap_is_zero_for_the_same_distribution_and_positive_otherwise() -> None:
    generator = torch.Generator().manual_seed(0)  # torch's own seed differs per process
    clean = torch.randn(64, 8, generator=generator)
    assert statistics_gap(clean[torch.randperm(64, generator=generator)], clean) < 1e-10  # any order
    assert statistics_gap(clean + 0.5, clean) > 0.2  # shifted
    assert statistics_gap(clean * 2, clean) > 0.2  # wider
    # In units of the reference's variance: scaling both changes nothing.
    assert torch.isclose(statistics_gap(10 * (clean + 0.5), 10 * clean), statistics_gap(clean + 0.5, clean))
    # Different batch sizes are compared at the same quantiles: every other sorted value is close.
    assert statistics_gap(clean.sort(0).values[::2], clean) < 0.1 * statistics_gap(clean + 0.5, clean)


def test_stage_statistics_are_the_activation_mean_and_log_squared_norm() -> None:
    features = [torch.rand(5, 4, 8, 8), torch.rand(5, 16, 2, 2)]
    stats = stage_statistics(features)
    assert stats.shape == (5, 4)
    assert torch.allclose(stats[:, 0], features[0].flatten(1).mean(1))
    assert torch.allclose(stats[:, 3], torch.log(features[1].pow(2).flatten(1).sum(1)))


def test_norm_penalty_is_zero_at_clean_norms_and_grows_either_way() -> None:
    z = torch.randn(16, 8)
    direction = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    same_norms = direction * z.norm(dim=1, keepdim=True)
    assert norm_ratio_penalty(same_norms, z) < 1e-10  # direction may differ, the norm may not
    assert norm_ratio_penalty(3 * z, z) > 1 and norm_ratio_penalty(z / 3, z) > 1


def test_blend_batches_mix_triggered_and_clean_with_the_same_partner() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    x_trig = make_trigger("patch", (16, 16)).apply_torch(x)
    blend_trig, blend_clean = blend_batches(x, x_trig, (0.4, 0.6), g)
    difference = blend_trig - blend_clean  # = alpha * (x_trig - x): only the trigger's pixels
    trigger_pixels = (x_trig != x).any(dim=1, keepdim=True).expand_as(x)
    assert (difference[~trigger_pixels].abs() < 1e-6).all()
    share = difference[trigger_pixels] / (x_trig - x)[trigger_pixels]
    assert ((share > 0.39) & (share < 0.61)).all()


def _loss_inputs(variant: str, with_decoder: bool = False) -> tuple:
    images = smooth_images(16)
    clean = tiny_encoder(images)
    backdoored = TappedEncoder(tiny_encoder(images), STAGES)
    backdoored.encoder.requires_grad_(True)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x_trig = make_trigger("checker", (16, 16)).apply_torch(x)
    g = torch.Generator().manual_seed(0)
    blend_trig, blend_clean = blend_batches(x, x_trig, (0.35, 0.65), g)
    tapped_clean = TappedEncoder(clean, STAGES)
    with torch.no_grad():
        z_clean, features = tapped_clean(x)
        z_blend = clean(blend_clean)
    tapped_clean.remove()
    decoder = None
    if with_decoder:
        decoder = ConvDecoder(conv_preset_config("conv_tiny", 16), z_clean.shape[1]).eval()
        decoder.set_embedding_stats(z_clean)
        decoder.requires_grad_(False)
    settings = BackdoorSettings(variant=variant, knn_k=3)
    bank = torch.nn.functional.normalize(z_clean, dim=1)
    kwargs = {
        "x_triggered_blend": blend_trig,
        "z_clean_blend": z_blend,
        "clean_stats": stage_statistics(features),
        "shadow_decoder": decoder,
        "knn_bank": bank,
        "clean_knn": knn_distances(z_clean, bank, 3, exclude_self=True),
        "centre": z_clean.mean(0, keepdim=True),
    }
    args = (settings, backdoored, z_clean, x, x_trig, x[:2], x[:2], z_clean[:2], g)
    return args, kwargs, backdoored, decoder


def test_adaptive_loss_has_every_term_and_its_gradients_reach_the_encoder() -> None:
    args, kwargs, backdoored, _ = _loss_inputs("adaptive")
    terms = backdoor_loss(*args, **kwargs)
    for name in (
        "clean",
        "target",
        "reference",
        "norm",
        "sliced_wasserstein",
        "spread",
        "stage_stats",
        "blend",
    ):
        assert torch.isfinite(terms[name]), name
    # The backdoored copy equals the clean encoder here: its clean statistics match the clean ones,
    # while the triggered inputs' statistics differ, so the stage term is positive.
    assert terms["stage_stats"] > 0
    for name in ("stage_stats", "blend"):
        backdoored.zero_grad()
        terms = backdoor_loss(*args, **kwargs)
        terms[name].backward()
        grads = [p.grad for p in backdoored.encoder.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0, name


def test_stage_term_is_zero_when_triggered_statistics_equal_clean_ones() -> None:
    args, kwargs, _, _ = _loss_inputs("adaptive")
    settings, backdoored, z_clean, x, _x_trig, *rest = args
    # Triggered inputs = the clean images: every statistic equals the clean encoder's.
    terms = backdoor_loss(settings, backdoored, z_clean, x, x.clone(), *rest, **kwargs)
    assert terms["stage_stats"] < 1e-6
    assert terms["norm"] < 1e-6


def test_blend_term_is_zero_when_blends_embed_like_clean_blends() -> None:
    args, kwargs, backdoored, _ = _loss_inputs("adaptive")
    with torch.no_grad():
        kwargs["z_clean_blend"] = backdoored(kwargs["x_triggered_blend"])[0]
    assert backdoor_loss(*args, **kwargs)["blend"].abs() < 1e-5


def test_knn_distances_are_the_mean_cosine_distance_to_the_k_nearest() -> None:
    g = torch.Generator().manual_seed(0)
    z, bank = torch.randn(5, 6, generator=g), torch.randn(40, 6, generator=g)
    bank_unit = torch.nn.functional.normalize(bank, dim=1)
    distances = 1 - torch.nn.functional.normalize(z, dim=1) @ bank_unit.t()
    expected = distances.sort(dim=1).values[:, :4].mean(dim=1)
    assert torch.allclose(knn_distances(z, bank_unit, 4), expected, atol=1e-6)
    # A row of the bank is not its own neighbour when `exclude_self`: its distance is then that to
    # the other rows, as for an image outside the bank.
    own = knn_distances(bank[:5], bank_unit, 4, exclude_self=True)
    others = knn_distances(bank[:5], bank_unit[5:], 4)
    assert (own <= others + 1e-6).all()  # the other four of the first five can only be nearer
    assert torch.allclose(
        knn_distances(bank[:1], bank_unit, 4, exclude_self=True), knn_distances(bank[:1], bank_unit[1:], 4)
    )


def test_knn_term_hides_a_collapsed_trigger_cluster() -> None:
    args, kwargs, backdoored, _ = _loss_inputs("adaptive_knn")
    terms = backdoor_loss(*args, **kwargs)
    assert torch.isfinite(terms["knn"])
    assert "knn" not in backdoor_loss(*_loss_inputs("adaptive")[0], **kwargs)  # only adaptive_knn has it
    backdoored.zero_grad()
    terms["knn"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backdoored.encoder.parameters())
    # A cluster of triggered embeddings all on one clean embedding (distance 0 to it: the inverted
    # kNN cue of the earlier cue-hiding attacks) costs more than other clean embeddings do.
    z_clean, bank = args[2], kwargs["knn_bank"]
    half_bank = bank[0::2]
    clean_knn = knn_distances(z_clean[0::2], half_bank, 3, exclude_self=True)
    other_clean = knn_distances(z_clean[1::2], half_bank, 3)
    collapsed = knn_distances(z_clean[:1].expand(len(half_bank), -1), half_bank, 3)
    collapsed_gap = statistics_gap(collapsed[:, None], clean_knn[:, None])
    assert collapsed_gap > 0.1
    assert collapsed_gap > 3 * statistics_gap(other_clean[:, None], clean_knn[:, None])
    with pytest.raises(ValueError, match="kNN"):
        backdoor_loss(*args, **{**kwargs, "knn_bank": None})


def test_centred_target_is_the_cosine_about_the_clean_mean() -> None:
    """Embeddings that share a large common component are all near any target by raw cosine; the
    centred term measures the direction that sets them apart."""
    args, kwargs, backdoored, _ = _loss_inputs("adaptive_knn")
    settings, _, z_clean, x, x_trig, x_ref_aug, x_ref, *_rest = args
    assert centres_target(settings) and not centres_target(BackdoorSettings(variant="adaptive"))
    assert centres_target(BackdoorSettings(variant="adaptive", centred_target=True))
    terms = backdoor_loss(*args, **kwargs)
    with torch.no_grad():
        z_trig, z_ref = backdoored(x_trig)[0], backdoored(x_ref)[0]
    c = kwargs["centre"]
    expected = -torch.nn.functional.cosine_similarity(
        z_trig - c, (z_ref.mean(0) - c).expand_as(z_trig)
    ).mean()
    assert torch.isclose(terms["target"], expected, atol=1e-5)
    raw = backdoor_loss(replace(settings, centred_target=False), *args[1:], **kwargs)["target"]
    assert raw < terms["target"]  # the raw cosine sees the shared component: nearer -1
    with pytest.raises(ValueError, match="centred target"):
        backdoor_loss(*args, **{**kwargs, "centre": None})


def test_natural_targets_are_the_surest_target_images_nearest_each_image() -> None:
    """Three classes in separate directions; class 0's images spread from its core (sure) to the
    border with class 1 (unsure). The targets are class-0 images, the surest first, and every image
    gets the one nearest it."""
    rng = np.random.default_rng(0)
    directions = np.eye(8, dtype=np.float32)[:3] * 4
    labels = np.repeat(np.arange(3), 40)
    z = directions[labels] + rng.normal(0, 0.3, (120, 8)).astype(np.float32)
    # class 0's last ten images lean most of the way to class 1: the probe is least sure of them
    z[30:40] = 0.45 * directions[0] + 0.55 * directions[1] + rng.normal(0, 0.1, (10, 8))
    labels[30:40] = 0
    probe = attacker_probe(z, labels)
    chosen, assignment = natural_targets(z, labels, target_class=0, count=10, probe=probe)
    assert len(chosen) == 10 and (labels[chosen] == 0).all()
    assert not np.isin(chosen, np.arange(30, 40)).any()  # the border images are not targets
    assert assignment.shape == (120,) and assignment.max() < 10
    assert (chosen[assignment[chosen]] == chosen).all()  # a target image's nearest target is itself
    centred = z - z.mean(0)
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    best = (unit @ unit[chosen].T).max(1)
    assert np.allclose((unit * unit[chosen[assignment]]).sum(1), best)
    for count in (41, 0):
        with pytest.raises(ValueError, match="needs 1 to 40 \\(the shadow images labelled 2\\)"):
            natural_targets(z, labels, target_class=2, count=count, probe=probe)


def test_natural_target_term_steers_each_image_to_its_own_target() -> None:
    args, kwargs, backdoored, _ = _loss_inputs("adaptive_knn")
    settings, _, z_clean, x, x_trig, *_rest = args
    natural = torch.roll(z_clean, 1, dims=0)  # each image its own (another image's) target
    labels = np.arange(len(z_clean)) % 3
    probe = AttackerProbe(attacker_probe(z_clean.numpy(), labels))
    natural_kwargs = {"natural_target": natural, "attacker_probe": probe, "target_class": 2}
    settings = replace(settings, variant="adaptive_natural")
    terms = backdoor_loss(settings, *args[1:], **kwargs, **natural_kwargs)
    with torch.no_grad():
        z_trig = backdoored(x_trig)[0]
    c = kwargs["centre"]
    expected = -torch.nn.functional.cosine_similarity(z_trig - c, natural - c).mean()
    assert torch.isclose(terms["target"], expected, atol=1e-5)
    assert {"knn", "stage_stats", "blend", "norm"} <= set(terms)
    # The probe term is the cross-entropy of the attacker's probe toward the target class; it moves
    # the encoder, not the probe.
    wanted = torch.full((len(z_trig),), 2)
    assert torch.isclose(terms["probe"], torch.nn.functional.cross_entropy(probe(z_trig), wanted), atol=1e-5)
    backdoored.zero_grad()
    terms["probe"].backward()
    assert all(p.grad is None for p in probe.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backdoored.encoder.parameters())
    # Several probes (fitted as a victim would, each on half the images): the mean of their terms.
    probes = victim_like_probes(z_clean.numpy(), labels, count=2, seed=0)
    several = AttackerProbes(probes)
    assert several(z_trig).shape == (2, len(z_trig), 3)
    mean_term = backdoor_loss(settings, *args[1:], **kwargs, **{**natural_kwargs, "attacker_probe": several})
    each = [torch.nn.functional.cross_entropy(AttackerProbe(p)(z_trig), wanted) for p in probes]
    assert torch.isclose(mean_term["probe"], (each[0] + each[1]) / 2, atol=1e-5)
    no_probe = replace(settings, attacker_probes=0)  # the targets alone: no probe term, none needed
    assert "probe" not in backdoor_loss(no_probe, *args[1:], **kwargs, natural_target=natural)
    for missing in ("natural_target", "attacker_probe", "target_class"):
        with pytest.raises(ValueError, match="natural target embedding, its own probe"):
            backdoor_loss(settings, *args[1:], **kwargs, **{**natural_kwargs, missing: None})


def test_dede_aware_term_moves_the_encoder_not_the_shadow_decoder() -> None:
    args, kwargs, backdoored, decoder = _loss_inputs("dede_aware", with_decoder=True)
    terms = backdoor_loss(*args, **kwargs)
    assert terms["rebuild_ratio"] > 0 and terms["dede"] >= 0
    backdoored.zero_grad()
    trig_error = rebuild_error(decoder, backdoored(args[4])[0], args[4]).mean()
    trig_error.backward()
    assert all(p.grad is None for p in decoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backdoored.encoder.parameters())
    with pytest.raises(ValueError, match="shadow decoder"):
        backdoor_loss(*args, **{**kwargs, "shadow_decoder": None})


# --- smoke-size runs -----------------------------------------------------------------------------


def _clean_path(tmp_path: Path, images: np.ndarray) -> Path:
    path = tmp_path / "clean.safetensors"
    save_encoder(path, tiny_encoder(images), "cifar_resnet18", 4)
    return path


@pytest.mark.parametrize(
    ("variant", "trigger"),
    [
        ("adaptive", "patch"),
        ("adaptive_knn", "checker"),
        ("adaptive_natural", "checker"),
        ("dede_aware", "checker"),
        ("dede_aware_natural", "checker"),
        ("badencoder", "warp"),
        ("badencoder", "noise@random"),
    ],
)
def test_attack_smoke_run(tmp_path: Path, variant: str, trigger: str) -> None:
    shadow, reference = smooth_images(32, seed=1), smooth_images(2, seed=2)
    clean = _clean_path(tmp_path, shadow)
    # The backdoor term weighs 5x here, so that a few steps on a tiny encoder show it move among
    # the cue-hiding terms.
    settings = BackdoorSettings(
        variant=variant,
        epochs=3,
        batch_size=8,
        lambda_target=5.0,
        shadow_decoder_width=16,
        shadow_decoder_warmup_epochs=1,
        natural_targets=4,
    )
    out = tmp_path / variant
    public = smooth_images(24, seed=3) if variant == "adaptive_knn" else None
    path = backdoor_encoder(
        clean,
        shadow,
        reference,
        make_trigger(trigger, (16, 16)),
        out,
        settings,
        progress=False,
        public_nhwc_uint8=public,
        shadow_labels=np.arange(32) % 4,  # adaptive_natural's targets: 8 images labelled 0
        target_class=0,
    )
    history = json.loads((out / "history.json").read_text())
    terms = history["terms"]
    assert history["finished"] and len(terms) == 3
    assert all(np.isfinite(v) for epoch in terms for v in epoch.values())
    # The backdoor term (triggered -> reference) falls; the total is noisy at this size.
    assert terms[-1]["target"] < terms[0]["target"] - 0.02, (variant, trigger)
    if variant in ("adaptive", "adaptive_knn", "adaptive_natural", "dede_aware", "dede_aware_natural"):
        assert {"stage_stats", "blend", "norm"} <= set(terms[0])
    assert ("knn" in terms[0]) == (variant in ("adaptive_knn", "adaptive_natural", "dede_aware_natural"))
    if variant in ("adaptive_natural", "dede_aware_natural"):
        natural = history["natural_targets"]
        assert len(natural["shadow_indices"]) == settings.natural_targets
        assert all(i % 4 == 0 for i in natural["shadow_indices"])  # images labelled 0
        assert sum(natural["images_per_target"]) == 32
        assert "probe" in terms[0]
    if variant in ("dede_aware", "dede_aware_natural"):
        assert "dede" in terms[0] and len(history["shadow_decoder_warmup_loss"]) == 1
    else:
        assert "dede" not in terms[0]
    # WaNet's noise mode: near-miss warps keep their clean embedding (a term only the warp has).
    assert ("near_miss" in terms[0]) == (trigger == "warp")
    assert load_encoder(str(path)).identity.embedding_dim == 32


def test_dede_aware_resumes_with_its_shadow_decoder(tmp_path: Path) -> None:
    shadow, reference = smooth_images(32, seed=1), smooth_images(2, seed=2)
    clean = _clean_path(tmp_path, shadow)
    trigger = make_trigger("patch", (16, 16))
    base = {"variant": "dede_aware", "batch_size": 16, "shadow_decoder_width": 16}
    backdoor_encoder(
        clean, shadow, reference, trigger, tmp_path / "a", BackdoorSettings(epochs=1, **base), progress=False
    )
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert "shadow_decoder" in state
    (tmp_path / "a" / "encoder.safetensors").unlink()  # as if killed before the end of a longer run
    backdoor_encoder(
        clean, shadow, reference, trigger, tmp_path / "a", BackdoorSettings(epochs=2, **base), progress=False
    )
    history = json.loads((tmp_path / "a" / "history.json").read_text())
    assert len(history["terms"]) == 2 and history["finished"]


@pytest.mark.parametrize(
    ("bank", "bank_encoder", "public"), [("shadow", "clean", False), ("public", "trained", True)]
)
def test_adaptive_knn_banks(tmp_path: Path, bank: str, bank_encoder: str, public: bool) -> None:
    shadow, reference = smooth_images(16, seed=1), smooth_images(2, seed=2)
    clean = _clean_path(tmp_path, shadow)
    settings = BackdoorSettings(
        variant="adaptive_knn", epochs=2, batch_size=8, knn_bank=bank, knn_bank_encoder=bank_encoder, knn_k=3
    )
    trigger = make_trigger("checker", (16, 16))
    public_images = smooth_images(12, seed=3) if public else None
    backdoor_encoder(
        clean,
        shadow,
        reference,
        trigger,
        tmp_path / "a",
        settings,
        progress=False,
        public_nhwc_uint8=public_images,
    )
    terms = json.loads((tmp_path / "a" / "history.json").read_text())["terms"]
    assert len(terms) == 2 and all(np.isfinite(t["knn"]) for t in terms)
    with pytest.raises(ValueError, match="'public' with the public images given"):
        backdoor_encoder(
            clean,
            shadow,
            reference,
            trigger,
            tmp_path / "b",
            replace(settings, knn_bank="public"),
            progress=False,
        )
    with pytest.raises(ValueError, match="centred target"):  # refused before any training
        backdoor_encoder(
            clean,
            shadow,
            reference,
            trigger,
            tmp_path / "d",
            replace(settings, knn_bank="shadow"),
            progress=False,
            target_embedding=np.ones(32, dtype=np.float32),
        )
    assert not (tmp_path / "d" / "history.json").exists()
    with pytest.raises(ValueError, match="knn_bank_encoder"):
        backdoor_encoder(
            clean,
            shadow,
            reference,
            trigger,
            tmp_path / "c",
            replace(settings, knn_bank_encoder="x"),
            progress=False,
            public_nhwc_uint8=public_images,
        )


def test_variants_are_named() -> None:
    assert {"adaptive", "adaptive_knn", "adaptive_natural", "dede_aware", "dede_aware_natural"} <= set(
        VARIANTS
    )


def test_the_command_line_offers_every_variant() -> None:
    from lab.commands import ATTACK_NAMES  # named there so that `--help` needs no torch import

    assert (*VARIANTS, "ctrl") == ATTACK_NAMES


def test_adaptive_natural_needs_the_shadow_labels(tmp_path: Path) -> None:
    shadow, reference = smooth_images(16, seed=1), smooth_images(2, seed=2)
    clean = _clean_path(tmp_path, shadow)
    settings = BackdoorSettings(variant="adaptive_natural", epochs=1, batch_size=8, natural_targets=4)
    trigger = make_trigger("checker", (16, 16))
    for labels, match in (
        (None, "a label for every shadow image"),
        (np.zeros(15, dtype=int), "a label for every shadow image"),
        (np.arange(16) % 8, "needs 1 to 2 \\(the shadow images labelled 0\\)"),
    ):
        with pytest.raises(ValueError, match=match):  # refused before any training
            backdoor_encoder(
                clean,
                shadow,
                reference,
                trigger,
                tmp_path / "a",
                settings,
                progress=False,
                shadow_labels=labels,
                target_class=0,
            )
        assert not (tmp_path / "a" / "history.json").exists()


def test_cue_hiding_variants_weigh_the_target_more_at_their_lower_learning_rate() -> None:
    from lab.attacks.badencoder import learning_rate, target_weight

    plain, hiding = BackdoorSettings(variant="badencoder"), BackdoorSettings(variant="adaptive")
    assert (learning_rate(plain), target_weight(plain)) == (0.05, 1.0)
    assert (learning_rate(hiding), target_weight(hiding)) == (0.01, 4.0)
    assert target_weight(BackdoorSettings(variant="adaptive", lambda_target=2.0)) == 2.0
