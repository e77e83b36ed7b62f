"""One entry point for filling documents: canvas, must placement, choices, sampling, rendering.

The CLI, the API worker and the batch runner all call `fill_documents`.
"""

from __future__ import annotations

import random
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from editor.canvas import (
    Canvas,
    FilledText,
    SpanAlternative,
    SpanFill,
    SpanLayout,
    build_canvas,
    choice_tokens,
    has_pattern,
    must_tokens,
    render,
)
from editor.chat import Instruction
from editor.constraints import VocabularyRules
from editor.document import Document, DocumentError
from editor.judging import Judge, judge_for
from editor.models.base import DiffusionModel, aligned_logits
from editor.options import FillCancelled, SamplerOptions
from editor.patterns import SpanConstraint, automaton_for
from editor.regexes import PatternError, span_patterns
from editor.sampler import CancelCheck, Row, StepCallback, StepEvent, pad_rows, row_seed, sample


@dataclass(frozen=True)
class FillResult:
    text: str
    spans: list[SpanFill]
    model: str
    seed: int
    steps: int
    elapsed_s: float
    options: SamplerOptions
    score: float | None = None  # the judge's score of the kept candidate (None: one candidate)
    judge: str | None = None  # which judge chose it

    def to_dict(self) -> dict[str, object]:
        return {
            "text": self.text,
            "spans": [span.model_dump() for span in self.spans],
            "model": self.model,
            "seed": self.seed,
            "steps": self.steps,
            "elapsed_s": round(self.elapsed_s, 4),
            "options": self.options.model_dump(),
            "score": None if self.score is None else round(self.score, 4),
            "judge": self.judge,
        }


COUNT_SEARCH_TOKENS = 512  # how far a pattern's possible token counts are searched for an error message
DEFAULT_BATCH_TOKENS = 16384  # canvas positions per forward pass when scoring choices
CANDIDATE_TEMPERATURE = 0.7  # the sampled candidates beside a greedy first one
# Candidates per fill when the options leave it open, by model name (measured: docs/sampler.md).
DEFAULT_CANDIDATES = {"default": 4}
# A document of several spans may take each span from a different candidate (`mixed_candidate`).
CHOOSE_PER_SPAN = True
SENTENCE_ENDS = (".", "!", "?")  # a range span may end after one of these (`cut_at_sentence_ends`)
PUNCTUATION = ".!?,;:"
ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "st.", "vs.", "e.g.", "i.e.", "etc.", "no.", "prof.", "inc."})
MAX_CUTS_PER_SPAN = 2
MAX_CUT_ROUNDS = 2

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
    instruction: Instruction | None = None,
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
    constraints = span_constraints(model, canvas)
    musts = place_free_musts(model, replace(canvas, constraints=constraints))
    canvas = lay_out(choices, musts) if musts else canvas
    return checked_constraints(replace(canvas, constraints=span_constraints(model, canvas)))


def span_constraints(model: DiffusionModel, canvas: Canvas) -> tuple[SpanConstraint, ...]:
    """The automaton of each pattern span (`re=`, or `as=int|number` with min=/max=), indexed
    against the model's vocabulary once per pattern; raises DocumentError for a pattern the
    automaton compiler refuses or one no fill of the span's length can match."""
    found = []
    for layout in canvas.spans:
        if not has_pattern(layout.span):
            continue
        try:
            automaton = automaton_for(span_patterns(layout.span), vocabulary_rules(model))
        except PatternError as error:
            raise _span_error(layout, str(error), "a regular expression in Python re syntax") from error
        constraint = SpanConstraint(layout.start, layout.length, layout.min_tokens, layout.joins_space, automaton)
        counts = automaton.token_counts(layout.joins_space, layout.length)
        if not any(layout.min_tokens <= count <= layout.length for count in counts):
            counts = automaton.token_counts(layout.joins_space, COUNT_SEARCH_TOKENS)
            raise _span_error(layout, _needs(layout, counts), "a span length that the pattern can fill")
        found.append(constraint)
    return tuple(found)


