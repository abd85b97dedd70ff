"""The HTTP service and web page behind ``histodetect serve``: one trained run, a FastAPI app."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from histodetect import PATCH_SIZE, __version__
from histodetect.data.patchio import PatchDecodeError, check_patch, decode_patch
from histodetect.errors import HistodetectError
from histodetect.inference.predictor import TTA_CHOICES, Predictor
from histodetect.slides.analyse import map_image, overlay_png, png_bytes

log = logging.getLogger("histodetect.service")

WEB_DIR = Path(__file__).with_name("web")
API_KEY_HEADER = "X-API-Key"
DEFAULT_MAX_UPLOAD_MB = 32.0
DEFAULT_MAX_FILES = 256
DEFAULT_MAX_PATCH_SIDE = 1024
DEFAULT_MAX_PIXELS = 2048 * 2048
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_BATCH_WAIT_MS = 2.0
MAX_BATCH = 256
MAX_NAME = 200  # characters of an uploaded file name echoed back
_MAGIC = {
    b"II*\x00": "tif",
    b"MM\x00*": "tif",
    b"II+\x00": "tif",  # BigTIFF
    b"MM\x00+": "tif",
    b"\x89PNG": "png",
    b"\xff\xd8\xff": "jpg",
}

# Module level: FastAPI resolves the (postponed) annotations of endpoints in this namespace.
API_KEY_SCHEME = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="needed when the service was started with --api-key",
)

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

**API key**: when the service was started with one, every `/v1/` call needs the
`{API_KEY_HEADER}` header (401 otherwise); `/`, `/healthz` and `/openapi.json` stay open.
"""


# ----------------------------------------------------------------------------- schemas


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
    image_png: str | None = Field(
        None, description="base64 PNG of the 96x96 patch the model saw (include_image=true)"
    )


class PredictResponse(BaseModel):
    """Predictions for every uploaded patch, in upload order."""

    model_id: str
    threshold: float
    tta: int
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


# ----------------------------------------------------------------------------- decoding


class UploadError(Exception):
    """An upload the service cannot use: an HTTP status and a message naming the file."""

    def __init__(self, status: int, file: str, problem: str) -> None:
        super().__init__(f"{file}: {problem}")
        self.status, self.file, self.problem = status, file, problem


def _display_name(name: str | None) -> str:
    # Echoed back only, never used as a path; browsers may send "C:\\dir\\x.tif".
    name = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    return name[:MAX_NAME] or "upload"


