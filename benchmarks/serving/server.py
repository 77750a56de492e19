"""A `python -m service` process for the benchmark: start, wait ready, read its CPU time and metrics, stop."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from models.bundle import Bundle, BundleError, load_bundle

REPO_ROOT = Path(__file__).resolve().parents[2]


def open_benchmark_bundle(
    bundle: Path, synthetic: bool, scratch_dir: Path, out: Path | None, default_out: Path, dry_run_name: str
) -> tuple[Bundle, Path, Path]:
    """(bundle, its path, the folder for the results) of a benchmark run. `synthetic`: a stand-in
    graph made in scratch_dir, results under runs/ (not committed); otherwise the given bundle,
    verified, results in default_out. A bundle that fails verification ends the run with its reason."""
    if synthetic:
        sys.path.insert(0, str(REPO_ROOT / "tests" / "service"))
        from synthetic_bundle import make_synthetic_bundle

        bundle = make_synthetic_bundle(scratch_dir / "synthetic", extra_work=6, width_hidden=512)
        out_dir = out or REPO_ROOT / "runs" / dry_run_name
    else:
        out_dir = out or default_out
    try:
        return load_bundle(bundle), bundle, out_dir
    except BundleError as exc:
        raise SystemExit(f"benchmark: {exc}") from None


_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of `root` and its live descendants, with the children each of them has reaped
    (cutime/cstime): a worker that ended still counts."""
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            stats[int(entry)] = fields
            parents[int(entry)] = int(fields[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    ticks = sum(sum(int(stats[pid][i]) for i in (11, 12, 13, 14)) for pid in tree if pid in stats)
    return ticks / _TICKS_PER_S


class BenchServer:
    def __init__(self, bundle: Path, log_path: Path, cwd: Path = REPO_ROOT, **settings: object) -> None:
        """`cwd`: the checkout whose `service` runs (another commit's worktree, for side-by-side runs)."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEDE_")}
        env.update({"DEDE_BUNDLE": str(bundle), "DEDE_PORT": str(self.port), "DEDE_HOST": "127.0.0.1"})
        env.update({f"DEDE_{k.upper()}": str(v) for k, v in settings.items()})
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.log_path = log_path

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited early; see {self.log_path}:\n{self.log_path.read_text()[-2000:]}"
                )
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout_s} s; see {self.log_path}")

    def cpu_seconds(self) -> float:
        """User + system CPU of the server: its process and every live descendant (workers, decode
        processes), plus what its reaped children used."""
        return tree_cpu_seconds(self.process.pid)

    def metric_sums(self) -> dict[str, float]:
        """Counts and sums of the batch-size and queue-wait histograms, for per-point deltas."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        wanted = ("dede_batch_size_sum", "dede_batch_size_count", "dede_queue_wait_seconds_sum",
                  "dede_queue_wait_seconds_count", "dede_batch_compute_seconds_sum")  # fmt: skip
        values = {}
        for name in wanted:
            match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
            values[name] = float(match.group(1)) if match else 0.0
        return values

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
