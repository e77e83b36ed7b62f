"""JSON Schema → JSON template (docs/batch.md, "From a JSON Schema").

Only keywords whose meaning the filled output is guaranteed to satisfy are accepted; any other
keyword is named in the error with its place in the schema, rather than silently ignored.
Pure Python: no torch import.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from editor.batch.template import Template, TemplateError, View, json_path
from editor.document import Document, DocumentLimits, MaskSpan
from editor.parser import render_document
from editor.regexes import (
    FORMATS,
    JSON_STRING_CHAR,
    PatternError,
    json_string_content,
    length_bounds,
    number_pattern,
    searched_pattern,
)

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
    "$defs",  # read through $ref
    "definitions",
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
_NUMERIC = {"type", "const", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
_BY_TYPE = {
    "object": {"type", "properties"},
    "array": {"type", "items", "minItems", "maxItems"},
    "string": {"type", "maxLength", "minLength", "enum", "const", "pattern", "format"},
    "integer": _NUMERIC,
    "number": _NUMERIC,
    "boolean": {"type", "const", "enum"},
    "null": {"type", "const", "enum"},
    "const": {"const"},
}
SUPPORTED = (
    "type (one or a list), properties, items, minItems, maxItems, minLength, maxLength, pattern, format, "
    "minimum, maximum, exclusiveMinimum, exclusiveMaximum, enum, const, anyOf, $ref with $defs, "
    "and annotations such as description"
)
JSON_VALUE_TOKENS = 32  # a JSON value span (anyOf, nullable, mixed enum) with no length limit


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
    json_values: frozenset[str] = frozenset()  # paths whose span writes JSON text (anyOf, nullable, ranges)

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
            json_values=self.json_values,
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
    deriver = _Deriver(limits or DocumentLimits(), schema)
    value = deriver.node(schema, "#", "$")
    if deriver.unsupported:
        raise SchemaError(
            "unsupported keywords: " + ", ".join(dict.fromkeys(deriver.unsupported)),
            path="#",
            expected="only " + SUPPORTED,
        )
    hints = "\n".join(f"- {where}: {text}" for where, text in deriver.hints)
    instruction = f"Fill in each field. Field descriptions:\n{hints}" if hints else None
    return SchemaTemplate(
        value,
        instruction,
        deriver.max_chars,
        frozenset(deriver.enum_strings),
        frozenset(deriver.json_values),
    )


@dataclass
class _Deriver:
    limits: DocumentLimits
    root: Any = None
    unsupported: list[str] = field(default_factory=list)
    hints: list[tuple[str, str]] = field(default_factory=list)
    max_chars: dict[str, int] = field(default_factory=dict)
    enum_strings: list[str] = field(default_factory=list)
    json_values: list[str] = field(default_factory=list)  # output paths whose span writes JSON text
    expanding: list[str] = field(default_factory=list)  # $refs being expanded (a repeat is recursion)

    def node(self, schema: Any, where: str, path: str) -> Any:
        """`where` is the place in the schema (JSON pointer), `path` the place in the output."""
        schema, where, ref = self.resolved(schema, where)
        try:
            return self._node(schema, where, path)
        finally:
            if ref is not None:
                self.expanding.pop()

    def _node(self, schema: dict[str, Any], where: str, path: str) -> Any:
        if isinstance(schema.get("description"), str):
            self.hints.append((path, schema["description"]))
        if self.is_json_value(schema):
            return self.json_value(schema, where, path)
        kind = self.kind(schema, where)
        self.check_keys(schema, kind, where)
        if "const" in schema:
            return _literal(schema["const"])
        if kind == "object":
            return {
                key: self.node(item, f"{where}/properties/{key}", json_path(path, key))
                for key, item in self.properties(schema, where).items()
            }
        if kind == "array":
            count = _item_count(schema, where)
            items = schema.get("items", {"type": "string"})
            return [self.node(items, f"{where}/items", json_path(path, i)) for i in range(count)]
        if kind == "string":
            return self.string(schema, where, path)
        if kind in ("integer", "number"):
            return self.number(schema, kind, where, path)
        if kind == "boolean":
            return _tag(MaskSpan(0, 0, 0, choices=("true", "false")))
        return None  # null

    # -- $ref --

    def resolved(self, schema: Any, where: str) -> tuple[dict[str, Any], str, str | None]:
        """The schema with its `$ref` (a local JSON pointer such as #/$defs/name) merged in, where
        it now comes from, and the ref being expanded (None: no ref)."""
        if not isinstance(schema, dict):
            raise SchemaError("a schema must be a JSON object", path=where, expected="an object such as {'type': ...}")
        ref = schema.get("$ref")
        if ref is None:
            return schema, where, None
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"$ref {json.dumps(ref)} is not a local reference", path=where, expected='"#/$defs/name"')
        if ref in self.expanding:
            raise SchemaError(f"$ref {ref} refers to itself (recursive schemas are not supported)", path=where)
        target: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"$ref {ref} points at nothing", path=where, expected="a path into this schema")
            target = target[part]
        if not isinstance(target, dict):
            raise SchemaError(f"$ref {ref} is not a schema object", path=where)
        self.expanding.append(ref)
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        if "$ref" in target:  # a chain of refs
            merged["$ref"] = target["$ref"]
            inner, inner_where, inner_ref = self.resolved(merged, ref)
            if inner_ref is not None:
                self.expanding.pop()
            return inner, inner_where, ref
        return merged, ref, ref

    # -- what a node is --

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
                expected="one of " + ", ".join(t for t in _BY_TYPE if t != "const") + ", or a list of them",
            )
        return kind

    def is_json_value(self, schema: dict[str, Any]) -> bool:
        """Nodes written as one span of JSON text: alternatives (anyOf, a list of types) and enums
        that are not all non-empty strings."""
        if "anyOf" in schema or isinstance(schema.get("type"), list):
            return True
        options = schema.get("enum")
        return isinstance(options, list) and not (options and all(isinstance(o, str) and o for o in options))

    def check_keys(self, schema: dict[str, Any], kind: str, where: str) -> None:
        allowed = _BY_TYPE[kind] | _IGNORED
        self.unsupported += [f"{key} at {where}" for key in schema if key not in allowed]

    def properties(self, schema: dict[str, Any], where: str) -> dict[str, Any]:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise SchemaError("properties must be an object", path=f"{where}/properties")
        return properties

    # -- leaves --

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
        if any(key in schema for key in ("pattern", "format", "minLength", "maxLength")):
            patterns = self.string_patterns(schema, where)
            tokens = None
            if "pattern" not in schema and "format" not in schema:
                # Free text: about CHARS_PER_TOKEN characters a token, as before (the /v1 API budgets
                # max_tokens by it); the character limits themselves are exact.
                most = DEFAULT_STRING_TOKENS if max_length is None else math.ceil(max_length / CHARS_PER_TOKEN)
                tokens = max(1, most, math.ceil(min_length / CHARS_PER_TOKEN))
            return _tag(self.pattern_span(patterns, where, DEFAULT_STRING_TOKENS, allow_empty=False, tokens=tokens))
        return _tag(MaskSpan(0, 1, DEFAULT_STRING_TOKENS))

    def number(self, schema: dict[str, Any], kind: str, where: str, path: str) -> Any:
        if not any(key in schema for key in _NUMERIC - {"type", "const", "enum"}):
            return _tag(MaskSpan(0, 1, NUMBER_TOKENS, value_class="int" if kind == "integer" else "number"))
        self.json_values.append(path)
        return _tag(self.pattern_span((self.number_regex(schema, kind, where),), where, NUMBER_TOKENS))

    def pattern_span(
        self,
        patterns: tuple[str, ...],
        where: str,
        default: int,
        *,
        allow_empty: bool = True,
        tokens: int | None = None,
    ) -> MaskSpan:
        """A span whose fill matches every pattern, as long as the longest match (in characters,
        each at least one token), `default` tokens when unbounded, or `tokens` when given."""
        bounds = length_bounds(patterns)
        if bounds is None:
            raise SchemaError("no value satisfies this schema", path=where, expected="keywords that agree")
        fewest, most = bounds
        limit = self.limits.max_span_tokens
        high = min(limit, most if most is not None else max(default, fewest))
        if tokens is not None:
            high = min(limit, tokens)
        high = max(high, 1)
        low = 0 if fewest == 0 and allow_empty else 1
        return MaskSpan(0, min(low, high), high, patterns=patterns)

    # -- JSON text as regular expressions --

    def json_value(self, schema: dict[str, Any], where: str, path: str) -> Any:
        """One span whose fill is the value's JSON text, matching the schema by construction."""
        versions = self.value_regexes(schema, where)
        self.json_values.append(path)
        if "enum" in schema and set(schema) <= {"enum", "type"} | _IGNORED and not isinstance(schema.get("type"), list):
            options = tuple(json.dumps(o, ensure_ascii=False) for o in self.enum_values(schema, where))
            return _tag(MaskSpan(0, 0, 0, choices=options)) if len(options) > 1 else _literal(json.loads(options[0]))
        return _tag(self.pattern_span(versions, where, JSON_VALUE_TOKENS))

    def value_regexes(self, schema: Any, where: str) -> tuple[str, ...]:
        """Regular expressions whose common matches are exactly the JSON texts (compact, ", " and
        ": " separators, properties in schema order) of the values the schema allows. A string
        with several constraints (pattern, format, lengths) has one expression per constraint,
        intersected; the other parts repeat their own in each."""
        schema, where, ref = self.resolved(schema, where)
        try:
            return self._value_regexes(schema, where)
        finally:
            if ref is not None:
                self.expanding.pop()

    def _value_regexes(self, schema: dict[str, Any], where: str) -> tuple[str, ...]:
        if "const" in schema:
            return (re.escape(json.dumps(schema["const"], ensure_ascii=False)),)
        if "anyOf" in schema:
            alternatives = schema["anyOf"]
            if not isinstance(alternatives, list) or not alternatives:
                raise SchemaError("anyOf must list schemas", path=f"{where}/anyOf")
            self.unsupported += [f"{key} at {where}" for key in schema if key not in _IGNORED | {"anyOf"}]
            return _alternation(
                [self.value_regexes(item, f"{where}/anyOf/{n}") for n, item in enumerate(alternatives)], where
            )
        types = schema.get("type")
        if isinstance(types, list):
            if not types or not all(isinstance(t, str) and t in _BY_TYPE and t != "const" for t in types):
                raise SchemaError(f"type {json.dumps(types)} is not supported", path=where)
            allowed = set().union(*(_BY_TYPE[t] for t in types)) | _IGNORED
            self.unsupported += [f"{key} at {where}" for key in schema if key not in allowed]
            if "enum" in schema:
                return self._enum_regex(schema, where)
            return _alternation([self.typed_regexes({**schema, "type": t}, t, where) for t in types], where)
        if "enum" in schema:
            kind = self.kind(schema, where) if "type" in schema else "const"
            if kind != "const":
                self.check_keys(schema, kind, where)
            return self._enum_regex(schema, where)
        kind = self.kind(schema, where)
        self.check_keys(schema, kind, where)
        return self.typed_regexes(schema, kind, where)

    def _enum_regex(self, schema: dict[str, Any], where: str) -> tuple[str, ...]:
        options = self.enum_values(schema, where)
        return ("|".join(re.escape(json.dumps(o, ensure_ascii=False)) for o in options),)

    def enum_values(self, schema: dict[str, Any], where: str) -> list[Any]:
        options = schema["enum"]
        if not isinstance(options, list) or not options:
            raise SchemaError("enum must list values", path=f"{where}/enum", expected="a non-empty list")
        for option in options:
            if isinstance(option, dict | list):
                raise SchemaError("enum values must be strings, numbers, booleans or null", path=f"{where}/enum")
        types = schema.get("type")
        if types is not None:  # only the values of the listed types are valid
            listed = {types} if isinstance(types, str) else set(types)
            options = [
                o for o in options if _json_type(o) in listed or (_json_type(o) == "integer" and "number" in listed)
            ]
            if not options:
                raise SchemaError("no enum value has the schema's type", path=f"{where}/enum")
        unique = dict.fromkeys(json.dumps(o, ensure_ascii=False) for o in options)
        return [json.loads(text) for text in unique]

    def typed_regexes(self, schema: dict[str, Any], kind: str, where: str) -> tuple[str, ...]:
        if kind == "string":
            return tuple(f'"{content}"' for content in self.string_patterns(schema, where))
        if kind in ("integer", "number"):
            return (self.number_regex(schema, kind, where),)
        if kind == "boolean":
            return ("true|false",)
        if kind == "null":
            return ("null",)
        if kind == "array":
            return self.array_regexes(schema, where)
        return self.object_regexes(schema, where)

    def object_regexes(self, schema: dict[str, Any], where: str) -> tuple[str, ...]:
        parts = [
            (
                re.escape(json.dumps(key, ensure_ascii=False) + ": "),
                self.value_regexes(item, f"{where}/properties/{key}"),
            )
            for key, item in self.properties(schema, where).items()
        ]
        count = max((len(versions) for _, versions in parts), default=1)
        return tuple(
            "\\{" + ", ".join(key + _group(versions[min(n, len(versions) - 1)]) for key, versions in parts) + "\\}"
            for n in range(count)
        )

    def array_regexes(self, schema: dict[str, Any], where: str) -> tuple[str, ...]:
        low = _count(schema, "minItems", where) or 0
        high = _count(schema, "maxItems", where)
        if high is not None and low > high:
            raise SchemaError("minItems is over maxItems", path=where)
        if high is None:
            high = max(low, DEFAULT_ITEMS)  # a bounded list keeps the span's length bounded
        items = self.value_regexes(schema.get("items", {"type": "string"}), f"{where}/items")
        versions = []
        for item in items:
            one = _group(item)
            if high == 0:
                versions.append("\\[\\]")
                continue
            rest = f"(?:, {one}){{{max(low - 1, 0)},{high - 1}}}"
            body = one + rest
            versions.append("\\[" + (body if low >= 1 else f"(?:{body})?") + "\\]")
        return tuple(versions)

    def string_patterns(self, schema: dict[str, Any], where: str) -> tuple[str, ...]:
        """The string's content (unescaped JSON-string characters) as one expression per
        constraint: its lengths in characters, its pattern (searched, as JSON Schema means it),
        its format."""
        max_length = _count(schema, "maxLength", where)
        min_length = _count(schema, "minLength", where) or 0
        if max_length is not None and min_length > max_length:
            raise SchemaError("minLength is over maxLength", path=where)
        patterns = [json_string_content(min_length, max_length)]
        if "pattern" in schema:
            source = schema["pattern"]
            if not isinstance(source, str):
                raise SchemaError("pattern must be a string", path=f"{where}/pattern")
            try:
                patterns.append(searched_pattern(source, JSON_STRING_CHAR))
            except PatternError as error:
                raise SchemaError(
                    f"pattern: {error}", path=f"{where}/pattern", expected="a regular expression"
                ) from error
        if "format" in schema:
            name = schema["format"]
            if name not in FORMATS:
                raise SchemaError(
                    f"format {json.dumps(name)} is not supported",
                    path=f"{where}/format",
                    expected="one of " + ", ".join(FORMATS),
                )
            patterns.append(FORMATS[name])
        return tuple(patterns)

    def number_regex(self, schema: dict[str, Any], kind: str, where: str) -> str:
        bounds: dict[str, Decimal] = {}
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in schema:
                value = schema[key]
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise SchemaError(f"{key} must be a number", path=f"{where}/{key}")
                bounds[key] = Decimal(str(value))
        low, low_open = _tighter(bounds.get("minimum"), bounds.get("exclusiveMinimum"), lower=True)
        high, high_open = _tighter(bounds.get("maximum"), bounds.get("exclusiveMaximum"), lower=False)
        try:
            return number_pattern(kind == "integer", low, high, exclusive_minimum=low_open, exclusive_maximum=high_open)
        except PatternError as error:
            raise SchemaError(str(error), path=where, expected="a range with values in it") from error


def _tighter(closed: Decimal | None, open_: Decimal | None, *, lower: bool) -> tuple[Decimal | None, bool]:
    """The tighter of a closed and an open bound: (value, open)."""
    if closed is None:
        return open_, open_ is not None
    if open_ is None:
        return closed, False
    if lower:
        return (open_, True) if open_ >= closed else (closed, False)
    return (open_, True) if open_ <= closed else (closed, False)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    return "string"


def _group(regex: str) -> str:
    return f"(?:{regex})"


def _alternation(options: list[tuple[str, ...]], where: str) -> tuple[str, ...]:
    """Alternatives, each given as intersected versions: exact when at most one alternative has
    several versions (A1&A2 | B is (A1|B) & (A2|B)); more would let versions of different
    alternatives pair up, so that is refused."""
    several = [versions for versions in options if len(versions) > 1]
    if len(several) > 1:
        raise SchemaError(
            "two alternatives that each combine pattern, format or length limits",
            path=where,
            expected="at most one alternative with more than one of pattern, format, minLength/maxLength",
        )
    count = len(several[0]) if several else 1
    return tuple("|".join(_group(versions[min(n, len(versions) - 1)]) for versions in options) for n in range(count))


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
