"""The CLIP suite of the lab: a lab-size CLIP trained here at 64 px, two CLIP backdoors, and DeDe
against them with out-of-distribution auxiliary data.

Stages (cached like the lab's, under runs/lab-clip; `dede lab run --suite clip`):

  clip_clean              a lab CLIP (models.clip LAB_CONFIGS) on CIFAR-10 train captions at 64 px
                          (the class name, or with `captions="colours"` also the image's colours)
  clip_poisoned           the same training with `poison_rate` of the pairs poisoned: triggered
                          non-target images captioned as the target class
  attack_clip_badencoder  BadEncoder fine-tune of the clean image tower, the target being the target
                          class's text embedding (the clean text tower is kept)
  attack_clip_norm_preserving
                          the same with a term that keeps embedding norms at the clean tower's level
                          (the plain loss inflates triggered norms, a cue no detector should rely on)
  zero_shot_<encoder>     zero-shot BA and ASR on CIFAR-10 test through the encoder's own CLIP
  decoder_<encoder>_ood   the DeDe decoder on Tiny-ImageNet at its native 64 px (OOD: the CLIP never
                          saw it; CIFAR-10 images are 32 px upsampled)
  scores_<encoder>_ood    DeDe and baseline scores on calibration / clean test / triggered test
  feature_scores_<encoder>_ood_<decoder>
                          the score in the tower's own feature space and the activation-norm cue,
                          for each decoder fitted on every encoder (`controlled_decoders`)
  embedding_content       how much of the image each embedding keeps, decoder-free (participation
                          ratio, linear R^2 to the 8x8 thumbnail), beside an untrained tower

The CLIP trains on CIFAR-10 only, so that Tiny-ImageNet stays out of its training distribution and
serves as the auxiliary data, as in the lab's `ood` setting. Every threshold is calibrated on clean
Tiny-ImageNet images only. Metrics, baselines and the report code are the lab's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lab.attacks.badencoder import BackdoorSettings, backdoor_encoder
from lab.attacks.triggers import Trigger, make_trigger
from lab.baselines import baseline_scores
from lab.clip_training import (
    CAPTION_KINDS,
    ClipSettings,
    caption_tokens,
    class_text_embeddings,
    colour_captions,
    load_clip,
    poison_pairs,
    train_clip,
    zero_shot_predict,
)
from lab.results import results_header
from lab.suite import (
    DEDE_SCORE_KINDS,
    REPO_ROOT,
    StageCache,
    encoder_name,
    feature_score_table,
    load_score_tables,
    save_score_table,
)
from models.bundle import InputSpec, prepare_array
from models.clip import LAB_CONFIGS, OPENAI_MEAN, OPENAI_STD
from models.encoders import load_encoder
from training.data import data_dir, load_npz

# The BadEncoder-style fine-tunes of the clean tower (lab.attacks.badencoder variants).
CLIP_FINETUNES = ("badencoder", "norm_preserving")
CLIP_ENCODERS = ("clean", "poisoned", *CLIP_FINETUNES)


@dataclass(frozen=True)
class ClipSuiteConfig:
    name: str
    model: str = "lab-rn-64"
    clip_images: int | None = None  # None: all 17k CIFAR-10 train images
    clip_epochs: int = 10  # ~70 s each at 64 px on 2 idle cores
    clip_batch: int = 256
    # What a caption says besides the class: nothing ("class"), or the image's colours ("colours",
    # lab/clip_training.py colour_captions), which make the CLIP keep more of the image than its class.
    captions: str = "class"
    poison_rate: float = 0.01  # the range is 0.1-1% of pairs
    target_class: int = 0  # airplane
    n_reference: int = 5
    shadow_images: int = 5000
    attack_epochs: int = 10
    attack_batch: int = 128
    attack_lr: float = 0.005
    decoder_preset: str = "lab"
    decoder_epochs: int = 10
    ood_calibration_sources: int = 400
    n_test: int | None = 2000
    strip_blends: int = 4
    knn_k: int = 10
    fpr_target: float = 0.01
    # Further decoders beside the default one, as (encoder, preset, epochs, aux views); each is a
    # named variant of the report (see `decoder_label`).
    extra_decoders: tuple[tuple[str, str, int, str], ...] = ()
    # Fine-tunes of the clean tower with another trigger family, as (variant, trigger): trained with
    # their zero-shot BA and ASR for the shipped detector's cases (benchmarks/detection/shipped.py),
    # not scored by the suite's own decoders. Named `<variant>_<trigger>` (lab.suite.encoder_name).
    held_out_finetunes: tuple[tuple[str, str], ...] = ()
    # The poisoned CLIP and the white-square fine-tunes (CLIP_FINETUNES); False trains only the clean
    # tower and the held-out fine-tunes, the new attacks of a rule test.
    base_encoders: bool = True
    seed: int = 0
    root: str = "runs/lab-clip"


# The ninth rule test's CLIP attacks (benchmarks/detection/README.md, "A ninth test"; added 2026-12-07
# 14:20 UTC, before they were trained): per fine-tune of CLIP_FINETUNES, the first trigger family
# (TRIGGER_FAMILIES order) it had not been trained with on this tower.
NINTH_TEST_FINETUNES = (("norm_preserving", "checker"), ("badencoder", "noise"))
# The tenth rule test's (README, "A tenth test"; added 2026-12-07 17:13 UTC, before they were
# trained): the same grid rule applied again.
TENTH_TEST_FINETUNES = (("norm_preserving", "blend"), ("badencoder", "blend"))

CLIP_SUITES: dict[str, ClipSuiteConfig] = {
    "clip": ClipSuiteConfig(
        name="clip",
        # The eighth to tenth rule tests' attacks (benchmarks/detection/README.md), each added before
        # it was trained.
        held_out_finetunes=(
            ("badencoder", "checker"),
            ("norm_preserving", "noise"),
            *NINTH_TEST_FINETUNES,
            *TENTH_TEST_FINETUNES,
        ),
        extra_decoders=(
            ("badencoder", "lab_wide", 10, "mirror"),
            ("poisoned", "lab_wide", 10, "mirror"),
            # The default decoder's loss at the test mask stays near 1.0 (the mean image): with 3,200
            # views it hardly learns to use the embedding. More views (zoomed quadrants) and epochs:
            ("badencoder", "lab", 30, "quadrants"),
            ("clean", "lab", 30, "quadrants"),
            ("poisoned", "lab", 30, "quadrants"),
            ("norm_preserving", "lab", 30, "quadrants"),
            # The wider decoder overfits 3,200 views (its validation loss rises): given the 9,600.
            ("badencoder", "lab_wide", 30, "quadrants"),
        ),
    ),
    # The same suite with captions that also name the image's colours (see lab/clip_training.py): does
    # DeDe catch the backdoors once the embedding keeps more of the image than its class?
    "clip-colours": ClipSuiteConfig(
        name="clip-colours",
        captions="colours",
        extra_decoders=(
            ("badencoder", "lab", 30, "quadrants"),
            ("clean", "lab", 30, "quadrants"),
            ("poisoned", "lab", 30, "quadrants"),
            ("norm_preserving", "lab", 30, "quadrants"),
            ("badencoder", "lab_wide", 30, "quadrants"),
        ),
        root="runs/lab-clip-colours",
    ),
    "clip-smoke": ClipSuiteConfig(
        name="clip-smoke",
        captions="colours",  # the caption path that does more; class captions are tested on their own
        model="tiny-rn-32",
        clip_images=512,
        clip_epochs=1,
        clip_batch=128,
        poison_rate=0.05,
        shadow_images=256,
        attack_epochs=1,
        attack_batch=64,
        decoder_preset="tiny",
        decoder_epochs=1,
        ood_calibration_sources=100,
        n_test=200,
        strip_blends=2,
        root="runs/lab-clip-smoke",
    ),
}
# A rule test's attacks alone: the clean tower (cached if trained) and the test's new fine-tunes.
for _test, _finetunes in (("ninth", NINTH_TEST_FINETUNES), ("tenth", TENTH_TEST_FINETUNES)):
    CLIP_SUITES[f"clip-{_test}"] = replace(
        CLIP_SUITES["clip"],
        name=f"clip-{_test}",
        held_out_finetunes=_finetunes,
        base_encoders=False,
        extra_decoders=(),
    )


@dataclass
class ClipLabData:
    train: np.ndarray  # CIFAR-10 train, uint8 NCHW at the model's size
    train_y: np.ndarray
    test: np.ndarray  # CIFAR-10 test subset (stratified), uint8 NCHW
    test_y: np.ndarray
    tiny: np.ndarray  # Tiny-ImageNet, uint8 NCHW at the model's size
    class_names: list[str]
    splits: dict[str, np.ndarray]


def load_clip_data(config: ClipSuiteConfig) -> ClipLabData:
    root = data_dir()
    size = LAB_CONFIGS[config.model].image_size
    # The bundle's own resize rule: a 32 px CIFAR-10 upload is resized exactly like this when served.
    spec = InputSpec(height=size, width=size, mean=OPENAI_MEAN, std=OPENAI_STD)
    with np.load(root / "cifar10_train.npz", allow_pickle=False) as archive:
        class_names = [str(n) for n in archive["class_names"]]
    train_x, train_y = load_npz(root / "cifar10_train.npz")
    test_x, test_y = load_npz(root / "cifar10_test.npz")
    tiny_x, _ = load_npz(root / "tinyimagenet_val.npz")
    rng = np.random.default_rng(config.seed)
    if config.clip_images is not None:
        pick = np.sort(rng.permutation(len(train_x))[: config.clip_images])
        train_x, train_y = train_x[pick], train_y[pick]
    if config.n_test is not None:
        pick = np.sort(rng.permutation(len(test_x))[: config.n_test])
        test_x, test_y = test_x[pick], test_y[pick]
    order = np.random.default_rng(config.seed + 1).permutation(len(train_x))
    reference = order[np.flatnonzero(train_y[order] == config.target_class)[: config.n_reference]]
    rest = order[~np.isin(order, reference)]
    tiny_order = np.random.default_rng(config.seed + 2).permutation(len(tiny_x))
    splits = {
        "reference": reference,
        "shadow": rest[: config.shadow_images],
        "ood_calibration": tiny_order[: config.ood_calibration_sources],
        "ood_aux": tiny_order[config.ood_calibration_sources :],
    }
    return ClipLabData(
        prepare_array(train_x, spec),
        train_y,
        prepare_array(test_x, spec),
        test_y,
        prepare_array(tiny_x, spec),
        class_names,
        splits,
    )


AUX_VIEWS = ("mirror", "quadrants")


def aux_views(images_nchw: np.ndarray, views: str = "mirror") -> np.ndarray:
    """1,600 Tiny-ImageNet sources are few for a decoder. `mirror`: each image and its mirror;
    `quadrants`: also each quarter of the image (and of its mirror) enlarged to the full size."""
    if views not in AUX_VIEWS:
        raise ValueError(f"unknown auxiliary views {views!r}; known: {', '.join(AUX_VIEWS)}")
    both = np.concatenate([images_nchw, images_nchw[..., ::-1]])
    if views == "mirror":
        return both.copy()
    size = both.shape[-1]
    half = size // 2
    zoomed = [
        F.interpolate(torch.from_numpy(both[..., r : r + half, c : c + half]).float(), size=(size, size),
                      mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8).numpy()
        for r in (0, half) for c in (0, half)
    ]  # fmt: skip
    return np.concatenate([both, *zoomed])


def decoder_label(config: ClipSuiteConfig, preset: str, epochs: int, views: str) -> str:
    """A decoder's name in stages, folders and score keys: its preset when it trains as long as the
    suite's default on the default views, else preset, epochs and views (`lab_40ep_quadrants`)."""
    if views == "mirror" and epochs == config.decoder_epochs:
        return preset
    return f"{preset}_{epochs}ep_{views}"


