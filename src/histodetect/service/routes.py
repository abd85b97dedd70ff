"""The endpoints: ``/healthz``, ``/v1/model``, ``/v1/predict``, ``/v1/explain``, ``/v1/region``.

Also the offline web page at ``/``.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, UploadFile, params
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from histodetect.errors import HistodetectError
from histodetect.service.guards import key_dependencies
from histodetect.service.handlers import upload_error_response
from histodetect.service.schemas import (
    ERRORS,
    ErrorResponse,
    Health,
    ModelInfo,
    PatchResult,
    PredictResponse,
    Region,
    RegionResponse,
)
from histodetect.service.state import Service
from histodetect.service.uploads import (
    UploadError,
    decode_patch_uploads,
    decode_region_upload,
    display_name,
)
from histodetect.slides.maps.mapping import map_image, overlay_png
from histodetect.slides.maps.render import png_bytes

WEB_DIR = Path(__file__).with_name("web")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


async def _read_uploads(files: list[UploadFile]) -> list[tuple[str, bytes]]:
    return [(f.filename or "upload", await f.read()) for f in files]


def register_routes(app: FastAPI, service: Service) -> None:
    """Add ``/healthz`` and the ``/v1`` API; every ``/v1`` route checks the API key, if any."""
    guarded = key_dependencies(service)
    _add_status_routes(app, service, guarded)
    _add_predict_route(app, service, guarded)
    _add_explain_route(app, service, guarded)
    _add_region_route(app, service, guarded)


def add_web_page(app: FastAPI) -> None:
    """Serve the offline web page at ``/`` and its script and style under ``/static``."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")


def _add_status_routes(app: FastAPI, service: Service, guarded: list[params.Depends]) -> None:
    info, tta, limits = service.info, service.tta, service.limits

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz() -> Health:
        """Liveness: the model is loaded."""
        return Health(status="ok", model_id=service.model_id)

    @app.get("/v1/model", response_model=ModelInfo, responses=ERRORS, dependencies=guarded)
    async def model() -> ModelInfo:
        """Architecture, training data fingerprint, validation metrics and limits."""
        return ModelInfo(**info, tta=tta, limits=limits)


def _add_predict_route(app: FastAPI, service: Service, guarded: list[params.Depends]) -> None:
    tta, limits = service.tta, service.limits
    threshold, scope_threshold = service.predictor.threshold, service.predictor.scope_threshold

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
        uploads = await _read_uploads(files)
        patches, bad = await run_in_threadpool(decode_patch_uploads, uploads, limits.max_patch_side)
        if bad:
            return upload_error_response(bad)
        answers = await service.batcher.submit(np.stack([p.image for p in patches]))
        probs, scores = answers[:, 0], answers[:, 1]
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
                **_scope_fields(score, scope_threshold),
            )
            for p, prob, score, image in zip(patches, probs, scores, images, strict=True)
        ]
        flagged = [r.in_scope is False for r in results]
        return PredictResponse(
            model_id=service.model_id,
            threshold=threshold,
            tta=tta,
            scope_threshold=scope_threshold,
            out_of_scope=None if scope_threshold is None else sum(flagged),
            results=results,
        )


def _scope_fields(score: float, threshold: float | None) -> dict:
    """A patch's ``scope_score`` and ``in_scope`` (both None when the run has no statistics)."""
    if threshold is None or np.isnan(score):
        return {"scope_score": None, "in_scope": None}
    return {"scope_score": float(score), "in_scope": bool(score <= threshold)}


def _add_explain_route(app: FastAPI, service: Service, guarded: list[params.Depends]) -> None:
    limits, predictor = service.limits, service.predictor
    threshold = predictor.threshold

    @app.post(
        "/v1/explain",
        response_class=Response,
        responses={
            200: {
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                "description": "the patch with its Grad-CAM heat map and the centre box; "
                "headers X-Probability, X-Label, X-In-Scope (yes, no or unknown), X-Model-Id",
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

        (upload,) = await _read_uploads([file])
        patches, bad = await run_in_threadpool(
            decode_patch_uploads, [upload], limits.max_patch_side
        )
        if bad:
            return upload_error_response(bad)
        image = patches[0].image[None]
        prob, score = (await service.batcher.submit(image))[0]
        in_scope = _scope_fields(score, predictor.scope_threshold)["in_scope"]
        heat = await service.on_model_thread(gradcam, predictor, image)
        png = await run_in_threadpool(lambda: png_bytes(overlay(image[0], heat[0])))
        return Response(
            png,
            media_type="image/png",
            headers={
                "X-Probability": f"{prob:.9g}",
                "X-Label": str(int(prob >= threshold)),
                "X-In-Scope": {True: "yes", False: "no", None: "unknown"}[in_scope],
                "X-Model-Id": service.model_id,
            },
        )


def _add_region_route(app: FastAPI, service: Service, guarded: list[params.Depends]) -> None:
    tta, limits, predictor = service.tta, service.limits, service.predictor
    threshold = predictor.threshold

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
        (name, data), *_ = await _read_uploads([file])
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
            raise UploadError(422, display_name(name), str(exc)) from None
        png = await run_in_threadpool(overlay_png, image, region_map)
        tissue = np.asarray(region_map.tissue)
        prob = np.asarray(region_map.prob)
        return RegionResponse(
            model_id=service.model_id,
            file=display_name(name),
            width=int(image.shape[1]),
            height=int(image.shape[0]),
            stride=int(region_map.stride),
            threshold=float(getattr(region_map, "threshold", threshold)),
            tissue_fraction=float(tissue.mean()) if tissue.size else 0.0,
            max_probability=float(prob[tissue].max()) if tissue.any() else 0.0,
            out_of_scope_share=region_map.out_of_scope_share,
            regions=[Region(**r) for r in region_map.regions],
            overlay_png=_b64(png),
        )
