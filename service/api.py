"""HTTP endpoints: /detect and /v1/models (`router`), /healthz and /readyz (`probes`), /metrics
(`metrics_router`: on the main port, or alone with the probes on DEDE_METRICS_PORT)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from models.bundle import ONNX_NAME
from service.batcher import BatcherClosed, InferenceFailed, QueueFull, Reservation, ScoredImage
from service.decode_step import (
    Abandonment,
    decode_inline,
    decode_request,
    on_its_way,
    plan_decode,
    request_deadline,
)
from service.decoding import ImageRejected
from service.errors import ImagesRefused, ServiceError, hold_refusal, unavailable
from service.explain import explanation
from service.metrics import ready_workers
from service.schemas import DetectResponse, ErrorResponse, ModelsResponse
from service.state import ServiceState, service_state
from service.uploads import Upload, read_uploads

log = logging.getLogger("dede.api")

router = APIRouter()
probes = APIRouter()
metrics_router = APIRouter()

State = Annotated[ServiceState, Depends(service_state)]


def _given_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


async def require_api_key(request: Request, state: State) -> None:
    """Checks `X-API-Key` or `Authorization: Bearer` against DEDE_API_KEY, in constant time."""
    expected = state.settings.api_key
    if expected is None:
        return
    given = _given_key(request)
    if given is None or not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise ServiceError(
            401,
            "unauthorized",
            "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


ApiKey = Annotated[None, Depends(require_api_key)]

_ERRORS = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "malformed request or undecodable image",
        401: "missing or wrong API key",
        408: "the body did not arrive in time (DEDE_BODY_TIMEOUT_S)",
        413: "request body or image too large",
        415: "not an accepted image format (decided from the bytes)",
        422: "no images, or too many; an image whose structure is over a limit, or whose decoding overran "
        "its budget (DEDE_DECODE_BUDGET_S)",
        503: "queue full, too many requests in progress, not ready, or draining (see Retry-After)",
        504: "not answered within DEDE_REQUEST_TIMEOUT_S; its images were not scored",
    }.items()
}

_DETECT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "explain": {"type": "boolean", "default": False},
                        "explain_arrays": {"type": "boolean", "default": False},
                    },
                    "required": ["images"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": {"type": "boolean", "default": False},
            "description": text,
        }
        for name, text in (
            ("explain", "add each image's evidence: heat map and rebuild as PNG data URIs"),
            ("explain_arrays", "also the normalised map and the rebuild as arrays (implies explain)"),
        )
    ],
}
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


def _flag(name: str, value: str | None) -> bool:
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered in _TRUE | _FALSE:
        return lowered in _TRUE
    raise ServiceError(400, "invalid_parameter", f"{name}={value[:16]!r}: use true or false")


def _explain_wanted(source: Mapping[str, str]) -> tuple[bool, bool]:
    """(explain, with arrays) asked by the query string or the form fields."""
    arrays = _flag("explain_arrays", source.get("explain_arrays"))
    return arrays or _flag("explain", source.get("explain")), arrays


def _check_explains(state: ServiceState) -> None:
    assert state.batcher is not None
    if not state.batcher.explains:
        manifest = state.bundle.manifest
        raise ServiceError(
            400,
            "explain_unavailable",
            f"the bundle {manifest.model_name} {manifest.model_version} has no evidence outputs (made "
            "before explanations): re-export it with this dede, or leave explain off",
        )


@router.post(
    "/detect",
    response_model=DetectResponse,
    responses=_ERRORS,
    openapi_extra=_DETECT_BODY,
    summary="Score images: is each one a backdoor (trigger-carrying) sample?",
)
async def detect(request: Request) -> Response:
    # No FastAPI dependencies on the hot path: solving them costs more than everything else here.
    started = time.perf_counter()
    state = request.app.state.service
    try:
        return await _detect(request, state, started)
    except ImagesRefused:
        await hold_refusal(state.settings.refusal_delay_s)  # out of the queue and the in-flight count
        raise


async def _detect(request: Request, state: ServiceState, started: float) -> Response:
    await require_api_key(request, state)
    refusal = state.refusal()
    if refusal is not None:
        raise refusal
    batcher = state.batcher
    assert batcher is not None  # refusal() is None only once the batcher runs
    settings = state.settings
    explain, with_arrays = _explain_wanted(request.query_params) if request.query_params else (False, False)
    if explain:
        _check_explains(state)  # before the body is read: no work spent on a request that cannot be met
    state.in_flight += 1
    state.metrics.in_flight.inc()
    try:
        form_options: dict[str, str] = {}
        uploads = await read_uploads(
            request,
            max_bytes=settings.max_upload_bytes,
            max_images=settings.max_images_per_request,
            timeout_s=settings.body_timeout_s,
            options=form_options,
        )
        if form_options:
            form_explain, form_arrays = _explain_wanted(form_options)
            if form_explain and not explain:
                _check_explains(state)
            explain, with_arrays = explain or form_explain, with_arrays or form_arrays
        # Counted as on its way to the batcher only once its body is in: a slow client must not make
        # batches wait for it. Room in the queue is taken now, before decoding: a flood is refused
        # before any work is spent on it, and an image decoded is an image scored.
        # From the reservation on, the request has a deadline, and is abandoned if its client goes away.
        with Abandonment(request, state, request_deadline(state)) as abandonment:
            with _reserve(state, len(uploads)) as reservation:
                decode_started = time.perf_counter()
                plan = plan_decode(state, [upload.data for upload in uploads])
                with on_its_way(batcher, plan):
                    if plan.inline(state):
                        decoded = decode_inline(state, plan)  # thumbnails: nothing to wait for or cancel
                    else:
                        decoded = await abandonment.guard(decode_request(state, plan))
                    decode_s = time.perf_counter() - decode_started
                    state.metrics.decode_time.observe(decode_s)
                    arrays = [item for item in decoded if isinstance(item, np.ndarray)]
                    if not arrays:
                        raise _all_rejected(state, uploads, decoded)
                    futures = reservation.submit(arrays, explain=explain)
            outcomes = await abandonment.guard(asyncio.gather(*futures, return_exceptions=True))
        body = _answer(state, uploads, decoded, outcomes, decode_s, started)
        if explain:
            await _add_explanations(state, body["images"], decoded, outcomes, with_arrays)
            body["timing"]["total_ms"] = round(1000 * (time.perf_counter() - started), 3)
        return JSONResponse(body)
    finally:
        state.in_flight -= 1
        state.metrics.in_flight.dec()


@contextlib.contextmanager
def _reserve(state: ServiceState, count: int) -> Iterator[Reservation]:
    assert state.batcher is not None
    retry = state.settings.retry_after_s
    try:
        with state.batcher.reserve(count) as reservation:
            yield reservation
    except QueueFull as exc:
        state.metrics.rejections.labels("queue_full").inc()
        raise unavailable("queue_full", f"the queue is full ({exc}); retry shortly", retry) from exc
    except BatcherClosed as exc:
        state.metrics.rejections.labels("draining").inc()
        raise unavailable("draining", "the service is shutting down", retry) from exc


def _rejection_result(index: int, upload: Upload, rejection: ImageRejected) -> dict:
    return {
        "index": index,
        "filename": upload.filename,
        "score": None,
        "flagged": None,
        "error": {"code": rejection.code, "message": rejection.message},
    }


def _all_rejected(state: ServiceState, uploads: list[Upload], decoded: list) -> ImagesRefused:
    """No image decoded: the request fails with the first image's status, listing every image's error."""
    state.metrics.images.labels("error").inc(len(decoded))
    first = decoded[0]
    results = [_rejection_result(i, u, r) for i, (u, r) in enumerate(zip(uploads, decoded, strict=True))]
    message = first.message if len(decoded) == 1 else f"none of the {len(decoded)} images could be decoded"
    return ImagesRefused(first.status, first.code, message, images=results)


def _answer(
    state: ServiceState,
    uploads: list[Upload],
    decoded: list,
    outcomes: list[ScoredImage | BaseException],
    decode_s: float,
    started: float,
) -> dict:
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        _raise_failure(state, failures[0], len(uploads))
    threshold = state.bundle.threshold
    metrics = state.metrics
    scored = iter(outcomes)
    results = []
    for index, (upload, item) in enumerate(zip(uploads, decoded, strict=True)):
        if isinstance(item, ImageRejected):
            metrics.images.labels("error").inc()
            results.append(_rejection_result(index, upload, item))
            continue
        outcome = next(scored)
        if not np.isfinite(outcome.score):
            metrics.images.labels("error").inc()
            error = {"code": "non_finite_score", "message": f"the model gave a score of {outcome.score}"}
            results.append(
                {"index": index, "filename": upload.filename, "score": None, "flagged": None, "error": error}
            )
            continue
        flagged = outcome.score > threshold
        metrics.images.labels("flagged" if flagged else "clean").inc()
        metrics.score.observe(outcome.score)
        results.append(
            {"index": index, "filename": upload.filename, "score": outcome.score, "flagged": flagged}
        )
    manifest = state.bundle.manifest
    return {
        "model_name": manifest.model_name,
        "model_version": manifest.model_version,
        "threshold": threshold,
        "images": results,
        "timing": {
            "decode_ms": round(1000 * decode_s, 3),
            "queue_ms": round(1000 * max(o.queue_s for o in outcomes), 3),
            "compute_ms": round(1000 * max(o.compute_s for o in outcomes), 3),
            "total_ms": round(1000 * (time.perf_counter() - started), 3),
        },
    }


async def _add_explanations(
    state: ServiceState,
    results: list[dict],
    decoded: list,
    outcomes: list[ScoredImage | BaseException],
    with_arrays: bool,
) -> None:
    """Each scored image's `explanation`, rendered off the event loop (PNG encoding is CPU work)."""
    spec = state.bundle.manifest.explain
    assert spec is not None
    scored = iter(outcomes)
    pending = []
    for result, item in zip(results, decoded, strict=True):
        if not isinstance(item, np.ndarray):
            continue  # rejected at decoding: it has no outcome
        outcome = next(scored)
        if result.get("error") is None and isinstance(outcome, ScoredImage) and outcome.evidence:
            pending.append((result, outcome.evidence))

    def render() -> list[dict]:
        return [explanation(evidence, spec, with_arrays) for _, evidence in pending]

    spec_in = state.bundle.manifest.input
    if len(pending) * spec_in.height * spec_in.width <= state.settings.inline_decode_max_pixels:
        # Small images, as for decoding: rendering takes less than the hop to a thread and back.
        rendered = render()
    else:
        rendered = await asyncio.get_running_loop().run_in_executor(state.decode_pool, render)
    for (result, _), shown in zip(pending, rendered, strict=True):
        result["explanation"] = shown


