"""Running fills for the API: checking requests against the limits, handing them to the model
worker, answering with JSON or server-sent events, building the "everything else pinned" document
for span regeneration, and the diff between revisions. The event loop only waits here; the model
runs in the worker thread and the database in threads of their own."""

from __future__ import annotations

import asyncio
import difflib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from litestar import Request
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.status_codes import HTTP_413_REQUEST_ENTITY_TOO_LARGE

from editor.canvas import split_literals
from editor.db.models import Revision
from editor.db.services import NewRevision, NotFound, SpanRecord, Store
from editor.document import Document, MaskSpan
from editor.fill import FillResult
from editor.parser import parse_document
from editor.sampler import FillCancelled, SamplerOptions
from editor.server.errors import LimitExceeded, error_body
from editor.server.schemas import DiffOut, FillOut, RevisionOut, SpanChange, TextChunk
from editor.settings import Settings
from editor.worker import FillJob, JobOutcome, ModelWorker, StepUpdate

Finisher = Callable[[JobOutcome], Awaitable[dict[str, Any]]]
_WORDS = re.compile(r"\s+|\w+|[^\w\s]")


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """Run blocking work (database calls) off the event loop."""
    return await anyio.to_thread.run_sync(lambda: function(*args))


def wants_stream(request: Request[Any, Any, Any], *, body_flag: bool, query_flag: bool | None) -> bool:
    """`stream=true` in the body or the query, or `Accept: text/event-stream`."""
    return body_flag or bool(query_flag) or "text/event-stream" in request.headers.get("accept", "")