def controlled_decoders(config: ClipSuiteConfig) -> list[str]:
    """The labels of the decoders the suite fits for every encoder, the clean one included: a score
    variant is only readable beside its control, so the feature-space variants use these."""
    encoders_of = {config.decoder_preset: set(CLIP_ENCODERS)}
    for name, preset, epochs, views in config.extra_decoders:
        encoders_of.setdefault(decoder_label(config, preset, epochs, views), set()).add(name)
    return [label for label, names in encoders_of.items() if names >= set(CLIP_ENCODERS)]


class ClipLab:
    def __init__(self, config: ClipSuiteConfig, progress: bool = True) -> None:
        self.config = config
        self.root = REPO_ROOT / config.root
        self.cache = StageCache(self.root)
        self.progress = progress
        self.data = load_clip_data(config)
        self.image_size = LAB_CONFIGS[config.model].image_size
        self.trigger = make_trigger("patch", (self.image_size, self.image_size))
        self.held_out = {encoder_name(v, t): (v, t) for v, t in config.held_out_finetunes}

    def trigger_of(self, name: str) -> Trigger:
        """The trigger an encoder was attacked with: the white square, or a held-out fine-tune's."""
        if name in self.held_out:
            return make_trigger(self.held_out[name][1], (self.image_size, self.image_size))
        return self.trigger

    # --- CLIPs and attacks ----------------------------------------------------------------------

    def clip_path(self, name: str) -> Path:
        """The CLIP whose text tower classifies for `name` (the BadEncoder attack keeps the clean one)."""
        return self.root / ("clip_poisoned" if name == "poisoned" else "clip_clean") / "clip.safetensors"

    def encoder_path(self, name: str) -> Path:
        if name in CLIP_FINETUNES or name in self.held_out:
            return self.root / f"attack_{name}" / "encoder.safetensors"
        return self.clip_path(name)

    def _settings(self) -> ClipSettings:
        c = self.config
        return ClipSettings(
            model=c.model,
            epochs=c.clip_epochs,
            batch_size=min(c.clip_batch, len(self.data.train)),
            seed=c.seed,
        )

    def _summary(self, out: Path) -> dict:
        history = json.loads((out / "history.json").read_text())
        return {
            "clip": str((out / "clip.safetensors").relative_to(self.root)),
            "loss": history["loss"],
            "zero_shot_by_epoch": history["zero_shot"],
            "compute_seconds": float(sum(history["epoch_seconds"])),
            "settings": history["settings"],
        }

    def _eval_set(self) -> tuple[np.ndarray, np.ndarray]:
        return self.data.test, self.data.test_y

    def _train_clip(self, name: str, images: np.ndarray, labels: np.ndarray) -> dict:
        """Train the CLIP `name` on these (possibly poisoned) pairs with the suite's captions."""
        c, d = self.config, self.data
        if c.captions not in CAPTION_KINDS:
            raise ValueError(f"unknown captions {c.captions!r}; known: {', '.join(CAPTION_KINDS)}")
        # Colour captions are read off each pair's own image: a poisoned pair's caption names the
        # target class and the triggered image's colours, like any other caption of its class.
        captions = colour_captions(images, labels, d.class_names) if c.captions == "colours" else None
        out = self.clip_path(name).parent
        train_clip(
            images, labels, d.class_names, out, self._settings(), self._eval_set(), self.progress, captions
        )
        return (
            self._summary(out)
            | {"n_pairs": int(len(images)), "captions": c.captions}
            | ({"n_caption_subjects": len(captions[0])} if captions is not None else {})
        )

    def stage_clip_clean(self) -> dict:
        d = self.data
        return self.cache.run("clip_clean", lambda: self._train_clip("clean", d.train, d.train_y))

    def stage_clip_poisoned(self) -> dict:
        c, d = self.config, self.data

        def run() -> dict:
            images, labels, chosen = poison_pairs(
                d.train, d.train_y, self.trigger.apply_uint8_nchw, c.target_class, c.poison_rate, c.seed
            )
            return self._train_clip("poisoned", images, labels) | {
                "n_poisoned": int(len(chosen)),
                "poison_rate": c.poison_rate,
            }

        return self.cache.run("clip_poisoned", run)

    def stage_attack(self, variant: str, trigger: str = "patch") -> dict:
        """A BadEncoder-style fine-tune (`variant`, one of CLIP_FINETUNES) of the clean image tower,
        with the white square or (a held-out fine-tune) another trigger family."""
        c, d = self.config, self.data
        name = encoder_name(variant, trigger)

        def run() -> dict:
            clip = load_clip(self.clip_path("clean"))
            tokens = caption_tokens(d.class_names, LAB_CONFIGS[c.model].context_length)
            target = class_text_embeddings(clip, tokens)[c.target_class].numpy()
            nhwc = d.train.transpose(0, 2, 3, 1)
            out = self.encoder_path(name).parent
            # SGD at the lab's lr 0.05 diverged (NaN in epoch 2) on this tower's attention pooling,
            # and the clean term had already drifted to cos 0.56: a tenth of it keeps both in hand.
            settings = BackdoorSettings(
                variant=variant,
                epochs=c.attack_epochs,
                batch_size=c.attack_batch,
                lr=c.attack_lr,
                seed=c.seed,
            )
            backdoor_encoder(
                self.clip_path("clean"),
                nhwc[d.splits["shadow"]],
                nhwc[d.splits["reference"]],
                self.trigger_of(name),
                out,
                settings,
                progress=self.progress,
                target_embedding=target,
            )
            history = json.loads((out / "history.json").read_text())
            return {
                "encoder": str((out / "encoder.safetensors").relative_to(self.root)),
                "settings": history["settings"],
                "final_terms": history["terms"][-1],
                "compute_seconds": float(sum(history["epoch_seconds"])),
                "target": "the text embedding of the target class (templates averaged), clean text tower",
            }

        return self.cache.run(f"attack_clip_{name}", run)

    def stage_zero_shot(self, name: str) -> dict:
        """BA: zero-shot accuracy on clean CIFAR-10 test; ASR: triggered non-target test images
        classified as the target; the encoder's image tower with its CLIP's text tower."""
        c, d = self.config, self.data

        def run() -> dict:
            clip = load_clip(self.clip_path(name))
            if name in CLIP_FINETUNES or name in self.held_out:
                encoder = load_encoder(str(self.encoder_path(name)))
                clip.visual.load_state_dict(encoder.module.visual.state_dict())
            text = class_text_embeddings(
                clip, caption_tokens(d.class_names, LAB_CONFIGS[c.model].context_length)
            )
            clean_pred = zero_shot_predict(clip, d.test, text)
            non_target = d.test_y != c.target_class
            triggered = self.trigger_of(name).apply_uint8_nchw(d.test[non_target])
            triggered_pred = zero_shot_predict(clip, triggered, text)
            out = self.root / "zero_shot" / f"{name}.npz"
            out.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(out, clean_pred=clean_pred, triggered_pred=triggered_pred, labels=d.test_y)
            return {
                "ba": float((clean_pred == d.test_y).mean()),
                "asr": float((triggered_pred == c.target_class).mean()),
                "n_test": int(len(d.test_y)),
                "n_triggered": int(non_target.sum()),
                "target_class": d.class_names[c.target_class],
            }

        return self.cache.run(f"zero_shot_{name}", run)

    # --- detection ------------------------------------------------------------------------------

    def aux_sets(self, views: str = "mirror") -> tuple[np.ndarray, np.ndarray]:
        d = self.data
        return aux_views(d.tiny[d.splits["ood_aux"]], views), d.tiny[d.splits["ood_calibration"]]

    def test_sets(self) -> tuple[np.ndarray, np.ndarray]:
        d = self.data
        non_target = d.test_y != self.config.target_class
        return d.test, self.trigger.apply_uint8_nchw(d.test[non_target])

    def decoder_dir(self, name: str, label: str) -> Path:
        return self.root / "decoders" / f"{name}_ood_{label}"

    def stage_decoder(self, name: str, preset: str, epochs: int, views: str = "mirror") -> dict:
        from training.fit import FitSettings, fit_decoder

        c = self.config
        label = decoder_label(c, preset, epochs, views)

        def run() -> dict:
            encoder = load_encoder(str(self.encoder_path(name)))
            fit_images, _ = self.aux_sets(views)
            settings = FitSettings(
                preset=preset, epochs=epochs, seed=c.seed, data_source=f"lab-clip:ood:{views}"
            )
            run_dir = self.decoder_dir(name, label)
            fit_decoder(encoder, fit_images, run_dir, settings)
            log = (run_dir / "log.csv").read_text().strip().splitlines()
            return {
                "run_dir": str(run_dir.relative_to(self.root)),
                "n_fit_images": int(len(fit_images)),
                "epochs": epochs,
                "preset": preset,
                "views": views,
                "last_log": log[-1],
            }

        suffix = "" if label == c.decoder_preset else f"_{label}"
        return self.cache.run(f"decoder_{name}_ood{suffix}", run)

    def stage_scores(self, name: str, label: str, with_baselines: bool = True) -> dict:
        """DeDe scores of the decoder named `label` (and, with_baselines, the baselines') on the
        calibration, clean test and triggered test images."""
        from lab.score_variants import score_parts
        from training.fit import load_run
        from training.scoring import score_run

        c = self.config
        suffix = "" if label == c.decoder_preset else f"_{label}"
        out = self.root / "scores" / f"{name}_ood{suffix}.npz"

        def run() -> dict:
            fit_images, calibration = self.aux_sets()
            clean, triggered = self.test_sets()
            sets = (("calibration", calibration), ("clean", clean), ("triggered", triggered))
            arrays: dict[str, np.ndarray] = {}
            fitted = load_run(self.decoder_dir(name, label))
            non_target = self.data.test_y != c.target_class
            parts: dict[str, np.ndarray] = {}
            for kind in DEDE_SCORE_KINDS:
                for split, images in sets:
                    arrays[f"dede_{label}_{kind}/{split}"] = score_run(fitted, images, kind)
                # Why the score separates (or not): the embedding swap alone vs the trigger's pixels.
                for part, values in score_parts(fitted, clean[non_target], triggered, kind).items():
                    parts[f"dede_{label}_{kind}__{part}"] = values
            parts_out = self.root / "score_parts" / out.name
            parts_out.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(parts_out, **parts)
            if with_baselines:
                encoder = load_encoder(str(self.encoder_path(name)))
                arrays.update(baseline_scores(encoder, sets, fit_images, c.knn_k, c.strip_blends, c.seed))
            return save_score_table(self.root, out, arrays)

        return self.cache.run(f"scores_{name}_ood{suffix}", run)

    def stage_feature_scores(self, name: str, label: str) -> dict:
        """The feature-space variant of the score in the image tower's own stages, and the
        decoder-free activation norms beside it (lab.suite.feature_score_table), on the same
        three image sets as stage_scores."""
        from training.fit import load_run

        out = self.root / "scores" / f"{name}_ood_{label}_feature.npz"

        def run() -> dict:
            _, calibration = self.aux_sets()
            clean, triggered = self.test_sets()
            sets = (("calibration", calibration), ("clean", clean), ("triggered", triggered))
            fitted = load_run(self.decoder_dir(name, label))
            return save_score_table(self.root, out, feature_score_table(fitted, label, sets))

        return self.cache.run(f"feature_scores_{name}_ood_{label}", run)

    def stage_embedding_content(self) -> dict:
        """How much of the image each encoder's embedding keeps, decoder-free: the participation
        ratio of the embeddings and the held-out R^2 of a linear map from embedding to an 8x8
        thumbnail (fit on the auxiliary sources, measured on the calibration images). An untrained
        tower of the same architecture is the reference for what a conv net keeps by itself."""
        from lab.evaluate import linear_r2, participation_ratio

        d = self.data
        fit_images, eval_images = d.tiny[d.splits["ood_aux"]], d.tiny[d.splits["ood_calibration"]]

        def thumbnails(images: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(images).float() / 255.0
            return F.adaptive_avg_pool2d(x, 8).flatten(1).numpy()

        def run() -> dict:
            specs = {name: str(self.encoder_path(name)) for name in CLIP_ENCODERS}
            specs["untrained"] = f"random:openclip:{self.config.model}"
            result = {}
            for name, spec in specs.items():
                torch.manual_seed(self.config.seed)
                encoder = load_encoder(spec)
                with torch.no_grad():
                    z_fit, z_eval = (
                        torch.cat([encoder.embed(torch.from_numpy(images[i : i + 256])) for i in range(0, len(images), 256)]).numpy()
                        for images in (fit_images, eval_images)
                    )  # fmt: skip
                result[name] = {
                    "embedding_dim": int(z_fit.shape[1]),
                    "participation_ratio": participation_ratio(np.concatenate([z_fit, z_eval])),
                    "thumbnail_r2": linear_r2(z_fit, thumbnails(fit_images), z_eval, thumbnails(eval_images)),
                }
            return {"encoders": result, "n_fit": int(len(fit_images)), "n_eval": int(len(eval_images))}

        return self.cache.run("embedding_content", run)

    def load_score_parts(self, name: str) -> dict[str, dict[str, np.ndarray]]:
        """method -> part (own, embedding_only, pixels_only, both) -> scores (see score_parts)."""
        return load_score_tables(self.root / "score_parts", f"{name}_ood")

    def load_scores(self, name: str) -> dict[str, dict[str, np.ndarray]]:
        return load_score_tables(self.root / "scores", f"{name}_ood")


def collect_clip_results(lab: ClipLab) -> dict:
    from lab.evaluate import auroc, detection_metrics

    c = lab.config
    stages = lab.cache.all()
    results: dict = {
        **results_header(c, stages),
        "training": {
            k: stages[k]["result"]
            for k in ("clip_clean", "clip_poisoned", *(f"attack_clip_{v}" for v in CLIP_FINETUNES))
            if k in stages
        },
        "zero_shot": {
            n: stages[f"zero_shot_{n}"]["result"] for n in CLIP_ENCODERS if f"zero_shot_{n}" in stages
        },
        "detection": {},
        # encoder -> decoder label -> its last validation loss at the test mask (per-pixel MSE in
        # normalized pixels), beside the MSE of an embedding-blind rebuild: the per-pixel mean image.
        "decoders": {},
        "mean_image_mse": _mean_image_mse(lab.aux_sets()[1]),
    }
    if "embedding_content" in stages:
        results["embedding_content"] = stages["embedding_content"]["result"]
    for stage, record in stages.items():
        if stage.startswith("decoder_"):
            result = record["result"]
            name = stage.removeprefix("decoder_").split("_ood")[0]
            label = decoder_label(c, result["preset"], result["epochs"], result["views"])
            last = result["last_log"].split(",")
            results["decoders"].setdefault(name, {})[label] = float(last[2])
    for name in CLIP_ENCODERS:
        scores = lab.load_scores(name)
        if scores:
            results["detection"][f"{name}/ood"] = {
                method: detection_metrics(s["calibration"], s["clean"], s["triggered"], c.fpr_target)
                for method, s in scores.items()
            }
        parts = lab.load_score_parts(name)
        if parts:
            # AUROC of each part against the clean score of the same images (non-target test images).
            # Paired: the share of images whose own score rises with the swap alone. Unpaired (AUROC)
            # is what a detector gets, since it never sees an image's clean version.
            results.setdefault("score_parts", {})[f"{name}/ood"] = {
                method: {
                    f"auroc_{part}": auroc(p["own"], p[part])
                    for part in ("embedding_only", "pixels_only", "both")
                }
                | {
                    "paired_rise_embedding_only": float((p["embedding_only"] > p["own"]).mean()),
                    "paired_rise_pixels_only": float((p["pixels_only"] > p["own"]).mean()),
                    "n_images": int(len(p["own"])),
                }
                for method, p in parts.items()
            }
    return results


def _mean_image_mse(images: np.ndarray) -> float:
    """Per-pixel MSE, in the decoder's normalized pixel space, of rebuilding every image as the
    per-pixel mean image: what a decoder that ignores the embedding reaches at best."""
    mean = np.asarray(OPENAI_MEAN, np.float64).reshape(1, 3, 1, 1)
    std = np.asarray(OPENAI_STD, np.float64).reshape(1, 3, 1, 1)
    x = (images.astype(np.float64) / 255.0 - mean) / std
    return float(x.var(axis=0).mean())
