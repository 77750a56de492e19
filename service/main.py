"""Start the service under uvicorn, with a graceful drain on SIGTERM/SIGINT.

Entry points (for `dede serve` and `python -m service`):
    run(settings: Settings | None = None) -> None
        Serve until stopped. `None` reads every setting from DEDE_* environment variables.
        Exits with a one-line message (status 1) if the bundle is missing, fails verification, or
        holds a graph ONNX Runtime cannot serve as the manifest describes. With DEDE_WORKERS > 1
        (or auto choosing more than one) the service runs as several processes on one port
        (`service.workers`), each of them `serve`.
    main(argv: list[str] | None = None) -> None
        Parse `--bundle DIR --port N ...` (one flag per setting, overriding DEDE_* variables),
        then `run`. To give another CLI the same flags without importing the server stack:
        `service.settings.add_settings_arguments(parser)` then `settings_from_args(args, parser)`.

With DEDE_METRICS_PORT set, /metrics, /healthz and /readyz are also served on that port, from a
thread with its own event loop, and /metrics leaves the main port.

Drain: the first signal turns readiness off and answers new /detect requests with 503; requests
already accepted (queued or running) finish; then uvicorn stops. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from types import FrameType

import uvicorn

from models.bundle import BundleError, load_bundle
from service.app import create_app, create_ops_app, load_detector
from service.logs import configure_logging
from service.protocol import header_deadline_protocol
from service.runtime import RuntimeLoadError
from service.settings import Settings, add_settings_arguments, settings_from_args
from service.state import ServiceState
from service.workers import listening_socket, resolve_workers, run_workers

log = logging.getLogger("dede.service")
# After the drain: how long uvicorn waits for connections to close before cancelling their tasks.
_AFTER_DRAIN_S = 0.5


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM/SIGINT drains accepted work before stopping."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self._state = state
        self._drain_signal: int | None = None
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler runs between any two bytecodes of the loop's thread: only set a flag here
        # (no locks, no metrics); `on_tick` starts the drain on the loop within 100 ms.
        if self._drain_signal is not None or not self.started:
            super().handle_exit(sig, frame)
            return
        self._drain_signal = sig
        self._state.draining = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_signal is not None and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain())
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        state = self._state
        state.start_draining()
        name = signal.Signals(self._drain_signal).name if self._drain_signal else "signal"
        log.info("%s received: not ready, refusing new work, finishing %d request(s)", name, state.in_flight)
        deadline = time.monotonic() + state.settings.drain_timeout_s
        while _work_left(state) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if _work_left(state):
            log.warning("drain timeout (%.0f s) reached with work left", state.settings.drain_timeout_s)
        else:
            log.info("drained: every accepted request answered")
        # The drain above was the accepted work's time. uvicorn's own graceful wait would add up to
        # its full timeout again before cancelling what is left (whose decodes in worker processes
        # are then killed with the workers): exit within the drain timeout plus about a second.
        self.config.timeout_graceful_shutdown = _AFTER_DRAIN_S
        self.should_exit = True


def _work_left(state: ServiceState) -> bool:
    return state.in_flight > 0 or (state.batcher is not None and state.batcher.queue_depth > 0)


class _OpsServer:
    """The operations app (metrics and probes) on its own port, served by a second uvicorn server in
    a thread with its own event loop. Its socket is bound first thing in `run`, so that a port already
    taken stops start-up at once with one line; signals stay with the main server (uvicorn installs
    handlers only on the main thread)."""

    def __init__(self, state: ServiceState, settings: Settings, sock: socket.socket) -> None:
        self._socket = sock
        config = uvicorn.Config(
            create_ops_app(state),
            log_config=None,
            log_level=settings.log_level,
            access_log=False,
            lifespan="off",
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="dede-metrics", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._socket.close()


def run(settings: Settings | None = None) -> None:
    """Serve the bundle named by `settings` (default: from DEDE_* environment variables), in one
    process or, with more than one worker (DEDE_WORKERS), in several (`service.workers`)."""
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format)
    workers = resolve_workers(settings)
    if workers > 1:
        run_workers(
            serve,
            settings.model_copy(update={"workers": workers}),
            workers,
            preflight=lambda: _check_graph(settings),
        )
    else:
        serve(settings)


def _check_graph(settings: Settings) -> None:
    """Load the bundle's graph once in the supervisor, as one process does before uvicorn starts: a
    bundle that cannot serve is one line, not one per worker among the supervisor's log lines."""
    try:
        load_detector(load_bundle(settings.bundle), settings)
    except (BundleError, RuntimeLoadError) as exc:
        raise SystemExit(f"dede serve: {exc}") from None


def serve(
    settings: Settings, main_socket: socket.socket | None = None, ops_socket: socket.socket | None = None
) -> None:
    """One serving process. main_socket / ops_socket: listening sockets bound by a supervisor
    (`service.workers`); without them this process binds DEDE_PORT (and DEDE_METRICS_PORT) itself."""
    configure_logging(settings.log_level, settings.log_format)
    if ops_socket is None and settings.metrics_port is not None:
        ops_socket = listening_socket(settings.host, settings.metrics_port, "DEDE_METRICS_PORT")
    try:
        bundle = load_bundle(settings.bundle)
        detector = load_detector(bundle, settings)  # before uvicorn: a bad graph is one line, not a traceback
    except (BundleError, RuntimeLoadError) as exc:
        raise SystemExit(f"dede serve: {exc}") from None
    app = create_app(settings, bundle=bundle, detector=detector)
    metrics = app.state.service.metrics
    config = uvicorn.Config(
        app,
        http=header_deadline_protocol(
            settings.header_timeout_s,
            on_timeout=lambda: metrics.requests.labels("other", "408").inc(),
        ),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the logging set up above (text or JSON, request ids)
        log_level=settings.log_level,
        access_log=False,  # the service writes its own access line, with the request id
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
        server_header=False,
    )
    server = _DrainingServer(config, app.state.service)
    ops = _OpsServer(app.state.service, settings, ops_socket) if ops_socket is not None else None
    if ops is not None:
        ops.start()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[main_socket] if main_socket is not None else None)
    finally:
        if ops is not None:
            ops.stop()


def build_parser(prog: str = "python -m service") -> argparse.ArgumentParser:
    """One flag per setting; a flag overrides its DEDE_* variable, which overrides the default."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve a dede detector bundle over HTTP (POST /detect, /metrics, /docs)."
    )
    add_settings_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    run(settings_from_args(parser.parse_args(argv), parser))
