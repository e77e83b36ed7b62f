"""JSON templates (docs/batch.md): a JSON document whose string values hold `[MASK ...]` tags and
`{field}` placeholders, turned into one editor document per record, and the filled spans turned
back into JSON.

What the model sees is a view of the template: by default prose, one "Label: value" line per
field (`view="prose"`), or the JSON text itself (`view="json"`: braces, keys, quotes, commas).
Either way the output is not parsed from the filled text: it is rebuilt from the template's
structure and each span's text, so it always parses. A template derived from a schema has no
placeholders, so the record is shown above the fields (`show_record`). The per-record `Document`
is built from segments directly (never re-parsed), so a record value containing `[MASK` or braces
stays literal text. Pure Python: no torch import.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from editor.document import Document, DocumentError, DocumentLimits, MaskSpan
from editor.parser import parse_document

if TYPE_CHECKING:
    from editor.canvas import SpanFill  # editor.canvas imports torch; this module does not

__all__ = [
    "RecordDocument",
    "RecordError",
    "Template",
    "TemplateError",
    "json_path",
]

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_FIELD_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.([A-Za-z_][A-Za-z0-9_-]*|[0-9]+))*")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_BOOLEAN_CHOICES = frozenset({"true", "false"})


class TemplateError(ValueError):
    """A template that cannot run: bad JSON, a bad tag or placeholder. Names the JSON path and,
    for mistakes inside a string value, the line and column inside that string."""

    def __init__(self, message: str, *, path: str = "$", expected: str | None = None) -> None:
        self.message = message
        self.path = path
        self.expected = expected
        detail = f"{path}: {message}"
        if expected:
            detail += f" (expected {expected})"
        super().__init__(detail)

    def to_dict(self) -> dict[str, object]:
        return {"message": self.message, "path": self.path, "expected": self.expected}


class RecordError(ValueError):
    """One record that cannot be filled; it becomes that record's `error` line, never a crash."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    def __reduce__(self) -> tuple[type[RecordError], tuple[str, str]]:
        """Survives pickling (records and results cross to Ray Data workers and back)."""
        return type(self), (self.code, self.message)


def json_path(parent: str, key: str | int) -> str:
    """`$.a.b[0]`, with `["odd key"]` for keys that are not identifiers."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    if _IDENTIFIER.fullmatch(key):
        return f"{parent}.{key}"
    return f"{parent}[{json.dumps(key, ensure_ascii=False)}]"


# --- the compiled template ---------------------------------------------------------------------


@dataclass(frozen=True)
class Placeholder:
    """`{a.b.0}`: a record field by dotted path (keys of objects, indexes of arrays)."""

    path: tuple[str, ...]
    where: str  # the JSON path of the template string that holds it

    @property
    def name(self) -> str:
        return ".".join(self.path)

    def lookup(self, record: Mapping[str, Any]) -> Any:
        value: Any = record
        for part in self.path:
            if isinstance(value, Mapping) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                raise RecordError("missing_field", f"the record has no field {self.name!r} (used at {self.where})")
        return value


Piece: TypeAlias = "str | Placeholder | MaskSpan"
ValueKind = Literal["int", "number", "boolean", "json"]
View = Literal["prose", "json"]
VIEWS: tuple[View, ...] = ("prose", "json")
HIDDEN_RECORD_FIELDS = frozenset({"id", "custom_id"})  # ids say nothing the model could write about


@dataclass(frozen=True)
class TextNode:
    """A string value: literal text, placeholders and spans. Output: a JSON string."""

    path: str
    pieces: tuple[Piece, ...]
    max_chars: int | None = None  # from a schema's maxLength: longer fills are cut to it


@dataclass(frozen=True)
class FieldNode:
    """A string value that is exactly one placeholder: the record's value, any JSON type."""

    path: str
    placeholder: Placeholder


@dataclass(frozen=True)
class SpanValueNode:
    """A string value that is exactly one `as=int`/`as=number` tag (a JSON number) or one
    `choice="true|false"` tag (a JSON boolean): unquoted on the canvas and in the output."""

    path: str
    span: MaskSpan
    kind: ValueKind


@dataclass(frozen=True)
class ConstNode:
    value: Any  # a JSON number, boolean or null, pinned


