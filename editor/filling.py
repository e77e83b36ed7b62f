"""One entry point for filling documents: canvas, must placement, choices, sampling, rendering.

The CLI, the API worker and the batch runner all call `fill_documents`.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from editor.canvas import Canvas, FilledText, SpanFill, SpanLayout, build_canvas, choice_tokens, must_tokens, render
from editor.constraints import VocabularyRules
from editor.document import Document, DocumentError
from editor.models.base import DiffusionModel, aligned_logits
from editor.options import FillCancelled, SamplerOptions
from editor.sampler import CancelCheck, Row, StepCallback, StepEvent, pad_rows, sample


@dataclass(frozen=True)
class FillResult:
    text: str
    spans: list[SpanFill]
    model: str
    seed: int
    steps: int
    elapsed_s: float
    options: SamplerOptions

    def to_dict(self) -> dict[str, object]:
        return {
            "text": self.text,
            "spans": [span.model_dump() for span in self.spans],
            "model": self.model,
            "seed": self.seed,
            "steps": self.steps,
            "elapsed_s": round(self.elapsed_s, 4),
            "options": self.options.model_dump(),
        }


DEFAULT_BATCH_TOKENS = 16384  # canvas positions per forward pass when scoring choices

_vocabularies: weakref.WeakKeyDictionary[object, VocabularyRules] = weakref.WeakKeyDictionary()


def vocabulary_rules(model: DiffusionModel) -> VocabularyRules:
    """The model's vocabulary masks, built once per model (decoding a 150k vocabulary takes a while)."""
    if model not in _vocabularies:
        banned = set(model.tokenizer.all_special_ids) | {model.special.mask, *model.special.end_ids}
        if model.special.bos is not None:
            banned.add(model.special.bos)
        _vocabularies[model] = VocabularyRules(model.tokenizer, model.vocab_size, banned, model.special.end_ids)
    return _vocabularies[model]


def prepare_canvas(
    model: DiffusionModel,
    document: Document,
    *,
    instruction: str | None = None,
    max_canvas_tokens: int | None = None,
    max_choice_tokens: int | None = None,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    should_cancel: CancelCheck | None = None,
) -> Canvas:
    """Lay out the document, then resolve its `choice=` spans and place its free `must` words with
    the model's scores. Raises DocumentError for anything that does not fit (a choice option over
    `max_choice_tokens` included). Choice scoring runs at most `max_batch_tokens` canvas positions
    per forward pass, checking `should_cancel` (which raises FillCancelled) between passes."""
    prefix, suffix = model.frame(instruction)

    def lay_out(choices: dict[int, str], musts: dict[tuple[int, int], int]) -> Canvas:
        return build_canvas(
            document,
            model.tokenizer,
            prefix=prefix,
            suffix=suffix,
            mask_id=model.special.mask,
            choices=choices,
            must_offsets=musts,
            max_canvas_tokens=max_canvas_tokens,
        )

    choices: dict[int, str] = {}
    canvas = lay_out(choices, {})
    for layout in canvas.spans:
        if layout.span.choices is not None:
            if max_choice_tokens is not None:
                check_choice_tokens(model, layout, max_choice_tokens)
            choices[layout.span.index] = best_choice(
                model, canvas, layout, max_batch_tokens=max_batch_tokens, should_cancel=should_cancel
            )
            canvas = lay_out(choices, {})
    musts = place_free_musts(model, canvas)
    return lay_out(choices, musts) if musts else canvas


def check_choice_tokens(model: DiffusionModel, layout: SpanLayout, limit: int) -> None:
    """Scoring an option of n tokens takes n canvas rows: refuse options over `limit` tokens."""
    assert layout.span.choices is not None
    for number, option in enumerate(layout.span.choices, start=1):
        size = len(choice_tokens(model.tokenizer, option, layout.joins_space))
        if size > limit:
            raise DocumentError(
                f"choice option {number} is {size} tokens long; the limit is {limit} (max_choice_tokens)",
                line=layout.span.line,
                column=layout.span.column,
                expected=f"options of at most {limit} tokens",
            )


