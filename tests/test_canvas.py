"""Canvas layout and rendering (docs/language.md): literal text comes back byte for byte, seams read
naturally, span offsets slice the text, limits and escapes behave. Fills come from tiny random
models (conftest.py); where an outcome must be certain, a logit bias forces it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from editor.canvas import build_canvas, encode, render
from editor.chat import Instruction
from editor.document import Document, DocumentError, MaskSpan
from editor.filling import FillResult, fill_documents
from editor.models import DiffusionModel
from editor.options import SamplerOptions
from editor.parser import parse_document

pytestmark = pytest.mark.usefixtures("tiny_one_thread")


class Biased:
    """A `DiffusionModel` over another one with +value on given (canvas position, token id) logits."""

    def __init__(self, base: DiffusionModel, boosts: dict[tuple[int, int], float]) -> None:
        self.base, self.boosts = base, boosts
        self.name, self.tokenizer, self.special = f"biased({base.name})", base.tokenizer, base.special
        self.logits_shifted, self.vocab_size = base.logits_shifted, base.vocab_size

    @property
    def device(self) -> torch.device:
        return self.base.device

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.base.forward_logits(input_ids, attention_mask).clone()
        for (position, token_id), value in self.boosts.items():
            logits[:, position, token_id] += value
        return logits

    def frame(self, instruction: Instruction | None = None) -> tuple[list[int], list[int]]:
        return self.base.frame(instruction)


def fill_one(model: DiffusionModel, source: str | Document, **options: object) -> FillResult:
    document = parse_document(source) if isinstance(source, str) else source
    values: dict[str, object] = {"temperature": 1.0, "seed": 0, **options}
    return fill_documents(model, [document], SamplerOptions(**values))[0]


def span_start(model: DiffusionModel, source: str, number: int = 0) -> int:
    """Canvas position of a span's first token."""
    tokenizer = model.tokenizer
    canvas = build_canvas(parse_document(source), tokenizer, prefix=model.frame()[0], mask_id=model.special.mask)
    return canvas.spans[number].start


# --------------------------------------------------------------------------- literal text is kept

_LITERAL_CHARS = st.one_of(
    st.sampled_from(list("  \n\t,.;:!?()[]\"'\\-$ab")),
    st.characters(codec="utf-8", exclude_categories=["Cs"]),
)
_LITERAL = st.text(_LITERAL_CHARS, max_size=10).filter(lambda text: "[MASK" not in text)
_LENGTH = st.tuples(st.integers(0, 3), st.integers(1, 4)).map(lambda pair: (min(pair), max(pair)))


