"""Authentication: a request's API key names its tenant (keys, tenants and open mode: :mod:`serve.tenants`).

:class:`TenantAuth` runs before every route except the open ones (``/health``, ``/metrics``, ``/openapi.json``)
and puts the tenant in the request's state (:func:`tenant_of`). A missing or unknown key gets 401 in the
OpenAI format (``missing_api_key`` / ``invalid_api_key``) before the route runs; a WebSocket is accepted, told
with an ``error`` event, and closed with code 4401 (as an unknown session is closed with 4404).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from starlette.datastructures import Headers, QueryParams
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from serve.errors import APIError, unauthorized
from serve.tenants import Tenant, TenantDirectory

OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json"})
WS_UNAUTHORIZED = 4401


class TenantAuth:
    """ASGI middleware: the tenant of the request's key in ``scope["state"]["tenant"]``, or 401."""

    def __init__(self, app: ASGIApp, directory: TenantDirectory, count_error: Callable[[str], None]) -> None:
        self.app = app
        self.directory = directory
        self.count_error = count_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        key = presented_key(scope)
        tenant = self.directory.authenticate(key)
        if tenant is None:
            error = _refusal(key)
            self.count_error(error.code)
            await _refuse(error, scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


def presented_key(scope: Scope) -> str | None:
    """``Authorization: Bearer KEY``; for a WebSocket also ``?api_key=KEY`` (browsers cannot set headers)."""
    scheme, _, credentials = Headers(scope=scope).get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    if scope["type"] == "websocket":
        return QueryParams(scope.get("query_string", b"")).get("api_key") or None
    return None


def tenant_of(connection: HTTPConnection) -> Tenant:
    return connection.state.tenant


def _refusal(key: str | None) -> APIError:
    if not key:
        return unauthorized("no API key: send it as 'Authorization: Bearer KEY'", "missing_api_key")
    return unauthorized("the API key is not valid", "invalid_api_key")  # never echo the key


async def _refuse(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await error.response()(scope, receive, send)
        return
    websocket = WebSocket(scope, receive, send)
    await websocket.accept()
    await websocket.send_json({"event": "error", "data": error.body()})
    await websocket.close(code=WS_UNAUTHORIZED, reason=error.code)


# ---- logs ---------------------------------------------------------------------------------------------------
_QUERY_KEY = re.compile(r"(api_key=)[^&\s\"']+", re.IGNORECASE)


def redact_keys(text: str) -> str:
    return _QUERY_KEY.sub(r"\1REDACTED", text)


class RedactApiKeys(logging.Filter):
    """uvicorn logs each path with its query string: a WebSocket's ``?api_key=`` must not reach the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_keys(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_keys(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


def install_log_redaction() -> None:
    """On uvicorn's loggers (call after uvicorn configured logging: filters sit on the logger that logs)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactApiKeys) for f in logger.filters):
            logger.addFilter(RedactApiKeys())
