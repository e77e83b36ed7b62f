"""The parsed form of an editor document (docs/language.md).

A document is a sequence of literal text pieces and mask spans. This module holds only data types
and the error type; parsing lives in `editor.parser`. Pure Python: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeAlias

ValueClass: TypeAlias = Literal["int", "number", "word", "line", "json"]
VALUE_CLASSES: tuple[ValueClass, ...] = ("int", "number", "word", "line", "json")


class DocumentError(ValueError):
    """A document that cannot be run. Carries where (1-based line and column) and what was expected.

    The API turns it into a 422 response; the CLI prints `str(error)` on stderr.
    """

    def __init__(self, message: str, *, line: int, column: int, expected: str | None = None) -> None:
        self.message = message
        self.line = line
        self.column = column
        self.expected = expected
        detail = f"line {line}, column {column}: {message}"
        if expected:
            detail += f" (expected {expected})"
        super().__init__(detail)

    def to_dict(self) -> dict[str, object]:
        return {"message": self.message, "line": self.line, "column": self.column, "expected": self.expected}

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Survives pickling (a fill on a Ray replica sends it back to the server)."""
        return partial(type(self), line=self.line, column=self.column, expected=self.expected), (self.message,)


@dataclass(frozen=True)
class Must:
    """A text the span's fill must contain; `offset` is a token offset inside the span, or None
    for "wherever the model scores it best"."""

    text: str
    offset: int | None = None


@dataclass(frozen=True)
class MaskSpan:
    """One `[MASK ...]` tag.

    `min_tokens == max_tokens` for `[MASK n]`; `[MASK a-b]` gives a range. For a `choice=` span both
    are 0 until the choice is resolved against a tokenizer (the length is implied by the option).
    `line` and `column` locate the opening `[` (1-based) so later stages can report errors there.
    """

    index: int
    min_tokens: int
    max_tokens: int
    name: str | None = None
    musts: tuple[Must, ...] = ()
    value_class: ValueClass | None = None
    choices: tuple[str, ...] | None = None
    line: int = 1
    column: int = 1
    patterns: tuple[str, ...] = ()  # re="..." (may repeat): the whole fill matches every one
    minimum: str | None = None  # as=int|number min=...: the least value (decimal text)
    maximum: str | None = None  # as=int|number max=...: the greatest value (decimal text)

    @property
    def key(self) -> str:
        """How results are keyed: the name, else the 0-based index as text."""
        return self.name if self.name is not None else str(self.index)

    @property
    def is_choice(self) -> bool:
        return self.choices is not None


@dataclass(frozen=True)
class Document:
    """Literal text and spans in document order. Adjacent literals are merged by the parser, and
    empty literals are not stored, so two spans may be adjacent."""

    segments: tuple[str | MaskSpan, ...] = field(default_factory=tuple)

    @property
    def spans(self) -> tuple[MaskSpan, ...]:
        return tuple(s for s in self.segments if isinstance(s, MaskSpan))

    def span(self, key: str | int) -> MaskSpan:
        """Find a span by name or by 0-based index (an int or ASCII digits: `str.isdigit` would take
        `³`, `١` or `１` for indexes)."""
        for span in self.spans:
            if span.name is not None and span.name == key:
                return span
        if isinstance(key, int) or (isinstance(key, str) and key.isascii() and key.isdigit()):
            index = int(key)
            if 0 <= index < len(self.spans):
                return self.spans[index]
        raise KeyError(key)


@dataclass(frozen=True)
class DocumentLimits:
    """Limits checked while parsing. The settings object provides these to the server."""

    max_chars: int = 100_000
    max_spans: int = 64
    max_span_tokens: int = 512
    max_choice_options: int = 16
