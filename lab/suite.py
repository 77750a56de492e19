"""The backdoor lab: real backdoored encoders, and detection measured against them.

`run_suite(suite)` runs, in order of importance, stages whose results are cached under the suite's
run directory (runs/lab, runs/lab-smoke): a finished stage is skipped, an interrupted one resumes
from its own checkpoints (SimCLR, attack fine-tunes and decoder fits all checkpoint every epoch).

  simclr_clean            SimCLR on CIFAR-10 train (+ kNN top-1 on CIFAR-10 test)
  attack_<variant>        BadEncoder / norm-preserving BadEncoder / DRUPE-style fine-tunes of it
  simclr_ctrl             CTRL: SimCLR on the train set with 1% target-class images triggered
  probe_<encoder>         linear probes on CIFAR-10 and GTSRB: BA and ASR
  decoder_<encoder>_<aux> the DeDe decoder fitted on the auxiliary set (ood: Tiny-ImageNet, id:
                          CIFAR-10 train with 1% triggered)
  scores_<encoder>_<aux>  DeDe scores and baseline scores on calibration / clean test / triggered test
  shipped_<encoder>_<aux> the shipped detector (`dede fit`/`calibrate`/`export` defaults), scored through
                          its exported ONNX graph on the same three sets
  report                  benchmarks/detection/results.json, REPORT.md and its figures

Every figure in the report is computed from the cached score arrays by `lab.evaluate`; the
threshold of every detector is calibrated on clean auxiliary images only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lab.attacks.badencoder import CUE_HIDING, BackdoorSettings, backdoor_encoder
from lab.attacks.ctrl import poison_with_ctrl
from lab.attacks.triggers import Trigger, make_trigger
from lab.baselines import baseline_scores, cue_scores
from lab.probe import embed_nchw, probe_report, train_linear_probe
from lab.ssl import pretrain_simclr
from models.architectures import CIFAR_MEAN, CIFAR_STD
from models.bundle import InputSpec, prepare_array
from models.encoders import load_encoder
from training.data import data_dir, load_npz
from training.fit import FittedRun

REPO_ROOT = Path(__file__).resolve().parent.parent
# The lab suite's encoders (other suites: `Lab.encoder_names`).
ENCODERS = ("clean", "badencoder", "norm_preserving", "drupe", "ctrl")
AUX_SETTINGS = ("ood", "id")
DEDE_SCORE_KINDS = ("sse", "max_patch")
BASELINE_METHODS = ("knn_distance", "strip", "embedding_norm")
REQUIRED_FILES = (
    "cifar10_train.npz",
    "cifar10_test.npz",
    "gtsrb_train.npz",
    "gtsrb_test.npz",
    "tinyimagenet_val.npz",
)


@dataclass(frozen=True)
class SuiteConfig:
    """Sizes of every stage. `lab` fits 2 CPU cores in about 3 hours; `smoke` in minutes."""

    name: str
    arch: str = "cifar_resnet18"
    width: int = 16
    simclr_images: int | None = None  # None: the whole CIFAR-10 train file
    simclr_epochs: int = 40  # ~28 s each at 24 px on 2 idle cores; the method notes reach kNN ~57% at 65
    simclr_crop: int | None = 24
    simclr_batch: int = 256
    knn_every: int = 10
    target_class: int = 0  # airplane
    n_reference: int = 5
    # The method notes reach ASR near 100% with 5k shadow images x 20 epochs (~20 s each here);
    # 12 epochs left BadEncoder at ASR 71% and DRUPE at 52%.
    shadow_images: int = 5000
    attack_epochs: int = 20
    attack_batch: int = 128
    ctrl_epochs: int = 40  # as long as the clean pre-training (20 epochs left CTRL's ASR at 5%)
    ctrl_rate: float = 0.01
    probe_train: int | None = 5000  # None: every labelled train image (CIFAR-10 and GTSRB)
    gtsrb_test: int | None = None  # None: the whole GTSRB test file
    ood_sources: int | None = None  # None: every Tiny-ImageNet image
    probe_epochs: int = 60
    decoder_preset: str = "lab"
    decoder_epochs: int = 10  # benchmarks/fit: the lab preset plateaus by epoch 9
    id_aux_images: int = 5000
    id_poison_rate: float = 0.01
    n_calibration: int = 1000
    ood_calibration_sources: int = 400
    ood_views: bool = True  # each 64 px Tiny-ImageNet image also gives 4 native-resolution quadrants
    n_test: int | None = 2000  # None: the whole CIFAR-10 test set
    strip_blends: int = 4
    knn_k: int = 10
    fpr_target: float = 0.01
    # (encoder, aux) pairs in the order they run: the most informative first, so a run cut short
    # by its time budget still answers the main questions.
    detections: tuple[tuple[str, str], ...] = (
        ("badencoder", "ood"),
        ("drupe", "ood"),
        ("norm_preserving", "ood"),
        ("clean", "ood"),
        ("badencoder", "id"),
        ("drupe", "id"),
        ("ctrl", "ood"),
    )
    # Further decoders beside the default one, as (encoder, aux, decoder preset, epochs): decoder
    # capacity is one of the variants the report compares. The reference-size `paper` preset (7.2M
    # parameters) costs ~6.5x the lab decoder per training step on 2 cores (1.37 s vs 0.21 s per
    # 256 images, 90% masked), ~9 minutes for 10 epochs here: the suite runs it on the main attack
    # and on the clean control, at the same epochs as the other presets so that only capacity
    # differs (the reference trains it far longer, on GPUs).
    extra_decoders: tuple[tuple[str, str, str, int], ...] = (
        ("badencoder", "ood", "lab_wide", 10),
        ("drupe", "ood", "lab_wide", 10),
        ("clean", "ood", "lab_wide", 10),
        ("badencoder", "ood", "paper", 10),
        ("clean", "ood", "paper", 10),
    )
    # (backdoor variant, trigger family) of every fine-tune attack, in the order they run. The
    # white-square ones are named by their variant alone (the lab's historic names); the others
    # `<variant>_<trigger>` (`encoder_name`).
    attacks: tuple[tuple[str, str], ...] = (
        ("badencoder", "patch"),
        ("norm_preserving", "patch"),
        ("drupe", "patch"),
    )
    # The shipped detector on these (encoder, aux) pairs: `dede fit`, `dede calibrate` and `dede
    # export` with their defaults, scored through the exported ONNX graph (`Lab.stage_shipped`). It
    # is fitted as the README's command fits it, on at most `shipped_fit_images` auxiliary source
    # images, each once (the lab's Tiny-ImageNet file holds 2,000, 400 of which calibrate: 1,600 are
    # fitted on); `shipped_max_steps` None: the product's budget. Each pair must be in `detections`.
    shipped_detections: tuple[tuple[str, str], ...] = ()
    shipped_fit_images: int = 2000
    shipped_max_steps: int | None = None
    with_ctrl: bool = True
    probe_gtsrb: bool = True  # the GTSRB transfer probe beside the CIFAR-10 one
    # Encoders whose decoder-free cues (embedding and activation norms, activation means, kNN,
    # STRIP) are scored on the OOD calibration set and the test sets, without a decoder.
    cue_encoders: tuple[str, ...] = ()
    seed: int = 0
    root: str = "runs/lab"
    # BackdoorSettings fields that differ from their defaults, per attack (by encoder name).
    attack_settings: dict[str, dict[str, float | int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        stray = [pair for pair in self.shipped_detections if pair not in self.detections]
        if stray:
            raise ValueError(f"suite {self.name!r}: shipped_detections {stray} are not among its detections")


def encoder_name(variant: str, trigger: str) -> str:
    """The lab's name of a fine-tuned encoder: the variant alone for the white square, else
    `<variant>_<trigger>` with `@random` written `_random` (names are folder and file names)."""
    if trigger == "patch":
        return variant
    return f"{variant}_{trigger.replace('@random', '_random')}"


SUITES: dict[str, SuiteConfig] = {
    "lab": SuiteConfig(
        name="lab",
        shipped_detections=(
            ("badencoder", "ood"),
            ("drupe", "ood"),
            ("norm_preserving", "ood"),
            ("clean", "ood"),
            ("ctrl", "ood"),
        ),
    ),
    "smoke": SuiteConfig(
        name="smoke",
        simclr_images=1024,
        simclr_epochs=1,
        knn_every=0,
        shadow_images=256,
        attack_epochs=1,
        attack_batch=64,
        ctrl_epochs=1,
        probe_train=1000,
        gtsrb_test=300,
        ood_sources=400,
        probe_epochs=5,
        decoder_preset="tiny",
        decoder_epochs=1,
        id_aux_images=512,
        n_calibration=256,
        ood_calibration_sources=128,  # with their mirror images, the export check's 256
        ood_views=False,
        n_test=300,
        strip_blends=2,
        extra_decoders=(("badencoder", "ood", "tiny_wide", 1),),
        shipped_detections=(("badencoder", "ood"),),
        shipped_max_steps=20,
        detections=(
            ("badencoder", "ood"),
            ("drupe", "ood"),
            ("clean", "ood"),
            ("ctrl", "ood"),
            ("badencoder", "id"),
        ),
        root="runs/lab-smoke",
    ),
}
# The trigger families and the cue-hiding attackers (lab/attacks) at the lab suite's scale, with
# its own clean encoder. A first run at a reduced scale (8 pre-training epochs on 8,000 images, 10
# attack epochs on 2,000 shadow images; kNN 36.7%, BA 41%) was too weak for the attacks to take:
# BadEncoder with the checker trigger reached cosine 0.99 to its target embedding, but the probe of
# so weak an encoder put that target in airplane for only 29% of the triggered images.
_HARD_ATTACKS = (  # in the order they run: the most informative first
    ("badencoder", "patch"),
    ("adaptive", "patch"),
    ("badencoder", "checker"),
    ("badencoder", "blend"),
    ("badencoder", "warp"),
    ("dede_aware", "patch"),
    ("badencoder", "invisible"),
    ("badencoder", "noise@random"),
    ("badencoder", "noise"),
    ("badencoder", "checker@random"),
    ("adaptive", "checker"),
    ("adaptive", "blend"),
    # added 2026-12-06 as held-out attacks of the third feature-rule test (benchmarks/detection/README.md)
    ("adaptive", "noise@random"),
    ("adaptive", "invisible"),
    # added 2026-12-06 as held-out attacks of the fourth feature-rule test (benchmarks/detection/README.md)
    ("adaptive", "noise"),
    ("adaptive", "checker@random"),
)
SUITES["lab-hard"] = SuiteConfig(
    name="lab-hard",
    probe_gtsrb=False,
    attacks=_HARD_ATTACKS,
    with_ctrl=False,
    # DeDe on these encoders is scored by the shipped pipeline (benchmarks/detection/shipped.py:
    # `dede fit` defaults, calibrate, export, ONNX Runtime), not by the lab's decoder presets.
    detections=(),
    extra_decoders=(),
    cue_encoders=("clean", *(encoder_name(v, t) for v, t in _HARD_ATTACKS)),
    root="runs/lab-hard",
)
# The shipped score measured on attacks it was never run on (fixed 2026-12-06, 10:45 UTC, before
# they were trained): the norm-preserving BadEncoder and DRUPE-style, which the shipped-detector
# issue names and which ran only in the `lab` suite, against the lab's own decoders; and DRUPE with
# the noise patch at random places. No decision rides on them (benchmarks/detection/README.md).
# Added 12:05 UTC, before it was trained: the DeDe-aware attacker with its DeDe term at a fifth of
# lab-hard's weight (there, at 1, the clean embeddings drifted to cosine 0.73 and ASR fell to 3.6%).
# Added 14:00 UTC, before it was trained: the cue-hiding (adaptive) BadEncoder with the white square
# at 40 attack epochs instead of 20 (on lab-hard at 20: ASR 86.6%, just under the attacks issue's
# 90%, with its triggered embeddings at cosine 0.989 to the target and still climbing).
# Added 2026-12-06 18:40 UTC, before it was trained: the cue-hiding attack that also hides the kNN
# cue (`adaptive_knn`), which every earlier cue-hiding attack left at strength 0.94-0.998, with the
# checkerboard, the one trigger on which the cue-hiding attack took on lab-hard (ASR 94.7% at 20
# epochs; 68.6-86.6% with the white square). Its first run (3740be5, raw-cosine target) hid the kNN
# cue (strength 0.785) but did not take (ASR 15.1%); run again at 19:00 UTC with its target term
# centred on the clean shadow mean (lab/attacks/badencoder.py), the first run's encoder kept under
# runs/lab-heldout/tries. Second run (centred target, the attack as it stands): ASR 85.4%, BA 56.4%,
# but the kNN cue back at 0.985 and the embedding norm at 0.896. Two more runs with the kNN bank
# embedded by the encoder being trained (weight 4, then 1) pulled the encoder apart within 3 epochs
# (clean term -0.46 and -0.62) and were stopped; that bank is not in the code. Fifth run at 19:30
# UTC: the kNN bank from a public out-of-distribution set (GTSRB train: benchmarks/detection/
# knn_banks.json showed the cue hidden against the attacker's own images, not against the
# defender's Tiny-ImageNet) and the norm term at the target's weight (embedding-norm cue 0.896):
# norm cue 0.560, ASR 71.4%, BA 57.7%, kNN cue 0.976. Sixth run at 19:45 UTC: the same, with the
# bank and the clean reference distances embedded by the encoder being trained, once per epoch:
# kNN cue 0.816, but ASR 11.0% and BA 46.6%. The attack as committed is the second run's (the
# defaults of BackdoorSettings; runs 5-6 are its knn_bank / knn_bank_encoder / lambda_norm options),
# the one that came nearest to taking; the others are under runs/lab-heldout/tries.
# Added 20:08 UTC, before it was trained: adaptive_knn as committed with the white square, to
# measure whether its centred target makes the cue-hiding attack take with the lab's first trigger
# (the adaptive attack: ASR 68.6% here at 40 epochs, 86.6% on lab-hard at 20).
# Added 2026-12-06 21:10 UTC, before it was trained: `adaptive_natural` with the checkerboard, the
# kNN-hiding attack with one target per triggered image, a real image its own labelled probe is
# surest of (lab/attacks/badencoder.py). Its one setting (100 targets) was fixed from the clean
# encoder alone (benchmarks/detection/natural_targets.py), before any training. First run (20
# epochs, 720dcc3): every decoder-free cue at or under 0.71, the kNN cue against the defender's bank
# included (0.593), but ASR 70.9% and BA 55.6%, its target term still climbing (centred cosine 0.77
# at epoch 10, 0.83 at 20). Continued at 21:25 UTC to 40 epochs, as the adaptive attack runs here
# (the first run's encoder kept under runs/lab-heldout/tries/natural_run1_20ep). At 40 epochs:
# ASR 78.4%, BA 55.7%, every cue at or under 0.673 (runs/lab-heldout/tries/natural_run2_40ep).
# Trained again from the start at 21:45 UTC, 40 epochs, with the attacker's own probe's decision
# as a term (`lambda_probe` 1; 0 gives the run before), chosen on that run's ASR alone. Stopped at
# epoch 16: the term was already 0.003, as a probe fitted on the clean encoder puts 99.7% of run 2's
# triggered images in airplane; one fitted on run 2's own shadow embeddings puts 92% there, the
# suite's probe 78.4%. Trained again from the start at 21:56 UTC, 40 epochs, with that term taken
# over 4 probes refitted every epoch on the encoder being trained, each on half the shadow images.
# That run (4): ASR 93.0%, every cue at or under 0.688, but BA 53.5%, 5.1 points below clean; its
# clean term fell to cosine 0.78 in epochs 2-10 while the probe term was 0.13-0.16 (run 1: 0.89).
# Encoder under runs/lab-heldout/tries/natural_run4_probes. Trained again from the start at 22:32
# UTC with the probe term at a quarter of its weight (`lambda_probe` 0.25), chosen on run 4's BA:
# ASR 94.5%, BA 56.0%, every decoder-free cue at or under 0.650 (the attack as committed; 0.25 is
# now the default).
# Added 2026-12-06 23:57 UTC, before they were trained, each run once: (1) the trigger families on
# which the plain BadEncoder did not take on lab-hard (blend ASR 40.8%, invisible 65.8%, with the
# triggered embeddings' norm far above clean: embedding-norm cue 1.000), with the norm-preserving
# BadEncoder, which took with the white square here (ASR 99.9%) where the plain one did not on
# lab-hard (61.1%); (2) the attacker who knows DeDe on top of adaptive_natural, the one cue-hiding
# attack that took (`dede_aware_natural`, lab/attacks/badencoder.py), with adaptive_natural's suite
# settings and the DeDe term at the weight dede_aware has here (0.2).
# Added 2026-12-07 01:25 UTC, before they were trained, each run once: DRUPE-style with the same two
# whole-image triggers, to measure whether the shipped score's miss on the norm-preserving
# BadEncoder with them (AUROC 0.794 and 0.761, against 0.995 with the white square) holds for the
# other norm-keeping attack of the shipped-detector issue.
# Added 2026-12-07 02:43 UTC, before they were trained, each run once: the fifth test's attacks
# (benchmarks/detection/README.md, "A fifth test"), which judge `max_all_relative` against
# `max_all`: the two norm-keeping attacks with SIG's sine stripes (a family added with the test),
# the norm-preserving BadEncoder with the WaNet warp, DRUPE-style with the checkerboard at random
# places, and the kNN-hiding attack with the noise patch.
# Added 2026-12-07 04:09 UTC, before they were trained, each run once: the sixth test's attacks
# (README, "A sixth test", `max_all_both` against `max_all`): the plain BadEncoder with the
# checkerboard and with the noise patch at random places, and DRUPE-style with the WaNet warp.
# Added 2026-12-07 06:07 UTC, before they were trained, each run once: the seventh test's attacks
# (README, "A seventh test", `max_all_both_balanced` against `max_all_both`): the plain BadEncoder
# with SIG's stripes, the norm-preserving BadEncoder with the checkerboard at random places, and
# DRUPE-style with the noise patch at a fixed place.
# Added 2026-12-07 14:20 UTC, before they were trained, each run once: the ninth test's attacks
# (README, "A ninth test"): per fine-tune the shipped-detector issue names, the first trigger family
# (TRIGGER_FAMILIES order, fixed places first) it had not been trained with on this encoder.
NINTH_TEST_ATTACKS = (
    ("norm_preserving", "checker"),
    ("drupe", "checker"),
    ("badencoder", "patch@random"),
)
_HELD_OUT_ATTACKS = (
    ("norm_preserving", "patch"),
    ("drupe", "patch"),
    ("drupe", "noise@random"),
    ("dede_aware", "patch"),
    ("adaptive", "patch"),
    ("adaptive_knn", "checker"),
    ("adaptive_knn", "patch"),
    ("adaptive_natural", "checker"),
    ("norm_preserving", "blend"),
    ("norm_preserving", "invisible"),
    ("dede_aware_natural", "checker"),
    ("drupe", "blend"),
    ("drupe", "invisible"),
    ("norm_preserving", "sig"),
    ("drupe", "sig"),
    ("norm_preserving", "warp"),
    ("drupe", "checker@random"),
    ("adaptive_knn", "noise"),
    ("badencoder", "checker"),
    ("badencoder", "noise@random"),
    ("drupe", "warp"),
    ("badencoder", "sig"),
    ("norm_preserving", "checker@random"),
    ("drupe", "noise"),
    *NINTH_TEST_ATTACKS,
)
SUITES["lab-heldout"] = replace(
    SUITES["lab-hard"],
    name="lab-heldout",
    attacks=_HELD_OUT_ATTACKS,
    cue_encoders=("clean", *(encoder_name(v, t) for v, t in _HELD_OUT_ATTACKS)),
    root="runs/lab-heldout",
    attack_settings={
        "dede_aware": {"lambda_dede": 0.2},
        "adaptive": {"epochs": 40},
        "adaptive_natural_checker": {"epochs": 40, "lambda_probe": 0.25},
        "dede_aware_natural_checker": {"epochs": 40, "lambda_probe": 0.25, "lambda_dede": 0.2},
    },
)


# lab-hard and lab-heldout each in parts that stay within 3 hours on 2 CPU cores (the attacks
# issue's bound; the whole suites' stages took 4.4 h and 5.9 h here:
# benchmarks/detection/suite_hours.json). A part shares its suite's root and stage names, so what
# one part trained the others and the whole suite reuse: run the parts one after the other, then
# `dede lab report --suite <suite>` reports them all. lab-hard: the plain attacks and the cue-hiding
# ones. lab-heldout's plain attacks outgrew one part (3.05 h with the seventh test's three), so they
# are split by family: the BadEncoder ones (plain and norm-preserving) and the DRUPE-style ones.
SUITE_PARTS = {
    "lab-hard": {
        "plain": lambda variant, trigger: variant not in CUE_HIDING,
        "hiding": lambda variant, trigger: variant in CUE_HIDING,
    },
    "lab-heldout": {
        "badencoder": lambda variant, trigger: variant in ("badencoder", "norm_preserving"),
        "drupe": lambda variant, trigger: variant == "drupe",
        "hiding": lambda variant, trigger: variant in CUE_HIDING,
    },
}


def _suite_part(whole: str, part: str, keep: Callable[[str, str], bool]) -> SuiteConfig:
    """The suite `whole` with only the attacks (variant, trigger) that `keep` accepts, in its root."""
    config = SUITES[whole]
    attacks = tuple(a for a in config.attacks if keep(*a))
    names = {encoder_name(v, t) for v, t in attacks}
    return replace(
        config,
        name=f"{whole}-{part}",
        attacks=attacks,
        cue_encoders=("clean", *(encoder_name(v, t) for v, t in attacks)),
        attack_settings={k: v for k, v in config.attack_settings.items() if k in names},
    )


for _whole, _parts in SUITE_PARTS.items():
    for _name in _parts:
        _part = _suite_part(_whole, _name, _parts[_name])
        SUITES[_part.name] = _part
# Not a part: the ninth rule test's new attacks alone (they belong to the badencoder and drupe parts
# too), so that a checkout without the suite's other encoders trains only them.
SUITES["lab-heldout-ninth"] = _suite_part(
    "lab-heldout", "ninth", lambda variant, trigger: (variant, trigger) in NINTH_TEST_ATTACKS
)
# DRUPE-style at 40 attack epochs (fixed 2026-12-07, 21:00 UTC, before they were trained, each run
# once, in this order): the five triggers with which it stayed under the attacks issue's 90% ASR at
# lab-heldout's 20 epochs (81-87%), with the epochs the cue-hiding attacks needed there. Its own
# root, since the encoders' names are lab-heldout's. Its committed run started from lab-heldout's
# clean encoder, copied by hand with its stage markers and clean cue scores; a checkout without
# them trains its own.
DRUPE_40_ATTACKS = (
    ("drupe", "noise"),
    ("drupe", "noise@random"),
    ("drupe", "checker@random"),
    ("drupe", "invisible"),
    ("drupe", "warp"),
)
SUITES["lab-heldout-drupe40"] = replace(
    SUITES["lab-heldout"],
    name="lab-heldout-drupe40",
    attacks=DRUPE_40_ATTACKS,
    cue_encoders=("clean", *(encoder_name(v, t) for v, t in DRUPE_40_ATTACKS)),
    root="runs/lab-heldout-drupe40",
    attack_settings={encoder_name(v, t): {"epochs": 40} for v, t in DRUPE_40_ATTACKS},
)
SUITES["lab-hard-smoke"] = replace(
    SUITES["smoke"],
    name="lab-hard-smoke",
    attacks=(("adaptive", "patch"), ("dede_aware", "patch"), ("badencoder", "blend"), ("badencoder", "warp")),
    with_ctrl=False,
    detections=(("adaptive", "ood"),),
    shipped_detections=(),
    extra_decoders=(),
    cue_encoders=("clean", "adaptive", "dede_aware", "badencoder_blend", "badencoder_warp"),
    root="runs/lab-hard-smoke",
)


# ----------------------------------------------------------------------------------------------
# Stage cache.
# ----------------------------------------------------------------------------------------------


def backdoor_settings(config: SuiteConfig, name: str, variant: str) -> BackdoorSettings:
    """The fine-tune settings of the suite's attack `name`: the suite's sizes, then the attack's own
    settings (`attack_settings`) over them, epochs included."""
    sizes = {"epochs": config.attack_epochs, "batch_size": config.attack_batch, "seed": config.seed}
    return BackdoorSettings(variant=variant, **{**sizes, **config.attack_settings.get(name, {})})


class StageCache:
    """One JSON marker per finished stage under root/stages: its result and its wall time."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def marker(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def done(self, name: str) -> bool:
        return self.marker(name).is_file()

    def load(self, name: str) -> dict | None:
        path = self.marker(name)
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, name: str, fn: Callable[[], dict]) -> dict:
        """The stage's cached result, or run it and cache the result with its wall time."""
        cached = self.load(name)
        if cached is not None:
            tqdm.write(f"[lab] {name}: cached ({cached['wall_seconds']:.0f}s when it ran)")
            return cached["result"]
        tqdm.write(f"[lab] {name}: running")
        started = time.time()
        result = fn()
        record = {
            "result": result,
            "wall_seconds": time.time() - started,
            "finished_at": time.strftime("%F %T"),
        }
        tmp = self.marker(name).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.marker(name))
        tqdm.write(f"[lab] {name}: done in {record['wall_seconds']:.0f}s")
        return result

    def all(self) -> dict[str, dict]:
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))}


