"""The web editor's pages: Jinja2 templates from `editor.templates`, our own JS and CSS from its
`static/` folder. The pages are shells: their scripts read and write everything through the
REST API (so the API's token and cross-site checks cover the editor too)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from litestar import Controller, get
from litestar.datastructures import ResponseHeader
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Template
from litestar.static_files import create_static_files_router
from litestar.status_codes import HTTP_404_NOT_FOUND
from litestar.template.config import TemplateConfig
from litestar.types import ControllerRouterHandler

from editor import __version__
from editor.db.services import NotFound, Store
from editor.server.backend import FillBackend
from editor.server.streaming import in_thread
from editor.settings import Settings

# Only our own scripts and styles: no inline script, no third-party origin, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = [
    ResponseHeader(name="Content-Security-Policy", value=CONTENT_SECURITY_POLICY),
    ResponseHeader(name="X-Content-Type-Options", value="nosniff"),
    ResponseHeader(name="Referrer-Policy", value="same-origin"),
    ResponseHeader(name="X-Frame-Options", value="DENY"),
]


def templates_directory() -> Path:
    return Path(str(files("editor.templates")))


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    return TemplateConfig(directory=templates_directory(), engine=JinjaTemplateEngine)


class PageController(Controller):
    """The document list and the editor."""

    path = "/"
    include_in_schema = False
    response_headers = PAGE_HEADERS

    @get("/")
    async def documents(self, settings: NamedDependency[Settings], worker: NamedDependency[FillBackend]) -> Template:
        """Your documents: search, create, rename, delete."""
        return Template("documents.html", context=_context(settings, worker))

    @get("/documents/{document_id:int}")
    async def editor(
        self,
        document_id: FromPath[int],
        settings: NamedDependency[Settings],
        worker: NamedDependency[FillBackend],
        store: NamedDependency[Store],
    ) -> Template:
        """The editor for one document (404 page if there is no such document)."""
        context = _context(settings, worker) | {"document_id": document_id}
        try:
            await in_thread(store.get_document, document_id)
        except NotFound:
            return Template("not_found.html", context=context, status_code=HTTP_404_NOT_FOUND)
        return Template("editor.html", context=context)


def _context(settings: Settings, worker: FillBackend) -> dict[str, Any]:
    return {
        "version": __version__,
        "model": worker.model_name or "",
        "token_required": settings.token is not None,
        "max_steps": settings.max_steps,
    }


def page_handlers() -> list[ControllerRouterHandler]:
    static = create_static_files_router(
        path="/static",
        directories=[templates_directory() / "static"],
        include_in_schema=False,
        name="static",
    )
    return [PageController, static]


__all__ = ["CONTENT_SECURITY_POLICY", "PageController", "page_handlers", "template_config"]
