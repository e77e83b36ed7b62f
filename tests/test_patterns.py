"""Structured outputs (issue 20): `re=` spans, numeric ranges and the JSON Schema keywords, valid
whatever order the sampler commits in. Fills come from the tiny random model (conftest.py), which
writes anything it is allowed to: only the masks keep the fills matching."""

from __future__ import annotations

import itertools
import json
import random
import re
from decimal import Decimal
from typing import Any

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from editor.batch.runner import BatchFiller, read_input
from editor.batch.schema import SchemaError, template_from_schema
from editor.constraints import VocabularyRules
from editor.document import DocumentError
from editor.filling import fill_documents, prepare_canvas, vocabulary_rules
from editor.models import DiffusionModel
from editor.options import SamplerOptions
from editor.parser import parse_document, render_document
from editor.patterns import SpanConstraint, automaton_for
from editor.regexes import FORMATS, PatternError, checked_pattern, compile_fsm, number_pattern

pytestmark = pytest.mark.usefixtures("tiny_one_thread")

SCHEDULES = ("confidence", "random", "left-to-right", "blocks", "threshold")


def options(schedule: str, seed: int, **extra: Any) -> SamplerOptions:
    return SamplerOptions(seed=seed, schedule=schedule, candidates=1, **extra)


# --------------------------------------------------------------------------- the automaton's masks