# ----------------------------------------------------------------------------------------------
# Data: every split the lab uses, derived from the files in data_dir() with a fixed seed.
# ----------------------------------------------------------------------------------------------


def missing_data(directory: Path | None = None) -> list[str]:
    directory = directory or data_dir()
    return [name for name in REQUIRED_FILES if not (directory / name).is_file()]


@dataclass
class LabData:
    train_x: np.ndarray  # CIFAR-10 train, uint8 NHWC
    train_y: np.ndarray
    test_x: np.ndarray  # CIFAR-10 test, uint8 NHWC (possibly a subset)
    test_y: np.ndarray
    gtsrb: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    tiny_x: np.ndarray  # Tiny-ImageNet val, uint8 NHWC 64 px
    splits: dict[str, np.ndarray] = field(default_factory=dict)


def load_lab_data(config: SuiteConfig) -> LabData:
    root = data_dir()
    missing = missing_data(root)
    if missing:
        raise FileNotFoundError(
            f"{root} lacks {', '.join(missing)}; set DEDE_DATA_DIR to the shared data folder"
        )
    train_x, train_y = load_npz(root / "cifar10_train.npz")
    test_x, test_y = load_npz(root / "cifar10_test.npz")
    g_train_x, g_train_y = load_npz(root / "gtsrb_train.npz")
    g_test_x, g_test_y = load_npz(root / "gtsrb_test.npz")
    tiny_x, _ = load_npz(root / "tinyimagenet_val.npz")
    rng = np.random.default_rng(config.seed)
    if config.n_test is not None:  # a class-balanced random subset keeps the test stratified
        pick = np.sort(rng.permutation(len(test_x))[: config.n_test])
        test_x, test_y = test_x[pick], test_y[pick]
    order = np.random.default_rng(config.seed + 1).permutation(len(train_x))
    targets = np.flatnonzero(train_y[order] == config.target_class)
    reference = order[targets[: config.n_reference]]
    rest = order[~np.isin(order, reference)]  # the random order, references removed
    a = config.shadow_images
    b = a + config.id_aux_images
    c = b + config.n_calibration
    tiny_order = np.random.default_rng(config.seed + 2).permutation(len(tiny_x))[: config.ood_sources]
    gtsrb_rng = np.random.default_rng(config.seed + 3)  # GTSRB files are sorted by class: subsample at random
    if config.probe_train is not None and config.probe_train < len(g_train_x):
        pick = np.sort(gtsrb_rng.permutation(len(g_train_x))[: config.probe_train])
        g_train_x, g_train_y = g_train_x[pick], g_train_y[pick]
    if config.gtsrb_test is not None and config.gtsrb_test < len(g_test_x):
        pick = np.sort(gtsrb_rng.permutation(len(g_test_x))[: config.gtsrb_test])
        g_test_x, g_test_y = g_test_x[pick], g_test_y[pick]
    splits = {
        "reference": reference,
        "shadow": rest[:a],
        "id_aux": rest[a:b],
        "id_calibration": rest[b:c],
        "ood_calibration": tiny_order[: config.ood_calibration_sources],
        "ood_aux": tiny_order[config.ood_calibration_sources :],
    }
    if config.simclr_images is not None:
        splits["simclr"] = np.sort(order[: config.simclr_images])
    return LabData(
        train_x, train_y, test_x, test_y, (g_train_x, g_train_y, g_test_x, g_test_y), tiny_x, splits
    )


