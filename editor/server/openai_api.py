"""The OpenAI-compatible API under /v1 (docs/openai.md): models, completions (with `suffix`: fill
in the middle) and chat completions (with `response_format` json_schema: the schema's scaffold
filled, valid by construction), plain or streamed in OpenAI's chunk format.

Every request becomes documents for the same model worker as /api/v1 (same queue, limits,
continuous batching, cancellation); nothing here runs model code. A prompt is literal text: the
documents are built from segments, never parsed, so `[MASK` in a prompt stays text.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, Literal

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPI, OpenAPIMediaType, OpenAPIType, Schema
from litestar.params import JSONBody, PathParameter
from litestar.response import Stream
from litestar.status_codes import HTTP_200_OK, HTTP_413_REQUEST_ENTITY_TOO_LARGE

from editor import __version__
from editor.batch.runner import record_rules
from editor.batch.schema import CHARS_PER_TOKEN, SchemaError, template_from_schema
from editor.batch.template import RecordDocument, RecordError, TemplateError
from editor.chat import PLAIN_LABELS, ChatMessage, Conversation, Instruction, Role
from editor.document import Document, MaskSpan
from editor.filling import FillResult
from editor.options import MIN_TEMPERATURE, SamplerOptions
from editor.server.backend import FillBackend
from editor.server.errors import error_body
from editor.server.openai_errors import OpenAIRequestError, request_error, rewrite
from editor.server.openai_schemas import (
    MAX_STOP,
    MAX_STOP_CHARS,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    ChoiceExtras,
    Completion,
    CompletionChoice,
    CompletionRequest,
    EditorOptions,
    ModelList,
    ModelOut,
    OpenAIErrorOut,
    ResponseExtras,
    Usage,
)
from editor.server.protection import request_id
from editor.server.streaming import until_done
from editor.server.tokens import private_tokenizer
from editor.server.worker import CanvasReshape, FillJob, JobOutcome, StepUpdate, WorkerUnavailable
from editor.settings import Settings

log = logging.getLogger(__name__)

SSE = "text/event-stream"
MASKED = "░"  # a still-masked token in a snapshot
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
JSON_OBJECT_KEY = "answer"  # response_format json_object: {"answer": "..."} (docs/openai.md)
# A chat answer ends where the model starts another turn of the plain framing, as at an end of turn.
TURN_STOPS = [f"\n{PLAIN_LABELS[role]}:" for role in ("user", "system")]
FinishReason = Literal["stop", "length"]


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Answer:
    """One choice's final text."""

    text: str
    finish_reason: FinishReason
    tokens: int


@dataclass
class Plan:
    """What a request asks the worker for, and how each filled document becomes a choice."""

    kind: Literal["completion", "chat"]
    model: str
    documents: list[Document]  # one per choice, in choice order
    prompts: list[str]  # per choice: the literal text before the span (completions)
    suffix: str
    options: SamplerOptions
    instruction: Instruction | None = None
    reshape: CanvasReshape | None = None
    stops: list[str] = field(default_factory=list)
    max_tokens: int = COMPLETION_MAX_TOKENS
    echo: bool = False
    record: RecordDocument | None = None  # a json answer's scaffold
    per_prompt: int = 1  # n: choices per prompt (usage counts each prompt once)
    snapshots: bool = False
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def streams_text(self) -> bool:
        """Whether the final prefix can grow step by step: one span, and no judge choosing among
        candidates at the end (until it has chosen, no text is final)."""
        return self.record is None and (self.options.candidates or 1) == 1

    def answer(self, number: int, result: FillResult) -> Answer:
        if self.record is not None:
            output, _ = self.record.build(result.spans)
            tokens = sum(len(span.token_ids) for span in result.spans)
            return Answer(json.dumps(output, ensure_ascii=False), "stop", tokens)
        span = result.spans[0]
        text = completion_text(result, self.prompts[number], self.suffix) if self.kind == "completion" else span.text
        text, stopped = cut_at_stop(text, self.stops)
        reason: FinishReason = "stop" if stopped or len(span.token_ids) < self.max_tokens else "length"
        if self.echo:
            text = self.prompts[number] + text
        return Answer(text, reason, len(span.token_ids))


