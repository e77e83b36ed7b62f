"""Tests for the document language parser and renderer (docs/language.md)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from editor.document import VALUE_CLASSES, Document, DocumentError, DocumentLimits, MaskSpan, Must
from editor.parser import TagWarning, parse_document, render_document, suspicious_tags

DESIGN_EXAMPLE = (
    "Dear [MASK 3 name=greeting],\n"
    "Thank you for ordering [MASK 6]. Your refund of $[MASK 3 as=number] will reach you "
    '[MASK 8 must="Monday"].\n'
    "Kind regards,\n"
    "The [MASK 2] team"
)


def only_span(source: str) -> MaskSpan:
    spans = parse_document(source).spans
    assert len(spans) == 1
    return spans[0]


def parse_error(source: str, limits: DocumentLimits | None = None) -> DocumentError:
    with pytest.raises(DocumentError) as info:
        parse_document(source, limits)
    return info.value


# --- valid documents ---------------------------------------------------------------------------


def test_design_example_segments_and_positions() -> None:
    doc = parse_document(DESIGN_EXAMPLE)
    assert doc.segments == (
        "Dear ",
        MaskSpan(index=0, min_tokens=3, max_tokens=3, name="greeting", line=1, column=6),
        ",\nThank you for ordering ",
        MaskSpan(index=1, min_tokens=6, max_tokens=6, line=2, column=24),
        ". Your refund of $",
        MaskSpan(index=2, min_tokens=3, max_tokens=3, value_class="number", line=2, column=50),
        " will reach you ",
        MaskSpan(index=3, min_tokens=8, max_tokens=8, musts=(Must("Monday"),), line=2, column=84),
        ".\nKind regards,\nThe ",
        MaskSpan(index=4, min_tokens=2, max_tokens=2, line=4, column=5),
        " team",
    )
    assert [s.key for s in doc.spans] == ["greeting", "1", "2", "3", "4"]
    assert doc.span("greeting") is doc.spans[0]


def test_design_example_renders_back_byte_for_byte() -> None:
    assert render_document(parse_document(DESIGN_EXAMPLE)) == DESIGN_EXAMPLE


def test_full_tag_from_design() -> None:
    span = only_span('[MASK 8 name=reply must="Monday" as=line]')
    assert (span.min_tokens, span.max_tokens, span.name, span.value_class) == (8, 8, "reply", "line")
    assert span.musts == (Must("Monday"),)


def test_must_with_offset_and_several_musts() -> None:
    span = only_span('[MASK 10 must="Monday"@3 must="9am" must="Room \\"B\\" \\\\ 2"@0]')
    assert span.musts == (Must("Monday", 3), Must("9am"), Must('Room "B" \\ 2', 0))


def test_must_keeps_unknown_escapes_and_pipes() -> None:
    assert only_span(r'[MASK 4 must="a\|b\n]"]').musts == (Must(r"a\|b\n]"),)


def test_choice_with_escaped_pipe_and_quote() -> None:
    span = only_span(r'[MASK choice="yes|no\|maybe|say \"hi\"|a\\b" name=answer]')
    assert span.choices == ("yes", "no|maybe", 'say "hi"', "a\\b")
    assert (span.min_tokens, span.max_tokens, span.name, span.is_choice) == (0, 0, "answer", True)


def test_choice_option_may_follow_name() -> None:
    assert only_span('[MASK name=a choice="x|y"]').choices == ("x", "y")


def test_ranges() -> None:
    assert (only_span("[MASK 2-8]").min_tokens, only_span("[MASK 2-8]").max_tokens) == (2, 8)
    assert (only_span("[MASK 0-1]").min_tokens, only_span("[MASK 0-1]").max_tokens) == (0, 1)
    assert only_span("[MASK 5-5]").min_tokens == only_span("[MASK 5-5]").max_tokens == 5
    assert only_span("[MASK 512]").max_tokens == 512
    assert only_span('[MASK 0-4 must="x"@3]').musts == (Must("x", 3),)


def test_extra_spaces_inside_tag() -> None:
    span = only_span("[MASK   4   name=x  ]")
    assert (span.max_tokens, span.name) == (4, "x")


def test_escaped_tag_is_literal() -> None:
    assert parse_document(r"say \[MASK 3] please").segments == ("say [MASK 3] please",)


def test_double_backslash_is_a_backslash_then_a_real_tag() -> None:
    doc = parse_document(r"a\\[MASK 2]b")
    assert doc.segments == ("a\\", MaskSpan(index=0, min_tokens=2, max_tokens=2, line=1, column=4), "b")


def test_backslash_runs_before_tags_are_halved() -> None:
    assert parse_document("\\\\\\[MASK 2]").segments == ("\\[MASK 2]",)
    assert parse_document("\\\\\\\\[MASK 2]").segments[0] == "\\\\"


def test_other_backslashes_are_literal() -> None:
    text = r"C:\path\to\file \\ \n \[mask] \[MASKED] end\\"
    assert parse_document(text).segments == (text,)


def test_text_that_is_not_a_tag_is_literal() -> None:
    for text in ["[MASKED]", "[MASK3]", "[mask 3]", "[Mask 3]", "[MASK_1]", "[MASKé]", "[ MASK 3]", "MASK 3]"]:
        assert parse_document(text).segments == (text,), text


def test_unicode_literal_text() -> None:
    text = "Grüße, 世界 🌍\n— naïve café\t"
    doc = parse_document(text + "[MASK 1]" + text)
    assert doc.segments[0] == doc.segments[2] == text
    assert (doc.spans[0].line, doc.spans[0].column) == (2, 14)


def test_adjacent_spans_and_empty_document() -> None:
    doc = parse_document("[MASK 1][MASK 2 name=b]")
    assert [type(s) for s in doc.segments] == [MaskSpan, MaskSpan]
    assert [(s.index, s.column) for s in doc.spans] == [(0, 1), (1, 9)]
    assert parse_document("").segments == ()


def test_escaped_tags_merge_into_one_literal() -> None:
    assert parse_document(r"a\[MASK b\[MASK c").segments == ("a[MASK b[MASK c",)


def test_custom_limits() -> None:
    limits = DocumentLimits(max_chars=20, max_spans=2, max_span_tokens=4)
    assert len(parse_document("[MASK 4][MASK 1-4]", limits).spans) == 2


# --- rendering ---------------------------------------------------------------------------------


def test_render_uses_canonical_option_order() -> None:
    doc = parse_document('[MASK 3-9 as=int must="a"@1 name=n ]')
    assert render_document(doc) == '[MASK 3-9 name=n must="a"@1 as=int]'
    choice = parse_document(r'[MASK name=q choice="a\|b|c\"|d\\"]')
    assert render_document(choice) == r'[MASK choice="a\|b|c\"|d\\" name=q]'


def test_render_escapes_literal_tag_openers() -> None:
    doc = Document(("x [MASK 3] \\[MASK [MASKED] [MASK",))
    rendered = render_document(doc)
    assert rendered == r"x \[MASK 3] \\\[MASK [MASKED] \[MASK"
    assert parse_document(rendered) == doc


def test_render_doubles_trailing_backslashes_before_a_span() -> None:
    span = MaskSpan(index=0, min_tokens=2, max_tokens=2, line=1, column=4)
    doc = Document(("a\\", span, "b\\"))
    rendered = render_document(doc)
    assert rendered == "a\\\\[MASK 2]b\\"
    assert parse_document(rendered) == doc


def test_render_merges_adjacent_literals() -> None:
    doc = Document(("a[MA", "SK b", MaskSpan(index=0, min_tokens=1, max_tokens=1)))
    assert render_document(doc) == r"a\[MASK b[MASK 1]"


# --- errors ------------------------------------------------------------------------------------

LIMITS = DocumentLimits(max_chars=1000, max_spans=3, max_span_tokens=16)

ERRORS = [
    # (source, line, column, in message, in expected)
    ("[MASK]", 1, 6, "missing length", "a length like 5 or 2-8"),
    ("ab\n[MASK ]", 2, 7, "missing length", "choice="),
    ("[MASK name=x]", 1, 7, "missing length", "a length like 5 or 2-8"),
    ("[MASK 3 colour=red]", 1, 9, "unknown option 'colour'", "name=, must=, as=, choice="),
    ("[MASK colour=red]", 1, 7, "unknown option 'colour'", "name=, must=, as=, choice="),
    ("[MASK 3 loud]", 1, 9, "unknown option 'loud'", "name=, must=, as=, choice="),
    ("[MASK 3 name]", 1, 13, "expected '=' after name", "name="),
    ("[MASK 3 @x]", 1, 9, "unexpected '@'", "name=, must=, as=, choice="),
    ("[MASK 1 name=a] [MASK 2 name=a]", 1, 30, "duplicate name 'a'", "name"),
    ("[MASK 3 name=1abc]", 1, 14, "bad name '1abc'", "identifier"),
    ("[MASK 3 name=a-b]", 1, 14, "bad name 'a-b'", "identifier"),
    ("[MASK 3 name=]", 1, 14, "bad name ''", "identifier"),
    ("[MASK 3 name=" + "a" * 65 + "]", 1, 14, "bad name", "64 characters"),
    ("[MASK 0]", 1, 7, "length '0' is out of range", "from 1 to 16"),
    ("[MASK 17]", 1, 7, "length '17' is out of range", "from 1 to 16"),
    ("[MASK 99999999999999999999]", 1, 7, "out of range", "from 1 to 16"),
    ("[MASK 5-3]", 1, 7, "range '5-3' runs backwards", "a <= b"),
    ("[MASK 0-0]", 1, 7, "range '0-0' allows no tokens", "at least 1"),
    ("[MASK 2-17]", 1, 7, "range '2-17' is out of range", "at most 16"),
    ("[MASK 3.5]", 1, 7, "invalid length '3.5'", "a length like 5 or 2-8"),
    ("[MASK three]", 1, 7, "invalid length 'three'", "a length like 5 or 2-8"),
    ("[MASK -3]", 1, 7, "invalid length '-3'", "a length like 5 or 2-8"),
    ("[MASK 2-]", 1, 7, "invalid length '2-'", "a length like 5 or 2-8"),
    ("[MASK 3name=x]", 1, 7, "invalid length '3name=x'", "a length like 5 or 2-8"),
    ("[MASK 3,4]", 1, 7, "invalid length '3,4'", "a length like 5 or 2-8"),
    ("ok\n  [MASK 3", 2, 3, "unclosed tag", "']'"),
    ("  [MASK 3 name=x\nmore]", 1, 3, "unclosed tag", "']'"),
    ("[MASK", 1, 1, "unclosed tag", "']'"),
    ("[MASK\n3]", 1, 1, "unclosed tag", "']'"),
    ("[MASK,3]", 1, 6, "unexpected ','", "a space after [MASK"),
    # A word with no '=' in a tag never closed: the missing ']' is the mistake, not the word.
    ("Hello [MASK 3 world", 1, 7, "unclosed tag: found end of document before ']'", "']' to close the tag"),
    ("[MASK 3 world\nmore]", 1, 1, "unclosed tag: found end of line before ']'", "']' to close the tag"),
    ("[MASK 3 world [MASK 2]", 1, 1, "unclosed tag: found another '[MASK' before ']'", "']' to close the tag"),
    ("a [MASK 2 name of the day", 1, 3, "unclosed tag", "']' to close the tag"),
    ("[MASK 3 loud] [x]", 1, 9, "unknown option 'loud'", "name=, must=, as=, choice="),
    ("[MASK 3 colour=red", 1, 9, "unknown option 'colour'", "name=, must=, as=, choice="),
    ('[MASK 3 must="a"b]', 1, 17, "unexpected 'b'", "a space or ']'"),
    ('x [MASK 3 must="Monday]', 1, 16, "unterminated quoted string", '"'),
    ('[MASK 3 must="Mon\nday"]', 1, 14, "unterminated quoted string", '"'),
    ('[MASK 3 must="ends in \\"]', 1, 14, "unterminated quoted string", '"'),
    ('[MASK choice="a|b]', 1, 14, "unterminated quoted string", '"'),
    ("[MASK 3 must=Monday]", 1, 14, "expected a quoted string after must=", 'must="..."'),
    ('[MASK 3 must=""]', 1, 14, "must text is empty", "non-empty"),
    ('[MASK 3 must="x"@3]', 1, 18, "must offset @3 is outside", "from 0 to 2"),
    ('[MASK 1-4 must="x"@4]', 1, 20, "must offset @4 is outside", "from 0 to 3"),
    ('[MASK 3 must="x"@]', 1, 18, "expected a token offset after '@'", "non-negative integer"),
    ('[MASK 3 must="x"@-1]', 1, 18, "expected a token offset after '@'", "non-negative integer"),
    ("[MASK 3 as=float]", 1, 12, "unknown as class 'float'", "int, number, word, line, json"),
    ("[MASK 3 name=a name=b]", 1, 16, "option name= given twice", "at most once"),
    ("[MASK 3 as=int as=word]", 1, 16, "option as= given twice", "at most once"),
    ('[MASK choice="a|b" choice="c|d"]', 1, 20, "option choice= given twice", "at most once"),
    ('[MASK 3 choice="a|b"]', 1, 9, "choice= cannot be combined with a length", "either"),
    ('[MASK choice="a|b" 3]', 1, 20, "unknown option '3'", "name="),
    ('[MASK choice="a|b" must="a"]', 1, 20, "must= cannot be combined with choice=", "either"),
    ('[MASK must="a" choice="a|b"]', 1, 16, "choice= cannot be combined with must=", "either"),
    ('[MASK choice="a|b" as=word]', 1, 20, "as= cannot be combined with choice=", "either"),
    ('[MASK as=word choice="a|b"]', 1, 15, "choice= cannot be combined with as=", "either"),
    ('[MASK choice="a||b"]', 1, 17, "empty choice option", "non-empty"),
    ('[MASK choice="|a"]', 1, 15, "empty choice option", "non-empty"),
    ('[MASK choice="a|"]', 1, 17, "empty choice option", "non-empty"),
    ('[MASK choice="yes"]', 1, 14, "choice needs at least 2 options", "separated by |"),
    ('[MASK choice=""]', 1, 14, "choice needs at least 2 options", "separated by |"),
    ("[MASK choice=yes|no]", 1, 14, "expected a quoted string after choice=", 'choice="..."'),
    ("[MASK 1] [MASK 1]\n[MASK 1] [MASK 1] [MASK 1]", 2, 10, "too many spans", "at most 3 spans"),
]


@pytest.mark.parametrize(("source", "line", "column", "message", "expected"), ERRORS)
def test_errors_point_at_the_problem(source: str, line: int, column: int, message: str, expected: str) -> None:
    error = parse_error(source, LIMITS)
    assert (error.line, error.column) == (line, column), str(error)
    assert message in error.message
    assert error.expected is not None and expected in error.expected
    assert str(error).startswith(f"line {line}, column {column}: ")


def test_document_over_max_chars() -> None:
    error = parse_error("ab\ncdef", DocumentLimits(max_chars=5))
    assert (error.line, error.column) == (2, 3)
    assert "7 characters" in error.message and error.expected == "at most 5 characters"
    assert parse_document("ab\ncd", DocumentLimits(max_chars=5)).segments == ("ab\ncd",)


def test_unknown_option_lists_known_ones() -> None:
    error = parse_error("[MASK 3 colour=red]")
    assert error.message == "unknown option 'colour'"
    assert error.expected == "one of name=, must=, as=, choice=, re=, min=, max="
    assert error.to_dict()["column"] == 9


def test_default_span_token_limit_is_enforced() -> None:
    assert parse_error("[MASK 513]").expected == "a length from 1 to 512"


# --- warnings: literal text that looks like a mistyped tag -----------------------------------------

SUSPICIOUS = [
    # (source, [(line, column, suggestion)])
    ("Hi [mask 3] there", [(1, 4, "[MASK 3]")]),
    ("x\n [Mask 2-5 name=who]", [(2, 2, "[MASK 2-5 name=who]")]),
    ("[MASK3]", [(1, 1, "[MASK 3]")]),
    ("[mask12 as=int] and [MASK 1]", [(1, 1, "[MASK 12 as=int]")]),
    ("two: [mask 1] [mAsK 2]", [(1, 6, "[MASK 1]"), (1, 15, "[MASK 2]")]),
    ("[mask " + "x" * 40 + "]", [(1, 1, "[MASK ...]")]),  # no ']' close by: the opener alone
]


@pytest.mark.parametrize(("source", "found"), SUSPICIOUS)
def test_suspicious_tags_name_where_and_the_tag_meant(source: str, found: list[tuple[int, int, str]]) -> None:
    warnings = suspicious_tags(source)
    assert [(w.line, w.column, w.suggestion) for w in warnings] == found
    for warning in warnings:
        assert f"did you mean {warning.suggestion}?" in str(warning)
        if warning.suggestion.endswith("...]"):
            continue
        # What was found is literal text; written as suggested, it is one more span.
        assert warning.text in "".join(s for s in parse_document(source).segments if isinstance(s, str))
        corrected = source.replace(warning.text, warning.suggestion, 1)
        assert len(parse_document(corrected).spans) == len(parse_document(source).spans) + 1


@pytest.mark.parametrize(
    "source", ["[MASK 3]", "[MASKED] [masked] [mask_1]", "\\[mask 3]", "a mask 3 b", '[MASK 2 must="x"]', ""]
)
def test_real_tags_and_other_text_are_not_suspicious(source: str) -> None:
    assert suspicious_tags(source) == []


def test_a_warning_says_why_the_text_is_literal() -> None:
    [lower] = suspicious_tags("Hi [mask 3]")
    message = "'[mask 3]' is literal text: tags open with [MASK in capitals"
    assert lower == TagWarning(message, 1, 4, "[mask 3]", "[MASK 3]")
    assert str(lower) == (
        "line 1, column 4: '[mask 3]' is literal text: tags open with [MASK in capitals (did you mean [MASK 3]?)"
    )
    [glued] = suspicious_tags("[MASK3]")
    assert "[MASK needs a space before the length" in glued.message


# --- properties --------------------------------------------------------------------------------

LITERAL_PIECES = st.one_of(
    st.text(max_size=8),
    st.sampled_from(
        ["[MASK", "[MASK ", "[MASK 3]", "\\[MASK", "\\\\", "\\", "[", "]", "[MASKED]", "[MASK]", "\n", "é🌍", "MASK"]
    ),
)
literal_text = st.lists(LITERAL_PIECES, max_size=6).map("".join)
quoted_text = st.text(
    alphabet=st.one_of(st.sampled_from('"\\|][@= '), st.characters(blacklist_characters="\n")), min_size=1, max_size=10
)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,63}", fullmatch=True)


@st.composite
def spans(draw: st.DrawFn) -> MaskSpan:
    """A valid span (index and position are filled in by `documents`)."""
    name = draw(st.none() | names)
    if draw(st.booleans()):
        choices = tuple(draw(st.lists(quoted_text, min_size=2, max_size=4)))
        return MaskSpan(index=0, min_tokens=0, max_tokens=0, name=name, choices=choices)
    high = draw(st.integers(1, 512))
    low = draw(st.sampled_from([high, 0]) | st.integers(0, high))
    musts = draw(st.lists(st.builds(Must, quoted_text, st.none() | st.integers(0, high - 1)), max_size=3))
    value_class = draw(st.none() | st.sampled_from(VALUE_CLASSES))
    return MaskSpan(index=0, min_tokens=low, max_tokens=high, name=name, musts=tuple(musts), value_class=value_class)


@st.composite
def documents(draw: st.DrawFn) -> Document:
    """Literals and spans in the parser's normal form: merged, non-empty literals; unique names."""
    pieces = draw(st.lists(st.one_of(literal_text, spans()), max_size=8))
    segments: list[str | MaskSpan] = []
    used: set[str] = set()
    for piece in pieces:
        if isinstance(piece, str):
            if segments and isinstance(segments[-1], str):
                segments[-1] += piece
            elif piece:
                segments.append(piece)
            continue
        name = piece.name if piece.name not in used else None
        used.add(name or "")
        index = sum(isinstance(s, MaskSpan) for s in segments)
        segments.append(dataclasses.replace(piece, index=index, name=name))
    return Document(tuple(s for s in segments if s != ""))


