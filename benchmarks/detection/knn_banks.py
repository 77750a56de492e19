"""Which images the kNN cue is measured against decides whether a cue-hiding attacker hides it.

The `adaptive_knn` attacker (lab/attacks/badencoder.py) holds each triggered embedding's kNN
distance to a bank of images (its shadow images; a public out-of-distribution set in runs 5-6)
at the clean images' level; `adaptive_natural` also sends each triggered image to its own real
target-class image. The defender's kNN cue (lab.baselines) measures the distance to the auxiliary
images (Tiny-ImageNet), embedded by the encoder under test. This scores the kNN cue of the
lab-heldout suite's cue-hiding encoders against five banks, on the suite's clean and triggered
CIFAR-10 test images:

  clean encoder, shadow images      the term of runs 1-2 (what they were trained to hide)
  clean encoder, public images      run 5's term (GTSRB train, the lab's public set)
  attacked encoder, shadow images   the same images, embedded as a defender would
  attacked encoder, public images   run 6's term (once per epoch in its training)
  attacked encoder, auxiliary       the suite's kNN cue (`heldout/REPORT.md`)

    DEDE_DATA_DIR=../shared/data python -m benchmarks.detection.knn_banks

Writes benchmarks/detection/knn_banks.json with the machine, commit and command. The encoders come
from `dede lab run --suite lab-heldout` (runs/lab-heldout); the other adaptive_knn runs' encoders
are read from runs/lab-heldout/tries where those runs were moved, and skipped when absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.provenance import REPO_ROOT, run_record
from lab.attacks.triggers import make_trigger
from lab.baselines import knn_distance_scores
from lab.evaluate import auroc
from lab.probe import embed_nchw
from lab.suite import SUITES, Lab, to_input
from models.encoders import load_encoder

OUT = REPO_ROOT / "benchmarks" / "detection" / "knn_banks.json"
# name -> (encoder path under the suite's root, trigger family)
ENCODERS = {
    "adaptive": ("encoders/adaptive", "patch"),
    "adaptive_knn, run 1 (raw-cosine target)": ("tries/adaptive_knn_checker_raw_target", "checker"),
    "adaptive_knn, run 2 (the attack as committed)": ("encoders/adaptive_knn_checker", "checker"),
    "adaptive_knn, run 5 (public bank, norm term x4)": ("tries/run5_public/encoder", "checker"),
    "adaptive_knn, run 6 (public bank embedded by the trained encoder)": (
        "tries/run6_trained/encoder",
        "checker",
    ),
    # one target per triggered image (a real target-class image's clean embedding)
    "adaptive_natural, run 1 (20 epochs)": ("tries/natural_run1_20ep/encoder", "checker"),
    "adaptive_natural, run 2 (40 epochs)": ("tries/natural_run2_40ep/encoder", "checker"),
    "adaptive_natural, run 4 (+ 4 refitted probes)": ("tries/natural_run4_probes/encoder", "checker"),
    "adaptive_natural, run 5 (probe term x0.25, the suite's)": (
        "encoders/adaptive_natural_checker",
        "checker",
    ),
}


def main() -> None:
    config = SUITES["lab-heldout"]
    lab = Lab(config, progress=False)
    shadow = to_input(lab.data.train_x[lab.data.splits["shadow"]])
    aux, _ = lab.aux_sets("ood")
    clean_encoder = load_encoder(str(lab.encoder_path("clean")))
    shadow_clean = embed_nchw(clean_encoder, shadow)
    public_clean = embed_nchw(clean_encoder, to_input(lab.data.gtsrb[0]))
    results: dict[str, dict] = {}
    for name, (folder, trigger) in ENCODERS.items():
        path = lab.root / folder / "encoder.safetensors"
        if not path.is_file():
            print(f"{name}: {path} is absent, skipped")
            continue
        encoder = load_encoder(str(path))
        clean_images, _, non_target = lab.test_sets("clean")
        triggered_images = make_trigger(trigger, (32, 32)).apply_uint8_nchw(clean_images[non_target])
        z_clean, z_triggered = embed_nchw(encoder, clean_images), embed_nchw(encoder, triggered_images)
        banks = {
            "clean encoder, shadow images": shadow_clean,
            "clean encoder, public images": public_clean,
            "attacked encoder, shadow images": embed_nchw(encoder, shadow),
            "attacked encoder, public images": embed_nchw(encoder, to_input(lab.data.gtsrb[0])),
            "attacked encoder, auxiliary images": embed_nchw(encoder, aux),
        }
        row = {}
        for bank_name, bank in banks.items():
            clean_scores = knn_distance_scores(z_clean, bank, config.knn_k)
            triggered_scores = knn_distance_scores(z_triggered, bank, config.knn_k)
            value = auroc(clean_scores, triggered_scores)
            row[bank_name] = {
                "auroc": round(value, 4),
                "strength": round(max(value, 1 - value), 4),
                "median_clean": float(np.median(clean_scores)),
                "median_triggered": float(np.median(triggered_scores)),
            }
            print(f"{name:55s} {bank_name:38s} AUROC {value:.3f}")
        results[name] = {"encoder": str(Path(config.root) / folder), "trigger": trigger, "banks": row}
    record = {
        "what": "kNN-distance cue (k = the suite's knn_k) of lab-heldout's cue-hiding encoders, "
        "clean vs triggered CIFAR-10 test images, against three banks",
        "n_shadow": len(shadow),
        "n_auxiliary": len(aux),
        "results": results,
        **run_record(["-m", "benchmarks.detection.knn_banks"]),
    }
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
