"""Errors the API answers with, and how each maps to a JSON response (see `ErrorOut`).

Every exception reaches `handle`: known ones become 4xx/5xx with a message; anything else is a
500 whose body says only "internal server error" and the request id, while the log gets the
traceback under the same id.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.status_codes import (
    HTTP_404_NOT_FOUND,
    HTTP_412_PRECONDITION_FAILED,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_429_TOO_MANY_REQUESTS,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
    HTTP_504_GATEWAY_TIMEOUT,
    HTTP_507_INSUFFICIENT_STORAGE,
)

from editor.db.engine import DatabaseFault, fault_of
from editor.db.services import NotFound, StaleVersion
from editor.document import DocumentError
from editor.options import FillCancelled
from editor.server.limits import FillTimedOut, LimitExceeded
from editor.server.openai_errors import OpenAIRequestError, is_v1, request_error, rewrite
from editor.server.protection import request_id
from editor.server.worker import ModelFailed, QueueFull, WorkerUnavailable

log = logging.getLogger(__name__)


def error_body(error: BaseException, *, request: str | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, extra headers) for an error; also used for the SSE `error` event.
    `request` is the request id, logged with unexpected errors and returned in the body."""
    status, body, headers = _describe(error, request)
    if request is not None:
        body["request_id"] = request
    return status, body, headers


def _describe(error: BaseException, request: str | None) -> tuple[int, dict[str, Any], dict[str, str]]:
    if isinstance(error, DocumentError):
        return HTTP_422_UNPROCESSABLE_ENTITY, {"status_code": 422, "detail": str(error), **error.to_dict()}, {}
    if isinstance(error, LimitExceeded):
        return error.status, {"status_code": error.status, "detail": str(error)}, {}
    if isinstance(error, NotFound):
        return HTTP_404_NOT_FOUND, {"status_code": 404, "detail": str(error)}, {}
    if isinstance(error, StaleVersion):
        stale = {"status_code": 412, "detail": str(error), "current_version": error.current}
        return HTTP_412_PRECONDITION_FAILED, stale, {"ETag": f'"{error.current}"'}
    if isinstance(error, QueueFull):
        headers = {"Retry-After": str(error.retry_after)}
        return HTTP_429_TOO_MANY_REQUESTS, {"status_code": 429, "detail": str(error)}, headers
    if isinstance(error, FillTimedOut):
        return HTTP_504_GATEWAY_TIMEOUT, {"status_code": 504, "detail": str(error)}, {}
    if isinstance(error, ModelFailed):  # the model's own error stays in the log, under the request id
        cause = error.__cause__ or error
        log.error("the model failed (request %s): %s", request or "-", cause, exc_info=cause)
    if isinstance(error, WorkerUnavailable | FillCancelled):
        return HTTP_503_SERVICE_UNAVAILABLE, {"status_code": 503, "detail": str(error)}, {"Retry-After": "5"}
    fault = fault_of(error)
    if fault is not None:
        return _database_fault(fault, error, request)
    if isinstance(error, HTTPException) and error.status_code < HTTP_500_INTERNAL_SERVER_ERROR:
        body: dict[str, Any] = {"status_code": error.status_code, "detail": error.detail}
        if error.extra:
            body["extra"] = error.extra
        return error.status_code, body, dict(error.headers or {})
    log.error("unexpected error (request %s): %s", request or "-", error, exc_info=error)
    detail = "internal server error" + (f"; quote request id {request} when reporting it" if request else "")
    return HTTP_500_INTERNAL_SERVER_ERROR, {"status_code": 500, "detail": detail}, {}


_FAULTS = {
    DatabaseFault.FULL: (
        HTTP_507_INSUFFICIENT_STORAGE,
        "the database has no room left (disk or size limit full)",
        "free space on the server's disk, then retry",
    ),
    DatabaseFault.READ_ONLY: (
        HTTP_503_SERVICE_UNAVAILABLE,
        "the database is read-only (its file, directory or mount cannot be written)",
        "the operator must make it writable; reading still works",
    ),
    DatabaseFault.BUSY: (
        HTTP_503_SERVICE_UNAVAILABLE,
        "the database is busy: another writer held its lock for longer than database_busy_timeout_s",
        "retry in a moment",
    ),
    DatabaseFault.UNAVAILABLE: (
        HTTP_503_SERVICE_UNAVAILABLE,
        "the database cannot be reached",
        "retry in a moment",
    ),
}


def _database_fault(
    fault: DatabaseFault, error: BaseException, request: str | None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A database fault: 507 or 503 with what happened; every write is one transaction, so the
    request stored nothing (and what was stored before is intact)."""
    status, what, advice = _FAULTS[fault]
    log.error("database %s (request %s): %s", fault.value, request or "-", getattr(error, "orig", error))
    detail = f"{what}; nothing was stored by this request: {advice}"
    headers = {} if fault is DatabaseFault.READ_ONLY else {"Retry-After": "5"}
    return status, {"status_code": status, "detail": detail, "database": fault.value}, headers


def handle(request: Request[Any, Any, Any], error: Exception) -> Response[dict[str, Any]]:
    if isinstance(error, OpenAIRequestError):
        status, body, headers = request_error(error)
        return Response(body, status_code=status, headers=headers)
    status, body, headers = error_body(error, request=request_id(request.scope))
    if status == HTTP_413_REQUEST_ENTITY_TOO_LARGE and not isinstance(error, LimitExceeded):
        limit = _body_limit(request)
        body["detail"] = f"the request body is over the limit of {limit} bytes" + (
            " (4 bytes per character of max_document_chars, plus 64 KiB for the JSON around it)"
            if limit == request.app.request_max_body_size
            else ""
        )
    if is_v1(request.url.path):  # the OpenAI-compatible API answers in OpenAI's shape
        status, body, headers = rewrite(status, body, headers)
    return Response(body, status_code=status, headers=headers)


def _body_limit(request: Request[Any, Any, Any]) -> int | None:
    limit: object
    try:
        limit = request.route_handler.resolve_request_max_body_size()
    except Exception:  # no route handler (the error came before routing)
        limit = request.app.request_max_body_size
    return limit if isinstance(limit, int) else None


EXCEPTION_HANDLERS = {Exception: handle}

__all__ = ["EXCEPTION_HANDLERS", "LimitExceeded", "error_body", "handle"]