def checked_constraints(canvas: Canvas) -> Canvas:
    """The canvas, once each pattern span is known to have a matching fill with its pinned words."""
    for layout, constraint in zip(_pattern_layouts(canvas), canvas.constraints, strict=True):
        tokens = canvas.ids[layout.start : layout.start + layout.length]
        masked = [not fixed for fixed in canvas.pinned[layout.start : layout.start + layout.length]]
        if not constraint.feasible(tokens, masked):
            raise _span_error(
                layout, "no fill matches the pattern with these must words", "must words the pattern allows"
            )
    return canvas


def _pattern_layouts(canvas: Canvas) -> list[SpanLayout]:
    return [layout for layout in canvas.spans if has_pattern(layout.span)]


def _needs(layout: SpanLayout, counts: list[int]) -> str:
    option = "re=" if layout.span.patterns else "min=/max="
    if not counts:
        return f"{option} matches no text this model's vocabulary can write"
    if counts[-1] == COUNT_SEARCH_TOKENS:  # the search stops there: no end in sight
        return f"{option} needs at least {counts[0]} tokens here"
    low, high = counts[0], counts[-1]
    return f"{option} needs {low} tokens here" if low == high else f"{option} needs {low} to {high} tokens here"


def _span_error(layout: SpanLayout, message: str, expected: str) -> DocumentError:
    return DocumentError(message, line=layout.span.line, column=layout.span.column, expected=expected)


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
    patterns = dict(zip((layout.start for layout in _pattern_layouts(canvas)), canvas.constraints, strict=True))
    for layout in layouts:
        offsets.update(_place_span_musts(model, layout, log_probs, patterns.get(layout.start)))
    return offsets


def _place_span_musts(
    model: DiffusionModel, layout: SpanLayout, log_probs: torch.Tensor, pattern: SpanConstraint | None = None
) -> dict[tuple[int, int], int]:
    """Each free must in written order, after the previous one and leaving room for the rest, goes
    where the sum of its tokens' log-probabilities is highest (in a pattern span: among the
    offsets where the pattern can still match)."""
    musts = layout.span.musts
    free = [i for i, must in enumerate(musts) if must.offset is None]
    # A word's tokens only differ between offset 0 and later offsets (the leading space).
    words = {
        i: (
            must_tokens(model.tokenizer, musts[i], 0, layout.joins_space, as_written=has_pattern(layout.span)),
            must_tokens(model.tokenizer, musts[i], 1, layout.joins_space, as_written=has_pattern(layout.span)),
        )
        for i in free
    }
    taken = set(layout.pinned)
    placed = dict(layout.pinned)
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
            if pattern is not None and not _pattern_fits(pattern, {**placed, **dict(zip(cells, word, strict=True))}):
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
        placed.update(zip(range(offset, end), words[must_index][offset > 0], strict=True))
        taken.update(range(offset, end))
        earliest = end
    return offsets


def _pattern_fits(pattern: SpanConstraint, pinned: dict[int, int]) -> bool:
    tokens = [pinned.get(offset, -1) for offset in range(pattern.length)]
    return pattern.feasible(tokens, [offset not in pinned for offset in range(pattern.length)])


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
    per_span: bool = CHOOSE_PER_SPAN,
) -> list[FillResult]:
    """`row_seeds` fixes each canvas's random draws (see `editor.sampler.row_seed`); without it the
    canvases derive theirs from `options.seed`. With several candidates (`options.candidates`) each
    canvas runs that many rows of the one batch and the judge keeps the best (`judged_results`)."""
    started = time.perf_counter() if started is None else started
    options = with_candidates(model, options)
    seed = options.seed if options.seed is not None else random_seed()
    seeds = row_seeds if row_seeds is not None else [row_seed(seed, index) for index in range(len(canvases))]
    end_id = model.special.end_ids[0]
    rows = [
        row for canvas, s in zip(canvases, seeds, strict=True) for row in candidate_rows(canvas, s, options, end_id)
    ]
    output = sample(
        model,
        rows,
        options.model_copy(update={"seed": seed}),
        vocabulary_rules(model),
        on_step=on_step,
        should_cancel=should_cancel,
    )
    outputs = list(zip(output.ids, output.confidences, strict=True))
    return judged_results(
        model, canvases, outputs, options, seed=output.seed, steps=output.steps, started=started, per_span=per_span
    )


