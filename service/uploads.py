"""Read the images out of a /detect request while it streams in, refusing it as soon as it breaks a limit.

Two request shapes: `multipart/form-data` with one or more `images` file fields, or a raw body
declared `image/*` (or `application/octet-stream`) holding one image. The byte limit is checked on
Content-Length before reading and again on every chunk (a chunked upload has no length), and the
image count as each part begins, so an oversized request is cut off early instead of buffered. The
whole body must arrive within a deadline: a client sending very slowly gets 408. A form may hold only
a few parts besides its images (each costs parsing). The 408 and a 413 met while streaming close the
connection (the rest of such a body is not worth reading).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import ServiceError

IMAGES_FIELD = "images"
# Parts other than `images` are skipped, but each costs parsing: a form may hold only this many.
MAX_OTHER_PARTS = 64
# Text fields whose values are kept (the rest are skipped), each cut at OPTION_MAX_BYTES.
OPTION_FIELDS = frozenset({"explain", "explain_arrays"})
OPTION_MAX_BYTES = 16
# Sent with refusals that leave the body unread: uvicorn would otherwise keep reading it to reuse the
# connection.
_CLOSE = {"Connection": "close"}


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes


async def read_uploads(
    request: Request,
    *,
    max_bytes: int,
    max_images: int,
    timeout_s: float | None = None,
    options: dict[str, str] | None = None,
) -> list[Upload]:
    """The request's images in order; `ServiceError` 400/408/413/415/422 when the request is unusable.
    `timeout_s` bounds the time from here to the body's last byte. `options`: filled with the form's
    small text fields named in OPTION_FIELDS (e.g. explain=true), when the body is a form."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_uploads(request, max_bytes, max_images, options)
    except TimeoutError:
        raise ServiceError(
            408,
            "request_timeout",
            f"the request body did not arrive within {timeout_s:g} s (DEDE_BODY_TIMEOUT_S)",
            headers=_CLOSE,
        ) from None


async def _read_uploads(
    request: Request, max_bytes: int, max_images: int, options: dict[str, str] | None = None
) -> list[Upload]:
    mime, params = parse_options_header(request.headers.get("content-type", ""))
    mime_type = mime.decode("latin-1").lower()
    _check_declared_length(request, max_bytes)
    if mime_type == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise ServiceError(400, "malformed_request", "multipart/form-data without a boundary parameter")
        collector = _MultipartImages(boundary, max_images)
        async for chunk in _stream_limited(request, max_bytes):
            collector.feed(chunk)
        uploads = collector.finish()
        if options is not None:
            options.update(collector.options)
    elif mime_type.startswith("image/") or mime_type == "application/octet-stream":
        body = b"".join([chunk async for chunk in _stream_limited(request, max_bytes)])
        uploads = [Upload(None, body)] if body else []
    else:
        shown = mime_type or "no Content-Type"
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"{shown} is not accepted: send multipart/form-data with '{IMAGES_FIELD}' file fields, "
            "or one image as a raw image/* body",
        )
    if not uploads:
        raise ServiceError(
            422, "no_images", f"the request holds no images: send '{IMAGES_FIELD}' file fields"
        )
    return uploads


def _check_declared_length(request: Request, max_bytes: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.isdigit():
        raise ServiceError(400, "malformed_request", f"Content-Length {declared!r} is not a number")
    if int(declared) > max_bytes:
        # Refused before reading; the connection stays open, so uvicorn reads and drops the declared
        # rest, and a client still sending its body reliably gets this answer (a close could reset it).
        raise _too_large(max_bytes, close=False)


async def _stream_limited(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(max_bytes, close=True)  # a chunked body has no end we know of
            yield chunk
    except ClientDisconnect as exc:
        raise ServiceError(400, "client_disconnected", "the client went away before the body ended") from exc


def _too_large(max_bytes: int, close: bool) -> ServiceError:
    return ServiceError(
        413,
        "request_too_large",
        f"the request body exceeds {max_bytes} bytes (DEDE_MAX_UPLOAD_BYTES)",
        headers=_CLOSE if close else None,
    )


class _MultipartImages:
    """Streaming multipart parser that keeps only the `images` parts."""

    def __init__(self, boundary: bytes, max_images: int) -> None:
        self._max_images = max_images
        self._max_parts = max_images + MAX_OTHER_PARTS
        self._parts = 0
        self.uploads: list[Upload] = []
        self.other_fields: list[str] = []
        self.options: dict[str, str] = {}
        self._option: str | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._part: list[bytes] | None = None
        self._filename: str | None = None
        self._ended = False
        callbacks = {
            "on_part_begin": self._on_part_begin,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        }
        try:
            self._parser = MultipartParser(boundary, callbacks)
        except FormParserError as exc:
            raise ServiceError(400, "malformed_request", f"bad multipart boundary: {exc}") from exc

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise ServiceError(400, "malformed_request", f"malformed multipart body: {exc}") from exc

    def finish(self) -> list[Upload]:
        self._parser.finalize()
        if not self._ended:
            raise ServiceError(
                400, "malformed_request", "the multipart body ends before its closing boundary"
            )
        if not self.uploads and self.other_fields:
            raise ServiceError(
                422,
                "no_images",
                f"no '{IMAGES_FIELD}' fields in the form (got {sorted(set(self.other_fields))})",
            )
        return self.uploads

    def _on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > self._max_parts:
            raise ServiceError(
                422,
                "too_many_parts",
                f"more than {self._max_parts} parts in the form: only '{IMAGES_FIELD}' fields are read, "
                f"at most {self._max_images} of them (DEDE_MAX_IMAGES_PER_REQUEST) and {MAX_OTHER_PARTS} others",
            )
        self._headers = {}
        self._part = None
        self._filename = None
        self._option = None

    def _on_header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name != IMAGES_FIELD:
            self.other_fields.append(name)
            if name in OPTION_FIELDS:
                self._option = name
                self.options[name] = ""
            return
        if len(self.uploads) >= self._max_images:
            raise ServiceError(
                422,
                "too_many_images",
                f"more than {self._max_images} images in one request (DEDE_MAX_IMAGES_PER_REQUEST)",
            )
        filename = options.get(b"filename")
        self._filename = filename.decode("utf-8", "replace") if filename is not None else None
        self._part = []

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part is not None:
            self._part.append(data[start:end])
        elif self._option is not None:
            value = self.options[self._option] + data[start:end].decode("latin-1")
            self.options[self._option] = value[: OPTION_MAX_BYTES + 1]  # longer is refused by its reader

    def _on_part_end(self) -> None:
        if self._part is not None:
            self.uploads.append(Upload(self._filename, b"".join(self._part)))
        self._part = None

    def _on_end(self) -> None:
        self._ended = True
