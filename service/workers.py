"""Several serving processes behind one port (`DEDE_WORKERS`, issue 23).

One Python process tops out at about one core of request handling (HTTP parsing, decoding, JSON),
far below what a GPU, or a near-free graph on a CPU, can score. With `workers > 1` the service
runs as a small supervisor and N worker processes:

- the supervisor binds the port (and `DEDE_METRICS_PORT`) once and hands the listening sockets to
  every worker, as uvicorn's own multi-worker mode does: the kernel gives each new connection to
  whichever worker accepts first, so an idle worker takes it;
- each worker is the single-process service (`service.main.serve`): its own ONNX Runtime session
  (on CUDA, on the same GPU), its own decode threads and batcher, its own drain on SIGTERM;
- metrics use `prometheus_client`'s multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`): whichever
  worker answers `/metrics` reports the sum over every worker (gauges: `service.metrics`);
- `/readyz` answers 200 only while every worker is ready (`ready_workers`, from the same files);
- SIGTERM/SIGINT are passed to every worker, which drain as one process does; the supervisor waits
  for them (drain timeout + 2 s, then SIGKILL) and exits. A worker that dies is replaced; one that
  dies while starting (a bundle the session cannot load) stops the whole service with its message.

Workers are started with multiprocessing's "spawn" method (a fresh interpreter: forking a process
that has imported ONNX Runtime or CUDA is not safe), before any session is loaded here.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from service.metrics import MULTIPROCESS_ENV as MULTIPROC_ENV
from service.settings import Settings

log = logging.getLogger("dede.workers")

WORKER_INDEX_ENV = "DEDE_WORKER_INDEX"
_PR_SET_PDEATHSIG = 1
# A worker that exits within this long of its start failed to start: restarting it would fail again.
_STARTUP_GRACE_S = 60.0
# After the drain timeout, how long the supervisor waits for its workers before killing them.
_EXIT_MARGIN_S = 2.0


def auto_workers(provider_is_cuda: bool, cpu_count: int | None = None) -> int:
    """`DEDE_WORKERS=0` (auto): on CUDA one worker per core up to 8, since one Python process,
    not the GPU, is the limit there. On a CPU one per two cores, since ONNX Runtime already spreads
    one batch over every core and request handling is then the smaller share of the work; but two
    wherever there are two cores, not one. Measured on 2 cores (benchmarks/serving/workers/, three
    rounds, medians): two workers of one intra-op thread each beat one of two threads at 15 of the
    16 points of both grids (not a lone client sending 8 images per request to the demo's
    model-bound graph: 0.79x), and keep the half-load tail at p99/p50 <= 2.3 where one process
    reached 4.06 on the near-free graph; and a worker that dies leaves the other serving while the
    supervisor replaces it."""
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    if provider_is_cuda:
        return max(1, min(8, cores))
    return max(min(2, cores), cores // 2)


def resolve_workers(settings: Settings) -> int:
    if settings.workers > 0:
        return settings.workers
    from service.runtime import resolve_providers  # onnxruntime: only when auto must look

    providers = resolve_providers(settings.execution_providers)
    return auto_workers("CUDAExecutionProvider" in providers)


def worker_settings(settings: Settings, workers: int, cpu_count: int | None = None) -> Settings:
    """A worker's settings: ONNX Runtime's intra-op threads split among the workers (unless set),
    so that N sessions do not each start one thread per core."""
    if settings.intra_op_threads or workers <= 1:
        return settings
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return settings.model_copy(update={"intra_op_threads": max(1, cores // workers)})


def listening_socket(host: str, port: int, what: str) -> socket.socket:
    """A bound, listening socket; a port that cannot be had stops start-up with one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"dede serve: cannot listen on {host}:{port} ({what}): {exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


# serve(settings, main_socket=..., ops_socket=...): `service.main.serve`, passed in by its caller
# (a module-level function, so that it pickles by name into the spawned worker).
Serve = Callable[..., None]


def _worker_main(
    serve: Serve, settings: Settings, index: int, main_socket: socket.socket, ops_socket: socket.socket | None
) -> None:
    """One worker process: the single-process service on the sockets the supervisor bound."""
    os.environ[WORKER_INDEX_ENV] = str(index)
    # A terminal's Ctrl-C reaches the supervisor alone, which passes it on once: a worker that got it
    # twice (from the terminal and from the supervisor) would skip its drain.
    os.setpgrp()
    # And if the supervisor dies without passing anything on, the worker drains and exits.
    with contextlib.suppress(Exception):  # Linux only
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    with contextlib.suppress(KeyboardInterrupt):
        serve(settings, main_socket=main_socket, ops_socket=ops_socket)


