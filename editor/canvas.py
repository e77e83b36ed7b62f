"""Document + tokenizer → token canvas, and committed tokens → filled text.

Literal segments and pinned words are tokenized on their own. A single space that ends a literal
right before a span is moved into the span (BPE vocabularies carry the space on the next word's
token); when the fill does not start with a space it is put back, so seams never double or lose
a space. Literal text in the output is the document's own text, byte for byte.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from editor.constraints import Place, PositionRule, number_slot, token_allowed
from editor.document import Document, DocumentError, MaskSpan, Must
from editor.patterns import SpanConstraint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# After an empty `[MASK a-b]` fill, text starting with one of these needs no space before it.
_CLOSES_EMPTY_SEAM = (" ", "\n", "\t", ",", ".", ";", ":", "!", "?", ")")


@dataclass(frozen=True)
class SpanLayout:
    span: MaskSpan
    start: int  # canvas position of the span's first token
    length: int  # canvas positions the span holds
    min_tokens: int  # positions from here on may hold the pad/end token and are dropped
    pinned: Mapping[int, int]  # offset inside the span -> token id (must words, a chosen option)
    joins_space: bool  # the literal before ended in a space that now belongs to the span
    choice: str | None = None  # the option chosen for a `choice=` span
    line_start: bool = False  # the span starts a line: its fill carries no leading whitespace
    single_line: bool = False  # text shares its line or paragraph: the fill holds no newline


@dataclass
class Canvas:
    """One row of the sampler's input: ids over the frame + document, with what is pinned."""

    document: Document
    ids: list[int]
    pinned: list[bool]
    rules: list[PositionRule]
    spans: list[SpanLayout]
    literals: list[str]  # literal text between spans as written; len(spans) + 1 pieces
    constraints: tuple[SpanConstraint, ...] = ()  # the pattern spans' automata (editor.patterns)

    @property
    def masked_positions(self) -> list[int]:
        return [i for i, fixed in enumerate(self.pinned) if not fixed]


class SpanAlternative(BaseModel):
    """Another candidate's fill of a span (judged candidates, `SamplerOptions.candidates`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str
    token_ids: list[int]
    score: float = Field(description="the judge's score of the whole document with this fill (higher is better)")

    @field_serializer("score")
    def _rounded(self, score: float) -> float:
        return round(score, 6)


class SpanFill(BaseModel):
    """One span's result: the one type used from the sampler's rendering through storage to the API."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(description="the span's 0-based index in the document")
    name: str | None = Field(description="the span's name=, if it has one")
    start: int = Field(description="character offset of the fill in the filled text")
    end: int = Field(description="character offset just past the fill")
    text: str
    token_ids: list[int]
    confidence: float = Field(description="mean probability of the sampled tokens")
    alternatives: list[SpanAlternative] = Field(
        default_factory=list,
        description="what the other judged candidates wrote here (distinct texts, best first); empty for one candidate",
    )

    @field_serializer("confidence")
    def _rounded(self, confidence: float) -> float:
        return round(confidence, 6)


@dataclass(frozen=True)
class FilledText:
    text: str
    spans: list[SpanFill] = field(default_factory=list)