def completion_text(result: FillResult, prompt: str, suffix: str) -> str:
    """The text between prompt and suffix. A prompt that ends in a space hands that space to the
    fill (docs/language.md, Seams); the filled text still starts with the prompt then."""
    text = result.text
    if text.startswith(prompt) and text.endswith(suffix) and len(text) >= len(prompt) + len(suffix):
        return text[len(prompt) : len(text) - len(suffix)]
    return result.spans[0].text


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop sequence found in it, and whether one was."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return (text[: min(found)], True) if found else (text, False)


# --------------------------------------------------------------------------- the service


class OpenAIService:
    """Turns /v1 requests into worker jobs and worker outcomes into OpenAI's bodies."""

    # A plain class, not a dataclass: Litestar would try to validate a dataclass dependency's fields.
    def __init__(self, settings: Settings, worker: FillBackend) -> None:
        self.settings = settings
        self.worker = worker
        self.started = int(time.time())
        self.fingerprint = f"editor-{__version__}"
        self._tokenizer: Any = None

    # -- models --

    def models(self) -> ModelList:
        name = self.worker.model_name
        return ModelList(data=[self.model_card(name)] if name is not None else [])

    def model_card(self, name: str) -> ModelOut:
        return ModelOut(id=name, created=self.started, owned_by="editor")

    def check_model(self, asked: str, param: str = "model") -> str:
        """The loaded model's id when `asked` names it; 404 for another, 503 while loading."""
        name = self.worker.model_name
        if name is None:
            if self.worker.load_error is not None:
                raise WorkerUnavailable(f"the model failed to load: {self.worker.load_error}")
            raise WorkerUnavailable("the model is still loading; GET /ready says when it is ready")
        if asked != name:
            raise OpenAIRequestError(
                f"the model {asked!r} does not exist here; this server runs {name!r} (GET /v1/models)",
                param=param,
                code="model_not_found",
                status=404,
            )
        return name

    # -- completions --

    def plan_completion(self, data: CompletionRequest) -> Plan:
        model = self.check_model(data.model)
        refuse_unsupported(data, completion=True)
        prompts = [data.prompt] if isinstance(data.prompt, str) else list(data.prompt)
        if not prompts:
            raise OpenAIRequestError("prompt is an empty list: give at least one prompt", param="prompt")
        suffix = data.suffix or ""
        for number, prompt in enumerate(prompts):
            self._check_chars(len(prompt) + len(suffix), "prompt" if len(prompts) == 1 else f"prompt[{number}]")
        max_tokens = self._max_tokens(data.max_tokens or COMPLETION_MAX_TOKENS, "max_tokens")
        self._check_choices(data.n * len(prompts))
        documents, texts = [], []
        for prompt in prompts:
            document = Document(tuple(s for s in (prompt, MaskSpan(0, 1, max_tokens), suffix) if s != ""))
            documents += [document] * data.n
            texts += [prompt] * data.n
        return Plan(
            kind="completion",
            model=model,
            documents=documents,
            prompts=texts,
            suffix=suffix,
            options=sampler_options(data.editor, data.temperature, data.top_p, data.seed),
            stops=data.stops,
            max_tokens=max_tokens,
            echo=data.echo,
            per_prompt=data.n,
            snapshots=bool(data.editor and data.editor.snapshots),
            include_usage=bool(data.stream_options and data.stream_options.include_usage),
            id=f"cmpl-{uuid.uuid4().hex}",
        )

    # -- chat --

    def plan_chat(self, data: ChatCompletionRequest) -> Plan:
        model = self.check_model(data.model)
        refuse_unsupported(data, completion=False)
        if data.max_tokens is not None and data.max_completion_tokens is not None:
            raise OpenAIRequestError("give max_tokens or max_completion_tokens, not both", param="max_tokens")
        asked = data.max_completion_tokens or data.max_tokens
        param = "max_completion_tokens" if data.max_completion_tokens is not None else "max_tokens"
        messages = conversation(data)
        self._check_chars(sum(len(m.content) for m in messages), "messages")
        self._check_choices(data.n)
        options = sampler_options(data.editor, data.temperature, data.top_p, data.seed)
        plan = Plan(
            kind="chat",
            model=model,
            documents=[],
            prompts=[""] * data.n,
            suffix="",
            options=options,
            stops=[*data.stops, *TURN_STOPS],
            per_prompt=data.n,
            snapshots=bool(data.editor and data.editor.snapshots),
            include_usage=bool(data.stream_options and data.stream_options.include_usage),
            id=f"chatcmpl-{uuid.uuid4().hex}",
        )
        kind = data.response_format.type if data.response_format is not None else "text"
        if kind == "text":
            plan.max_tokens = self._max_tokens(asked or self.settings.chat_max_tokens, param)
            document = Document((MaskSpan(0, 1, plan.max_tokens),))
            plan.instruction = Conversation(tuple(messages))
        else:
            plan.stops = []
            if data.stop is not None:
                raise OpenAIRequestError(
                    "stop cannot cut a JSON answer (it would no longer parse): leave stop out with response_format "
                    f"{kind}",
                    param="stop",
                )
            view = data.editor.view if data.editor is not None else "prose"
            record = self._scaffold(data, kind, asked, view)
            total = sum(span.max_tokens for span in record.document.spans)
            if asked is not None and total > asked:
                raise OpenAIRequestError(
                    f"the schema's answer takes up to {total} tokens ({len(record.document.spans)} fields); "
                    f"{param} is {asked}: raise it, or lower the schema's maxLength/maxItems",
                    param=param,
                )
            plan.max_tokens = total
            plan.record = record
            plan.reshape = partial(record_rules, document=record)
            document = record.document
            plan.instruction = Conversation(tuple(with_hints(messages, record.instruction)))
        plan.documents = [document] * data.n
        return plan

    def _scaffold(
        self, data: ChatCompletionRequest, kind: str, asked: int | None, view: Literal["prose", "json"]
    ) -> RecordDocument:
        """The answer's scaffold from the request's JSON Schema (json_object: one string field)."""
        limits = self.settings.document_limits()
        where = "response_format.json_schema.schema"
        if kind == "json_object":
            tokens = min(asked or self.settings.chat_max_tokens, limits.max_span_tokens)
            schema: dict[str, Any] = {
                "type": "object",
                "properties": {JSON_OBJECT_KEY: {"type": "string", "maxLength": tokens * CHARS_PER_TOKEN}},
            }
            where = "response_format"
        else:
            assert data.response_format is not None
            if data.response_format.json_schema is None:
                raise OpenAIRequestError(
                    "response_format of type json_schema needs its json_schema object", param="response_format"
                )
            schema = data.response_format.json_schema.schema_
        try:
            template = template_from_schema(json.dumps(schema), limits).compile(limits, view=view)
            return template.render({})
        except (SchemaError, TemplateError, RecordError) as error:
            raise OpenAIRequestError(f"the JSON Schema cannot be used: {error}", param=where) from error

    # -- shared checks --

    def _check_chars(self, chars: int, param: str) -> None:
        limit = self.settings.max_document_chars
        if chars > limit:
            raise OpenAIRequestError(
                f"{param} is {chars} characters long; the limit is {limit} (max_document_chars)",
                param=param,
                code="request_too_large",
                status=HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            )

    def _max_tokens(self, tokens: int, param: str) -> int:
        limit = self.settings.max_span_tokens
        if tokens > limit:
            raise OpenAIRequestError(
                f"{param}={tokens} is over the limit of {limit} tokens for one answer (max_span_tokens)", param=param
            )
        return tokens

    def _check_choices(self, choices: int) -> None:
        limit = self.settings.max_choices
        if choices > limit:
            raise OpenAIRequestError(
                f"this request asks for {choices} choices (n times the prompts); the limit is {limit} (max_choices)",
                param="n",
            )

    # -- running --

    def submit(self, plan: Plan, *, stream: bool) -> FillJob:
        """Queue the plan's documents as one job (raises QueueFull / WorkerUnavailable)."""
        steps = plan.options.steps
        if steps is not None and steps > self.settings.max_steps:
            raise OpenAIRequestError(
                f"editor.steps={steps} is over the limit of {self.settings.max_steps} (max_steps)", param="editor.steps"
            )
        return self.worker.submit(
            plan.documents,
            plan.options,
            instruction=plan.instruction or self.settings.instruction,
            stream=stream,
            keep_trace=False,
            reshape=plan.reshape,
        )

    def answers(self, plan: Plan, outcome: JobOutcome) -> list[Answer]:
        return [plan.answer(number, result) for number, result in enumerate(outcome.results)]

    def usage(self, plan: Plan, outcome: JobOutcome, answers: list[Answer]) -> Usage:
        prompt = sum(outcome.prompt_tokens[:: plan.per_prompt])  # each prompt once, not once per choice
        completion = sum(answer.tokens for answer in answers)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def extras(self, outcome: JobOutcome) -> ResponseExtras:
        first = outcome.results[0]
        return ResponseExtras(
            seed=first.seed, steps=first.steps, options=first.options.model_copy(update={"seed": first.seed})
        )

    def body(self, plan: Plan, outcome: JobOutcome) -> dict[str, Any]:
        answers = self.answers(plan, outcome)
        common = {
            "id": plan.id,
            "created": plan.created,
            "model": plan.model,
            "system_fingerprint": self.fingerprint,
            "usage": self.usage(plan, outcome, answers),
            "editor": self.extras(outcome),
        }
        if plan.kind == "completion":
            completion = Completion(
                choices=[
                    CompletionChoice(index=i, text=a.text, finish_reason=a.finish_reason) for i, a in enumerate(answers)
                ],
                **common,
            )
            return dump(completion)
        chat = ChatCompletion(
            choices=[
                ChatChoice(index=i, message=ChatMessageOut(content=a.text), finish_reason=a.finish_reason)
                for i, a in enumerate(answers)
            ],
            **common,
        )
        return dump(chat)

    def tokenizer(self) -> Any:
        """A private copy of the model's tokenizer for decoding streamed prefixes."""
        if self._tokenizer is None:
            self._tokenizer = private_tokenizer(self.worker)
        return self._tokenizer


