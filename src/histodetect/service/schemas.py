"""What the API answers: the response models, the error body, the limits and the OpenAPI text."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

API_KEY_HEADER = "X-API-Key"
DEFAULT_MAX_UPLOAD_MB = 32.0
DEFAULT_MAX_FILES = 256
DEFAULT_MAX_PATCH_SIDE = 1024
DEFAULT_MAX_PIXELS = 2048 * 2048
DEFAULT_TIMEOUT_S = 60.0

DESCRIPTION = f"""
P(tumour in the centre 32x32 px) of 96x96 H&E lymph-node patches (PCam / Kaggle), Grad-CAM
explanations and tumour maps of larger regions, from one trained `histodetect` run.

**Uploads** are multipart form fields: `files` (one or many) for `/v1/predict`, `file` for
`/v1/explain` and `/v1/region`. Accepted: TIFF, PNG and JPEG, recognised by their content, not
their name; anything else is answered **415** naming the file, a corrupt or truncated image or
one that is not 8-bit RGB **422** naming the file (one bad file fails the whole request).

**Patch sizes**: a patch must be at least 96x96 px. A larger one is **centre-cropped** to its
central 96x96 px (the label concerns the centre, and the model was trained at that
magnification, so nothing is resized); the result says `cropped: true`. Smaller ones are
rejected with 422. Patches larger than the service's `max_patch_side` are rejected with 413.

**Regions** (`/v1/region`): any RGB image of at least 96x96 px and at most `max_region_pixels`
pixels (default {DEFAULT_MAX_PIXELS:,} = 2048x2048; 413 beyond), mapped with the slide code;
PNG/TIFF alpha channels are dropped.

**Limits** (see `GET /v1/model`): the request body (413 beyond `max_upload_mb`), files per
request (413), and a timeout per request (504). Uploads are kept in memory or the system temp
area; no name from a request is ever used as a path.

**Out of scope**: a run with scope statistics also scores how unlike its training patches each
patch is (other tissue, stain or scanner). `in_scope: false` is a warning that the probability
is not to be trusted, not a diagnosis; `null` means the run has no statistics.

**API key**: when the service was started with one, every `/v1/` call needs the
`{API_KEY_HEADER}` header (401 otherwise); `/`, `/healthz` and `/openapi.json` stay open.
"""


class ErrorProblem(BaseModel):
    """One unusable uploaded file."""

    file: str = Field(description="the uploaded file's name, as sent")
    problem: str


class ErrorResponse(BaseModel):
    """Every error answer: one readable sentence, and the bad files where there are some."""

    detail: str
    problems: list[ErrorProblem] = Field(default_factory=list)


class PatchResult(BaseModel):
    """The prediction for one uploaded patch."""

    file: str = Field(description="the uploaded file's name, as sent")
    probability: float = Field(ge=0, le=1, description="P(tumour in the centre 32x32 px)")
    label: int = Field(description="1 = tumour (probability >= threshold), else 0")
    width: int = Field(description="width of the uploaded image in px")
    height: int = Field(description="height of the uploaded image in px")
    cropped: bool = Field(description="true when a larger image was centre-cropped to 96x96")
    scope_score: float | None = Field(
        None, description="out-of-scope score (higher = less like the training data)"
    )
    in_scope: bool | None = Field(
        None, description="false: unlike the training data, do not trust the probability"
    )
    image_png: str | None = Field(
        None, description="base64 PNG of the 96x96 patch the model saw (include_image=true)"
    )


class PredictResponse(BaseModel):
    """Predictions for every uploaded patch, in upload order."""

    model_id: str
    threshold: float
    tta: int
    scope_threshold: float | None = Field(
        None, description="scores above it are out of scope; null: the run has no statistics"
    )
    out_of_scope: int | None = Field(None, description="how many patches are out of scope")
    results: list[PatchResult]


class Region(BaseModel):
    """One connected area above the threshold in a region map."""

    id: int
    area_px: float
    area_mm2: float | None = Field(None, description="null when the pixel size (mpp) is unknown")
    max_prob: float
    mean_prob: float
    polygon: list[list[float]] = Field(description="outline as [x, y] pixel coordinates")
    holes: list[list[list[float]]] = Field(
        default_factory=list, description="inner rings (tissue below the threshold)"
    )
    longest_diameter_px: float | None = None
    longest_diameter_mm: float | None = Field(None, description="null when mpp is unknown")
    out_of_scope_share: float | None = Field(
        None, description="share of the region's cells out of scope; null: no statistics"
    )
    out_of_scope: bool = Field(
        False, description="true when at least half of it is out of scope: not to be read as tumour"
    )


class RegionResponse(BaseModel):
    """A tumour map of one uploaded region."""

    model_id: str
    file: str
    width: int
    height: int
    stride: int
    threshold: float
    tissue_fraction: float = Field(description="share of stride cells holding tissue")
    max_probability: float
    out_of_scope_share: float | None = Field(
        None,
        description="share of tissue cells out of scope; null: no statistics, or a dense map "
        "(no per-patch features)",
    )
    regions: list[Region]
    overlay_png: str = Field(description="base64 PNG: the region with the heat map overlaid")


class Limits(BaseModel):
    """What the service accepts."""

    max_upload_mb: float
    max_files: int
    max_patch_side: int
    max_region_pixels: int
    timeout_s: float


class ModelInfo(BaseModel):
    """The model behind the service: architecture, training data and metrics."""

    model_id: str
    run: str = Field(description="the run folder's name")
    arch: str
    input_size: int
    crop: int
    threshold: float
    scope_threshold: float | None = Field(
        None, description="out-of-scope scores above it are flagged; null: no statistics"
    )
    temperature: float
    tta: int
    synthetic: bool = Field(description="true when trained on SYNTHETIC data")
    data: dict[str, Any] = Field(description="training data: fingerprint, kind, counts")
    metrics: dict[str, Any] = Field(description="validation metrics recorded in the run")
    limits: Limits
    version: str


class Health(BaseModel):
    """Liveness answer."""

    status: str
    model_id: str


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "malformed multipart body"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    413: {"model": ErrorResponse, "description": "upload, file count or image too large"},
    415: {"model": ErrorResponse, "description": "a file is not a TIFF, PNG or JPEG image"},
    422: {"model": ErrorResponse, "description": "corrupt, non-RGB or too small image"},
    504: {"model": ErrorResponse, "description": "the request took longer than the timeout"},
}


def error_response(
    status: int, detail: str, problems: list[dict] | None = None, **kw
) -> JSONResponse:
    """An :class:`ErrorResponse` body with ``status``; ``kw`` goes to the JSONResponse (headers)."""
    return JSONResponse({"detail": detail, "problems": problems or []}, status_code=status, **kw)
