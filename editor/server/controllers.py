"""One controller per resource: stateless fills, documents, revisions, editing help, health."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, patch, post, put
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import HeaderParameter, JSONBody, PathParameter, QueryParameter
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_201_CREATED,
    HTTP_204_NO_CONTENT,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from editor.canvas import split_literals
from editor.db.services import DocumentInfo, StaleVersion, Store
from editor.document import DocumentError
from editor.server.backend import FillBackend
from editor.server.errors import LimitExceeded, error_body
from editor.server.revisions import (
    chosen,
    diff_revisions,
    find_span,
    new_revision,
    pin_all_but,
    pin_except,
    refilled,
    regenerated,
    revision_options,
    stored_span,
)
from editor.server.schemas import (
    ChooseRequest,
    DiffOut,
    DocumentCreate,
    DocumentFillRequest,
    DocumentOut,
    DocumentPage,
    DocumentPatch,
    DocumentReplace,
    DocumentSummary,
    ErrorOut,
    FillOut,
    FillRequest,
    Health,
    ParseOut,
    ParseRequest,
    Readiness,
    RegenerateRequest,
    RevisionOut,
    RevisionPage,
    RevisionSummary,
    SpanInfo,
    TokenizeOut,
    TokenizeRequest,
)
from editor.server.streaming import (
    FillService,
    Finisher,
    fill_body,
    in_thread,
    replica_header,
    store_revision,
    wants_stream,
)
from editor.server.tokens import TokenCounter
from editor.server.versions import IF_MATCH_HELP, IF_MATCH_PATTERN, etag, expected_version
from editor.server.worker import FillJob
from editor.settings import Settings

AnyRequest = Request[Any, Any, Any]
# Explicit parameter markers (Litestar 2.25 style): path, query, body and injected dependencies.
MAX_ID = 2**63 - 1  # SQLite's largest integer: ids beyond it are a 400, not a database error
Limit = Annotated[int, QueryParameter(ge=1, le=100, description="items per page")]
Offset = Annotated[int, QueryParameter(ge=0, le=MAX_ID, description="items to skip")]
TitleQuery = Annotated[str | None, QueryParameter(max_length=200, description="only titles containing this (any case)")]
StreamQuery = Annotated[bool | None, QueryParameter(name="stream", description="same as the body's `stream`")]
DocumentId = Annotated[int, PathParameter(ge=1, le=MAX_ID, description="the document's id")]
Number = Annotated[int, PathParameter(ge=1, le=MAX_ID, description="the revision's number (1, 2, 3...)")]
SpanKey = Annotated[
    str,
    PathParameter(
        pattern=r"^([0-9]{1,9}|[A-Za-z_][A-Za-z0-9_]{0,63})$",
        description="the span's name, or its 0-based index in ASCII digits",
    ),
]

# The pattern is for the schema only: a value outside it gets our own 400, which says what to send.
IfMatch = Annotated[
    str | None,
    HeaderParameter(
        name="If-Match", max_length=200, description=IF_MATCH_HELP, schema_extra={"pattern": IF_MATCH_PATTERN}
    ),
]
Fills = NamedDependency[FillService]
Storage = NamedDependency[Store]
Worker = NamedDependency[FillBackend]
Configured = NamedDependency[Settings]
Tokens = NamedDependency[TokenCounter]
SSE = "text/event-stream"


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    descriptions = {
        401: "missing or wrong bearer token",
        403: "cross-origin request: the Origin header names another site",
        404: "unknown document, revision or span",
        409: "locked spans need a revision of the current source to keep",
        412: "If-Match names an older version: someone changed the document since (current version in the body)",
        413: "the document or the request body is over its size limit (the message states the limit)",
        415: "the body is not application/json",
        422: "the document has a mistake (with line and column) or the fill is over a limit (named)",
        428: "If-Match is required for this write (setting if_match): send the document's ETag",
        429: "the fill queue is full; see Retry-After",
        503: "the model is not available, or the server is shutting down; see Retry-After",
        504: "the fill ran past its time budget (fill_timeout_s) and was cancelled",
    }
    return {code: ResponseSpec(ErrorOut, description=descriptions[code], generate_examples=False) for code in codes}


CHANGE_ERRORS = (401, 403, 415)  # every state-changing route
FILL_ERRORS = _errors(*CHANGE_ERRORS, 413, 422, 429, 503, 504)


def _fill_responses(status: int, body: type, what: str) -> dict[int, ResponseSpec]:
    ok = ResponseSpec(
        body,
        description=f"{what}; with stream=true or Accept: {SSE}, server-sent events instead: "
        "`step` for each sampler step, then `result` (this body) or `error`",
        generate_examples=False,  # random examples would break the option rules (temperature floors)
    )
    return {status: ok, **FILL_ERRORS}


async def _new_revision_response(
    fills: FillService,
    request: Request[Any, Any, Any],
    job: FillJob,
    finish: Finisher,
    *,
    stream: bool,
    document_id: int,
) -> Any:
    """Stream the fill, or answer 201 with the stored revision and its Location."""
    if stream:
        return await fills.stream(request, job, finish)
    body = await fills.run(request, job, finish)
    headers = _location(document_id, body["number"]) | replica_header(job)
    return Response(body, status_code=HTTP_201_CREATED, headers=headers)


def _document_response(info: DocumentInfo, status: int = HTTP_200_OK) -> Response[DocumentOut]:
    return Response(DocumentOut.from_info(info), status_code=status, headers=etag(info.document.version))


def _location(document_id: int, number: int) -> dict[str, str]:
    return {"Location": f"/api/v1/documents/{document_id}/revisions/{number}"}


class FillController(Controller):
    path = "/api/v1/fill"
    tags = ("fill",)

    @post("/", status_code=HTTP_200_OK, responses=_fill_responses(200, FillOut, "the filled document"))
    async def fill(
        self, request: AnyRequest, data: JSONBody[FillRequest], fills: Fills, stream_query: StreamQuery = None
    ) -> Response[Any]:
        """Fill a document without storing anything: text, spans, parameters, seed and timings."""
        document = fills.parse(data.document)
        stream = wants_stream(request, body_flag=data.stream, query_flag=stream_query)
        job = fills.submit(document, data.options, data.instruction, stream=stream, trace=data.trace)

        async def finish(outcome: Any) -> dict[str, Any]:
            return fill_body(outcome, trace=data.trace)

        if stream:
            return await fills.stream(request, job, finish)
        body = await fills.run(request, job, finish)
        return Response(body, status_code=HTTP_200_OK, headers=replica_header(job))


class DocumentController(Controller):
    path = "/api/v1/documents"
    tags = ("documents",)

    @post("/", status_code=HTTP_201_CREATED, responses=_errors(*CHANGE_ERRORS, 413, 422))
    async def create(self, data: JSONBody[DocumentCreate], store: Storage, fills: Fills) -> Response[DocumentOut]:
        """Create a document (version 1). Its source must parse (mistakes are 422 with line and column)."""
        fills.parse(data.source)
        return _document_response(await in_thread(store.create_document, data.title, data.source), HTTP_201_CREATED)

    @get("/")
    async def list_documents(
        self, store: Storage, limit: Limit = 20, offset: Offset = 0, q: TitleQuery = None
    ) -> DocumentPage:
        """Documents, most recently changed first, a page at a time; `q` keeps titles containing it."""
        page = await in_thread(lambda: store.list_documents(limit=limit, offset=offset, title_contains=q))
        return DocumentPage(
            items=[DocumentSummary.from_info(i) for i in page.items], total=page.total, limit=limit, offset=offset
        )

    @get("/{document_id:int}", responses=_errors(401, 404))
    async def read(self, document_id: DocumentId, store: Storage) -> Response[DocumentOut]:
        """One document with its source; its version is also the `ETag` header (for If-Match)."""
        return _document_response(await in_thread(store.get_document, document_id))

    @put("/{document_id:int}", responses=_errors(*CHANGE_ERRORS, 404, 412, 413, 422, 428))
    async def replace(
        self,
        request: AnyRequest,
        document_id: DocumentId,
        data: JSONBody[DocumentReplace],
        store: Storage,
        fills: Fills,
        settings: Configured,
        if_match: IfMatch = None,
    ) -> Response[DocumentOut]:
        """Replace a document's title and source (the version goes up by one). With If-Match, only
        if the document is still at that version (else 412). Existing revisions keep the source
        they filled."""
        expected = expected_version(if_match, request, settings, required=True)
        fills.parse(data.source)
        info = await in_thread(
            lambda: store.update_document(document_id, title=data.title, source=data.source, expected_version=expected)
        )
        return _document_response(info)

    @patch("/{document_id:int}", responses=_errors(*CHANGE_ERRORS, 404, 412, 413, 422, 428))
    async def update(
        self,
        request: AnyRequest,
        document_id: DocumentId,
        data: JSONBody[DocumentPatch],
        store: Storage,
        fills: Fills,
        settings: Configured,
        if_match: IfMatch = None,
    ) -> Response[DocumentOut]:
        """Change a document's title, source or both (the version goes up by one; If-Match as for PUT)."""
        expected = expected_version(if_match, request, settings, required=True)
        if data.source is not None:
            fills.parse(data.source)
        info = await in_thread(
            lambda: store.update_document(document_id, title=data.title, source=data.source, expected_version=expected)
        )
        return _document_response(info)

    @delete("/{document_id:int}", status_code=HTTP_204_NO_CONTENT, responses=_errors(*CHANGE_ERRORS, 404, 412, 428))
    async def remove(
        self,
        request: AnyRequest,
        document_id: DocumentId,
        store: Storage,
        settings: Configured,
        if_match: IfMatch = None,
    ) -> None:
        """Delete a document and all of its revisions (If-Match as for PUT)."""
        expected = expected_version(if_match, request, settings, required=True)
        await in_thread(lambda: store.delete_document(document_id, expected_version=expected))

    @post(
        "/{document_id:int}/fill",
        status_code=HTTP_201_CREATED,
        responses=_fill_responses(201, RevisionOut, "the new revision") | _errors(404, 409, 412),
    )
    async def fill(
        self,
        request: AnyRequest,
        document_id: DocumentId,
        fills: Fills,
        store: Storage,
        settings: Configured,
        data: JSONBody[DocumentFillRequest | None] = None,
        stream_query: StreamQuery = None,
        if_match: IfMatch = None,
    ) -> Response[Any]:
        """Fill the document's current source and store the result as its next revision (whose
        parent is the previous latest revision). With `lock`, the locked spans keep the text that
        `revision` (default: the latest) gave them and only the others are filled. With If-Match,
        the document must be at that version when the fill starts and when it is stored (else
        412). Nothing is stored if the fill fails."""
        data = data or DocumentFillRequest()
        expected = expected_version(if_match, request, settings, required=False)
        info = await in_thread(store.get_document, document_id)
        if expected is not None and info.document.version != expected:
            raise StaleVersion(document_id, expected, info.document.version)
        source = info.document.source
        document = fills.parse(source)
        stream = wants_stream(request, body_flag=data.stream, query_flag=stream_query)
        instruction = data.instruction or fills.settings.instruction
        if data.lock:
            return await self._fill_with_locks(
                request, document_id, info, data, fills, store, stream=stream, expected=expected
            )
        job = fills.submit(document, data.options, data.instruction, stream=stream, trace=data.trace)

        async def finish(outcome: Any) -> dict[str, Any]:
            new = new_revision(outcome.results[0], outcome, source=source, instruction=instruction)
            return await store_revision(store, document_id, new, trace=data.trace, expected_version=expected)

        return await _new_revision_response(fills, request, job, finish, stream=stream, document_id=document_id)

    async def _fill_with_locks(
        self,
        request: AnyRequest,
        document_id: int,
        info: Any,
        data: DocumentFillRequest,
        fills: FillService,
        store: Store,
        *,
        stream: bool,
        expected: int | None,
    ) -> Response[Any]:
        number = data.revision or info.latest_revision
        if number is None:
            raise LimitExceeded("there is no revision to lock spans of yet: fill the document first", status=409)
        revision = await in_thread(store.get_revision, document_id, number)
        if revision.source != info.document.source:
            raise LimitExceeded(
                f"revision {number} filled a different source than the document's current one; "
                "locks keep spans of a fill of the current source",
                status=409,
            )
        document = fills.parse(revision.source)
        where = f"revision {number} of document {document_id}"
        locked = {find_span(document, key, where).index for key in data.lock}
        targets = {span.index for span in document.spans} - locked
        if not targets:
            raise LimitExceeded("every span is locked: unlock one to fill it")
        pinned = pin_except(document, revision, targets)
        instruction = data.instruction or revision.instruction or fills.settings.instruction
        job = fills.submit(pinned, data.options, instruction, stream=stream, trace=data.trace)

        async def finish(outcome: Any) -> dict[str, Any]:
            new = refilled(revision, targets, outcome, instruction)
            return await store_revision(store, document_id, new, trace=data.trace, expected_version=expected)

        return await _new_revision_response(fills, request, job, finish, stream=stream, document_id=document_id)


