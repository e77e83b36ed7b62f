"""Errors the API answers with, and how each maps to a JSON response (see `ErrorOut`)."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.status_codes import (
    HTTP_404_NOT_FOUND,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_429_TOO_MANY_REQUESTS,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from editor.db.services import NotFound
from editor.document import DocumentError
from editor.options import FillCancelled
from editor.server.worker import QueueFull, WorkerUnavailable

log = logging.getLogger(__name__)


class LimitExceeded(ValueError):
    """A request over one of the configured limits; `status` is 413 for size, else 422."""

    def __init__(self, message: str, *, status: int = HTTP_422_UNPROCESSABLE_ENTITY) -> None:
        super().__init__(message)
        self.status = status


def error_body(error: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, extra headers) for an error; also used for the SSE `error` event."""
    if isinstance(error, DocumentError):
        return HTTP_422_UNPROCESSABLE_ENTITY, {"status_code": 422, "detail": str(error), **error.to_dict()}, {}
    if isinstance(error, LimitExceeded):
        return error.status, {"status_code": error.status, "detail": str(error)}, {}
    if isinstance(error, NotFound):
        return HTTP_404_NOT_FOUND, {"status_code": 404, "detail": str(error)}, {}
    if isinstance(error, QueueFull):
        headers = {"Retry-After": str(error.retry_after)}
        return HTTP_429_TOO_MANY_REQUESTS, {"status_code": 429, "detail": str(error)}, headers
    if isinstance(error, WorkerUnavailable | FillCancelled):
        return HTTP_503_SERVICE_UNAVAILABLE, {"status_code": 503, "detail": str(error)}, {"Retry-After": "5"}
    if isinstance(error, HTTPException):
        body: dict[str, Any] = {"status_code": error.status_code, "detail": error.detail}
        if error.extra:
            body["extra"] = error.extra
        return error.status_code, body, dict(error.headers or {})
    log.error("unexpected error", exc_info=error)
    return HTTP_500_INTERNAL_SERVER_ERROR, {"status_code": 500, "detail": "internal server error"}, {}


def handle(_request: Request[Any, Any, Any], error: Exception) -> Response[dict[str, Any]]:
    status, body, headers = error_body(error)
    return Response(body, status_code=status, headers=headers)


EXCEPTION_HANDLERS = {
    DocumentError: handle,
    LimitExceeded: handle,
    NotFound: handle,
    QueueFull: handle,
    WorkerUnavailable: handle,
    FillCancelled: handle,
}

__all__ = ["EXCEPTION_HANDLERS", "LimitExceeded", "error_body", "handle"]
