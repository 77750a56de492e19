"""How long each fine-tune lab suite and each of its parts takes on 2 CPU cores, from the stage wall
times its committed report kept.

The attacks issue bounds a lab suite at 3 hours on 2 CPU cores. lab-hard and lab-heldout grew past
that as attacks were added, so each is also defined in two parts that share its root and stage
cache (`<suite>-plain`, `<suite>-hiding`: lab/suite.py). This sums, for each suite and part, the wall
time of every stage it runs (the clean SimCLR encoder, and each attack's fine-tune, probe and cues,
the clean encoder's included), as each stage took when the committed report's run made it
(`stage_wall_seconds` of the suite's results.json; some stages ran while other jobs shared the
cores), and writes suite_hours.json beside this file.

    python -m benchmarks.detection.suite_hours
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.provenance import REPO_ROOT, run_record
from lab.runner import COMMITTED_LAB_REPORTS
from lab.suite import SUITE_PARTS, SUITES, encoder_name

SUITE_NAMES = tuple(
    name for whole, parts in SUITE_PARTS.items() for name in (whole, *(f"{whole}-{part}" for part in parts))
)
BOUND_HOURS = 3.0


def suite_stages(name: str) -> list[str]:
    """The stage names a fine-tune suite runs (no decoders, no CTRL: these suites have neither)."""
    config = SUITES[name]
    stages = ["simclr_clean", "probe_clean", "cues_clean"]
    for variant, trigger in config.attacks:
        attack = encoder_name(variant, trigger)
        stages += [f"attack_{attack}", f"probe_{attack}", f"cues_{attack}"]
    return stages


def committed_report(name: str) -> Path:
    """The results.json of the suite `name` belongs to (a part reads its whole suite's)."""
    whole = max((w for w in COMMITTED_LAB_REPORTS if name == w or name.startswith(f"{w}-")), key=len)
    return REPO_ROOT / COMMITTED_LAB_REPORTS[whole] / "results.json"


def stage_walls(name: str) -> dict[str, float]:
    """Every stage time of the suite `name` belongs to: its report's, then those of the selections of
    it committed apart (e.g. lab-heldout-ninth), for stages the suite's report does not have."""
    source = committed_report(name)
    whole = next(w for w, p in COMMITTED_LAB_REPORTS.items() if REPO_ROOT / p / "results.json" == source)
    walls: dict[str, float] = {}
    for other, folder in COMMITTED_LAB_REPORTS.items():
        path = REPO_ROOT / folder / "results.json"
        if other.startswith(f"{whole}-") and path.exists():
            walls.update(json.loads(path.read_text())["stage_wall_seconds"])
    return {**walls, **json.loads(source.read_text())["stage_wall_seconds"]}


def main() -> None:
    record = run_record(["-m", "benchmarks.detection.suite_hours"])
    out: dict = {"bound_hours": BOUND_HOURS, "suites": {}, **record}
    for name in SUITE_NAMES:
        source = committed_report(name)
        walls = stage_walls(name)
        stages = suite_stages(name)
        seconds = {s: round(walls[s], 1) for s in stages if s in walls}
        missing = [s for s in stages if s not in walls]
        hours = sum(seconds.values()) / 3600
        out["suites"][name] = {
            "hours": round(hours, 2),
            "within_bound": hours <= BOUND_HOURS and not missing,
            "read_from": str(source.relative_to(REPO_ROOT)),
            "missing_stages": missing,
            "stage_seconds": seconds,
        }
        note = f", {len(missing)} stages missing" if missing else ""
        print(f"{name}: {hours:.2f} h over {len(seconds)} stages{note}")
    path = Path(__file__).with_name("suite_hours.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
