"""Running a template over records: reading JSONL input, filling records in batches, and writing
durable, resumable JSONL output (docs/batch.md).

Records are laid out one by one (choices and free `must` words are scored per record), then
grouped by canvas length and filled in batches with per-row budgets, so short and long records do
not pad each other much. A batch that runs out of device memory is split in halves. The output is
written in input order; each finished record is written and fsync'ed before it counts as done, so
`--resume` after any interruption (also `kill -9`) neither repeats nor loses a record.

Inference-side code: it imports nothing from `editor.server` or `editor.db`; the API calls it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch

from editor.batch.template import RecordDocument, RecordError, Template
from editor.canvas import Canvas, has_pattern
from editor.constraints import json_number_place
from editor.document import DocumentError
from editor.filling import fill_canvases, prepare_canvas
from editor.models.base import DiffusionModel
from editor.options import SamplerOptions

__all__ = [
    "BATCH_DEFAULTS",
    "BatchFiller",
    "BatchSummary",
    "InputRecord",
    "RecordFiller",
    "RecordResult",
    "ResultWriter",
    "parse_input_line",
    "read_done_ids",
    "read_input",
    "record_rules",
    "run_records",
]

# Batch jobs favour throughput: the threshold schedule (commit every confident position at once)
# capped at a few steps, so every row costs a small, fixed number of forward passes.
# The fill defaults (confidence, one step per masked token, the model's candidates): a threshold
# schedule capped at 2 steps was 5x faster and garbled ("North running running running the the of
# Northwind running" against "Initech rain jacket-Storm is waterproof"): docs/batch.md, Speed.
BATCH_DEFAULTS = SamplerOptions()


@dataclass(frozen=True)
class InputRecord:
    """One input line: its 1-based line number, its id, and the record or why it is unusable."""

    line: int
    custom_id: str
    record: dict[str, Any] | None
    error: RecordError | None = None


def parse_input_line(text: str, line: int, *, max_chars: int) -> InputRecord:
    """The id is `custom_id`, else `id`, else the line number; a bad line becomes an error record."""
    if len(text) > max_chars:
        return InputRecord(
            line,
            str(line),
            None,
            RecordError("too_long", f"line {line} has {len(text)} characters; the limit is {max_chars}"),
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return InputRecord(line, str(line), None, RecordError("invalid_json", f"line {line}: {error}"))
    if not isinstance(value, dict):
        kind = type(value).__name__
        return InputRecord(
            line, str(line), None, RecordError("invalid_record", f"line {line} is a JSON {kind}, not an object")
        )
    key = value.get("custom_id", value.get("id"))
    custom_id = str(line) if key is None or isinstance(key, dict | list) else str(key)
    return InputRecord(line, custom_id, value)


def read_input(lines: Iterable[str], *, max_chars: int) -> list[InputRecord]:
    """Every non-blank line as a record; a repeated id is an error record (ids must be unique for
    `--resume` to know what is done)."""
    records: list[InputRecord] = []
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        record = parse_input_line(text, number, max_chars=max_chars)
        if record.custom_id in seen:
            error = RecordError("duplicate_id", f"line {number}: the id {record.custom_id!r} appeared before")
            record = InputRecord(number, f"{record.custom_id}@line{number}", None, error)
        seen.add(record.custom_id)
        records.append(record)
    return records


@dataclass(frozen=True)
class RecordResult:
    """One output line, in the OpenAI Batch shape."""

    custom_id: str
    output: Any = None
    spans: dict[str, dict[str, Any]] | None = None
    error: RecordError | None = None
    tokens: int = 0  # generated tokens, for tokens/s

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "custom_id": self.custom_id,
            "output": self.output,
            "spans": self.spans,
            "error": None if self.error is None else self.error.to_dict(),
        }

    def to_line(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False) + "\n"


@dataclass
class _Prepared:
    order: int  # position in the records given to `fill`
    document: RecordDocument
    canvas: Canvas


class RecordFiller(Protocol):
    """What `run_records` drives: `BatchFiller` here, or `editor.batch.ray_data.RayDataFiller`,
    which runs `BatchFiller` on Ray Data workers."""

    batch_size: int

    def fill_windows(self, records: Sequence[InputRecord], window: int) -> Iterator[list[RecordResult]]:
        """Results for `records`, one list per window of `window` records, in input order."""
        ...


class BatchFiller:
    """Fills records with one model and one template: see the module docstring."""

    def __init__(
        self,
        model: DiffusionModel,
        template: Template,
        options: SamplerOptions,
        *,
        batch_size: int,
        max_canvas_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.template = template
        self.options = options
        self.batch_size = batch_size
        self.max_canvas_tokens = max_canvas_tokens

    def fill_windows(self, records: Sequence[InputRecord], window: int) -> Iterator[list[RecordResult]]:
        """`fill` a window of records at a time, in order (`RecordFiller`)."""
        for chunk in windows(records, window):
            yield self.fill(chunk)

    def fill(self, records: Sequence[InputRecord]) -> list[RecordResult]:
        """One result per record, in the given order."""
        results: list[RecordResult | None] = [None] * len(records)
        prepared: list[_Prepared] = []
        with torch.inference_mode():
            for order, record in enumerate(records):
                try:
                    prepared.append(self._prepare(order, record))
                except RecordError as error:
                    results[order] = RecordResult(record.custom_id, error=error)
            prepared.sort(key=lambda item: len(item.canvas.ids))  # similar lengths pad each other less
            for start in range(0, len(prepared), self.batch_size):
                for item, result in self._run(prepared[start : start + self.batch_size], records):
                    results[item.order] = result
        return [
            r if r is not None else RecordResult(rec.custom_id, error=_lost())
            for r, rec in zip(results, records, strict=True)
        ]

    def _prepare(self, order: int, record: InputRecord) -> _Prepared:
        if record.error is not None or record.record is None:
            raise record.error or RecordError("invalid_record", "no record")
        document = self.template.render(record.record)
        try:
            canvas = prepare_canvas(
                self.model,
                document.document,
                instruction=document.instruction,
                max_canvas_tokens=self.max_canvas_tokens,
            )
        except DocumentError as error:
            code = "too_long" if "canvas" in error.message else "invalid_record"
            raise RecordError(code, str(error)) from error
        return _Prepared(order, document, record_rules(canvas, document))

    def _run(self, batch: list[_Prepared], records: Sequence[InputRecord]) -> list[tuple[_Prepared, RecordResult]]:
        """Fill one batch; out of memory splits it in halves (down to one row, then an error)."""
        try:
            fills = fill_canvases(self.model, [item.canvas for item in batch], self.options)
        except torch.cuda.OutOfMemoryError:
            _free_device_memory()
            if len(batch) == 1:
                error = RecordError("out_of_memory", "this record does not fit in device memory on its own")
                return [(batch[0], RecordResult(records[batch[0].order].custom_id, error=error))]
            half = len(batch) // 2
            return self._run(batch[:half], records) + self._run(batch[half:], records)
        outcome = []
        for item, fill in zip(batch, fills, strict=True):
            custom_id = records[item.order].custom_id
            try:
                output, spans = item.document.build(fill.spans)
            except RecordError as error:
                outcome.append((item, RecordResult(custom_id, error=error)))
                continue
            tokens = sum(len(span.token_ids) for span in fill.spans)
            outcome.append((item, RecordResult(custom_id, output=output, spans=spans, tokens=tokens)))
        return outcome


def record_rules(canvas: Canvas, document: RecordDocument) -> Canvas:
    """A record's canvas with the rules its template adds to the document's own (the JSON-number
    rules of its number values). Also the chat API's `reshape` of a schema answer, so both keep
    the same guarantees."""
    return json_number_rules(canvas, document.number_spans)


def json_number_rules(canvas: Canvas, spans: frozenset[int]) -> Canvas:
    """The canvas with the JSON-number rules at the positions of `spans` (a template's `as=int` /
    `as=number` values): "." only, no leading zero, so every fill is a JSON number, where the
    document language's `as=number` would also allow "1,250" or "1,5"."""
    if not spans:
        return canvas
    rules = list(canvas.rules)
    for layout in canvas.spans:
        value_class = layout.span.value_class
        if layout.span.index not in spans or value_class is None or has_pattern(layout.span):
            continue  # a min=/max= range is a pattern that writes JSON numbers already
        for offset in range(layout.length):
            place = json_number_place(offset, layout.min_tokens, layout.joins_space, value_class)
            rules[layout.start + offset] = replace(rules[layout.start + offset], place=place)
    return replace(canvas, rules=rules)