@settings(max_examples=40, deadline=None)
@given(
    literals=st.lists(_LITERAL, min_size=2, max_size=4),
    lengths=st.lists(_LENGTH, min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_literal_text_comes_back_byte_for_byte(
    tiny_model: DiffusionModel, literals: list[str], lengths: list[tuple[int, int]], seed: int
) -> None:
    segments: list[str | MaskSpan] = []
    for index, literal in enumerate(literals[:-1]):
        if literal:
            segments.append(literal)
        low, high = lengths[index]
        segments.append(MaskSpan(index=index, min_tokens=low, max_tokens=high))
    if literals[-1]:
        segments.append(literals[-1])
    result = fill_one(tiny_model, Document(tuple(segments)), schedule="random", steps=2, seed=seed)
    text = result.text
    assert len(result.spans) == len(literals) - 1
    end = 0
    for literal, span, (low, high) in zip(literals, result.spans, lengths, strict=False):
        # The documented seam rule: one space before a span is dropped only when the fill brings its own.
        seam = literal.endswith(" ") and not literal.endswith("  ") and span.text[:1].isspace()
        assert text[end : span.start] == (literal[:-1] if seam else literal)
        assert text[span.start : span.end] == span.text
        assert low <= len(span.token_ids) <= high
        decoded = tiny_model.tokenizer.decode(span.token_ids)
        assert span.text in decoded and span.text.strip(" ") == decoded.strip(" ")
        end = span.end
    assert text[end:] == literals[-1]


def test_document_without_spans_is_returned_unchanged(tiny_model: DiffusionModel) -> None:
    source = "Nothing to fill here.\n  Two spaces, a tab\tand ünïcödé ✓."
    result = fill_one(tiny_model, source)
    assert result.text == source and result.spans == [] and result.steps == 0


def test_escaped_mask_stays_literal(tiny_model: DiffusionModel) -> None:
    source = r"Write \[MASK 3] here: [MASK 2]. And \[MASK ok]"
    result = fill_one(tiny_model, source)
    assert len(result.spans) == 1
    assert result.text.startswith("Write [MASK 3] here:")
    assert result.text.endswith(". And [MASK ok]")
    assert result.text.count("[MASK") == 2


# --------------------------------------------------------------------------- seams

DEAR = "Dear [MASK 3],\nKind regards"


def test_space_before_a_span_is_neither_doubled_nor_lost(tiny_model: DiffusionModel) -> None:
    """Over many samples: one space between "Dear" and the fill. The only way to see two is the
    model itself writing a lone space token followed by a spaced one (its own double space)."""
    lone_space = encode(tiny_model.tokenizer, " ")
    results = fill_documents(tiny_model, [parse_document(DEAR)] * 48, SamplerOptions(temperature=1.0, seed=3))
    for result in results:
        span = result.spans[0]
        assert result.text == "Dear" + span.text + ",\nKind regards"
        assert span.text.startswith(" "), "the moved space is lost"
        if span.text.startswith("  "):
            assert span.token_ids[:1] == lone_space


def test_unspaced_first_token_cannot_eat_the_space(tiny_model: DiffusionModel) -> None:
    """Even when the model wants a token without a leading space first, the fill keeps the space."""
    tokenizer = tiny_model.tokenizer
    start = span_start(tiny_model, DEAR)
    unspaced = encode(tokenizer, "xyz")
    biased = Biased(tiny_model, {(start + i, t): 40.0 for i, t in enumerate(unspaced)})
    result = fill_one(biased, DEAR, temperature=0.0)
    assert result.text.startswith("Dear ") and not result.text.startswith("Dear  ")
    assert result.text.endswith("yz,\nKind regards")  # the rest of the bias took effect


def test_spaced_first_token_brings_the_only_space(tiny_model: DiffusionModel) -> None:
    the = encode(tiny_model.tokenizer, " the")
    assert len(the) == 1
    start = span_start(tiny_model, DEAR)
    result = fill_one(Biased(tiny_model, {(start, the[0]): 40.0}), DEAR, temperature=0.0)
    assert result.text.startswith("Dear the") and result.spans[0].text.startswith(" the")
    assert result.spans[0].start == len("Dear")


def test_no_doubled_space_after_a_span(tiny_model: DiffusionModel) -> None:
    """A fill ending in a space token followed by literal text starting with a space: rendering
    drops one (the sampler's `single_spaces`, on by default, keeps such a fill from being chosen)."""
    source = "Hello [MASK 3] world and [MASK 2]\nnext"
    lone_space = encode(tiny_model.tokenizer, " ")[0]
    first = span_start(tiny_model, source, 0)
    biased = Biased(tiny_model, {(first + 2, lone_space): 40.0})
    result = fill_one(biased, source, temperature=0.0, single_spaces=False)
    assert result.spans[0].token_ids[2] == lone_space
    assert result.text[result.spans[0].end :].startswith(" world and")
    assert not result.spans[0].text.endswith(" ")
    assert result.text[result.spans[0].end - 1] != " "


def test_span_at_line_start_has_no_stray_space(tiny_model: DiffusionModel) -> None:
    the = encode(tiny_model.tokenizer, " the")[0]
    for source in ("First line\n[MASK 3] rest", "[MASK 3] at the very start"):
        start = span_start(tiny_model, source)
        result = fill_one(Biased(tiny_model, {(start, the): 40.0}), source, temperature=0.0)
        span = result.spans[0]
        assert span.token_ids[0] == the
        assert span.text.startswith("the")
        assert result.text[: span.start] == source[: source.index("[MASK")]


def test_render_seams_with_chosen_tokens(tiny_tokenizer) -> None:
    """`render` on hand-picked ids: the seam rules without any model."""
    mask = tiny_tokenizer.mask_token_id
    end_ids = (tiny_tokenizer.pad_token_id,)

    def rendered(source: str, fills: list[list[int]]) -> str:
        canvas = build_canvas(parse_document(source), tiny_tokenizer, mask_id=mask)
        ids = list(canvas.ids)
        for layout, fill in zip(canvas.spans, fills, strict=True):
            assert len(fill) == layout.length
            ids[layout.start : layout.start + layout.length] = fill
        return render(canvas, ids, [1.0] * len(ids), tiny_tokenizer, end_ids).text

    def ids(text: str) -> list[int]:
        return encode(tiny_tokenizer, text)

    john = ids(" John")
    assert rendered(f"Dear [MASK {len(john)}],", [john]) == "Dear John,"
    assert rendered(f"Dear [MASK {len(john) - 1}],", [ids("John")]) == "Dear John,"  # unspaced fill keeps the space
    assert rendered("Dear  [MASK 1]!", [ids(",")]) == "Dear  ,!"  # two spaces are literal text, kept
    lone = ids(" ")
    assert rendered("Hi [MASK 3] world", [lone + ids("x") + lone]) == "Hi x world"
    assert rendered("Top\n[MASK 2] rest", [ids(" the") + ids("x")]) == "Top\nthex rest"
    pad = [tiny_tokenizer.pad_token_id]
    assert rendered("A [MASK 1-3] b", [ids(" the") + pad + pad]) == "A the b"
    # A range span the model left empty leaves one space, not two, and none before punctuation.
    assert rendered("A [MASK 0-2] b", [pad + pad]) == "A b"
    assert rendered("Thanks [MASK 0-2], Ann", [pad + pad]) == "Thanks, Ann"
    assert rendered("Thanks [MASK 0-2]Ann", [pad + pad]) == "Thanks Ann"


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ('Pay [MASK 4 as=int must="ten"] now', 'must="ten" is not a valid as=int value'),
        ('A [MASK 4 as=word must="two words"] b', 'must="two words" is not a valid as=word value'),
        ('A [MASK 4 as=json must="say \\"hi\\""] b', "is not a valid as=json value"),
    ],
)
def test_a_must_that_breaks_its_value_class_is_a_document_error(
    tiny_model: DiffusionModel, source: str, problem: str
) -> None:
    with pytest.raises(DocumentError) as raised:
        fill_documents(tiny_model, [parse_document(source)], SamplerOptions(seed=0))
    assert problem in raised.value.message
    assert (raised.value.line, raised.value.column) == (1, source.index("[MASK") + 1)


