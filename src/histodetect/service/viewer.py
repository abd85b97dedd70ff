"""The slide viewer over HTTP: ``histodetect view MAPS`` and ``histodetect serve --slides MAPS``.

The page (``/slides``) lists the slides of the given `histodetect slide` output folders and
shows one in OpenSeadragon over Deep Zoom tiles: the slide read on demand from its file, the
probability map and tissue mask as PNG tiles with alpha from the stored map, and regions,
annotations and detections as outlines. OpenSeadragon is served from the local copy ``make``
installs (``web/vendor``); the page fetches nothing from elsewhere.

Requests name a slide by its catalogue id and a file by a fixed name; neither ever becomes a
path, so nothing outside the given folders can be asked for. With an API key every ``/v1/``
route needs it in the ``X-API-Key`` header (the page sends it with every tile request).
"""

from __future__ import annotations

import hmac
import logging
import re
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from histodetect import __version__
from histodetect.errors import HistodetectError
from histodetect.service.handlers import add_error_handlers
from histodetect.service.schemas import API_KEY_HEADER, error_response
from histodetect.slides.viewer.catalogue import OUTPUT_FILES, Catalogue, SlideEntry
from histodetect.slides.viewer.library import SlideLibrary
from histodetect.slides.viewer.tiles import TileNotFound

log = logging.getLogger("histodetect.viewer")
WEB_DIR = Path(__file__).with_name("web")
VENDOR_DIR = WEB_DIR / "vendor"
OPENSEADRAGON_DIR = VENDOR_DIR / "node_modules" / "openseadragon" / "build" / "openseadragon"
OPENSEADRAGON_MISSING = (
    "OpenSeadragon is not installed: run `make install` (or `npm ci` in "
    f"{VENDOR_DIR}) to get the pinned copy the viewer serves."
)
TILE_NAME = re.compile(r"^(\d{1,6})_(\d{1,6})\.(jpeg|png)$")
LAYER_FORMATS = {"slide": "jpeg", "map": "png", "tissue": "png"}
# Tiles of a slide never change while its summary stays the same; the URL carries nothing
# that would tell a browser otherwise, so they are cached briefly rather than for ever.
TILE_HEADERS = {"Cache-Control": "private, max-age=300"}


def openseadragon_problem() -> str | None:
    """Why the viewer cannot work (no local OpenSeadragon), or None."""
    return None if (OPENSEADRAGON_DIR / "openseadragon.min.js").is_file() else OPENSEADRAGON_MISSING


# The same header and check as the service's guards; not imported from there because that
# module loads the model code (torch), which `histodetect view` has no use for.
API_KEY_SCHEME = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="needed when the viewer was started with --api-key",
)


def _key_dependencies(api_key: str | None) -> list:
    def require_key(key: Annotated[str | None, Depends(API_KEY_SCHEME)]) -> None:
        # Compared in constant time, as the service's own key check does.
        if key is None or not hmac.compare_digest(key.encode(), api_key.encode()):
            raise HTTPException(
                401,
                f"missing or wrong API key: send it in the {API_KEY_HEADER} header",
                headers={"WWW-Authenticate": API_KEY_HEADER},
            )

    return [Depends(require_key)] if api_key else []


SlideId = Annotated[str, PathParam(max_length=300, description="a slide id from GET /v1/slides")]


