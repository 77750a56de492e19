"""A few worker processes that decode the costlier images under an enforced time budget.

A thread cannot be stopped: a decode that runs for minutes keeps its core and holds up shutdown
(issue 21). A process can. Each worker decodes one image at a time with the same `decode_image` as
the service process; when one overruns `DEDE_DECODE_BUDGET_S` (CPU time; or three times that in wall
time, on a machine too busy to give it the CPU), or the request that wanted the image goes away, the
worker is killed (SIGKILL: its CPU is free at once) and a new one takes its place.

Workers are forked from a fork server (multiprocessing's "forkserver" start method) that has this
module and Pillow already imported: forking the service itself, which runs threads (ONNX Runtime,
the event loop, decode threads), is not safe, and spawning a fresh interpreter costs ~0.5 CPU-second
per replacement. A worker dies with the fork server (PR_SET_PDEATHSIG), and the fork server with the
service, so no decode outlives the service, whatever way it ends.

Sending an image and reading the answer run in a thread of this pool's own (one per worker), not on
the event loop: a pipe write or read can block for as long as the worker is not scheduled, and on a
busy machine that stalled the loop for a tenth of a second. The budget is timed on the loop; a worker
killed under a thread's read ends that read (EOF), so no thread outlives its worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import numpy as np

from models.bundle import InputSpec
from service.decoding import DecodeLimits, decode_image
from service.rejection import ImageRejected

log = logging.getLogger("dede.decode")

_PR_SET_PDEATHSIG = 1
# How many nice levels the workers sit below the service's own decode and inference threads.
_EXTRA_NICE = 5
# The budget is CPU time; a worker is also stopped after this many times the budget in wall time.
WALL_FACTOR = 3
_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU of a process so far, from /proc (None where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):  # Linux only; elsewhere the pipe's EOF still ends the loop
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _worker_main(conn: Connection, nice_increment: int) -> None:
    """One worker: image in, uint8 [3, H, W] (or the rejection) out, until the pipe closes."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the service's to handle
    with contextlib.suppress(OSError):
        # Below the decode threads and the model (DEDE_WORKER_NICE_INCREMENT): a costly decode takes
        # only the CPU that cheap requests leave, and its budget (wall time) runs out sooner under load.
        os.nice(min(19, nice_increment + _EXTRA_NICE))
    while True:
        try:
            data, spec, limits = conn.recv()
        except (EOFError, OSError):
            return
        try:
            result: object = decode_image(data, spec, limits)
        except ImageRejected as rejection:
            result = rejection
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this image's, not the worker's
            result = ImageRejected(400, "corrupt_image", f"the image cannot be decoded: {exc}")
        conn.send(result)


class _Worker:
    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.exchange: asyncio.Future | None = None  # the thread talking to it, while one does

    def exchange_blocking(self, job: tuple) -> object:
        self.conn.send(job)
        return self.conn.recv()

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()
        # Closing the pipe under a thread still reading it could hand its descriptor to another
        # file; the kill ends that read (EOF), and the pipe is closed once it has.
        if self.exchange is None or self.exchange.done():
            self._close()
        else:
            self.exchange.add_done_callback(lambda _: self._close())

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