def to_input(images_nhwc: np.ndarray) -> np.ndarray:
    """Any-size uint8 NHWC -> uint8 NCHW at 32 px, with the service's resize rule."""
    spec = InputSpec(height=32, width=32, mean=CIFAR_MEAN, std=CIFAR_STD)
    return prepare_array(images_nhwc, spec)


def ood_views(tiny_nhwc: np.ndarray, with_crops: bool) -> np.ndarray:
    """Tiny-ImageNet (64 px) as the 32 px detector input: the whole image resized, plus (with_crops)
    its four 32 px quadrants at native resolution: 5 views per source image. 2,000 images are few
    for a decoder; the quadrants are real 32 px natural-image content."""
    views = [to_input(tiny_nhwc)]
    if with_crops:
        for r in (0, 32):
            for c in (0, 32):
                views.append(np.ascontiguousarray(tiny_nhwc[:, r : r + 32, c : c + 32].transpose(0, 3, 1, 2)))
    return np.concatenate(views)


# ----------------------------------------------------------------------------------------------
# Stages.
# ----------------------------------------------------------------------------------------------


def trigger_for(encoder_name: str) -> Trigger:
    """The trigger of the lab suite's historic encoders (white square; CTRL's frequency trigger)."""
    return make_trigger("ctrl" if encoder_name == "ctrl" else "patch", (32, 32))


