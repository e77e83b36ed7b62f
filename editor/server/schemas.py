"""Request and response bodies of the REST API (pydantic; they make up the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from editor.canvas import SpanFill
from editor.db.models import Revision
from editor.db.services import DocumentInfo
from editor.filling import FillResult
from editor.options import SamplerOptions
from editor.server.worker import JobOutcome

MAX_TITLE = 200
MAX_ID = 2**63 - 1  # the databases' largest integer: a larger revision number is a 400, not a 500


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- fills


class FillParameters(_Request):
    """How to fill: sampler options, an optional instruction (the user turn for instruct models),
    whether to stream the steps as server-sent events, and whether to return the step trace."""

    options: SamplerOptions = Field(default_factory=SamplerOptions, description="sampler parameters")
    instruction: str | None = Field(None, description="instruction for instruct models; default: the server's")
    # strict: JSON true/false only (pydantic would also read 0, 1, "yes" as booleans; the schema does not)
    stream: bool = Field(
        False, strict=True, description="answer with server-sent events: one `step` per step, then `result`"
    )
    trace: bool = Field(False, strict=True, description="include every step's commits in the result")


class DocumentFillRequest(FillParameters):
    """A fill of a stored document; `lock` keeps some spans as a revision filled them."""

    lock: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="spans (names or 0-based indices) to keep as `revision` filled them; the rest are refilled",
    )
    revision: int | None = Field(
        None,
        ge=1,
        le=MAX_ID,
        description="the revision whose fills `lock` keeps (default: the latest); its source must be "
        "the document's current source",
    )


class FillRequest(FillParameters):
    """A stateless fill: nothing is stored."""

    document: str = Field(description="the document, with [MASK ...] spans", examples=["Dear [MASK 3 name=greeting],"])


class RegenerateRequest(_Request):
    """Options for refilling one span; unset fields take the revision's own values (with a fresh seed)."""

    options: SamplerOptions | None = Field(None, description="sampler parameters; default: the revision's, new seed")
    instruction: str | None = Field(None, description="default: the revision's instruction")
    stream: bool = Field(False, strict=True)
    trace: bool = Field(False, strict=True)


class ChooseRequest(_Request):
    """Which of a span's alternatives (other judged candidates' texts) to take."""

    # Any integer: one outside the span's list is a 422 that says which are there.
    alternative: int = Field(strict=True, description="0-based index into the span's `alternatives`")


class Timings(BaseModel):
    queued_s: float = Field(description="waiting for the model worker")
    fill_s: float = Field(description="laying out the canvas and sampling")
    total_s: float


class FillOut(BaseModel):
    """The result of a fill."""

    text: str
    spans: list[SpanFill]
    model: str
    seed: int = Field(description="the seed used; pass it back to reproduce the fill")
    steps: int = Field(description="sampler steps run")
    options: SamplerOptions
    timings: Timings
    trace: list[dict[str, Any]] | None = None

    @classmethod
    def from_outcome(cls, result: FillResult, outcome: JobOutcome, *, trace: bool) -> FillOut:
        return cls(
            text=result.text,
            spans=result.spans,
            model=result.model,
            seed=result.seed,
            steps=result.steps,
            options=result.options.model_copy(update={"seed": result.seed}),
            timings=Timings(
                queued_s=round(outcome.queued_s, 4), fill_s=round(outcome.fill_s, 4), total_s=round(outcome.total_s, 4)
            ),
            trace=outcome.trace if trace else None,
        )


# --------------------------------------------------------------------------- documents


class DocumentCreate(_Request):
    title: str = Field("Untitled", min_length=1, max_length=MAX_TITLE)
    source: str = Field(description="the document source, with [MASK ...] spans")


class DocumentReplace(_Request):
    title: str = Field(min_length=1, max_length=MAX_TITLE)
    source: str


