"""What every committed result file records beside its figures: commit, machine, command, time."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def run_record(argv: list[str] | None = None, outputs: tuple[Path, ...] = ()) -> dict:
    """The provenance block of a result file. `outputs`: the files the command itself (re)writes; a
    change to them alone does not mark the tree dirty (a benchmark that adds cases to its own
    committed results, run again before the last run's were committed)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    if status:
        # Outputs outside the repository (a benchmark told to write elsewhere) are not in its status.
        own = {
            str(Path(p).resolve().relative_to(REPO_ROOT))
            for p in outputs
            if Path(p).resolve().is_relative_to(REPO_ROOT)
        }
        # Each line is "XY path"; `_git` strips the output, which takes the first line's leading
        # blank (" M path" -> "M path"), so the path is the line's last field, not line[3:].
        status = "\n".join(line for line in status.splitlines() if line.split(maxsplit=1)[-1] not in own)
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "command": " ".join(["python", *(sys.argv if argv is None else argv)]),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "memory_gib": _memory_gib(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        # 1/5/15-minute load at the end: figures taken while other jobs shared the cores show it.
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