def without_positions(doc: Document) -> Document:
    return Document(tuple(s if isinstance(s, str) else dataclasses.replace(s, line=1, column=1) for s in doc.segments))


def offset_of(text: str, line: int, column: int) -> int:
    lines = text.split("\n")
    return sum(len(lines[i]) + 1 for i in range(line - 1)) + column - 1


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_render_then_parse_round_trips(doc: Document) -> None:
    rendered = render_document(doc)
    reparsed = parse_document(rendered)
    assert without_positions(reparsed) == without_positions(doc)
    assert render_document(reparsed) == rendered
    for span in reparsed.spans:  # positions point at each tag's `[`
        assert rendered.startswith("[MASK ", offset_of(rendered, span.line, span.column))


@given(st.text())
def test_text_without_tags_is_one_literal(text: str) -> None:
    if "[MASK" in text:
        text = text.replace("[MASK", "[MAS")
    assert parse_document(text).segments == ((text,) if text else ())


FUZZ_PIECES = st.one_of(
    st.text(max_size=5),
    st.sampled_from(
        [
            "[MASK ",
            "[MASK",
            "]",
            '"',
            "\\",
            "\\\\",
            "name=",
            "must=",
            "@",
            "@2",
            "as=",
            "choice=",
            "|",
            " ",
            "\n",
            "3",
            "2-8",
            "0",
            "-",
            "=",
            "int",
            "x",
            "[MASK 2]",
            '"a|b"',
            "[MASKED",
            "99999999999999999999999",
        ]
    ),
)


@settings(max_examples=500)
@given(st.lists(FUZZ_PIECES, max_size=16).map("".join))
def test_parse_raises_only_document_error(text: str) -> None:
    try:
        doc = parse_document(text, LIMITS)
    except DocumentError as error:
        assert error.line >= 1 and error.column >= 1 and error.message
        return
    # Whatever parses re-renders to a document that parses to the same thing.
    assert without_positions(parse_document(render_document(doc), LIMITS)) == without_positions(doc)
