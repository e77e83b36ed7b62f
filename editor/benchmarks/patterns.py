"""`editor bench patterns`: what structured outputs cost and whether every fill is valid (issue 20).

Three parts: the index build of a pattern against the model's vocabulary and a synthetic 152k one
(Dream's tokenizer shape: the model's own token texts, then pairs of them until 152,064); the fill
time of a document whose spans carry patterns against the same document without them (same span
lengths, same seeds); and validity: fills of 10 patterns and 5 schemas across schedules and seeds,
each checked with `re.fullmatch` or `jsonschema`.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import click

from editor.benchmarks.options import device_option, json_option, threads_option

SCHEDULES = ("confidence", "random", "left-to-right", "blocks", "threshold")
# (pattern, span length): the results table's ten patterns.
PATTERNS = [
    (r"\d{3}-\d{3}-\d{4}", "4-14"),
    (r"[A-Z]{3}-\d{4}", "3-10"),
    (r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])", "4-12"),
    (r"[a-z]+(\.[a-z]+)?@[a-z]+\.(com|org|net)", "4-16"),
    (r"#[0-9a-fA-F]{6}", "2-9"),
    (r"(yes|no|maybe)", "1-4"),
    (r"\$\d{1,3}(,\d{3})*\.\d\d", "3-12"),
    (r"[A-Z][a-z]+ [A-Z][a-z]+", "2-10"),
    (r"v\d+\.\d+\.\d+", "4-10"),
    (r"([01]\d|2[0-3]):[0-5]\d", "3-6"),
]
SCHEMAS: dict[str, dict[str, Any]] = {
    "product": {
        "type": "object",
        "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{2}-\\d{4}$"},
            "price": {"type": "number", "minimum": 0, "exclusiveMaximum": 1000},
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            "color": {"enum": ["red", "green", "blue"]},
        },
        "required": ["sku", "price", "rating", "color"],
    },
    "contact": {
        "type": "object",
        "properties": {
            "email": {"type": "string", "format": "email", "maxLength": 24},
            "phone": {"type": ["string", "null"], "pattern": "^\\+?\\d{7,12}$"},
            "since": {"type": "string", "format": "date"},
        },
        "required": ["email", "phone", "since"],
    },
    "event": {
        "$defs": {"when": {"type": "string", "format": "date-time"}},
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "start": {"$ref": "#/$defs/when"},
            "host": {"type": "string", "format": "ipv4"},
            "level": {"enum": [1, 2, "high", None]},
        },
        "required": ["id", "start", "host", "level"],
    },
    "order": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 2,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "minLength": 2, "maxLength": 8},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    "required": ["name", "qty"],
                },
            },
            "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 10}]},
        },
        "required": ["items", "note"],
    },
    "reading": {
        "type": "object",
        "properties": {
            "sensor": {"type": "string", "pattern": "^S\\d{2}$"},
            "value": {"type": "number", "minimum": -40.5, "maximum": 85},
            "ok": {"type": "boolean"},
            "at": {"type": "string", "format": "time"},
        },
        "required": ["sensor", "value", "ok", "at"],
    },
}
TIMED_DOCUMENT = (
    'Customer record.\nPhone: [MASK 4-14 re="\\d{3}-\\d{3}-\\d{4}"]\nDate joined: '
    '[MASK 4-12 re="(19|20)\\d\\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\\d|3[01])"]\nOrders so far: '
    "[MASK 1-4 as=int min=0 max=500]\nNotes: [MASK 12]\n"
)


def plain(document: str) -> str:
    """The same document without patterns (same lengths): the unconstrained baseline."""
    text = re.sub(r' re="(?:[^"\\]|\\.)*"', "", document)
    return re.sub(r" as=int min=\S+ max=[^\] ]+", "", text)


@click.command("patterns")
@click.option("--model", "model_spec", default="default", help="model for build and timing [default: default]")
@click.option("--valid-model", default="tiny", help="model for the validity fills [default: tiny]")
@device_option
@threads_option
@click.option("--fills", default=200, help="fills per pattern and per schema")
@click.option("--timing-seeds", default=3, help="seeds of the timed document, each constrained and not")
@click.option(
    "--parts",
    default="index,timing,step,validity",
    help="which parts to run (comma-separated; validity = patterns,schemas) [default: all]",
)
@json_option
def patterns_bench(
    model_spec: str,
    valid_model: str,
    device: str,
    threads: int | None,
    fills: int,
    timing_seeds: int,
    parts: str,
    json_path: Path | None,
) -> None:
    """Index build time, constrained/unconstrained fill time, and validity of many fills."""
    import torch

    from editor.models.loading import load_model

    if threads is not None:
        torch.set_num_threads(threads)
    model = load_model(model_spec, device=device)
    chosen = set(parts.split(","))
    report: dict[str, Any] = {"model": model.name, "device": device, "threads": torch.get_num_threads()}
    if "index" in chosen:
        report["index"] = index_costs(model)
        click.echo(json.dumps(report["index"], indent=1))
    if "timing" in chosen:
        report["timing"] = fill_timing(model, timing_seeds)
        click.echo(json.dumps(report["timing"], indent=1))
    if "step" in chosen:
        report["step"] = step_overhead(model)
        click.echo(json.dumps(report["step"], indent=1))
    if chosen & {"validity", "patterns", "schemas"}:  # validity: both
        checker = load_model(valid_model, device=device) if valid_model != model_spec else model
        report["validity_model"] = checker.name
        if chosen & {"validity", "patterns"}:
            report["patterns"] = pattern_validity(checker, fills)
        if chosen & {"validity", "schemas"}:
            report["schemas"] = schema_validity(checker, fills)
        for row in report.get("patterns", []) + report.get("schemas", []):
            click.echo(f"{row['name']:<48} fills {row['fills']:>4}  invalid {row['invalid']}  {row['example']!r}")
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def index_costs(model: Any) -> dict[str, Any]:
    """Cold build seconds of typical patterns against the model's vocabulary and a 152k one."""
    from editor.constraints import VocabularyRules
    from editor.filling import vocabulary_rules
    from editor.patterns import automaton_for

    vocabulary = vocabulary_rules(model)
    large = _synthetic_vocabulary(vocabulary, 152_064)
    typical = [PATTERNS[2][0], PATTERNS[3][0], r"[^\"\\\x00-\x1f]{0,40}"]
    result: dict[str, Any] = {"vocab": len(vocabulary.texts), "large_vocab": len(large.texts), "builds": []}
    for pattern in typical:
        for name, rules in (("model", vocabulary), ("152k", large)):
            fresh = _copy(rules, VocabularyRules)  # a new cache entry: a cold build
            started = time.perf_counter()
            automaton = automaton_for((pattern,), fresh)
            seconds = time.perf_counter() - started
            result["builds"].append(
                {
                    "pattern": pattern,
                    "vocabulary": name,
                    "seconds": round(seconds, 3),
                    "states": automaton.states,
                    "classes": int(automaton.class_next.shape[0]),
                }
            )
    return result


