"""Whose probe does a natural-target backdoor fool? adaptive_natural's runs on lab-heldout.

The attacker sees only its own probes; the victim fits its probe on the attacked encoder, on
images the attacker does not have. For each adaptive_natural encoder this measures the share of
the suite's triggered (non-target) CIFAR-10 test images put in the target class by:

  clean-encoder probe    the lab's linear probe fitted on the CLEAN encoder's embeddings of the
                         attacker's labelled shadow images (run 3's term)
  attacked-encoder probe the same, fitted on the attacked encoder's shadow embeddings (what run 4's
                         term refits every epoch, there on halves)
  suite's probe          `stage_probe`'s: fitted on the attacked encoder's embeddings of 5,000
                         labelled CIFAR-10 train images (the ASR in heldout/REPORT.md)

    DEDE_DATA_DIR=../shared/data python -m benchmarks.detection.probe_transfer

Writes benchmarks/detection/probe_transfer.json with the machine, commit and command. The encoders
come from `dede lab run --suite lab-heldout` and the runs moved under runs/lab-heldout/tries.
"""

from __future__ import annotations

import json

import numpy as np

from benchmarks.provenance import REPO_ROOT, run_record
from lab.attacks.badencoder import attacker_probe
from lab.attacks.triggers import make_trigger
from lab.probe import embed_nchw, train_linear_probe
from lab.suite import SUITES, Lab, to_input
from models.encoders import load_encoder

OUT = REPO_ROOT / "benchmarks" / "detection" / "probe_transfer.json"
ENCODERS = {  # name -> folder under the suite's root
    "run 2 (natural targets, 40 epochs)": "tries/natural_run2_40ep/encoder",
    "run 4 (+ 4 probes refitted per epoch)": "tries/natural_run4_probes/encoder",
    "run 5 (probe term x0.25, the suite's)": "encoders/adaptive_natural_checker",
}


def main() -> None:
    config = SUITES["lab-heldout"]
    lab = Lab(config, progress=False)
    d, target = lab.data, config.target_class
    shadow = to_input(d.train_x[d.splits["shadow"]])
    shadow_labels = d.train_y[d.splits["shadow"]]
    clean_probe = attacker_probe(
        embed_nchw(load_encoder(str(lab.encoder_path("clean"))), shadow), shadow_labels, config.seed
    )
    test = to_input(d.test_x)
    non_target = d.test_y != target
    triggered = make_trigger("checker", (32, 32)).apply_uint8_nchw(test[non_target])
    pick = np.sort(np.random.default_rng(config.seed + 4).permutation(len(d.train_x))[: config.probe_train])
    rows: dict[str, dict] = {}
    for name, folder in ENCODERS.items():
        path = lab.root / folder / "encoder.safetensors"
        if not path.is_file():
            print(f"{name}: {path} is absent, skipped")
            continue
        encoder = load_encoder(str(path))
        z_triggered = embed_nchw(encoder, triggered)
        probes = {
            "clean-encoder probe": clean_probe,
            "attacked-encoder probe": attacker_probe(embed_nchw(encoder, shadow), shadow_labels, config.seed),
            "suite's probe": train_linear_probe(
                embed_nchw(encoder, to_input(d.train_x[pick])),
                d.train_y[pick],
                config.probe_epochs,
                seed=config.seed,
            ),
        }
        rows[name] = {
            probe_name: round(float((probe.predict(z_triggered) == target).mean()), 4)
            for probe_name, probe in probes.items()
        }
        print(name, rows[name])
    record = {
        "what": "share of lab-heldout's checkerboard-triggered non-target CIFAR-10 test images that each "
        "probe puts in the target class, per adaptive_natural encoder",
        "n_triggered": int(non_target.sum()),
        "rows": rows,
        **run_record(["-m", "benchmarks.detection.probe_transfer"]),
    }
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
