"""The web layer: the Litestar app, its controllers and the `serve`/`db` commands.

`create_app` is imported on first use, so that `editor --help` (which registers the commands)
does not pay for importing torch and Litestar."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from editor.server.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from editor.server.app import create_app

        return create_app
    raise AttributeError(name)
