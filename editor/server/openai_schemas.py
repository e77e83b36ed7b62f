"""Request and response bodies of the OpenAI-compatible API under /v1 (docs/openai.md).

Requests forbid unknown fields, so a field we do not implement is a 400 that names it. A few
OpenAI fields are listed here only so that their no-op value (null, 0, {} or []: what clients
such as LangChain send by default) is accepted; any other value is a 400 naming the field
(`editor.server.openai_api.refuse_unsupported`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from editor.options import MIN_PROBABILITY, SamplerOptions

MAX_STOP = 4  # stop sequences, as OpenAI allows
MAX_STOP_CHARS = 200


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EditorOptions(SamplerOptions):
    """Our own sampler options (`extra_body={"editor": {...}}` in the SDK). `temperature`, `top_p`
    and `seed` may be given here or at the top level of the request, not both."""

    snapshots: bool = Field(
        False,
        strict=True,
        description="streaming: also send a chunk per sampler step whose choices carry `editor.snapshot`, the "
        "fill as it is denoised (masked tokens shown as ░)",
    )
    view: Literal["prose", "json"] = Field(
        "prose",
        description="json_schema answers: how the model sees the schema's fields: one 'Label: value' line each "
        "(prose), or the JSON text (json); the answer is JSON either way",
    )

    def sampler_options(self, **given: Any) -> SamplerOptions:
        values = self.model_dump(exclude={"snapshots", "view"}, exclude_unset=True)
        return SamplerOptions(**(values | given))


class StreamOptions(_Request):
    include_usage: bool = Field(False, strict=True, description="a last chunk with `usage` and no choices")


StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None


class _Common(_Request):
    """Fields both routes share."""

    model: str = Field(description="the id from GET /v1/models")
    n: int = Field(1, ge=1, le=128, description="choices to return (at most the server's max_choices in all)")
    max_tokens: int | None = Field(None, ge=1, description="the answer's tokens at most (it may end earlier)")
    temperature: float | None = Field(
        None, ge=0, le=2, description="0 picks the most likely token; default: the model's own sampler default"
    )
    top_p: float | None = Field(None, ge=MIN_PROBABILITY, le=1, description="nucleus sampling mass")
    seed: int | None = Field(None, ge=0, lt=2**63, description="fixes the answer (also reported in `editor.seed`)")
    stop: Stop = Field(None, description=f"up to {MAX_STOP} strings; the answer ends before the first one found")
    stream: bool = Field(False, strict=True, description="answer with server-sent chunks (docs/openai.md)")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="an end-user id; accepted and not used")
    editor: EditorOptions | None = Field(None, description="our own sampler options (docs/sampler.md)")
    # Accepted only as their no-op value (see the module docstring).
    logit_bias: dict[str, Any] | None = Field(None, description="not supported: only null or {}")
    presence_penalty: float | None = Field(None, description="not supported: only null or 0")
    frequency_penalty: float | None = Field(None, description="not supported: only null or 0")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Common):
    """POST /v1/completions: the text that follows `prompt` (and, with `suffix`, comes before it)."""

    prompt: str | list[str] = Field(description="literal text (no mask tags), or a list of them")
    suffix: str | None = Field(None, description="fill in the middle: the completion goes between prompt and suffix")
    echo: bool = Field(False, strict=True, description="the prompt and then the completion")
    max_tokens: int | None = Field(None, ge=1, description="the completion's tokens at most (default 16)")
    logprobs: int | None = Field(None, description="not supported: only null")
    best_of: int | None = Field(None, description="not supported: only null or 1")


class TextPart(_Request):
    type: str = Field(description="only 'text' is supported")
    text: str | None = None
    model_config = ConfigDict(extra="allow")  # image parts and the like are refused by name, not by shape


class ChatMessageIn(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256, description="accepted; not shown to the model")


class JsonSchemaFormat(_Request):
    name: str = Field(max_length=64, description="the answer format's name (not shown to the model)")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="a JSON Schema (docs/batch.md lists the keywords)")
    strict: bool | None = Field(None, description="accepted either way: every answer is valid by construction")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_Common):
    """POST /v1/chat/completions: the assistant's answer to `messages`."""

    messages: list[ChatMessageIn] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens")
    response_format: ResponseFormat | None = None
    logprobs: bool | None = Field(None, description="not supported: only null or false")
    top_logprobs: int | None = Field(None, description="not supported: only null")
    tools: list[Any] | None = Field(None, description="not supported: only null or []")
    tool_choice: Any = Field(None, description="not supported: only null or 'none'")
    parallel_tool_calls: bool | None = Field(None, description="not supported: only null")


# --------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int = Field(description="canvas tokens outside the answer: the frame, prompt, suffix, scaffold")
    completion_tokens: int = Field(description="the answers' tokens, all choices together")
    total_tokens: int


class ChoiceExtras(BaseModel):
    """Our additions to a choice (ignored by OpenAI clients)."""

    snapshot: str | None = Field(None, description="streaming with editor.snapshots: the fill so far")
    step: int | None = None


class ResponseExtras(BaseModel):
    """Our additions to a response: what reproduces it."""

    seed: int = Field(description="the seed used; pass it back to reproduce the answer")
    steps: int
    options: SamplerOptions


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None
    editor: ChoiceExtras | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    editor: ResponseExtras | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage
    editor: ResponseExtras | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None
    editor: ChoiceExtras | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    editor: ResponseExtras | None = None


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, ...")
    param: str | None = Field(description="the request field at fault, if one is")
    code: str | None


class OpenAIErrorOut(BaseModel):
    """Every /v1 error, in OpenAI's shape."""

    error: OpenAIErrorDetail


__all__ = [
    "MAX_STOP",
    "MAX_STOP_CHARS",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatDelta",
    "ChatMessageIn",
    "ChatMessageOut",
    "ChoiceExtras",
    "Completion",
    "CompletionChoice",
    "CompletionRequest",
    "EditorOptions",
    "JsonSchemaFormat",
    "ModelList",
    "ModelOut",
    "OpenAIErrorOut",
    "ResponseExtras",
    "ResponseFormat",
    "StreamOptions",
    "Usage",
]