def sniff_format(data: bytes) -> str | None:
    """``"tif"``, ``"png"`` or ``"jpg"`` from the file's first bytes, else None."""
    for magic, kind in _MAGIC.items():
        if data.startswith(magic):
            return kind
    return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def image_size(data: bytes, kind: str) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels.

    Raises:
        PatchDecodeError: when the header cannot be read.
    """
    try:
        if kind == "tif":
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                page = tif.pages[0]
                # Width x height bounds the decoded size only with a few samples per pixel.
                if page.samplesperpixel > 4 or page.imagedepth > 1:
                    raise PatchDecodeError(
                        f"not an RGB image: {page.samplesperpixel} samples per pixel, "
                        f"depth {page.imagedepth}"
                    )
                return int(page.imagewidth), int(page.imagelength)
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except PatchDecodeError:
        raise
    except Exception as exc:  # any parser failure means a corrupt file
        raise PatchDecodeError(f"corrupt or truncated image ({_first_line(exc)})") from None


def decode_rgb(data: bytes, kind: str, allow_alpha: bool = False) -> np.ndarray:
    """Decode a whole TIFF/PNG/JPEG into an (H, W, 3) uint8 array.

    Args:
        data: the file's bytes.
        kind: what :func:`sniff_format` returned.
        allow_alpha: drop a fourth (alpha) channel instead of rejecting the image.

    Raises:
        PatchDecodeError: corrupt, not 8-bit, or not RGB.
    """
    try:
        if kind == "tif":
            import tifffile

            image = tifffile.imread(io.BytesIO(data), key=0)
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                if im.mode == "RGBA" and allow_alpha:
                    im = im.convert("RGB")
                if im.mode != "RGB":
                    raise PatchDecodeError(f"not an RGB image: colour mode {im.mode}")
                image = np.asarray(im)
    except PatchDecodeError:
        raise
    except Exception as exc:
        raise PatchDecodeError(f"corrupt or truncated image ({_first_line(exc)})") from None
    image = np.asarray(image)
    if allow_alpha and image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.dtype != np.uint8:
        raise PatchDecodeError(f"pixel type is {image.dtype}, expected 8-bit (uint8)")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise PatchDecodeError(f"not an RGB image: array shape {image.shape}")
    return np.ascontiguousarray(image)


@dataclass(frozen=True)
class Patch:
    """One decoded upload: the 96x96 patch the model sees and what was uploaded."""

    file: str
    image: np.ndarray
    width: int
    height: int

    @property
    def cropped(self) -> bool:
        """Whether the upload was larger than a patch and centre-cropped."""
        return (self.width, self.height) != (PATCH_SIZE, PATCH_SIZE)


def _checked_header(data: bytes, name: str, max_side: int | None, max_pixels: int | None):
    kind = sniff_format(data)
    if kind is None:
        raise UploadError(415, name, "not a TIFF, PNG or JPEG image")
    try:
        width, height = image_size(data, kind)
    except PatchDecodeError as exc:
        raise UploadError(422, name, str(exc)) from None
    if max_side is not None and max(width, height) > max_side:
        raise UploadError(
            413, name, f"{width}x{height} px is larger than the limit of {max_side} px a side"
        )
    if max_pixels is not None and width * height > max_pixels:
        raise UploadError(
            413,
            name,
            f"{width}x{height} px = {width * height:,} pixels is more than the limit of "
            f"{max_pixels:,}",
        )
    if min(width, height) < PATCH_SIZE:
        raise UploadError(
            422,
            name,
            f"{width}x{height} px is smaller than a {PATCH_SIZE}x{PATCH_SIZE} patch "
            "(larger images are centre-cropped, smaller ones rejected)",
        )
    return kind, width, height


def decode_patch_upload(data: bytes, name: str, workdir: Path, max_side: int) -> Patch:
    """Decode one uploaded patch the way ``histodetect predict`` decodes a file.

    A 96x96 upload is written under ``workdir`` (a private temp folder) with a name chosen here
    from its detected format and read with :func:`~histodetect.patchio.decode_patch`, so its
    pixels are exactly those ``predict`` reads from the same file. A larger one is decoded whole
    and centre-cropped to 96x96.

    Raises:
        UploadError: 415 not an image, 413 too large, 422 corrupt, not RGB or too small.
    """
    name = _display_name(name)
    kind, width, height = _checked_header(data, name, max_side, None)
    try:
        if (width, height) == (PATCH_SIZE, PATCH_SIZE):
            fd, path = tempfile.mkstemp(suffix=f".{kind}", dir=workdir)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            image = decode_patch(path)
        else:
            whole = decode_rgb(data, kind)
            top, left = (whole.shape[0] - PATCH_SIZE) // 2, (whole.shape[1] - PATCH_SIZE) // 2
            image = check_patch(
                np.ascontiguousarray(whole[top : top + PATCH_SIZE, left : left + PATCH_SIZE])
            )
    except PatchDecodeError as exc:
        raise UploadError(422, name, str(exc)) from None
    return Patch(name, np.array(image), width, height)


def decode_patch_uploads(
    uploads: list[tuple[str, bytes]], max_side: int
) -> tuple[list[Patch], list[UploadError]]:
    """Decode every upload in a private temp folder (removed afterwards); collect the bad ones."""
    patches, bad = [], []
    with tempfile.TemporaryDirectory(prefix="histodetect-upload-") as tmp:
        for name, data in uploads:
            try:
                patches.append(decode_patch_upload(data, name, Path(tmp), max_side))
            except UploadError as exc:
                bad.append(exc)
    return patches, bad


def decode_region_upload(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Decode an uploaded region (RGB, alpha dropped) after checking its size from the header.

    Raises:
        UploadError: 415 not an image, 413 too many pixels, 422 corrupt, not RGB or too small.
    """
    name = _display_name(name)
    kind, _, _ = _checked_header(data, name, None, max_pixels)
    try:
        return decode_rgb(data, kind, allow_alpha=True)
    except PatchDecodeError as exc:
        raise UploadError(422, name, str(exc)) from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ----------------------------------------------------------------------------- batching