class SmallVocabulary(VocabularyRules):
    """A vocabulary of a few tokens (the last is the end token), small enough to enumerate fills."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.vocab_size = len(texts)
        self.end_ids = (len(texts) - 1,)
        self.banned = {len(texts) - 1}


SMALL = SmallVocabulary(["1", "2", "-", "a", "12", " 1", "b", " ", "<end>"])


@pytest.mark.parametrize("pattern", [r"\d-?\d", r"a\d+|b", r"(12)+-?", r"1?2?"])
@pytest.mark.parametrize("joins_space", [False, True])
def test_masks_allow_exactly_the_tokens_some_completion_accepts(pattern: str, joins_space: bool) -> None:
    """Against every fill of a 4-token span ([MASK 1-4]): a token is allowed at a masked offset
    exactly when some choice of the other masked offsets makes a matching fill."""
    constraint = SpanConstraint(0, 4, 1, joins_space, automaton_for((pattern,), SMALL))
    end = SMALL.end_ids[0]
    rng = random.Random(0)
    for _ in range(60):
        tokens = [rng.randrange(len(SMALL.texts) - (1 if offset < 1 else 0)) for offset in range(4)]
        masked = [rng.random() < 0.6 for _ in range(4)]
        free = [offset for offset in range(4) if masked[offset]]
        if not free:
            continue
        allowed = constraint.allowed(tokens, masked, free)
        for row, offset in enumerate(free):
            for token in range(len(SMALL.texts)):
                if token == end and offset < 1:
                    continue
                fill = list(tokens)
                fill[offset] = token
                want = _completable(fill, [m and o != offset for o, m in enumerate(masked)], pattern, joins_space)
                assert bool(allowed[row, token]) == want, (tokens, masked, offset, SMALL.texts[token])


def _completable(tokens: list[int], masked: list[bool], pattern: str, joins_space: bool) -> bool:
    others = [o for o in range(len(tokens)) if masked[o]]
    for choice in itertools.product(range(len(SMALL.texts)), repeat=len(others)):
        fill = list(tokens)
        for o, t in zip(others, choice, strict=True):
            fill[o] = t
        if fill[0] == SMALL.end_ids[0]:
            continue  # offset 0 is required ([MASK 1-4])
        text = "".join(SMALL.texts[t] for t in fill if t != SMALL.end_ids[0])
        if joins_space and text.startswith(" "):
            text = text[1:]  # the literal's space, as rendering puts it back
        if re.fullmatch(pattern, text):
            return True
    return False


# --------------------------------------------------------------------------- re= fills

PATTERNS = [
    (r"\d{3}-\d{4}", "3-12"),
    (r"[A-Z]{2}\d{2,4}", "2-10"),
    (r"(yes|no|maybe)", "1-6"),
    (r"[a-z]+( [a-z]+)?", "1-8"),
    (r"\d+(\.\d\d)?", "1-8"),
    (r"(19|20)\d\d-(0[1-9]|1[0-2])", "4-12"),
    (r"#[0-9a-f]{6}", "2-10"),
    (r"[A-Z][a-z]*, [A-Z]{2}", "3-12"),
    (r"(ab|ba)+c?", "1-9"),
    (r"v\d+\.\d+\.\d+", "4-12"),
]


@pytest.mark.parametrize(("pattern", "length"), PATTERNS[:4])
def test_every_fill_matches_for_every_schedule(tiny_model: DiffusionModel, pattern: str, length: str) -> None:
    document = parse_document(f'Ref: [MASK {length} re="{pattern}" name=v] and [MASK 2].')
    for schedule in SCHEDULES:
        for seed in range(3):
            result = fill_documents(tiny_model, [document], options(schedule, seed, temperature=1.0))[0]
            assert re.fullmatch(pattern, result.spans[0].text), (schedule, seed, result.text)
            assert result.text.startswith("Ref: " + result.spans[0].text + " and")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=st.sampled_from(PATTERNS),
    schedule=st.sampled_from(SCHEDULES),
    seed=st.integers(0, 2**31),
    temperature=st.sampled_from([0.0, 1.0]),
    before=st.sampled_from(["Code: ", "Code:", "(", "\n", ""]),
    steps=st.sampled_from([None, 2, 3]),
)
def test_property_every_fill_matches(
    tiny_model: DiffusionModel,
    case: tuple[str, str],
    schedule: str,
    seed: int,
    temperature: float,
    before: str,
    steps: int | None,
) -> None:
    """Any pattern, schedule (several commits a step included), seed, seam and step budget."""
    pattern, length = case
    document = parse_document(f'{before}[MASK {length} re="{pattern}"] end.')
    opts = options(schedule, seed, temperature=temperature, steps=steps)
    result = fill_documents(tiny_model, [document], opts)[0]
    assert re.fullmatch(pattern, result.spans[0].text), (pattern, schedule, result.text)


@pytest.mark.parametrize("candidates", [1, 3])
def test_judged_candidates_and_cuts_keep_pattern_fills_whole(tiny_model: DiffusionModel, candidates: int) -> None:
    """Candidates are judged, mixed per span and cut at sentence ends: none of that may cut or
    change a pattern span (spans that end a line, or the document, after a sentence stop)."""
    source = 'Note: [MASK 2-12 re="[A-Z][a-z]+\\. [a-z]+ ok"]\nNext: [MASK 3-10 re="(ab\\. )+x"]'
    for seed in range(3):
        opts = SamplerOptions(seed=seed, candidates=candidates, temperature=1.0)
        result = fill_documents(tiny_model, [parse_document(source)], opts)[0]
        first, second = result.spans
        assert re.fullmatch(r"[A-Z][a-z]+\. [a-z]+ ok", first.text), result.text
        assert re.fullmatch(r"(ab\. )+x", second.text), result.text


def test_must_words_stay_inside_the_pattern(tiny_model: DiffusionModel) -> None:
    source = 'Order [MASK 3-8 re="[A-Z]{2}-\\d+" must="7"] now and [MASK 4 re="(ab)+" must="ab"@2].'
    for schedule in SCHEDULES[:3]:
        for seed in range(2):
            result = fill_documents(tiny_model, [parse_document(source)], options(schedule, seed))[0]
            first, second = result.spans
            assert re.fullmatch(r"[A-Z]{2}-\d+", first.text) and "7" in first.text, result.text
            assert re.fullmatch(r"(ab)+", second.text), result.text


def test_several_re_options_must_all_match(tiny_model: DiffusionModel) -> None:
    document = parse_document('Id [MASK 2-10 re="[a-z0-9]+" re=".*\\d.*" re=".{3,5}"].')
    for seed in range(4):
        text = fill_documents(tiny_model, [document], options("random", seed))[0].spans[0].text
        assert re.fullmatch(r"[a-z0-9]{3,5}", text) and re.search(r"\d", text), text


# --------------------------------------------------------------------------- numeric ranges


@pytest.mark.parametrize(
    ("tag", "low", "high", "integer"),
    [
        ("[MASK 1-4 as=int min=2 max=400]", 2, 400, True),
        ("[MASK 1-4 as=int min=-15 max=-3]", -15, -3, True),
        ("[MASK 1-6 as=number min=0 max=5]", 0, 5, False),
        ("[MASK 1-6 as=number min=-1.5 max=2.25]", Decimal("-1.5"), Decimal("2.25"), False),
    ],
)
def test_numeric_ranges_hold_for_every_schedule(
    tiny_model: DiffusionModel, tag: str, low: Decimal, high: Decimal, integer: bool
) -> None:
    document = parse_document(f"Pick {tag} now.")
    syntax = r"-?(0|[1-9]\d*)" if integer else r"-?(0|[1-9]\d*)(\.\d+)?"
    for schedule in SCHEDULES:
        for seed in range(2):
            text = fill_documents(tiny_model, [document], options(schedule, seed, temperature=1.0))[0].spans[0].text
            assert re.fullmatch(syntax, text) and text not in ("-0",), text
            assert low <= Decimal(text) <= high, text


@settings(max_examples=300, deadline=None)
@given(
    integer=st.booleans(),
    low=st.none() | st.decimals(-1000, 1000, places=2),
    high=st.none() | st.decimals(-1000, 1000, places=2),
    low_open=st.booleans(),
    high_open=st.booleans(),
    value=st.decimals(-1200, 1200, places=3),
)
def test_range_patterns_match_exactly_the_numbers_in_range(
    integer: bool, low: Decimal | None, high: Decimal | None, low_open: bool, high_open: bool, value: Decimal
) -> None:
    try:
        pattern = number_pattern(integer, low, high, exclusive_minimum=low_open, exclusive_maximum=high_open)
    except PatternError:
        assume_empty = low is not None and high is not None and (low > high or low == high or integer)
        assert assume_empty
        return
    for text in {format(value, "f"), format(value.normalize(), "f"), str(int(value))}:
        canonical = re.fullmatch(r"-?(0|[1-9]\d*)" + ("" if integer else r"(\.\d+)?"), text) and not re.fullmatch(
            r"-0(\.0*)?", text
        )
        inside = canonical and (
            (low is None or Decimal(text) > low or (Decimal(text) == low and not low_open))
            and (high is None or Decimal(text) < high or (Decimal(text) == high and not high_open))
        )
        assert bool(re.fullmatch(pattern, text)) == bool(inside), (pattern, text)


# --------------------------------------------------------------------------- errors before running


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ('[MASK 3 re="(a)\\1"]', "back-references"),
        ('[MASK 3 re="a(?=b)"]', "lookahead"),
        ('[MASK 3 re="a(?<!b)"]', "lookbehind"),
        ('[MASK 3 re="a\\bb"]', "word boundaries"),
        ('[MASK 3 re="a|^b"]', "anchors"),
        ('[MASK 3 re="(ab"]', "invalid regular expression"),
        ("[MASK 3 min=2]", "needs as=int or as=number"),
        ("[MASK 3 as=int min=5 max=2]", "no integer lies between 5 and 2"),
        ('[MASK 3 as=int re="1"]', "re= cannot be combined with as="),
        ('[MASK choice="a|b" re="a"]', "cannot be combined"),
    ],
)
def test_bad_patterns_are_document_errors_at_the_tag(source: str, message: str) -> None:
    with pytest.raises(DocumentError) as caught:
        parse_document("Hello " + source)
    assert message in str(caught.value) and caught.value.line == 1


def test_a_span_too_short_or_long_for_the_pattern_names_the_lengths_that_fit(tiny_model: DiffusionModel) -> None:
    with pytest.raises(DocumentError, match=r"re= needs \d+ to \d+ tokens here"):
        prepare_canvas(tiny_model, parse_document('A [MASK 1 re="\\d{3}-\\d{4}"] b'))
    with pytest.raises(DocumentError, match=r"re= needs 1 tokens here|re= needs 1 to \d tokens here"):
        prepare_canvas(tiny_model, parse_document('A [MASK 9 re="x"] b'))
    with pytest.raises(DocumentError, match="no fill matches the pattern with these must words"):
        prepare_canvas(tiny_model, parse_document('A [MASK 4 re="\\d+" must="ab"@0] b'))


def test_patterns_render_back_to_the_same_document() -> None:
    source = 'A [MASK 2-9 name=x re="[a-z\\"]+" re="\\d"] [MASK 1-3 as=number min=-0.5 max=10] z'
    document = parse_document(source)
    again = parse_document(render_document(document))
    assert render_document(again) == render_document(document)
    assert [s.patterns for s in again.spans] == [s.patterns for s in document.spans]
    assert (again.spans[1].minimum, again.spans[1].maximum) == ("-0.5", "10")
    assert document.spans[0].patterns == ('[a-z"]+', "\\d")


def test_anchors_at_the_edges_and_code_escapes_are_accepted() -> None:
    assert checked_pattern(r"^\d+$") == r"\d+"
    assert checked_pattern(r"\A[a-z]\Z") == "[a-z]"
    fsm = compile_fsm(checked_pattern(r"caf\u00e9 [\u00e0-\u00ff]"))
    assert fsm.accepts("café à") and not fsm.accepts("cafe a")


# --------------------------------------------------------------------------- JSON Schema

GREEDY = SamplerOptions(seed=0, candidates=1)


def fill_schema(model: DiffusionModel, schema: dict[str, Any], count: int, **kwargs: Any) -> list[Any]:
    template = template_from_schema(json.dumps(schema)).compile(view=kwargs.pop("view", "prose"))
    filler = BatchFiller(model, template, kwargs.pop("options", GREEDY), batch_size=4)
    lines = [json.dumps({"id": n}) for n in range(count)]
    results = [r.to_dict() for r in filler.fill(read_input(lines, max_chars=10_000))]
    for result in results:
        assert result["error"] is None, result
    return [result["output"] for result in results]


KEYWORD_SCHEMAS: dict[str, dict[str, Any]] = {
    "minimum/maximum": {"type": "integer", "minimum": 1, "maximum": 5},
    "exclusiveMinimum/exclusiveMaximum": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "pattern": {"type": "string", "pattern": "^[A-Z]{3}-\\d{2}$"},
    "pattern (unanchored)": {"type": "string", "pattern": "\\d\\d", "maxLength": 6},
    "format date": {"type": "string", "format": "date"},
    "format date-time": {"type": "string", "format": "date-time"},
    "format time": {"type": "string", "format": "time"},
    "format email": {"type": "string", "format": "email", "maxLength": 20},
    "format uuid": {"type": "string", "format": "uuid"},
    "format ipv4": {"type": "string", "format": "ipv4"},
    "minLength/maxLength": {"type": "string", "minLength": 3, "maxLength": 5},
    "nullable": {"type": ["string", "null"], "maxLength": 4},
    "enum of scalars": {"enum": [1, "two", None, True, 2.5]},
    "anyOf": {"anyOf": [{"type": "integer", "minimum": 10, "maximum": 20}, {"type": "boolean"}]},
    "$defs/$ref": {"$defs": {"d": {"type": "integer", "maximum": -2}}, "$ref": "#/$defs/d"},
    "nested objects and arrays": {
        "type": "object",
        "properties": {
            "a": {
                "type": "array",
                "minItems": 2,
                "items": {
                    "type": "object",
                    "properties": {"b": {"type": "null"}, "c": {"type": "integer", "maximum": 3}},
                },
            }
        },
    },
}


@pytest.mark.parametrize("keyword", list(KEYWORD_SCHEMAS))
def test_each_schema_keyword_holds(tiny_model: DiffusionModel, keyword: str) -> None:
    value = dict(KEYWORD_SCHEMAS[keyword])
    schema = {"type": "object", "properties": {"v": value}, "required": ["v"]}
    if "$defs" in value:  # a $ref points into the root schema
        schema["$defs"] = value.pop("$defs")
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    for view in ("prose", "json"):
        for seed, schedule in enumerate(("random", "confidence")):
            opts = SamplerOptions(seed=seed, schedule=schedule, temperature=1.0, candidates=1)
            for output in fill_schema(tiny_model, schema, 2, options=opts, view=view):
                checker.validate(output)
                if keyword.startswith("format"):
                    name = keyword.split()[1]
                    assert re.fullmatch(FORMATS[name], output["v"]), output


def test_unsupported_keywords_and_recursion_are_named_with_their_place() -> None:
    with pytest.raises(SchemaError) as caught:
        template_from_schema(json.dumps({"type": "object", "properties": {"a": {"type": "string", "not": {}}}}))
    assert "not at #/properties/a" in str(caught.value)
    with pytest.raises(SchemaError, match="uniqueItems at #/properties/b/anyOf/0"):
        template_from_schema(
            json.dumps({"properties": {"b": {"anyOf": [{"type": "array", "uniqueItems": True}, {"type": "null"}]}}})
        )
    with pytest.raises(SchemaError, match="recursive"):
        template_from_schema(
            json.dumps({"$defs": {"n": {"properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"})
        )
    with pytest.raises(SchemaError, match="format"):
        template_from_schema(json.dumps({"type": "string", "format": "hostname"}))
    with pytest.raises(SchemaError, match="lookahead"):
        template_from_schema(json.dumps({"type": "string", "pattern": "a(?=b)"}))


# A generator of random schemas from the supported subset.


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    kinds = ["string", "integer", "number", "boolean", "enum", "nullable", "anyOf", "pattern", "format"]
    if depth < 2:
        kinds += ["object", "array"]
    kind = rng.choice(kinds)
    if kind == "string":
        shortest = rng.randint(0, 3)
        return {"type": "string", "minLength": shortest, "maxLength": shortest + rng.randint(1, 6)}
    if kind in ("integer", "number"):
        schema: dict[str, Any] = {"type": kind}
        low: float = rng.randint(-50, 50) if kind == "integer" else round(rng.uniform(-5, 5), 2)
        schema["exclusiveMinimum" if rng.random() < 0.3 else "minimum"] = low
        if rng.random() < 0.7:
            schema["maximum"] = low + rng.randint(1, 500)
        return schema
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["a", "b c", 1, 2.5, None, True, False], rng.randint(1, 4))}
    if kind == "nullable":
        inner = rng.choice(["string", "integer", "boolean"])
        return {"type": [inner, "null"]}
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, 2), random_schema(rng, 2)]}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[a-z]{2,4}$", "^\\d{3}$", "^(red|green)$", "x"])}
    if kind == "format":
        return {"type": "string", "format": rng.choice(list(FORMATS))}
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": low, "maxItems": low + 1}
    properties = {f"k{n}": random_schema(rng, depth + 1) for n in range(rng.randint(1, 3))}
    return {"type": "object", "properties": properties, "required": list(properties)}


def test_random_schemas_always_validate(tiny_model: DiffusionModel) -> None:
    rng = random.Random(20)
    checked = 0
    for number in range(12):
        # "n" keeps a span in the template whatever "v" is (an array of 0 items or a one-value
        # enum has nothing to fill).
        properties = {"v": random_schema(rng), "n": {"type": "integer", "minimum": 0}}
        schema = {"type": "object", "properties": properties, "required": ["v", "n"]}
        try:
            template_from_schema(json.dumps(schema))
        except SchemaError as error:
            assert "two alternatives" in str(error)  # the one refusal the subset allows
            continue
        validator = jsonschema.Draft202012Validator(
            schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        )
        opts = SamplerOptions(seed=number, schedule=SCHEDULES[number % 5], temperature=1.0, candidates=1)
        for output in fill_schema(tiny_model, schema, 2, options=opts, view="json" if number % 2 else "prose"):
            validator.validate(output)
            checked += 1
    assert checked >= 16


def test_index_is_built_once_per_pattern_and_vocabulary(tiny_model: DiffusionModel) -> None:
    vocabulary = vocabulary_rules(tiny_model)
    first = automaton_for((r"[a-z]+\d",), vocabulary)
    assert automaton_for((r"[a-z]+\d",), vocabulary) is first
    assert first.class_next.shape[0] < len(vocabulary.texts)  # tokens share classes
    assert torch.equal(first.finals, automaton_for((r"[a-z]+\d",), vocabulary).finals)
