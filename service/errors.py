"""Errors the API answers with: an HTTP status, a stable machine-readable code and a human message."""

from __future__ import annotations

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


def unavailable(code: str, message: str, retry_after_s: int) -> ServiceError:
    """A 503 that tells the client when to come back."""
    return ServiceError(503, code, message, headers={"Retry-After": str(retry_after_s)})