@dataclass(frozen=True)
class ObjectNode:
    items: tuple[tuple[str, Node], ...]


@dataclass(frozen=True)
class ArrayNode:
    items: tuple[Node, ...]


Node: TypeAlias = "TextNode | FieldNode | SpanValueNode | ConstNode | ObjectNode | ArrayNode"
# (what, literal or span number, part number); a "label_span" follows a prose label ("Name: "), whose
# space the fill may have taken: the output drops it.
Ref: TypeAlias = tuple[Literal["part", "span", "label_span", "empty"], int, int]


@dataclass(frozen=True)
class Template:
    """A compiled template. `render(record)` gives the record's document; see `RecordDocument`."""

    root: Node
    span_keys: tuple[str, ...]  # the key of each span in the output's "spans", in document order
    instruction: tuple[str | Placeholder, ...] | None = None
    source: str = ""
    view: View = "prose"
    show_record: bool = False  # the record's fields go above the template's (schemas have no placeholders)

    @classmethod
    def parse(
        cls,
        text: str,
        *,
        limits: DocumentLimits | None = None,
        instruction: str | None = None,
        max_chars: Mapping[str, int] | None = None,
        view: View = "prose",
    ) -> Template:
        """Compile template text; raises TemplateError (with the JSON path) for any mistake.
        `max_chars` maps JSON paths of string values to a character limit (schema maxLength)."""
        try:
            value = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as error:
            raise TemplateError(
                f"not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}", expected="a JSON document"
            ) from error
        except _DuplicateKey as error:
            raise TemplateError(f"the key {error.key!r} appears twice in one object", expected="unique keys") from error
        return cls.from_value(
            value, limits=limits, instruction=instruction, max_chars=max_chars, source=text, view=view
        )

    @classmethod
    def from_value(
        cls,
        value: Any,
        *,
        limits: DocumentLimits | None = None,
        instruction: str | None = None,
        max_chars: Mapping[str, int] | None = None,
        source: str | None = None,
        strings: frozenset[str] = frozenset(),
        view: View = "prose",
        show_record: bool = False,
        json_values: frozenset[str] = frozenset(),
    ) -> Template:
        """`strings`: JSON paths whose value stays a JSON string even when it is one
        `choice="true|false"` tag (a schema's string enum of "true" and "false"). `json_values`:
        JSON paths whose one tag writes JSON text (a schema's anyOf, nullable type, mixed enum or
        number range), parsed into the output as it is."""
        compiler = _Compiler(limits or DocumentLimits(), dict(max_chars or {}), strings, json_values)
        root = compiler.node(value, "$")
        if not compiler.keys:
            raise TemplateError("the template has no [MASK ...] tag", expected="at least one mask span to fill")
        instruction_pieces = None
        if instruction is not None:
            instruction_pieces = tuple(
                p for p in _split_placeholders(instruction, "instruction") if not isinstance(p, MaskSpan)
            )
        text = source if source is not None else json.dumps(value, ensure_ascii=False)
        return cls(root, tuple(compiler.keys), instruction_pieces, text, view, show_record)

    @property
    def fields(self) -> list[str]:
        """The record fields the template reads, in order of first use."""
        seen: dict[str, None] = {}
        for node in _walk(self.root):
            if isinstance(node, FieldNode):
                seen[node.placeholder.name] = None
            elif isinstance(node, TextNode):
                for piece in node.pieces:
                    if isinstance(piece, Placeholder):
                        seen[piece.name] = None
        return list(seen)

    def render(self, record: Mapping[str, Any]) -> RecordDocument:
        """The record's document (raises RecordError for a missing field)."""
        builder = _DocumentBuilder(record, self.view)
        # What the record says beyond the fields the template shows ("Material: mesh") shapes what
        # the model writes about it; a schema's template shows no field, so all of the record.
        builder.record_fields(frozenset() if self.show_record else frozenset(self.fields))
        if self.view == "prose":
            builder.prose(self.root, "", 0)
        else:
            builder.node(self.root)
        instruction = None
        if self.instruction is not None:
            instruction = "".join(p if isinstance(p, str) else _as_text(p.lookup(record)) for p in self.instruction)
        return RecordDocument(
            document=Document(tuple(builder.segments)),
            instruction=instruction,
            template=self,
            record=record,
            literal_parts=builder.literal_parts,
            layout=tuple(builder.layout),
            number_spans=frozenset(builder.number_spans),
        )