def random_seed() -> int:
    return random.SystemRandom().randrange(2**63)


def with_candidates(model: DiffusionModel, options: SamplerOptions) -> SamplerOptions:
    """`options` with the candidate count settled: the model's default when left open."""
    if options.candidates is not None:
        return options
    return options.model_copy(update={"candidates": DEFAULT_CANDIDATES.get(model.name, 1)})


def candidate_seed(seed: int, candidate: int) -> int:
    """The seed of a canvas's candidate `candidate` (0: the canvas's own seed)."""
    return seed if candidate == 0 else (seed * 1_000_003 + candidate) % 2**63


def candidate_rows(canvas: Canvas, seed: int, options: SamplerOptions, end_id: int) -> list[Row]:
    """The sampler rows of one canvas. The first candidate runs at the asked temperature (usually
    greedy). When the canvas has `[MASK a-b]` spans the others try lengths spread below each range's end
    (greedy, the tail pinned to the end token as the adapter was trained on padded spans), since a
    model left to itself tends to fill a range to its end; otherwise they are sampled at
    `CANDIDATE_TEMPERATURE` (or the asked temperature)."""
    count = options.candidates or 1
    # A pattern span keeps its whole range in every candidate: a cut could leave no matching length.
    ranged = [
        layout
        for layout in canvas.spans
        if layout.min_tokens < layout.length and layout.span.choices is None and not has_pattern(layout.span)
    ]
    patterns = canvas.constraints
    rows = [Row(canvas.ids, canvas.pinned, canvas.rules, seed=seed, constraints=patterns)]
    for candidate in range(1, count):
        if ranged:
            # 0 (each range's least), 1/3, 2/3 ... of the way to its most: the free first candidate
            # already fills a range to its end more often than not.
            fraction = (candidate - 1) / (count - 1)
            ids, pinned = cut_ranges(canvas, ranged, fraction, end_id)
            rows.append(Row(ids, pinned, canvas.rules, seed=candidate_seed(seed, candidate), constraints=patterns))
        else:
            temperature = options.temperature if options.temperature > 0 else CANDIDATE_TEMPERATURE
            rows.append(
                Row(
                    canvas.ids,
                    canvas.pinned,
                    canvas.rules,
                    seed=candidate_seed(seed, candidate),
                    temperature=temperature,
                    constraints=patterns,
                )
            )
    return rows


def cut_ranges(
    canvas: Canvas, ranged: Sequence[SpanLayout], fraction: float, end_id: int
) -> tuple[list[int], list[bool]]:
    """The canvas with each range span cut to `min + fraction * (max - min)` tokens (never before a
    pinned must word): the positions after it hold the end token, pinned."""
    ids, pinned = list(canvas.ids), list(canvas.pinned)
    for layout in ranged:
        keep = layout.min_tokens + round(fraction * (layout.length - layout.min_tokens))
        keep = max([keep, *(offset + 1 for offset in layout.pinned)])
        for offset in range(keep, layout.length):
            ids[layout.start + offset] = end_id
            pinned[layout.start + offset] = True
    return ids, pinned


