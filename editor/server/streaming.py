"""Running fills over HTTP: checking requests against the limits, handing them to the model
worker, and answering with JSON or server-sent events (cancelling the fill when the client goes
away). The event loop only waits here; the model runs in the worker thread and the database in
threads of their own. What a fill means for the stored history is in `editor.server.revisions`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from litestar import Request
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.status_codes import HTTP_413_REQUEST_ENTITY_TOO_LARGE

from editor.db.services import NewRevision, Store
from editor.document import Document
from editor.options import FillCancelled, SamplerOptions
from editor.parser import parse_document
from editor.server.backend import FillBackend
from editor.server.errors import LimitExceeded, error_body
from editor.server.protection import request_id
from editor.server.schemas import FillOut, RevisionOut
from editor.server.worker import FillJob, JobOutcome, StepUpdate
from editor.settings import Settings

Finisher = Callable[[JobOutcome], Awaitable[dict[str, Any]]]


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """Run blocking work (database calls) off the event loop."""
    return await anyio.to_thread.run_sync(lambda: function(*args))


def wants_stream(request: Request[Any, Any, Any], *, body_flag: bool, query_flag: bool | None) -> bool:
    """`stream=true` in the body or the query, or `Accept: text/event-stream`."""
    return body_flag or bool(query_flag) or "text/event-stream" in request.headers.get("accept", "")


@dataclass
class FillService:
    settings: Settings
    worker: FillBackend
    store: Store

    # -- checks (pure Python, cheap enough for the event loop) --

    def parse(self, source: str) -> Document:
        """Parse a document under the configured limits; too long is 413, other mistakes 422."""
        limit = self.settings.max_document_chars
        if len(source) > limit:
            raise LimitExceeded(
                f"the document is {len(source)} characters long; the limit is {limit}",
                status=HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            )
        return parse_document(source, self.settings.document_limits())

    def check(self, options: SamplerOptions, instruction: str | None) -> None:
        if options.steps is not None and options.steps > self.settings.max_steps:
            raise LimitExceeded(f"steps={options.steps} is over the limit of {self.settings.max_steps}")
        if instruction is not None and len(instruction) > self.settings.max_document_chars:
            raise LimitExceeded(
                f"the instruction is {len(instruction)} characters long; the limit is "
                f"{self.settings.max_document_chars}",
                status=HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            )

    def submit(
        self, document: Document, options: SamplerOptions, instruction: str | None, *, stream: bool, trace: bool
    ) -> FillJob:
        """Queue one document (raises QueueFull / WorkerUnavailable). Traces are kept when the
        settings say so or the client asked for one."""
        self.check(options, instruction)
        keep = self.settings.keep_step_trace or trace
        return self.worker.submit(
            [document], options, instruction=instruction or self.settings.instruction, stream=stream, keep_trace=keep
        )

    # -- answering --

    async def run(self, request: Request[Any, Any, Any], job: FillJob, finish: Finisher) -> dict[str, Any]:
        """Wait for the job (cancelling it if the client goes away) and build the JSON answer."""
        outcome = await until_done(request, job, job.result())
        return await finish(outcome)

    async def stream(self, request: Request[Any, Any, Any], job: FillJob, finish: Finisher) -> ServerSentEvent:
        """Wait until the fill has started (so that queueing and canvas errors are still plain HTTP
        errors), then stream `step` events and a final `result` (or `error`) event."""
        await until_done(request, job, job.wait_started())
        events = _events(job, finish, request_id(request.scope))
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} | replica_header(job)
        return ServerSentEvent(events, headers=headers)


def replica_header(job: FillJob) -> dict[str, str]:
    """`X-Editor-Replica`: which Ray Serve replica ran the fill (none for the in-process worker)."""
    return {"X-Editor-Replica": job.served_by} if job.served_by is not None else {}


async def until_done(request: Request[Any, Any, Any], job: FillJob, waiting: Awaitable[Any]) -> Any:
    """Await `waiting`; if the client disconnects first, cancel the job and raise FillCancelled."""
    work = asyncio.ensure_future(waiting)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the request itself was cancelled (e.g. shutdown)
        job.cancel()
        work.cancel()
        raise
    finally:
        watcher.cancel()
    if work in done:
        return work.result()
    job.cancel()
    work.cancel()
    raise FillCancelled("the client disconnected")


async def _disconnected(request: Request[Any, Any, Any]) -> None:
    """Returns when the ASGI server reports that the client has gone (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(job: FillJob, finish: Finisher, request: str) -> AsyncIterator[ServerSentEventMessage]:
    completed = False
    try:
        async for update in job.steps():
            yield ServerSentEventMessage(event="step", id=str(update.step), data=json.dumps(step_data(update)))
        try:
            body = await finish(await job.result())
            yield ServerSentEventMessage(event="result", data=json.dumps(body))
        except Exception as error:
            yield ServerSentEventMessage(event="error", data=json.dumps(error_body(error, request=request)[1]))
        completed = True
    finally:
        if not completed:  # the client went away mid-stream: stop the model at its next step
            job.cancel()


def step_data(update: StepUpdate) -> dict[str, Any]:
    """A step event for one document: the row number is always 0, so it is left out."""
    data = update.to_dict()
    for commit in data["commits"]:
        del commit["row"]
    return data


def fill_body(outcome: JobOutcome, *, trace: bool) -> dict[str, Any]:
    return FillOut.from_outcome(outcome.results[0], outcome, trace=trace).model_dump(mode="json")


async def store_revision(
    store: Store, document_id: int, new: NewRevision, *, trace: bool, expected_version: int | None = None
) -> dict[str, Any]:
    """Store a fill as a revision; with `expected_version` (If-Match), only if the document is still
    at that version (else StaleVersion, and nothing is stored)."""
    revision = await in_thread(lambda: store.add_revision(document_id, new, expected_version=expected_version))
    return RevisionOut.from_revision(revision, trace=trace).model_dump(mode="json")


__all__ = [
    "FillService",
    "fill_body",
    "in_thread",
    "replica_header",
    "store_revision",
    "until_done",
    "wants_stream",
]