class MicroBatcher:
    """Gathers the patches of concurrent requests into one ``predict_proba`` call.

    Requests queue their patches; a single consumer task takes the first waiting request,
    waits ``max_wait_s`` for others to arrive, then runs everything queued (up to
    ``max_batch`` patches, more if one request alone has more) as one batch on the model
    thread. While a batch runs, new requests pile up and form the next one, so under load
    batches grow by themselves and a lone request waits only ``max_wait_s``.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        run_on_model_thread: Callable[..., asyncio.Future],
        max_batch: int = MAX_BATCH,
        max_wait_s: float = DEFAULT_BATCH_WAIT_MS / 1000,
    ) -> None:
        self.predict = predict
        self.run_on_model_thread = run_on_model_thread
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batches: list[int] = []  # sizes of the last batches run, for tests and benchmarks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def _ensure_running(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        # A new event loop (test clients make one per session) needs its own queue and task.
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._consume(self._queue))
        assert self._queue is not None
        return self._queue

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """P(tumour) of ``images`` (N, 96, 96, 3) uint8, computed in a shared batch."""
        if len(images) == 0:
            return np.empty(0, np.float32)
        queue = self._ensure_running()
        future = asyncio.get_running_loop().create_future()
        queue.put_nowait((images, future))
        return await future

    async def _consume(self, queue: asyncio.Queue) -> None:
        while True:
            items = [await queue.get()]
            if self.max_wait_s > 0:
                await asyncio.sleep(self.max_wait_s)
            total = len(items[0][0])
            while total < self.max_batch and not queue.empty():
                item = queue.get_nowait()
                items.append(item)
                total += len(item[0])
            # Requests that timed out meanwhile are not computed.
            items = [(x, f) for x, f in items if not f.done()]
            if not items:
                continue
            batch = np.concatenate([x for x, _ in items]) if len(items) > 1 else items[0][0]
            try:
                probs = await self.run_on_model_thread(self.predict, batch)
            except Exception as exc:  # handed to every waiting request, the loop goes on
                for _, f in items:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.batches = [*self.batches[-99:], len(batch)]
            start = 0
            for x, f in items:
                if not f.done():
                    f.set_result(probs[start : start + len(x)])
                start += len(x)

    def close(self) -> None:
        """Stop the consumer task (pending requests are left to their timeouts)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()


# ----------------------------------------------------------------------------- the app


@dataclass
class Service:
    """Everything the endpoints share: the model, its description, the limits, the batcher."""

    predictor: Predictor
    info: dict
    api_key: str | None
    limits: Limits
    tta: int
    region_stride: int
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="histodetect-model")
    )
    batcher: MicroBatcher | None = None

    def on_model_thread(self, func: Callable, *args, **kwargs) -> asyncio.Future:
        """Run ``func`` on the single model thread.

        Every use of the model goes through this one thread: Grad-CAM puts hooks on a layer,
        which must not see another request's forward pass, and two CPU inferences at once
        would only compete for the same cores.
        """
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self.executor, partial(func, *args, **kwargs))

    @property
    def model_id(self) -> str:
        """Architecture and the first 12 hex digits of the weights' SHA-256."""
        return self.info["model_id"]


def model_description(run: Path, predictor: Predictor) -> dict:
    """What ``GET /v1/model`` tells about a run (no server paths)."""
    from histodetect.inference.predictor import MODEL_FILE

    meta = predictor.meta
    digest = hashlib.sha256((run / MODEL_FILE).read_bytes()).hexdigest()
    data: dict[str, Any] = {"fingerprint": meta.get("data")}
    if (run / "data.json").exists():
        d = json.loads((run / "data.json").read_text())
        data = {
            "fingerprint": d.get("fingerprint", meta.get("data")),
            "kind": (d.get("source") or {}).get("kind"),
            "counts": d.get("counts"),
            "synthetic": bool(d.get("synthetic")),
        }
    metrics: dict[str, Any] = {}
    if (run / "metrics.json").exists():
        m = json.loads((run / "metrics.json").read_text())
        metrics = {k: m[k] for k in ("valid", "epochs_run", "optimizer_steps") if k in m}
    if (run / "metrics_valid.json").exists():
        ev = json.loads((run / "metrics_valid.json").read_text())
        metrics["evaluation_valid"] = {
            k: ev[k] for k in ("metrics", "intervals", "thresholds") if k in ev
        }
    synthetic = bool(meta.get("synthetic")) or bool(data.get("synthetic"))
    return {
        "model_id": f"{meta.get('arch', 'model')}-{digest[:12]}",
        "run": run.resolve().name,
        "arch": meta.get("arch", "?"),
        "input_size": int(meta.get("input_size", PATCH_SIZE)),
        "crop": predictor.crop,
        "threshold": predictor.threshold,
        "temperature": predictor.temperature,
        "synthetic": synthetic,
        "data": data,
        "metrics": metrics,
        "version": __version__,
    }


