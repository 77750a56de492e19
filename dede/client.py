"""A Python client for a dede service: `Client` (sync) and `AsyncClient`, over httpx.

    from dede.client import Client

    with Client("http://localhost:8000", api_key="...") as dede:
        result = dede.detect(["a.png", "b.jpg"], explain=True)
        for image in result.images:
            print(image.filename, image.score, image.flagged)

Many images per call: they are sent in chunks that fit the server's per-request limits (image count
and body size, read once from /v1/models), in order, and the results come back as one list in the
order given. A 503 (queue full, busy, not ready, draining) or 429 is retried after the server's
Retry-After (capped), as are connection failures, up to `max_retries` times; any other error status
raises `DedeError` with the server's code and message. Needs httpx only (no numpy, no torch).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# An image to send: a path, raw encoded bytes, or (file name, bytes).
ImageInput = str | Path | bytes | tuple[str, bytes]

DEFAULT_MAX_IMAGES = 64  # the service's defaults, for a server that does not tell its limits
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
PART_OVERHEAD_BYTES = 256  # multipart headers and boundary per image, generously
RETRY_STATUSES = frozenset({429, 503})


class DedeError(Exception):
    """The server refused a request: HTTP `status`, its machine-readable `code` and its `message`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ImageError:
    code: str
    message: str


@dataclass(frozen=True)
class ImageResult:
    """One image's answer. `score`/`flagged` are None when the image could not be scored (`error`)."""

    index: int  # position in the list given to `detect`
    filename: str | None
    score: float | None
    flagged: bool | None
    error: ImageError | None = None
    explanation: dict[str, Any] | None = None  # with explain=True: map_png, rebuild_png, map_max, ...


@dataclass(frozen=True)
class DetectResult:
    model_name: str
    model_version: str
    threshold: float
    images: list[ImageResult] = field(default_factory=list)

    @property
    def flagged(self) -> list[ImageResult]:
        return [image for image in self.images if image.flagged]

    @property
    def errors(self) -> list[ImageResult]:
        return [image for image in self.images if image.error is not None]


@dataclass(frozen=True)
class ServerLimits:
    max_images_per_request: int
    max_upload_bytes: int


def _as_upload(image: ImageInput, index: int) -> tuple[str, bytes]:
    if isinstance(image, tuple):
        return image
    if isinstance(image, bytes):
        return f"image-{index}", image
    path = Path(image)
    return path.name, path.read_bytes()


def chunks(uploads: list[tuple[str, bytes]], limits: ServerLimits) -> Iterator[list[int]]:
    """Indices of `uploads` in consecutive groups under both limits (an image too large for any
    request goes alone: the server then says why it refuses it)."""
    group: list[int] = []
    size = 0
    for index, (name, data) in enumerate(uploads):
        cost = len(data) + len(name.encode()) + PART_OVERHEAD_BYTES
        if group and (len(group) >= limits.max_images_per_request or size + cost > limits.max_upload_bytes):
            yield group
            group, size = [], 0
        group.append(index)
        size += cost
    if group:
        yield group


def retry_delay(response: httpx.Response | None, attempt: int, cap_s: float) -> float:
    """The server's Retry-After (seconds) when it gave one, else exponential backoff; at most cap_s."""
    if response is not None:
        given = response.headers.get("retry-after", "").strip()
        if given.replace(".", "", 1).isdigit():
            return min(float(given), cap_s)
    return min(0.25 * 2**attempt, cap_s)


def _error_from(response: httpx.Response) -> DedeError:
    try:
        detail = response.json().get("error", {})
    except ValueError:
        detail = {}
    if isinstance(detail, str):  # the v2 protocol's shape
        detail = {"message": detail}
    return DedeError(
        response.status_code, detail.get("code", "http_error"), detail.get("message", response.text[:300])
    )


def _parse(body: dict, offset: int) -> tuple[dict, list[ImageResult]]:
    images = []
    for item in body["images"]:
        error = item.get("error")
        images.append(
            ImageResult(
                index=offset + item["index"],
                filename=item.get("filename"),
                score=item.get("score"),
                flagged=item.get("flagged"),
                error=ImageError(error["code"], error["message"]) if error else None,
                explanation=item.get("explanation"),
            )
        )
    return body, images