class RevisionController(Controller):
    path = "/api/v1/documents/{document_id:int}"
    tags = ("revisions",)

    @get("/revisions", responses=_errors(401, 404))
    async def list_revisions(
        self, document_id: DocumentId, store: Storage, limit: Limit = 20, offset: Offset = 0
    ) -> RevisionPage:
        """A document's revisions, newest first."""
        page = await in_thread(lambda: store.list_revisions(document_id, limit=limit, offset=offset))
        return RevisionPage(
            items=[RevisionSummary.from_revision(r) for r in page.items], total=page.total, limit=limit, offset=offset
        )

    @get("/revisions/{number:int}", responses=_errors(401, 404))
    async def read(
        self,
        document_id: DocumentId,
        number: Number,
        store: Storage,
        trace: Annotated[bool, QueryParameter(description="include the step trace")] = False,
    ) -> RevisionOut:
        """One revision: source, filled text, spans, every sampler parameter, timings."""
        return RevisionOut.from_revision(await in_thread(store.get_revision, document_id, number), trace=trace)

    @get("/diff", responses=_errors(401, 404))
    async def diff(
        self,
        document_id: DocumentId,
        store: Storage,
        from_revision: Annotated[int, QueryParameter(name="from", ge=1, le=MAX_ID, description="the older revision")],
        to_revision: Annotated[int, QueryParameter(name="to", ge=1, le=MAX_ID, description="the newer revision")],
    ) -> DiffOut:
        """What changed between two revisions: each span's text, and a word and line diff of the text."""
        before = await in_thread(store.get_revision, document_id, from_revision)
        after = await in_thread(store.get_revision, document_id, to_revision)
        return diff_revisions(before, after)

    @post(
        "/revisions/{number:int}/spans/{key:str}/regenerate",
        status_code=HTTP_201_CREATED,
        responses=_fill_responses(201, RevisionOut, "the new revision") | _errors(404, 412),
    )
    async def regenerate(
        self,
        request: AnyRequest,
        document_id: DocumentId,
        number: Number,
        key: SpanKey,
        fills: Fills,
        store: Storage,
        settings: Configured,
        data: JSONBody[RegenerateRequest | None] = None,
        stream_query: StreamQuery = None,
        if_match: IfMatch = None,
    ) -> Response[Any]:
        """Refill one span (by name or 0-based index) with every other span pinned to this
        revision's text; stored as a new revision whose parent is this one. Options default to
        this revision's, with a fresh seed. With If-Match, stored only if the document is still at
        that version (else 412)."""
        data = data or RegenerateRequest()
        expected = expected_version(if_match, request, settings, required=False)
        revision = await in_thread(store.get_revision, document_id, number)
        original = fills.parse(revision.source)
        span = find_span(original, key, f"revision {number} of document {document_id}")
        pinned = pin_all_but(original, revision, span.index)
        options = data.options or revision_options(revision)
        instruction = data.instruction or revision.instruction or fills.settings.instruction
        stream = wants_stream(request, body_flag=data.stream, query_flag=stream_query)
        job = fills.submit(pinned, options, instruction, stream=stream, trace=data.trace)

        async def finish(outcome: Any) -> dict[str, Any]:
            new = regenerated(revision, span.index, outcome, instruction)
            return await store_revision(store, document_id, new, trace=data.trace, expected_version=expected)

        return await _new_revision_response(fills, request, job, finish, stream=stream, document_id=document_id)

    @post(
        "/revisions/{number:int}/spans/{key:str}/choose",
        status_code=HTTP_201_CREATED,
        responses={
            201: ResponseSpec(RevisionOut, description="the new revision", generate_examples=False),
            **_errors(*CHANGE_ERRORS, 404, 412, 422),
        },
    )
    async def choose(
        self,
        request: AnyRequest,
        document_id: DocumentId,
        number: Number,
        key: SpanKey,
        data: JSONBody[ChooseRequest],
        store: Storage,
        settings: Configured,
        if_match: IfMatch = None,
    ) -> Response[RevisionOut]:
        """Give one span (by name or 0-based index) the text of one of its `alternatives` (other
        judged candidates' fills) without running the model; stored as a new revision whose parent
        is this one, with this revision's model, options and seed and 0 steps. The replaced text
        takes the chosen one's place among the span's alternatives; later spans move with the text.
        If-Match as for regenerate."""
        expected = expected_version(if_match, request, settings, required=False)
        revision = await in_thread(store.get_revision, document_id, number)
        where = f"revision {number} of document {document_id}"
        new = chosen(revision, stored_span(revision, key, where), data.alternative, where)
        stored = await in_thread(lambda: store.add_revision(document_id, new, expected_version=expected))
        return Response(
            RevisionOut.from_revision(stored),
            status_code=HTTP_201_CREATED,
            headers=_location(document_id, stored.number),
        )


