"""Batch JSON template filling: templates and schemas, the runner (grouping, out-of-memory
splits, per-record errors), and `editor batch` as users run it, including `--resume` after the
process was killed with SIGKILL."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from click.testing import CliRunner

from editor.batch.runner import (
    BatchFiller,
    ResultWriter,
    json_number_rules,
    read_done_ids,
    read_input,
    run_records,
)
from editor.batch.schema import SchemaError, template_from_schema
from editor.batch.template import VIEWS, RecordError, Template, TemplateError, View
from editor.canvas import SpanFill, build_canvas, render
from editor.cli import main
from editor.filling import fill_documents, vocabulary_rules
from editor.models import load_model
from editor.models.base import DiffusionModel
from editor.options import SamplerOptions
from editor.parser import parse_document, render_document

pytestmark = pytest.mark.usefixtures("tiny_one_thread")

TEMPLATE = {
    "id": "{id}",
    "title": "Product: {name}",
    "description": "A [MASK 3] item for {user.name}",
    "quantity": "[MASK 2 as=int]",
    "in_stock": '[MASK choice="true|false"]',
    "size": '[MASK choice="small|large"]',
    "tags": ["[MASK 2 name=tag]", "fixed {{braces}}"],
    "version": 2,
    "note": None,
}
GREEDY = SamplerOptions(schedule="threshold", steps=3)


def lines_of(records: list[Any]) -> list[str]:
    return [r if isinstance(r, str) else json.dumps(r) for r in records]


def fill(
    model: DiffusionModel | OutOfMemoryOverTwoRows, template: Template, records: list[Any], **kwargs: Any
) -> list[dict[str, Any]]:
    filler = BatchFiller(
        model,
        template,
        kwargs.pop("options", GREEDY),
        batch_size=kwargs.pop("batch_size", 4),
    )
    return [r.to_dict() for r in filler.fill(read_input(lines_of(records), max_chars=10_000))]


def shown(template: Template, record: dict[str, Any]) -> str:
    """What the model sees of a record: its document, tags written out."""
    return render_document(template.render(record).document)


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize("view", VIEWS)
def test_outputs_keep_the_structure_substitute_and_escape_record_values(tiny_model: DiffusionModel, view: View) -> None:
    template = Template.parse(json.dumps(TEMPLATE), view=view)
    tricky = 'say "hi" \\ [MASK 3] {x}\n'
    records: list[dict[str, Any]] = [
        {"id": 7, "name": tricky, "user": {"name": "Ann"}},
        {"custom_id": "b", "id": "x", "name": "Shirt", "user": {"name": "Bo"}},
    ]
    results = fill(tiny_model, template, records)
    assert [r["custom_id"] for r in results] == ["7", "b"]
    for result, record in zip(results, records, strict=True):
        assert result["error"] is None
        output: dict[str, Any] = json.loads(json.dumps(result["output"]))
        assert list(output) == list(TEMPLATE)
        assert output["id"] == record["id"]  # a string that is exactly one placeholder keeps the value's type
        assert output["title"] == "Product: " + record["name"]  # substituted as literal text, [MASK and all
        assert output["description"].startswith("A ") and output["description"].endswith(
            " item for " + record["user"]["name"]
        )
        assert type(output["quantity"]) is int
        assert type(output["in_stock"]) is bool
        assert output["size"] in ("small", "large")
        assert output["tags"][1] == "fixed {braces}"
        assert (output["version"], output["note"]) == (2, None)
        assert set(result["spans"]) == {"$.description", "$.quantity", "$.in_stock", "$.size", "tag"}
        assert all(0.0 <= s["confidence"] <= 1.0 for s in result["spans"].values())


def test_template_mistakes_name_the_json_path() -> None:
    cases = {
        '{"a": {"b": ["ok [MASK 2]", "[MASK x]"]}}': "$.a.b[1]: line 1, column 7",
        '{"a": "{b"}': "$.a: a lone '{'",
        '{"a": "{not a name}"}': "$.a: {not a name} is not a field name",
        '{"a": "[MASK 2]", "a": 1}': "the key 'a' appears twice",
        '{"a": 1,}': "$: not valid JSON",
        '{"a": "no masks"}': "no [MASK ...] tag",
        '{"a": "[MASK 2 name=x]", "b": "[MASK 2 name=x]"}': "$.b: two spans are named 'x'",
    }
    for text, message in cases.items():
        with pytest.raises(TemplateError) as caught:
            Template.parse(text)
        assert message in str(caught.value), text


def test_bad_lines_and_missing_fields_become_error_lines(tiny_model: DiffusionModel) -> None:
    template = Template.parse('{"name": "{name}", "text": "[MASK 2]"}')
    long_name = "word " * 3000
    records = ["not json", "[1, 2]", {"id": "a"}, {"id": "b", "name": "ok"}, {"id": "b", "name": "again"}]
    records += [{"name": long_name}]
    results = fill(tiny_model, template, records)
    codes = [r["error"] and r["error"]["code"] for r in results]
    assert codes == ["invalid_json", "invalid_record", "missing_field", None, "duplicate_id", "too_long"]
    assert results[0]["custom_id"] == "1" and results[3]["output"]["name"] == "ok"
    assert "name" in results[2]["error"]["message"]


class OutOfMemoryOverTwoRows:
    """A model that runs out of device memory on more than two rows at once."""

    def __init__(self, model: DiffusionModel) -> None:
        self._model = model
        self.widest = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        self.widest = max(self.widest, input_ids.shape[0])
        return self._model.forward_logits(input_ids, attention_mask)


def test_a_batch_that_runs_out_of_memory_is_split_not_lost(tiny_model: DiffusionModel) -> None:
    model = OutOfMemoryOverTwoRows(tiny_model)
    template = Template.parse('{"id": "{id}", "text": "[MASK 3]"}')
    results = fill(model, template, [{"id": n} for n in range(7)], batch_size=7)
    assert [r["custom_id"] for r in results] == [str(n) for n in range(7)]
    assert all(r["error"] is None for r in results)
    assert model.widest == 2


def test_records_of_different_lengths_are_grouped_and_each_row_keeps_its_budget(tiny_model: DiffusionModel) -> None:
    template = Template.parse('{"name": "{name}", "text": "[MASK 4]", "n": "[MASK 1-3 as=int]"}')
    records = [{"name": "x" * (n * 7 % 40)} for n in range(9)]
    results = fill(tiny_model, template, records, batch_size=3)
    assert [r["output"]["name"] for r in results] == [r["name"] for r in records]  # input order
    assert all(r["error"] is None and type(r["output"]["n"]) is int for r in results)


# --------------------------------------------------------------------------- schemas

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["name", "size", "flag", "count", "available", "tags", "kind", "dims"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 12, "minLength": 2, "description": "a short product name"},
        "size": {"enum": ["S", "M", "L"]},
        "flag": {"enum": ["true", "false"]},
        "count": {"type": "integer"},
        "available": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 2, "maxItems": 4},
        "kind": {"const": "product [MASK 1] {x}"},
        "dims": {"type": "object", "properties": {"w": {"type": "integer"}, "unit": {"type": "string"}}},
        "none": {"type": "null"},
    },
}


def test_schema_outputs_validate_against_the_schema(tiny_model: DiffusionModel) -> None:
    derived = template_from_schema(json.dumps(SCHEMA))
    assert derived.instruction is not None and "$.name: a short product name" in derived.instruction
    template = derived.compile()
    results = fill(tiny_model, template, [{"id": n} for n in range(5)])
    for result in results:
        assert result["error"] is None, result
        jsonschema.validate(result["output"], SCHEMA)
        assert len(result["output"]["tags"]) == 2  # the minimum when minItems and maxItems differ
        assert result["output"]["kind"] == "product [MASK 1] {x}"


def test_unsupported_schema_keywords_are_named_with_their_place() -> None:
    schema = {
        "type": "object",
        "properties": {
            "sku": {"type": "string", "contentEncoding": "base64"},
            "n": {"type": "integer", "multipleOf": 3},
        },
    }
    with pytest.raises(SchemaError) as caught:
        template_from_schema(json.dumps(schema))
    assert "contentEncoding at #/properties/sku" in str(caught.value)
    assert "multipleOf at #/properties/n" in str(caught.value)
    with pytest.raises(SchemaError, match="type"):
        template_from_schema('{"type": ["string", "tuple"]}')


# --------------------------------------------------------------------------- the command


def write_inputs(directory: Path, count: int, *, span: str = "[MASK 3]") -> tuple[Path, Path]:
    template = directory / "template.json"
    template.write_text(json.dumps({"id": "{id}", "text": span, "n": "[MASK 2 as=int]"}), encoding="utf-8")
    records = directory / "records.jsonl"
    records.write_text("".join(json.dumps({"id": f"r{n}"}) + "\n" for n in range(count)), encoding="utf-8")
    return template, records


def test_cli_writes_one_line_per_input_and_a_summary(tiny_model_dir: Path, tmp_path: Path) -> None:
    template, records = write_inputs(tmp_path, 5)
    with records.open("a") as stream:
        stream.write("{broken\n")
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(
        main, ["batch", str(template), str(records), "-o", str(out), "--model", str(tiny_model_dir), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == [f"r{n}" for n in range(5)] + ["6"]
    assert lines[-1]["error"]["code"] == "invalid_json"
    assert all(set(line) == {"custom_id", "output", "spans", "error"} for line in lines)
    assert "done 5, failed 1 (invalid_json: 1)" in result.stderr and "records/s" in result.stderr


def test_cli_reports_a_template_error_with_its_path_before_running(tmp_path: Path) -> None:
    template = tmp_path / "t.json"
    template.write_text('{"a": ["[MASK 0]"]}')
    result = CliRunner().invoke(main, ["batch", str(template), "-", "-o", "-"], input="{}\n")
    assert result.exit_code != 0
    assert "$.a[0]" in result.stderr


def test_cli_schema_and_stdin_to_stdout(tiny_model_dir: Path, tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}}))
    result = CliRunner().invoke(
        main,
        ["batch", "--schema", str(schema), "-", "-o", "-", "--model", str(tiny_model_dir), "--no-progress"],
        input='{"id": "a"}\n{"id": "b"}\n',
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [type(line["output"]["ok"]) for line in lines] == [bool, bool]


def test_resume_after_sigkill_gives_exactly_one_line_per_input(tiny_model_dir: Path, tmp_path: Path) -> None:
    count = 20
    # Long spans filled one token per step make each record slow enough to kill the run mid-way.
    template, records = write_inputs(tmp_path, count, span="[MASK 24]")
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "editor", "batch", str(template), str(records), "-o", str(out)]
    command += ["--model", str(tiny_model_dir), "--device", "cpu", "--no-progress", "--batch-size", "1"]
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*command, "--steps", "24"], env=environment, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.01)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    written = out.read_bytes().count(b"\n")
    assert 4 <= written < count
    resumed = subprocess.run(
        [*command, "--steps", "24", "--resume"], env=environment, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {written} " in resumed.stderr
    ids = [json.loads(line)["custom_id"] for line in out.read_text().splitlines()]
    assert ids == [f"r{n}" for n in range(count)]


def test_a_line_cut_short_by_a_crash_is_dropped_and_redone(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"custom_id": "a", "output": {}, "spans": {}, "error": null}\n{"custom_id": "b", "outp')
    assert read_done_ids(out) == {"a"}
    assert out.read_bytes().endswith(b"null}\n")


def test_run_records_skips_done_ids_and_appends(tiny_model: DiffusionModel, tmp_path: Path) -> None:
    template = Template.parse('{"id": "{id}", "t": "[MASK 2]"}')
    records = read_input([json.dumps({"id": n}) for n in range(6)], max_chars=1000)
    filler = BatchFiller(tiny_model, template, GREEDY, batch_size=2)
    out = tmp_path / "out.jsonl"
    with out.open("wb") as stream:
        run_records(filler, records[:3], ResultWriter(stream))
    with out.open("ab") as stream:
        summary = run_records(filler, records, ResultWriter(stream), done_ids=read_done_ids(out))
    assert (summary.skipped, summary.done) == (3, 3)
    assert [json.loads(line)["custom_id"] for line in out.read_text().splitlines()] == [str(n) for n in range(6)]


def span_fill(index: int, text: str, start: int) -> SpanFill:
    return SpanFill(
        index=index, name=None, start=start, end=start + len(text), text=text, token_ids=[1], confidence=0.5
    )


def test_number_spans_become_json_numbers_or_an_error_line() -> None:
    template = Template.parse('{"price": "[MASK 3 as=number]", "n": "[MASK 2 as=int]"}', view="json")
    document = template.render({})
    price, n = len('{"price": '), len('{"price": ') + 3 + len(', "n": ')
    for text, value in ((" 25", 25), (" 3.5", 3.5), ("-7", -7), ("1250", 1250)):
        output, _ = document.build([span_fill(0, text, price - 1), span_fill(1, "12", n)])
        assert output == {"price": value, "n": 12} and type(output["price"]) is type(value)
    for text in ("1,250", "05", "1.2.3", "1.", "-", ""):  # only a pinned must could still spell these
        with pytest.raises(RecordError) as caught:
            document.build([span_fill(0, text, price), span_fill(1, "12", n)])
        assert caught.value.code == "invalid_value" and "$.price" in caught.value.message
    with pytest.raises(RecordError, match=r"\$\.n"):
        document.build([span_fill(0, "2", price), span_fill(1, "2.5", n)])


@pytest.fixture(scope="module")
def bundled_model() -> DiffusionModel:
    """The bundled tiny model: trained on English, so unlike the random test model it reads context."""
    return load_model("tiny", device="cpu", dtype=torch.float32)


# --------------------------------------------------------------------------- number guarantees

TEXT_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")  # docs/language.md: no "1,,2", ",5", "5," or lone "-"
JSON_VALUE = {"int": re.compile(r"-?[1-9]\d*"), "number": re.compile(r"-?[1-9]\d*(?:\.\d+)?")}


@pytest.mark.parametrize("which", ["tiny_model", "bundled_model"])  # two vocabularies' digit tokens
def test_number_rules_hold_in_any_commit_order_with_any_optional_positions_dropped(
    request: pytest.FixtureRequest, which: str
) -> None:
    """Every token a position's mask allows, drawn at random for every position (the sampler
    commits positions in any order, so each is drawn independently of the others; optional ones
    may take the end token and be dropped): `as=number` text is always a number, and a template's
    number value always a JSON number. Separators are drawn too, so the rules are not just digits."""
    model: DiffusionModel = request.getfixturevalue(which)
    rules, tokenizer, end_ids = vocabulary_rules(model), model.tokenizer, model.special.end_ids
    rng = random.Random(0)
    drawn: dict[tuple[bool, str], int] = {}
    for _ in range(1500):
        low = rng.randint(1, 9)
        high, kind, as_json = rng.randint(low, 10), rng.choice(["int", "number"]), rng.random() < 0.5
        source = rng.choice(["Price: ", "Price $"]) + f"[MASK {low}-{high} as={kind}] now"
        canvas = build_canvas(parse_document(source), tokenizer, mask_id=model.special.mask)
        if as_json:
            canvas = json_number_rules(canvas, frozenset({0}))
        layout, ids = canvas.spans[0], list(canvas.ids)
        for offset in rng.sample(range(layout.length), layout.length):
            allowed = rules.mask(canvas.rules[layout.start + offset]).nonzero().flatten().tolist()
            ids[layout.start + offset] = rng.choice(allowed)
        text = render(canvas, ids, [1.0] * len(ids), tokenizer, end_ids).spans[0].text.lstrip(" ")
        pattern = JSON_VALUE[kind] if as_json else TEXT_NUMBER
        assert pattern.fullmatch(text), (source, as_json, text)
        for mark in ".,":
            drawn[as_json, mark] = drawn.get((as_json, mark), 0) + (mark in text)
    assert drawn[False, "."] and drawn[False, ","] and drawn[True, "."] and not drawn[True, ","]


NUMBER_SCHEMA = {
    "type": "object",
    "properties": {"price": {"type": "number"}, "count": {"type": "integer"}, "name": {"type": "string"}},
}


@pytest.mark.parametrize("schedule", ["random", "confidence", "threshold"])
def test_schema_numbers_are_json_numbers_for_every_seed_and_schedule(tiny_model: DiffusionModel, schedule: str) -> None:
    template = template_from_schema(json.dumps(NUMBER_SCHEMA)).compile()
    fixed = Template.parse('{"price": "[MASK 6 as=number]", "n": "[MASK 3-5 as=int]"}')  # room for a point
    records = [{"id": n, "name": f"item {n}"} for n in range(6)]
    for seed in range(4):
        options = SamplerOptions(schedule=schedule, steps=3, temperature=1.0, seed=seed)
        for result in fill(tiny_model, template, records, options=options) + fill(
            tiny_model, fixed, records, options=options
        ):
            assert result["error"] is None, result
            for key, span in result["spans"].items():
                if key != "$.name":
                    assert JSON_VALUE["number"].fullmatch(span["text"].strip()), (key, span["text"])
            if "price" in result["output"] and "name" in result["output"]:
                jsonschema.validate(result["output"], NUMBER_SCHEMA)


@pytest.mark.parametrize("schedule", ["random", "confidence", "threshold"])
def test_as_number_text_is_a_number_for_every_seed_and_schedule(tiny_model: DiffusionModel, schedule: str) -> None:
    source = (
        "Refund of $[MASK 3 as=number], then [MASK 1-6 as=number] and: [MASK 7 as=number] or [MASK 9-12 as=number]."
    )
    for seed in range(4):
        options = SamplerOptions(schedule=schedule, steps=4, temperature=1.0, seed=seed)
        for result in fill_documents(tiny_model, [parse_document(source)] * 4, options):
            for span in result.spans:
                assert TEXT_NUMBER.fullmatch(span.text.lstrip(" ")), span.text


# --------------------------------------------------------------------------- what the model sees

PRODUCT = {"id": "p1", "name": "running shoes", "brand": "Northwind", "material": "mesh"}


def test_the_prose_view_shows_labels_and_values_and_rebuilds_the_json(tiny_model: DiffusionModel) -> None:
    template_text = json.dumps(
        {
            "title": "{brand} {name}",
            "key_feature": "[MASK 3]",
            "price_eur": "[MASK 1-3 as=int]",
            "size": '[MASK choice="small|large"]',
            "dims": {"inStock": '[MASK choice="true|false"]'},
            "tags": ["[MASK 2]", "fixed"],
        }
    )
    prose = shown(Template.parse(template_text), PRODUCT | {"name": "running\nshoes"})
    assert prose.splitlines() == [
        "Material: mesh",  # what the record says beyond the template's fields (its id: never)
        "Title: Northwind running shoes",  # the record's newline is a space on the canvas
        "Key feature: [MASK 3 as=json]",
        "Price (EUR): [MASK 1-3 as=int]",
        'Size: [MASK choice="small|large"]',
        "Dims:",
        '  In stock: [MASK choice="true|false"]',
        "Tags:",
        "  - [MASK 2 as=json]",
        "  - fixed",
    ]
    assert "key_feature" not in prose and "{" not in prose and '"title"' not in prose
    assert shown(Template.parse(template_text, view="json"), PRODUCT).startswith(
        'Record: {"material": "mesh"}\n\n{"title": "Northwind running shoes"'
    )
    [result] = fill(tiny_model, Template.parse(template_text), [PRODUCT | {"name": "running\nshoes"}])
    output = result["output"]
    assert list(output) == ["title", "key_feature", "price_eur", "size", "dims", "tags"]
    assert output["title"] == "Northwind running\nshoes"  # the output keeps the record's own text
    assert output["size"] in ("small", "large")  # the label's space is not part of the value
    assert type(output["price_eur"]) is int and type(output["dims"]["inStock"]) is bool
    assert output["tags"][1] == "fixed" and not output["key_feature"].startswith(" ")


@pytest.mark.parametrize("view", VIEWS)
def test_the_schema_path_shows_each_record_above_the_fields(bundled_model: DiffusionModel, view: View) -> None:
    template = template_from_schema(json.dumps({"type": "object", "properties": {"tagline": {"type": "string"}}}))
    compiled = template.compile(view=view)
    other = {"id": "p2", "name": "wool scarf", "brand": "Acme", "material": "merino"}
    first, second = shown(compiled, PRODUCT), shown(compiled, other)
    for record, text in ((PRODUCT, first), (other, second)):
        for key in ("name", "brand", "material"):
            assert record[key] in text.split("[MASK")[0]  # before the span the model fills
        assert record["id"] not in text  # an id says nothing the model could write about
    if view == "prose":
        assert first.startswith("Name: running shoes\nBrand: Northwind\nMaterial: mesh\nTagline: [MASK")
    records = [PRODUCT, other, PRODUCT | {"id": "p3", "name": "rain jacket", "material": "nylon"}]
    outputs = [r["output"]["tagline"] for r in fill(bundled_model, compiled, records, options=GREEDY)]
    assert len(set(outputs)) == 3, outputs  # the record shapes the fill (the same seed for all)
