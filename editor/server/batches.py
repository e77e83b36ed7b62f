"""Batch jobs over HTTP (docs/batch.md, "API"): create a stored job from a template or a JSON
Schema and records (JSON body, or a multipart upload of a JSONL file), read its state, stream its
results as JSONL, cancel it.

`BatchRunner` runs stored jobs one small chunk at a time through the model worker's low-priority
lane, so interactive fills go first; every chunk's results are stored before the next chunk
starts, and on startup the runner continues every job that was pending or running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from datetime import datetime
from functools import partial
from typing import Annotated, Any, Literal

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions import ClientException
from litestar.openapi import ResponseSpec
from litestar.params import PathParameter
from litestar.response import Stream
from litestar.status_codes import HTTP_202_ACCEPTED
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from editor.batch.runner import BATCH_DEFAULTS, BatchFiller, InputRecord, RecordResult, read_input
from editor.batch.schema import template_from_schema
from editor.batch.template import RecordError, Template, TemplateError
from editor.db.batches import ACTIVE, BatchStore, NewRecord, RecordOutcome
from editor.db.models import BatchJob, BatchRecord
from editor.models.base import DiffusionModel
from editor.options import SamplerOptions
from editor.server.backend import FillBackend
from editor.server.errors import LimitExceeded
from editor.server.schemas import ErrorOut
from editor.server.streaming import in_thread
from editor.server.worker import WorkerUnavailable
from editor.settings import Settings

log = logging.getLogger(__name__)
JSONL = "application/jsonl"
_RESULT_PAGE = 500
MAX_RECORD_ID = 500  # characters of a record's id (custom_id or id) in an API job


# --------------------------------------------------------------------------- bodies


class BatchCreate(BaseModel):
    """A batch job: a template (JSON text or a JSON value) or a JSON Schema, and the records."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    template: Any = Field(None, description="the JSON template: JSON text, or the JSON value itself")
    json_schema: Any = Field(None, alias="schema", description="a JSON Schema (text or value) to derive the template")
    records: list[Any] = Field(description="one JSON object per record; `custom_id` or `id` names it")
    options: SamplerOptions | None = Field(None, description="sampler options; default: threshold, at most 2 steps")
    instruction: str | None = Field(None, description="instruction for instruct models; may use {field}")


class BatchOut(BaseModel):
    id: int
    status: Literal["pending", "running", "done", "failed", "cancelled"]
    total: int = Field(description="input records")
    completed: int = Field(description="records filled")
    failed: int = Field(description="records that ended with an error line")
    pending: int
    error: str | None = Field(description="why the whole job failed, if it did")
    model: str | None
    input_name: str | None
    options: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    results_url: str

    @classmethod
    def from_job(cls, job: BatchJob) -> BatchOut:
        return cls(
            id=job.id,
            status=job.status,
            total=job.total,
            completed=job.completed,
            failed=job.failed,
            pending=job.total - job.completed - job.failed,
            error=job.error,
            model=job.model,
            input_name=job.input_name,
            options=job.options,
            created_at=job.created_at,
            updated_at=job.updated_at,
            finished_at=job.finished_at,
            results_url=f"/api/v1/batches/{job.id}/results",
        )


# --------------------------------------------------------------------------- stored templates


def stored_template(kind: Literal["template", "schema"], text: str) -> str:
    """What the job's `template` column holds: the template or schema text and which it is."""
    return json.dumps({"kind": kind, "text": text}, ensure_ascii=False)


def compile_stored(stored: str, settings: Settings, instruction: str | None) -> Template:
    """The job's template, compiled again (after a restart too); raises TemplateError."""
    value = json.loads(stored)
    limits = settings.document_limits()
    if value["kind"] == "schema":
        return template_from_schema(value["text"], limits).compile(limits, instruction=instruction)
    return Template.parse(value["text"], limits=limits, instruction=instruction)


def _short(name: str | None, limit: int = 500) -> str | None:
    """An upload's file name, cut to what the job's `input_name` column holds (it is only shown)."""
    return name[:limit] if name is not None else None


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _template_error(error: TemplateError) -> ClientException:
    return ClientException(status_code=422, detail=str(error), extra=error.to_dict())


