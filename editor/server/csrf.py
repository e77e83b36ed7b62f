"""Cross-site request protection for state-changing API calls (DESIGN.md §8: the default loopback
server without a token still refuses cross-site writes).

Browsers send `Origin` (and `Sec-Fetch-Site`) with every cross-site POST, PUT, PATCH and DELETE,
so a write whose origin is not the server's own is refused with 403. Programs that send neither
header (curl, the Python client) are not affected; the web editor's pages call the API from the
same origin with `Content-Type: application/json`."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from litestar.connection import ASGIConnection
from litestar.exceptions import PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def same_origin_guard(connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler) -> None:
    """Refuse a browser's cross-site write: an `Origin` other than this server's, or a
    `Sec-Fetch-Site: cross-site` request without one."""
    if connection.scope.get("method", "GET") in SAFE_METHODS:
        return
    origin = connection.headers.get("origin")
    if origin is not None:
        if not _same_origin(origin, connection):
            raise PermissionDeniedException(f"cross-site request refused: origin {origin!r} is not this server's")
        return
    if connection.headers.get("sec-fetch-site") == "cross-site":
        raise PermissionDeniedException("cross-site request refused")


def _same_origin(origin: str, connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    host = connection.headers.get("host")
    parts = urlsplit(origin)
    return host is not None and parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


__all__ = ["same_origin_guard"]
