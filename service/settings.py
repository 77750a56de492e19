"""Every knob of the service, read from environment variables with the `DEDE_` prefix.

`DEDE_MAX_BATCH_SIZE=16 python -m service` or, equally, `python -m service --max-batch-size 16`.
List-valued settings take comma-separated values (`DEDE_EXECUTION_PROVIDERS=cuda,cpu`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Short names a user may type for the ONNX Runtime providers we support.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def _default_decode_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class Settings(BaseSettings):
    """The service's configuration. Field descriptions double as `--help` text."""

    model_config = SettingsConfigDict(env_prefix="DEDE_", extra="ignore", validate_default=True)

    bundle: Path = Field(Path("bundles/demo"), description="model bundle: a directory or a .tar of one")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for all interfaces)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")

    max_batch_size: int = Field(
        32,
        ge=1,
        le=4096,
        description="most images run through the model at once; on CUDA every batch is padded to this size",
    )
    max_batch_delay_ms: float = Field(
        5.0, ge=0, le=10_000, description="longest wait for a batch to fill while more work is arriving"
    )
    max_queue: int = Field(
        1024, ge=1, description="most images waiting for the model; beyond it requests get 503"
    )
    max_in_flight: int = Field(
        256,
        ge=1,
        description="most /detect requests being read, decoded or scored at once; beyond it requests get 503",
    )
    max_upload_bytes: int = Field(16 * 1024 * 1024, ge=1, description="largest request body, in bytes")
    max_image_pixels: int = Field(
        25_000_000, ge=1, description="largest image (width x height) accepted, checked before decoding"
    )
    max_images_per_request: int = Field(64, ge=1, description="most images in one /detect request")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="longest time from a request's first byte (or the connection's opening) to the end of "
        "its headers; a slower client gets 408 and its connection is closed",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="longest time a client may take to send a /detect body; a slower one gets 408 and its "
        "connection is closed",
    )

    workers: int = Field(
        0,
        ge=0,
        le=256,
        description="serving processes on the one port, each with its own ONNX Runtime session, decode "
        "threads and batcher (0: auto, one per core up to 8 on CUDA, one per two cores on a CPU but at least "
        "two where there are two cores); with "
        "more than one, /metrics sums every worker and /readyz is ready only when all are",
    )
    execution_providers: Annotated[list[str], NoDecode] = Field(
        ["auto"], description="ONNX Runtime providers in order (auto, cuda, tensorrt, cpu)"
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0: one per core)")
    worker_nice_increment: int = Field(
        5,
        ge=0,
        le=19,
        description="how many nice levels the threads decoding images and running the model sit below the "
        "event loop (0: same priority); on a saturated CPU the event loop then still answers refusals quickly",
    )
    # 65,536 pixels (64 CIFAR images, or one 256x256) decode in a few milliseconds; on 2 cores handing
    # them to a thread cost more saturated throughput than it saved (benchmarks/serving/results.json
    # as committed in 37ad065 and 81a5bdb: 1130 -> 1318 images/s when this went from 4,096 to 65,536).
    inline_decode_max_pixels: int = Field(
        65_536,
        ge=0,
        description="requests whose images total at most this many pixels (from their headers) are decoded "
        "on the event loop: a thread hand-off costs more than decoding a few thumbnails (0: never)",
    )
    decode_threads: int = Field(
        default_factory=_default_decode_threads, ge=1, description="threads decoding uploaded images"
    )
    # Issue 21: limits on a file's structure, checked before any pixel is decoded (service/structure.py).
    jpeg_max_scans: int = Field(
        64, ge=1, description="most scans in a JPEG (each is a pass over every block); more: 422"
    )
    jpeg_max_segments: int = Field(
        256, ge=1, description="most segments in a JPEG besides its scans (APPn, COM, tables); more: 422"
    )
    jpeg_max_metadata_bytes: int = Field(
        4 * 1024 * 1024, ge=0, description="most bytes in a JPEG's APPn and COM segments together; more: 422"
    )
    bmp_max_rle_pixels: int = Field(
        1024 * 1024,
        ge=0,
        description="largest RLE-compressed BMP, in pixels (Pillow decodes RLE in Python); larger: 422",
    )
    png_max_chunks: int = Field(4096, ge=1, description="most chunks in a PNG; more: 422")
    webp_max_frames: int = Field(1024, ge=1, description="most frames in an animated WebP; more: 422")
    # What the structure checks leave is bounded by pixels x passes; above this it may still take
    # long enough to matter, so it runs where it can be stopped.
    inprocess_decode_max_cost: int = Field(
        4 * 1024 * 1024,
        ge=0,
        description="images whose decoding costs at most this many pixels x passes (a progressive JPEG's "
        "scans; x64 for RLE BMPs) are decoded in the service process; costlier ones in worker processes "
        "that are killed past DEDE_DECODE_BUDGET_S",
    )
    decode_processes: int = Field(
        2,
        ge=0,
        description="worker processes decoding the costlier images (0: none, every image is decoded in "
        "the service process, with no budget enforced)",
    )
    decode_budget_s: float = Field(
        0.5,
        gt=0,
        description="most CPU-seconds a worker process may spend on one image (and at most 3x that in wall "
        "time); past it the worker is killed and replaced and the image gets 422 decode_budget_exceeded",
    )
    refusal_delay_s: float = Field(
        0.25,
        ge=0,
        le=5,
        description="a request refused for its images' bytes (every image of a /detect, any of a v2 "
        "request: format, structure, decoding budget) is answered after this wait: a client flooding costly uploads gets at most 1/this refusals "
        "a second per connection, and the wait holds no core (0: answer at once)",
    )
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        description="longest time from a /detect body's last byte to its answer; past it the request gets "
        "504 and its images are neither decoded nor scored further",
    )

    api_key: SecretStr | None = Field(None, description="if set, /detect and /v1/models need this key")
    protect_metrics: bool = Field(False, description="also require the API key on /metrics")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        [], description="origins allowed by CORS, comma-separated (empty: CORS off)"
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="if set, /metrics moves to this port (beside /healthz and /readyz), off the main one",
    )

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="text, or one JSON object per line")
    access_log: bool = Field(True, description="log one line per request")

    drain_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM, longest wait for accepted requests to finish"
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 503 answers")

    @field_validator("execution_providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        names = _split_commas(value)
        if isinstance(names, list):
            resolved = [PROVIDER_ALIASES.get(str(n).lower(), str(n)) for n in names]
            allowed = {"auto", *PROVIDER_ALIASES.values()}
            unknown = [n for n in resolved if n not in allowed]
            if unknown:
                raise ValueError(f"unknown execution provider(s) {unknown}; use auto, cuda, tensorrt or cpu")
            if "auto" in resolved and len(resolved) > 1:
                raise ValueError("'auto' cannot be combined with other providers")
            if not resolved:
                raise ValueError("give at least one execution provider (or auto)")
            return resolved
        return names

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("api_key", "metrics_port", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # An empty DEDE_API_KEY= would otherwise "protect" the API with the empty string.
        return None if value == "" else value


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def describe_settings() -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting, for --help and the README."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(default)
        rows.append((f"DEDE_{name.upper()}", str(default) if default is not None else "", field.description))
    return rows


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one `--flag` per setting to `parser` (each defaults to None: unset flags leave the
    DEDE_* variable or the default in charge). Light: imports nothing of the server stack."""
    for env_name, default, description in describe_settings():
        name = env_name.removeprefix("DEDE_").lower()
        shown = "unset" if name == "api_key" else default or "empty"
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, help=f"{description} [env {env_name}; default: {shown}]"
        )


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """Settings from the flags `add_settings_arguments` added (flags win over DEDE_* variables);
    a bad value exits through `parser.error` with the field named, never a traceback."""
    names = set(Settings.model_fields)
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        parser.error(problems)
        raise  # parser.error exits; this line is for type checkers
