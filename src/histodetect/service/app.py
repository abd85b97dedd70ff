"""The HTTP service and web page behind ``histodetect serve``: one trained run, a FastAPI app.

``create_app`` assembles it from the modules beside this one: ``schemas`` (what the API answers),
``uploads`` (checking and decoding uploaded files), ``batching`` (one model call for concurrent
requests), ``state`` (what endpoints share), ``guards`` (API key, body size, deadline) and
``routes`` (the endpoints, the error answers and the web page).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI

from histodetect import PATCH_SIZE, __version__
from histodetect.errors import HistodetectError
from histodetect.inference.predictor import TTA_CHOICES, Predictor
from histodetect.service.batching import DEFAULT_BATCH_WAIT_MS, MicroBatcher
from histodetect.service.guards import add_guards
from histodetect.service.handlers import add_error_handlers
from histodetect.service.routes import add_web_page, register_routes
from histodetect.service.schemas import (
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_PATCH_SIDE,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_TIMEOUT_S,
    DESCRIPTION,
    Limits,
)
from histodetect.service.state import Service
from histodetect.service.viewer import add_viewer, setup_logging
from histodetect.slides.viewer.catalogue import Catalogue
from histodetect.slides.viewer.library import SlideLibrary

__all__ = ["Service", "create_app", "model_description", "serve"]


def model_description(run: Path, predictor: Predictor) -> dict:
    """What ``GET /v1/model`` tells about a run (no server paths)."""
    from histodetect.inference.predictor import MODEL_FILE

    meta = predictor.meta
    hasher = hashlib.sha256()
    for path in predictor.weight_files() or [run / MODEL_FILE]:  # every member of an ensemble
        hasher.update(path.read_bytes())
    digest = hasher.hexdigest()
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
        "scope_threshold": predictor.scope_threshold,
        "temperature": predictor.temperature,
        "synthetic": synthetic,
        "data": data,
        "metrics": metrics,
        "version": __version__,
    }


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
    slides: list[str | Path] | None = None,
    slide_dirs: list[str | Path] = (),
    annotations: str | Path | None = None,
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
        slides: output folders of `histodetect slide`: adds the slide viewer at ``/slides``
            (``histodetect.service.viewer``), behind the same API key.
        slide_dirs: where the viewer looks for slide files whose recorded path is gone.
        annotations: folder of ground-truth annotations the viewer shows beside the maps.

    Raises:
        HistodetectError: when the run folder is incomplete or an option is out of range.
    """
    run = Path(run)
    _check_options(tta, max_upload_mb, max_files, max_patch_side, max_pixels, timeout_s)
    # The slide folders first: a mistyped --slides fails before the model is loaded.
    catalogue = Catalogue(slides, slide_dirs, annotations) if slides else None
    predictor = predictor or Predictor.from_run(run, device)
    limits = Limits(
        max_upload_mb=max_upload_mb,
        max_files=max_files,
        max_patch_side=max_patch_side,
        max_region_pixels=max_pixels,
        timeout_s=timeout_s,
    )
    service = _build_service(run, predictor, api_key, limits, tta, region_stride, batch_wait_ms)
    app = FastAPI(
        title="histodetect",
        version=__version__,
        description=DESCRIPTION,
        lifespan=_lifespan(service),
        # The interactive docs pages load their scripts from a CDN; the service works offline.
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    add_guards(app, service)
    add_error_handlers(app)
    register_routes(app, service)
    add_web_page(app)
    if catalogue is not None:
        add_viewer(app, SlideLibrary(catalogue), service.api_key)
    return app


def _check_options(
    tta: int,
    max_upload_mb: float,
    max_files: int,
    max_patch_side: int,
    max_pixels: int,
    timeout_s: float,
) -> None:
    if tta not in TTA_CHOICES:
        raise HistodetectError(f"--tta must be one of {TTA_CHOICES}, got {tta}.")
    if min(max_upload_mb, max_files, max_patch_side, max_pixels, timeout_s) <= 0:
        raise HistodetectError("service limits must be positive.")
    if max_patch_side < PATCH_SIZE or max_pixels < PATCH_SIZE * PATCH_SIZE:
        raise HistodetectError(f"size limits below one {PATCH_SIZE}x{PATCH_SIZE} patch.")


def _build_service(
    run: Path,
    predictor: Predictor,
    api_key: str | None,
    limits: Limits,
    tta: int,
    region_stride: int,
    batch_wait_ms: float,
) -> Service:
    info = model_description(run, predictor)
    service = Service(predictor, info, api_key or None, limits, tta, region_stride)
    service.batcher = MicroBatcher(
        partial(patch_answers, predictor, tta=tta),
        service.on_model_thread,
        max_wait_s=batch_wait_ms / 1000,
    )
    return service


def patch_answers(predictor: Predictor, images: np.ndarray, tta: int = 1) -> np.ndarray:
    """The batcher's job: (N, 2) rows of P(tumour) and out-of-scope score (NaN: no statistics)."""
    probs, scores = predictor.predict_and_score(images, tta)
    return np.stack([probs, np.full(len(probs), np.nan) if scores is None else scores], 1)


def _lifespan(service: Service):
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        # The model thread stays: a test client may start the same app again.
        service.batcher.close()

    return lifespan


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

    if options.get("slides"):
        setup_logging()  # before the viewer is built: it warns when OpenSeadragon is missing
    app = create_app(run, **options)
    service: Service = app.state.service
    where = f"[{host}]" if ":" in host else host
    print(
        f"serving {run} (model {service.model_id}) at http://{where}:{port}/ (Ctrl-C stops)",
        flush=True,
    )
    if options.get("slides"):
        print(f"slide viewer at http://{where}:{port}/slides", flush=True)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        # Bounded: beyond this many open requests uvicorn answers 503 at once.
        limit_concurrency=256,
        timeout_keep_alive=5,
    )