# --------------------------------------------------------------------------- the runner


def fill_chunk(
    template: Template,
    options: SamplerOptions,
    inputs: list[InputRecord],
    max_canvas_tokens: int,
    model: DiffusionModel,
) -> list[RecordResult]:
    """One chunk of a job, run where the model is (the worker thread, or a Ray Serve replica: a
    plain function of picklable arguments, so it can be sent there)."""
    filler = BatchFiller(model, template, options, batch_size=len(inputs), max_canvas_tokens=max_canvas_tokens)
    return filler.fill(inputs)


OTHERS_POLL_S = 5.0  # how often a front looks at jobs that other fronts hold


class BatchRunner:
    """Runs stored jobs in the background, oldest first, a chunk of records at a time."""

    def __init__(
        self, settings: Settings, worker: FillBackend, store: BatchStore, runner_id: str | None = None
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.store = store
        # Names this process in the jobs it claims (docs/batch.md: several fronts on one database).
        self.runner_id = runner_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="editor-batch-runner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
            with contextlib.suppress(Exception):  # a lease that is not released expires on its own
                await in_thread(self.store.release, self.runner_id)

    async def _claim(self, job_id: int) -> bool:
        return await in_thread(self.store.claim, job_id, self.runner_id, self.settings.batch_lease_s)

    def notify(self) -> None:
        """A job was created: look for work now."""
        if self._wake is not None:
            self._wake.set()

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            try:
                jobs = await in_thread(self.store.active_jobs)
            except Exception:
                log.exception("cannot read the batch jobs; trying again shortly")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=5)
                self._wake.clear()
                continue
            if not jobs:
                await self._wake.wait()
                self._wake.clear()
                continue
            ran = False
            for job_id in jobs:
                try:
                    if not await self._claim(job_id):
                        continue  # another front runs it
                    ran = True
                    await self._run_job(job_id)
                except WorkerUnavailable as error:
                    log.warning("batch job %s waits: %s", job_id, error)
                    await asyncio.sleep(5)  # the model is not there; the job stays pending
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    log.exception("batch job %s failed", job_id)
                    await in_thread(partial(self.store.set_status, job_id, "failed", error=str(error)))
            if not ran:
                # Every active job is another front's: look again soon (it may stop and release it).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=min(OTHERS_POLL_S, self.settings.batch_lease_s))
                self._wake.clear()

    async def _run_job(self, job_id: int) -> None:
        job: BatchJob = await in_thread(self.store.get_job, job_id)
        try:
            template = compile_stored(job.template, self.settings, job.instruction)
        except TemplateError as error:
            await in_thread(partial(self.store.set_status, job_id, "failed", error=str(error)))
            return
        options = SamplerOptions(**job.options)
        await in_thread(lambda: self.store.set_status(job_id, "running"))
        while True:
            job = await in_thread(self.store.get_job, job_id)
            if job.status not in ACTIVE:
                return
            rows = self.settings.batch_chunk_rows
            pending = await in_thread(self.store.pending_records, job_id, rows * self.worker.lanes)
            if not pending:
                await in_thread(self.store.save_results, job_id, [])  # marks the job done
                return
            # One chunk per lane at once (with replicas, each replica takes one), results in order.
            chunks = [pending[start : start + rows] for start in range(0, len(pending), rows)]
            filled = await asyncio.gather(*(self._fill(chunk, template, options) for chunk in chunks))
            outcomes = [
                RecordOutcome(record.id, result.to_dict(), options.seed)
                for chunk, results in zip(chunks, filled, strict=True)
                for record, result in zip(chunk, results, strict=True)
            ]
            await in_thread(self.store.save_results, job_id, outcomes)
            if not await self._claim(job_id):  # renewed per chunk; lost only if this front stalled past it
                log.warning("batch job %s was taken over by another front", job_id)
                return

    async def _fill(self, chunk: list[BatchRecord], template: Template, options: SamplerOptions) -> list[RecordResult]:
        inputs = [InputRecord(r.line, r.record_key or str(r.line), r.input) for r in chunk]
        work = partial(fill_chunk, template, options, inputs, self.settings.max_canvas_tokens)
        results: list[RecordResult] = await asyncio.wrap_future(self.worker.submit_background(work))
        return results


