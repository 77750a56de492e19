"""Errors the API answers with: an HTTP status, a stable machine-readable code and a human message."""

from __future__ import annotations

import asyncio

from fastapi.responses import JSONResponse


class ServiceError(Exception):
    """Raised anywhere in request handling; becomes `{"error": {"code", "message"}}` with `status`."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **details: object
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details

    def to_response(self) -> JSONResponse:
        body = {"error": {"code": self.code, "message": self.message, **self.details}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class ImagesRefused(ServiceError):
    """A request refused for what its images' bytes hold (format, structure, decoding budget): every
    image of a /detect request, or any one of a v2 request (all or nothing there). Its answer is held
    back DEDE_REFUSAL_DELAY_S (`hold_refusal`)."""


async def hold_refusal(delay_s: float) -> None:
    """The wait before an `ImagesRefused` answer. Refusing costs the service little per upload, but a
    client that sends costly-structured uploads back to back on a few connections would otherwise get
    hundreds of refusals a second, and receiving their bodies takes the cores that good requests need.
    Held back, each connection gets at most 1/delay refusals a second, and the wait holds a timer only:
    the request has already left the queue and the in-flight count."""
    if delay_s > 0:
        await asyncio.sleep(delay_s)


def unavailable(code: str, message: str, retry_after_s: int) -> ServiceError:
    """A 503 that tells the client when to come back."""
    return ServiceError(503, code, message, headers={"Retry-After": str(retry_after_s)})