def _copy(rules: Any, kind: Any) -> Any:
    """A shallow copy: the same token texts under a new identity (the index cache is per object)."""
    clone = object.__new__(kind)
    clone.__dict__.update(rules.__dict__)
    return clone


def _synthetic_vocabulary(vocabulary: Any, size: int) -> Any:
    """The model's token texts, then pairs of them (in a fixed order) until `size` tokens."""
    import random

    clone = _copy(vocabulary, type(vocabulary))
    texts = list(vocabulary.texts)
    chooser = random.Random(0)
    plain_texts = [t for t in texts if t and "\ufffd" not in t]
    while len(texts) < size:
        texts.append(chooser.choice(plain_texts) + chooser.choice(plain_texts).lstrip(" "))
    clone.texts = texts
    clone.vocab_size = size
    return clone


def fill_timing(model: Any, seeds: int) -> dict[str, Any]:
    """Seconds per fill of TIMED_DOCUMENT with and without its patterns (one candidate, greedy
    then sampled, confidence and random schedules), after a warm-up of each."""
    from editor.filling import fill_documents
    from editor.options import SamplerOptions
    from editor.parser import parse_document

    constrained, free = parse_document(TIMED_DOCUMENT), parse_document(plain(TIMED_DOCUMENT))
    times: dict[str, list[float]] = {"constrained": [], "unconstrained": []}
    for document in (constrained, free):
        fill_documents(model, [document], SamplerOptions(seed=0, candidates=1))  # warm-up (and the index)
    runs = []
    for seed in range(seeds):
        for schedule in ("confidence", "random"):
            options = SamplerOptions(seed=seed, candidates=1, schedule=schedule, temperature=0.7)
            for document, key in ((constrained, "constrained"), (free, "unconstrained")):
                started = time.perf_counter()
                result = fill_documents(model, [document], options)[0]
                times[key].append(time.perf_counter() - started)
                if key == "constrained":
                    runs.append(result.text)
    mean = {key: statistics.mean(values) for key, values in times.items()}
    return {
        "document": TIMED_DOCUMENT,
        "fills_each": len(times["constrained"]),
        "constrained_s": round(mean["constrained"], 4),
        "unconstrained_s": round(mean["unconstrained"], 4),
        "ratio": round(mean["constrained"] / mean["unconstrained"], 3),
        "example": runs[0] if runs else "",
    }