@dataclass(frozen=True)
class LiteralPart:
    """A piece of literal canvas text; `raw` is its string content when it is inside a JSON
    string (the canvas holds it JSON-escaped), None for skeleton text."""

    canvas: str
    raw: str | None


@dataclass(frozen=True)
class RecordDocument:
    """One record's document and what is needed to rebuild the JSON from its span results."""

    document: Document
    instruction: str | None
    template: Template
    record: Mapping[str, Any]
    literal_parts: tuple[tuple[LiteralPart, ...], ...]  # the parts of literal i (before span i; last: after all)
    layout: tuple[Ref, ...]  # where each string piece and value span went, in template order
    number_spans: frozenset[int] = frozenset()  # span indexes whose fill becomes a JSON number

    def build(self, spans: Sequence[SpanFill]) -> tuple[Any, dict[str, dict[str, Any]]]:
        """(output JSON value, spans by key) from the fill's spans (in document order).

        Rendering may move the one space that ends a literal into the following fill (the fill
        brought its own); the literal's string content loses that space too. Raises RecordError
        when a number span did not produce a number."""
        if len(spans) != len(self.template.span_keys):
            raise RecordError("fill_failed", f"expected {len(self.template.span_keys)} spans, got {len(spans)}")
        kept = _kept_literals(self.literal_parts, spans)
        reader = _OutputReader(spans, kept, self.layout, self.record)
        output = reader.node(self.template.root)
        by_key = {
            key: {"text": span.text, "confidence": round(span.confidence, 6)}
            for key, span in zip(self.template.span_keys, spans, strict=True)
        }
        return output, by_key


# --- compiling ------------------------------------------------------------------------------


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


@dataclass
class _Compiler:
    limits: DocumentLimits
    max_chars: dict[str, int]
    strings: frozenset[str] = frozenset()
    json_values: frozenset[str] = frozenset()
    keys: list[str] = field(default_factory=list)

    def node(self, value: Any, path: str) -> Node:
        if isinstance(value, dict):
            return ObjectNode(tuple((key, self.node(item, json_path(path, key))) for key, item in value.items()))
        if isinstance(value, list):
            return ArrayNode(tuple(self.node(item, json_path(path, i)) for i, item in enumerate(value)))
        if isinstance(value, str):
            return self.string(value, path)
        if isinstance(value, float) and not math.isfinite(value):
            raise TemplateError("NaN and Infinity are not JSON", path=path, expected="a finite number")
        return ConstNode(value)

    def string(self, text: str, path: str) -> Node:
        pieces = _split_placeholders(text, path, self.limits)
        spans = [p for p in pieces if isinstance(p, MaskSpan)]
        if len(self.keys) + len(spans) > self.limits.max_spans:
            raise TemplateError(
                f"the template has more than {self.limits.max_spans} mask spans",
                path=path,
                expected=f"at most {self.limits.max_spans} spans",
            )
        if len(pieces) == 1 and isinstance(pieces[0], Placeholder):
            return FieldNode(path, pieces[0])
        if len(pieces) == 1 and isinstance(pieces[0], MaskSpan) and path in self.json_values:
            self.add_key(pieces[0], path, alone=True)
            return SpanValueNode(path, replace(pieces[0], min_tokens=max(1, pieces[0].min_tokens)), "json")
        if len(pieces) == 1 and isinstance(pieces[0], MaskSpan):
            kind = _value_kind(pieces[0])
            if kind is not None and not (kind == "boolean" and path in self.strings):
                self.add_key(pieces[0], path, alone=True)
                span = pieces[0]
                if kind != "boolean":  # an empty fill is no number: one token at least
                    span = replace(span, min_tokens=max(1, span.min_tokens))
                return SpanValueNode(path, span, kind)
        for span in spans:
            self.add_key(span, path, alone=len(spans) == 1)
        return TextNode(path, tuple(pieces), self.max_chars.get(path))

    def add_key(self, span: MaskSpan, path: str, *, alone: bool) -> None:
        key = span.name if span.name is not None else (path if alone else f"{path}#{span.index}")
        if key in self.keys:
            raise TemplateError(f"two spans are named {key!r}", path=path, expected="a unique name= per span")
        self.keys.append(key)


