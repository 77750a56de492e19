"""Time the README's main command as a new user meets it: a fresh clone, then `make serve`.

    python3.11 -m benchmarks.demo.fresh_build [--dest ../dede-fresh-clone]

Clones this checkout's HEAD beside it (so `../shared/data` is found the same way), runs
`make setup` (venv + pinned installs), then `make serve`, which builds the demo bundle and serves
it; waits for `/readyz`, sends the two sample images to `POST /detect` and stops the server.
Writes `benchmarks/demo/fresh_build.json` with the wall time of each step, the demo's own stage
times, the two answers and the load average (the figures only mean something on an idle machine).
Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.provenance import REPO_ROOT, run_record

RESULT_PATH = Path(__file__).with_name("fresh_build.json")
PORT = 8000


def _timed(cmd: list[str], cwd: Path) -> float:
    print(f"$ {' '.join(cmd)}", flush=True)
    started = time.monotonic()
    subprocess.run(cmd, cwd=cwd, check=True)
    return time.monotonic() - started


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _detect(clone: Path, port: int) -> dict:
    samples = clone / "bundles" / "demo-samples"
    out = subprocess.run(
        [
            "curl",
            "-s",
            "--fail-with-body",
            "-F",
            f"images=@{samples / 'clean.png'}",
            "-F",
            f"images=@{samples / 'triggered.png'}",
            f"http://127.0.0.1:{port}/detect",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dest", type=Path, default=REPO_ROOT.parent / "dede-fresh-clone")
    parser.add_argument("--timeout", type=float, default=3600, help="give up on /readyz after this many s")
    args = parser.parse_args()
    if args.dest.exists():
        shutil.rmtree(args.dest)
    load_before = os.getloadavg()
    steps: dict[str, float] = {}
    steps["clone_s"] = _timed(["git", "clone", "--quiet", str(REPO_ROOT), str(args.dest)], REPO_ROOT.parent)
    steps["make_setup_s"] = _timed(["make", "setup"], args.dest)

    print("$ make serve  (builds the demo bundle, then serves)", flush=True)
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDE_")}  # the defaults a user gets
    server = subprocess.Popen(["make", "serve"], cwd=args.dest, env=env, start_new_session=True)
    try:
        while not _ready(PORT):
            if server.poll() is not None:
                raise SystemExit(f"make serve exited with {server.returncode} before it was ready")
            if time.monotonic() - started > args.timeout:
                raise SystemExit("make serve was not ready in time")
            time.sleep(2)
        steps["make_serve_until_ready_s"] = time.monotonic() - started
        answer = _detect(args.dest, PORT)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=60)
    load_after = os.getloadavg()

    stage_times = json.loads((args.dest / "bundles" / "demo-work" / "timings.json").read_text())
    result = {
        "what": "fresh clone -> make setup -> make serve (demo build + serve) -> POST /detect with the two samples",
        "steps_s": {k: round(v, 1) for k, v in steps.items()},
        "total_s": round(sum(steps.values()), 1),
        "demo_stage_times_s": {k: round(v, 1) for k, v in stage_times.items()},
        "detect_answer": answer,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "run": run_record(["-m", "benchmarks.demo.fresh_build", *sys.argv[1:]]),
    }
    RESULT_PATH.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["steps_s"], indent=2))
    print(f"wrote {RESULT_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
