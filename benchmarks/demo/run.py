"""Does the demo bundle catch its own backdoor? Clean vs triggered CIFAR-10 test images through the
bundle's ONNX graph (test images outside the demo's calibration set, target class excluded).

    python -m benchmarks.demo.run --bundle bundles/demo

Writes benchmarks/demo/results.json, or --out (with commit, machine and command). Where the demo's work folder
is beside the bundle, it also measures the backdoor itself: a linear probe on the backdoored
encoder's embeddings of 5,000 CIFAR-10 train images gives the attack's success rate on the same
triggered images, and the flag rate is split by whether the backdoor fired on each image (an image
it did not fire on carries no attack, whatever its pixels).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.provenance import REPO_ROOT, run_record
from lab.attacks.triggers import white_square
from lab.demo import TARGET_CLASS, demo_splits
from lab.evaluate import auprc, auroc, tpr_at_fpr
from lab.probe import embed_nchw, train_linear_probe
from models.bundle import ONNX_INPUT, ONNX_SCORE, load_bundle
from models.encoders import load_encoder
from training import DEFAULT_FEATURE_RULE, FEATURE_RULE_NAMES, STANDARDISE_ON
from training.data import data_dir, load_npz


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, not {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", default=str(REPO_ROOT / "bundles" / "demo"))
    parser.add_argument("--n", type=int, default=2000, help="clean images (and as many triggered)")
    parser.add_argument(
        "--out",
        default=str(REPO_ROOT / "benchmarks" / "demo" / "results.json"),
        help="where to write the figures (the README's are results.json, the shipped default's)",
    )
    parser.add_argument(
        "--feature-rule",
        choices=list(FEATURE_RULE_NAMES),
        help="measure the demo under this rule instead: bundles/demo-<rule>, built from the demo's own "
        "stages (the same SimCLR, backdoor and decoder; the clean statistics restated for the rule)",
    )
    parser.add_argument(
        "--standardise-on",
        choices=list(STANDARDISE_ON),
        help="measure the demo with its feature score standardised on these images instead "
        "(`dede calibrate --standardise-on`): bundles/demo-<rule>-<this>, built from the demo's own stages",
    )
    parser.add_argument(
        "--backdoor-epochs",
        type=_positive,
        help="measure a demo whose backdoor trains this many epochs instead: bundles/demo-backdoor<N>, "
        "with its own stages (the demo's SimCLR stage reused when built: the same code and images)",
    )
    args = parser.parse_args()

    demo = Path(args.bundle)
    work = demo.parent / f"{demo.name}-work"  # the demo's stages, when built beside the bundle
    if args.backdoor_epochs:
        from lab.demo import build_demo_bundle

        variant = demo.parent / f"{demo.name}-backdoor{args.backdoor_epochs}"
        variant_work = variant.parent / f"{variant.name}-work"
        if (work / "simclr").is_dir() and not (variant_work / "simclr").exists():
            shutil.copytree(work / "simclr", variant_work / "simclr")
        args.bundle = str(build_demo_bundle(variant, work=variant_work, backdoor_epochs=args.backdoor_epochs))
        work = variant_work
    elif args.feature_rule or args.standardise_on:
        from lab.demo import build_demo_bundle

        rule = args.feature_rule or DEFAULT_FEATURE_RULE
        suffix = f"-{args.standardise_on}" if args.standardise_on else ""
        args.bundle = str(
            build_demo_bundle(
                demo.parent / f"{demo.name}-{rule}{suffix}",
                rebuild=True,
                feature_rule=rule,
                work=work,
                standardise_on=args.standardise_on,
            )
        )
    bundle = load_bundle(args.bundle)
    x, y = load_npz(data_dir() / "cifar10_test.npz")
    held_out = demo_splits(len(load_npz(data_dir() / "cifar10_train.npz")[1]), len(y))["evaluation"]
    keep = held_out[y[held_out] != TARGET_CLASS][: args.n]
    clean = np.ascontiguousarray(x[keep].transpose(0, 3, 1, 2))
    triggered = white_square((32, 32)).apply_uint8_nchw(clean)
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])

    def scores(images: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [
                session.run([ONNX_SCORE], {ONNX_INPUT: images[i : i + 256]})[0]
                for i in range(0, len(images), 256)
            ]
        )

    clean_scores, triggered_scores = scores(clean), scores(triggered)
    threshold = bundle.threshold
    result = {
        **run_record(),
        "bundle": bundle.manifest.model_name,
        "threshold": threshold,
        "n_clean": int(len(clean)),
        "n_triggered": int(len(triggered)),
        "metrics": {
            "auroc": auroc(clean_scores, triggered_scores),
            "auprc": auprc(clean_scores, triggered_scores),
            "tpr_at_1pct_fpr": tpr_at_fpr(clean_scores, triggered_scores, 0.01),
            "tpr_at_5pct_fpr": tpr_at_fpr(clean_scores, triggered_scores, 0.05),
        },
        "tpr_at_bundle_threshold": float((triggered_scores > threshold).mean()),
        "fpr_at_bundle_threshold": float((clean_scores > threshold).mean()),
        # What the export verified and calibration measured, as recorded in the bundle itself.
        "export_parity": bundle.manifest.parity,
        "calibration": {
            k: bundle.manifest.threshold.model_dump()[k]
            for k in ("fpr_target", "n_calibration", "realised_fpr", "realised_fpr_ci95", "n_holdout")
        },
        "bundle_bytes": sum(f.stat().st_size for f in bundle.root.iterdir() if f.is_file()),
    }
    encoder = work / "badencoder" / "encoder.safetensors"
    if encoder.exists():
        result["backdoor"] = backdoor_strength(encoder, triggered, triggered_scores > threshold)
    timings = encoder.parent.parent / "timings.json"  # the build's own stage times (lab/demo.py)
    if timings.exists():
        result["build_stage_seconds"] = json.loads(timings.read_text())
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps({k: result[k] for k in ("metrics", "tpr_at_bundle_threshold", "fpr_at_bundle_threshold")})
    )


PROBE_IMAGES = 5_000


def backdoor_strength(encoder_path: Path, triggered: np.ndarray, flagged: np.ndarray) -> dict:
    """The attack's success rate on these triggered images (a linear probe trained on clean train
    embeddings predicts the target class), and the bundle's flag rate where it fired and where not."""
    encoder = load_encoder(str(encoder_path))
    x, y = load_npz(data_dir() / "cifar10_train.npz")
    pick = np.sort(np.random.default_rng(0).permutation(len(y))[:PROBE_IMAGES])
    probe = train_linear_probe(
        embed_nchw(encoder, np.ascontiguousarray(x[pick].transpose(0, 3, 1, 2))), y[pick]
    )
    fired = probe.predict(embed_nchw(encoder, triggered)) == TARGET_CLASS
    return {
        "encoder": str(encoder_path),
        "probe_train_images": PROBE_IMAGES,
        "asr": float(fired.mean()),
        "flagged_where_fired": float(flagged[fired].mean()) if fired.any() else None,
        "flagged_where_not_fired": float(flagged[~fired].mean()) if (~fired).any() else None,
    }


if __name__ == "__main__":
    main()
