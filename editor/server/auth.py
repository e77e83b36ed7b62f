"""Bearer-token guard for `/api` routes (off loopback, the API needs a token)."""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from editor.settings import Settings


def token_guard(settings: Settings) -> Guard | None:
    """A guard when a token is configured (the server refuses to listen off loopback without one);
    None when the API is open (loopback, no token)."""
    if settings.token is None:
        if not settings.is_loopback:
            settings.check_serving()  # raises: never serve an open API off loopback
        return None
    expected = settings.token.encode()

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler) -> None:
        scheme, _, given = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise NotAuthorizedException(
                "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="editor"'},
            )

    return guard


__all__ = ["token_guard"]
