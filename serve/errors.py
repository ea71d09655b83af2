"""Errors in the OpenAI format: ``{"error": {"message", "type", "param", "code"}}`` with the matching status.

Handlers raise :class:`APIError` (or one of the helpers below); the app turns it into a JSON response, and
the session streams turn it into an ``error`` event. Nothing about a bad request reaches the other sessions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger("dispider.serve")

# OpenAI's error types, by the status they go with.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


@dataclass(eq=False)  # eq would make it unhashable, and exceptions travel through sets
class APIError(Exception):
    status: int
    message: str
    code: str
    param: str | None = None
    retry_after_s: float | None = None  # sent as Retry-After (whole seconds, at least 1)
    error_type: str | None = None  # instead of the status's usual type

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def type(self) -> str:
        if self.error_type:
            return self.error_type
        return ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    @property
    def retry_after(self) -> int | None:
        return None if self.retry_after_s is None else max(1, math.ceil(self.retry_after_s))

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def event_data(self) -> dict:
        """The body as an ``error`` event carries it: with ``retry_after`` (seconds) where a header would say it."""
        body = self.body()
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> APIError:
    return APIError(400, message, code, param)


def unsupported_media(message: str, code: str = "unsupported_media_type", param: str | None = None) -> APIError:
    return APIError(415, message, code, param)


def too_large(limit_bytes: int, param: str | None = None) -> APIError:
    return APIError(413, f"the upload is over the limit of {limit_bytes // (1 << 20)} MiB", "payload_too_large", param)


def unauthorized(message: str, code: str) -> APIError:
    return APIError(401, message, code)


def rate_limited(message: str, code: str, retry_after_s: float) -> APIError:
    return APIError(429, message, code, retry_after_s=retry_after_s)


def overloaded(message: str, retry_after_s: float) -> APIError:
    """The server is at capacity: a new stream would make the running ones fall behind real time."""
    return APIError(503, message, "server_at_capacity", retry_after_s=retry_after_s, error_type="server_overloaded")


async def api_error_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, APIError)
    _count(request, error.code)
    return error.response()


async def http_error_handler(request: Request, error: Exception) -> JSONResponse:
    """Starlette's own HTTP errors (unknown route, wrong method) in the OpenAI format too."""
    status = getattr(error, "status_code", 500)
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
    api_error = APIError(status, str(getattr(error, "detail", "")) or code, code)
    _count(request, code)
    return api_error.response()


async def client_gone_handler(request: Request, error: Exception) -> JSONResponse:
    """The client closed its connection before its request was read (a push cut off, a load test stopped): not
    the server's error. Counted, logged in a line, and answered with 499 (nginx's "client closed request") that
    no one receives."""
    log.info("client went away during %s %s", request.method, request.url.path)
    _count(request, "client_disconnected")
    return APIError(499, "the client closed the connection before the request was read",
                    "client_disconnected").response()


async def internal_error_handler(request: Request, error: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    _count(request, "internal_error")
    return APIError(500, f"internal error: {type(error).__name__}", "internal_error").response()


def _count(request: Request, code: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(code=code).inc()