def sampler_options(
    editor: EditorOptions | None, temperature: float | None, top_p: float | None, seed: int | None
) -> SamplerOptions:
    """The request's sampler options: `editor`'s, with temperature, top_p and seed from the top level."""
    given = {"temperature": temperature, "top_p": top_p, "seed": seed}
    editor_set = editor.model_fields_set if editor is not None else set()
    for name, value in given.items():
        if value is not None and name in editor_set:
            raise OpenAIRequestError(
                f"{name} is given twice (at the top level and in editor): give it once", param=name
            )
    try:
        options = (editor or EditorOptions()).sampler_options(**{k: v for k, v in given.items() if v is not None})
    except ValueError as error:  # pydantic's ValidationError: e.g. a temperature under the floor
        param = next((k for k, v in given.items() if v is not None and k in str(error)), None)
        raise OpenAIRequestError(f"{error}".replace("\n", " "), param=param) from error
    return options


# Fields listed in the request models only so that their no-op values pass (docs/openai.md).
_NO_OP: dict[str, Callable[[Any], bool]] = {
    "logit_bias": lambda v: v is None or v == {},
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "best_of": lambda v: v in (None, 1),
    "tools": lambda v: v is None or v == [],
    "tool_choice": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: v is None,
    "top_logprobs": lambda v: v is None,
}


