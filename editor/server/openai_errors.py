"""Errors of the OpenAI-compatible API (/v1) in OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}` (docs/openai.md).

`editor.server.errors.handle` describes every error as for /api (status, body, headers) and, for
/v1 paths, hands that description here to be rewritten. This module imports nothing else of the
server, so the error handler can import it.
"""

from __future__ import annotations

import re
from typing import Any

V1 = "/v1"
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}
_CODES = {401: "invalid_api_key", 413: "request_too_large", 429: "rate_limit_exceeded", 504: "timeout"}
_UNION_BRANCH = re.compile(r"\.(?:str|int|float|bool|none|list\[[^\]]*\]|dict\[[^\]]*\]|[A-Z][A-Za-z]*)(?=\.|$)")


class OpenAIRequestError(ValueError):
    """A request the /v1 API refuses, naming the field at fault (`param`, dotted)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


def is_v1(path: str) -> bool:
    return path == V1 or path.startswith(V1 + "/")


def request_error(error: OpenAIRequestError) -> tuple[int, dict[str, Any], dict[str, str]]:
    return error.status, envelope(error.message, error.status, param=error.param, code=error.code), {}


def envelope(message: str, status: int, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or _CODES.get(status)}}


def rewrite(status: int, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
    """An /api error description in OpenAI's shape. A body that failed validation names its first
    wrong field as `param`; our 422 (a limit, a document that does not fit) is OpenAI's 400."""
    message = str(body.get("detail", "error"))
    param: str | None = None
    code: str | None = None
    problems = body.get("extra")
    if status == 400 and isinstance(problems, list) and problems:
        keys = [_field(p.get("key")) for p in problems if isinstance(p, dict)]
        param = next((key for key in keys if key), None)
        message = "; ".join(_problem(p) for p in problems if isinstance(p, dict)) or message
    if status == 422:
        status, code = 400, "invalid_value"
    if status == 404 and message == "Not Found":  # no such route (an unknown model says which)
        message = "no such route: this server has GET /v1/models, POST /v1/completions, POST /v1/chat/completions"
    if body.get("request_id"):
        message += f" (request id {body['request_id']})"
    return status, envelope(message, status, param=param, code=code), headers


def _field(key: object) -> str | None:
    """`messages.0.content` from pydantic's `messages.0.content.str`: union branches dropped."""
    if not isinstance(key, str) or not key:
        return None
    return _UNION_BRANCH.sub("", key) or None


def _problem(problem: dict[str, Any]) -> str:
    key = _field(problem.get("key"))
    text = str(problem.get("message", "invalid"))
    if text == "Extra inputs are not permitted":
        return f"{key} is not supported by this server (docs/openai.md lists what is)"
    return f"{key}: {text}" if key else text


__all__ = ["V1", "OpenAIRequestError", "envelope", "is_v1", "request_error", "rewrite"]