def judged_results(
    model: DiffusionModel,
    canvases: Sequence[Canvas],
    outputs: Sequence[tuple[list[int], list[float]]],
    options: SamplerOptions,
    *,
    seed: int,
    steps: int,
    started: float,
    per_span: bool = CHOOSE_PER_SPAN,
) -> list[FillResult]:
    """One result per canvas from its `options.candidates` consecutive outputs (ids, confidences):
    the candidate the model's judge scores highest, its spans carrying the others' fills. With
    `per_span`, a document of several spans may instead take each span from the candidate whose
    fill of it the judge scores best (`mixed_candidate`), when the judge prefers the mix as a whole.
    Each result's `elapsed_s` runs from `started` (`time.perf_counter()`) to the judge's verdict."""
    count = options.candidates or 1
    results: list[FillResult] = []
    for number, canvas in enumerate(canvases):
        mine = outputs[number * count : (number + 1) * count]
        filled = [render(canvas, ids, confidences, model.tokenizer, model.special.end_ids) for ids, confidences in mine]
        if count == 1:  # no judge: only the rule that needs none
            ids, confidences = mine[0]
            trimmed = unfinished_tails_cut(model, canvas, ids)
            text = (
                filled[0]
                if trimmed == ids
                else render(canvas, trimmed, confidences, model.tokenizer, model.special.end_ids)
            )
            results.append(FillResult(text.text, text.spans, model.name, seed, steps, 0.0, options))
            continue
        judge = judge_for(model)  # built (its weights loaded) on first use
        scores = judge.score([canvas] * count, [ids for ids, _ in mine], [text.text for text in filled])
        usable = [number for number, text in enumerate(filled) if not blank_span(canvas, text)] or list(range(count))
        best = max(usable, key=scores.__getitem__)
        kept = Judged(mine[best][0], mine[best][1], filled[best], scores[best])
        if per_span and len(canvas.spans) > 1:
            mixed = mixed_candidate(model, judge, canvas, mine, filled, best)
            # Each candidate was sampled with the no-repeat rule, the mix was not: spans from two
            # candidates can repeat each other ("the implementation of ... the implementation of").
            if mixed is not None and mixed.score > kept.score and not _adds_repeats(mixed.filled, kept.filled):
                kept = mixed
        kept = cut_at_sentence_ends(model, judge, canvas, kept)
        spans = with_alternatives(kept.filled, filled, scores)
        results.append(
            FillResult(kept.filled.text, spans, model.name, seed, steps, 0.0, options, kept.score, judge.name)
        )
    elapsed = time.perf_counter() - started  # the judge's time counts: the user waits for it
    return [replace(result, elapsed_s=elapsed) for result in results]


@dataclass(frozen=True)
class Judged:
    """A candidate document as the judge saw it: canvas ids, confidences, its rendering, its score."""

    ids: list[int]
    confidences: list[float]
    filled: FilledText
    score: float


def cut_at_sentence_ends(model: DiffusionModel, judge: Judge, canvas: Canvas, kept: Judged) -> Judged:
    """`kept` with range spans cut short after a sentence they wrote where that reads better. A
    model fills a range to its end more often than not and then runs on into a new sentence it
    cannot finish in the tokens left ("... running shoe. The model is"). Where such a span ends its
    line, the unfinished tail goes (`unfinished_tails_cut`: the judge, scoring per character, can
    prefer a long predictable tail to a finished line); elsewhere the judge chooses among the cuts
    of `sentence_cut_variants`, up to `MAX_CUT_ROUNDS` rounds of one judge pass each."""
    trimmed = unfinished_tails_cut(model, canvas, kept.ids)
    if trimmed != kept.ids:
        text = render(canvas, trimmed, kept.confidences, model.tokenizer, model.special.end_ids)
        [score] = judge.score([canvas], [trimmed], [text.text])
        kept = Judged(trimmed, kept.confidences, text, score)
    for _ in range(MAX_CUT_ROUNDS):
        variants = sentence_cut_variants(model, canvas, kept.ids)
        if not variants:
            return kept
        texts = [render(canvas, ids, kept.confidences, model.tokenizer, model.special.end_ids) for ids in variants]
        scores = judge.score([canvas] * len(variants), variants, [text.text for text in texts])
        best = max(range(len(variants)), key=scores.__getitem__)
        if scores[best] <= kept.score or blank_span(canvas, texts[best]):
            return kept
        kept = Judged(variants[best], kept.confidences, texts[best], scores[best])
    return kept