def _lost() -> RecordError:
    return RecordError("fill_failed", "the record was not filled")  # never expected; keeps one line per input


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- durable output ---------------------------------------------------------------------------


def read_done_ids(path: Path) -> set[str]:
    """The ids already in an output file. A last line cut short by a crash is removed from the
    file (its record was never counted as done, and will run again)."""
    if not path.exists():
        return set()
    done: set[str] = set()
    good_end = 0
    with path.open("rb") as stream:
        for raw in stream:
            if not raw.endswith(b"\n"):
                break
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                break
            if not isinstance(line, dict) or "custom_id" not in line:
                break
            done.add(str(line["custom_id"]))
            good_end += len(raw)
    if good_end < path.stat().st_size:
        with path.open("r+b") as stream:
            stream.truncate(good_end)
            os.fsync(stream.fileno())
    return done


class ResultWriter:
    """Appends output lines; `write` returns only once they are on disk (flush + fsync)."""

    def __init__(self, stream: BinaryIO, *, sync: bool = True) -> None:
        self.stream = stream
        self.sync = sync

    def write(self, results: Iterable[RecordResult]) -> None:
        self.stream.write("".join(result.to_line() for result in results).encode("utf-8"))
        self.stream.flush()
        if self.sync:
            os.fsync(self.stream.fileno())


