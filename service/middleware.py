"""Per-request bookkeeping as plain ASGI (cheaper than BaseHTTPMiddleware): request id, metrics,
access log, and the last-resort 500 with an error id that is also in the log."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import request_id_var
from service.metrics import Metrics

log = logging.getLogger("dede.http")
access_log = logging.getLogger("dede.access")

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Metric labels take the route, not the raw path, so that probing random URLs cannot grow them.
_ENDPOINTS = {"/detect", "/healthz", "/readyz", "/v1/models", "/metrics"}


def _incoming_request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _VALID_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, access_log_enabled: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log_enabled = access_log_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _incoming_request_id(scope)
        token = request_id_var.set(request_id)
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("unexpected error, error id %s, on %s %s", error_id, scope["method"], path)
            if response_started:
                raise  # too late to answer; let the server close the connection
            await _send_internal_error(send, error_id, request_id)
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_latency.labels(endpoint).observe(elapsed)
            if self.access_log_enabled:
                access_log.info(
                    "%s %s %d %.1f ms",
                    scope["method"],
                    path,
                    status,
                    1000 * elapsed,
                    extra={"status": status, "duration_ms": round(1000 * elapsed, 3)},
                )
            request_id_var.reset(token)


async def _send_internal_error(send: Send, error_id: str, request_id: str) -> None:
    body = json.dumps(
        {
            "error": {
                "code": "internal_error",
                "message": f"unexpected server error; quote error id {error_id}",
                "error_id": error_id,
            }
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (REQUEST_ID_HEADER.lower().encode(), request_id.encode()),
    ]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": body})