def _error(status: int, detail: str, problems: list[dict] | None = None, **kw) -> JSONResponse:
    return JSONResponse({"detail": detail, "problems": problems or []}, status_code=status, **kw)


def _upload_error_response(errors: list[UploadError]) -> JSONResponse:
    first = errors[0]
    more = f" (and {len(errors) - 1} more bad file(s))" if len(errors) > 1 else ""
    problems = [{"file": e.file, "problem": e.problem} for e in errors]
    return _error(first.status, f"{first}{more}", problems)


def _key_ok(expected: str | None, given: str | None) -> bool:
    if not expected:
        return True
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class RequestGuard:
    """Pure ASGI middleware: API key, body size and a deadline, before any body is read.

    Checked here rather than in endpoint dependencies because FastAPI parses a multipart body
    before it runs dependencies: an unauthenticated or oversized upload is refused without
    reading it, and a slow upload counts against the request's timeout.
    """

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = self.service.limits
        max_bytes = int(limits.max_upload_mb * 1024 * 1024)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"].startswith("/v1/") and not _key_ok(
            self.service.api_key, headers.get(API_KEY_HEADER.lower())
        ):
            response = _error(
                401,
                f"missing or wrong API key: send it in the {API_KEY_HEADER} header",
                headers={"WWW-Authenticate": API_KEY_HEADER},
            )
            await response(scope, receive, send)
            return
        too_large = (
            f"the upload is larger than the limit of {limits.max_upload_mb:g} MB per request"
        )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > max_bytes:
            await _error(413, too_large)(scope, receive, send)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    # FastAPI re-raises HTTPExceptions met while parsing a body.
                    raise HTTPException(413, too_large)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, limited_receive, tracked_send), limits.timeout_s)
        except asyncio.TimeoutError:
            if started:  # half a response is out: all we can do is cut it
                raise
            detail = f"the request took longer than the {limits.timeout_s:g} s timeout"
            await _error(504, detail)(scope, receive, send)
        except HTTPException as exc:  # the 413 above, where nothing caught it
            if started:
                raise
            await _error(exc.status_code, str(exc.detail))(scope, receive, send)