def _value_kind(span: MaskSpan) -> ValueKind | None:
    if span.choices is not None:
        return "boolean" if len(span.choices) == 2 and set(span.choices) == _BOOLEAN_CHOICES else None
    if span.value_class == "int":
        return "int"
    if span.value_class == "number":
        return "number"
    return None


def _json_by_default(span: MaskSpan) -> MaskSpan:
    """A string's span without `as=` or `choice=` uses the `json` class: inside the JSON view's
    quotes it cannot close the string, and on a prose line it cannot run into the next line (nor
    loop on quotes and backslashes, which a weak model will)."""
    plain = span.value_class is None and span.choices is None and not span.patterns
    return replace(span, value_class="json") if plain else span


# Unit and currency suffixes a label shows in brackets: `price_eur` reads "Price (EUR)".
_UNITS = {"eur": "EUR", "usd": "USD", "gbp": "GBP", "chf": "CHF", "jpy": "JPY", "kg": "kg", "g": "g", "cm": "cm"}
_UNITS |= {"mm": "mm", "km": "km", "ml": "ml", "pct": "%", "percent": "%"}


def label(key: str) -> str:
    """A key as a prose label: `price_eur` -> "Price (EUR)", `inStock` -> "In stock", `SKU` stays."""
    words = _CAMEL.sub(" ", key).replace("_", " ").replace("-", " ").split()
    unit = _UNITS.get(words[-1].lower()) if len(words) > 1 else None
    if unit is not None:
        words = words[:-1]
    text = " ".join(word if word.isupper() else word.lower() for word in words)
    if unit is not None:
        text += f" ({unit})"
    return text[:1].upper() + text[1:] if text else json.dumps(key, ensure_ascii=False)


def _prose_text(text: str) -> str:
    """A record value on a prose line: newlines shown as spaces, one character for one, so the
    canvas keeps the value's length (the output keeps the newlines)."""
    return text.replace("\r", " ").replace("\n", " ")


def _split_placeholders(text: str, path: str, limits: DocumentLimits | None = None) -> list[Piece]:
    """Parse a template string: tags first (so a tag's quoted text keeps its braces), then
    `{field}` placeholders in the literal text between them."""
    try:
        document = parse_document(text, limits)
    except DocumentError as error:
        raise TemplateError(
            f"line {error.line}, column {error.column} of this string: {error.message}",
            path=path,
            expected=error.expected,
        ) from error
    pieces: list[Piece] = []
    for segment in document.segments:
        if isinstance(segment, MaskSpan):
            pieces.append(segment)
            continue
        literal: list[str] = []
        position = 0
        for match in _PLACEHOLDER.finditer(segment):
            literal.append(segment[position : match.start()])
            position = match.end()
            token = match.group(0)
            if token in ("{{", "}}"):
                literal.append(token[0])
                continue
            name = match.group(1)
            if name is None:
                raise TemplateError(
                    f"a lone {token!r} in {_excerpt(segment, match.start())}",
                    path=path,
                    expected="{field} for a record field, or {{ and }} for literal braces",
                )
            name = name.strip()
            if not _FIELD_PATH.fullmatch(name):
                raise TemplateError(
                    f"{{{name}}} is not a field name",
                    path=path,
                    expected="a field name or dotted path such as {user.name} ({{ and }} for literal braces)",
                )
            if literal:
                pieces.append("".join(literal))
                literal = []
            pieces.append(Placeholder(tuple(name.split(".")), path))
        literal.append(segment[position:])
        if "".join(literal):
            pieces.append("".join(literal))
    return _merge_literals(pieces)


