"""The bidirectional sampler (docs/sampler.md, docs/engine.md).

A batch of canvases (rows of different lengths, right-padded) starts with every free position
masked. Each step the model scores the masked positions, a token is chosen for each, and the
schedule decides which of them are committed; committed tokens never change, and pinned positions
are never written. Each row keeps its own step budget, computed from its own mask count, so rows
with different numbers of masks finish exactly on schedule, and its own random generator, so a
row's fill depends on its seed alone, not on the rows batched with it.

The step loop is batched tensor work: per-row state lives in [B, L] tensors, the masked positions
of a step in [B, M] (padded; `valid` marks real ones), and the only host read per step is the mask
counts that size the next step. With `options.cache` and a model that can run a window of the
canvas against cached keys/values (`WindowedModel`), a step recomputes only the masked positions
and those committed at the step before (their input changed); everything else keeps the keys and
values of its last run, refreshed by a full run of the row at its own block starts and every
`cache_refresh_every` of its own steps. Rows may join and leave a run between steps (the worker's
continuous batching); nothing a row computes depends on when it joined or on its neighbours.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

from editor.constraints import PositionRule, VocabularyRules
from editor.models.base import (
    CanvasCache,
    DiffusionModel,
    SpecialIds,
    WindowedModel,
    refreshes_in_window,
    scored_logits,
    windowed,
)
from editor.options import FillCancelled, SamplerOptions
from editor.patterns import SpanConstraint, restrict_patterns_
from editor.reference_schedules import guided_logits, reference_plan, untempered_confidence


@dataclass(frozen=True)
class Commit:
    row: int
    position: int
    token_id: int
    confidence: float


class StepEvent:
    """One step, held as device tensors; `commits` and `remaining` read them back on first use, so
    a step nobody listens to costs no host synchronisation."""

    def __init__(
        self,
        step: int,
        candidates: torch.Tensor,  # [B, M] canvas positions scored this step
        committed: torch.Tensor,  # [B, M] bool
        tokens: torch.Tensor,  # [B, M]
        confidence: torch.Tensor,  # [B, M] float32
        masked: torch.Tensor,  # [B, L] bool, after the step
        keys: list[int] | None = None,  # each row's key in its run (SamplerRun.add)
        row_steps: list[int] | None = None,  # each row's own step number (rows may join a run late)
    ) -> None:
        self.step = step
        self.keys = keys if keys is not None else list(range(masked.shape[0]))
        self.row_steps = row_steps if row_steps is not None else [step] * masked.shape[0]
        self._tensors = (candidates, committed, tokens, confidence, masked)

    @cached_property
    def commits(self) -> list[Commit]:
        """Every position committed this step, in position order per row."""
        candidates, committed, tokens, confidence, _ = self._tensors
        rows, slots = committed.nonzero(as_tuple=True)
        return [
            Commit(row=r, position=p, token_id=t, confidence=c)
            for r, p, t, c in zip(
                rows.tolist(),
                candidates[rows, slots].tolist(),
                tokens[rows, slots].tolist(),
                confidence[rows, slots].tolist(),
                strict=True,
            )
        ]

    @cached_property
    def remaining(self) -> list[int]:
        """Masks left per row after this step."""
        return [int(n) for n in self._tensors[4].sum(dim=1).tolist()]

    @cached_property
    def committed_per_row(self) -> list[int]:
        return [int(n) for n in self._tensors[1].sum(dim=1).tolist()]


@dataclass
class Row:
    """One canvas row as the sampler sees it; `seed` fixes its random draws (None: derived from the
    run's seed and the row's index); `temperature` overrides the run's for this row (the sampled
    candidates beside a greedy one, editor.filling)."""

    ids: list[int]
    pinned: list[bool]
    rules: list[PositionRule]
    seed: int | None = None
    temperature: float | None = None
    constraints: Sequence[SpanConstraint] = ()  # pattern spans (editor.patterns), masked exactly each step


@dataclass
class SampleOutput:
    ids: list[list[int]]
    confidences: list[list[float]]  # per position; 1.0 at pinned positions
    steps: int
    seed: int
    row_seeds: list[int]
    row_steps: list[int]  # the last step at which each row committed, plus one


StepCallback = Callable[[StepEvent], None]
CancelCheck = Callable[[], bool]


def step_counts(masks: int, steps: int) -> list[int]:
    """How many positions a row commits at each of its steps: `masks` spread evenly, earlier steps
    taking the remainder (LLaDA's linear schedule)."""
    steps = max(1, min(steps, masks))
    base, extra = divmod(masks, steps)
    return [base + (1 if step < extra else 0) for step in range(steps)] if masks else []


def block_plan(masks: int, steps: int, block_length: int) -> list[tuple[int, int]]:
    """(count, block) per step: masked positions cut into blocks in document order, each block
    finished in its share of the steps before the next starts."""
    blocks = math.ceil(masks / block_length) if masks else 0
    plan: list[tuple[int, int]] = []
    steps_left = max(steps, blocks)
    for block in range(blocks):
        size = min(block_length, masks - block * block_length)
        share = max(1, steps_left // (blocks - block))
        steps_left -= share
        plan += [(count, block) for count in step_counts(size, share)]
    return plan


def effective_steps(masks: int, options: SamplerOptions) -> int:
    """The most steps a row with `masks` masked positions takes under `options` (defaults counted:
    one step per mask when `steps` is unset; the blocks schedule takes at least one per block)."""
    if masks == 0:
        return 0
    steps = options.steps if options.steps is not None else masks
    if options.reference is not None:
        return len(reference_plan(masks, options, seed=0))  # a plan's length does not depend on its seed
    if options.schedule == "blocks":
        return len(block_plan(masks, steps, options.block_length))
    if options.schedule in ("threshold", "factor"):  # at least one commit per step
        return masks if options.steps is None else min(masks, options.steps)
    return len(step_counts(masks, steps))


def _finite_(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits [M, V] (or [B, M, V]), in place: NaN as -inf, +inf as the largest float, disallowed
    tokens (`allowed` broadcasts to logits) -inf, so softmax cannot make NaN and argmax (which
    treats NaN as the largest value) never picks a disallowed token. Returns logits."""
    largest = torch.finfo(logits.dtype).max
    torch.nan_to_num_(logits, nan=float("-inf"), posinf=largest, neginf=float("-inf"))
    return logits.masked_fill_(~allowed, float("-inf"))


def _revive_dead_(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """A position left with no finite allowed logit becomes uniform over its allowed tokens (in
    place; returns logits)."""
    dead = torch.isneginf(logits.amax(dim=-1, keepdim=True))  # [..., 1]
    return logits.masked_fill_(dead & allowed, 0.0)


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the mass before it already reaches top_p (the top token always stays).
    drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


NGRAM_WINDOW = 64  # how far apart two copies of an n-gram count as a repeat (no_repeat_ngram)
SAME_STEP_CHECKS = 2  # passes of the rule over a step's own commits (see _without_same_step_repeats)


def pad_rows(
    rows: Sequence[Row], pad_id: int, device: torch.device, *, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, L], pinned [B, L], attention [B, L], right-padded to the longest row (or `width`)."""
    width = max(len(row.ids) for row in rows) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pinned = torch.ones((len(rows), width), dtype=torch.bool)
    attention = torch.zeros((len(rows), width), dtype=torch.bool)
    for index, row in enumerate(rows):
        ids[index, : len(row.ids)] = torch.tensor(row.ids)
        pinned[index, : len(row.ids)] = torch.tensor(row.pinned)
        attention[index, : len(row.ids)] = True
    return ids.to(device), pinned.to(device), attention.to(device)


def neighbours(ids: torch.Tensor, candidates: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token `offset` places from each candidate position (ids [B, L], candidates [B, M]) and
    whether that place is on the canvas: ([B, M] ids, [B, M] bool)."""
    beside = candidates + offset  # [B, M]
    inside = (beside >= 0) & (beside < ids.shape[1])
    return ids.gather(1, beside.clamp(0, ids.shape[1] - 1)), inside


def penalize_neighbours_(
    logits: torch.Tensor,
    ids: torch.Tensor,
    candidates: torch.Tensor,
    skip: torch.Tensor,
    penalty: float,
    words: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """logits [B, M, V] at `candidates` [B, M] made less keen, in place, on the token on either side (ids
    [B, L]), CTRL-style (positive logits divided by `penalty`, negative ones multiplied), so that a
    fill does not repeat the word beside it ("team team"). With `words` (each token's word class
    [V] and each class's spellings [C, K], see `VocabularyRules.word_classes`) every spelling of
    that word is penalised ("Book book"), and a punctuation token or a position still masked
    beside the blank is looked past: "Mr, Mr" is often chosen as "Mr [mask] Mr" before the comma.
    The ids in `skip` [S] (the mask first, then the end tokens: `never_penalised`) are never penalised.
    Touches 1 + K logits per position, not V. Returns logits."""
    for offset in (-1, 1):
        tokens, inside = neighbours(ids, candidates, offset)
        hit = inside & ~torch.isin(tokens, skip)  # [B, M] the neighbour's own id is penalised
        targets = tokens[..., None]  # [B, M, 1]
        penalise = hit
        if words is not None:
            classes, spellings = words
            word = torch.where(hit, classes[tokens], -1)  # [B, M]
            further, further_inside = neighbours(ids, candidates, 2 * offset)
            between = (hit & (word < 0)) | (inside & (tokens == skip[0]))  # punctuation, or not filled yet
            past = between & further_inside & ~torch.isin(further, skip)
            word = torch.where(past, classes[further], word)
            has_word = word >= 0
            spelled = spellings[word.clamp(min=0)]  # [B, M, K]
            # Every index of a row is penalised or none is, so a repeated index reads and writes one value.
            first = torch.where(hit | ~has_word, tokens, spelled[..., 0])[..., None]  # [B, M, 1]
            targets = torch.cat([first, torch.where(has_word[..., None], spelled, first)], dim=-1)  # [B, M, 1+K]
            penalise = hit | has_word
        values = logits.gather(2, targets)
        penalised = torch.where(values > 0, values / penalty, values * penalty)
        logits.scatter_(2, targets, torch.where(penalise[..., None], penalised, values))
    return logits


def never_penalised(special: SpecialIds, device: torch.device) -> torch.Tensor:
    """[S] ids the repetition penalty leaves alone: the mask and the end tokens. Built once per run:
    a tensor made from a list on a GPU waits for the GPU to finish its queued work."""
    return torch.tensor([special.mask, *special.end_ids], device=device)


def forbid_double_spaces_(
    logits: torch.Tensor,
    keep: torch.Tensor,
    ids: torch.Tensor,
    candidates: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
) -> torch.Tensor:
    """logits [B, M, V] at `candidates` [B, M], in place: after a neighbour whose text ends with a space, tokens
    that start with one are out, and before a neighbour that starts with one, tokens that end with one
    (ids [B, L]; starts, ends [V] bool). Only where `keep` [B, M] says the position's rule allows some
    token with no space at either end, so a rule is never left with nothing. Returns logits."""
    left, has_left = neighbours(ids, candidates, -1)
    right, has_right = neighbours(ids, candidates, 1)
    after_space = ends[left] & has_left & keep  # [B, M]
    before_space = starts[right] & has_right & keep  # [B, M]
    out = (after_space[..., None] & starts) | (before_space[..., None] & ends)  # [B, M, V]
    return logits.masked_fill_(out, float("-inf"))


def forbid_repeated_ngrams_(
    logits: torch.Tensor,
    ids: torch.Tensor,
    candidates: torch.Tensor,
    known: torch.Tensor,
    free: torch.Tensor,
    lettered: torch.Tensor,
    n: int,
    window: int,
) -> torch.Tensor:
    """logits [B, M, V] at `candidates` [B, M], in place: no token that would complete an n-gram
    already on the canvas (ids [B, L]) within `window` positions, whichever of the n-gram's places
    the candidate takes, with the other n - 1 already committed (`known` [B, L]: filled, pinned or
    literal; not masked, not padding). Only n-grams a fill wrote count, at least in part (`free`
    [B, L]: the positions the sampler fills): a fill may name what the literal text names ("the
    Northwind trail shoes" of a record), not repeat itself. Only n-grams with a letter in them count
    (`lettered` [V]): "1", "9", "9" twice is two years, not a loop. Looks only at the band of
    2 * window + 1 positions around each candidate: [B, M, K] comparisons and a scatter of -inf,
    never [B, M, L] or [B, M, V] tensors, so a 4,000-token canvas costs what a short one does per
    candidate. Returns logits."""
    # Every place the rule compares, gathered at once: D = 2n - 1 shifts around the candidate p and
    # around each occurrence q; slot s (the candidate's place in the n-gram) uses shifts -s..n-1-s
    # but 0. About 40 operations a call whatever n is (a loop over slots and shifts made ~3,000 a
    # step at n = 3: each one a kernel launch on a GPU).
    width, device = ids.shape[1], ids.device
    band = torch.arange(-window, window + 1, device=device)  # [K]
    shifts = torch.arange(1 - n, n, device=device)  # [D]
    slots = torch.arange(n, device=device)[:, None]  # [n, 1]
    uses = (shifts >= -slots) & (shifts <= n - 1 - slots) & (shifts != 0)  # [n, D]
    code = ids * 4 + known.long() * 2 + free.long()  # [B, L] token, known and written in one gather

    def look(places: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The token, known, written and on-canvas at `places` [B, ...] (clamped onto the canvas)."""
        values = code.gather(1, places.clamp(0, width - 1).flatten(1)).view(places.shape)
        inside = (places >= 0) & (places < width)
        return values >> 2, (values & 2) != 0, (values & 1) != 0, inside

    theirs, theirs_known, theirs_free, theirs_inside = look((candidates[..., None] + band)[..., None] + shifts)
    mine, mine_known, _, mine_inside = look(candidates[..., None] + shifts)  # [B, M, D]
    own = theirs[..., n - 1]  # [B, M, K] the token an occurrence would ban (shift 0)
    base = theirs_inside[..., n - 1] & theirs_known[..., n - 1] & (band != 0)  # [B, M, K]
    agrees = (mine_inside & mine_known)[:, :, None] & (theirs == mine[:, :, None]) & theirs_known & theirs_inside
    match = base[..., None] & (agrees[..., None, :] | ~uses).all(dim=-1)  # [B, M, K, n]
    has_letter = lettered[own][..., None] | (lettered[mine][:, :, None] & uses).any(dim=-1)[:, :, None]
    written = theirs_free[..., n - 1, None] | ((theirs_free & theirs_inside)[..., None, :] & uses).any(dim=-1)
    # An occurrence holding the candidate's own position is the n-gram being written, not an
    # earlier one (it matters when the position already holds a token: a step's commits checked again).
    holds_candidate = (((band[:, None] + shifts) == 0)[:, None] & uses).any(dim=-1)  # [K, n]
    found = (match & has_letter & written & ~holds_candidate).any(dim=-1)  # [B, M, K]
    block = torch.where(found, float("-inf"), float("inf")).to(logits.dtype)  # [B, M, K]
    return logits.scatter_reduce_(2, own, block, reduce="amin")


def sample(
    model: DiffusionModel,
    rows: Sequence[Row],
    options: SamplerOptions,
    vocabulary: VocabularyRules,
    *,
    on_step: StepCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> SampleOutput:
    """Fill every unpinned position of every row."""
    with torch.inference_mode():
        run = SamplerRun(model, rows, options, vocabulary)
        while not run.finished:
            if should_cancel is not None and should_cancel():
                raise FillCancelled(f"fill cancelled at step {run.step_number}")
            event = run.step()
            if on_step is not None and event is not None:
                on_step(event)
        return run.output()


def row_seed(seed: int, index: int) -> int:
    """The seed of row `index` of a run seeded `seed`: row 0 uses the run's seed itself, so a
    one-document fill reproduces from its reported seed whether it ran alone or in a batch."""
    return (seed + index) % 2**63


class SamplerRun:
    """Rows being filled, a step at a time (`step` until `finished`).

    Rows may join (`add`) and leave (`remove`) between steps: that is the worker's continuous
    batching (docs/engine.md). Everything a row's numbers depend on follows the row's own step
    count, not the run's: its plan (commit counts, active block), its cache refreshes and its random
    draws, so a row fills the same whether it ran alone, batched from the start or joined mid-run.
    """

    def __init__(
        self, model: DiffusionModel, rows: Sequence[Row], options: SamplerOptions, vocabulary: VocabularyRules
    ) -> None:
        self.model = model
        self.options = options
        self.vocabulary = vocabulary
        device = self.device = model.device
        self.seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**63)
        self.space_edges = vocabulary.space_edges(device) if options.single_spaces else None
        # each token's word class [V] and each class's spellings [C, K]
        self.words = vocabulary.word_classes(device) if options.repetition_penalty != 1.0 else None
        self.unpenalised = never_penalised(model.special, device)
        # no_repeat_ngram's token tables [V], made once per run: a [V] copy to a GPU each step would wait.
        if options.no_repeat_ngram:
            self.lettered = vocabulary.lettered(device)
            self.every_token = torch.ones_like(self.lettered)
        self.fast = windowed(model)
        # The references (and guidance, whose unguided pass has no cache) run full passes every step.
        self.windowed = options.cache and self.fast is not None and options.reference is None and not options.cfg_scale
        # Every schedule but threshold/factor commits what its plan says: the host follows the
        # plans instead of reading the device each step.
        self.follows_plan = options.schedule not in ("threshold", "factor")
        self._host_plans: list[_HostPlan] = []
        self._temperature_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._late_windows: _LateRead | None = None  # the window widths the last step computed
        # Host-side, one entry per row in batch order.
        self.rows: list[Row] = []
        self.keys: list[int] = []  # stable names for rows (indices shift when rows leave)
        self.row_seeds: list[int] = []
        self.generators: list[torch.Generator] = []  # one per row: its draws depend on its seed alone
        self.temperatures: list[float] = []
        self.row_steps: list[int] = []  # steps each row has taken
        self.last_commit: list[int] = []  # the row's own step of its last commit, plus one
        self._counts: list[int] = []  # masks left per row, as last read from the device
        self._scored_counts: list[int] = []  # positions each row's next step scores (its active block's)
        self._window_counts: list[int] = []  # positions in each row's next window
        self._block_starts: list[frozenset[int]] = []  # each row's own steps that start a block
        self._rules: dict[PositionRule, int] = {PositionRule(): 0}
        self._added = 0
        # Device-side [B, ...] state; width L = the longest row.
        empty = torch.zeros((0, 0), dtype=torch.bool, device=device)
        self.ids = torch.zeros((0, 0), dtype=torch.long, device=device)
        self.pinned, self.attention, self.masked, self.fresh, self._window_mask = (empty,) * 5
        self.confidences = torch.zeros((0, 0), dtype=torch.float32, device=device)
        self.rule_index = torch.zeros((0, 0), dtype=torch.long, device=device)
        self._set_allowed(vocabulary.table([PositionRule()], device))
        self.plan = _PlanTables(
            counts=torch.zeros((0, 1), dtype=torch.long, device=device),
            blocks=torch.zeros((0, 1), dtype=torch.long, device=device),
            block_of=torch.zeros((0, 0), dtype=torch.long, device=device),
        )
        self._row_step = torch.zeros((0,), dtype=torch.long, device=device)
        self.padded = False
        self.cache: CanvasCache | None = None
        self.step_number = 0
        self.finished = True
        self.add(rows)

    # -- rows joining and leaving (between steps) --

    def add(self, rows: Sequence[Row]) -> list[int]:
        """Rows joining the run at its next step, each starting at its own step 0; returns their keys."""
        if not rows:
            return []
        keys = list(range(self._added, self._added + len(rows)))
        self._added += len(rows)
        device = self.device
        seeds = [
            row.seed if row.seed is not None else row_seed(self.seed, key) for row, key in zip(rows, keys, strict=True)
        ]
        width = max(self.width, *(len(row.ids) for row in rows))
        rule_index = self._rule_index(rows, width)  # first: it may refuse the rows
        self._set_width(width)
        ids, pinned, attention = pad_rows(rows, self.model.special.pad, device, width=width)
        masked = ~pinned & attention
        ids[masked] = self.model.special.mask
        mask_counts = [sum(1 for p in row.pinned if not p) for row in rows]
        plans = [_row_plan(count, self.options, seed) for count, seed in zip(mask_counts, seeds, strict=True)]
        self.ids = torch.cat([self.ids, ids])
        self.pinned = torch.cat([self.pinned, pinned])
        self.attention = torch.cat([self.attention, attention])
        self.masked = torch.cat([self.masked, masked])
        self.fresh = torch.cat([self.fresh, torch.zeros_like(masked)])
        self._window_mask = torch.cat([self._window_mask, attention])
        self.confidences = torch.cat([self.confidences, torch.ones(ids.shape, dtype=torch.float32, device=device)])
        self.rule_index = torch.cat([self.rule_index, rule_index])
        self.plan = self.plan.extended(plans, masked, self.options.block_length)
        self._row_step = torch.cat([self._row_step, torch.zeros(len(rows), dtype=torch.long, device=device)])
        if self.cache is not None:  # the joining rows' keys/values are computed at their first step
            self.cache.layers = [
                (
                    torch.cat([k, k.new_zeros((len(rows), *k.shape[1:]))]),
                    torch.cat([v, v.new_zeros((len(rows), *v.shape[1:]))]),
                )
                for k, v in self.cache.layers
            ]
        self.rows += rows
        self.keys += keys
        self.row_seeds += seeds
        self.generators += [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperatures += [
            row.temperature if row.temperature is not None else self.options.temperature for row in rows
        ]
        self._temperature_table = None
        self.row_steps += [0] * len(rows)
        self.last_commit += [0] * len(rows)
        self._counts += mask_counts
        host_plans = [_HostPlan.of(plan) for plan in plans]
        self._scored_counts += [host_plan.scored(0) for host_plan in host_plans]
        self._window_counts += [len(row.ids) for row in rows]
        self._block_starts += [_block_starts(plan) for plan in plans]
        self._host_plans += host_plans
        self._late_windows = None
        self._layout_changed()
        return keys

    def remove(self, keys: Sequence[int]) -> None:
        """Rows leaving the run (done or cancelled); the rest keep every number they had."""
        gone = set(keys)
        kept = [index for index, key in enumerate(self.keys) if key not in gone]
        if len(kept) == len(self.keys):
            return
        index = torch.tensor(kept, dtype=torch.long, device=self.device)

        def pick(values: list[Any]) -> list[Any]:
            return [values[i] for i in kept]

        self.rows, self.keys, self.row_seeds = pick(self.rows), pick(self.keys), pick(self.row_seeds)
        self.generators, self.temperatures = pick(self.generators), pick(self.temperatures)
        self._temperature_table = None
        self.row_steps, self.last_commit = pick(self.row_steps), pick(self.last_commit)
        self._counts, self._window_counts = pick(self._counts), pick(self._window_counts)
        self._scored_counts = pick(self._scored_counts)
        self._block_starts = pick(self._block_starts)
        self._host_plans = pick(self._host_plans)
        self._late_windows = None
        for name in ("ids", "pinned", "attention", "masked", "fresh", "_window_mask", "confidences", "rule_index"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.plan = self.plan.selected(index)
        self._row_step = self._row_step.index_select(0, index)
        if self.cache is not None:
            self.cache.layers = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cache.layers]
        self._set_width(max((len(row.ids) for row in self.rows), default=0))
        self._layout_changed()

    def row_output(self, key: int) -> tuple[list[int], list[float], int]:
        """A row's ids, confidences and steps taken (its own count, up to its last commit)."""
        index = self.keys.index(key)
        length = len(self.rows[index].ids)
        ids = self.ids[index, :length].tolist()
        confidences = self.confidences[index, :length].tolist()
        return ids, confidences, self.last_commit[index]

    def row_done(self, key: int) -> bool:
        return self._counts[self.keys.index(key)] == 0

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    def _set_width(self, width: int) -> None:
        """Pad every [B, L] tensor (and the cache) to `width` columns, or cut it to `width`."""
        if width == self.width:
            return
        grow = width - self.width
        fills: dict[str, float | bool | int] = {
            "ids": self.model.special.pad,
            "pinned": True,
            "attention": False,
            "masked": False,
            "fresh": False,
            "_window_mask": False,
            "confidences": 1.0,
            "rule_index": 0,
        }
        for name, fill in fills.items():
            tensor = getattr(self, name)
            setattr(self, name, F.pad(tensor, (0, grow), value=fill) if grow > 0 else tensor[:, :width])
        self.plan.block_of = (
            F.pad(self.plan.block_of, (0, grow), value=-1) if grow > 0 else self.plan.block_of[:, :width]
        )
        if self.cache is not None:  # layers [B, Hkv, L, D]; new columns are padding, never attended to
            self.cache.layers = [
                (F.pad(k, (0, 0, 0, grow)), F.pad(v, (0, 0, 0, grow)))
                if grow > 0
                else (k[:, :, :width].contiguous(), v[:, :, :width].contiguous())
                for k, v in self.cache.layers
            ]

    def _layout_changed(self) -> None:
        """After rows joined or left: padding, the cache's view of it, and whether anything is left."""
        self.padded = len({len(row.ids) for row in self.rows}) > 1
        if self.cache is not None:
            batch, width = self.ids.shape
            self.cache.positions = torch.arange(width, device=self.device).expand(batch, width)
            self.cache.attention = self.attention if self.padded else None
        self.finished = max(self._counts, default=0) == 0

    def _rule_index(self, rows: Sequence[Row], width: int) -> torch.Tensor:
        """[n, width] index of each position's rule in `allowed`, growing the table for new rules.
        Raises (a rule no token fits) before changing the run, so a bad row cannot break it."""
        rules = dict(self._rules)
        index = torch.zeros((len(rows), width), dtype=torch.long)
        for row_number, row in enumerate(rows):
            for position, (rule, fixed) in enumerate(zip(row.rules, row.pinned, strict=True)):
                if not fixed:
                    index[row_number, position] = rules.setdefault(rule, len(rules))
        if len(rules) > len(self._rules):
            self._set_allowed(self.vocabulary.table(list(rules), self.device))
            self._rules = rules
        return index.to(self.device)

    def _set_allowed(self, allowed: torch.Tensor) -> None:
        """The rules' vocabulary table [R, V], and (single_spaces) which rules allow a token with
        no space at either end [R]: worked out when the rules change, not at every step."""
        self.allowed = allowed
        self._plain_rules: torch.Tensor | None = None
        if self.space_edges is not None:
            spaced = self.space_edges[0] | self.space_edges[1]  # [V]
            self._plain_rules = (allowed & ~spaced).any(dim=-1)

    # -- a step --

    def step(self) -> StepEvent | None:
        """Score, choose and commit one step; returns what happened (None once nothing is left)."""
        if self.finished:
            return None
        planned, block = self.plan.at(self._row_step)  # [B] each, at every row's own step
        scoring = self._scoring(self.masked, block)  # [B, L] the positions this step may commit
        width = max(self._scored_counts)
        candidates = torch.argsort((~scoring).to(torch.uint8), dim=1, stable=True)[:, :width]  # [B, M]
        valid = scoring.gather(1, candidates)  # [B, M] real candidates (the rest is padding)
        # [B, M, V] float32, the step's own copy: every vocabulary-wide pass below works in place
        # (at Dream's 152k vocabulary and batch 16 each pass is hundreds of MB).
        logits = self._logits(candidates).float()
        allowed = self._allowed_at(candidates)  # [B, M, V], or [1, 1, V] when one rule covers the run
        _finite_(logits, allowed)
        patterns = restrict_patterns_(logits, self.rows, self.ids, self.masked, candidates)  # None: no pattern span
        if self.space_edges is not None and self._plain_rules is not None:
            starts, ends = self.space_edges
            keep = self._plain_rules[self.rule_index.gather(1, candidates)]  # [B, M]
            forbid_double_spaces_(logits, keep, self.ids, candidates, starts, ends)
        if self.options.repetition_penalty != 1.0:
            penalty = self.options.repetition_penalty
            penalize_neighbours_(logits, self.ids, candidates, self.unpenalised, penalty, self.words)
        if self.options.no_repeat_ngram:
            known = self.attention & ~self.masked & ~torch.isin(self.ids, self.unpenalised)  # [B, L]
            self._forbid_repeats(logits, self.ids, candidates, known)
        _revive_dead_(logits, allowed)
        tokens, confidence, scores = self._choose(logits, candidates, valid)
        count = self._commit_counts(confidence, valid, planned)  # [B]
        scores = scores.masked_fill(~valid, float("-inf"))
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        take = torch.arange(width, device=self.device)[None] < count[:, None]  # [B, M] in score order
        committed = torch.zeros_like(take).scatter(1, order, take) & valid  # [B, M]
        if self.options.no_repeat_ngram and self._may_commit_several():
            tokens, confidence = self._without_same_step_repeats(
                logits, allowed, candidates, tokens, confidence, committed
            )
        if patterns is not None:  # commits of one step, checked together against their span's pattern
            tokens, confidence = patterns.settle(logits, tokens, confidence, committed)
        self.ids.scatter_(1, candidates, torch.where(committed, tokens, self.ids.gather(1, candidates)))
        self.confidences.scatter_(
            1, candidates, torch.where(committed, confidence, self.confidences.gather(1, candidates))
        )
        self.masked = self.masked.scatter(1, candidates, valid & ~committed)
        self.fresh = torch.zeros_like(self.masked).scatter(1, candidates, committed)
        event = StepEvent(
            self.step_number, candidates, committed, tokens, confidence, self.masked, list(self.keys), self.row_steps
        )
        next_scoring = self._scoring(self.masked, self.plan.at(self._row_step + 1)[1])
        if self.windowed:
            self._window_mask = self._next_window(next_scoring)
        counts = self._after_step(next_scoring)
        self.last_commit = [
            row_step + 1 if now < before else last
            for now, before, last, row_step in zip(counts, self._counts, self.last_commit, self.row_steps, strict=True)
        ]
        self._counts = counts
        self.row_steps = [row_step + 1 for row_step in self.row_steps]
        self._row_step = self._row_step + 1
        self.step_number += 1
        self.finished = max(counts) == 0
        return event

    def _forbid_repeats(
        self, logits: torch.Tensor, ids: torch.Tensor, candidates: torch.Tensor, known: torch.Tensor
    ) -> None:
        """`no_repeat_ngram` n: no repeated n-gram with a letter in it, and no repeated 2n-gram of
        anything ("0.1.0.1.0.1" is a loop too, "1990 and 1995" is not)."""
        n, free = self.options.no_repeat_ngram, ~self.pinned
        forbid_repeated_ngrams_(logits, ids, candidates, known, free, self.lettered, n, NGRAM_WINDOW)
        forbid_repeated_ngrams_(logits, ids, candidates, known, free, self.every_token, 2 * n, NGRAM_WINDOW)

    def _may_commit_several(self) -> bool:
        """Whether some row may commit more than one position this step (its plan says so, or the
        schedule decides by confidence)."""
        if not self.follows_plan:
            return True
        return any(
            step < len(plan.plan) and plan.plan[step][0] > 1
            for plan, step in zip(self._host_plans, self.row_steps, strict=True)
        )

    def _without_same_step_repeats(
        self,
        logits: torch.Tensor,  # [B, M, V] the step's rule-filtered logits (changed in place)
        allowed: torch.Tensor,
        candidates: torch.Tensor,  # [B, M]
        tokens: torch.Tensor,  # [B, M]
        confidence: torch.Tensor,  # [B, M]
        committed: torch.Tensor,  # [B, M] bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions committed together could not see each other's tokens when the no-repeat rule
        ran: run it again with this step's commits in place, and a committed token it now bans is
        replaced by the best token it still allows; twice, since a replacement may meet another
        (no host read)."""
        now_known = self.attention & ~self.masked.scatter(1, candidates, ~committed & self.masked.gather(1, candidates))
        for _ in range(SAME_STEP_CHECKS):
            current = torch.where(committed, tokens, self.ids.gather(1, candidates))
            tentative = self.ids.scatter(1, candidates, current)  # [B, L]
            self._forbid_repeats(logits, tentative, candidates, now_known & ~torch.isin(tentative, self.unpenalised))
            banned = committed & torch.isneginf(logits.gather(2, tokens[..., None]).squeeze(-1))  # [B, M]
            _revive_dead_(logits, allowed)
            top, better = logits.max(dim=-1)
            tokens = torch.where(banned, better, tokens)
            confidence = torch.where(banned, torch.exp(top - torch.logsumexp(logits, dim=-1)), confidence)
        return tokens, confidence

    def _after_step(self, next_scoring: torch.Tensor) -> list[int]:
        """Each row's masks left after this step, with the next step's candidate and window widths
        set. A planned run computes them on the host and reads nothing, except the window widths
        of a shifted model (see `_next_windows`); threshold/factor read them, the one host read of
        their step."""
        if not self.follows_plan:
            left = self.masked.sum(dim=1)  # [B]
            if self.windowed:
                reads = torch.stack([left, next_scoring.sum(dim=1), self._window_mask.sum(dim=1)]).tolist()
                counts, self._scored_counts, self._window_counts = reads
            else:
                counts, self._scored_counts = torch.stack([left, next_scoring.sum(dim=1)]).tolist()
            return counts
        committed = [plan.commit(step) for plan, step in zip(self._host_plans, self.row_steps, strict=True)]
        self._scored_counts = [
            plan.scored(step + 1) for plan, step in zip(self._host_plans, self.row_steps, strict=True)
        ]
        if self.windowed:
            self._window_counts = self._next_windows(committed)
        return [plan.left for plan in self._host_plans]

    def _next_windows(self, committed: list[int]) -> list[int]:
        """Widths for the next step's windows, at least each row's: an unshifted model's window is
        its candidates plus this step's commits (disjoint: a committed position is no longer
        masked). A shifted model's also holds the position left of each candidate run, which only
        the device knows; within a block a window only shrinks (its candidates are the last
        window's less the commits, their left neighbours were in it too, and the commits came from
        its candidates), and at a block start the row runs a full pass, so the width the device
        computed a step earlier bounds it: read behind the step, it costs no wait."""
        if not self.model.logits_shifted:
            return [scored + count for scored, count in zip(self._scored_counts, committed, strict=True)]
        widths = self._window_mask.sum(dim=1)  # [B]
        late, self._late_windows = self._late_windows, _LateRead(widths)
        return late.read() if late is not None else [int(width) for width in widths.tolist()]

    def output(self) -> SampleOutput:
        return SampleOutput(
            ids=[self.ids[i, : len(row.ids)].tolist() for i, row in enumerate(self.rows)],
            confidences=[self.confidences[i, : len(row.ids)].tolist() for i, row in enumerate(self.rows)],
            steps=self.step_number,
            seed=self.seed,
            row_seeds=self.row_seeds,
            row_steps=self.last_commit,
        )

    # -- the parts of a step --

    def _logits(self, candidates: torch.Tensor) -> torch.Tensor:
        """Aligned logits [B, M, V] at the candidates: a full pass, or a window run on the cache. A
        new tensor each step (never a model's buffer), so the step may change it in place."""
        attention = self.attention if self.padded else None
        if self.options.cfg_scale:
            return guided_logits(self.model, self.ids, self.pinned, self.attention, candidates, self.options.cfg_scale)
        if self.fast is None:
            return scored_logits(self.model, self.ids, self.attention, candidates)
        if not self.windowed:
            return self.fast.score(self.ids, attention, candidates, keep_cache=False)[0]
        filling = [index for index, count in enumerate(self._counts) if count]
        due = [index for index in filling if self._refresh_due(index)]
        if self.cache is None or len(due) == len(filling):  # every row still filling starts afresh
            logits, self.cache = self.fast.score(self.ids, attention, candidates, keep_cache=True)
            return logits
        if not due:
            width = max(self._window_counts)
            return self._window_logits(self.fast, self.cache, self.ids, self._window_mask, candidates, width)
        # Rows at other points of their own schedules (continuous batching).
        return self._partly_refreshed_logits(self.fast, self.cache, due, candidates)

    def _allowed_at(self, candidates: torch.Tensor) -> torch.Tensor:
        """[B, M, V] bool: the tokens each candidate's rule allows; [1, 1, V] when the run has only
        ever had one rule (the common case: no gather of a [B, M, V] mask)."""
        if self.allowed.shape[0] == 1:
            return self.allowed[None]
        return self.allowed[self.rule_index.gather(1, candidates)]

    def _window_logits(
        self,
        fast: WindowedModel,
        cache: CanvasCache,
        ids: torch.Tensor,
        window_mask: torch.Tensor,
        candidates: torch.Tensor,
        width: int,
    ) -> torch.Tensor:
        """A window run of rows `ids` [b, L] over their `window_mask` positions (at most `width` a
        row, as read at the end of the last step) against `cache`."""
        window = torch.argsort((~window_mask).to(torch.uint8), dim=1, stable=True)[:, :width]
        # A row with a narrower window repeats its first position: a duplicate computes exactly what
        # the original does, so no row's cache depends on what else is in the batch.
        in_window = torch.arange(width, device=self.device)[None] < window_mask.sum(dim=1, keepdim=True)
        window = torch.where(in_window, window, window[:, :1])  # [b, W]
        return fast.score_window(cache, ids, window, candidates)

    def _partly_refreshed_logits(
        self, fast: WindowedModel, cache: CanvasCache, due: list[int], candidates: torch.Tensor
    ) -> torch.Tensor:
        """Logits [B, M, V] of a step where only the `due` rows refresh: one window run of every row
        on the run's own cache, so the cache is never copied out and back and stays bound to its
        CUDA-graph slab. A small model (`refreshes_in_window`) widens the due rows' windows to their
        whole canvas, which recomputes every key/value a full pass would; otherwise their windows
        are cut to one position and `_refresh_apart` runs their full pass, so a refreshing row does
        not widen every row's window to the whole canvas."""
        width = self.ids.shape[1]
        lengths = {row: len(self.rows[row].ids) for row in due}
        widths = [lengths.get(row, count) for row, count in enumerate(self._window_counts)]
        fold = refreshes_in_window(fast, len(widths), max(widths))
        index = _index_on(self.device, due)
        if fold:
            due_windows = self.attention.index_select(0, index)  # [d, L] every real position
        else:
            widths = [1 if row in lengths else count for row, count in enumerate(self._window_counts)]
            due_windows = (torch.arange(width, device=self.device) == 0).expand(len(due), width)
        window_mask = self._window_mask.index_copy(0, index, due_windows)  # [B, L]
        logits = self._window_logits(fast, cache, self.ids, window_mask, candidates, max(widths))
        return logits if fold else self._refresh_apart(fast, cache, due, index, candidates, logits)

    def _refresh_apart(
        self,
        fast: WindowedModel,
        cache: CanvasCache,
        due: list[int],
        index: torch.Tensor,  # [d] the `due` rows on the device
        candidates: torch.Tensor,
        logits: torch.Tensor,
    ) -> torch.Tensor:
        """A full pass of the `due` rows: their keys/values replace theirs in `cache` and their
        logits theirs in `logits` [B, M, V] (returned)."""
        padded = any(len(self.rows[row].ids) != self.ids.shape[1] for row in due)
        attention = self.attention.index_select(0, index) if padded else None
        due_logits, fresh = fast.score(
            self.ids.index_select(0, index), attention, candidates.index_select(0, index), keep_cache=True
        )
        assert fresh is not None
        for (keys, values), (new_keys, new_values) in zip(cache.layers, fresh.layers, strict=True):
            keys.index_copy_(0, index, new_keys)
            values.index_copy_(0, index, new_values)
        return logits.index_copy_(0, index, due_logits)

    def _next_window(self, scoring: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: positions to recompute next step. The positions it scores (their context
        moved) and those committed this step (their input changed); a shifted model also needs
        the output left of each scored position. The rest keeps its cached keys/values: with the
        blocks schedule that includes the masked positions of later blocks, refreshed when their
        block starts (Fast-dLLM's dual cache)."""
        window = scoring | self.fresh
        if self.model.logits_shifted:
            window = window | torch.nn.functional.pad(scoring[:, 1:], (0, 1))
        return window

    def _refresh_due(self, index: int) -> bool:
        """Whether row `index` refreshes its cache by a full run at its own next step: its first
        step, each of its block starts, and every `cache_refresh_every` of its steps."""
        row_step = self.row_steps[index]
        every = self.options.cache_refresh_every
        return (every is not None and row_step % every == 0) or row_step in self._block_starts[index]

    def _choose(
        self, logits: torch.Tensor, candidates: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits [B, M, V] float32 (disallowed -inf) -> token [B, M], its probability [B, M], and
        the schedule's score [B, M] (higher = commit sooner)."""
        options = self.options
        schedule = options.schedule
        if not any(self.temperatures):
            # Confidence as exp(max - logsumexp) in float32: no softmax over the vocabulary.
            top, tokens = logits.max(dim=-1)
            log_norm = torch.logsumexp(logits, dim=-1)
            confidence = torch.exp(top - log_norm)
            probs = None
        else:
            # a division by a small temperature may overflow: keep every row finite
            allowed = ~torch.isneginf(logits)
            temperature, sampled = self._temperature_rows()  # [B, 1, 1] each
            # A greedy row beside sampled ones scores exactly as in a greedy run (no top-p/top-k).
            tempered = torch.where(sampled, _filtered(logits / temperature, options), logits)
            filtered = _revive_dead_(_finite_(tempered, allowed), allowed)
            probs = torch.softmax(filtered, dim=-1)
            tokens = self._sample_tokens(probs, filtered)
            confidence = probs.gather(-1, tokens[..., None]).squeeze(-1)
            if options.reference == "llada":  # LLaDA ranks by the untempered softmax
                confidence = untempered_confidence(logits, tokens)
        if schedule == "margin":
            if probs is None:
                top2 = torch.topk(logits, 2, dim=-1).values
                scores = torch.exp(top2[..., 0] - log_norm) - torch.exp(top2[..., 1] - log_norm)
            else:
                top2 = torch.topk(probs, 2, dim=-1).values
                scores = top2[..., 0] - top2[..., 1]
        elif schedule == "entropy":
            p = probs if probs is not None else torch.softmax(logits, dim=-1)
            scores = (p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)
        elif schedule == "left-to-right":
            scores = -candidates.float()
        elif schedule == "random":
            scores = self._row_uniform(valid, torch.float32)
        else:  # confidence, blocks, threshold, factor
            scores = confidence
        if options.alg_temp > 0 and schedule in ("confidence", "margin", "entropy", "blocks"):
            # Sample positions (Gumbel-top-k) instead of taking the top ones.
            uniform = self._row_uniform(valid, torch.float32).clamp_min(1e-20)
            scores = scores / options.alg_temp - torch.log(-torch.log(uniform))
        return tokens, confidence, scores

    def _sample_tokens(self, probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Gumbel-max in float64, as the LLaDA reference samples (float32 noise loses low-probability
        tokens); each row draws from its own generator, for its own masked positions only."""
        tokens = probs.argmax(dim=-1)
        for row, count in enumerate(self._scored_counts):
            if count == 0 or self.temperatures[row] == 0:
                continue
            uniform = torch.rand(
                (count, logits.shape[-1]), generator=self.generators[row], device=self.device, dtype=torch.float64
            )
            gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
            tokens[row, :count] = (logits[row, :count].double() + gumbel).argmax(dim=-1)
        return tokens

    def _temperature_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's temperature [B, 1, 1] (1 for a greedy row, which takes the argmax anyway) and
        whether the row samples [B, 1, 1]; made once per change of the rows (a tensor from a host
        list waits for the GPU)."""
        if self._temperature_table is None:
            values = torch.tensor(self.temperatures, dtype=torch.float32, device=self.device)[:, None, None]
            self._temperature_table = (torch.where(values > 0, values, 1.0), values > 0)
        return self._temperature_table

    def _row_uniform(self, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, M] uniform noise, row b drawn from its own generator for its masked positions."""
        noise = torch.zeros(valid.shape, dtype=dtype, device=self.device)
        for row, count in enumerate(self._scored_counts):
            if count:
                noise[row, :count] = torch.rand(
                    (count,), generator=self.generators[row], device=self.device, dtype=dtype
                )
        return noise

    def _commit_counts(self, confidence: torch.Tensor, valid: torch.Tensor, planned: torch.Tensor) -> torch.Tensor:
        """[B] positions each row commits this step (`planned`: the row's plan at its own step)."""
        options = self.options
        remaining = valid.sum(dim=1)  # [B]
        if options.schedule in ("threshold", "factor"):
            conf = confidence.masked_fill(~valid, 0.0)
            if options.schedule == "threshold":
                sure = (conf > options.threshold).sum(dim=1)
            else:
                # Fast-dLLM's factor rule: the top n go together while (n + 1)(1 - c_n) < factor,
                # c_n the n-th highest confidence (a bound on the chance that any of them is wrong).
                ranked = torch.sort(conf, dim=1, descending=True).values  # [B, M]
                n = torch.arange(1, conf.shape[1] + 1, device=self.device)[None]
                sure = (((n + 1) * (1 - ranked) < options.factor) & (ranked > 0)).long().cumprod(dim=1).sum(dim=1)
            count = sure.clamp(min=1)
            if options.steps is not None:
                steps_left = (options.steps - self._row_step).clamp(min=1)
                count = torch.maximum(count, (remaining + steps_left - 1) // steps_left)
            return torch.minimum(count, remaining)
        return planned

    def _scoring(self, masked: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: the masked positions a step may commit, and so the only ones it scores:
        the active block's (`block` [B], -1 once the row's plan is over: any) for `blocks`."""
        if self.options.schedule != "blocks":
            return masked
        block = block[:, None]  # [B, 1]
        return masked & ((self.plan.block_of == block) | (block < 0))


def _filtered(logits: torch.Tensor, options: SamplerOptions) -> torch.Tensor:
    """Tempered logits, then top-p, then top-k (on the last axis)."""
    if options.top_p < 1.0:
        logits = _top_p(logits, options.top_p)
    if options.top_k > 0:
        kth = torch.topk(logits, min(options.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


_PAST_PLAN = 2**31 - 1  # commit count of a row past its plan: every position left


@dataclass
class _HostPlan:
    """A row's plan as the host follows it. Under every schedule but threshold/factor a step
    commits exactly what the plan says, so the host knows the row's masks left, what its next step
    scores and when it is done without reading the device (docs/engine.md, "A step"). Schedules
    other than `blocks` are one block: the block of every step is 0."""

    plan: list[tuple[int, int]]  # (count, block) per step of the row
    block_left: list[int]  # masks left in each block: a block's size is what its steps commit

    @classmethod
    def of(cls, plan: list[tuple[int, int]]) -> _HostPlan:
        sizes = [0] * (max((block for _, block in plan), default=-1) + 1)
        for count, block in plan:
            sizes[block] += count
        return cls(plan, sizes)

    @property
    def left(self) -> int:
        return sum(self.block_left)

    def scored(self, step: int) -> int:
        """Positions the row's step `step` scores: its active block's masks (past the plan: all)."""
        return self.block_left[self.plan[step][1]] if step < len(self.plan) else self.left

    def commit(self, step: int) -> int:
        """The row's step `step` as the device runs it; returns how many positions it commits."""
        if step >= len(self.plan):  # past the plan every position left goes (none, as plans add up)
            count, self.block_left = self.left, [0] * len(self.block_left)
            return count
        planned, block = self.plan[step]
        count = min(planned, self.block_left[block])
        self.block_left[block] -= count
        return count


def _index_on(device: torch.device, values: list[int]) -> torch.Tensor:
    """[n] long on `device` without waiting for it: a GPU copy from ordinary host memory first
    waits for the GPU's queued work, one from pinned memory does not."""
    index = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return index
    return index.pin_memory().to(device, non_blocking=True)


class _LateRead:
    """A [B] device tensor copied to the host behind the step's work: on CUDA into pinned memory
    with an event, so reading it waits only for the step that made it, not for those queued
    after it."""

    def __init__(self, values: torch.Tensor) -> None:
        self.event: torch.cuda.Event | None = None
        if values.device.type == "cuda":
            self.values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.values.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.values = values

    def read(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return [int(value) for value in self.values.tolist()]


@dataclass
class _PlanTables:
    """Each row's schedule from its own mask count, laid out as device tables read by the row's own
    step (built on the host when the row joins, so the loop reads no per-step plan from it)."""

    counts: torch.Tensor  # [B, S] positions row b commits at its step s; past its plan: _PAST_PLAN
    blocks: torch.Tensor  # [B, S] active block at step s (blocks schedule); -1 past the plan: any
    block_of: torch.Tensor  # [B, L] block of each masked position, -1 elsewhere

    def at(self, row_step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] commit counts and active blocks at each row's step `row_step` [B]."""
        column = row_step.clamp(max=self.counts.shape[1] - 1)[:, None]  # the last column is past every plan
        return self.counts.gather(1, column)[:, 0], self.blocks.gather(1, column)[:, 0]

    def extended(self, plans: list[list[tuple[int, int]]], masked: torch.Tensor, block_length: int) -> _PlanTables:
        """These tables with rows for `plans` (masked [n, L]: the new rows' masked positions) added."""
        length = max(self.counts.shape[1], *(len(plan) + 1 for plan in plans))
        grow = length - self.counts.shape[1]
        device = masked.device
        counts = [[c for c, _ in plan] + [_PAST_PLAN] * (length - len(plan)) for plan in plans]
        blocks = [[b for _, b in plan] + [-1] * (length - len(plan)) for plan in plans]
        rank = masked.long().cumsum(dim=1) - 1  # [n, L] order of each masked position in its row
        return _PlanTables(
            counts=torch.cat(
                [F.pad(self.counts, (0, grow), value=_PAST_PLAN), torch.tensor(counts, dtype=torch.long, device=device)]
            ),
            blocks=torch.cat(
                [F.pad(self.blocks, (0, grow), value=-1), torch.tensor(blocks, dtype=torch.long, device=device)]
            ),
            block_of=torch.cat([self.block_of, torch.where(masked, rank // block_length, torch.full_like(rank, -1))]),
        )

    def selected(self, index: torch.Tensor) -> _PlanTables:
        return _PlanTables(self.counts[index], self.blocks[index], self.block_of[index])


def _row_plan(masks: int, options: SamplerOptions, seed: int) -> list[tuple[int, int]]:
    """(count, block) per step of one row with `masks` masked positions (`seed`: the row's)."""
    if options.reference is not None:
        return reference_plan(masks, options, seed)
    steps = options.steps if options.steps is not None else masks
    if options.schedule == "blocks":
        return block_plan(masks, steps, options.block_length)
    return [(count, 0) for count in step_counts(masks, steps)]


def _block_starts(plan: list[tuple[int, int]]) -> frozenset[int]:
    """The steps of a row's plan at which it starts a block (step 0 included): cache refresh points."""
    return frozenset({0} | {s for s in range(1, len(plan)) if plan[s][1] != plan[s - 1][1]})
