"""The FastAPI app factory. Startup: bundle verified (in `create_app`), session loaded (lifespan),
warm-up of every batch bucket in the background, then ready. Shutdown: no new work, queue drained."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from models.bundle import Bundle, load_bundle
from service.api import metrics_router, probes, router
from service.batcher import Batcher
from service.console import router as console_router
from service.decode_workers import DecodeWorkers
from service.errors import ServiceError
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware
from service.runtime import Detector, lower_this_thread_priority, resolve_providers
from service.settings import Settings
from service.state import ServiceState
from service.v2 import router as v2_router

log = logging.getLogger("dede.service")


def create_app(
    settings: Settings | None = None, bundle: Bundle | None = None, detector: Detector | None = None
) -> FastAPI:
    """Build the app. Verifies the bundle now (raises `BundleError`); the ONNX Runtime session is
    `detector` if given (`run` loads it first, to fail with one clear line), else loaded at startup."""
    settings = settings or Settings()
    bundle = bundle or load_bundle(settings.bundle)
    manifest = bundle.manifest
    metrics = Metrics(settings.max_batch_size, bundle.threshold)
    state = ServiceState(settings=settings, bundle=bundle, metrics=metrics, detector=detector)

    app = FastAPI(
        title="dede detection service",
        summary="Flags images carrying a backdoor trigger for a self-supervised encoder (DeDe).",
        version=manifest.model_version,
        lifespan=_lifespan,
    )
    app.state.service = state
    app.include_router(router)
    app.include_router(probes)
    app.include_router(v2_router)
    app.include_router(console_router)
    if settings.metrics_port is None:
        app.include_router(metrics_router)
    app.add_exception_handler(ServiceError, _service_error_response)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    # Added last, so it is the outermost: it sees every answer, CORS preflights included.
    app.add_middleware(RequestContextMiddleware, metrics=metrics, access_log_enabled=settings.access_log)
    return app


def create_ops_app(state: ServiceState) -> FastAPI:
    """/metrics, /healthz and /readyz alone, for DEDE_METRICS_PORT: they read the main app's state
    (same metrics, same readiness) and serve no API, no docs."""
    app = FastAPI(title="dede operations", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.service = state
    app.include_router(probes)
    app.include_router(metrics_router)
    app.add_exception_handler(ServiceError, _service_error_response)
    app.add_middleware(
        RequestContextMiddleware, metrics=state.metrics, access_log_enabled=state.settings.access_log
    )
    return app


async def _service_error_response(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return exc.to_response()


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServiceState = app.state.service
    settings = state.settings
    manifest = state.bundle.manifest
    detector = state.detector
    if detector is None:
        # Loading can take seconds on a large graph; keep the loop free meanwhile.
        detector = await asyncio.to_thread(load_detector, state.bundle, settings)
        state.detector = detector
    state.metrics.set_model(
        manifest.model_name, manifest.model_version, detector.provider, state.bundle.threshold
    )
    state.decode_pool = ThreadPoolExecutor(
        settings.decode_threads,
        thread_name_prefix="dede-decode",
        initializer=lower_this_thread_priority,
        initargs=(settings.worker_nice_increment,),
    )
    if settings.decode_processes:
        workers = DecodeWorkers(
            settings.decode_processes, settings.decode_budget_s, settings.worker_nice_increment
        )
        await workers.start()
        state.decode_workers = workers
    state.batcher = Batcher(
        detector.score,
        run_explained=detector.explain if detector.explains else None,
        max_batch_size=settings.max_batch_size,
        max_delay_s=settings.max_batch_delay_ms / 1000,
        max_queue=settings.max_queue,
        metrics=state.metrics,
    )
    state.batcher.start()
    state.set_ready(False, "warming up")
    warm_up = asyncio.create_task(_warm_up(state))
    log.info(
        "serving %s %s (threshold %.6g) on %s",
        manifest.model_name,
        manifest.model_version,
        state.bundle.threshold,
        detector.provider,
    )
    try:
        yield
    finally:
        state.start_draining()
        warm_up.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await warm_up
        if state.decode_workers is not None:
            state.decode_workers.close()  # killed: a decode left running would outlive the service
        await state.batcher.stop(settings.drain_timeout_s)
        state.decode_pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")


def load_detector(bundle: Bundle, settings: Settings) -> Detector:
    """The bundle's graph in an ONNX Runtime session; raises `RuntimeLoadError` if it cannot serve."""
    providers = resolve_providers(settings.execution_providers)
    return Detector(
        bundle.onnx_path,
        bundle.manifest.input,
        providers,
        settings.intra_op_threads,
        nice_increment=settings.worker_nice_increment,
        explain=bundle.manifest.explain,
    )


async def _warm_up(state: ServiceState) -> None:
    assert state.detector is not None
    try:
        await asyncio.to_thread(state.detector.warm_up, state.settings.max_batch_size)
    except Exception as exc:
        log.exception("warm-up failed; the service stays not ready")
        state.set_ready(False, f"warm-up failed: {exc}")
        return
    # Everything allocated so far (modules, the app, the session's wrappers) lives as long as the
    # process: moved out of the collector's reach, a full collection under load has far less to walk.
    gc.collect()
    gc.freeze()
    state.set_ready(True)