def step_overhead(model: Any, repeats: int = 20) -> dict[str, Any]:
    """Milliseconds a step spends on TIMED_DOCUMENT's pattern spans with every position masked
    (the most work: each masked position gets a vocabulary mask), as the sampler's hook does it,
    against the model's forward pass over the same canvas."""
    import torch

    from editor.filling import prepare_canvas
    from editor.models.base import aligned_logits
    from editor.parser import parse_document
    from editor.patterns import restrict_patterns_
    from editor.sampler import Row

    canvas = prepare_canvas(model, parse_document(TIMED_DOCUMENT))
    row = Row(canvas.ids, canvas.pinned, canvas.rules, constraints=canvas.constraints)
    ids = torch.tensor([canvas.ids])
    masked = torch.tensor([[not fixed for fixed in canvas.pinned]])
    candidates = masked[0].nonzero().flatten()[None]
    logits = torch.zeros(1, candidates.shape[1], model.vocab_size)
    started = time.perf_counter()
    for _ in range(repeats):
        restrict_patterns_(logits, [row], ids, masked, candidates)
    hook_ms = (time.perf_counter() - started) / repeats * 1000
    attention = torch.ones_like(masked)
    with torch.inference_mode():
        aligned_logits(model, ids, attention)
        started = time.perf_counter()
        for _ in range(3):
            aligned_logits(model, ids, attention)
    forward_ms = (time.perf_counter() - started) / 3 * 1000
    spans = [c.length for c in canvas.constraints]
    return {
        "pattern_spans": len(spans),
        "pattern_positions": sum(spans),
        "states": [c.automaton.states for c in canvas.constraints],
        "hook_ms_per_step": round(hook_ms, 2),
        "forward_ms_per_step": round(forward_ms, 2),
    }


def pattern_validity(model: Any, fills: int) -> list[dict[str, Any]]:
    """`fills` fills per pattern, spread over the schedules (one batch each, every row its own seed)."""
    from editor.filling import fill_documents
    from editor.options import SamplerOptions
    from editor.parser import parse_document

    rows = []
    for pattern, length in PATTERNS:
        document = parse_document(f'Value: [MASK {length} re="{_quoted(pattern)}"] (checked).')
        invalid, done, example = 0, 0, ""
        per_schedule = -(-fills // len(SCHEDULES))
        for number, schedule in enumerate(SCHEDULES):
            count = min(per_schedule, fills - done)
            options = SamplerOptions(seed=1000 * number, candidates=1, schedule=schedule, temperature=1.0)
            for result in fill_documents(model, [document] * count, options):
                text = result.spans[0].text
                invalid += re.fullmatch(pattern, text) is None
                example = example or text
            done += count
        rows.append({"name": f"re={pattern} [MASK {length}]", "fills": done, "invalid": invalid, "example": example})
    return rows


def schema_validity(model: Any, fills: int) -> list[dict[str, Any]]:
    """`fills` records per schema through the batch runner, both views, validated with jsonschema
    (formats checked too)."""
    import jsonschema

    from editor.batch.runner import BatchFiller, read_input
    from editor.batch.schema import template_from_schema
    from editor.options import SamplerOptions

    rows = []
    for name, schema in SCHEMAS.items():
        derived = template_from_schema(json.dumps(schema))
        validator = jsonschema.Draft202012Validator(
            schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        )
        invalid, done, example = 0, 0, ""
        per_schedule = -(-fills // len(SCHEDULES))
        for number, schedule in enumerate(SCHEDULES):
            count = min(per_schedule, fills - done)
            template = derived.compile(view="json" if number % 2 else "prose")
            options = SamplerOptions(seed=1000 * number, candidates=1, schedule=schedule, temperature=1.0)
            filler = BatchFiller(model, template, options, batch_size=16)
            lines = [json.dumps({"id": n}) for n in range(count)]
            for result in filler.fill(read_input(lines, max_chars=10_000)):
                output = result.to_dict()["output"]
                bad = output is None or any(True for _ in validator.iter_errors(output))
                invalid += bad
                example = example or json.dumps(output)
            done += count
        rows.append({"name": f"schema {name}", "fills": done, "invalid": invalid, "example": example})
    return rows


def _quoted(pattern: str) -> str:
    return pattern.replace("\\", "\\\\").replace('"', '\\"')
