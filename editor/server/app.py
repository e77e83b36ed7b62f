"""`create_app`: the Litestar application around one model worker and one database."""

from __future__ import annotations

import logging
from typing import Any

import anyio.to_thread
from litestar import Litestar, Router
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from editor import __version__
from editor.db.batches import BatchStore
from editor.db.engine import make_engine, make_session_factory
from editor.db.services import Store
from editor.server.auth import token_guard
from editor.server.backend import FillBackend
from editor.server.batches import BatchRunner, BatchService, batch_controller
from editor.server.controllers import CONTROLLERS, HealthController
from editor.server.errors import EXCEPTION_HANDLERS
from editor.server.openai_api import OpenAIController, OpenAIService, refine_openapi
from editor.server.openapi import OfflineSwagger, refine
from editor.server.pages import page_handlers, template_config
from editor.server.protection import RequestGuard, add_headers
from editor.server.streaming import FillService
from editor.server.tokens import TokenCounter
from editor.server.worker import ModelWorker
from editor.settings import Settings

log = logging.getLogger(__name__)
_BODY_SLACK = 64 * 1024  # room for JSON around the document
BEARER = "bearer"  # the security scheme's name in the OpenAPI document


def default_backend(settings: Settings) -> FillBackend:
    """Replicas on Ray Serve when `settings.replicas` is set, else one model worker in this process."""
    if settings.replicas is not None:
        from editor.server.ray_serve import RayBackend  # Ray is imported only when asked for

        return RayBackend(settings)
    return ModelWorker(settings)


def create_app(settings: Settings | None = None, *, worker: FillBackend | None = None) -> Litestar:
    """The API on `settings`' database, with `worker` (default: `default_backend(settings)`).

    The app starts the worker (the model loads in its thread, or the replicas start; /ready says
    when) and stops it on shutdown. It does not migrate the database: `editor serve` and
    `editor db upgrade` do.
    """
    settings = settings or Settings()
    worker = worker or default_backend(settings)
    engine = make_engine(settings.database_url, busy_timeout_s=settings.database_busy_timeout_s)
    store = Store(make_session_factory(engine))
    fills = FillService(settings, worker, store)
    batch_store = BatchStore(store.sessions)
    batch_runner = BatchRunner(settings, worker, batch_store)
    batches = BatchService(settings, batch_store, batch_runner)
    guard = token_guard(settings)

    async def start() -> None:
        worker.start()
        batch_runner.start()  # continues jobs left pending or running by a previous process

    async def stop() -> None:
        await batch_runner.stop()
        await anyio.to_thread.run_sync(worker.stop)  # cancels running fills at their next step
        engine.dispose()

    def provide(value: Any) -> Provide:
        return Provide(lambda: value, use_cache=True, sync_to_thread=False)

    security: list[dict[str, list[str]]] | None = [{BEARER: []}] if guard else None
    api = Router(
        path="/",
        route_handlers=[*CONTROLLERS, batch_controller(settings), OpenAIController],
        guards=[guard] if guard else [],
        security=security,
    )
    app = Litestar(
        route_handlers=[api, HealthController, *page_handlers()],
        template_config=template_config(),
        dependencies={
            "settings": provide(settings),
            "worker": provide(worker),
            "store": provide(store),
            "fills": provide(fills),
            "batches": provide(batches),
            "batch_store": provide(batch_store),
            "tokens": provide(TokenCounter(worker, settings.max_document_chars)),
            "openai": provide(OpenAIService(settings, worker)),
        },
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        middleware=[RequestGuard(settings.hosts_allowed())],
        before_send=[add_headers],
        on_startup=[start],
        on_shutdown=[stop],
        openapi_config=OpenAPIConfig(
            title="editor",
            version=__version__,
            path="/schema",
            description="Constrained and infilling text editing on masked diffusion language models. "
            "Documents use [MASK n] spans (see docs/language.md). Limits, cross-site rules and request "
            "ids: docs/security.md. Under /v1, an OpenAI-compatible API (docs/openai.md).",
            render_plugins=[OfflineSwagger("/schema")],
            components=Components(
                security_schemes={BEARER: SecurityScheme(type="http", scheme="bearer")} if guard else None
            ),
        ),
        request_max_body_size=4 * settings.max_document_chars + _BODY_SLACK,  # UTF-8 is at most 4 bytes a char
    )
    refine(app.openapi_schema, max_steps=settings.max_steps)  # built once here, then served as refined
    refine_openapi(app.openapi_schema)
    app.state.settings = settings
    app.state.worker = worker
    app.state.store = store
    app.state.batch_runner = batch_runner
    return app


__all__ = ["create_app", "default_backend"]