class EditingController(Controller):
    """Help for editors: check a document as it is typed, count a selection's tokens."""

    path = "/api/v1"
    tags = ("editing",)

    @post("/parse", status_code=HTTP_200_OK, responses=_errors(401))
    async def parse(self, data: JSONBody[ParseRequest], fills: Fills) -> ParseOut:
        """Check a document without running anything: its spans, or its first mistake with line
        and column (the same checks and limits as a fill)."""
        try:
            document = fills.parse(data.source)
        except (DocumentError, LimitExceeded) as error:
            status, body, _ = error_body(error)
            return ParseOut(
                valid=False, spans=[], literals=[], error=ErrorOut.model_validate(body | {"status_code": status})
            )
        spans = [
            SpanInfo(
                index=s.index,
                name=s.name,
                min_tokens=s.min_tokens,
                max_tokens=s.max_tokens,
                line=s.line,
                column=s.column,
            )
            for s in document.spans
        ]
        return ParseOut(valid=True, spans=spans, literals=split_literals(document)[0])

    @post("/tokenize", status_code=HTTP_200_OK, responses=_errors(401, 413, 503))
    async def tokenize(self, data: JSONBody[TokenizeRequest], tokens: Tokens) -> TokenizeOut:
        """How many tokens the loaded model makes of a text: the length a mask needs to replace
        it. Runs on a copy of the model's tokenizer in a thread (never the model itself)."""
        return await tokens.count(data.text)


class HealthController(Controller):
    path = "/"
    tags = ("health",)

    @get("/health")
    async def health(self) -> Health:
        """The process is up."""
        return Health(status="ok")

    @get(
        "/ready",
        responses={503: ResponseSpec(Readiness, description="not ready yet (or broken)", generate_examples=False)},
    )
    async def ready(self, worker: Worker, store: Storage) -> Response[Readiness]:
        """Ready to fill: the model is loaded and the database answers."""
        try:
            await in_thread(store.ping)
            database = "ok"
        except Exception:
            database = "unreachable"
        error = str(worker.load_error) if worker.load_error is not None else None
        body = Readiness(
            ready=worker.ready and database == "ok",
            model=worker.model_name,
            model_note=worker.model_note,
            model_placement=worker.model_placement,
            model_error=error,
            database=database,
            queued=worker.queued,
        )
        return Response(body, status_code=HTTP_200_OK if body.ready else HTTP_503_SERVICE_UNAVAILABLE)


CONTROLLERS = [FillController, DocumentController, RevisionController, EditingController]

__all__ = [
    "CONTROLLERS",
    "DocumentController",
    "EditingController",
    "FillController",
    "HealthController",
    "RevisionController",
]