class DocumentPatch(_Request):
    """Give the fields to change; a field left out keeps its value (null is not a value here)."""

    title: str | None = Field(None, min_length=1, max_length=MAX_TITLE)
    source: str | None = None

    @field_validator("title", "source", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("null is not allowed: leave the field out to keep its value")
        return value

    @model_validator(mode="after")
    def _something(self) -> DocumentPatch:
        if self.title is None and self.source is None:
            raise ValueError("give title, source or both")
        return self


class DocumentSummary(BaseModel):
    id: int
    title: str
    created_at: datetime
    updated_at: datetime
    revision_count: int
    latest_revision: int | None
    version: int = Field(description="counted up by each change of title or source; the ETag, for If-Match")

    @classmethod
    def from_info(cls, info: DocumentInfo) -> DocumentSummary:
        d = info.document
        return cls(
            id=d.id,
            title=d.title,
            created_at=d.created_at,
            updated_at=d.updated_at,
            revision_count=info.revision_count,
            latest_revision=info.latest_revision,
            version=d.version,
        )


class DocumentOut(DocumentSummary):
    source: str

    @classmethod
    def from_info(cls, info: DocumentInfo) -> DocumentOut:
        return cls(**DocumentSummary.from_info(info).model_dump(), source=info.document.source)


class DocumentPage(BaseModel):
    items: list[DocumentSummary]
    total: int
    limit: int
    offset: int


# --------------------------------------------------------------------------- revisions


class RevisionSummary(BaseModel):
    document_id: int
    number: int = Field(description="1, 2, 3... per document")
    parent: int | None = Field(description="the parent revision's number")
    kind: Literal["fill", "regenerate", "choose"] = Field(
        description="fill; regenerate: one span refilled; choose: one span given another candidate's text, no fill"
    )
    regenerated_span: int | None = Field(
        description="for kind=regenerate or choose: the index of the span that changed"
    )
    span_name: str | None = Field(None, description="that span's name, if it has one")
    model: str
    seed: int
    steps: int
    created_at: datetime

    @staticmethod
    def fields_of(revision: Revision) -> dict[str, Any]:
        return {
            "document_id": revision.document_id,
            "number": revision.number,
            "parent": revision.parent_number,
            "kind": revision.kind,
            "regenerated_span": revision.regenerated_span,
            "span_name": _span_name(revision, revision.regenerated_span),
            "model": revision.model,
            "seed": revision.seed,
            "steps": revision.steps,
            "created_at": revision.created_at,
        }

    @classmethod
    def from_revision(cls, revision: Revision) -> RevisionSummary:
        return cls(**cls.fields_of(revision))


def _span_name(revision: Revision, index: int | None) -> str | None:
    return next((s.name for s in revision.spans if s.index == index), None) if index is not None else None


class RevisionOut(RevisionSummary):
    source: str = Field(description="the document source that was filled")
    instruction: str | None
    text: str
    spans: list[SpanFill]
    options: dict[str, Any] = Field(description="every sampler parameter, with the seed used")
    timings: Timings
    trace: list[dict[str, Any]] | None = Field(None, description="step events, when asked for with ?trace=true")

    @classmethod
    def from_revision(cls, revision: Revision, *, trace: bool = False) -> RevisionOut:
        return cls(
            **cls.fields_of(revision),
            source=revision.source,
            instruction=revision.instruction,
            text=revision.text,
            spans=[span.to_fill() for span in revision.spans],
            options=revision.options,
            timings=Timings(queued_s=revision.queued_s, fill_s=revision.fill_s, total_s=revision.total_s),
            trace=revision.trace if trace else None,
        )


class RevisionPage(BaseModel):
    items: list[RevisionSummary]
    total: int
    limit: int
    offset: int


class SpanChange(BaseModel):
    key: str = Field(description="the span's name, or its index as text")
    index: int | None = Field(description="index in the newer revision (None if it has no such span)")
    before: str | None
    after: str | None
    changed: bool


class TextChunk(BaseModel):
    op: Literal["equal", "insert", "delete", "replace"]
    before: str
    after: str


class DiffOut(BaseModel):
    """What changed from one revision to another."""

    document_id: int
    from_revision: int
    to_revision: int
    source_changed: bool = Field(description="whether the two revisions filled different document sources")
    spans: list[SpanChange]
    chunks: list[TextChunk] = Field(description="word-level diff of the filled texts")
    unified: str = Field(description="line-level unified diff of the filled texts")


# --------------------------------------------------------------------------- misc


class ErrorOut(BaseModel):
    """Every error answer has this shape; document errors add where and what was expected."""

    status_code: int
    detail: str
    message: str | None = Field(None, description="for document errors: what is wrong, without the place")
    line: int | None = None
    column: int | None = None
    expected: str | None = None
    extra: Any = Field(None, description="for malformed requests: which fields are wrong")
    request_id: str | None = Field(None, description="this request's id (also the X-Request-ID header)")


class CommitOut(BaseModel):
    """One token committed at a step."""

    span: int = Field(description="the span's index (-1: not in a span)")
    name: str | None
    offset: int = Field(description="token offset inside the span")
    position: int = Field(description="canvas position")
    token_id: int
    token: str
    confidence: float


class StepEvent(BaseModel):
    """The data of a server-sent `step` event: the tokens committed at one sampler step."""

    step: int = Field(description="0-based step number (also the event id)")
    commits: list[CommitOut]
    remaining: int = Field(description="masked tokens left after this step")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    model: str | None = Field(description="the loaded model, once loaded")
    model_note: str | None = Field(None, description="why the loaded model is not the one asked for, if it is not")
    model_placement: str | None = Field(
        None,
        description="where the model runs, in which dtype, and how its weights are stored with their size in "
        "memory, e.g. 'cpu, bfloat16, weights 270.0 MB' or 'cuda:0, bfloat16, int8 weights 8,634.0 MB'",
    )
    model_error: str | None = None
    database: Literal["ok", "unreachable"]
    queued: int = Field(description="fills waiting for the worker")


# --------------------------------------------------------------------------- editing help


class ParseRequest(_Request):
    source: str = Field(description="document source to check")


class SpanInfo(BaseModel):
    index: int
    name: str | None
    min_tokens: int = Field(description="0 for a choice= span (its length comes from the chosen option)")
    max_tokens: int
    line: int
    column: int


class ParseOut(BaseModel):
    """Whether a document parses; if not, the error with its line and column."""

    valid: bool
    spans: list[SpanInfo]
    literals: list[str] = Field(description="the literal text around the spans: literals[i] precedes span i")
    error: ErrorOut | None = None


class TokenizeRequest(_Request):
    text: str = Field(description="text to count in the loaded model's tokens (a leading space counts)")


class TokenizeOut(BaseModel):
    count: int = Field(description="how many tokens the loaded model's tokenizer makes of the text")
    tokens: list[str] = Field(description="each token's text")
    model: str