def add_viewer(app: FastAPI, library: SlideLibrary, api_key: str | None = None) -> None:
    """Add the viewer page (``/slides``), OpenSeadragon (``/vendor/openseadragon``) and the
    ``/v1/slides`` API to ``app``; the page's own script and style come from ``/static``."""
    guarded = _key_dependencies(api_key)
    problem = openseadragon_problem()
    if problem:
        log.warning("slide viewer: %s", problem)

    @app.get("/slides", include_in_schema=False)
    async def viewer_page() -> FileResponse:
        return FileResponse(WEB_DIR / "viewer.html", media_type="text/html")

    if problem is None:
        # StaticFiles refuses paths that leave its folder ("../", encoded or not).
        app.mount(
            "/vendor/openseadragon",
            StaticFiles(directory=OPENSEADRAGON_DIR),
            name="openseadragon",
        )
    else:

        @app.get("/vendor/openseadragon/{path:path}", include_in_schema=False)
        async def no_openseadragon(path: str) -> JSONResponse:
            return error_response(404, problem)

    def entry_of(slide_id: str) -> SlideEntry:
        entry = library.entry(slide_id)
        if entry is None:
            raise HTTPException(404, f"no slide {slide_id!r} here; GET /v1/slides lists them")
        return entry

    @app.get("/v1/slides", dependencies=guarded, tags=["slides"])
    async def list_slides() -> dict:
        """Every slide of the served map folders: name, score, regions, tissue area."""
        rows = await run_in_threadpool(library.listing)
        return {"slides": rows, "openseadragon_problem": problem, "version": __version__}

    @app.get("/v1/slides/{slide_id}", dependencies=guarded, tags=["slides"])
    async def slide_detail(slide_id: SlideId) -> dict:
        """One slide: tile sources, µm per px, regions, annotations, detections, problems."""
        entry = entry_of(slide_id)
        return await run_in_threadpool(library.detail, entry)

    @app.get("/v1/slides/{slide_id}/thumbnail.jpg", dependencies=guarded, tags=["slides"])
    def thumbnail(slide_id: SlideId) -> Response:
        """A small JPEG of the slide's overlay.png, for the list."""
        entry = entry_of(slide_id)
        try:
            data = library.thumbnail(entry)
        except HistodetectError as exc:
            library.log_once(str(exc))
            raise HTTPException(422, str(exc)) from None
        if data is None:
            raise HTTPException(404, f"{slide_id}: no overlay.png to make a thumbnail of")
        return Response(data, media_type="image/jpeg", headers=TILE_HEADERS)

    # A plain def: FastAPI runs it on its thread pool, so tiles are decoded and encoded in
    # parallel while the event loop keeps answering.
    @app.get(
        "/v1/slides/{slide_id}/tiles/{layer}/{level}/{tile}",
        dependencies=guarded,
        tags=["slides"],
        response_class=Response,
    )
    def tile(slide_id: SlideId, layer: str, level: int, tile: str) -> Response:
        """One Deep Zoom tile: ``slide`` (JPEG), ``map`` or ``tissue`` (PNG with alpha)."""
        entry = entry_of(slide_id)
        found = TILE_NAME.match(tile)
        fmt = LAYER_FORMATS.get(layer)
        if fmt is None or found is None or found.group(3) != fmt:
            raise HTTPException(
                404, f"no tile {layer}/{level}/{tile}: layers slide (.jpeg), map, tissue (.png)"
            )
        col, row = int(found.group(1)), int(found.group(2))
        try:
            if layer == "slide":
                data = library.slide_tile(entry, level, col, row)
            else:
                data = library.map_tile(entry, layer, level, col, row)
        except TileNotFound as exc:
            raise HTTPException(404, f"{slide_id}: {exc}") from None
        except HistodetectError as exc:
            library.log_once(str(exc))
            raise HTTPException(422, str(exc)) from None
        return Response(data, media_type=f"image/{fmt}", headers=TILE_HEADERS)

    @app.get("/v1/slides/{slide_id}/files/{name}", dependencies=guarded, tags=["slides"])
    async def output_file(slide_id: SlideId, name: str) -> FileResponse:
        """An output of the slide's folder: regions.geojson (for QuPath), regions.csv,
        summary.json, overlay.png, prob.png or tissue.png."""
        entry = entry_of(slide_id)
        path = library.output_file(entry, name)
        if path is None:
            listed = ", ".join(OUTPUT_FILES)
            raise HTTPException(404, f"{slide_id}: no output {name!r} (one of {listed})")
        return FileResponse(path, media_type=OUTPUT_FILES[name], filename=f"{slide_id}-{name}")


def create_viewer_app(
    maps: list[str | Path],
    *,
    slide_dirs: list[str | Path] = (),
    annotations: str | Path | None = None,
    api_key: str | None = None,
    tile_cache_mb: float | None = None,
) -> FastAPI:
    """The viewer on its own (``histodetect view``): no model, just the maps and slides.

    Args:
        maps: Output folders of `histodetect slide` (or single slide folders).
        slide_dirs: Where to look for slide files whose recorded path does not exist.
        annotations: Folder of ground-truth annotations, matched by slide name.
        api_key: When set, every ``/v1/`` request needs it in the ``X-API-Key`` header.
        tile_cache_mb: Encoded tiles kept in memory (default 64 MB).

    Raises:
        HistodetectError: when a folder is missing or holds no slide maps.
    """
    catalogue = Catalogue(maps, slide_dirs, annotations)
    options = {"tile_cache_mb": tile_cache_mb} if tile_cache_mb is not None else {}
    library = SlideLibrary(catalogue, **options)
    app = FastAPI(
        title="histodetect slide viewer",
        version=__version__,
        docs_url=None,
        redoc_url=None,
    )
    app.state.library = library
    add_error_handlers(app)
    add_viewer(app, library, api_key)

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/slides")

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"status": "ok", "slides": len(catalogue.entries()), **library.stats()}

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def serve_viewer(
    maps: list[str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    **options,
) -> None:
    """Serve the viewer with uvicorn until interrupted (``histodetect view``).

    Args:
        maps: Output folders of `histodetect slide`.
        host: Interface to bind; the loopback by default.
        port: TCP port.
        log_level: uvicorn's log level.
        **options: Passed to :func:`create_viewer_app`.
    """
    import uvicorn

    setup_logging()
    app = create_viewer_app(maps, **options)
    n = len(app.state.library.catalogue.entries())
    where = f"[{host}]" if ":" in host else host
    print(f"{n} slide(s): open http://{where}:{port}/slides (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5)


def setup_logging() -> None:
    """Send the viewer's warnings (missing or bad slides) to stderr beside uvicorn's log."""
    logger = logging.getLogger("histodetect")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