def create_app(
    run: str | Path,
    *,
    api_key: str | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_files: int = DEFAULT_MAX_FILES,
    max_patch_side: int = DEFAULT_MAX_PATCH_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    tta: int = 1,
    region_stride: int = 32,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
    device: str = "auto",
    predictor: Predictor | None = None,
) -> FastAPI:
    """The FastAPI app serving one run: the API under ``/v1``, the web page at ``/``.

    Args:
        run: a finished run folder (``model.json`` + ``model.safetensors``; never a pickle).
        api_key: when set, every ``/v1/`` request needs it in the ``X-API-Key`` header.
        max_upload_mb: largest request body (413 beyond).
        max_files: most patches in one ``/v1/predict`` request (413 beyond).
        max_patch_side: largest side of an uploaded patch before centre-cropping (413 beyond).
        max_pixels: most pixels in a ``/v1/region`` image (413 beyond).
        timeout_s: deadline of a request, upload included (504 beyond).
        tta: dihedral views averaged per patch (1, 2, 4 or 8), as ``predict --tta``.
        region_stride: default step in px between patches of a region map.
        batch_wait_ms: how long the micro-batcher waits for concurrent requests.
        device: torch device for the model ("auto", "cpu", "cuda", ...).
        predictor: an already loaded predictor of ``run`` (tests, benchmarks).

    Raises:
        HistodetectError: when the run folder is incomplete or an option is out of range.
    """
    run = Path(run)
    if tta not in TTA_CHOICES:
        raise HistodetectError(f"--tta must be one of {TTA_CHOICES}, got {tta}.")
    if min(max_upload_mb, max_files, max_patch_side, max_pixels, timeout_s) <= 0:
        raise HistodetectError("service limits must be positive.")
    if max_patch_side < PATCH_SIZE or max_pixels < PATCH_SIZE * PATCH_SIZE:
        raise HistodetectError(f"size limits below one {PATCH_SIZE}x{PATCH_SIZE} patch.")
    predictor = predictor or Predictor.from_run(run, device)
    limits = Limits(
        max_upload_mb=max_upload_mb,
        max_files=max_files,
        max_patch_side=max_patch_side,
        max_region_pixels=max_pixels,
        timeout_s=timeout_s,
    )
    info = model_description(run, predictor)
    service = Service(predictor, info, api_key or None, limits, tta, region_stride)
    service.batcher = MicroBatcher(
        partial(predictor.predict_proba, tta=tta),
        service.on_model_thread,
        max_wait_s=batch_wait_ms / 1000,
    )

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        # The model thread stays: a test client may start the same app again.
        service.batcher.close()

    app = FastAPI(
        title="histodetect",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # The interactive docs pages load their scripts from a CDN; the service works offline.
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.add_middleware(RequestGuard, service=service)

    def require_key(key: Annotated[str | None, Depends(API_KEY_SCHEME)]) -> None:
        # RequestGuard has already refused bad keys before the body was read; this repeats
        # the check so that no /v1 route can ever be reached without it, and documents it.
        if not _key_ok(service.api_key, key):
            raise HTTPException(401, f"missing or wrong API key ({API_KEY_HEADER} header)")

    # Declared only when a key is set, so that the OpenAPI schema says what the service does.
    guarded = [Depends(require_key)] if service.api_key else []
    threshold = predictor.threshold

    @app.exception_handler(UploadError)
    async def _upload_error(_request: Request, exc: UploadError) -> JSONResponse:
        return _upload_error_response([exc])

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg"))
        return _error(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error", exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    async def read_uploads(files: list[UploadFile]) -> list[tuple[str, bytes]]:
        return [(f.filename or "upload", await f.read()) for f in files]

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz() -> Health:
        """Liveness: the model is loaded."""
        return Health(status="ok", model_id=service.model_id)

    @app.get("/v1/model", response_model=ModelInfo, responses=ERRORS, dependencies=guarded)
    async def model() -> ModelInfo:
        """Architecture, training data fingerprint, validation metrics and limits."""
        return ModelInfo(**info, tta=tta, limits=limits)

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS, dependencies=guarded)
    async def predict(
        files: Annotated[
            list[UploadFile], File(description="one or many patches (.tif, .png, .jpg)")
        ],
        include_image: Annotated[
            bool, Query(description="also return each 96x96 patch as a base64 PNG")
        ] = False,
    ) -> PredictResponse:
        """P(tumour in the centre 32x32 px) and the label at the run's threshold, per patch.

        Patches of concurrent requests are computed together in one batch.
        """
        if len(files) > limits.max_files:
            raise HTTPException(
                413, f"{len(files)} files are more than the limit of {limits.max_files}"
            )
        uploads = await read_uploads(files)
        patches, bad = await run_in_threadpool(decode_patch_uploads, uploads, limits.max_patch_side)
        if bad:
            return _upload_error_response(bad)
        probs = await service.batcher.submit(np.stack([p.image for p in patches]))
        images = (
            await run_in_threadpool(lambda: [_b64(png_bytes(p.image)) for p in patches])
            if include_image
            else [None] * len(patches)
        )
        results = [
            PatchResult(
                file=p.file,
                probability=float(prob),
                label=int(prob >= threshold),
                width=p.width,
                height=p.height,
                cropped=p.cropped,
                image_png=image,
            )
            for p, prob, image in zip(patches, probs, images, strict=True)
        ]
        return PredictResponse(
            model_id=service.model_id, threshold=threshold, tta=tta, results=results
        )

    @app.post(
        "/v1/explain",
        response_class=Response,
        responses={
            200: {
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                "description": "the patch with its Grad-CAM heat map and the centre box; "
                "headers X-Probability, X-Label, X-Model-Id",
            },
            **ERRORS,
        },
        dependencies=guarded,
    )
    async def explain(
        file: Annotated[UploadFile, File(description="one patch (.tif, .png, .jpg)")],
    ) -> Response:
        """Grad-CAM overlay PNG of one patch: where the model found tumour evidence.

        Red marks the strongest evidence for tumour, untinted tissue none; the white box is the
        labelled centre 32x32 px. The probability (as /v1/predict) is in ``X-Probability``.
        """
        from histodetect.inference.explain import gradcam, overlay

        (upload,) = await read_uploads([file])
        patches, bad = await run_in_threadpool(
            decode_patch_uploads, [upload], limits.max_patch_side
        )
        if bad:
            return _upload_error_response(bad)
        image = patches[0].image[None]
        prob = float((await service.batcher.submit(image))[0])
        heat = await service.on_model_thread(gradcam, predictor, image)
        png = await run_in_threadpool(lambda: png_bytes(overlay(image[0], heat[0])))
        return Response(
            png,
            media_type="image/png",
            headers={
                "X-Probability": f"{prob:.9g}",
                "X-Label": str(int(prob >= threshold)),
                "X-Model-Id": service.model_id,
            },
        )

    @app.post(
        "/v1/region",
        response_model=RegionResponse,
        responses={
            **ERRORS,
            503: {"model": ErrorResponse, "description": "region mapping is not available"},
        },
        dependencies=guarded,
    )
    async def region(
        file: Annotated[UploadFile, File(description="an RGB region image (.tif, .png, .jpg)")],
        mpp: Annotated[
            float | None,
            Query(gt=0, le=1000, description="microns per pixel, for region areas in mm²"),
        ] = None,
        stride: Annotated[
            int | None,
            Query(ge=16, le=96, description="px between patch centres (default: the server's)"),
        ] = None,
    ) -> RegionResponse:
        """Map tumour probability over a larger image; the overlay PNG and the regions found.

        The image is cut into overlapping 96x96 patches every ``stride`` px (the slide code),
        each classified; cells without tissue are skipped. Regions are connected areas at or
        above the run's threshold.
        """
        (name, data), *_ = await read_uploads([file])
        image = await run_in_threadpool(decode_region_upload, data, name, limits.max_region_pixels)

        step = stride or service.region_stride
        # Cost grows as 1/stride²: a small stride on a large image could hold the model
        # thread far longer than a request may take.
        cells = (image.shape[0] // step + 1) * (image.shape[1] // step + 1)
        budget = (limits.max_region_pixels // service.region_stride**2) + 1
        if cells > 4 * budget:
            raise HTTPException(
                413,
                f"{image.shape[1]}x{image.shape[0]} px at stride {step} is {cells:,} patches, "
                f"more than the limit of {4 * budget:,}: use a larger stride or a smaller image",
            )
        try:
            region_map = await service.on_model_thread(
                map_image, predictor, image, stride=step, tta=tta, mpp=mpp
            )
        except HistodetectError as exc:
            raise UploadError(422, _display_name(name), str(exc)) from None
        png = await run_in_threadpool(overlay_png, image, region_map)
        tissue = np.asarray(region_map.tissue)
        prob = np.asarray(region_map.prob)
        return RegionResponse(
            model_id=service.model_id,
            file=_display_name(name),
            width=int(image.shape[1]),
            height=int(image.shape[0]),
            stride=int(region_map.stride),
            threshold=float(getattr(region_map, "threshold", threshold)),
            tissue_fraction=float(tissue.mean()) if tissue.size else 0.0,
            max_probability=float(prob[tissue].max()) if tissue.any() else 0.0,
            regions=[Region(**r) for r in region_map.regions],
            overlay_png=_b64(png),
        )

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def serve(
    run: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **options,
) -> None:
    """Load ``run`` and serve it with uvicorn until interrupted.

    Args:
        run: a finished run folder.
        host: interface to bind; the loopback by default, so nothing else can connect.
        port: TCP port.
        log_level: uvicorn's log level.
        **options: passed to :func:`create_app` (``api_key``, limits, ``tta``...).
    """
    import uvicorn

    app = create_app(run, **options)
    service: Service = app.state.service
    where = f"[{host}]" if ":" in host else host
    print(
        f"serving {run} (model {service.model_id}) at http://{where}:{port}/ (Ctrl-C stops)",
        flush=True,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        # Bounded: beyond this many open requests uvicorn answers 503 at once.
        limit_concurrency=256,
        timeout_keep_alive=5,
    )
