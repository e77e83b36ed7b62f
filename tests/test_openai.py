"""The OpenAI-compatible API (/v1, docs/openai.md) with the official `openai` client against a live
uvicorn server on loopback with the tiny model: models, completions with a suffix, `n`, chat,
json_schema answers validated with `jsonschema`, streams equal to plain answers, and each error
as the client's exception class."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI

from editor.models.base import DiffusionModel
from tests.api_fixtures import SlowModel, make_settings
from tests.fuzz.harness import serve_in_thread

pytest_plugins = ("tests.api_fixtures",)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The SDK's overloads want its TypedDicts for messages; the tests pass plain dicts, as users do.
Client = Any

PRODUCT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24, "description": "the product's name"},
        "price": {"type": "number"},
        "stock": {"type": "integer"},
        "colour": {"enum": ["red", "green", "blue"]},
        "available": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 2},
        "kind": {"const": "shoe"},
    },
    "required": ["name", "price", "stock", "colour", "available", "tags", "kind"],
    "additionalProperties": False,
}


@contextmanager
def live(tmp_path: Path, model_dir: Path, model: Any, **overrides: Any) -> Iterator[str]:
    settings = make_settings(tmp_path, model_dir, **({"max_steps": 256, "fill_timeout_s": 60} | overrides))
    served = serve_in_thread(settings, model)
    base = next(served)
    try:
        yield base
    finally:
        next(served, None)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, api_model_dir: Path, api_model: DiffusionModel) -> Iterator[str]:
    with live(tmp_path_factory.mktemp("openai"), api_model_dir, api_model) as base:
        yield base


@pytest.fixture(scope="module")
def client(server: str) -> Client:
    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(client: Client) -> str:
    return client.models.list().data[0].id


def test_models_lists_the_loaded_model_and_finds_it_by_id(client: Client, api_model: DiffusionModel) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [api_model.name]
    assert models[0].object == "model" and models[0].owned_by == "editor"
    assert client.models.retrieve(api_model.name).id == api_model.name
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.body["param"] == "model_id"  # type: ignore[index]


def test_completion_fills_between_prompt_and_suffix(client: Client, model_id: str) -> None:
    prompt, suffix = "The cat sat on the ", " and then it slept."
    answer = client.completions.create(model=model_id, prompt=prompt, suffix=suffix, max_tokens=6, seed=3)
    (choice,) = answer.choices
    assert answer.object == "text_completion" and answer.model == model_id
    assert answer.id.startswith("cmpl-") and answer.created > 0 and answer.system_fingerprint
    assert choice.text.strip() and choice.finish_reason in ("stop", "length")
    assert answer.usage is not None
    assert 1 <= answer.usage.completion_tokens <= 6
    assert answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    again = client.completions.create(model=model_id, prompt=prompt, suffix=suffix, max_tokens=6, seed=3)
    assert again.choices[0].text == choice.text  # the seed fixes it
    extras = answer.model_extra["editor"]
    assert extras["seed"] == 3 and extras["steps"] >= 1


def test_max_tokens_is_an_upper_bound_and_length_is_reported(client: Client, model_id: str) -> None:
    for seed in range(4):
        answer = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=3, seed=seed)
        assert answer.usage is not None and 1 <= answer.usage.completion_tokens <= 3
        expected = "length" if answer.usage.completion_tokens == 3 else "stop"
        assert answer.choices[0].finish_reason == expected


def test_n_and_a_list_of_prompts_give_one_choice_each_in_order(client: Client, model_id: str) -> None:
    prompts = ["Roses are red,", "The weather today is"]
    answer = client.completions.create(
        model=model_id, prompt=prompts, n=2, max_tokens=4, temperature=1.0, seed=11, echo=True
    )
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    for number, choice in enumerate(answer.choices):
        assert choice.text.startswith(prompts[number // 2])  # echo: the prompt, then the completion
    assert answer.usage is not None
    single = client.completions.create(model=model_id, prompt=prompts[0], max_tokens=4)
    assert single.usage is not None
    assert (
        answer.usage.prompt_tokens
        == single.usage.prompt_tokens
        + client.completions.create(model=model_id, prompt=prompts[1], max_tokens=4).usage.prompt_tokens
    )  # each prompt counted once, not once per choice


def test_the_prompt_is_literal_text_even_with_mask_tags(client: Client, model_id: str) -> None:
    prompt = "Write [MASK 3] and {braces} here:"
    answer = client.completions.create(model=model_id, prompt=prompt, max_tokens=2, echo=True, seed=1)
    text = answer.choices[0].text
    assert text.startswith(prompt) and "[MASK" not in text[len(prompt) :]
    assert answer.usage is not None and answer.usage.completion_tokens <= 2


def test_stop_cuts_the_completion_before_the_stop_sequence(client: Client, model_id: str) -> None:
    plain = client.completions.create(model=model_id, prompt="Numbers:", max_tokens=8, seed=5).choices[0]
    stop = plain.text.strip()[2:4] or plain.text.strip()[:1]
    cut = client.completions.create(model=model_id, prompt="Numbers:", max_tokens=8, seed=5, stop=[stop]).choices[0]
    assert cut.text == plain.text[: plain.text.find(stop)]
    assert cut.finish_reason == "stop"


def test_chat_answers_the_messages(client: Client, model_id: str) -> None:
    answer = client.chat.completions.create(
        model=model_id,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        ],
        max_completion_tokens=5,
        n=2,
        seed=4,
    )
    assert answer.object == "chat.completion" and len(answer.choices) == 2
    for choice in answer.choices:
        assert choice.message.role == "assistant"
        assert isinstance(choice.message.content, str) and choice.message.content.strip()
        assert choice.finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.completion_tokens <= 10


@pytest.mark.parametrize("view", ["prose", "json"])
def test_json_schema_answers_are_valid_against_the_schema(client: Client, model_id: str, view: str) -> None:
    for seed in range(3):
        answer = client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "Describe a product."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "product", "schema": PRODUCT_SCHEMA, "strict": True},
            },
            seed=seed,
            temperature=1.0,
            extra_body={"editor": {"view": view}},  # how the model sees the fields; JSON comes back either way
        )
        content = answer.choices[0].message.content
        assert content is not None
        value = json.loads(content)
        jsonschema.validate(value, PRODUCT_SCHEMA)
        assert value["kind"] == "shoe" and len(value["tags"]) == 2
        assert answer.choices[0].finish_reason == "stop"


def test_the_sdks_parse_helper_gets_its_pydantic_model_back(client: Client, model_id: str) -> None:
    """`client.chat.completions.parse` sends a strict json_schema made from a pydantic model
    (titles, required, additionalProperties false) and parses the answer into the model. (Nested
    models and Enum classes come as $defs/$ref, which the schema code refuses by name for now.)"""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Order(BaseModel):
        item: str = Field(description="what was ordered", max_length=40)
        quantity: int
        size: Literal["small", "large"]
        gift: bool
        notes: list[str] = Field(min_length=1, max_length=1)

    completion = client.chat.completions.parse(
        model=model_id, messages=[{"role": "user", "content": "One order, please."}], response_format=Order, seed=8
    )
    order = completion.choices[0].message.parsed
    assert isinstance(order, Order) and order.size in ("small", "large") and len(order.notes) == 1
    jsonschema.validate(json.loads(completion.choices[0].message.content), Order.model_json_schema())


def test_json_object_answers_are_a_json_object(client: Client, model_id: str) -> None:
    answer = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Reply in JSON."}],
        response_format={"type": "json_object"},
        max_tokens=8,
        seed=2,
    )
    value = json.loads(answer.choices[0].message.content or "")
    assert isinstance(value, dict) and isinstance(value["answer"], str)


def test_a_schema_keyword_the_schema_code_refuses_is_a_400_naming_it(client: Client, model_id: str) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "dependentSchemas": {}}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    error = caught.value.body
    assert error["param"] == "response_format.json_schema.schema"  # type: ignore[index]
    assert "dependentSchemas" in error["message"] and "#/properties/a" in error["message"]  # type: ignore[index]


def _stream_text(chunks: Any, kind: str) -> tuple[dict[int, str], dict[int, str], list[Any]]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    seen = []
    for chunk in chunks:
        seen.append(chunk)
        for choice in chunk.choices:
            piece = choice.text if kind == "completion" else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + piece
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, seen


@pytest.mark.parametrize("schedule", ["left-to-right", "confidence"])
def test_a_stream_adds_up_to_the_plain_answer(client: Client, model_id: str, schedule: str) -> None:
    extra = {"editor": {"schedule": schedule}}
    arguments: dict[str, Any] = {"model": model_id, "prompt": "A list of fruit:", "max_tokens": 12, "seed": 9, "n": 2}
    arguments["echo"] = schedule == "confidence"  # the prompt comes first, then the completion
    plain = client.completions.create(**arguments, extra_body=extra)
    texts, reasons, chunks = _stream_text(
        client.completions.create(**arguments, stream=True, extra_body=extra), "completion"
    )
    assert texts == {c.index: c.text for c in plain.choices}
    assert reasons == {c.index: c.finish_reason for c in plain.choices}
    if schedule == "left-to-right":  # the final prefix grows token by token, not all at the end
        assert sum(1 for chunk in chunks for choice in chunk.choices if choice.text) > 4

    messages = [{"role": "user", "content": "Say something."}]
    plain_chat = client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=10, seed=9, extra_body=extra
    )
    stream = client.chat.completions.create(
        model=model_id,
        messages=messages,
        max_tokens=10,
        seed=9,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    texts, reasons, chunks = _stream_text(stream, "chat")
    assert texts == {0: plain_chat.choices[0].message.content}
    assert reasons == {0: plain_chat.choices[0].finish_reason}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == plain_chat.usage


def test_a_stream_never_sends_text_from_a_stop_sequence_on(client: Client, model_id: str) -> None:
    extra = {"editor": {"schedule": "left-to-right"}}
    arguments: dict[str, Any] = {"model": model_id, "prompt": "Some words:", "max_tokens": 16, "seed": 4}
    text = client.completions.create(**arguments, extra_body=extra).choices[0].text
    for stop in (text[6:9], text[10:11]):  # a stop sequence that the fill writes, longer and shorter
        assert stop and stop in text
        plain = client.completions.create(**arguments, stop=[stop, "never written here"], extra_body=extra)
        assert plain.choices[0].text == text[: text.find(stop)] and plain.choices[0].finish_reason == "stop"
        stream = client.completions.create(
            **arguments, stop=[stop, "never written here"], extra_body=extra, stream=True
        )
        texts, reasons, _ = _stream_text(stream, "completion")
        assert texts == {0: plain.choices[0].text} and reasons == {0: "stop"}


def test_a_json_schema_stream_ends_with_the_plain_answer_and_snapshots_show_the_steps(
    client: Client, model_id: str
) -> None:
    arguments: dict[str, Any] = {
        "model": model_id,
        "messages": [{"role": "user", "content": "A product please."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PRODUCT_SCHEMA}},
        "seed": 21,
    }
    plain = client.chat.completions.create(**arguments)
    stream = client.chat.completions.create(**arguments, stream=True, extra_body={"editor": {"snapshots": True}})
    texts, _, chunks = _stream_text(stream, "chat")
    assert texts == {0: plain.choices[0].message.content}
    snapshots = [
        c.choices[0].model_extra["editor"]["snapshot"]
        for c in chunks
        if c.choices and c.choices[0].model_extra.get("editor")
    ]
    assert len(snapshots) >= 2
    assert snapshots[0].count("░") > snapshots[-1].count("░")  # masks give way to tokens step by step


def test_unsupported_fields_are_400s_naming_them(client: Client, model_id: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"logprobs": True}, "logprobs"),
        ({"extra_body": {"functions": []}}, "functions"),
        ({"extra_body": {"editor": {"schedule": "sideways"}}}, "editor.schedule"),
        ({"temperature": 0.001}, "temperature"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=model_id, messages=messages, **extra)
        body = caught.value.body
        assert body["param"] == param, body  # type: ignore[index]
        assert body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model_id, prompt="x", logprobs=2)
    assert caught.value.body["param"] == "logprobs"  # type: ignore[index]
    # What clients send by default is accepted: the no-op values.
    client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=2, logit_bias={}, presence_penalty=0, tools=[]
    )


def test_limits_unknown_models_and_tool_messages_are_refused(client: Client, model_id: str) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")
    assert not_found.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as too_many:
        client.completions.create(model=model_id, prompt="x", max_tokens=100_000)
    assert too_many.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as tool:
        client.chat.completions.create(
            model=model_id,
            messages=[{"role": "tool", "content": "42", "tool_call_id": "t"}],
        )
    assert tool.value.body["param"] in ("messages.0.tool_call_id", "messages[0].role")  # type: ignore[index]


def test_auth_size_queue_and_shutdown_errors_are_the_clients_exception_classes(
    tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel
) -> None:
    slow = SlowModel(api_model, delay=0.05)
    with live(tmp_path, api_model_dir, slow, api_token="s3cret", queue_size=1, max_document_chars=200) as base:
        wrong = OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as unauthorized:
            wrong.models.list()
        assert unauthorized.value.status_code == 401 and unauthorized.value.body["type"] == "authentication_error"  # type: ignore[index]
        client: Client = OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0, timeout=60)
        name = client.models.list().data[0].id
        with pytest.raises(openai.APIStatusError) as too_large:
            client.completions.create(model=name, prompt="x" * 300)
        assert too_large.value.status_code == 413 and too_large.value.body["param"] == "prompt"  # type: ignore[index]

        # One long fill runs and one waits (other options: it cannot join the running batch), so
        # the queue (size 1) is full and the next request is a 429.
        def long_fill(steps: int) -> None:
            httpx.post(
                f"{base}/v1/completions",
                json={"model": name, "prompt": "x", "max_tokens": 60, "editor": {"steps": steps}},
                headers={"Authorization": "Bearer s3cret"},
                timeout=120,
            )

        threads = [threading.Thread(target=long_fill, args=(steps,)) for steps in (60, 59)]
        for thread in threads:
            thread.start()
            time.sleep(0.5)
        with pytest.raises(openai.RateLimitError) as busy:
            client.completions.create(model=name, prompt="y", max_tokens=2)
        assert int(busy.value.response.headers["Retry-After"]) >= 1
        slow.delay = 0
        for thread in threads:
            thread.join(60)


def test_shutting_down_is_a_503(tmp_path: Path, api_model_dir: Path, api_model: DiffusionModel) -> None:
    settings = make_settings(tmp_path, api_model_dir)
    from editor.server import create_app
    from editor.server.worker import ModelWorker

    worker = ModelWorker(settings, loader=lambda: api_model)
    from litestar.testing import TestClient

    with TestClient(create_app(settings, worker=worker)) as test_client:
        assert worker.wait_ready(10)
        name = test_client.get("/v1/models").json()["data"][0]["id"]
        worker.shut_down()
        response = test_client.post("/v1/completions", json={"model": name, "prompt": "x"})
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert response.json()["error"]["type"] == "service_unavailable_error"
        transport: Any = test_client  # an httpx client on the app, without a socket
        client: Client = OpenAI(
            base_url="http://testserver.local/v1", api_key="x", http_client=transport, max_retries=0
        )
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(model=name, prompt="x")
        assert caught.value.status_code == 503


def test_the_openapi_document_lists_the_v1_routes(server: str) -> None:
    paths = httpx.get(f"{server}/schema/openapi.json").json()["paths"]
    for path in ("/v1/models", "/v1/models/{model_id}", "/v1/completions", "/v1/chat/completions"):
        assert path in paths
    streamed = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(streamed) == {"application/json", "text/event-stream"}


def test_a_conversation_goes_through_the_chat_template_or_the_plain_framing(tiny_model: Any) -> None:
    from editor.chat import ChatMessage, Conversation, plain_framing
    from editor.models.native import NativeDiffusionModel

    talk = Conversation((ChatMessage("system", "Be brief."), ChatMessage("user", "Hi [MASK 2]")))
    tokenizer = tiny_model.tokenizer
    prefix, suffix = tiny_model.frame(talk)  # the tiny tokenizer has no chat template
    assert not tiny_model.use_chat_template
    assert prefix[0] == tiny_model.special.bos and suffix == []
    assert tokenizer.decode(prefix[1:]) == plain_framing(talk.messages)
    assert plain_framing(talk.messages) == "System: Be brief.\n\nUser: Hi [MASK 2]\n\nAssistant:"

    templated = copy.deepcopy(tokenizer)
    templated.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    chat_model = NativeDiffusionModel(
        tiny_model.network, templated, tiny_model.special, logits_shifted=False, name="chat", use_chat_template=True
    )
    prefix, _ = chat_model.frame(talk)
    assert templated.decode(prefix) == "<system>Be brief.\n<user>Hi [MASK 2]\n<assistant>"
    single, _ = chat_model.frame("Fill it in.")  # an instruction is still one user turn
    assert templated.decode(single) == "<user>Fill it in.\n<assistant>"


class CharTokenizer:
    """One token per character (id = code point), 0 the end token: every prefix state shows up."""

    all_special_ids = (0,)

    def decode(self, ids: list[int], clean_up_tokenization_spaces: bool = False) -> str:
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("order", ["left-to-right", "right-to-left", "shuffled"])
@pytest.mark.parametrize(
    ("written", "stops"),
    [
        ("sunny day.\nUser: and more", ["\nUser:", "\nSystem:"]),  # a stop shorter than the longest
        ("ab cd ef gh", ["d e", "zzzzzzzzzz"]),
        ("trailing spaces   ", []),
        ("stop at the very end!!", ["!!"]),
    ],
)
def test_streamed_prefixes_add_up_to_the_answer_in_any_commit_order(order: str, written: str, stops: list[str]) -> None:
    import random

    from editor.document import Document, MaskSpan
    from editor.options import SamplerOptions
    from editor.server.openai_api import Plan, PrefixTracker, cut_at_stop
    from editor.server.worker import CommitInfo, StepUpdate

    length = len(written) + 3  # the span's tail: end tokens, dropped
    ids = [ord(ch) for ch in written] + [0] * 3
    plan = Plan(
        kind="completion",
        model="m",
        documents=[Document(("Say: ", MaskSpan(0, 1, length)))],
        prompts=["Say:"],
        suffix="",
        options=SamplerOptions(candidates=1),
        stops=stops,
        max_tokens=length,
    )
    offsets = list(range(length))
    if order == "right-to-left":
        offsets.reverse()
    elif order == "shuffled":
        random.Random(3).shuffle(offsets)
    tracker = PrefixTracker(plan, CharTokenizer())
    sent = ""
    for step, offset in enumerate(offsets):
        commit = CommitInfo(0, 0, None, offset, offset, ids[offset], chr(ids[offset]), 0.5)
        for _, delta, _ in tracker.add(StepUpdate(step, [commit], length - step - 1)):
            sent += delta
    final = cut_at_stop(written.rstrip(" "), stops)[0]  # the rendered span sheds trailing spaces
    assert final.startswith(sent)  # nothing sent is ever taken back
    assert sent + tracker.rest(0, final) == final
    if order == "left-to-right" and final.strip():
        assert sent  # text arrives before the end
