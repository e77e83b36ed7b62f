"""Optimistic concurrency for documents (docs/security.md, "Versions and If-Match").

Every document has a version, counted up by each change of its title or source. Responses that
carry a document send it as a strong `ETag` (`"7"`); a write that sends `If-Match` with that tag
happens only if nobody changed the document in between, else it is refused with 412 and the
current version (in the body and the `ETag` header). `If-Match: *` only asks that the document
exists. Which writes must send `If-Match` (428 otherwise) is the `if_match` setting.
"""

from __future__ import annotations

import re
from typing import Any

from litestar import Request
from litestar.exceptions import HTTPException
from litestar.status_codes import HTTP_400_BAD_REQUEST

from editor.settings import Settings

IF_MATCH_HELP = (
    'the document\'s ETag as a GET or an earlier write returned it (e.g. "3"): the request is refused '
    "with 412 if the document changed since; * only requires that it exists"
)

HTTP_428_PRECONDITION_REQUIRED = 428
IF_MATCH_PATTERN = r'^\s*(\*|(W/)?"[0-9]{1,18}")\s*$'  # what the OpenAPI document promises to accept
_TAG = re.compile(r'\s*(?:W/)?"([0-9]{1,18})"\s*')


def etag(version: int) -> dict[str, str]:
    """The `ETag` header of a document at `version`."""
    return {"ETag": f'"{version}"'}


def from_browser(request: Request[Any, Any, Any]) -> bool:
    """Whether a web page sent the request: browsers add Origin to every write and Sec-Fetch-Mode
    to every fetch; API clients (curl, httpx, scripts) send neither unless told to."""
    return "origin" in request.headers or "sec-fetch-mode" in request.headers


def expected_version(
    value: str | None, request: Request[Any, Any, Any], settings: Settings, *, required: bool
) -> int | None:
    """The version that an `If-Match` header `value` names (None: no check). `required` writes
    without one get 428 when the `if_match` setting says so. A weak tag (`W/"7"`) never matches
    (RFC 9110: If-Match compares strongly), so it is read as a version no document has."""
    if value is None:
        policy = settings.if_match
        if required and (policy == "always" or (policy == "browsers" and from_browser(request))):
            raise HTTPException(
                status_code=HTTP_428_PRECONDITION_REQUIRED,
                detail="send If-Match with the document's ETag (from GET) so that a change made meanwhile "
                "by someone else is not overwritten; If-Match: * writes regardless (setting if_match)",
            )
        return None
    if value.strip() == "*":
        return None
    match = _TAG.fullmatch(value)
    if match is None:
        raise HTTPException(
            status_code=HTTP_400_BAD_REQUEST,
            detail=f'If-Match {value[:80]!r} is not one entity tag: send the ETag as GET gave it (e.g. "3"), or *',
        )
    return -1 if value.strip().startswith("W/") else int(match.group(1))


__all__ = [
    "HTTP_428_PRECONDITION_REQUIRED",
    "IF_MATCH_HELP",
    "IF_MATCH_PATTERN",
    "etag",
    "expected_version",
    "from_browser",
]