def refuse_unsupported(data: CompletionRequest | ChatCompletionRequest, *, completion: bool) -> None:
    """A 400 naming the first field set to something we do not implement."""
    logprobs = data.logprobs
    if logprobs not in (None, False):
        raise OpenAIRequestError(
            "logprobs is not supported: a diffusion fill commits tokens in any order, each scored with the text "
            "around it still partly masked, so there are no left-to-right log-probabilities to report "
            "(docs/openai.md)",
            param="logprobs",
            code="unsupported_parameter",
        )
    for name, no_op in _NO_OP.items():
        if name in type(data).model_fields and not no_op(getattr(data, name)):
            raise OpenAIRequestError(
                f"{name} is not supported by this server (only its no-op value is accepted; docs/openai.md)",
                param=name,
                code="unsupported_parameter",
            )


_ROLES: dict[str, Role] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def conversation(data: ChatCompletionRequest) -> list[ChatMessage]:
    """The messages as text, each content part checked (only text parts are supported)."""
    messages = []
    for number, message in enumerate(data.messages):
        where = f"messages[{number}]"
        role = _ROLES.get(message.role)
        if role is None:
            raise OpenAIRequestError(
                f"{where}: role {message.role!r} is not supported (there are no tools here)",
                param=f"{where}.role",
                code="unsupported_parameter",
            )
        content = message.content
        if content is None:
            raise OpenAIRequestError(f"{where} has no content", param=f"{where}.content")
        if not isinstance(content, str):
            texts = []
            for part_number, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise OpenAIRequestError(
                        f"{where}.content[{part_number}]: content parts of type {part.type!r} are not supported "
                        "(only text)",
                        param=f"{where}.content[{part_number}].type",
                        code="unsupported_parameter",
                    )
                texts.append(part.text)
            content = "".join(texts)
        messages.append(ChatMessage(role, content))
    return messages


