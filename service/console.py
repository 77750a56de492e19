"""The operator console: `/ui`, a page the service serves itself (static files in service/ui/, no
build step, nothing from the network), and `/v1/stats`, the service's own counters that the page
polls for the recent flag rate.

The page calls the same API as any client (/v1/models, /detect?explain=true, /v1/stats), with the
API key the operator types in when the service has one; the page itself holds no secret, so it is
served without a key. A strict Content-Security-Policy keeps it to its own files and data: URIs.
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from service.api import ApiKey, State

UI_DIR = Path(__file__).parent / "ui"
# Served by name only: a request can never reach another file.
ASSETS = {"console.js": "text/javascript", "console.css": "text/css"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter()


@router.get("/ui", include_in_schema=False)
async def console_page() -> Response:
    return FileResponse(UI_DIR / "index.html", media_type="text/html", headers=_HEADERS)


@router.get("/ui/{asset}", include_in_schema=False)
async def console_asset(asset: str) -> Response:
    if asset not in ASSETS:
        return Response("not found", status_code=404, media_type="text/plain")
    return FileResponse(UI_DIR / asset, media_type=ASSETS[asset], headers=_HEADERS)


def _counter(request: Request, name: str, labels: dict[str, str]) -> int:
    value = request.app.state.service.metrics.registry.get_sample_value(name, labels)
    return int(value or 0)


@router.get("/v1/stats", summary="The service's counters since start: images by outcome (for the console)")
async def stats(request: Request, state: State, _: ApiKey) -> dict:
    images = {
        outcome: _counter(request, "dede_images_total", {"outcome": outcome})
        for outcome in ("clean", "flagged", "error")
    }
    return {
        "images": images,
        "ready": state.ready and not state.draining,
        "queue_depth": state.batcher.queue_depth if state.batcher else 0,
        "time": time.time(),
    }