class Lab:
    def __init__(self, config: SuiteConfig, device: str | None = None, progress: bool = True) -> None:
        self.config = config
        self.root = REPO_ROOT / config.root
        self.cache = StageCache(self.root)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.progress = progress
        self.data = load_lab_data(config)
        # encoder name -> (backdoor variant, trigger family) of every fine-tune attack
        self.attack_specs = {encoder_name(v, t): (v, t) for v, t in config.attacks}

    def trigger_name(self, name: str) -> str:
        """The trigger family an encoder's triggered test images carry (`patch` for the clean one)."""
        if name == "ctrl":
            return "ctrl"
        return self.attack_specs.get(name, ("", "patch"))[1]

    def trigger_for(self, name: str) -> Trigger:
        return make_trigger(self.trigger_name(name), (32, 32))

    def encoder_names(self) -> tuple[str, ...]:
        """Every encoder of this suite, clean first."""
        return ("clean", *self.attack_specs, *(("ctrl",) if self.config.with_ctrl else ()))

    # --- encoders -------------------------------------------------------------------------------

    def encoder_path(self, name: str) -> Path:
        return self.root / ("simclr_clean" if name == "clean" else f"encoders/{name}") / "encoder.safetensors"

    def _knn_eval(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """kNN monitor: the pre-training images (with their labels) against the test set."""
        d = self.data
        idx = d.splits.get("simclr")
        train_x, train_y = (d.train_x, d.train_y) if idx is None else (d.train_x[idx], d.train_y[idx])
        return train_x, train_y, d.test_x, d.test_y

    def _simclr_images(self) -> np.ndarray:
        idx = self.data.splits.get("simclr")
        return self.data.train_x if idx is None else self.data.train_x[idx]

    def _simclr(self, images: np.ndarray, out_dir: Path, epochs: int) -> dict:
        c = self.config
        path = pretrain_simclr(
            images,
            out_dir,
            arch=c.arch,
            width=c.width,
            epochs=epochs,
            batch_size=min(c.simclr_batch, len(images)),
            device=self.device,
            seed=c.seed,
            crop_size=c.simclr_crop,
            knn_eval=self._knn_eval(),
            knn_every=c.knn_every,
            progress=self.progress,
        )
        history = json.loads((out_dir / "history.json").read_text())
        return {
            "encoder": str(path.relative_to(self.root)),
            "knn_top1": history["knn_top1"],
            "final_knn_top1": history["knn_top1"].get(str(epochs)),
            "final_loss": history["loss"][-1],
            "compute_seconds": float(sum(history["epoch_seconds"])),
            "epochs": epochs,
            "n_images": int(len(images)),
        }

    def stage_simclr_clean(self) -> dict:
        return self.cache.run(
            "simclr_clean",
            lambda: self._simclr(
                self._simclr_images(), self.root / "simclr_clean", self.config.simclr_epochs
            ),
        )

    def stage_attack(self, name: str) -> dict:
        """The fine-tune attack named `name` (`encoder_name(variant, trigger)` of config.attacks)."""
        c, d = self.config, self.data
        variant, trigger = self.attack_specs[name]

        def run() -> dict:
            settings = backdoor_settings(c, name, variant)
            out = self.encoder_path(name).parent
            path = backdoor_encoder(
                self.encoder_path("clean"),
                d.train_x[d.splits["shadow"]],
                d.train_x[d.splits["reference"]],
                make_trigger(trigger, (32, 32)),
                out,
                settings,
                device=self.device,
                progress=self.progress,
                # The attacker's public out-of-distribution images (adaptive_knn's kNN bank).
                public_nhwc_uint8=d.gtsrb[0],
                # The attacker's labels of its shadow images (adaptive_natural's targets).
                shadow_labels=d.train_y[d.splits["shadow"]],
                target_class=c.target_class,
            )
            history = json.loads((out / "history.json").read_text())
            return {
                "encoder": str(path.relative_to(self.root)),
                "variant": variant,
                "trigger": trigger,
                "settings": history["settings"],
                "final_terms": history["terms"][-1],
                "compute_seconds": float(sum(history["epoch_seconds"])),
                "n_shadow": int(len(d.splits["shadow"])),
            }

        return self.cache.run(f"attack_{name}", run)

    def stage_ctrl(self) -> dict:
        c = self.config

        def run() -> dict:
            images = self._simclr_images()
            labels = (
                self.data.train_y
                if "simclr" not in self.data.splits
                else self.data.train_y[self.data.splits["simclr"]]
            )
            poisoned, chosen = poison_with_ctrl(images, labels, c.target_class, c.ctrl_rate, seed=c.seed)
            result = self._simclr(poisoned, self.encoder_path("ctrl").parent, c.ctrl_epochs)
            return {**result, "n_poisoned": int(len(chosen)), "poison_rate": c.ctrl_rate}

        return self.cache.run("simclr_ctrl", run)

    # --- probes ---------------------------------------------------------------------------------

    def stage_probe(self, name: str) -> dict:
        c, d = self.config, self.data
        probe_dir = self.root / "probes"

        def run() -> dict:
            encoder = load_encoder(str(self.encoder_path(name)))
            trigger = self.trigger_for(name)
            train_x, train_y = d.train_x, d.train_y
            if c.probe_train is not None:  # the train file is sorted by class: a random subset
                pick = np.sort(np.random.default_rng(c.seed + 4).permutation(len(train_x))[: c.probe_train])
                train_x, train_y = train_x[pick], train_y[pick]
            test_nchw = to_input(d.test_x)
            test_z = embed_nchw(encoder, test_nchw)
            trig_z = embed_nchw(encoder, trigger.apply_uint8_nchw(test_nchw))
            probe = train_linear_probe(
                embed_nchw(encoder, to_input(train_x)), train_y, c.probe_epochs, seed=c.seed
            )
            cifar = probe_report(probe, test_z, d.test_y, trig_z, c.target_class)
            probe_dir.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(
                probe_dir / f"{name}_cifar10_predictions.npz",
                clean_pred=probe.predict(test_z),
                triggered_pred=probe.predict(trig_z),
                labels=d.test_y,
            )
            if not c.probe_gtsrb:
                return {"cifar10": cifar, "trigger": self.trigger_name(name)}
            g_train_x, g_train_y, g_test_x, g_test_y = d.gtsrb
            g_probe = train_linear_probe(
                embed_nchw(encoder, to_input(g_train_x)), g_train_y, c.probe_epochs, seed=c.seed
            )
            g_test = to_input(g_test_x)
            g_test_z = embed_nchw(encoder, g_test)
            g_trig_z = embed_nchw(encoder, trigger.apply_uint8_nchw(g_test))
            # GTSRB has no airplane: its target is the class the reference (target) images fall in.
            ref_pred = g_probe.predict(embed_nchw(encoder, to_input(d.train_x[d.splits["reference"]])))
            g_target = int(np.bincount(ref_pred).argmax())
            gtsrb = probe_report(g_probe, g_test_z, g_test_y, g_trig_z, g_target)
            gtsrb["target_rule"] = "the GTSRB class the reference images of the target are classified as"
            return {"cifar10": cifar, "gtsrb": gtsrb, "trigger": self.trigger_name(name)}

        return self.cache.run(f"probe_{name}", run)

    # --- decoders and scores --------------------------------------------------------------------

    def aux_sets(self, aux: str) -> tuple[np.ndarray, np.ndarray]:
        """(decoder training images, clean calibration images), uint8 NCHW 32 px."""
        d, c = self.data, self.config
        if aux == "ood":
            return ood_views(d.tiny_x[d.splits["ood_aux"]], c.ood_views), ood_views(
                d.tiny_x[d.splits["ood_calibration"]], c.ood_views
            )
        return to_input(d.train_x[d.splits["id_aux"]]), to_input(d.train_x[d.splits["id_calibration"]])

    def decoder_dir(self, name: str, aux: str, preset: str) -> Path:
        return self.root / "decoders" / f"{name}_{aux}_{preset}"

    def stage_decoder(self, name: str, aux: str, preset: str, epochs: int) -> dict:
        from training.fit import FitSettings, fit_decoder

        c = self.config

        def run() -> dict:
            encoder = load_encoder(str(self.encoder_path(name)))
            fit_images, _ = self.aux_sets(aux)
            trigger = self.trigger_for(name)
            poison_rate = c.id_poison_rate if aux == "id" else 0.0
            settings = FitSettings(
                preset=preset, epochs=epochs, seed=c.seed, data_source=f"lab:{aux}", poison_rate=poison_rate
            )
            run_dir = self.decoder_dir(name, aux, preset)
            fit_decoder(
                encoder, fit_images, run_dir, settings, device=self.device, poison=trigger.apply_uint8_nchw
            )
            log = (run_dir / "log.csv").read_text().strip().splitlines()
            return {
                "run_dir": str(run_dir.relative_to(self.root)),
                "n_fit_images": int(len(fit_images)),
                "poison_rate": poison_rate,
                "epochs": epochs,
                "preset": preset,
                "last_log": log[-1],
            }

        return self.cache.run(f"decoder_{name}_{aux}_{preset}", run)

    def test_sets(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(clean test NCHW, triggered test NCHW of non-target classes, index of those in the test set)."""
        d = self.data
        clean = to_input(d.test_x)
        non_target = np.flatnonzero(d.test_y != self.config.target_class)
        return clean, self.trigger_for(name).apply_uint8_nchw(clean[non_target]), non_target

    def stage_scores(self, name: str, aux: str, preset: str, with_baselines: bool = True) -> dict:
        """DeDe scores of one decoder (both score kinds) and, with_baselines, the baselines' scores,
        on the same three image sets; one .npz per (encoder, aux, preset)."""
        from lab.score_variants import score_run_several_masks
        from training.fit import load_run
        from training.scoring import score_run

        c = self.config
        stage = f"scores_{name}_{aux}" + ("" if preset == c.decoder_preset else f"_{preset}")
        out = self.root / "scores" / f"{stage.removeprefix('scores_')}.npz"

        def run() -> dict:
            fit_images, calibration = self.aux_sets(aux)
            clean, triggered, _ = self.test_sets(name)
            sets = (("calibration", calibration), ("clean", clean), ("triggered", triggered))
            arrays: dict[str, np.ndarray] = {}
            fitted = load_run(self.decoder_dir(name, aux, preset))
            for kind in DEDE_SCORE_KINDS:
                for split, images in sets:
                    arrays[f"dede_{preset}_{kind}/{split}"] = score_run(fitted, images, kind)
            for split, images in sets:  # the variant: real patches visible, several fixed masks
                arrays[f"dede_{preset}_sse_mask90x4/{split}"] = score_run_several_masks(
                    fitted, images, 0.9, 4
                )
            if with_baselines:
                encoder = load_encoder(str(self.encoder_path(name)))
                arrays.update(baseline_scores(encoder, sets, fit_images, c.knn_k, c.strip_blends, c.seed))
            return save_score_table(self.root, out, arrays)

        return self.cache.run(stage, run)

    def stage_feature_scores(self, name: str, aux: str, preset: str) -> dict:
        """The feature-space variant of the score (`lab.score_variants.feature_space_scores`) and the
        decoder-free activation-norm cue beside it, on the same three image sets as stage_scores."""
        from training.fit import load_run

        stage = f"feature_scores_{name}_{aux}_{preset}"
        out = self.root / "scores" / f"{name}_{aux}_{preset}_feature.npz"

        def run() -> dict:
            _, calibration = self.aux_sets(aux)
            clean, triggered, _ = self.test_sets(name)
            fitted = load_run(self.decoder_dir(name, aux, preset))
            sets = (("calibration", calibration), ("clean", clean), ("triggered", triggered))
            return save_score_table(self.root, out, feature_score_table(fitted, preset, sets))

        return self.cache.run(stage, run)

    def shipped_fit_set(self, aux: str) -> np.ndarray:
        """The shipped detector's auxiliary images, uint8 NCHW 32 px: the first `shipped_fit_images`
        of the suite's auxiliary sources (already in a random order), each once, as `dede fit
        --limit` hands them over (no native-resolution quadrants)."""
        d, c = self.data, self.config
        if aux == "ood":
            return ood_views(d.tiny_x[d.splits["ood_aux"][: c.shipped_fit_images]], with_crops=False)
        return to_input(d.train_x[d.splits["id_aux"][: c.shipped_fit_images]])

    def stage_shipped(self, name: str, aux: str) -> dict:
        """The detector this project ships, as a user makes it: `fit_decoder` with `FitSettings`'
        defaults (the decoder, the feature score and its rule, the step and time budget), then
        `calibrate_run` on the suite's clean calibration images with its defaults, then
        `export_bundle`; every score (method `dede_shipped`) comes from the exported ONNX graph, on
        the same three image sets as stage_scores."""
        from training.calibrate import calibrate_run
        from training.export import export_bundle
        from training.fit import FitSettings, fit_decoder, load_holdout_images, load_run
        from training.offline_score import score_array

        c = self.config
        stage = f"shipped_{name}_{aux}"
        out = self.root / "scores" / f"{name}_{aux}_shipped.npz"

        def run() -> dict:
            encoder = load_encoder(str(self.encoder_path(name)))
            fit_images = self.shipped_fit_set(aux)
            _, calibration = self.aux_sets(aux)
            clean, triggered, _ = self.test_sets(name)
            poison_rate = c.id_poison_rate if aux == "id" else 0.0
            settings = FitSettings(
                seed=c.seed,
                data_source=f"lab:{aux}[:{len(fit_images)}]",
                poison_rate=poison_rate,
                max_steps=c.shipped_max_steps,
            )
            run_dir = self.root / "shipped" / f"{name}_{aux}"
            started = time.time()
            fit_decoder(
                encoder,
                fit_images,
                run_dir,
                settings,
                device=self.device,
                poison=self.trigger_for(name).apply_uint8_nchw,
            )
            fit_seconds = time.time() - started
            # mirror_parity: a small suite's calibration set (smoke: 128) is under the export
            # check's 256 images; the threshold is still set on the images as given.
            calibration_result = calibrate_run(
                run_dir, calibration, c.fpr_target, f"lab:{aux} calibration", mirror_parity=True
            )
            manifest = export_bundle(
                load_run(run_dir), run_dir / "bundle", model_name=f"lab-{name}-{aux}", overwrite=True
            )
            # `holdout`: the fit's held-out auxiliary images, where `dede calibrate --holdout` (the
            # paper's setting, no data of the user's own) sets its threshold.
            sets = (
                ("calibration", calibration),
                ("holdout", load_holdout_images(run_dir)),
                ("clean", clean),
                ("triggered", triggered),
            )
            onnx_path = run_dir / "bundle" / "detector.onnx"
            arrays = {f"dede_shipped/{split}": score_array(onnx_path, images) for split, images in sets}
            fit = json.loads((run_dir / "run.json").read_text()).get("result")
            return {
                **save_score_table(self.root, out, arrays),
                "run_dir": str(run_dir.relative_to(self.root)),
                "n_fit_images": int(len(fit_images)),
                "poison_rate": poison_rate,
                "preset": settings.preset,
                "score": manifest.decoder.score,
                "standardisation": calibration_result.get("feature_standardisation"),
                "fit": fit,
                "fit_seconds": round(fit_seconds, 1),
                "parity": manifest.parity,
            }

        return self.cache.run(stage, run)

    def stage_cues(self, name: str) -> dict:
        """The decoder-free cues of one encoder (`lab.baselines.cue_scores`: embedding norm, kNN
        distance, STRIP, each stage's activation norm and mean) on the OOD calibration set, the
        clean test set and the triggered test set; kNN and STRIP use the OOD auxiliary images."""
        c = self.config
        out = self.root / "scores" / "cues" / f"{name}.npz"

        def run() -> dict:
            fit_images, calibration = self.aux_sets("ood")
            clean, triggered, _ = self.test_sets(name)
            sets = (("calibration", calibration), ("clean", clean), ("triggered", triggered))
            encoder = load_encoder(str(self.encoder_path(name)))
            arrays = cue_scores(encoder, sets, fit_images, c.knn_k, c.strip_blends, c.seed)
            return {**save_score_table(self.root, out, arrays), "trigger": self.trigger_name(name)}

        return self.cache.run(f"cues_{name}", run)

    def load_cues(self, name: str) -> dict[str, dict[str, np.ndarray]]:
        return load_score_tables(self.root / "scores" / "cues", name, variants=False)

    def load_scores(self, name: str, aux: str) -> dict[str, dict[str, np.ndarray]]:
        """Every method's score arrays for (encoder, aux), merged over the presets that ran."""
        return load_score_tables(self.root / "scores", f"{name}_{aux}")


def feature_score_table(
    fitted: FittedRun, label: str, sets: tuple[tuple[str, np.ndarray], ...]
) -> dict[str, np.ndarray]:
    """`{"<method>/<split>": scores}` of the feature-space score variants of the decoder named
    `label` (`dede_<label>_feature_<stage>`) and of the decoder-free activation norms beside them."""
    from lab.score_variants import feature_space_scores

    arrays: dict[str, np.ndarray] = {}
    for split, images in sets:
        for method, scores in feature_space_scores(fitted, images).items():
            # The activation norms need no decoder: they are baselines, named as such.
            key = method if method.startswith("activation_norm") else f"dede_{label}_{method}"
            arrays[f"{key}/{split}"] = scores
    return arrays


def save_score_table(root: Path, out: Path, arrays: dict[str, np.ndarray]) -> dict:
    """Write `{"<method>/<split>": scores}` as one .npz (keys `method__split`, the layout
    load_score_tables reads) and return the stage result naming it (relative to `root`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **{k.replace("/", "__"): v for k, v in arrays.items()})
    return {
        "scores": str(out.relative_to(root)),
        "methods": sorted({k.split("/")[0] for k in arrays}),
    }


def load_score_tables(folder: Path, stem: str, variants: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """method -> column -> scores, merged over `<stem>.npz` and, with `variants`, every
    `<stem>_<variant>.npz` in `folder` (keys `method__column`). Without: `<stem>.npz` alone, for
    tables named after encoders, where `badencoder_warp` is another encoder, not a variant of
    `badencoder`'s table."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for path in sorted(folder.glob(f"{stem}*.npz")):
        if path.stem != stem and not (variants and path.stem.startswith(f"{stem}_")):
            continue
        with np.load(path) as archive:
            for key in archive.files:
                method, column = key.split("__")
                out.setdefault(method, {})[column] = archive[key]
    return out


def with_overrides(config: SuiteConfig, **overrides: object) -> SuiteConfig:
    return replace(config, **overrides)