def unfinished_tails_cut(model: DiffusionModel, canvas: Canvas, ids: list[int]) -> list[int]:
    """`ids` with each range span that ends its line (or the document), and holds a finished
    sentence followed by words that finish none, ended after that sentence (never before a pinned
    word or the span's least length)."""
    end_id = model.special.end_ids[0]
    cut = list(ids)
    for number, layout in enumerate(canvas.spans):
        if not _cuttable(layout) or canvas.literals[number + 1][:1] not in ("", "\n"):
            continue
        words, kept, earliest = _span_words(model, layout, ids)
        if not kept or _ends_sentence(_text_before(words, kept, layout.length)):
            continue
        ends = [
            o for o in kept if o >= earliest and words[o - 1].strip() and _ends_sentence(_text_before(words, kept, o))
        ]  # after the stop itself, not after a space token that follows it
        if ends:
            cut[layout.start + ends[-1] : layout.start + layout.length] = [end_id] * (layout.length - ends[-1])
    return cut


def _cuttable(layout: SpanLayout) -> bool:
    """A range span free to end early: not an exact length, a choice, or a pattern (a pattern
    span's fill, cut, could stop matching)."""
    return layout.min_tokens < layout.length and layout.span.choices is None and not has_pattern(layout.span)


def _span_words(model: DiffusionModel, layout: SpanLayout, ids: Sequence[int]) -> tuple[list[str], list[int], int]:
    """A span's text per position, its kept (non-end) offsets, and the earliest offset a cut may
    fall at (its least length, and never before a pinned word)."""
    region = ids[layout.start : layout.start + layout.length]
    end_ids = set(model.special.end_ids)
    words = [model.tokenizer.decode([token]) for token in region]
    kept = [offset for offset, token in enumerate(region) if token not in end_ids]
    earliest = max([layout.min_tokens, 1, *(offset + 1 for offset in layout.pinned)])
    return words, kept, earliest


def _text_before(words: Sequence[str], kept: Sequence[int], offset: int) -> str:
    """The span's text before `offset`: its kept positions' words (dropped end tokens left out)."""
    return "".join(words[k] for k in kept if k < offset)


def _ends_sentence(text: str) -> bool:
    """Whether `text` ends a sentence: a stop, question or exclamation mark (closing quotes and
    brackets after it allowed), not after a title or an initial ("Dr.", "J.")."""
    text = text.rstrip().rstrip("\"')]»”’")
    if not text.endswith(SENTENCE_ENDS):
        return False
    last = text.split()[-1] if text.split() else ""
    return last.lower() not in ABBREVIATIONS and not (len(last) == 2 and last[0].isalpha())


def sentence_cut_variants(model: DiffusionModel, canvas: Canvas, ids: Sequence[int]) -> list[list[int]]:
    """Copies of `ids`, each with one range span ended (end tokens from there on) right after one of
    the last `MAX_CUTS_PER_SPAN` sentence ends inside it that more of the fill follows, never before
    a pinned word or the span's least length. Where the text after the span opens with punctuation,
    the cuts fall just before one of the fill's own last stops instead (a cut after it would double
    it: "shoe.. Your"), so "on Monday.." may read "on Monday." and "was not working. We will fix
    it." may read "was not working."."""
    end_id = model.special.end_ids[0]
    variants: list[list[int]] = []
    for number, layout in enumerate(canvas.spans):
        if not _cuttable(layout):
            continue
        words, kept, earliest = _span_words(model, layout, ids)
        following = canvas.literals[number + 1]
        if following[:1] and following[0] in PUNCTUATION:
            # The text after brings its own stop: end the fill just before one of its own stops
            # ("that the code was not working. We will fix it" + "." -> "... not working.").
            cuts = [
                offset
                for offset in kept
                if offset >= earliest and words[offset].strip() and not words[offset].strip(PUNCTUATION + " ")
            ][-MAX_CUTS_PER_SPAN:]
        else:
            cuts = [
                offset
                for offset in range(earliest, layout.length)
                if offset in kept and words[offset - 1].strip() and _ends_sentence(_text_before(words, kept, offset))
            ][-MAX_CUTS_PER_SPAN:]
        for offset in cuts:
            variant = list(ids)
            variant[layout.start + offset : layout.start + layout.length] = [end_id] * (layout.length - offset)
            variants.append(variant)
    return variants


