"""The one error shape (OpenAI's): {"error": {"message", "type", "code", "param"}} and the handlers.

Domain errors (adapters/errors.py) are mapped class -> HTTP status in ONE table; nothing here looks at
message text. Handlers are registered once, in `create_app`.
"""
from __future__ import annotations

import json
import logging
import math
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters import errors as domain
from adapters.upload_check import UploadRejected
from server.limits import TenantLimited, retry_after_header
from server.upstream import UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger("metalora.gateway")


# ---------------------------------------------------------------- gateway-level typed errors
class InvalidRequest(domain.MetaloraError):
    """A request that is well-formed HTTP but not acceptable; `param` names the offending field."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code


class PayloadTooLarge(domain.MetaloraError):
    code = "request_too_large"


class UpstreamError(domain.MetaloraError):
    """An error answer from a vLLM replica, passed through with its status in our shape."""

    def __init__(self, status: int, message: str, err_type: str, code: str):
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.code = code


# class -> (HTTP status, OpenAI error type). The first matching class in MRO order wins.
STATUS_TABLE: dict[type[BaseException], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    domain.AuthenticationFailed: (401, "authentication_error"),
    domain.InvalidAdapterName: (400, "invalid_request_error"),
    domain.AdapterNotFound: (404, "not_found_error"),
    domain.JobNotFound: (404, "not_found_error"),
    domain.ApiKeyNotFound: (404, "not_found_error"),
    domain.AdapterNotReady: (409, "conflict_error"),
    domain.JobNotCancellable: (409, "conflict_error"),
    # 422, as the IETF Idempotency-Key draft asks for a key reused with another payload.
    domain.IdempotencyKeyReused: (422, "invalid_request_error"),
    UploadRejected: (400, "invalid_request_error"),
    PayloadTooLarge: (413, "invalid_request_error"),
    domain.QuotaExceeded: (429, "rate_limit_error"),
    TenantLimited: (429, "rate_limit_error"),
    domain.StoreUnavailable: (503, "service_unavailable_error"),
    UpstreamUnavailable: (503, "service_unavailable_error"),
    UpstreamTimeout: (504, "timeout_error"),
    domain.ArtifactCorrupt: (500, "server_error"),
    domain.MetaloraError: (500, "server_error"),
}

STORE_RETRY_AFTER_S = 2


def error_body(message: str, err_type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "code": code, "param": param}}


def error_response(status: int, message: str, err_type: str, code: str | None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, err_type, code, param), status_code=status, headers=headers)


def _status_for(exc: BaseException) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in STATUS_TABLE:
            return STATUS_TABLE[cls]
    return 500, "server_error"


def response_for(exc: domain.MetaloraError) -> JSONResponse:
    if isinstance(exc, UpstreamError):
        return error_response(exc.status, str(exc), exc.err_type, exc.code)
    status, err_type = _status_for(exc)
    headers = None
    if isinstance(exc, UpstreamUnavailable):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    elif isinstance(exc, domain.StoreUnavailable):
        headers = {"Retry-After": str(STORE_RETRY_AFTER_S)}
    elif isinstance(exc, TenantLimited):
        headers = {"Retry-After": retry_after_header(exc.retry_after_s)}
    elif isinstance(exc, domain.AuthenticationFailed):
        headers = {"WWW-Authenticate": 'Bearer realm="metalora"'}
    if status >= 500:
        log.warning("%s: %s", type(exc).__name__, exc)
    param = getattr(exc, "param", None) or getattr(exc, "quota", None) or getattr(exc, "limit", None)
    return error_response(status, str(exc), err_type, exc.code, param, headers)


def _field_path(loc: tuple | list) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts)


def validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return error_response(400, f"malformed JSON body{': ' + str(reason) if reason else ''}",
                              "invalid_request_error", "invalid_json")
    messages = []
    for err in errors[:5]:
        path = _field_path(err.get("loc", ()))
        messages.append(f"{path or 'body'}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more errors)" if len(errors) > 5 else ""
    return error_response(400, "; ".join(messages) + more, "invalid_request_error", "invalid_request",
                          _field_path(first.get("loc", ())) or None)


def register_handlers(app: FastAPI) -> None:
    async def on_domain_error(request: Request, exc: domain.MetaloraError) -> JSONResponse:
        return response_for(exc)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(exc)

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        message = exc.detail if isinstance(exc.detail, str) else phrase
        err_type = {404: "not_found_error", 405: "invalid_request_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")
        return error_response(status, message, err_type, phrase.lower().replace(" ", "_"),
                              headers=getattr(exc, "headers", None))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", "server_error", "internal_error")

    app.add_exception_handler(domain.MetaloraError, on_domain_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


class BodyLimitMiddleware:
    """Pure ASGI: answer 413 for bodies over `max_bytes` before the app reads them.

    A declared Content-Length is checked up front; a chunked body is read up to the limit and replayed.
    """

    def __init__(self, app, max_bytes: int, limit_for=None):
        self.app = app
        self.max_bytes = max_bytes
        # limit_for(scope) -> bytes: routes that take larger bodies (adapter uploads) get their own limit.
        self.limit_for = limit_for or (lambda scope: max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return await self.app(scope, receive, send)
        max_bytes = self.limit_for(scope)
        length = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
                break
        if length is not None:
            if length > max_bytes:
                return await self._reject(send, max_bytes)
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): buffer up to the limit, then replay.
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > max_bytes:
                return await self._reject(send, max_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _reject(self, send, max_bytes: int):
        payload = json.dumps(error_body(
            f"request body exceeds the limit of {max_bytes} bytes", "invalid_request_error",
            PayloadTooLarge.code)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