def with_hints(messages: list[ChatMessage], hints: str | None) -> list[ChatMessage]:
    """The schema's field descriptions added to the system message (one is put first if none is)."""
    if not hints:
        return messages
    if messages and messages[0].role == "system":
        return [ChatMessage("system", f"{messages[0].content}\n\n{hints}"), *messages[1:]]
    return [ChatMessage("system", hints), *messages]


# --------------------------------------------------------------------------- streaming


@dataclass
class _ChoiceStream:
    """One choice while it streams: the tokens committed so far and the text already sent."""

    commits: dict[tuple[int, int], tuple[int, str]] = field(default_factory=dict)  # (span, offset) -> (id, text)
    sent: str = ""
    snapshot: str | None = None


class PrefixTracker:
    """Per choice, the left-to-right prefix of the answer that has become final: the span's
    committed tokens from its start up to the first masked one, decoded together. Text that a
    later token or the end of the fill could still change is held back: a partial character, the
    trailing spaces (a fill before whitespace loses its own), and anything a stop sequence could
    begin with."""

    def __init__(self, plan: Plan, tokenizer: Any) -> None:
        self.plan = plan
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        self.choices = [_ChoiceStream() for _ in plan.documents]
        self.hold = max((len(stop) for stop in plan.stops), default=1) - 1

    def add(self, update: StepUpdate) -> list[tuple[int, str, str | None]]:
        """(choice, new final text, snapshot or None) for each choice this step changed."""
        touched: dict[int, None] = {}
        for commit in update.commits:
            row = commit.row
            self.choices[row].commits[(commit.span, commit.offset)] = (commit.token_id, commit.token)
            touched[row] = None
        changes = []
        for row in touched:
            delta = self._delta(row) if self.plan.streams_text else ""
            snapshot = self._snapshot(row) if self.plan.snapshots else None
            if delta or snapshot is not None:
                changes.append((row, delta, snapshot))
        return changes

    def _delta(self, row: int) -> str:
        choice = self.choices[row]
        prompt = self.plan.prompts[row]
        ids = []
        for offset in range(self.plan.max_tokens):
            commit = choice.commits.get((0, offset))
            if commit is None:
                break
            if offset >= 1 and commit[0] in self.special:  # an end token: dropped, as when rendered
                continue
            ids.append(commit[0])
        text = str(self.tokenizer.decode(ids, clean_up_tokenization_spaces=False))
        if self.plan.kind == "completion" and prompt.endswith(" "):
            text = text.removeprefix(" ")  # the prompt's own space, handed to the fill
        if self.plan.kind == "chat" or not prompt or prompt.endswith("\n"):
            text = text.lstrip(" ")  # a fill at the start of a line carries no leading space
        # Final: what comes before the first stop found, and before the last `hold` characters
        # (a stop may begin there and end in text not yet final: an earlier match than the one
        # found, or the first), without trailing spaces or a partial character.
        final = cut_at_stop(text, self.plan.stops)[0][: max(0, len(text) - self.hold)]
        text = (prompt if self.plan.echo else "") + final.rstrip(" \ufffd")
        if not text.startswith(choice.sent) or len(text) <= len(choice.sent):
            return ""
        delta, choice.sent = text[len(choice.sent) :], text
        return delta

    def _snapshot(self, row: int) -> str:
        commits = self.choices[row].commits
        pieces = []
        for segment in self.plan.documents[row].segments:
            if isinstance(segment, str):
                pieces.append(segment if self.plan.record is not None else "")
                continue
            for offset in range(segment.max_tokens):
                commit = commits.get((segment.index, offset))
                pieces.append(MASKED if commit is None else "" if commit[0] in self.special else commit[1])
        return "".join(pieces)

    def rest(self, row: int, final: str) -> str:
        """The final text not yet sent (all of it if what was sent is not its beginning, which
        the rules above should make impossible: logged)."""
        sent = self.choices[row].sent
        if final.startswith(sent):
            return final[len(sent) :]
        log.warning("streamed prefix %r is not the start of the final answer %r", sent, final)
        return final


