"""The ``serve`` command: a trained run over HTTP (the service itself is imported on use)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from histodetect.cli.registry import command


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


@command("serve", _serve_args)
def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a run over HTTP: a JSON API (OpenAPI at /openapi.json) and a web page at /.

    POST /v1/predict (patches -> probability and label), /v1/explain (Grad-CAM PNG),
    /v1/region (a larger image -> heat map and regions); GET /v1/model, /healthz.
    Patches larger than 96x96 are centre-cropped, smaller ones rejected. Binds to 127.0.0.1
    unless --host says otherwise; set --api-key before exposing it.
    """
    from histodetect.service.app import serve

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(
            f"histodetect serve: warning: listening on {args.host} without an API key: "
            "anyone who can reach this port can use the model (set --api-key).",
            file=sys.stderr,
        )
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
        **{k: v for k, v in limits.items() if v is not None},
    )
    return 0
