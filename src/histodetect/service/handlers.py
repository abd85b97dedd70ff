"""The error answers every app shares: an ``ErrorResponse`` body, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from histodetect.service.schemas import error_response
from histodetect.service.uploads import UploadError

log = logging.getLogger("histodetect.service")


def upload_error_response(errors: list[UploadError]) -> JSONResponse:
    """One answer naming the first bad upload, counting the others and listing them all."""
    first = errors[0]
    more = f" (and {len(errors) - 1} more bad file(s))" if len(errors) > 1 else ""
    problems = [{"file": e.file, "problem": e.problem} for e in errors]
    return error_response(first.status, f"{first}{more}", problems)


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error with an :class:`ErrorResponse` body (a crash without its traceback)."""

    @app.exception_handler(UploadError)
    async def _upload_error(_request: Request, exc: UploadError) -> JSONResponse:
        return upload_error_response([exc])

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg"))
        return error_response(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error", exc_info=exc)
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log")