def test_a_must_that_fits_its_value_class_is_pinned(tiny_model: DiffusionModel) -> None:
    [result] = fill_documents(
        tiny_model, [parse_document('Pay [MASK 4 as=int must="12"@0] now')], SamplerOptions(seed=0)
    )
    assert result.spans[0].text.strip().startswith("12") and result.spans[0].text.strip().isdigit()


# --------------------------------------------------------------------------- limits


def test_canvas_limit_names_the_span_that_crosses_it(tiny_model: DiffusionModel) -> None:
    source = "Hello there, friend.\nSecond line [MASK 5] and [MASK 30] end."
    tokenizer = tiny_model.tokenizer
    prefix = tiny_model.frame()[0]
    full = build_canvas(parse_document(source), tokenizer, prefix=prefix, mask_id=tiny_model.special.mask)
    second = full.spans[1]
    fits = second.start + second.length
    limit = fits - 1
    with pytest.raises(DocumentError) as info:
        fill_documents(tiny_model, [parse_document(source)], SamplerOptions(seed=0), max_canvas_tokens=limit)
    column = source.split("\n")[1].index("[MASK 30]") + 1
    assert (info.value.line, info.value.column) == (2, column)
    assert str(limit) in (info.value.expected or "") and f"line 2, column {column}" in str(info.value)
    # The first span alone fits, so a smaller limit blames the first span instead.
    first = full.spans[0]
    with pytest.raises(DocumentError) as info:
        build_canvas(
            parse_document(source),
            tokenizer,
            prefix=prefix,
            mask_id=tiny_model.special.mask,
            max_canvas_tokens=first.start + first.length - 1,
        )
    assert (info.value.line, info.value.column) == (2, source.split("\n")[1].index("[MASK 5]") + 1)
    # Exactly the canvas length is allowed; one less (the tail no longer fits) is an error.
    assert fill_documents(tiny_model, [parse_document(source)], SamplerOptions(seed=0), max_canvas_tokens=len(full.ids))
    with pytest.raises(DocumentError) as info:
        build_canvas(
            parse_document(source),
            tokenizer,
            prefix=prefix,
            mask_id=tiny_model.special.mask,
            max_canvas_tokens=len(full.ids) - 1,
        )
    assert info.value.line >= 1 and info.value.column >= 1 and str(len(full.ids) - 1) in (info.value.expected or "")


