"""JSON Schema → JSON template (docs/batch.md, "From a JSON Schema").

Only keywords whose meaning the filled output is guaranteed to satisfy are accepted; any other
keyword is named in the error with its place in the schema, rather than silently ignored.
Pure Python: no torch import.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from editor.batch.template import Template, TemplateError, View, json_path
from editor.document import Document, DocumentLimits, MaskSpan
from editor.parser import render_document

__all__ = ["CHARS_PER_TOKEN", "DEFAULT_STRING_TOKENS", "SchemaError", "SchemaTemplate", "template_from_schema"]

CHARS_PER_TOKEN = 4  # a typical English BPE token; maxLength M gives a span of about M/4 tokens
DEFAULT_STRING_TOKENS = 16  # a string with no maxLength: up to this many tokens
NUMBER_TOKENS = 4  # integers and numbers: 1 to this many tokens
DEFAULT_ITEMS = 1  # an array with neither minItems nor maxItems

# Annotations, and keywords that every output satisfies by construction (every property is
# filled, so `required` holds; only listed properties appear, so `additionalProperties` holds).
_IGNORED = {
    "$schema",
    "$id",
    "$comment",
    "title",
    "description",
    "examples",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
    "required",
    "additionalProperties",
}
_BY_TYPE = {
    "object": {"type", "properties"},
    "array": {"type", "items", "minItems", "maxItems"},
    "string": {"type", "maxLength", "minLength", "enum", "const"},
    "integer": {"type", "const"},
    "number": {"type", "const"},
    "boolean": {"type", "const"},
    "null": {"type", "const"},
    "const": {"const"},
}


class SchemaError(TemplateError):
    """A schema that cannot become a template; the path is the place in the schema."""


@dataclass(frozen=True)
class SchemaTemplate:
    """The derived template (as a JSON value), the instruction built from descriptions, and the
    character limits of strings with maxLength (by output JSON path)."""

    value: Any
    instruction: str | None
    max_chars: dict[str, int] = field(default_factory=dict)
    strings: frozenset[str] = frozenset()  # string enums that a template would read as booleans

    def compile(
        self, limits: DocumentLimits | None = None, *, instruction: str | None = None, view: View = "prose"
    ) -> Template:
        """The template; an explicit instruction goes before the descriptions' hints. A schema has
        no placeholders, so each record is shown above the fields it shapes."""
        text = "\n".join(part for part in (instruction, self.instruction) if part) or None
        return Template.from_value(
            self.value,
            limits=limits,
            instruction=text,
            max_chars=self.max_chars,
            strings=self.strings,
            view=view,
            show_record=True,
        )

    @property
    def text(self) -> str:
        return json.dumps(self.value, ensure_ascii=False, indent=2)


def template_from_schema(schema_text: str, limits: DocumentLimits | None = None) -> SchemaTemplate:
    """Derive a template from JSON Schema text; raises SchemaError naming unsupported keywords."""
    try:
        schema = json.loads(schema_text)
    except json.JSONDecodeError as error:
        raise SchemaError(
            f"not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}", expected="a JSON Schema"
        ) from error
    deriver = _Deriver(limits or DocumentLimits())
    value = deriver.node(schema, "#", "$")
    if deriver.unsupported:
        raise SchemaError(
            "unsupported keywords: " + ", ".join(deriver.unsupported),
            path="#",
            expected="only type, properties, items, minItems, maxItems, maxLength, minLength, enum, const, "
            "and annotations such as description",
        )
    hints = "\n".join(f"- {where}: {text}" for where, text in deriver.hints)
    instruction = f"Fill in each field. Field descriptions:\n{hints}" if hints else None
    return SchemaTemplate(value, instruction, deriver.max_chars, frozenset(deriver.enum_strings))


@dataclass
class _Deriver:
    limits: DocumentLimits
    unsupported: list[str] = field(default_factory=list)
    hints: list[tuple[str, str]] = field(default_factory=list)
    max_chars: dict[str, int] = field(default_factory=dict)
    enum_strings: list[str] = field(default_factory=list)

    def node(self, schema: Any, where: str, path: str) -> Any:
        """`where` is the place in the schema (JSON pointer), `path` the place in the output."""
        if not isinstance(schema, dict):
            raise SchemaError("a schema must be a JSON object", path=where, expected="an object such as {'type': ...}")
        if isinstance(schema.get("description"), str):
            self.hints.append((path, schema["description"]))
        kind = self.kind(schema, where)
        allowed = _BY_TYPE[kind] | _IGNORED
        self.unsupported += [f"{key} at {where}" for key in schema if key not in allowed]
        if "const" in schema:
            return _literal(schema["const"])
        if kind == "object":
            properties = schema.get("properties", {})
            if not isinstance(properties, dict):
                raise SchemaError("properties must be an object", path=f"{where}/properties")
            return {
                key: self.node(item, f"{where}/properties/{key}", json_path(path, key))
                for key, item in properties.items()
            }
        if kind == "array":
            count = _item_count(schema, where)
            items = schema.get("items", {"type": "string"})
            return [self.node(items, f"{where}/items", json_path(path, i)) for i in range(count)]
        if kind == "string":
            return self.string(schema, where, path)
        if kind == "integer":
            return _tag(MaskSpan(0, 1, NUMBER_TOKENS, value_class="int"))
        if kind == "number":
            return _tag(MaskSpan(0, 1, NUMBER_TOKENS, value_class="number"))
        if kind == "boolean":
            return _tag(MaskSpan(0, 0, 0, choices=("true", "false")))
        return None  # null

    def kind(self, schema: dict[str, Any], where: str) -> str:
        kind = schema.get("type")
        if kind is None and "enum" in schema:
            kind = "string"
        if kind is None and "const" in schema:
            return "const"
        if kind is None and "properties" in schema:
            kind = "object"
        if not isinstance(kind, str) or kind not in _BY_TYPE:
            raise SchemaError(
                f"type {json.dumps(kind)} is not supported",
                path=where,
                expected="one of " + ", ".join(_BY_TYPE) + " (a single type, not a list)",
            )
        return kind

    def string(self, schema: dict[str, Any], where: str, path: str) -> Any:
        if "enum" in schema:
            options = schema["enum"]
            if not (isinstance(options, list) and options and all(isinstance(o, str) and o for o in options)):
                raise SchemaError("enum must list non-empty strings", path=f"{where}/enum", expected="strings")
            self.enum_strings.append(path)
            return _tag(MaskSpan(0, 0, 0, choices=tuple(options)))
        max_length = _count(schema, "maxLength", where)
        min_length = _count(schema, "minLength", where) or 0
        if max_length is not None and min_length > max_length:
            raise SchemaError("minLength is over maxLength", path=where)
        if max_length == 0:
            return ""
        tokens = DEFAULT_STRING_TOKENS if max_length is None else math.ceil(max_length / CHARS_PER_TOKEN)
        # Every token is at least one character, so minLength tokens give at least minLength characters.
        high = max(1, min(self.limits.max_span_tokens, max(tokens, min_length)))
        low = min(max(1, min_length), high)  # an empty string is valid but never what was asked for
        if max_length is not None:
            self.max_chars[path] = max_length
        return _tag(MaskSpan(0, low, high))


def _count(schema: dict[str, Any], key: str, where: str) -> int | None:
    value = schema.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SchemaError(f"{key} must be a non-negative integer", path=f"{where}/{key}")
    return value


def _item_count(schema: dict[str, Any], where: str) -> int:
    """minItems when given (also when maxItems differs: the minimum is always valid), else
    DEFAULT_ITEMS capped by maxItems."""
    low, high = _count(schema, "minItems", where), _count(schema, "maxItems", where)
    if low is not None and high is not None and low > high:
        raise SchemaError("minItems is over maxItems", path=where)
    if low is not None:
        return low
    return DEFAULT_ITEMS if high is None else min(DEFAULT_ITEMS, high)


def _tag(span: MaskSpan) -> str:
    return render_document(Document((span,)))


def _literal(value: Any) -> Any:
    """A pinned value: strings have their braces doubled and `[MASK` escaped so they stay literal."""
    if isinstance(value, str):
        return render_document(Document((value.replace("{", "{{").replace("}", "}}"),)))
    if isinstance(value, list):
        return [_literal(item) for item in value]
    if isinstance(value, dict):
        return {key: _literal(item) for key, item in value.items()}
    return value
