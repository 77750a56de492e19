"""Shapes of the API's answers, for /docs. Handlers build plain dicts of these shapes (cheaper)."""

from __future__ import annotations

from pydantic import BaseModel


class ImageError(BaseModel):
    code: str
    message: str


class Explanation(BaseModel):
    """Where the graph saw the discrepancy (with explain=true). Map values are in threshold units:
    1.0 is as unusual as the threshold (see service/explain.py)."""

    map_png: str  # data:image/png;base64,... RGBA heat map, map_shape pixels
    rebuild_png: str  # data:image/png;base64,... RGB rebuild at the input size
    map_shape: list[int]
    map_max: float | None
    heat_scale_max: float  # the heat map's top colour, in threshold units
    map: list[list[float | None]] | None = None  # with explain_arrays=true
    rebuild: list[list[list[int]]] | None = None  # [3][H][W] uint8, with explain_arrays=true


class ImageResult(BaseModel):
    index: int
    filename: str | None
    score: float | None
    flagged: bool | None
    error: ImageError | None = None
    explanation: Explanation | None = None


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
    calibration: dict  # the manifest's threshold entry: FPR target, n, source, score quantiles, ...
    explains: bool  # whether /detect?explain=true works with this bundle
    max_batch_size: int
    max_images_per_request: int  # a client chunks its images to these two
    max_upload_bytes: int
    onnx_sha256: str


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
