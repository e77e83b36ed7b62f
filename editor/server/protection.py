"""Cross-site safety, request ids and security headers for every response.

- `RequestGuard` (middleware on every route): the `Host` header must be one of the allowed hosts
  (DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends `Host: evil.example`),
  and a state-changing request (POST, PUT, PATCH, DELETE) must come from the same origin or name
  none (`Origin`), and carry its body as `application/json` (or `multipart/form-data`). A browser
  can send `text/plain` or form bodies cross-site without asking first; it cannot send JSON
  without a CORS preflight, which this server never grants.
- `request_id`: every request gets an id (the client's `X-Request-ID` when it is short and
  plain, else a fresh one); responses carry it in `X-Request-ID`, error bodies in `request_id`,
  and the log names it next to each unexpected error.
- `add_headers` (a `before_send` hook, so it also covers 404s and error responses): nosniff, a
  Content-Security-Policy that allows only our own scripts, `Referrer-Policy`, no framing.

Litestar's `AllowedHostsConfig` matches the whole `Host` header, port included, so `localhost`
would refuse `localhost:8000`; the check here ignores the port, as an operator expects.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from urllib.parse import urlsplit

from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.middleware import ASGIMiddleware
from litestar.status_codes import HTTP_400_BAD_REQUEST, HTTP_403_FORBIDDEN, HTTP_415_UNSUPPORTED_MEDIA_TYPE
from litestar.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
_STATE_KEY = "editor_request_id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_BODY_TYPES = ("application/json", "multipart/form-data")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

# Our pages load scripts and styles from this origin only, with no inline scripts. Inline styles are
# allowed: Swagger UI sets style attributes from its scripts. data: images are its icons.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def request_id(scope: Scope) -> str:
    """This request's id: the client's sane `X-Request-ID`, else a new random one (kept in the scope)."""
    state = scope.setdefault("state", {})
    known = state.get(_STATE_KEY)
    if isinstance(known, str):
        return known
    given = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"x-request-id"), "")
    value = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
    state[_STATE_KEY] = value
    return value


async def add_headers(message: Message, scope: Scope) -> None:
    """`before_send` hook: the request id and the security headers on every HTTP response."""
    if message["type"] != "http.response.start":
        return
    headers = MutableScopeHeaders.from_message(message)
    headers[REQUEST_ID_HEADER] = request_id(scope)
    for name, value in SECURITY_HEADERS.items():
        if name not in headers:
            headers[name] = value


def split_host(value: str) -> tuple[str, int | None]:
    """('localhost', 8000) from 'localhost:8000', ('[::1]', None) from '[::1]'; lower-cased."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value.partition("]")
        port = rest.removeprefix(":")
        return host + "]", int(port) if port.isascii() and port.isdigit() else None
    host, _, port = value.partition(":")
    return host, int(port) if port.isascii() and port.isdigit() else None


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Whether a Host header (port ignored) matches an entry: a name, '*', or '*.domain'."""
    name, _ = split_host(host)
    if not name:
        return False
    for entry in allowed:
        entry = entry.strip().lower()
        if entry == "*" or name == split_host(entry)[0]:
            return True
        if entry.startswith("*.") and name.endswith(entry[1:]):
            return True
    return False


def same_origin(origin: str, host: str, scheme: str) -> bool:
    """Whether an `Origin` header names the host (and port) that the request was sent to."""
    try:
        parts = urlsplit(origin)
        origin_port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    name, port = split_host(host)
    origin_name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return origin_name == name and origin_port == (port or _DEFAULT_PORTS.get(scheme))


class RequestGuard(ASGIMiddleware):
    """Refuses foreign hosts (400), foreign origins (403) and non-JSON bodies (415); see the module."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, allowed_hosts: Iterable[str]) -> None:
        self.allowed_hosts = tuple(allowed_hosts)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        host = headers.get("host", "")
        if not host_allowed(host, self.allowed_hosts):
            raise HTTPException(
                status_code=HTTP_400_BAD_REQUEST,
                detail=f"this server does not answer to host {host!r}; allowed: "
                f"{', '.join(self.allowed_hosts)} (setting allowed_hosts)",
            )
        if scope.get("method", "GET") in _UNSAFE_METHODS:
            self._check_origin(headers, host, str(scope.get("scheme", "http")))
            self._check_body_type(headers)
        await next_app(scope, receive, send)

    @staticmethod
    def _check_origin(headers: dict[str, str], host: str, scheme: str) -> None:
        origin = headers.get("origin")
        if origin is not None and not same_origin(origin, host, scheme):
            raise HTTPException(
                status_code=HTTP_403_FORBIDDEN,
                detail=f"cross-site request refused: Origin {origin!r} is not this server ({host}); "
                "the API accepts changes only from its own pages or from clients that send no Origin",
            )
        # A browser that sends no Origin still says where the request came from.
        if origin is None and headers.get("sec-fetch-site") == "cross-site":
            raise HTTPException(status_code=HTTP_403_FORBIDDEN, detail="cross-site request refused (Sec-Fetch-Site)")

    @staticmethod
    def _check_body_type(headers: dict[str, str]) -> None:
        content_type = headers.get("content-type")
        has_body = headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers
        if content_type is None and not has_body:
            return
        media_type = (content_type or "").split(";", 1)[0].strip().lower()
        if media_type not in _BODY_TYPES:
            raise HTTPException(
                status_code=HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                detail=f"send the body as application/json (or multipart/form-data for uploads), "
                f"not {media_type or 'without a Content-Type'}",
            )


__all__ = [
    "CONTENT_SECURITY_POLICY",
    "REQUEST_ID_HEADER",
    "SECURITY_HEADERS",
    "RequestGuard",
    "add_headers",
    "host_allowed",
    "request_id",
    "same_origin",
]