# --------------------------------------------------------------------------- creating jobs


class BatchService:
    """Checks and stores new jobs, then wakes the runner."""

    def __init__(self, settings: Settings, store: BatchStore, runner: BatchRunner) -> None:
        self.settings = settings
        self.store = store
        self.runner = runner

    def template_from(self, template: Any, schema: Any, instruction: str | None) -> tuple[str, Template]:
        """(stored template, compiled template) from a request; 422 with the JSON path if bad."""
        if (template is None) == (schema is None):
            raise ClientException(status_code=422, detail="give exactly one of template and schema")
        kind: Literal["template", "schema"] = "template" if template is not None else "schema"
        stored = stored_template(kind, _as_text(template if template is not None else schema))
        try:
            return stored, compile_stored(stored, self.settings, instruction)
        except TemplateError as error:
            raise _template_error(error) from error

    def records_from(self, lines: list[str]) -> list[NewRecord]:
        """Input lines (JSONL) as records to store; bad lines become stored error lines."""
        records = read_input(lines, max_chars=self.settings.max_record_chars)
        if not records:
            raise ClientException(status_code=422, detail="the job has no records")
        limit = self.settings.max_batch_records
        if len(records) > limit:
            raise LimitExceeded(f"the job has {len(records)} records; the limit is {limit}")
        new = []
        for record in records:
            error_line = None
            custom_id = record.custom_id
            if len(custom_id) > MAX_RECORD_ID:  # the stored key's size on every database
                error = RecordError("invalid_record", f"line {record.line}: the id is over {MAX_RECORD_ID} characters")
                custom_id = str(record.line)
                error_line = RecordResult(custom_id, error=error).to_dict()
            elif record.error is not None:
                error_line = RecordResult(custom_id, error=record.error).to_dict()
            new.append(NewRecord(record.line, custom_id, record.record or {}, error_line))
        return new

    async def create(
        self,
        *,
        stored: str,
        options: SamplerOptions | None,
        instruction: str | None,
        records: list[NewRecord],
        input_name: str | None,
    ) -> BatchJob:
        chosen = options or BATCH_DEFAULTS
        if chosen.steps is not None and chosen.steps > self.settings.max_steps:
            raise LimitExceeded(f"steps={chosen.steps} is over the limit of {self.settings.max_steps}")
        job: BatchJob = await in_thread(
            lambda: self.store.create_job(
                template=stored,
                options=chosen.model_dump(),
                instruction=instruction,
                model=self.settings.model,
                input_name=input_name,
                records=records,
            )
        )
        self.runner.notify()
        return job


def _jsonl_lines(text: str) -> list[str]:
    return text.splitlines()  # blank lines are skipped later but keep the line numbers


