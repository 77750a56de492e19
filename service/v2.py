"""The Open Inference Protocol (KServe v2, as Triton speaks it over HTTP), so that KServe and Triton
clients call dede unchanged.

  GET  /v2                                  server metadata
  GET  /v2/health/live, /v2/health/ready    probes (no API key, like /healthz and /readyz)
  GET  /v2/models/{name}[/versions/{v}]     model metadata: inputs, outputs, threshold
  GET  /v2/models/{name}[/versions/{v}]/ready
  POST /v2/models/{name}[/versions/{v}]/infer

One input per request, either `images`: UINT8 [N, 3, H, W] (the graph's own input, H and W from the
manifest), or `encoded_images`: BYTES [N], each element an encoded image file (PNG, JPEG, ...) that
goes through /detect's decoding and limits. Tensor data as JSON (`data`, flat or nested; BYTES
elements base64) or with the binary tensor data extension (`binary_data_size` and the
Inference-Header-Content-Length header). Outputs: `score` FP32 [N] and `flagged` BOOL [N], as JSON
or binary (`binary_data` per output, `binary_data_output` for all, as tritonclient asks).

Everything in a request is untrusted: sizes are checked against the limits before any tensor is
built, every mismatch is a 4xx with a message that says what to send. Errors use the protocol's
shape, {"error": "message"}. Compressed request bodies are refused (415): inflating an untrusted
body is a way around the size limit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import struct
import time
from importlib import metadata
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from models.bundle import ONNX_INPUT, ONNX_SCORE
from service.api import _reserve, require_api_key
from service.batcher import BatcherClosed, InferenceFailed, ScoredImage
from service.decode_step import (
    Abandonment,
    decode_inline,
    decode_request,
    on_its_way,
    plan_decode,
    request_deadline,
)
from service.decoding import ImageRejected
from service.errors import ImagesRefused, ServiceError, hold_refusal
from service.state import ServiceState

ENCODED_INPUT = "encoded_images"
FLAGGED_OUTPUT = "flagged"
OUTPUTS = {ONNX_SCORE: "FP32", FLAGGED_OUTPUT: "BOOL"}
HEADER_LENGTH = "Inference-Header-Content-Length"
# Room for the JSON header beside a UINT8 tensor of the largest allowed size.
JSON_HEADER_MAX_BYTES = 64 * 1024
MAX_JSON_DEPTH = 8  # a UINT8 tensor nests 4 deep; anything much deeper is not a tensor

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])


class ProtocolError(Exception):
    """A v2 error: `{"error": message}` with this status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status, headers=self.headers)


def _state(request: Request) -> ServiceState:
    return request.app.state.service


def _dede_version() -> str:
    try:
        return metadata.version("dede")
    except metadata.PackageNotFoundError:
        return "unknown"


# -- probes and metadata -------------------------------------------------------------------------


@router.get("/health/live", summary="v2 liveness")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="v2 readiness: same rule as /readyz")
async def ready(request: Request) -> Response:
    state = _state(request)
    if state.ready and not state.draining:
        return JSONResponse({"ready": True})
    return JSONResponse(
        {"ready": False}, status_code=503, headers={"Retry-After": str(state.settings.retry_after_s)}
    )


@router.get("", summary="v2 server metadata")
async def server_metadata() -> dict:
    return {"name": "dede", "version": _dede_version(), "extensions": ["binary_tensor_data"]}


async def _guarded(request: Request, name: str, version: str | None) -> ServiceState:
    """The API key, then the model's name and version; ProtocolError on either."""
    state = _state(request)
    try:
        await require_api_key(request, state)
    except ServiceError as exc:
        raise ProtocolError(exc.status, exc.message, exc.headers) from None
    manifest = state.bundle.manifest
    if name != manifest.model_name:
        raise ProtocolError(404, f"unknown model '{name[:100]}': this server serves '{manifest.model_name}'")
    if version is not None and version != manifest.model_version:
        raise ProtocolError(
            404,
            f"model '{name}' has no version '{version[:40]}': this server serves version '{manifest.model_version}'",
        )
    return state