class ChunkWriter:
    """OpenAI's chunks for one streamed plan, as `data: {...}` lines."""

    def __init__(self, service: OpenAIService, plan: Plan) -> None:
        self.service = service
        self.plan = plan

    def _base(self) -> dict[str, Any]:
        return {
            "id": self.plan.id,
            "created": self.plan.created,
            "model": self.plan.model,
            "system_fingerprint": self.service.fingerprint,
        }

    def chunk(
        self,
        row: int,
        text: str | None,
        *,
        finish: FinishReason | None = None,
        snapshot: str | None = None,
        step: int | None = None,
        role: bool = False,
    ) -> bytes:
        extras = ChoiceExtras(snapshot=snapshot, step=step) if snapshot is not None else None
        if self.plan.kind == "completion":
            body: Any = Completion(
                choices=[CompletionChoice(index=row, text=text or "", finish_reason=finish, editor=extras)],
                **self._base(),
            )
        else:
            delta = ChatDelta(role="assistant" if role else None, content=text)
            body = ChatCompletionChunk(
                choices=[ChatChunkChoice(index=row, delta=delta, finish_reason=finish, editor=extras)],
                **self._base(),
            )
        return line(dump(body))

    def closing(self, usage: Usage, extras: ResponseExtras) -> bytes:
        """The last chunk, with no choices: `usage` (stream_options.include_usage) and our extras."""
        payload: dict[str, Any] = {"editor": extras} | ({"usage": usage} if self.plan.include_usage else {})
        model: Any = (
            Completion(choices=[], **self._base(), **payload)
            if self.plan.kind == "completion"
            else ChatCompletionChunk(choices=[], **self._base(), **payload)
        )
        return line(dump(model))