def best_choice(
    model: DiffusionModel,
    canvas: Canvas,
    layout: SpanLayout,
    *,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    should_cancel: CancelCheck | None = None,
) -> str:
    """The option with the highest chain-rule log-likelihood in context: each option's tokens are
    scored left to right, token j with tokens < j filled and tokens >= j masked, in forward passes
    of at most `max_batch_tokens` positions (at least one row each)."""
    assert layout.span.choices is not None
    rows: list[Row] = []
    owners: list[tuple[int, int, int]] = []  # (option number, position, token id) scored by each row
    for number, option in enumerate(layout.span.choices):
        option_ids = choice_tokens(model.tokenizer, option, layout.joins_space)
        base = canvas.ids[: layout.start] + option_ids + canvas.ids[layout.start + layout.length :]
        for j, token_id in enumerate(option_ids):
            ids = base[:]
            for k in range(j, len(option_ids)):
                ids[layout.start + k] = model.special.mask
            rows.append(Row(ids=ids, pinned=[True] * len(ids), rules=[]))
            owners.append((number, layout.start + j, token_id))
    scores = [0.0] * len(layout.span.choices)
    per_pass = max(1, max_batch_tokens // max((len(row.ids) for row in rows), default=1))
    for first in range(0, len(rows), per_pass):
        if should_cancel is not None and should_cancel():
            raise FillCancelled("fill cancelled while scoring choices")
        chunk = slice(first, first + per_pass)
        for (number, _, _), value in zip(
            owners[chunk], _token_log_probs(model, rows[chunk], owners[chunk]), strict=True
        ):
            scores[number] += value
    return layout.span.choices[max(range(len(scores)), key=scores.__getitem__)]


def _token_log_probs(model: DiffusionModel, rows: list[Row], owners: list[tuple[int, int, int]]) -> list[float]:
    """The log-probability of each row's scored token at its position (softmax over that position only)."""
    ids, _, attention = pad_rows(rows, model.special.pad, model.device)
    with torch.inference_mode():
        logits = aligned_logits(model, ids, attention)  # [B, L, V]
        rows_index = torch.arange(len(rows), device=logits.device)
        positions = torch.tensor([position for _, position, _ in owners], device=logits.device)
        log_probs = torch.log_softmax(logits[rows_index, positions].float(), dim=-1)  # [B, V]
        tokens = torch.tensor([token for _, _, token in owners], device=logits.device)
        picked = log_probs[rows_index, tokens].nan_to_num(nan=float("-inf"))  # [B]
    return [float(value) for value in picked.tolist()]


def place_free_musts(model: DiffusionModel, canvas: Canvas) -> dict[tuple[int, int], int]:
    """Offsets for `must` words written without `@k`, from one forward pass over the canvas."""
    layouts = [layout for layout in canvas.spans if any(m.offset is None for m in layout.span.musts)]
    if not layouts:
        return {}
    ids, _, attention = pad_rows([Row(canvas.ids, canvas.pinned, canvas.rules)], model.special.pad, model.device)
    with torch.inference_mode():
        log_probs = torch.log_softmax(aligned_logits(model, ids, attention)[0].float(), dim=-1).cpu()  # [L, V]
    offsets: dict[tuple[int, int], int] = {}
    for layout in layouts:
        offsets.update(_place_span_musts(model, layout, log_probs))
    return offsets


def _place_span_musts(model: DiffusionModel, layout: SpanLayout, log_probs: torch.Tensor) -> dict[tuple[int, int], int]:
    """Each free must in written order, after the previous one and leaving room for the rest, goes
    where the sum of its tokens' log-probabilities is highest."""
    musts = layout.span.musts
    free = [i for i, must in enumerate(musts) if must.offset is None]
    # A word's tokens only differ between offset 0 and later offsets (the leading space).
    words = {
        i: (
            must_tokens(model.tokenizer, musts[i], 0, layout.joins_space),
            must_tokens(model.tokenizer, musts[i], 1, layout.joins_space),
        )
        for i in free
    }
    taken = set(layout.pinned)
    earliest = 0
    offsets: dict[tuple[int, int], int] = {}
    for order, must_index in enumerate(free):
        room = layout.length - sum(len(words[i][1]) for i in free[order + 1 :])
        best: tuple[float, int] | None = None
        for offset in range(earliest, room):
            word = words[must_index][offset > 0]
            cells = range(offset, offset + len(word))
            if cells.stop > room or taken.intersection(cells):
                continue
            score = float(log_probs[[layout.start + c for c in cells], word].sum())
            if best is None or score > best[0]:
                best = (score, offset)
        if best is None:
            raise DocumentError(
                f'no room left for must="{musts[must_index].text}" in this span',
                line=layout.span.line,
                column=layout.span.column,
                expected="musts that fit side by side in the span",
            )
        offset = best[1]
        end = offset + len(words[must_index][offset > 0])
        offsets[(layout.span.index, must_index)] = offset
        taken.update(range(offset, end))
        earliest = end
    return offsets


def fill_documents(
    model: DiffusionModel,
    documents: Sequence[Document],
    options: SamplerOptions,
    *,
    instruction: str | None = None,
    max_canvas_tokens: int | None = None,
    on_step: StepCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> list[FillResult]:
    """Fill a batch of documents in one sampler run (rows may differ in length and mask count)."""
    started = time.perf_counter()
    canvases = [
        prepare_canvas(model, d, instruction=instruction, max_canvas_tokens=max_canvas_tokens) for d in documents
    ]
    return fill_canvases(model, canvases, options, on_step=on_step, should_cancel=should_cancel, started=started)


def fill_canvases(
    model: DiffusionModel,
    canvases: Sequence[Canvas],
    options: SamplerOptions,
    *,
    on_step: StepCallback | None = None,
    should_cancel: CancelCheck | None = None,
    started: float | None = None,
    row_seeds: Sequence[int] | None = None,
) -> list[FillResult]:
    """`row_seeds` fixes each row's random draws (see `editor.sampler.row_seed`); without it the rows
    derive theirs from `options.seed`."""
    started = time.perf_counter() if started is None else started
    seeds: Sequence[int | None] = row_seeds if row_seeds is not None else [None] * len(canvases)
    rows = [Row(c.ids, c.pinned, c.rules, seed=s) for c, s in zip(canvases, seeds, strict=True)]
    output = sample(model, rows, options, vocabulary_rules(model), on_step=on_step, should_cancel=should_cancel)
    elapsed = time.perf_counter() - started
    return [
        fill_result(
            model, canvas, ids, confidences, seed=output.seed, steps=output.steps, elapsed=elapsed, options=options
        )
        for canvas, ids, confidences in zip(canvases, output.ids, output.confidences, strict=True)
    ]


def fill_result(
    model: DiffusionModel,
    canvas: Canvas,
    ids: list[int],
    confidences: list[float],
    *,
    seed: int,
    steps: int,
    elapsed: float,
    options: SamplerOptions,
) -> FillResult:
    """The filled canvas `ids` rendered as a result."""
    filled: FilledText = render(canvas, ids, confidences, model.tokenizer, model.special.end_ids)
    return FillResult(filled.text, filled.spans, model.name, seed, steps, elapsed, options)


def locate(canvas: Canvas, position: int) -> tuple[int, int] | None:
    """(span number, offset inside the span) of a canvas position, or None for literal text."""
    for number, layout in enumerate(canvas.spans):
        if layout.start <= position < layout.start + layout.length:
            return number, position - layout.start
    return None


__all__ = ["FillResult", "StepEvent", "fill_canvases", "fill_documents", "fill_result", "locate", "prepare_canvas"]
