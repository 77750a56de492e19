"""Shapes of the API's answers, for /docs. Handlers build plain dicts of these shapes (cheaper)."""

from __future__ import annotations

from pydantic import BaseModel


class ImageError(BaseModel):
    code: str
    message: str


class ImageResult(BaseModel):
    index: int
    filename: str | None
    score: float | None
    flagged: bool | None
    error: ImageError | None = None


class Timing(BaseModel):
    decode_ms: float
    queue_ms: float
    compute_ms: float
    total_ms: float


class DetectResponse(BaseModel):
    model_name: str
    model_version: str
    threshold: float
    images: list[ImageResult]
    timing: Timing


class ErrorDetail(BaseModel):
    code: str
    message: str
    error_id: str | None = None
    images: list[ImageResult] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelInfo(BaseModel):
    name: str
    version: str
    created_at: str
    provider: str
    providers: list[str]
    threshold: float
    fpr_target: float
    input: dict
    encoder: dict
    decoder_preset: str
    score: str
    max_batch_size: int
    onnx_sha256: str


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