async def _form_field(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if hasattr(value, "read"):
        raw = await value.read()
        return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    return str(value)


Batches = NamedDependency[BatchService]
BatchStorage = NamedDependency[BatchStore]
BatchId = Annotated[int, PathParameter(ge=1, le=2**63 - 1, description="the batch job's id")]  # SQLite's range
_ERRORS = {
    401: ResponseSpec(ErrorOut, description="missing or wrong bearer token"),
    403: ResponseSpec(ErrorOut, description="cross-origin request: the Origin header names another site"),
    415: ResponseSpec(ErrorOut, description="the body is not application/json or multipart/form-data"),
    404: ResponseSpec(ErrorOut, description="unknown batch job"),
    413: ResponseSpec(ErrorOut, description="the body is over the size limit"),
    422: ResponseSpec(ErrorOut, description="a bad template (with its JSON path), schema, records or options"),
}


def batch_controller(settings: Settings) -> type[Controller]:
    """The controller, with the upload size limit taken from the settings."""

    class BatchController(Controller):
        path = "/api/v1/batches"
        tags = ("batches",)

        @post(
            "/",
            status_code=HTTP_202_ACCEPTED,
            request_max_body_size=settings.max_batch_body_bytes,
            responses={k: _ERRORS[k] for k in (401, 403, 413, 415, 422)},
        )
        async def create(self, request: Request[Any, Any, Any], batches: Batches) -> Response[BatchOut]:
            """Create a stored batch job and answer 202 with its id; it runs in the background.

            The body is JSON (`BatchCreate`: template or schema, records, options, instruction),
            or multipart/form-data with a `records` JSONL file and `template` or `schema`,
            `options` (JSON) and `instruction` fields."""
            content_type = request.headers.get("content-type", "")
            if content_type.startswith("multipart/form-data"):
                form = await request.form()
                records_text = await _form_field(form, "records")
                if records_text is None:
                    raise ClientException(status_code=422, detail="the upload has no `records` file")
                options_text = await _form_field(form, "options")
                try:
                    options = SamplerOptions.model_validate_json(options_text) if options_text else None
                except ValidationError as error:
                    raise ClientException(status_code=422, detail=f"bad options: {error}") from error
                instruction = await _form_field(form, "instruction")
                template = await _form_field(form, "template")
                schema = await _form_field(form, "schema")
                upload = form.get("records")
                input_name = _short(getattr(upload, "filename", None))
                lines = _jsonl_lines(records_text)
            else:
                try:
                    body = BatchCreate.model_validate_json(await request.body())
                except ValidationError as error:
                    raise ClientException(
                        status_code=422, detail="bad batch request", extra=json.loads(error.json())
                    ) from error
                template, schema, options, instruction = body.template, body.json_schema, body.options, body.instruction
                input_name = None
                lines = [json.dumps(record, ensure_ascii=False) for record in body.records]
            stored, _ = batches.template_from(template, schema, instruction)
            records = batches.records_from(lines)
            job = await batches.create(
                stored=stored, options=options, instruction=instruction, records=records, input_name=input_name
            )
            return Response(
                BatchOut.from_job(job),
                status_code=HTTP_202_ACCEPTED,
                headers={"Location": f"/api/v1/batches/{job.id}"},
            )

        @get("/{batch_id:int}", responses={k: _ERRORS[k] for k in (401, 404)})
        async def read(self, batch_id: BatchId, batch_store: BatchStorage) -> BatchOut:
            """A job's state and progress."""
            return BatchOut.from_job(await in_thread(batch_store.get_job, batch_id))

        @get(
            "/{batch_id:int}/results",
            media_type=JSONL,
            responses={k: _ERRORS[k] for k in (401, 404)},
        )
        async def results(self, batch_id: BatchId, batch_store: BatchStorage) -> Stream:
            """The output lines of the records finished so far, in input order, as JSONL:
            `{"custom_id", "output", "spans", "error"}` per line."""
            await in_thread(batch_store.get_job, batch_id)  # 404 before the stream starts

            async def lines() -> AsyncIterator[bytes]:
                after = 0
                while True:
                    read = partial(batch_store.result_lines, batch_id, after_line=after, limit=_RESULT_PAGE)
                    page = await in_thread(read)
                    if not page:
                        return
                    yield "".join(json.dumps(line, ensure_ascii=False) + "\n" for _, line in page).encode()
                    after = page[-1][0]

            return Stream(lines(), media_type=JSONL)

        @post("/{batch_id:int}/cancel", status_code=200, responses={k: _ERRORS[k] for k in (401, 403, 404, 415)})
        async def cancel(self, batch_id: BatchId, batch_store: BatchStorage) -> BatchOut:
            """Stop a job: records not yet filled stay unfilled; finished results stay readable."""
            return BatchOut.from_job(await in_thread(lambda: batch_store.set_status(batch_id, "cancelled")))

    return BatchController


__all__ = [
    "BatchCreate",
    "BatchOut",
    "BatchRunner",
    "BatchService",
    "batch_controller",
    "compile_stored",
    "stored_template",
]