def _merge_literals(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        elif not (isinstance(piece, str) and not piece):
            merged.append(piece)
    return merged


def _excerpt(text: str, at: int) -> str:
    return json.dumps(text[max(0, at - 12) : at + 12], ensure_ascii=False)


def _walk(node: Node) -> Iterator[Node]:
    yield node
    if isinstance(node, ObjectNode):
        for _, item in node.items:
            yield from _walk(item)
    elif isinstance(node, ArrayNode):
        for item in node.items:
            yield from _walk(item)


# --- rendering a record ---------------------------------------------------------------------


def _as_text(value: Any) -> str:
    """A record value inside a string: strings as they are, anything else as its JSON text."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _escaped(text: str) -> str:
    """`text` as it appears between the quotes of a JSON string."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


@dataclass
class _DocumentBuilder:
    """Lays a record out as document segments, remembering where each string's pieces went."""

    record: Mapping[str, Any]
    view: View
    segments: list[str | MaskSpan] = field(default_factory=list)
    parts: list[LiteralPart] = field(default_factory=list)  # of the literal being written
    literals: list[tuple[LiteralPart, ...]] = field(default_factory=list)  # finished literals
    layout: list[Ref] = field(default_factory=list)  # per string piece / value, in template order
    number_spans: list[int] = field(default_factory=list)

    @property
    def literal_parts(self) -> tuple[tuple[LiteralPart, ...], ...]:
        return (*self.literals, tuple(self.parts))

    def skeleton(self, text: str) -> None:
        self.literal(LiteralPart(text, None))

    def literal(self, part: LiteralPart) -> Ref:
        ref: Ref = ("part", len(self.literals), len(self.parts))
        if not part.canvas:
            return ("empty", 0, 0)
        self.parts.append(part)
        if self.segments and isinstance(self.segments[-1], str):
            self.segments[-1] += part.canvas
        else:
            self.segments.append(part.canvas)
        return ref

    def span(self, span: MaskSpan) -> Ref:
        index = len(self.literals)
        self.segments.append(replace(_json_by_default(span), index=index))
        self.literals.append(tuple(self.parts))
        self.parts = []
        return ("span", index, 0)

    def value_span(self, node: SpanValueNode) -> None:
        ref = self.span(node.span)
        if node.kind in ("int", "number"):
            self.number_spans.append(ref[1])
        self.layout.append(ref)

    def record_fields(self, shown_below: frozenset[str]) -> None:
        """The record above the template's fields, in the view's own form: ids left out, and the
        fields the template itself shows (`shown_below`)."""
        shown = {k: v for k, v in self.record.items() if k not in HIDDEN_RECORD_FIELDS | shown_below}
        if not shown:
            return
        if self.view == "json":
            self.skeleton("Record: " + json.dumps(shown, ensure_ascii=False) + "\n\n")
            return
        for key, value in shown.items():  # the same sheet as the fields below: one product, one page
            self.skeleton(f"{label(key)}: {_prose_text(_as_text(value))}\n")

    def prose(self, node: Node, prefix: str, depth: int) -> None:
        """One line per value: `prefix` is "Label: " or "- " (an array item), indented by depth;
        an object or array under a label starts its own indented lines."""
        indent = "  " * depth
        if isinstance(node, ObjectNode | ArrayNode):
            if prefix:
                self.skeleton(f"{indent}{prefix.rstrip()}\n")
                depth += 1
            if isinstance(node, ObjectNode):
                for key, item in node.items:
                    self.prose(item, f"{label(key)}: ", depth)
            else:
                for item in node.items:
                    self.prose(item, "- ", depth)
            return
        if isinstance(node, FieldNode) and node.placeholder.name in HIDDEN_RECORD_FIELDS:
            return  # an id line ("Id: p1") says nothing to write about, and its value leaks into fills
        self.skeleton(indent + prefix)
        if isinstance(node, ConstNode):
            self.skeleton(_prose_text(_as_text(node.value)))
        elif isinstance(node, FieldNode):
            self.skeleton(_prose_text(_as_text(node.placeholder.lookup(self.record))))
        elif isinstance(node, SpanValueNode):
            self.value_span(node)
        else:
            for number, piece in enumerate(node.pieces):
                if isinstance(piece, MaskSpan):
                    _, index, _ = self.span(piece)
                    # A pattern span's text is exactly its match: no space of the label's in it.
                    first = number == 0 and not piece.patterns
                    self.layout.append(("label_span" if first else "span", index, 0))
                else:
                    raw = piece if isinstance(piece, str) else _as_text(piece.lookup(self.record))
                    self.layout.append(self.literal(LiteralPart(_prose_text(raw), raw)))
        self.skeleton("\n")

    def node(self, node: Node) -> None:
        if isinstance(node, ObjectNode):
            self.skeleton("{")
            for number, (key, item) in enumerate(node.items):
                self.skeleton((", " if number else "") + json.dumps(key, ensure_ascii=False) + ": ")
                self.node(item)
            self.skeleton("}")
        elif isinstance(node, ArrayNode):
            self.skeleton("[")
            for number, item in enumerate(node.items):
                if number:
                    self.skeleton(", ")
                self.node(item)
            self.skeleton("]")
        elif isinstance(node, ConstNode):
            self.skeleton(json.dumps(node.value, ensure_ascii=False))
        elif isinstance(node, FieldNode):
            self.skeleton(json.dumps(node.placeholder.lookup(self.record), ensure_ascii=False))
        elif isinstance(node, SpanValueNode):
            self.value_span(node)
        else:
            self.skeleton('"')
            for piece in node.pieces:
                if isinstance(piece, MaskSpan):
                    self.layout.append(self.span(piece))
                else:
                    raw = piece if isinstance(piece, str) else _as_text(piece.lookup(self.record))
                    self.layout.append(self.literal(LiteralPart(_escaped(raw), raw)))
            self.skeleton('"')


# --- rebuilding the output ------------------------------------------------------------------


def _kept_literals(
    literal_parts: tuple[tuple[LiteralPart, ...], ...], spans: Sequence[SpanFill]
) -> list[list[str | None]]:
    """Per literal, each part's string content as it ended up in the filled text (None for
    skeleton parts): the same as written, except that the part right before a span may have lost
    the trailing space that rendering moved into the fill."""
    kept: list[list[str | None]] = []
    previous_end = 0
    for number, parts in enumerate(literal_parts):
        contents: list[str | None] = [p.raw for p in parts]
        if number < len(spans):
            written = sum(len(p.canvas) for p in parts)
            shown = spans[number].start - previous_end
            if written - shown == 1 and parts and parts[-1].raw is not None and parts[-1].raw.endswith(" "):
                contents[-1] = parts[-1].raw[:-1]
            previous_end = spans[number].end
        kept.append(contents)
    return kept


class _OutputReader:
    """Walks the template again in the order it was laid out, taking each string piece and each
    span from where the builder put it."""

    def __init__(
        self, spans: Sequence[SpanFill], kept: list[list[str | None]], layout: Sequence[Ref], record: Mapping[str, Any]
    ) -> None:
        self.spans = spans
        self.kept = kept
        self.layout = iter(layout)
        self.record = record

    def _take(self) -> str:
        kind, first, second = next(self.layout)
        if kind == "span":
            return self.spans[first].text
        if kind == "label_span":
            return self.spans[first].text.removeprefix(" ")
        if kind == "empty":
            return ""
        return self.kept[first][second] or ""

    def node(self, node: Node) -> Any:
        if isinstance(node, ObjectNode):
            return {key: self.node(item) for key, item in node.items}
        if isinstance(node, ArrayNode):
            return [self.node(item) for item in node.items]
        if isinstance(node, ConstNode):
            return node.value
        if isinstance(node, FieldNode):
            return node.placeholder.lookup(self.record)
        if isinstance(node, SpanValueNode):
            kind, number, _ = next(self.layout)
            assert kind == "span"
            return _span_value(node, self.spans[number])
        value = "".join(self._take() for _ in node.pieces)
        if node.max_chars is not None and len(value) > node.max_chars:
            value = value[: node.max_chars]
        return value


def _span_value(node: SpanValueNode, span: SpanFill) -> Any:
    """The span's JSON value. The runner gives number spans the JSON-number rules
    (`editor.constraints.json_number_place`), so the text is a JSON number; a pinned `must` could
    still spell something else, which is an error line."""
    text = span.text.strip()
    if node.kind == "boolean":
        return text == "true"
    if node.kind == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise RecordError(
                "invalid_value", f"the span at {node.path} produced {span.text!r}, which is not JSON"
            ) from None
    match = _JSON_NUMBER.fullmatch(text)
    if match is not None and node.kind == "int" and not match.group(2) and not match.group(3):
        return int(text)
    if match is not None and node.kind == "number" and not match.group(3):
        return float(text) if "." in text else int(text)
    raise RecordError(
        "invalid_value", f"the span at {node.path} produced {span.text!r}, which is not a JSON {node.kind}"
    )
