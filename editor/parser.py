"""Parser and renderer for the editor document language (docs/language.md).

Everything outside a `[MASK ...]` tag is literal text. A tag opens at `[MASK` when the next
character is not a word character (so `[MASKED]` stays literal); it then must read
`[MASK <length or choice=...> <options...>]`. A run of backslashes right before a tag opener is
halved, and an odd run makes the `[MASK` literal (`\\[MASK` -> `[MASK`); every other backslash is
literal. `render_document` writes the inverse. `suspicious_tags` finds text that is literal but
was likely meant as a tag (`[mask 3]`, `[MASK3]`). Pure Python: no torch import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from editor.document import VALUE_CLASSES, Document, DocumentError, DocumentLimits, MaskSpan, Must, ValueClass
from editor.regexes import PatternError, checked_pattern, number_pattern, parse_bound

__all__ = ["TagWarning", "parse_document", "render_document", "suspicious_tags"]

_OPENER = re.compile(r"\[MASK(?!\w)")
_KEYWORD_END = len("[MASK")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_LENGTH = re.compile(r"([0-9]+)(?:-([0-9]+))?")
_DIGITS = re.compile(r"[0-9]*")
_WORD = re.compile(r"\w*")
_VALUE = re.compile(r"[^ \]\n]*")  # an unquoted value ends at a space, ']' or the end of the line
_OPTIONS = ("name", "must", "as", "choice", "re", "min", "max")
_SINGLE_OPTIONS = ("name", "as", "choice", "min", "max")  # must= and re= may repeat; these may not
_KNOWN_OPTIONS = "one of name=, must=, as=, choice=, re=, min=, max="
_LENGTH_EXPECTED = "a length like 5 or 2-8, or choice=..."
# `[mask`, `[Mask` or `[MASK3`: any spelling of the keyword, then digits or a non-word character.
# The exact `[MASK` followed by a non-word character is a real tag and is left out by the caller.
_NEAR_OPENER = re.compile(r"\[((?i:mask))([0-9]*)(?!\w)")
_MAX_DIGITS = 9  # any longer number is out of range; also keeps int() off huge digit strings
_SHOW_CHARS = 24


def parse_document(source: str, limits: DocumentLimits | None = None) -> Document:
    """Parse document source text; raise `DocumentError` (with line, column, expected) if it is invalid."""
    return _Parser(source, limits or DocumentLimits()).parse()


def render_document(document: Document) -> str:
    """Write `document` as source text that parses back to an equal document (for a valid document)."""
    out: list[str] = []
    literal: list[str] = []
    for segment in document.segments:
        if isinstance(segment, str):
            literal.append(segment)  # adjacent literals render as one, as the parser would merge them
            continue
        out.append(_escape_literal("".join(literal), before_span=True))
        out.append(_render_span(segment))
        literal = []
    out.append(_escape_literal("".join(literal), before_span=False))
    return "".join(out)


@dataclass(frozen=True)
class TagWarning:
    """Literal `text` that looks like a mistyped tag: where it is (1-based line and column of its
    `[`) and the tag it was probably meant to be."""

    message: str
    line: int
    column: int
    text: str
    suggestion: str

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}: {self.message} (did you mean {self.suggestion}?)"

    def to_dict(self) -> dict[str, object]:
        return {
            "message": self.message,
            "line": self.line,
            "column": self.column,
            "text": self.text,
            "suggestion": self.suggestion,
        }


def suspicious_tags(source: str) -> list[TagWarning]:
    """Text the parser takes as literal that was likely meant as a tag: the keyword not in capitals
    (`[mask 3]`: the language is case-sensitive) or with no space before the length (`[MASK3]`).
    Escaped openers (`\\[mask`) are meant literally and not reported."""
    warnings: list[TagWarning] = []
    for match in _NEAR_OPENER.finditer(source):
        keyword, digits = match.group(1), match.group(2)
        if keyword == "MASK" and not digits:
            continue  # a real tag opener
        if _backslashes_before(source, match.start(), 0) % 2:
            continue
        rest = _rest_of_tag(source, match.end())
        meant = "[MASK" + (" " + digits if digits else "")
        text, suggestion = (
            (match.group() + rest, meant + rest) if rest is not None else (match.group(), meant + " ...]")
        )
        if keyword != "MASK":
            message = f"{_show(text)} is literal text: tags open with [MASK in capitals"
        else:
            message = f"{_show(text)} is literal text: [MASK needs a space before the length"
        line, column = _line_column(source, match.start())
        warnings.append(TagWarning(message, line, column, text, suggestion))
    return warnings


def _rest_of_tag(source: str, at: int) -> str | None:
    """The would-be tag's text from `at` to its `]` on the same line; None when there is none
    close by (then only the opener is shown)."""
    line_end = source.find("\n", at)
    close = source.find("]", at, line_end if line_end >= 0 else len(source))
    return source[at : close + 1] if 0 <= close - at < _SHOW_CHARS else None


# --- rendering -------------------------------------------------------------------------------


def _escape_literal(text: str, *, before_span: bool) -> str:
    """Escape tag openers (doubling the backslashes before them) so the text reads back as itself."""
    out: list[str] = []
    pos = 0
    for match in _OPENER.finditer(text):
        slashes = _backslashes_before(text, match.start(), pos)
        out.append(text[pos : match.start() - slashes])
        out.append("\\" * (2 * slashes + 1) + "[MASK")
        pos = match.end()
    tail = text[pos:]
    if before_span:
        # Trailing backslashes would otherwise escape the following tag.
        stripped = tail.rstrip("\\")
        tail = stripped + "\\" * (2 * (len(tail) - len(stripped)))
    out.append(tail)
    return "".join(out)


def _render_span(span: MaskSpan) -> str:
    """Canonical option order: length or choice, name, must..., as."""
    parts = ["[MASK"]
    if span.choices is not None:
        parts.append('choice="' + "|".join(_quote(c, pipes=True) for c in span.choices) + '"')
    elif span.min_tokens == span.max_tokens:
        parts.append(str(span.min_tokens))
    else:
        parts.append(f"{span.min_tokens}-{span.max_tokens}")
    if span.name is not None:
        parts.append(f"name={span.name}")
    for must in span.musts:
        at = "" if must.offset is None else f"@{must.offset}"
        parts.append(f'must="{_quote(must.text, pipes=False)}"{at}')
    if span.value_class is not None:
        parts.append(f"as={span.value_class}")
    if span.minimum is not None:
        parts.append(f"min={span.minimum}")
    if span.maximum is not None:
        parts.append(f"max={span.maximum}")
    for pattern in span.patterns:
        parts.append(f're="{_quote(pattern, pipes=False)}"')
    return " ".join(parts) + "]"


def _quote(text: str, *, pipes: bool) -> str:
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return text.replace("|", "\\|") if pipes else text


# --- shared helpers --------------------------------------------------------------------------


def _backslashes_before(text: str, index: int, floor: int) -> int:
    """Length of the backslash run ending just before `index`, not reaching back past `floor`."""
    count = 0
    while index - count > floor and text[index - count - 1] == "\\":
        count += 1
    return count


def _line_column(source: str, offset: int) -> tuple[int, int]:
    line = source.count("\n", 0, offset) + 1
    column = offset - source.rfind("\n", 0, offset)
    return line, column


def _to_int(digits: str) -> int:
    """int() that cannot blow up: anything with too many digits is simply too large."""
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= _MAX_DIGITS else 10**_MAX_DIGITS


def _show(text: str) -> str:
    """Quote found text for a message, cut short so huge inputs give short messages."""
    if len(text) > _SHOW_CHARS:
        text = text[:_SHOW_CHARS] + "..."
    return repr(text)


def _describe(char: str) -> str:
    if char == "":
        return "end of document"
    if char == "\n":
        return "end of line"
    return repr(char)


# --- parsing ---------------------------------------------------------------------------------


class _Parser:
    """Walks the source from tag opener to tag opener, collecting merged literals and spans."""

    def __init__(self, source: str, limits: DocumentLimits) -> None:
        self.source = source
        self.limits = limits
        self.segments: list[str | MaskSpan] = []
        self.literal: list[str] = []
        self.names: set[str] = set()  # names are unique across the whole document
        self.span_count = 0

    def error(self, message: str, offset: int, expected: str | None = None) -> DocumentError:
        line, column = _line_column(self.source, offset)
        return DocumentError(message, line=line, column=column, expected=expected)

    def parse(self) -> Document:
        self.check_size()
        source, pos = self.source, 0
        while (match := _OPENER.search(source, pos)) is not None:
            start = match.start()
            slashes = _backslashes_before(source, start, pos)
            self.literal.append(source[pos : start - slashes] + "\\" * (slashes // 2))
            if slashes % 2:  # escaped: the `[MASK` is literal text
                self.literal.append("[MASK")
                pos = match.end()
                continue
            span, pos = _TagParser(self, start, index=self.span_count).parse()
            self.add_span(span, start)
        self.literal.append(source[pos:])
        self.flush_literal()
        return Document(tuple(self.segments))

    def check_size(self) -> None:
        limit = self.limits.max_chars
        if len(self.source) > limit:
            raise self.error(f"document is {len(self.source)} characters long", limit, f"at most {limit} characters")

    def add_span(self, span: MaskSpan, start: int) -> None:
        limit = self.limits.max_spans
        if span.index >= limit:
            raise self.error(f"too many spans: this is span {span.index + 1}", start, f"at most {limit} spans")
        self.flush_literal()
        self.segments.append(span)
        self.span_count += 1

    def flush_literal(self) -> None:
        text = "".join(self.literal)
        self.literal = []
        if text:
            self.segments.append(text)


class _TagParser:
    """Reads one tag starting at the `[` of `[MASK`; options are checked as they are read so that
    each error points at the option or character at fault."""

    def __init__(self, parser: _Parser, start: int, *, index: int) -> None:
        self.parser = parser
        self.source = parser.source
        self.start = start
        self.index = index
        self.pos = start + _KEYWORD_END
        self.length: tuple[int, int] | None = None
        self.name: str | None = None
        self.musts: list[Must] = []
        self.value_class: ValueClass | None = None
        self.choices: tuple[str, ...] | None = None
        self.patterns: list[str] = []
        self.bounds: dict[str, tuple[str, int]] = {}  # "min"/"max" -> (value, where it was written)
        self.seen: set[str] = set()

    # -- driving --

    def parse(self) -> tuple[MaskSpan, int]:
        if self.peek() == "]":
            raise self.error("missing length in [MASK]", self.pos, _LENGTH_EXPECTED)
        if self.peek() != " ":
            self.unexpected("a space after [MASK")
        first_item: int | None = None
        while True:
            self.skip_spaces()
            if self.peek() == "]":
                break
            self.check_open()
            if first_item is None:
                first_item = self.pos
                self.read_first_item()
            else:
                self.read_option()
            if self.peek() not in (" ", "]"):
                self.unexpected("a space or ']'")
        if self.length is None and self.choices is None:
            at = self.pos if first_item is None else first_item
            raise self.error("missing length", at, _LENGTH_EXPECTED)
        self.check_value_options()
        return self.build(), self.pos + 1

    def check_value_options(self) -> None:
        """re= and min=/max= are checked once the whole tag is read (options come in any order)."""
        if self.patterns and self.value_class is not None:
            raise self.error("re= cannot be combined with as=", self.start, "either re= or as=")
        if self.bounds and self.value_class not in ("int", "number"):
            key, (_, at) = next(iter(self.bounds.items()))
            raise self.error(f"{key}= needs as=int or as=number", at, "as=int or as=number beside min=/max=")
        if self.bounds:
            low = self.bounds.get("min")
            high = self.bounds.get("max")
            try:
                number_pattern(
                    self.value_class == "int",
                    None if low is None else parse_bound(low[0]),
                    None if high is None else parse_bound(high[0]),
                )
            except PatternError as error:
                at = (high or low or ("", self.start))[1]
                raise self.error(str(error), at, "min= at most max=") from error

    def build(self) -> MaskSpan:
        low, high = self.length if self.length is not None else (0, 0)  # choice: length set later
        line, column = _line_column(self.source, self.start)
        return MaskSpan(
            index=self.index,
            min_tokens=low,
            max_tokens=high,
            name=self.name,
            musts=tuple(self.musts),
            value_class=self.value_class,
            choices=self.choices,
            line=line,
            column=column,
            patterns=tuple(self.patterns),
            minimum=self.bounds["min"][0] if "min" in self.bounds else None,
            maximum=self.bounds["max"][0] if "max" in self.bounds else None,
        )

    # -- low-level reading --

    def error(self, message: str, offset: int, expected: str | None = None) -> DocumentError:
        return self.parser.error(message, offset, expected)

    def peek(self) -> str:
        return self.source[self.pos] if self.pos < len(self.source) else ""

    def skip_spaces(self) -> None:
        while self.peek() == " ":
            self.pos += 1

    def check_open(self) -> None:
        """A tag may not run past the end of its line."""
        if self.peek() in ("", "\n"):
            raise self.unclosed(_describe(self.peek()))

    def unclosed(self, found: str) -> DocumentError:
        return self.error(f"unclosed tag: found {found} before ']'", self.start, "']' to close the tag")

    def what_ends_unclosed(self) -> str | None:
        """None when a `]` comes on this line before any other tag opens; else what comes first
        (the tag was never closed: `Hello [MASK 3 world` is text after an unclosed tag)."""
        newline = self.source.find("\n", self.pos)
        end = len(self.source) if newline < 0 else newline
        opener = _OPENER.search(self.source, self.pos, end)
        if self.source.find("]", self.pos, end if opener is None else opener.start()) >= 0:
            return None
        if opener is not None:
            return "another '[MASK'"
        return _describe(self.source[end : end + 1])

    def unexpected(self, expected: str) -> None:
        self.check_open()
        raise self.error(f"unexpected {_describe(self.peek())}", self.pos, expected)

    def read(self, pattern: re.Pattern[str]) -> str:
        """Consume what `pattern` matches here; every pattern used may match the empty string."""
        match = pattern.match(self.source, self.pos)
        assert match is not None
        self.pos = match.end()
        return match.group()

    # -- items --

    def read_first_item(self) -> None:
        """The first item is the length, or an option (choice= takes the length's place)."""
        at = self.pos
        if not self.peek().isdigit():
            key = self.read(_WORD)
            if key and self.peek() == "=":
                self.option(key, at)
                return
            self.pos = at
        self.read_length()

    def read_option(self) -> None:
        at = self.pos
        key = self.read(_WORD)
        if not key:
            raise self.error(f"unexpected {_describe(self.peek())}", at, f"an option: {_KNOWN_OPTIONS}")
        if self.peek() != "=" and (found := self.what_ends_unclosed()) is not None:
            raise self.unclosed(found)  # a word, not an option: the tag should have closed before it
        if key in _OPTIONS and self.peek() != "=":
            raise self.error(f"expected '=' after {key}, found {_describe(self.peek())}", self.pos, f"{key}=")
        self.option(key, at)

    def option(self, key: str, at: int) -> None:
        if key not in _OPTIONS:
            raise self.error(f"unknown option {_show(key)}", at, _KNOWN_OPTIONS)
        if key in _SINGLE_OPTIONS and key in self.seen:
            raise self.error(f"option {key}= given twice", at, f"{key}= at most once")
        self.seen.add(key)
        self.pos += 1  # the '='
        if key == "name":
            self.read_name()
        elif key == "as":
            self.refuse_with_choice(key, at)
            self.read_class()
        elif key == "must":
            self.refuse_with_choice(key, at)
            self.read_must()
        elif key == "re":
            self.refuse_with_choice(key, at)
            self.read_pattern()
        elif key in ("min", "max"):
            self.refuse_with_choice(key, at)
            self.read_bound(key)
        else:
            self.check_choice_alone(at)
            self.read_choice()

    def read_length(self) -> None:
        at = self.pos
        token = self.read(_VALUE)
        match = _LENGTH.fullmatch(token)
        if match is None:
            raise self.error(f"invalid length {_show(token)}", at, _LENGTH_EXPECTED)
        low = _to_int(match[1])
        high = low if match[2] is None else _to_int(match[2])
        self.check_length(token, at, low, high, is_range=match[2] is not None)
        self.length = (low, high)

    def check_length(self, token: str, at: int, low: int, high: int, *, is_range: bool) -> None:
        limit = self.parser.limits.max_span_tokens
        shown = _show(token)
        if not is_range and not 1 <= low <= limit:
            raise self.error(f"length {shown} is out of range", at, f"a length from 1 to {limit}")
        if is_range and low > high:
            raise self.error(f"range {shown} runs backwards", at, "a range a-b with a <= b")
        if is_range and high < 1:
            raise self.error(f"range {shown} allows no tokens", at, "a range whose upper end is at least 1")
        if is_range and high > limit:
            raise self.error(f"range {shown} is out of range", at, f"an upper end of at most {limit}")

    # -- option values --

    def read_name(self) -> None:
        at = self.pos
        value = self.read(_VALUE)
        if not _NAME.fullmatch(value):
            raise self.error(
                f"bad name {_show(value)}",
                at,
                "an identifier: a letter or _, then letters, digits or _, at most 64 characters",
            )
        if value in self.parser.names:
            raise self.error(f"duplicate name {_show(value)}", at, "a name no other span uses")
        self.parser.names.add(value)
        self.name = value

    def read_class(self) -> None:
        at = self.pos
        value = self.read(_VALUE)
        if value not in VALUE_CLASSES:
            raise self.error(f"unknown as class {_show(value)}", at, "one of " + ", ".join(VALUE_CLASSES))
        self.value_class = value  # narrowed to ValueClass by the check above

    def read_pattern(self) -> None:
        quote = self.pos
        parts, _ = self.read_quoted("re", split_pipes=False)
        pattern = "".join(parts[0])
        try:
            checked_pattern(pattern)
        except PatternError as error:
            raise self.error(f"re= {error}", quote, "a regular expression in Python re syntax") from error
        self.patterns.append(pattern)

    def read_bound(self, key: str) -> None:
        at = self.pos
        value = self.read(_VALUE)
        try:
            parse_bound(value)
        except PatternError as error:
            raise self.error(f"{key}= {error}", at, "a number such as 2, -40 or 0.5") from error
        self.bounds[key] = (value, at)

    def read_must(self) -> None:
        quote = self.pos
        parts, _ = self.read_quoted("must", split_pipes=False)
        text = "".join(parts[0])  # not split on |, so there is exactly one part
        if not text:
            raise self.error("must text is empty", quote, "a non-empty quoted text")
        offset = self.read_offset() if self.peek() == "@" else None
        self.musts.append(Must(text, offset))

    def read_offset(self) -> int:
        self.pos += 1  # the '@'
        at = self.pos
        digits = self.read(_DIGITS)
        if not digits:
            found = _describe(self.peek())
            raise self.error(f"expected a token offset after '@', found {found}", at, "a non-negative integer like @3")
        offset = _to_int(digits)
        if self.length is not None and offset >= self.length[1]:
            high = self.length[1]
            raise self.error(
                f"must offset @{_show(digits)[1:-1]} is outside a span of at most {high} tokens",
                at,
                f"an offset from 0 to {high - 1}",
            )
        return offset

    def read_choice(self) -> None:
        quote = self.pos
        parts, starts = self.read_quoted("choice", split_pipes=True)
        if len(parts) < 2:
            raise self.error("choice needs at least 2 options", quote, 'options separated by |, like choice="yes|no"')
        for part, at in zip(parts, starts, strict=False):
            if not part:
                raise self.error("empty choice option", at, "a non-empty option between | separators")
        limit = self.parser.limits.max_choice_options
        if len(parts) > limit:
            raise self.error(
                f"choice has {len(parts)} options; the limit is {limit} (max_choice_options)",
                quote,
                f"at most {limit} options",
            )
        self.choices = tuple("".join(part) for part in parts)

    def refuse_with_choice(self, key: str, at: int) -> None:
        if self.choices is not None:
            raise self.error(f"{key}= cannot be combined with choice=", at, f"either choice= or {key}=")

    def check_choice_alone(self, at: int) -> None:
        if self.length is not None:
            raise self.error("choice= cannot be combined with a length", at, "either a length or choice=")
        if self.musts:
            raise self.error("choice= cannot be combined with must=", at, "either choice= or must=")
        if self.value_class is not None:
            raise self.error("choice= cannot be combined with as=", at, "either choice= or as=")
        if self.patterns or self.bounds:
            raise self.error("choice= cannot be combined with re=, min= or max=", at, "either choice= or re=")

    def read_quoted(self, key: str, *, split_pipes: bool) -> tuple[list[list[str]], list[int]]:
        """Read a "..." string: `\\"` and `\\\\` are escapes (and `\\|` when splitting on `|`); other
        backslashes are kept. Returns the parts (one unless split) and each part's source offset."""
        quote = self.pos
        if self.peek() != '"':
            raise self.error(
                f"expected a quoted string after {key}=, found {_describe(self.peek())}", quote, f'{key}="..."'
            )
        escapable = '"\\|' if split_pipes else '"\\'
        parts: list[list[str]] = [[]]
        starts = [quote + 1]
        source, i = self.source, quote + 1
        while i < len(source) and source[i] not in '"\n':
            char = source[i]
            if char == "\\" and i + 1 < len(source) and source[i + 1] in escapable:
                parts[-1].append(source[i + 1])
                i += 2
                continue
            if char == "|" and split_pipes:
                parts.append([])
                starts.append(i + 1)
            else:
                parts[-1].append(char)
            i += 1
        if i >= len(source) or source[i] == "\n":
            raise self.error("unterminated quoted string", quote, 'a closing " on the same line')
        self.pos = i + 1
        return parts, starts