class DecodeWorkers:
    """`processes` workers; `decode` hands one image to an idle one and waits at most `budget_s`."""

    def __init__(self, processes: int, budget_s: float, nice_increment: int = 0) -> None:
        self.processes = processes
        self.budget_s = budget_s
        self._nice_increment = nice_increment
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload([__name__, "service.decode_preload"])
        self._threads = ThreadPoolExecutor(max(1, processes), thread_name_prefix="dede-decode-pipe")
        self._idle: asyncio.Queue[_Worker] | None = None
        self._workers: set[_Worker] = set()
        self._closed = False
        self.killed = 0  # workers killed for overrunning the budget or being abandoned

    def _spawn(self) -> _Worker:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(child_end, self._nice_increment), name="dede-decode", daemon=True
        )
        process.start()
        child_end.close()
        return _Worker(process, parent_end)

    async def start(self) -> None:
        """Start every worker (the fork server first, once per service process)."""
        self._idle = asyncio.Queue()
        for _ in range(self.processes):
            await self._add_worker()

    async def _add_worker(self) -> None:
        worker = await asyncio.to_thread(self._spawn)
        if self._closed:
            worker.kill()
            return
        self._workers.add(worker)
        assert self._idle is not None
        self._idle.put_nowait(worker)

    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and the benchmark's CPU accounting)."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    async def decode(self, data: bytes, spec: InputSpec, limits: DecodeLimits) -> np.ndarray | ImageRejected:
        """The image decoded by a worker, or its rejection; a worker that overruns the budget is
        killed and replaced, and the image gets 422 `decode_budget_exceeded`. Cancelling this (the
        client went away, the request's deadline passed) kills the worker too: no decode outlives
        the request that wanted it."""
        if self._idle is None or self._closed:
            return ImageRejected(503, "draining", "the service is shutting down")
        worker = await self._idle.get()
        done = False
        try:
            loop = asyncio.get_running_loop()
            worker.exchange = loop.run_in_executor(
                self._threads, worker.exchange_blocking, (data, spec, limits)
            )
            # Read by the wait below, or not at all once the worker is killed: never a warning.
            worker.exchange.add_done_callback(lambda f: f.cancelled() or f.exception())
            if await self._within_budget(worker):
                done = True
                return worker.exchange.result()
            return ImageRejected(
                422,
                "decode_budget_exceeded",
                f"decoding this image took more than {self.budget_s:g} CPU-seconds (DEDE_DECODE_BUDGET_S), "
                f"or more than {WALL_FACTOR * self.budget_s:g} s on a busy machine; it was stopped",
            )
        except (EOFError, OSError):
            return ImageRejected(400, "corrupt_image", "the decoder failed on this image")
        finally:
            if done and not self._closed:
                self._idle.put_nowait(worker)
            else:
                self._retire(worker)

    async def _within_budget(self, worker: _Worker) -> bool:
        """Whether the worker answered before spending the budget in CPU time, or WALL_FACTOR times it
        in wall time. CPU, not wall time, is the budget: on a busy machine a worker (niced below the
        rest of the service) gets a fraction of a core, and an image that needs 0.15 CPU-seconds
        could otherwise be refused for the machine's load rather than for its own cost."""
        assert worker.exchange is not None
        loop = asyncio.get_running_loop()
        pid = worker.process.pid
        started, cpu_at_start = loop.time(), _cpu_seconds(pid)
        wall_limit = WALL_FACTOR * self.budget_s
        wait = self.budget_s
        while True:
            done, _ = await asyncio.wait({worker.exchange}, timeout=wait)
            if done:
                return True
            cpu_now = _cpu_seconds(pid)
            if cpu_now is None or cpu_at_start is None:
                return False  # no /proc: the budget is wall time
            spent, elapsed = cpu_now - cpu_at_start, loop.time() - started
            if spent >= self.budget_s or elapsed >= wall_limit:
                return False
            wait = max(0.01, min(self.budget_s - spent, wall_limit - elapsed))

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.discard(worker)
        if self._closed:
            return
        self.killed += 1
        log.warning(
            "decode worker %s stopped (over budget, failed or abandoned); starting another",
            worker.process.pid,
        )
        task = asyncio.get_running_loop().create_task(self._add_worker())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # logged by asyncio if it fails

    def close(self) -> None:
        """Kill every worker now (shutdown: whatever they were decoding is abandoned)."""
        self._closed = True
        for worker in list(self._workers):
            worker.kill()
        for worker in list(self._workers):
            with contextlib.suppress(Exception):
                worker.process.join(timeout=1)
        self._workers.clear()
        self._threads.shutdown(wait=False, cancel_futures=True)
