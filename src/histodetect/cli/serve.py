"""The ``serve`` and ``view`` commands: a trained run, and the slide viewer, over HTTP (the
service itself is imported on use)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from histodetect.cli.registry import command
from histodetect.errors import HistodetectError


def _serve_args(p: argparse.ArgumentParser) -> None:
    # Defaults live in histodetect.service (None = its default), which is not imported here:
    # building the parser must stay cheap for every other command.
    p.add_argument("run", type=Path, help="run folder (from histodetect train)")
    p.add_argument(
        "--host", default="127.0.0.1", help="interface (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("HISTODETECT_API_KEY"),
        help="require this key in the X-API-Key header of /v1 calls (default: "
        "$HISTODETECT_API_KEY; set one before binding beyond this machine)",
    )
    p.add_argument("--tta", type=int, default=1, choices=[1, 2, 4, 8], help="dihedral views")
    p.add_argument("--max-upload-mb", type=float, help="request body limit (default 32)")
    p.add_argument("--max-files", type=int, help="patches per request (default 256)")
    p.add_argument(
        "--max-pixels", type=int, help="largest /v1/region image (default 2048x2048 pixels)"
    )
    p.add_argument("--timeout", type=float, help="seconds per request (default 60)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.add_argument(
        "--slides",
        type=Path,
        nargs="+",
        metavar="MAPS",
        help="also serve the slide viewer at /slides for these `histodetect slide` outputs",
    )
    _viewer_source_args(p)


def _viewer_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--annotations",
        type=Path,
        help="folder of ground-truth annotations shown beside the maps (ASAP .xml, QuPath "
        ".geojson, *_Mask.tif; matched by slide name, as slide-eval does)",
    )
    p.add_argument(
        "--slide-dir",
        type=Path,
        action="append",
        default=[],
        help="where to find slide files whose recorded path does not exist (by name; repeatable)",
    )


def _warn_open_host(command_name: str, host: str, api_key: str | None, what: str) -> None:
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(
            f"histodetect {command_name}: warning: listening on {host} without an API key: "
            f"anyone who can reach this port can {what} (set --api-key).",
            file=sys.stderr,
        )


@command("serve", _serve_args)
def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a run over HTTP: a JSON API (OpenAPI at /openapi.json) and a web page at /.

    POST /v1/predict (patches -> probability and label), /v1/explain (Grad-CAM PNG),
    /v1/region (a larger image -> heat map and regions); GET /v1/model, /healthz.
    Patches larger than 96x96 are centre-cropped, smaller ones rejected. Binds to 127.0.0.1
    unless --host says otherwise; set --api-key before exposing it. --slides MAPS adds the
    slide viewer of `histodetect view` at /slides.
    """
    from histodetect.service.app import serve

    _warn_open_host("serve", args.host, args.api_key, "use the model")
    limits = {
        "max_upload_mb": args.max_upload_mb,
        "max_files": args.max_files,
        "max_pixels": args.max_pixels,
        "timeout_s": args.timeout,
    }
    serve(
        args.run,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        api_key=args.api_key,
        tta=args.tta,
        device=args.device,
        slides=args.slides,
        slide_dirs=args.slide_dir,
        annotations=args.annotations,
        **{k: v for k, v in limits.items() if v is not None},
    )
    return 0


def _view_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("maps", type=Path, nargs="+", help="output folders of histodetect slide (--out)")
    _viewer_source_args(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="interface (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("HISTODETECT_API_KEY"),
        help="require this key in the X-API-Key header of /v1 calls (default: "
        "$HISTODETECT_API_KEY; set one before binding beyond this machine)",
    )
    p.add_argument(
        "--tile-cache-mb", type=float, default=64, help="tiles kept in memory (default 64 MB)"
    )
    # Not "info": a page asks for hundreds of tiles, and each would be a line of access log.
    p.add_argument(
        "--log-level",
        default="warning",
        help="uvicorn log level (default warning; info logs every request)",
    )


@command("view", _view_args)
def cmd_view(args: argparse.Namespace) -> int:
    """A zoomable whole-slide viewer of `histodetect slide` outputs, in the browser.

    Lists every slide of the MAPS folders (score, regions, tissue area, thumbnail) at
    http://127.0.0.1:8000/slides; each opens in OpenSeadragon from the whole slide down to
    full resolution, with layers to toggle: the tumour probability map (colour legend,
    opacity), the tissue mask, the regions, ground truth (--annotations DIR) and slide-eval's
    detections; a list of regions (a click zooms to one), a scale bar and level-0
    coordinates. Slide tiles are read on demand from the slide files (OpenSlide, or the
    TIFF reader); map tiles come from the stored maps, without the model. Requests name
    slides and output files from the list, never paths, so nothing else on the machine can be
    reached; set --api-key before binding beyond this machine.
    """
    from histodetect.service.viewer import serve_viewer

    if not args.tile_cache_mb > 0:
        raise HistodetectError(f"--tile-cache-mb must be positive, got {args.tile_cache_mb}.")
    _warn_open_host("view", args.host, args.api_key, "see these slides")
    serve_viewer(
        args.maps,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        slide_dirs=args.slide_dir,
        annotations=args.annotations,
        api_key=args.api_key,
        tile_cache_mb=args.tile_cache_mb,
    )
    return 0