_OPTIONAL_KEYS = frozenset({"editor", "usage", "role", "content"})


def dump(body: Any) -> dict[str, Any]:
    """A response model as OpenAI writes it: `finish_reason` and `logprobs` always present (null
    until known), our `editor` extension, `usage` and a delta's `role`/`content` only when set."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not (v is None and k in _OPTIONAL_KEYS)}
        if isinstance(value, list):
            return [clean(item) for item in value]
        return value

    result: dict[str, Any] = clean(body.model_dump(mode="json"))
    return result


def line(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


async def chunks(service: OpenAIService, plan: Plan, job: FillJob, request: str) -> AsyncIterator[bytes]:
    """The stream: a first chunk per choice (the role, for chat), deltas as prefixes become final,
    then each choice's rest and finish_reason, a closing chunk, and `data: [DONE]`."""
    writer = ChunkWriter(service, plan)
    completed = False
    try:
        tracker = PrefixTracker(plan, service.tokenizer())
        for row in range(len(plan.documents)):
            if plan.kind == "chat":
                yield writer.chunk(row, "", role=True)
            elif plan.echo:  # the prompt is final from the start
                tracker.choices[row].sent = plan.prompts[row]
                yield writer.chunk(row, plan.prompts[row])
        async for update in job.steps():
            for row, delta, snapshot in tracker.add(update):
                yield writer.chunk(row, delta, snapshot=snapshot, step=update.step)
        try:
            outcome = await job.result()
            answers = service.answers(plan, outcome)
            for row, answer in enumerate(answers):
                rest = tracker.rest(row, answer.text)
                yield writer.chunk(row, rest, finish=answer.finish_reason)
            yield writer.closing(service.usage(plan, outcome, answers), service.extras(outcome))
        except Exception as error:
            if isinstance(error, OpenAIRequestError):
                _, body, _ = request_error(error)
            else:
                _, body, _ = rewrite(*error_body(error, request=request))
            yield line(body)
        yield line("[DONE]")
        completed = True
    finally:
        if not completed:  # the client went away mid-stream: stop the model at its next step
            job.cancel()


# --------------------------------------------------------------------------- routes

OpenAI = NamedDependency[OpenAIService]
ModelId = Annotated[str, PathParameter(description="the model's id, as GET /v1/models lists it")]
AnyRequest = Request[Any, Any, Any]


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    descriptions = {
        400: "a wrong or unsupported field (named in error.param), or a limit (named in the message)",
        401: "missing or wrong bearer token",
        403: "cross-origin request",
        404: "unknown model",
        413: "the prompt or body is over its size limit",
        415: "the body is not application/json",
        429: "the fill queue is full; see Retry-After",
        503: "the model is not loaded yet, or the server is shutting down; see Retry-After",
        504: "the fill ran past its time budget (fill_timeout_s)",
    }
    return {
        code: ResponseSpec(OpenAIErrorOut, description=descriptions[code], generate_examples=False) for code in codes
    }


FILL_ERRORS = _errors(400, 401, 403, 404, 413, 415, 429, 503, 504)
STREAM_NOTE = (
    "; with stream=true, server-sent events instead: `data: {chunk}` lines, then `data: [DONE]` (docs/openai.md)"
)