def _raise_failure(state: ServiceState, failure: BaseException, image_count: int) -> None:
    state.metrics.images.labels("error").inc(image_count)
    if isinstance(failure, BatcherClosed):
        raise unavailable(
            "draining", "the service stopped before scoring these images", state.settings.retry_after_s
        )
    error_id = uuid.uuid4().hex[:12]
    log.error("error id %s: %s", error_id, failure)
    reason = "the model failed on this batch" if isinstance(failure, InferenceFailed) else "scoring failed"
    raise ServiceError(500, "inference_failed", f"{reason}; quote error id {error_id}", error_id=error_id)


@probes.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> dict:
    return {"status": "ok"}


@probes.get("/readyz", summary="Readiness: bundle verified, session loaded, warmed up, not draining")
async def readyz(state: State) -> Response:
    workers = state.settings.workers
    if state.ready and not state.draining:
        if workers <= 1:
            return JSONResponse({"ready": True})
        ready = ready_workers()  # several processes on this port: every one of them must be ready
        if ready >= workers:
            return JSONResponse({"ready": True, "workers": workers})
        reason = f"{ready} of {workers} workers ready"
    else:
        reason = "draining: shutting down" if state.draining else state.not_ready_reason
    headers = {"Retry-After": str(state.settings.retry_after_s)}
    return JSONResponse({"ready": False, "reason": reason}, status_code=503, headers=headers)


