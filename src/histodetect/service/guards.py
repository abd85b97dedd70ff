"""Request guards: the API key, the body size limit and the deadline of every request."""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, params
from fastapi.security import APIKeyHeader
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from histodetect.service.schemas import API_KEY_HEADER, error_response
from histodetect.service.state import Service

# Module level: FastAPI resolves the (postponed) annotations of endpoints in this namespace.
API_KEY_SCHEME = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="needed when the service was started with --api-key",
)


def key_ok(expected: str | None, given: str | None) -> bool:
    """Whether ``given`` is the service's key (compared in constant time); any is, without one."""
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
        if scope["path"].startswith("/v1/") and not key_ok(
            self.service.api_key, headers.get(API_KEY_HEADER.lower())
        ):
            response = error_response(
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
            await error_response(413, too_large)(scope, receive, send)
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
            await error_response(504, detail)(scope, receive, send)
        except HTTPException as exc:  # the 413 above, where nothing caught it
            if started:
                raise
            await error_response(exc.status_code, str(exc.detail))(scope, receive, send)


def add_guards(app: FastAPI, service: Service) -> None:
    """Put :class:`RequestGuard` in front of every route of ``app``."""
    app.add_middleware(RequestGuard, service=service)


def key_dependencies(service: Service) -> list[params.Depends]:
    """The dependencies of every ``/v1`` route: the API key check, when the service has a key.

    Declared only when a key is set, so that the OpenAPI schema says what the service does.
    """

    def require_key(key: Annotated[str | None, Depends(API_KEY_SCHEME)]) -> None:
        # RequestGuard has already refused bad keys before the body was read; this repeats
        # the check so that no /v1 route can ever be reached without it, and documents it.
        if not key_ok(service.api_key, key):
            raise HTTPException(401, f"missing or wrong API key ({API_KEY_HEADER} header)")

    return [Depends(require_key)] if service.api_key else []