def split_literals(document: Document) -> tuple[list[str], list[MaskSpan]]:
    """Literal pieces around the spans: literals[i] precedes spans[i]; the last follows them all."""
    literals, spans = [""], []
    for segment in document.segments:
        if isinstance(segment, MaskSpan):
            spans.append(segment)
            literals.append("")
        else:
            literals[-1] += segment
    return literals, spans


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def tokens_carry_spaces(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True for BPE vocabularies whose tokens hold their leading space (GPT-2, Qwen, ours); False
    for WordPiece-style ones (BERT), where spaces live between tokens and seams need no care."""
    return tokenizer.decode(encode(tokenizer, " a"), clean_up_tokenization_spaces=False).startswith(" ")


def must_tokens(
    tokenizer: PreTrainedTokenizerBase, must: Must, offset: int, joins_space: bool, *, as_written: bool = False
) -> list[int]:
    """The pinned ids of a must word. Mid-span (or after a moved space) a word starts with a space,
    as the model's own tokens would; a text that starts with a space or punctuation stays as is.
    `as_written`: no space added (a pattern span, whose fill is exactly what the pattern matches)."""
    text = must.text
    if text[:1].isalnum() and (offset > 0 or joins_space) and not as_written:
        text = " " + text
    return encode(tokenizer, text)


def place_fixed_musts(
    span: MaskSpan, tokenizer: PreTrainedTokenizerBase, length: int, joins_space: bool
) -> dict[int, int]:
    """Pin the musts that carry an explicit `@k`; errors if one overflows the span or they overlap."""
    pinned: dict[int, int] = {}
    for must in span.musts:
        if must.offset is None:
            continue
        ids = must_tokens(tokenizer, must, must.offset, joins_space, as_written=has_pattern(span))
        if must.offset + len(ids) > length:
            raise DocumentError(
                f'must="{must.text}"@{must.offset} needs {len(ids)} tokens from offset {must.offset}, '
                "past the span end",
                line=span.line,
                column=span.column,
                expected=f"a must that fits in {length} tokens",
            )
        for step, token_id in enumerate(ids):
            if must.offset + step in pinned:
                raise DocumentError(
                    f'must="{must.text}" overlaps another must',
                    line=span.line,
                    column=span.column,
                    expected="must words at separate offsets",
                )
            pinned[must.offset + step] = token_id
    return pinned


def check_free_musts_fit(span: MaskSpan, tokenizer: PreTrainedTokenizerBase, length: int, joins_space: bool) -> None:
    free = [m for m in span.musts if m.offset is None]
    plain = has_pattern(span)
    needed = sum(len(must_tokens(tokenizer, m, 1, joins_space, as_written=plain)) for m in free)
    needed += sum(
        len(must_tokens(tokenizer, m, m.offset, joins_space, as_written=plain))
        for m in span.musts
        if m.offset is not None
    )
    if free and needed > length:
        words = ", ".join(f'"{m.text}"' for m in span.musts)
        raise DocumentError(
            f"must text {words} needs {needed} tokens but the span has {length}",
            line=span.line,
            column=span.column,
            expected=f"must text of at most {length} tokens",
        )


def build_canvas(
    document: Document,
    tokenizer: PreTrainedTokenizerBase,
    *,
    prefix: Sequence[int] = (),
    suffix: Sequence[int] = (),
    mask_id: int,
    choices: Mapping[int, str] | None = None,
    must_offsets: Mapping[tuple[int, int], int] | None = None,
    max_canvas_tokens: int | None = None,
) -> Canvas:
    """Lay a document out on a canvas.

    `choices` maps a choice span's index to its chosen option (unresolved choice spans are laid out
    masked, as long as their longest option, so they can serve as context while choices are scored).
    `must_offsets` maps (span index, must index) to the offset chosen for a must without `@k`; a
    must with no offset yet is left unpinned.
    """
    choices = choices or {}
    must_offsets = must_offsets or {}
    literals, spans = split_literals(document)
    ids: list[int] = list(prefix)
    pinned: list[bool] = [True] * len(ids)
    rules: list[PositionRule] = [PositionRule()] * len(ids)
    layouts: list[SpanLayout] = []
    carry_spaces = tokens_carry_spaces(tokenizer)
    for number, (literal, span) in enumerate(zip(literals, spans, strict=False)):
        joins_space = carry_spaces and literal.endswith(" ") and not literal.endswith("  ")
        literal_ids = encode(tokenizer, literal[:-1] if joins_space else literal)
        ids += literal_ids
        pinned += [True] * len(literal_ids)
        rules += [PositionRule()] * len(literal_ids)
        layout = _lay_out_span(span, tokenizer, len(ids), joins_space, choices, must_offsets)
        line_start, single_line = _line_context(literals, number)
        layout = replace(layout, line_start=line_start, single_line=single_line)
        layouts.append(layout)
        for offset in range(layout.length):
            token_id = layout.pinned.get(offset)
            ids.append(mask_id if token_id is None else token_id)
            pinned.append(token_id is not None)
            rules.append(_position_rule(span, layout, offset))
        if max_canvas_tokens is not None and len(ids) + len(suffix) > max_canvas_tokens:
            raise DocumentError(
                f"the canvas needs more than {max_canvas_tokens} tokens by the end of this span",
                line=span.line,
                column=span.column,
                expected=f"at most {max_canvas_tokens} canvas tokens",
            )
    tail_ids = encode(tokenizer, literals[-1]) + list(suffix)
    ids += tail_ids
    pinned += [True] * len(tail_ids)
    rules += [PositionRule()] * len(tail_ids)
    if max_canvas_tokens is not None and len(ids) > max_canvas_tokens:
        raise DocumentError(
            f"the canvas needs {len(ids)} tokens",
            line=1,
            column=1,
            expected=f"at most {max_canvas_tokens} canvas tokens",
        )
    return Canvas(document=document, ids=ids, pinned=pinned, rules=rules, spans=layouts, literals=literals)


def _lay_out_span(
    span: MaskSpan,
    tokenizer: PreTrainedTokenizerBase,
    start: int,
    joins_space: bool,
    choices: Mapping[int, str],
    must_offsets: Mapping[tuple[int, int], int],
) -> SpanLayout:
    if span.choices is not None:
        chosen = choices.get(span.index)
        if chosen is None:
            longest = max(len(choice_tokens(tokenizer, option, joins_space)) for option in span.choices)
            return SpanLayout(span, start, longest, longest, {}, joins_space)
        option_ids = choice_tokens(tokenizer, chosen, joins_space)
        return SpanLayout(
            span, start, len(option_ids), len(option_ids), dict(enumerate(option_ids)), joins_space, chosen
        )
    length = span.max_tokens
    _check_musts_fit_class(span)
    pinned = place_fixed_musts(span, tokenizer, length, joins_space)
    check_free_musts_fit(span, tokenizer, length, joins_space)
    for must_index, must in enumerate(span.musts):
        offset = must_offsets.get((span.index, must_index))
        if must.offset is None and offset is not None:
            for step, token_id in enumerate(
                must_tokens(tokenizer, must, offset, joins_space, as_written=has_pattern(span))
            ):
                pinned[offset + step] = token_id
    return SpanLayout(span, start, length, span.min_tokens, pinned, joins_space)


def _line_context(literals: Sequence[str], number: int) -> tuple[bool, bool]:
    """Where span `number` sits among the lines (docs/language.md, Seams). At the start of a line
    (or of the document) its fill carries no leading whitespace. Only a span that stands as a
    paragraph of its own, with a blank line or the document's edge on both sides, may run over
    several lines; a span that shares its line with text, or sits on a line of its own inside a
    paragraph ("Agenda\n[MASK 4-8]\n[MASK 4-8]"), stays on that line. A span right beside another
    span counts as sharing its line."""
    before, after = literals[number], literals[number + 1]
    first, last = number == 0, number == len(literals) - 2
    line_start = before.endswith("\n") or (first and not before)
    opens = _paragraph_edge(before.replace("\r\n", "\n"), at_end=True) or (first and not before.strip())
    closes = _paragraph_edge(after.replace("\r\n", "\n"), at_end=False) or (last and not after.strip())
    return line_start, not (opens and closes)  # (line_start, single_line)


def _paragraph_edge(literal: str, *, at_end: bool) -> bool:
    """Whether `literal` meets the span with a blank line (at its end, or at its start)."""
    stripped = literal.rstrip(" \t") if at_end else literal.lstrip(" \t")
    return stripped.endswith("\n\n") if at_end else stripped.startswith("\n\n")


def has_pattern(span: MaskSpan) -> bool:
    """A re= span, or an `as=int|number` span with min=/max= (its range is a pattern too)."""
    return bool(span.patterns) or span.minimum is not None or span.maximum is not None


def _check_musts_fit_class(span: MaskSpan) -> None:
    """A must word is pinned as written, so it must itself be a value of the span's `as=` class.
    (In a pattern span the automaton checks the musts with the rest of the fill.)"""
    if span.value_class is None or has_pattern(span):
        return
    for must in span.musts:
        if not token_allowed(must.text.lstrip(" "), span.value_class, "whole"):
            raise DocumentError(
                f'must="{must.text}" is not a valid as={span.value_class} value',
                line=span.line,
                column=span.column,
                expected=f"must text that is itself an {span.value_class} value",
            )


def choice_tokens(tokenizer: PreTrainedTokenizerBase, option: str, joins_space: bool) -> list[int]:
    return encode(tokenizer, (" " + option) if joins_space and not option[:1].isspace() else option)


def _position_rule(span: MaskSpan, layout: SpanLayout, offset: int) -> PositionRule:
    if has_pattern(span):
        # The pattern's automaton decides everything at these positions (editor.patterns).
        return PositionRule(droppable=offset >= layout.min_tokens)
    place: Place = "body"
    if offset == 0:
        place = "first_spaced" if layout.joins_space else "first"
        if layout.min_tokens <= 1 and span.value_class in ("int", "number", "word"):
            place = "whole_spaced" if layout.joins_space else "whole"  # may be the whole fill
    elif span.value_class == "number" and number_slot(offset, layout.min_tokens):
        place = "slot"  # a lone separator may stand here: its neighbours always hold digits
    # In an int/number/word span the must is part of one value, so the next token may continue it.
    after_word = (
        span.choices is None
        and span.value_class not in ("int", "number", "word")
        and (offset - 1) in layout.pinned
        and offset not in layout.pinned
    )
    return PositionRule(
        value_class=span.value_class,
        place=place,
        droppable=offset >= layout.min_tokens,
        after_word=after_word,
        single_line=layout.single_line,
        line_start=layout.line_start and offset == 0,
    )


def render(
    canvas: Canvas,
    ids: Sequence[int],
    confidences: Sequence[float],
    tokenizer: PreTrainedTokenizerBase,
    end_ids: Sequence[int],
) -> FilledText:
    """Committed canvas → filled text with each span's character offsets."""
    pieces: list[str] = []
    length = 0
    fills: list[SpanFill] = []
    for number, layout in enumerate(canvas.spans):
        literal = canvas.literals[number]
        kept, scores = _kept_tokens(layout, ids, confidences, end_ids)
        text = tokenizer.decode(kept, clean_up_tokenization_spaces=False)
        following = canvas.literals[number + 1]
        if has_pattern(layout.span):
            # The fill is exactly what the pattern matched: a leading space the first token
            # brought is the literal's (editor.patterns, `pre`), and nothing else is trimmed.
            if layout.joins_space and text.startswith(" "):
                text = text[1:]
            elif layout.joins_space and not text and following[:1] in _CLOSES_EMPTY_SEAM:
                literal = literal[:-1]
        elif layout.joins_space and (text[:1].isspace() or (not text and following[:1] in _CLOSES_EMPTY_SEAM)):
            literal = literal[:-1]  # the fill brought its own space, or an empty fill must not leave two
        at_line_start = literal.endswith("\n") or (not literal and not pieces)
        if at_line_start and not has_pattern(layout.span):
            text = text.lstrip(" ")  # no stray space at the start of a line
        if following[:1].isspace() and not has_pattern(layout.span):
            text = text.rstrip(" ")
        pieces.append(literal)
        length += len(literal)
        pieces.append(text)
        fills.append(
            SpanFill(
                index=layout.span.index,
                name=layout.span.name,
                start=length,
                end=length + len(text),
                text=text,
                token_ids=kept,
                confidence=sum(scores) / len(scores) if scores else 1.0,
            )
        )
        length += len(text)
    pieces.append(canvas.literals[-1])
    return FilledText("".join(pieces), fills)


def _kept_tokens(
    layout: SpanLayout, ids: Sequence[int], confidences: Sequence[float], end_ids: Sequence[int]
) -> tuple[list[int], list[float]]:
    """The span's tokens without dropped padding, and the confidences of its sampled tokens."""
    kept: list[int] = []
    scores: list[float] = []
    for offset in range(layout.length):
        token_id = ids[layout.start + offset]
        if offset >= layout.min_tokens and token_id in end_ids:
            continue
        kept.append(token_id)
        if offset not in layout.pinned:
            scores.append(confidences[layout.start + offset])
    return kept, scores
