"""`dede demo`: build a small, real demo bundle on a CPU in minutes, reused on the next start.

Stages (each cached in WORK_DIR, so a killed build resumes where it stopped):
  1. a SimCLR encoder (CIFAR ResNet-18, width 16) pre-trained briefly on CIFAR-10 train;
  2. a BadEncoder backdoor planted in it (10x10 white patch -> a reference image's embedding),
     so the demo has something to catch;
  3. the DeDe decoder (the shipped default: conv decoder, feature score) fitted on clean CIFAR-10
     train images;
  4. the threshold of the run's default score calibrated on clean CIFAR-10 test images for 1% FPR;
  5. the export: detector.onnx + manifest.json, checked against PyTorch;
  6. two sample PNGs beside the bundle for a first request: a test image the bundle passes and
     the same image triggered, which it flags (the first such pair; the rate is benchmarks/demo).
CIFAR-10 comes from $DEDE_DATA_DIR, else torchvision's downloader.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from training import DEFAULT_STANDARDISE_ON
from training.data import REPO_ROOT, data_dir, load_npz

DEFAULT_DEMO_DIR = REPO_ROOT / "bundles" / "demo"
SIMCLR_EPOCHS = 10
BACKDOOR_EPOCHS = 10
FIT_IMAGES = 8_000
CALIBRATION_IMAGES = 4_000
SHADOW_IMAGES = 5_000
REFERENCE_IMAGES = 10
TARGET_CLASS = 0  # airplane


def _cifar10() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, test x, test y), uint8 NHWC."""
    train, test = data_dir() / "cifar10_train.npz", data_dir() / "cifar10_test.npz"
    if train.exists() and test.exists():
        return (*load_npz(train), *load_npz(test))
    import torchvision

    root = REPO_ROOT / ".cache" / "torchvision"
    print(f"{train} not found: downloading CIFAR-10 with torchvision into {root}")
    tr = torchvision.datasets.CIFAR10(root, train=True, download=True)
    te = torchvision.datasets.CIFAR10(root, train=False, download=True)
    return tr.data, np.asarray(tr.targets), te.data, np.asarray(te.targets)


SPLIT_SEED = 0


def demo_splits(train_count: int, test_count: int) -> dict[str, np.ndarray]:
    """Indices of the demo's image sets, each drawn at random (SPLIT_SEED): CIFAR-10 as
    ../shared/data holds it is sorted by class, so its first 5,000 train images are three classes
    and its first 4,000 test images four. The shadow set (the attacker's) and the fit's auxiliary set
    are disjoint train images; the calibration images and the rest of the test set (where the demo's
    rate is measured, benchmarks/demo) are disjoint test images, each in source order."""
    train = np.random.default_rng(SPLIT_SEED).permutation(train_count)
    test = np.random.default_rng(SPLIT_SEED + 1).permutation(test_count)
    return {
        "shadow": np.sort(train[:SHADOW_IMAGES]),
        "fit": np.sort(train[SHADOW_IMAGES : SHADOW_IMAGES + FIT_IMAGES]),
        "calibration": np.sort(test[:CALIBRATION_IMAGES]),
        "evaluation": np.sort(test[CALIBRATION_IMAGES:]),
    }