@dataclass
class BatchSummary:
    total: int = 0  # input records
    skipped: int = 0  # already done (--resume)
    done: int = 0
    failed: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # by error code

    @property
    def records_per_s(self) -> float:
        return (self.done + self.failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def add(self, results: Iterable[RecordResult]) -> None:
        for result in results:
            self.tokens += result.tokens
            if result.error is None:
                self.done += 1
            else:
                self.failed += 1
                self.errors[result.error.code] = self.errors.get(result.error.code, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "skipped": self.skipped,
            "done": self.done,
            "failed": self.failed,
            "tokens": self.tokens,
            "elapsed_s": round(self.elapsed_s, 3),
            "records_per_s": round(self.records_per_s, 2),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "errors": self.errors,
        }


def windows(records: Sequence[InputRecord], size: int) -> Iterator[Sequence[InputRecord]]:
    for start in range(0, len(records), size):
        yield records[start : start + size]


def run_records(
    filler: RecordFiller,
    records: Sequence[InputRecord],
    writer: ResultWriter,
    *,
    done_ids: set[str] | None = None,
    window: int | None = None,
    on_progress: Callable[[list[RecordResult]], None] | None = None,
) -> BatchSummary:
    """Fill `records` (skipping `done_ids`) a window at a time, writing each window in input order.
    A window holds a few batches, so records can be grouped by length within it."""
    started = time.perf_counter()
    done_ids = done_ids or set()
    todo = [record for record in records if record.custom_id not in done_ids]
    summary = BatchSummary(total=len(records), skipped=len(records) - len(todo))
    for results in filler.fill_windows(todo, window or filler.batch_size * 4):
        writer.write(results)
        summary.add(results)
        if on_progress is not None:
            on_progress(results)
    summary.elapsed_s = time.perf_counter() - started
    return summary