def _model_metadata(state: ServiceState) -> dict:
    manifest = state.bundle.manifest
    spec = manifest.input
    return {
        "name": manifest.model_name,
        "versions": [manifest.model_version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": ONNX_INPUT, "datatype": "UINT8", "shape": [-1, 3, spec.height, spec.width]},
            {"name": ENCODED_INPUT, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [{"name": output, "datatype": kind, "shape": [-1]} for output, kind in OUTPUTS.items()],
        "parameters": {
            "threshold": manifest.threshold.value,
            "fpr_target": manifest.threshold.fpr_target,
            "max_images_per_request": state.settings.max_images_per_request,
            "one_input_of": [ONNX_INPUT, ENCODED_INPUT],
        },
    }


async def _metadata(request: Request, name: str, version: str | None) -> Response:
    try:
        state = await _guarded(request, name, version)
    except ProtocolError as exc:
        return exc.response()
    return JSONResponse(_model_metadata(state))


async def _model_ready(request: Request, name: str, version: str | None) -> Response:
    try:
        state = await _guarded(request, name, version)
    except ProtocolError as exc:
        return exc.response()
    is_ready = state.ready and not state.draining
    return JSONResponse({"name": name, "ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/models/{name}", summary="v2 model metadata")
async def model_metadata(request: Request, name: str) -> Response:
    return await _metadata(request, name, None)


@router.get("/models/{name}/versions/{version}", summary="v2 model metadata (one version)")
async def model_version_metadata(request: Request, name: str, version: str) -> Response:
    return await _metadata(request, name, version)


@router.get("/models/{name}/ready", summary="v2 model readiness")
async def model_ready(request: Request, name: str) -> Response:
    return await _model_ready(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="v2 model readiness (one version)")
async def model_version_ready(request: Request, name: str, version: str) -> Response:
    return await _model_ready(request, name, version)


# -- inference -----------------------------------------------------------------------------------


@router.post("/models/{name}/infer", summary="v2 inference: score and flagged per image")
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="v2 inference (one version)")
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    started = time.perf_counter()
    try:
        state = await _guarded(request, name, version)
        refusal = state.refusal()
        if refusal is not None:
            raise ProtocolError(refusal.status, refusal.message, refusal.headers)
        state.in_flight += 1
        state.metrics.in_flight.inc()
        try:
            return await _run_request(request, state, started)
        finally:
            state.in_flight -= 1
            state.metrics.in_flight.dec()
    except ServiceError as exc:
        if isinstance(exc, ImagesRefused):
            await hold_refusal(_state(request).settings.refusal_delay_s)  # as /detect: out of every count
        return ProtocolError(exc.status, exc.message, exc.headers).response()
    except ProtocolError as exc:
        return exc.response()


async def _run_request(request: Request, state: ServiceState, started: float) -> Response:
    settings = state.settings
    spec = state.bundle.manifest.input
    tensor_max = settings.max_images_per_request * 3 * spec.height * spec.width
    body = await _read_body(request, max(settings.max_upload_bytes, tensor_max + JSON_HEADER_MAX_BYTES))
    header, binary = _split_body(request, body)
    input_name, data, shape = _the_input(header, binary)
    requested = _requested_outputs(header)
    if input_name == ENCODED_INPUT and len(shape) != 1:
        raise ProtocolError(
            400, f"input '{ENCODED_INPUT}' must have shape [N] (one encoded image each), not {shape}"
        )
    count = shape[0]
    _check_count(count, settings.max_images_per_request)
    # As /detect: from the reservation on, a deadline, and abandoned when the client goes away.
    with Abandonment(request, state, request_deadline(state)) as abandonment:
        with _reserve(state, count) as reservation:
            # The same decode step as /detect: structure checks, then in process or in the workers.
            plan = None if input_name == ONNX_INPUT else plan_decode(state, _bytes_elements(data, count))
            with on_its_way(state.batcher, plan):  # type: ignore[arg-type]
                if plan is None:
                    arrays = list(_uint8_images(data, shape, spec.height, spec.width))
                else:
                    if plan.inline(state):
                        decoded = decode_inline(state, plan)
                    else:
                        decoded = await abandonment.guard(decode_request(state, plan))
                    rejected = [
                        (i, item) for i, item in enumerate(decoded) if isinstance(item, ImageRejected)
                    ]
                    if rejected:
                        state.metrics.images.labels("error").inc(count)
                        index, first = rejected[0]
                        raise ImagesRefused(
                            first.status, first.code, f"{ENCODED_INPUT}[{index}]: {first.message}"
                        )
                    arrays = decoded
                futures = reservation.submit(arrays)
        outcomes = await abandonment.guard(asyncio.gather(*futures, return_exceptions=True))
    scores = _scores(state, outcomes)
    flagged = scores > state.bundle.threshold
    state.metrics.images.labels("flagged").inc(int(flagged.sum()))
    state.metrics.images.labels("clean").inc(int((~flagged).sum()))
    for score in scores:
        state.metrics.score.observe(float(score))
    answer = {
        "model_name": state.bundle.manifest.model_name,
        "model_version": state.bundle.manifest.model_version,
        "outputs": [],
        "parameters": {
            "threshold": state.bundle.threshold,
            "total_ms": round(1000 * (time.perf_counter() - started), 3),
        },
    }
    if isinstance(header.get("id"), str):
        answer["id"] = header["id"][:256]
    values = {ONNX_SCORE: scores.astype("<f4"), FLAGGED_OUTPUT: flagged}
    return _response(answer, values, requested, count)


def _scores(state: ServiceState, outcomes: list[ScoredImage | BaseException]) -> np.ndarray:
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            state.metrics.images.labels("error").inc(len(outcomes))
            if isinstance(outcome, BatcherClosed):
                retry = {"Retry-After": str(state.settings.retry_after_s)}
                raise ProtocolError(503, "the service stopped before scoring these images", retry)
            reason = (
                "the model failed on this batch" if isinstance(outcome, InferenceFailed) else "scoring failed"
            )
            raise ProtocolError(500, reason)
    scores = np.array([o.score for o in outcomes], dtype=np.float32)  # type: ignore[union-attr]
    if not np.isfinite(scores).all():
        state.metrics.images.labels("error").inc(len(outcomes))
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ProtocolError(500, f"the model gave a non-finite score ({scores[bad]}) for image {bad}")
    return scores


def _response(
    answer: dict, values: dict[str, np.ndarray], requested: dict[str, bool], count: int
) -> Response:
    chunks = []
    for output, binary in requested.items():
        entry: dict[str, Any] = {"name": output, "datatype": OUTPUTS[output], "shape": [count]}
        if binary:
            raw = values[output].astype(np.uint8 if output == FLAGGED_OUTPUT else "<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = values[output].tolist()
        answer["outputs"].append(entry)
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


# -- reading and checking the request ------------------------------------------------------------


async def _read_body(request: Request, max_bytes: int) -> bytes:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ProtocolError(
            415, f"Content-Encoding {encoding[:20]!r} is not accepted: send the body uncompressed"
        )
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise ProtocolError(413, f"the request body exceeds {max_bytes} bytes")
    timeout_s = _state(request).settings.body_timeout_s
    received: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise ProtocolError(
                        413, f"the request body exceeds {max_bytes} bytes", {"Connection": "close"}
                    )
                received.append(chunk)
    except TimeoutError:
        raise ProtocolError(
            408, f"the request body did not arrive within {timeout_s:g} s", {"Connection": "close"}
        ) from None
    except ClientDisconnect:
        raise ProtocolError(400, "the client went away before the body ended") from None
    return b"".join(received)


def _split_body(request: Request, body: bytes) -> tuple[dict, bytes]:
    """(JSON header, binary tensor data after it)."""
    declared = request.headers.get(HEADER_LENGTH.lower())
    if declared is None:
        json_part, binary = body, b""
    else:
        if not declared.isdigit() or not 0 < int(declared) <= len(body):
            raise ProtocolError(400, f"{HEADER_LENGTH} {declared[:20]!r} is not a length within the body")
        json_part, binary = body[: int(declared)], body[int(declared) :]
    if len(json_part) > JSON_HEADER_MAX_BYTES and binary:
        raise ProtocolError(413, f"the JSON header exceeds {JSON_HEADER_MAX_BYTES} bytes")
    try:
        header = json.loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(400, f"the request is not a JSON object: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise ProtocolError(400, "the request must be a JSON object with 'inputs'")
    return header, binary


def _the_input(header: dict, binary: bytes) -> tuple[str, Any, list[int]]:
    """(input name, its data: bytes when binary, else the JSON value, shape) of the one input."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(
            400, f"send exactly one input: '{ONNX_INPUT}' (UINT8) or '{ENCODED_INPUT}' (BYTES)"
        )
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    expected = {ONNX_INPUT: "UINT8", ENCODED_INPUT: "BYTES"}
    if name not in expected:
        raise ProtocolError(400, f"unknown input {str(name)[:60]!r}: use '{ONNX_INPUT}' or '{ENCODED_INPUT}'")
    if datatype != expected[name]:
        raise ProtocolError(400, f"input '{name}' must be {expected[name]}, not {str(datatype)[:20]}")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ProtocolError(400, f"input '{name}' needs a shape: a list of non-negative integers")
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(400, "input 'parameters' must be an object")
    size = parameters.get("binary_data_size")
    if size is None:
        if binary:
            raise ProtocolError(
                400, "binary data follows the JSON header but the input has no binary_data_size"
            )
        if "data" not in tensor:
            raise ProtocolError(400, f"input '{name}' has neither 'data' nor binary_data_size")
        return name, tensor["data"], shape
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise ProtocolError(
            400,
            f"input '{name}' declares binary_data_size {str(size)[:20]} but {len(binary)} bytes follow the header",
        )
    return name, binary, shape


def _requested_outputs(header: dict) -> dict[str, bool]:
    """Output name -> binary or not, in the order asked (all of them when none are named)."""
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(400, "request 'parameters' must be an object")
    all_binary = parameters.get("binary_data_output") is True
    outputs = header.get("outputs")
    if outputs is None:
        return dict.fromkeys(OUTPUTS, all_binary)
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ProtocolError(400, "'outputs' must be a list of objects with a 'name'")
    requested: dict[str, bool] = {}
    for output in outputs:
        output_name = output.get("name")
        if output_name not in OUTPUTS:
            raise ProtocolError(
                400, f"unknown output {str(output_name)[:60]!r}: this model gives {list(OUTPUTS)}"
            )
        own = (output.get("parameters") or {}).get("binary_data")
        requested[output_name] = own if isinstance(own, bool) else all_binary
    return requested


def _check_count(count: int, limit: int) -> None:
    if count < 1:
        raise ProtocolError(422, "the input holds no images")
    if count > limit:
        raise ProtocolError(
            422, f"{count} images in one request; at most {limit} (DEDE_MAX_IMAGES_PER_REQUEST)"
        )


def _uint8_images(data: Any, shape: list[int], height: int, width: int) -> np.ndarray:
    """The UINT8 input as [N, 3, H, W], its shape and size checked before any array is built."""
    if len(shape) != 4 or shape[1:] != [3, height, width]:
        raise ProtocolError(
            400, f"input '{ONNX_INPUT}' must have shape [N, 3, {height}, {width}], not {shape}"
        )
    expected = math.prod(shape)
    if isinstance(data, bytes):
        if len(data) != expected:
            raise ProtocolError(
                400, f"input '{ONNX_INPUT}' of shape {shape} needs {expected} bytes, got {len(data)}"
            )
        tensor = np.frombuffer(data, dtype=np.uint8)
    else:
        tensor = _json_uint8(data, expected)
    return tensor.reshape(shape).copy()  # one writable copy, then one image per row


def _json_uint8(data: Any, expected: int) -> np.ndarray:
    if not isinstance(data, list) or _depth(data) > MAX_JSON_DEPTH:
        raise ProtocolError(400, f"input '{ONNX_INPUT}' data must be a (nested) list of integers")
    try:
        values = np.asarray(data, dtype=np.int64).reshape(-1)
    except (ValueError, TypeError, OverflowError):
        raise ProtocolError(
            400, f"input '{ONNX_INPUT}' data must be a regular (nested) list of integers 0..255"
        ) from None
    if values.size != expected:
        raise ProtocolError(400, f"input '{ONNX_INPUT}' has {values.size} values; its shape needs {expected}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ProtocolError(400, f"input '{ONNX_INPUT}' values must be in 0..255 (UINT8)")
    return values.astype(np.uint8)


def _depth(value: Any) -> int:
    depth = 0
    while isinstance(value, list) and value:
        depth += 1
        value = value[0]
    return depth


def _bytes_elements(data: Any, count: int) -> list[bytes]:
    """BYTES [N]: binary (4-byte little-endian length, then the bytes, per element) or JSON base64."""
    if isinstance(data, bytes):
        elements, offset = [], 0
        while offset < len(data):
            if offset + 4 > len(data):
                raise ProtocolError(
                    400, f"input '{ENCODED_INPUT}': binary data ends inside an element's length"
                )
            (length,) = struct.unpack_from("<I", data, offset)
            offset += 4
            if offset + length > len(data):
                raise ProtocolError(
                    400, f"input '{ENCODED_INPUT}': element {len(elements)} runs past the data"
                )
            elements.append(data[offset : offset + length])
            offset += length
    elif isinstance(data, list) and all(isinstance(item, str) for item in data):
        try:
            elements = [base64.b64decode(item, validate=True) for item in data]
        except (binascii.Error, ValueError):
            raise ProtocolError(
                400, f"input '{ENCODED_INPUT}': JSON elements must be base64 strings"
            ) from None
    else:
        raise ProtocolError(400, f"input '{ENCODED_INPUT}': data must be a list of base64 strings or binary")
    if len(elements) != count:
        raise ProtocolError(
            400, f"input '{ENCODED_INPUT}' has shape [{count}] but holds {len(elements)} elements"
        )
    return elements