def _merge(parts: list[tuple[dict, list[ImageResult]]]) -> DetectResult:
    first = parts[0][0]
    images = sorted((image for _, chunk in parts for image in chunk), key=lambda image: image.index)
    return DetectResult(first["model_name"], first["model_version"], first["threshold"], images)


def _limits_from(models: dict) -> ServerLimits:
    info = models["models"][0]
    return ServerLimits(
        int(info.get("max_images_per_request") or DEFAULT_MAX_IMAGES),
        int(info.get("max_upload_bytes") or DEFAULT_MAX_BYTES),
    )


class _Base:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        max_retries: int,
        max_retry_wait_s: float,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"X-API-Key": api_key} if api_key else {}
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s
        self._limits: ServerLimits | None = None

    @staticmethod
    def _request_parts(
        uploads: list[tuple[str, bytes]], indices: list[int], explain: bool
    ) -> tuple[list, dict[str, str]]:
        files = [("images", (uploads[i][0], uploads[i][1], "application/octet-stream")) for i in indices]
        return files, ({"explain": "true"} if explain else {})


class Client(_Base):
    """Synchronous client. `sleep` is what waits between retries (a test may pass its own)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        max_retry_wait_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(base_url, api_key, max_retries, max_retry_wait_s)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, transport=transport)
        self._sleep = sleep

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = self._http.request(method, path, headers=self._headers, **kwargs)
            except httpx.TransportError:
                if last:
                    raise
                self._sleep(retry_delay(None, attempt, self.max_retry_wait_s))
                continue
            if response.status_code in RETRY_STATUSES and not last:
                self._sleep(retry_delay(response, attempt, self.max_retry_wait_s))
                continue
            if response.status_code >= 400:
                raise _error_from(response)
            return response
        raise AssertionError("unreachable")

    def models(self) -> dict:
        """The served model's identity, threshold and limits (GET /v1/models)."""
        return self._send("GET", "/v1/models").json()

    def limits(self) -> ServerLimits:
        if self._limits is None:
            self._limits = _limits_from(self.models())
        return self._limits

    def detect(self, images: Iterable[ImageInput], explain: bool = False) -> DetectResult:
        """Score every image (paths, bytes or (name, bytes)); one result per image, in order."""
        uploads = [_as_upload(image, i) for i, image in enumerate(images)]
        if not uploads:
            raise ValueError("no images given")
        parts = []
        for indices in chunks(uploads, self.limits()):
            files, params = self._request_parts(uploads, indices, explain)
            body = self._send("POST", "/detect", files=files, params=params).json()
            parts.append(_parse(body, indices[0]))
        return _merge(parts)


class AsyncClient(_Base):
    """Asynchronous client; `detect` sends up to `concurrency` chunks at a time."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        max_retry_wait_s: float = 30.0,
        concurrency: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, api_key, max_retries, max_retry_wait_s)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s, transport=transport)
        self._concurrency = max(1, concurrency)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = await self._http.request(method, path, headers=self._headers, **kwargs)
            except httpx.TransportError:
                if last:
                    raise
                await asyncio.sleep(retry_delay(None, attempt, self.max_retry_wait_s))
                continue
            if response.status_code in RETRY_STATUSES and not last:
                await asyncio.sleep(retry_delay(response, attempt, self.max_retry_wait_s))
                continue
            if response.status_code >= 400:
                raise _error_from(response)
            return response
        raise AssertionError("unreachable")

    async def models(self) -> dict:
        return (await self._send("GET", "/v1/models")).json()

    async def limits(self) -> ServerLimits:
        if self._limits is None:
            self._limits = _limits_from(await self.models())
        return self._limits

    async def detect(self, images: Iterable[ImageInput], explain: bool = False) -> DetectResult:
        uploads = [_as_upload(image, i) for i, image in enumerate(images)]
        if not uploads:
            raise ValueError("no images given")
        gate = asyncio.Semaphore(self._concurrency)

        async def one(indices: list[int]) -> tuple[dict, list[ImageResult]]:
            files, params = self._request_parts(uploads, indices, explain)
            async with gate:
                response = await self._send("POST", "/detect", files=files, params=params)
            return _parse(response.json(), indices[0])

        limits = await self.limits()
        parts = await asyncio.gather(*(one(indices) for indices in chunks(uploads, limits)))
        return _merge(list(parts))
