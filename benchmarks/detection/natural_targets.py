"""Where a cue-hiding attacker can send triggered embeddings, measured on the clean encoder alone.

Every kNN-hiding attack of lab-heldout steered all triggered images to one target point and left the
kNN cue (strength 0.94-0.99 against the defender's Tiny-ImageNet bank). This places triggered
embeddings by hand, with no training, on the suite's clean encoder, and scores each placement as
the attack would be scored: ASR by the suite's own linear probe (the same training images, epochs
and seed as `stage_probe`), and the kNN and embedding-norm cues against the suite's clean CIFAR-10
test images, with the suite's auxiliary bank. Each non-target test image's "triggered embedding" is:

  one point          the mean of the target images below (what a single-target attack aims at)
  clean airplanes    the clean embeddings of the target class's own test images (not a placement:
                     how surely the probe knows the class itself)
  natural targets    the clean embedding of the nearest (cosine about the shadow mean) of the M
                     target-class shadow images that the attacker's own probe (fitted on its
                     labelled shadow images) puts in the target class by the widest margin
                     (`lab.attacks.badencoder.natural_targets`, adaptive_natural's targets)

adaptive_natural's setting (M = 100) was read from this table before its first run: the largest M
at which the placement keeps ASR at 100%.

    DEDE_DATA_DIR=../shared/data python -m benchmarks.detection.natural_targets

Writes benchmarks/detection/natural_targets.json with the machine, commit and command. Needs the
suite's clean encoder (`dede lab run --suite lab-heldout`, runs/lab-heldout).
"""

from __future__ import annotations

import json

import numpy as np

from benchmarks.provenance import REPO_ROOT, run_record
from lab.attacks.badencoder import attacker_probe, natural_targets
from lab.baselines import knn_distance_scores
from lab.evaluate import auroc
from lab.probe import embed_nchw, train_linear_probe
from lab.suite import SUITES, Lab, to_input
from models.encoders import load_encoder

OUT = REPO_ROOT / "benchmarks" / "detection" / "natural_targets.json"
COUNTS = (25, 50, 100, 200, 400)


def main() -> None:
    config = SUITES["lab-heldout"]
    lab = Lab(config, progress=False)
    d, target = lab.data, config.target_class
    encoder = load_encoder(str(lab.encoder_path("clean")))
    z_shadow = embed_nchw(encoder, to_input(d.train_x[d.splits["shadow"]]))
    shadow_labels = d.train_y[d.splits["shadow"]]
    aux, _ = lab.aux_sets("ood")
    bank = embed_nchw(encoder, aux)
    clean_images, _, non_target = lab.test_sets("clean")
    z_test = embed_nchw(encoder, clean_images)
    # The suite's probe, as stage_probe trains it.
    pick = np.sort(np.random.default_rng(config.seed + 4).permutation(len(d.train_x))[: config.probe_train])
    probe = train_linear_probe(
        embed_nchw(encoder, to_input(d.train_x[pick])), d.train_y[pick], config.probe_epochs, seed=config.seed
    )
    clean_knn = knn_distance_scores(z_test, bank, config.knn_k)
    clean_norm = np.linalg.norm(z_test, axis=1)

    def score(placed: np.ndarray) -> dict:
        knn = auroc(clean_knn, knn_distance_scores(placed, bank, config.knn_k))
        norm = auroc(clean_norm, np.linalg.norm(placed, axis=1))
        return {
            "asr": round(float((probe.predict(placed) == target).mean()), 4),
            "knn_auroc": round(knn, 4),
            "embedding_norm_auroc": round(norm, 4),
            "strongest_cue": round(max(knn, 1 - knn, norm, 1 - norm), 4),
        }

    rows: dict[str, dict] = {"clean airplanes": score(z_test[d.test_y == target])}
    centred = z_shadow - z_shadow.mean(0, keepdims=True)
    shadow_unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    test_unit = z_test[non_target] - z_shadow.mean(0, keepdims=True)
    test_unit /= np.linalg.norm(test_unit, axis=1, keepdims=True)
    own_probe = attacker_probe(z_shadow, shadow_labels, seed=config.seed)
    for count in COUNTS:
        chosen, _ = natural_targets(z_shadow, shadow_labels, target, count, own_probe)
        nearest = chosen[np.argmax(test_unit @ shadow_unit[chosen].T, axis=1)]
        rows[f"natural targets, M = {count}"] = score(z_shadow[nearest])
        one_point = np.repeat(z_shadow[chosen].mean(0, keepdims=True), len(non_target), axis=0)
        rows[f"one point (the mean of those {count})"] = score(one_point)
    for name, row in rows.items():
        print(f"{name:40s} " + " ".join(f"{k} {v}" for k, v in row.items()))
    record = {
        "what": "triggered embeddings placed by hand on lab-heldout's clean encoder: ASR by the suite's "
        "probe, kNN and embedding-norm cue AUROCs against its clean CIFAR-10 test images",
        "n_non_target_test": int(len(non_target)),
        "n_auxiliary_bank": int(len(bank)),
        "rows": rows,
        **run_record(["-m", "benchmarks.detection.natural_targets"]),
    }
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