class WorkerGroup:
    """The supervisor: binds, spawns, watches, forwards signals, waits."""

    def __init__(self, serve: Serve, settings: Settings, workers: int, preflight: Callable[[], None]) -> None:
        self._serve = serve
        self._preflight = preflight
        self.settings = settings
        self.workers = workers
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[BaseProcess] = []
        self._started_at: list[float] = []
        self._signals: list[int] = []
        self._stopping = False
        self._metrics_dir: str | None = None
        self._own_metrics_dir = False

    def run(self) -> int:
        """Serve until a signal, or a worker failing to start; the exit status."""
        settings = self.settings
        main_socket = listening_socket(settings.host, settings.port, "DEDE_PORT")
        ops_socket = (
            listening_socket(settings.host, settings.metrics_port, "DEDE_METRICS_PORT")
            if settings.metrics_port is not None
            else None
        )
        self._prepare_metrics_dir()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._preflight()
            child_settings = worker_settings(settings, self.workers)
            for index in range(self.workers):
                self._processes.append(self._spawn(child_settings, index, main_socket, ops_socket))
                self._started_at.append(time.monotonic())
            log.info(
                "supervisor %d: %d workers on %s:%d", os.getpid(), self.workers, settings.host, settings.port
            )
            status = self._watch(child_settings, main_socket, ops_socket)
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            main_socket.close()
            if ops_socket is not None:
                ops_socket.close()
            if self._own_metrics_dir and self._metrics_dir:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
        return status

    def _prepare_metrics_dir(self) -> None:
        existing = os.environ.get(MULTIPROC_ENV)
        if existing:  # a directory the deployment chose: wiped, as prometheus_client requires per run
            Path(existing).mkdir(parents=True, exist_ok=True)
            for file in glob.glob(os.path.join(existing, "*.db")):
                os.remove(file)
            self._metrics_dir = existing
        else:
            self._metrics_dir = tempfile.mkdtemp(prefix="dede-metrics-")
            self._own_metrics_dir = True
            os.environ[MULTIPROC_ENV] = self._metrics_dir  # inherited by every worker

    def _spawn(
        self, settings: Settings, index: int, main_socket: socket.socket, ops_socket: socket.socket | None
    ) -> BaseProcess:
        process = self._context.Process(
            target=_worker_main,
            args=(self._serve, settings, index, main_socket, ops_socket),
            name=f"dede-worker-{index}",
        )
        process.start()
        return process

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._signals.append(sig)  # handled in _watch: a handler only records

    def _watch(self, settings: Settings, main_socket: socket.socket, ops_socket: socket.socket | None) -> int:
        while True:
            if self._signals:
                return self._shut_down()
            for index, process in enumerate(self._processes):
                if process.is_alive():
                    continue
                _mark_dead(process.pid)
                uptime = time.monotonic() - self._started_at[index]
                if uptime < _STARTUP_GRACE_S and process.exitcode != -signal.SIGKILL:
                    log.error(
                        "worker %d exited with %s while starting; stopping the service",
                        index,
                        process.exitcode,
                    )
                    return 1
                log.warning(
                    "worker %d (pid %s) died with %s; starting a new one",
                    index,
                    process.pid,
                    process.exitcode,
                )
                self._processes[index] = self._spawn(settings, index, main_socket, ops_socket)
                self._started_at[index] = time.monotonic()
            time.sleep(0.1)

    def _shut_down(self) -> int:
        """Pass the signal on; a second signal is passed on too (the workers then stop at once)."""
        self._stopping = True
        forwarded = 0
        deadline = time.monotonic() + self.settings.drain_timeout_s + _EXIT_MARGIN_S
        while any(p.is_alive() for p in self._processes) and time.monotonic() < deadline:
            while forwarded < len(self._signals):
                sig = self._signals[forwarded]
                forwarded += 1
                log.info("%s: passed to %d workers", signal.Signals(sig).name, len(self._processes))
                for process in self._processes:
                    if process.is_alive() and process.pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(process.pid, sig)
            time.sleep(0.05)
        return 0

    def _stop_all(self) -> None:
        for process in self._processes:
            if process.is_alive():
                log.error("worker pid %s still running at exit: killed", process.pid)
                process.kill()
            process.join(timeout=5)
            _mark_dead(process.pid)


def _mark_dead(pid: int | None) -> None:
    if pid is None or not os.environ.get(MULTIPROC_ENV):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def run_workers(serve: Serve, settings: Settings, workers: int, preflight: Callable[[], None]) -> None:
    """Serve with `workers` processes (see the module docstring); exits 1 if one fails to start.
    `preflight` runs once the ports are bound, before any worker starts: it checks that the bundle
    can serve and raises SystemExit with one line when it cannot."""
    status = WorkerGroup(serve, settings, workers, preflight).run()
    if status:
        raise SystemExit(status)