def mixed_candidate(
    model: DiffusionModel,
    judge: Judge,
    canvas: Canvas,
    outputs: Sequence[tuple[list[int], list[float]]],
    filled: Sequence[FilledText],
    best: int,
) -> Judged | None:
    """The document that takes each span from the candidate whose fill of it (with the seam to the
    text after it) the judge scores best, and its score; None when that is the `best` candidate
    throughout. Spans stay where the canvas put them in every candidate, so their positions swap
    whole; a span left blank where it asked for a token is never taken."""
    segments = [span_segments(text) for text in filled]
    span_scores = judge.span_scores(
        [canvas] * len(filled), [ids for ids, _ in outputs], [t.text for t in filled], segments
    )
    picks: list[int] = []
    for number, layout in enumerate(canvas.spans):
        fine = [
            candidate
            for candidate, text in enumerate(filled)
            if layout.min_tokens < 1 or text.spans[number].text.strip()
        ] or [best]
        picks.append(max(fine, key=lambda candidate: span_scores[candidate][number]))
    if all(pick == best for pick in picks):
        return None
    ids, confidences = list(outputs[best][0]), list(outputs[best][1])
    for layout, pick in zip(canvas.spans, picks, strict=True):
        region = slice(layout.start, layout.start + layout.length)
        ids[region], confidences[region] = outputs[pick][0][region], outputs[pick][1][region]
    text = render(canvas, ids, confidences, model.tokenizer, model.special.end_ids)
    [score] = judge.score([canvas], [ids], [text.text])
    return Judged(ids, confidences, text, score)


def _adds_repeats(mixed: FilledText, whole: FilledText) -> bool:
    """Whether `mixed` repeats more word 3-grams than the candidate `whole` it was built on."""
    return _repeated_word_trigrams(mixed.text) > _repeated_word_trigrams(whole.text)


def _repeated_word_trigrams(text: str) -> int:
    words = [word.strip(".,;:!?\"'()").lower() for word in text.split()]
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2) if all(words[i : i + 3])]
    return len(grams) - len(set(grams))


def span_segments(filled: FilledText) -> list[tuple[int, int]]:
    """Each span's character range from its fill to the next fill (the last: to the end)."""
    starts = [span.start for span in filled.spans]
    return [(start, end) for start, end in zip(starts, [*starts[1:], len(filled.text)], strict=True)]


def blank_span(canvas: Canvas, filled: FilledText) -> bool:
    """Whether a span that asked for at least one token came back blank (a lone space token): such a
    candidate is never kept while another is not blank, however likely the judge finds it (a short
    document of predictable scaffolding, a JSON record, scores well per character)."""
    return any(
        layout.min_tokens >= 1 and not span.text.strip()
        for layout, span in zip(canvas.spans, filled.spans, strict=True)
    )


def with_alternatives(kept: FilledText, filled: Sequence[FilledText], scores: Sequence[float]) -> list[SpanFill]:
    """The kept fill's spans, each with the candidates' other distinct fills, best first."""
    ranked = sorted(range(len(filled)), key=lambda i: -scores[i])
    spans: list[SpanFill] = []
    for number, span in enumerate(kept.spans):
        seen = {span.text}
        alternatives: list[SpanAlternative] = []
        for candidate in ranked:
            other = filled[candidate].spans[number]
            if other.text not in seen:
                seen.add(other.text)
                alternatives.append(
                    SpanAlternative(text=other.text, token_ids=other.token_ids, score=scores[candidate])
                )
        spans.append(span.model_copy(update={"alternatives": alternatives}))
    return spans


def locate(canvas: Canvas, position: int) -> tuple[int, int] | None:
    """(span number, offset inside the span) of a canvas position, or None for literal text."""
    for number, layout in enumerate(canvas.spans):
        if layout.start <= position < layout.start + layout.length:
            return number, position - layout.start
    return None


__all__ = [
    "FillResult",
    "StepEvent",
    "candidate_rows",
    "fill_canvases",
    "fill_documents",
    "judged_results",
    "locate",
    "prepare_canvas",
    "with_candidates",
]