def test_a_must_word_cannot_be_extended_by_the_next_token(tiny_model: DiffusionModel) -> None:
    """`must="refund"` must read as the word refund, never "refundant": the position after the
    pinned word only allows tokens that do not start with a letter or digit; it also holds when the
    model strongly prefers such a continuation."""
    from editor.constraints import VocabularyRules
    from editor.filling import prepare_canvas

    tokenizer = tiny_model.tokenizer
    document = parse_document('We will [MASK 6 must="refund"@1] soon.')
    canvas = prepare_canvas(tiny_model, document)  # the canvas the fill below will run on
    layout = canvas.spans[0]
    after = layout.start + max(layout.pinned) + 1
    assert canvas.rules[after].after_word and not canvas.rules[after + 1].after_word
    vocabulary = VocabularyRules(tokenizer, tiny_model.vocab_size, set(), tiny_model.special.end_ids)
    allowed = vocabulary.mask(canvas.rules[after])
    assert allowed.any()
    assert not any(bool(allowed[i]) for i, text in enumerate(vocabulary.texts) if text[:1].isalnum())
    letters = [i for i, text in enumerate(vocabulary.texts) if text[:1].isalpha()]
    biased = Biased(tiny_model, {(after, letters[0]): 50.0})
    [result] = fill_documents(biased, [document], SamplerOptions(seed=1))
    assert result.spans[0].token_ids[max(layout.pinned) + 1] != letters[0]
    assert "refund" in result.spans[0].text


@pytest.mark.parametrize(
    ("text", "body", "first", "whole"),
    [
        ("5", True, True, True),
        ("1,234", True, True, True),
        ("5.", False, False, False),  # a separator at a token's edge only at a slot (test_batch)
        (".", False, False, False),
        (",5", False, False, False),  # never the start of a number
        ("-", False, True, False),
        ("-5", False, True, True),
        (",,", False, False, False),  # never two separators in one token
        ("...", False, False, False),
        ("1.2.3", False, False, False),
        ("", False, False, False),
    ],
)
def test_number_tokens_start_with_a_digit_and_bring_one_separator_at_most(
    text: str, body: bool, first: bool, whole: bool
) -> None:
    from editor.constraints import token_allowed

    assert [token_allowed(text, "number", place) for place in ("body", "first", "whole")] == [body, first, whole]
