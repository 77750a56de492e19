"""How long each lab-heldout suite takes on this machine, from the wall times its stage cache kept.

The attacks issue bounds a lab suite at 3 hours on 2 CPU cores. lab-heldout grew past that as
attacks were added, so it is also defined in two parts that share its root and stage cache
(`lab-heldout-plain`, `lab-heldout-hiding`, lab/suite.py). This sums, for each of the three, the
wall time of every stage it runs (the clean SimCLR encoder, and each attack's fine-tune, probe and
cues, the clean encoder's included), as each stage took when it ran here, and writes
suite_hours.json beside this file.

    python -m benchmarks.detection.suite_hours
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.provenance import REPO_ROOT, run_record
from lab.suite import SUITES, encoder_name

SUITE_NAMES = ("lab-heldout", "lab-heldout-plain", "lab-heldout-hiding")
BOUND_HOURS = 3.0


def suite_stages(name: str) -> list[str]:
    """The stage names a lab-heldout suite runs (no decoders, no CTRL: those suites have neither)."""
    config = SUITES[name]
    attacks = [encoder_name(variant, trigger) for variant, trigger in config.attacks]
    stages = ["simclr_clean", "probe_clean", "cues_clean"]
    for attack in attacks:
        stages += [f"attack_{attack}", f"probe_{attack}", f"cues_{attack}"]
    return stages


def main() -> None:
    out: dict = {
        "bound_hours": BOUND_HOURS,
        "suites": {},
        **run_record(["-m", "benchmarks.detection.suite_hours"]),
    }
    for name in SUITE_NAMES:
        config = SUITES[name]
        stage_dir = REPO_ROOT / config.root / "stages"
        seconds, missing = {}, []
        for stage in suite_stages(name):
            path = stage_dir / f"{stage}.json"
            if path.is_file():
                seconds[stage] = round(json.loads(path.read_text())["wall_seconds"], 1)
            else:
                missing.append(stage)
        hours = sum(seconds.values()) / 3600
        out["suites"][name] = {
            "hours": round(hours, 2),
            "within_bound": hours <= BOUND_HOURS and not missing,
            "missing_stages": missing,
            "stage_seconds": seconds,
        }
        print(
            f"{name}: {hours:.2f} h over {len(seconds)} stages"
            + (f", {len(missing)} not run" if missing else "")
        )
    path = Path(__file__).with_name("suite_hours.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