@dataclass
class FillService:
    settings: Settings
    worker: ModelWorker
    store: Store

    # -- checks (pure Python, cheap enough for the event loop) --

    def parse(self, source: str) -> Document:
        """Parse a document under the configured limits; too long is 413, other mistakes 422."""
        limit = self.settings.max_document_chars
        if len(source) > limit:
            raise LimitExceeded(f"the document is {len(source)} characters long; the limit is {limit}",
                                status=HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        return parse_document(source, self.settings.document_limits())

    def check(self, options: SamplerOptions, instruction: str | None) -> None:
        if options.steps is not None and options.steps > self.settings.max_steps:
            raise LimitExceeded(f"steps={options.steps} is over the limit of {self.settings.max_steps}")
        if instruction is not None and len(instruction) > self.settings.max_document_chars:
            raise LimitExceeded(f"the instruction is {len(instruction)} characters long; the limit is "
                                f"{self.settings.max_document_chars}", status=HTTP_413_REQUEST_ENTITY_TOO_LARGE)

    def submit(self, document: Document, options: SamplerOptions, instruction: str | None, *, stream: bool,
               trace: bool) -> FillJob:
        """Queue one document (raises QueueFull / WorkerUnavailable). Traces are kept when the
        settings say so or the client asked for one."""
        self.check(options, instruction)
        keep = self.settings.keep_step_trace or trace
        return self.worker.submit([document], options, instruction=instruction or self.settings.instruction,
                                  stream=stream, keep_trace=keep)

    # -- answering --

    async def run(self, request: Request[Any, Any, Any], job: FillJob, finish: Finisher) -> dict[str, Any]:
        """Wait for the job (cancelling it if the client goes away) and build the JSON answer."""
        outcome = await until_done(request, job, job.result())
        return await finish(outcome)

    async def stream(self, request: Request[Any, Any, Any], job: FillJob, finish: Finisher) -> ServerSentEvent:
        """Wait until the fill has started (so that queueing and canvas errors are still plain HTTP
        errors), then stream `step` events and a final `result` (or `error`) event."""
        await until_done(request, job, job.wait_started())
        return ServerSentEvent(_events(job, finish), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


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


async def _events(job: FillJob, finish: Finisher) -> AsyncIterator[ServerSentEventMessage]:
    completed = False
    try:
        async for update in job.steps():
            yield ServerSentEventMessage(event="step", id=str(update.step), data=json.dumps(step_data(update)))
        try:
            body = await finish(await job.result())
            yield ServerSentEventMessage(event="result", data=json.dumps(body))
        except Exception as error:  # noqa: BLE001 - reported to the client as an event
            yield ServerSentEventMessage(event="error", data=json.dumps(error_body(error)[1]))
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


# --------------------------------------------------------------------------- building answers


def fill_body(outcome: JobOutcome, *, trace: bool) -> dict[str, Any]:
    return FillOut.from_outcome(outcome.results[0], outcome, trace=trace).model_dump(mode="json")


def new_revision(result: FillResult, outcome: JobOutcome, *, source: str, instruction: str | None,
                 spans: list[SpanRecord] | None = None, **extra: Any) -> NewRevision:
    """What to store for a fill: the options as given, with the seed that was used."""
    records = spans if spans is not None else [
        SpanRecord(s.index, s.name, s.start, s.end, s.text, list(s.token_ids), float(s.confidence))
        for s in result.spans
    ]
    options = result.options.model_copy(update={"seed": result.seed}).model_dump(mode="json")
    return NewRevision(
        source=source, text=result.text, spans=records, model=result.model, seed=result.seed, options=options,
        steps=result.steps, queued_s=outcome.queued_s, fill_s=outcome.fill_s, total_s=outcome.total_s,
        instruction=instruction, trace=outcome.trace, **extra,
    )


async def store_revision(store: Store, document_id: int, new: NewRevision, *, trace: bool) -> dict[str, Any]:
    revision = await in_thread(store.add_revision, document_id, new)
    return RevisionOut.from_revision(revision, trace=trace).model_dump(mode="json")


def revision_options(revision: Revision) -> SamplerOptions:
    """The revision's sampler options with a fresh seed (fields this version does not know are dropped)."""
    known = {k: v for k, v in revision.options.items() if k in SamplerOptions.model_fields and k != "seed"}
    return SamplerOptions.model_validate(known)


# --------------------------------------------------------------------------- regenerate one span


def find_span(document: Document, key: str, where: str) -> MaskSpan:
    """A span by name or 0-based index; NotFound otherwise."""
    try:
        return document.span(key)
    except KeyError:
        raise NotFound(f"span {key!r} of {where}") from None


def pin_all_but(document: Document, revision: Revision, target: int) -> Document:
    """The document with every span but `target` replaced by the revision's fill, as literal text.

    Literal text comes from the revision's filled text, so the seams read exactly as they did;
    only the literal right before the target is the document's own (the old fill may have taken
    over its trailing space, and the new fill must be free to do so again)."""
    literals, spans = split_literals(document)
    fills = {s.index: s for s in revision.spans}
    if sorted(fills) != list(range(len(spans))):
        raise ValueError(f"revision {revision.number} does not cover the spans of its source")
    segments: list[str | MaskSpan] = []
    at = 0  # offset in the revision's text where the next literal starts
    for span in spans:
        fill = fills[span.index]
        if span.index == target:
            segments += [literals[span.index], span]
        else:
            segments += [revision.text[at : fill.start], fill.text]
        at = fill.end
    segments.append(revision.text[at:])
    return Document(_merge_literals(segments))


def _merge_literals(segments: list[str | MaskSpan]) -> tuple[str | MaskSpan, ...]:
    merged: list[str | MaskSpan] = []
    for segment in segments:
        if isinstance(segment, str):
            if not segment:
                continue
            if merged and isinstance(merged[-1], str):
                merged[-1] += segment
                continue
        merged.append(segment)
    return tuple(merged)


def merged_spans(revision: Revision, target: int, result: FillResult) -> list[SpanRecord]:
    """All of the original document's spans for the new text: the refilled one from `result`, the
    ones before it unchanged, the ones after it moved by the change in length."""
    (new,) = result.spans
    old = next(s for s in revision.spans if s.index == target)
    shift = new.end - old.end
    records: list[SpanRecord] = []
    for span in revision.spans:
        if span.index == target:
            records.append(SpanRecord(target, span.name, new.start, new.end, new.text, list(new.token_ids),
                                      float(new.confidence)))
        else:
            moved = shift if span.index > target else 0
            records.append(SpanRecord(span.index, span.name, span.start + moved, span.end + moved, span.text,
                                      list(span.token_ids), span.confidence))
    for record in records:  # the offsets must point at the fills, or the revision would lie
        if result.text[record.start : record.end] != record.text:
            raise RuntimeError(f"span {record.index} does not line up with the regenerated text")
    return records


def regenerated(revision: Revision, target: int, outcome: JobOutcome, instruction: str | None) -> NewRevision:
    result = outcome.results[0]
    return new_revision(result, outcome, source=revision.source, instruction=instruction,
                        spans=merged_spans(revision, target, result), kind="regenerate", regenerated_span=target,
                        parent_number=revision.number)


# --------------------------------------------------------------------------- diff


def diff_revisions(before: Revision, after: Revision) -> DiffOut:
    """Per-span changes (spans matched by name, else index) and a word- and line-level text diff."""
    old = {_key(s.name, s.index): s for s in before.spans}
    changes: list[SpanChange] = []
    for span in after.spans:
        previous = old.pop(_key(span.name, span.index), None)
        was = previous.text if previous is not None else None
        changes.append(SpanChange(key=_key(span.name, span.index), index=span.index, before=was, after=span.text,
                                  changed=was != span.text))
    changes += [SpanChange(key=key, index=None, before=s.text, after=None, changed=True) for key, s in old.items()]
    return DiffOut(
        document_id=after.document_id, from_revision=before.number, to_revision=after.number,
        source_changed=before.source != after.source, spans=changes, chunks=word_diff(before.text, after.text),
        unified=line_diff(before.text, after.text, f"revision {before.number}", f"revision {after.number}"),
    )


def _key(name: str | None, index: int) -> str:
    return name if name is not None else str(index)


def word_diff(before: str, after: str) -> list[TextChunk]:
    a, b = _WORDS.findall(before), _WORDS.findall(after)
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    return [TextChunk(op=op, before="".join(a[i1:i2]), after="".join(b[j1:j2]))  # type: ignore[arg-type]
            for op, i1, i2, j1, j2 in matcher.get_opcodes()]


def line_diff(before: str, after: str, from_name: str, to_name: str) -> str:
    lines = difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                 fromfile=from_name, tofile=to_name)
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


__all__ = [
    "FillService",
    "diff_revisions",
    "fill_body",
    "find_span",
    "in_thread",
    "merged_spans",
    "new_revision",
    "pin_all_but",
    "regenerated",
    "revision_options",
    "store_revision",
    "wants_stream",
]