@router.get(
    "/v1/models", response_model=ModelsResponse, responses={401: _ERRORS[401]}, summary="The model served"
)
async def models(state: State, _: ApiKey) -> dict:
    manifest = state.bundle.manifest
    detector = state.detector
    onnx_sha = next((f.sha256 for f in manifest.files if f.path == ONNX_NAME), "")
    info = {
        "name": manifest.model_name,
        "version": manifest.model_version,
        "created_at": manifest.created_at,
        "provider": detector.provider if detector else "not loaded",
        "providers": detector.providers if detector else [],
        "threshold": manifest.threshold.value,
        "fpr_target": manifest.threshold.fpr_target,
        "input": manifest.input.model_dump(mode="json"),
        "encoder": manifest.encoder.model_dump(mode="json"),
        "decoder_preset": manifest.decoder.preset,
        "score": manifest.decoder.score,
        "calibration": manifest.threshold.model_dump(mode="json"),
        "explains": manifest.explain is not None,
        "max_batch_size": state.settings.max_batch_size,
        "max_images_per_request": state.settings.max_images_per_request,
        "max_upload_bytes": state.settings.max_upload_bytes,
        "onnx_sha256": onnx_sha,
    }
    return {"models": [info]}


async def _metrics_key(request: Request, state: State) -> None:
    if state.settings.protect_metrics:
        await require_api_key(request, state)


@metrics_router.get("/metrics", summary="Prometheus metrics", dependencies=[Depends(_metrics_key)])
async def metrics(state: State) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