class OpenAIController(Controller):
    path = "/v1"
    tags = ("openai",)

    @get("/models", responses=_errors(401))
    async def list_models(self, openai: OpenAI) -> ModelList:
        """The loaded model (empty while it loads). All replicas run the same one."""
        return openai.models()

    @get("/models/{model_id:path}", responses=_errors(401, 404, 503))
    async def read_model(self, openai: OpenAI, model_id: ModelId) -> ModelOut:
        """One model by id (ids may hold slashes, as Hugging Face ids do); 404 for any other."""
        # The path converter keeps one leading slash, and a client quotes an id's own ("/models/a")
        name = openai.worker.model_name
        asked = name if name is not None and model_id.lstrip("/") == name.lstrip("/") else model_id.lstrip("/")
        return openai.model_card(openai.check_model(asked, param="model_id"))

    @post(
        "/completions",
        status_code=HTTP_200_OK,
        responses={
            200: ResponseSpec(Completion, description="the completion" + STREAM_NOTE, generate_examples=False),
            **FILL_ERRORS,
        },
    )
    async def completions(
        self, request: AnyRequest, data: JSONBody[CompletionRequest], openai: OpenAI
    ) -> Response[Any]:
        """The text after `prompt`, or with `suffix` the text between the two (fill in the middle)."""
        return await _answer(request, openai, openai.plan_completion(data), stream=data.stream)

    @post(
        "/chat/completions",
        status_code=HTTP_200_OK,
        responses={
            200: ResponseSpec(ChatCompletion, description="the answer" + STREAM_NOTE, generate_examples=False),
            **FILL_ERRORS,
        },
    )
    async def chat_completions(
        self, request: AnyRequest, data: JSONBody[ChatCompletionRequest], openai: OpenAI
    ) -> Response[Any]:
        """The assistant's answer to `messages`; with response_format json_schema, the schema's
        scaffold filled (valid by construction)."""
        return await _answer(request, openai, openai.plan_chat(data), stream=data.stream)


async def _answer(request: AnyRequest, openai: OpenAIService, plan: Plan, *, stream: bool) -> Response[Any]:
    job = openai.submit(plan, stream=stream)
    if not stream:
        outcome = await until_done(request, job, job.result())
        return Response(openai.body(plan, outcome), status_code=HTTP_200_OK)
    await until_done(request, job, job.wait_started())  # queueing and layout errors are still plain errors
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Stream(chunks(openai, plan, job, request_id(request.scope)), media_type=SSE, headers=headers)


def refine_openapi(openapi: OpenAPI) -> None:
    """The document as the server checks: the streamed answer's media type beside the JSON one,
    and the union fields whose constraints Litestar's generator drops (`stop`, `temperature`)."""
    stop_text = Schema(type=OpenAPIType.STRING, min_length=1, max_length=MAX_STOP_CHARS)
    stop = Schema(
        one_of=[
            stop_text,
            Schema(type=OpenAPIType.ARRAY, items=stop_text, max_items=MAX_STOP),
            Schema(type=OpenAPIType.NULL),
        ],
        description=f"up to {MAX_STOP} strings; the answer ends before the first one found",
    )
    temperature = Schema(
        one_of=[
            Schema(const=0),
            Schema(type=OpenAPIType.NUMBER, minimum=MIN_TEMPERATURE, maximum=2),
            Schema(type=OpenAPIType.NULL),
        ],
        description=f"0 picks the most likely token, else at least {MIN_TEMPERATURE}; default: the model's own",
    )
    schemas = openapi.components.schemas or {}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        request = schemas.get(name)
        if isinstance(request, Schema) and request.properties:
            request.properties["stop"] = stop
            request.properties["temperature"] = temperature
    for path in ("/v1/completions", "/v1/chat/completions"):
        item = (openapi.paths or {}).get(path)
        operation = item.post if item is not None else None
        response = (operation.responses or {}).get("200") if operation is not None else None
        content = getattr(response, "content", None)
        if content is not None:
            content[SSE] = OpenAPIMediaType(
                schema=Schema(
                    type=OpenAPIType.STRING,
                    description="`data: {chunk}` lines (chat.completion.chunk or text_completion objects), "
                    "then `data: [DONE]`",
                )
            )


__all__ = ["OpenAIController", "OpenAIService", "Plan", "PrefixTracker", "refine_openapi"]