def build_demo_bundle(
    out_dir: Path = DEFAULT_DEMO_DIR,
    rebuild: bool = False,
    feature_rule: str | None = None,
    work: Path | None = None,
    standardise_on: str | None = None,
    backdoor_epochs: int = BACKDOOR_EPOCHS,
) -> Path:
    """Build (or reuse) the demo bundle at `out_dir`; returns its path. `feature_rule` (default: the
    shipped one), `standardise_on` (`dede calibrate --standardise-on`; default: the shipped one) and
    `work` (default: `<out_dir>-work`) let a benchmark build the same demo, from the same stages,
    under another rule: the fit then only restates its clean statistics. Such a build leaves the
    demo's own stage times (`timings.json`, the first build's) as they were. `backdoor_epochs`: the
    backdoor's training length (a benchmark's variant; a variant needs its own `work`)."""
    from lab.attacks.badencoder import BackdoorSettings, backdoor_encoder
    from lab.attacks.triggers import white_square
    from lab.ssl import pretrain_simclr
    from models.encoders import load_encoder
    from training.calibrate import calibrate_run
    from training.export import export_bundle
    from training.fit import FitSettings, fit_decoder, load_run

    if (out_dir / "manifest.json").exists() and not rebuild:
        return out_dir
    own_work = work is None
    work = work or out_dir.parent / f"{out_dir.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    # A stage whose output a previous build left is reused in about no time: it keeps the time that
    # build recorded for it, so timings.json always says what each stage costs from scratch.
    timings_path = work / "timings.json"
    recorded = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    reused = {
        "simclr": (work / "simclr" / "encoder.safetensors").exists(),
        "backdoor": (work / "badencoder" / "encoder.safetensors").exists(),
        "fit": (work / "run" / "decoder.safetensors").exists(),
    }
    started = time.time()
    train_x, train_y, test_x, test_y = _cifar10()

    print("[1/5] SimCLR pre-training of a width-16 CIFAR ResNet-18")
    clean = pretrain_simclr(train_x, work / "simclr", epochs=SIMCLR_EPOCHS, crop_size=24)
    timings["simclr"] = time.time() - started

    print("[2/5] planting a BadEncoder backdoor (white 10x10 patch)")
    trigger = white_square((32, 32))
    splits = demo_splits(len(train_x), len(test_x))
    shadow = train_x[splits["shadow"]]
    reference = train_x[train_y == TARGET_CLASS][:REFERENCE_IMAGES]
    backdoored = backdoor_encoder(
        clean, shadow, reference, trigger, work / "badencoder", BackdoorSettings(epochs=backdoor_epochs)
    )
    timings["backdoor"] = time.time() - started - sum(timings.values())

    print("[3/5] fitting the DeDe decoder (the shipped default) on clean CIFAR-10 train images")
    encoder = load_encoder(str(backdoored))
    aux = np.ascontiguousarray(train_x[splits["fit"]].transpose(0, 3, 1, 2))
    settings = FitSettings(data_source="cifar10_train")
    if feature_rule:
        settings.feature_rule = feature_rule
    fit_decoder(encoder, aux, work / "run", settings)
    timings["fit"] = time.time() - started - sum(timings.values())

    print("[4/5] calibrating the threshold on clean CIFAR-10 test images (1% FPR)")
    clean_test = np.ascontiguousarray(test_x[splits["calibration"]].transpose(0, 3, 1, 2))
    source = f"cifar10_test ({CALIBRATION_IMAGES} drawn at random, lab.demo.demo_splits)"
    calibrate_run(
        work / "run", clean_test, 0.01, source, standardise_on=standardise_on or DEFAULT_STANDARDISE_ON
    )
    timings["calibrate"] = time.time() - started - sum(timings.values())

    print("[5/5] exporting and verifying the ONNX bundle")
    export_bundle(load_run(work / "run"), out_dir, model_name="dede-demo-badencoder", overwrite=True)
    timings["export"] = time.time() - started - sum(timings.values())

    samples = out_dir.parent / f"{out_dir.name}-samples"
    samples.mkdir(exist_ok=True)
    image = test_x[_sample_index(out_dir, test_x, train_y, test_y, trigger)]
    Image.fromarray(image).save(samples / "clean.png")
    triggered = trigger.apply_uint8_nchw(image.transpose(2, 0, 1)[None])[0].transpose(1, 2, 0)
    Image.fromarray(triggered).save(samples / "triggered.png")
    if own_work:  # a variant built from another bundle's stages would record their cached times (~0 s)
        kept = {
            stage: recorded[stage] for stage, was_reused in reused.items() if was_reused and stage in recorded
        }
        timings_path.write_text(json.dumps({**timings, **kept}, indent=2) + "\n")
    print(f"demo bundle built in {time.time() - started:.0f} s: {out_dir}")
    return out_dir


def _sample_index(  # noqa: ANN001
    bundle: Path, test_x: np.ndarray, train_y: np.ndarray, test_y: np.ndarray, trigger
) -> int:
    """The sample pair for a first request: the first test image outside the calibration set, not of
    the target class, that the bundle passes clean and flags triggered (the demo shows what a flag
    looks like; how often it flags is benchmarks/demo/results.json). The first candidate if none."""
    import onnxruntime as ort

    from models.bundle import ONNX_INPUT, ONNX_SCORE, load_bundle

    held_out = demo_splits(len(train_y), len(test_y))["evaluation"]
    candidates = held_out[test_y[held_out] != TARGET_CLASS][:256]
    clean = np.ascontiguousarray(test_x[candidates].transpose(0, 3, 1, 2))
    loaded = load_bundle(bundle)
    session = ort.InferenceSession(str(loaded.onnx_path), providers=["CPUExecutionProvider"])
    threshold = loaded.threshold
    clean_scores = session.run([ONNX_SCORE], {ONNX_INPUT: clean})[0]
    triggered_scores = session.run([ONNX_SCORE], {ONNX_INPUT: trigger.apply_uint8_nchw(clean)})[0]
    shown = np.flatnonzero((clean_scores <= threshold) & (triggered_scores > threshold))
    if len(shown) == 0:
        print("warning: no test image among the first 256 is passed clean and flagged triggered")
        return int(candidates[0])
    return int(candidates[shown[0]])
