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
values of its last run, refreshed by a full pass at block starts and every `cache_refresh_every`
steps.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from editor.constraints import PositionRule, VocabularyRules
from editor.models.base import CanvasCache, DiffusionModel, SpecialIds, scored_logits, windowed
from editor.options import FillCancelled, SamplerOptions


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
    ) -> None:
        self.step = step
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
    run's seed and the row's index)."""

    ids: list[int]
    pinned: list[bool]
    rules: list[PositionRule]
    seed: int | None = None


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
    if options.schedule == "blocks":
        return len(block_plan(masks, steps, options.block_length))
    if options.schedule in ("threshold", "factor"):  # at least one commit per step
        return masks if options.steps is None else min(masks, options.steps)
    return len(step_counts(masks, steps))


def _finite(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits [M, V] with NaN as -inf and +inf as the largest float, so softmax cannot make NaN; a
    row left with no finite allowed logit becomes uniform over its allowed tokens (a NaN must never
    pick a disallowed token: argmax treats NaN as the largest value)."""
    largest = torch.finfo(logits.dtype).max
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=largest, neginf=float("-inf"))
    logits = logits.masked_fill(~allowed, float("-inf"))
    dead = ~torch.isfinite(logits).any(dim=-1, keepdim=True)  # [M, 1]
    return torch.where(dead & allowed, torch.zeros_like(logits), logits)


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the mass before it already reaches top_p (the top token always stays).
    drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def pad_rows(rows: Sequence[Row], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, L], pinned [B, L], attention [B, L], right-padded to the longest row."""
    width = max(len(row.ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pinned = torch.ones((len(rows), width), dtype=torch.bool)
    attention = torch.zeros((len(rows), width), dtype=torch.bool)
    for index, row in enumerate(rows):
        ids[index, : len(row.ids)] = torch.tensor(row.ids)
        pinned[index, : len(row.ids)] = torch.tensor(row.pinned)
        attention[index, : len(row.ids)] = True
    return ids.to(device), pinned.to(device), attention.to(device)


def rule_table(
    rows: Sequence[Row], vocabulary: VocabularyRules, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """allowed [R, V] bool over the distinct rules, and rule index [B, L] per position."""
    distinct: dict[PositionRule, int] = {PositionRule(): 0}
    width = max(len(row.ids) for row in rows)
    index = torch.zeros((len(rows), width), dtype=torch.long)
    for row_number, row in enumerate(rows):
        for position, (rule, fixed) in enumerate(zip(row.rules, row.pinned, strict=True)):
            if not fixed:
                index[row_number, position] = distinct.setdefault(rule, len(distinct))
    return vocabulary.table(list(distinct), device), index.to(device)


def penalize_neighbours(
    logits: torch.Tensor, ids: torch.Tensor, candidates: torch.Tensor, special: SpecialIds, penalty: float
) -> torch.Tensor:
    """logits [B, M, V] at `candidates` [B, M] made less keen on the token on either side (ids
    [B, L]), CTRL-style (positive logits divided by `penalty`, negative ones multiplied), so that a
    fill does not repeat the word beside it ("team team"). Masks and end tokens are left alone."""
    skip = torch.tensor([special.mask, *special.end_ids], device=ids.device)
    for offset in (-1, 1):
        beside = candidates + offset  # [B, M]
        inside = (beside >= 0) & (beside < ids.shape[1])
        tokens = ids.gather(1, beside.clamp(0, ids.shape[1] - 1))  # [B, M]
        hit = inside & ~torch.isin(tokens, skip)
        values = logits.gather(2, tokens[..., None]).squeeze(-1)  # [B, M]
        penalised = torch.where(values > 0, values / penalty, values * penalty)
        logits = logits.scatter(2, tokens[..., None], torch.where(hit, penalised, values)[..., None])
    return logits


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
    """One batch of rows being filled, a step at a time (`step` until `finished`)."""

    def __init__(
        self, model: DiffusionModel, rows: Sequence[Row], options: SamplerOptions, vocabulary: VocabularyRules
    ) -> None:
        self.model = model
        self.rows = list(rows)
        self.options = options
        device = self.device = model.device
        self.seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**63)
        self.row_seeds = [row.seed if row.seed is not None else row_seed(self.seed, i) for i, row in enumerate(rows)]
        self.random = (
            options.temperature > 0
            or options.schedule == "random"
            or (options.alg_temp > 0 and options.schedule in ("confidence", "margin", "entropy", "blocks"))
        )
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in self.row_seeds] if self.random else []
        self.ids, self.pinned, attention = pad_rows(rows, model.special.pad, device)
        # No padding (one row, or rows of one length): no attention mask at all, so SDPA can use
        # its fused kernels; decided from the host-side lengths, without reading the device.
        self.padded = len({len(row.ids) for row in rows}) > 1
        self.attention = attention
        self.allowed, self.rule_index = rule_table(rows, vocabulary, device)
        self.masked = ~self.pinned & attention  # [B, L] positions still to fill
        self.ids[self.masked] = model.special.mask
        self.confidences = torch.ones(self.ids.shape, dtype=torch.float32, device=device)
        self.fresh = torch.zeros_like(self.masked)  # committed at the last step: inputs changed
        mask_counts = [sum(1 for p in row.pinned if not p) for row in rows]
        self.plan = _plan_tables(mask_counts, self.masked, options)
        self.fast = windowed(model)
        self.windowed = options.cache and self.fast is not None
        self.cache: CanvasCache | None = None
        self._window_mask = self.masked
        self._window_width = 0
        self.step_number = 0
        self.last_commit = [0] * len(self.rows)
        self._counts = mask_counts  # masks left per row, as last read from the device
        self.finished = max(mask_counts, default=0) == 0

    def step(self) -> StepEvent | None:
        """Score, choose and commit one step; returns what happened (None once nothing is left)."""
        if self.finished:
            return None
        step = self.step_number
        width = max(self._counts)
        candidates = torch.argsort((~self.masked).to(torch.uint8), dim=1, stable=True)[:, :width]  # [B, M]
        valid = self.masked.gather(1, candidates)  # [B, M] real masked positions (the rest is padding)
        logits = self._logits(candidates, step)  # [B, M, V] model dtype
        allowed = self.allowed[self.rule_index.gather(1, candidates)]  # [B, M, V]
        logits = logits.float().masked_fill(~allowed, float("-inf"))
        if self.options.repetition_penalty != 1.0:
            penalty = self.options.repetition_penalty
            logits = penalize_neighbours(logits, self.ids, candidates, self.model.special, penalty)
        logits = _finite(logits, allowed)
        tokens, confidence, scores = self._choose(logits, candidates, valid)
        count = self._commit_counts(confidence, valid, step)  # [B]
        eligible = valid & self._eligible(candidates, step)
        scores = scores.masked_fill(~eligible, float("-inf"))
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        take = torch.arange(width, device=self.device)[None] < count[:, None]  # [B, M] in score order
        committed = torch.zeros_like(take).scatter(1, order, take) & eligible  # [B, M]
        self.ids.scatter_(1, candidates, torch.where(committed, tokens, self.ids.gather(1, candidates)))
        self.confidences.scatter_(
            1, candidates, torch.where(committed, confidence, self.confidences.gather(1, candidates))
        )
        self.masked = self.masked.scatter(1, candidates, valid & ~committed)
        self.fresh = torch.zeros_like(self.masked).scatter(1, candidates, committed)
        event = StepEvent(step, candidates, committed, tokens, confidence, self.masked)
        # The one host read of the step: mask counts (and the next window's width) size the next
        # step and say when to stop.
        left = self.masked.sum(dim=1)  # [B]
        counts: list[int]
        if self.windowed:
            self._window_mask = self._next_window()
            counts, window_width = torch.stack([left, self._window_mask.sum(dim=1)]).tolist()
            self._window_width = max(window_width)
        else:
            counts = left.tolist()
        self.last_commit = [
            step + 1 if now < before else last
            for now, before, last in zip(counts, self._counts, self.last_commit, strict=True)
        ]
        self._counts = counts
        self.step_number += 1
        self.finished = max(counts) == 0
        return event

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

    def _logits(self, candidates: torch.Tensor, step: int) -> torch.Tensor:
        """Aligned logits [B, M, V] at the candidates: a full pass, or a window run on the cache."""
        attention = self.attention if self.padded else None
        if self.fast is None:
            return scored_logits(self.model, self.ids, self.attention, candidates)
        if not self.windowed:
            return self.fast.score(self.ids, attention, candidates, keep_cache=False)[0]
        if self.cache is None or self._refresh_due(step):
            logits, self.cache = self.fast.score(self.ids, attention, candidates, keep_cache=True)
            return logits
        window = torch.argsort((~self._window_mask).to(torch.uint8), dim=1, stable=True)[:, : self._window_width]
        # A row with a narrower window repeats its first position: a duplicate computes exactly what
        # the original does, so no row's cache depends on what else is in the batch.
        in_window = torch.arange(window.shape[1], device=self.device)[None] < self._window_mask.sum(dim=1, keepdim=True)
        window = torch.where(in_window, window, window[:, :1])  # [B, W]
        return self.fast.score_window(self.cache, self.ids, window, candidates)

    def _next_window(self) -> torch.Tensor:
        """[B, L] bool: positions to recompute next step. Inputs changed at the masked positions
        (their context moved) and at those committed this step; a shifted model also needs the
        output left of every masked position. The rest keeps its cached keys/values."""
        window = self.masked | self.fresh
        if self.model.logits_shifted:
            window = window | torch.nn.functional.pad(self.masked[:, 1:], (0, 1))
        return window

    def _refresh_due(self, step: int) -> bool:
        every = self.options.cache_refresh_every
        if every is not None and step % every == 0:
            return True
        return step in self.plan.block_starts

    def _choose(
        self, logits: torch.Tensor, candidates: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits [B, M, V] float32 (disallowed -inf) -> token [B, M], its probability [B, M], and
        the schedule's score [B, M] (higher = commit sooner)."""
        options = self.options
        schedule = options.schedule
        if options.temperature == 0:
            # Confidence as exp(max - logsumexp) in float32: no softmax over the vocabulary.
            top, tokens = logits.max(dim=-1)
            log_norm = torch.logsumexp(logits, dim=-1)
            confidence = torch.exp(top - log_norm)
            probs = None
        else:
            # a division by a small temperature may overflow: keep every row finite
            filtered = _finite(_filtered(logits, options), ~torch.isneginf(logits))
            probs = torch.softmax(filtered, dim=-1)
            tokens = self._sample_tokens(probs, filtered)
            confidence = probs.gather(-1, tokens[..., None]).squeeze(-1)
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
        for row, count in enumerate(self._counts):
            if count == 0:
                continue
            uniform = torch.rand(
                (count, logits.shape[-1]), generator=self.generators[row], device=self.device, dtype=torch.float64
            )
            gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
            tokens[row, :count] = (logits[row, :count].double() + gumbel).argmax(dim=-1)
        return tokens

    def _row_uniform(self, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, M] uniform noise, row b drawn from its own generator for its masked positions."""
        noise = torch.zeros(valid.shape, dtype=dtype, device=self.device)
        for row, count in enumerate(self._counts):
            if count:
                noise[row, :count] = torch.rand(
                    (count,), generator=self.generators[row], device=self.device, dtype=dtype
                )
        return noise

    def _commit_counts(self, confidence: torch.Tensor, valid: torch.Tensor, step: int) -> torch.Tensor:
        """[B] positions each row commits this step."""
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
                steps_left = max(1, options.steps - step)
                count = torch.maximum(count, (remaining + steps_left - 1) // steps_left)
            return torch.minimum(count, remaining)
        if step < self.plan.counts.shape[0]:
            return self.plan.counts[step]
        return remaining

    def _eligible(self, candidates: torch.Tensor, step: int) -> torch.Tensor:
        """[B, M] bool: candidates the schedule may commit now (the active block for `blocks`)."""
        if self.plan.blocks is None or step >= self.plan.blocks.shape[0]:
            return torch.ones(candidates.shape, dtype=torch.bool, device=self.device)
        block = self.plan.blocks[step][:, None]  # [B, 1]; -1 = the row's plan is over: any position
        return (self.plan.block_of.gather(1, candidates) == block) | (block < 0)


def _filtered(logits: torch.Tensor, options: SamplerOptions) -> torch.Tensor:
    """logits / temperature, then top-p, then top-k (on the last axis)."""
    logits = logits / options.temperature
    if options.top_p < 1.0:
        logits = _top_p(logits, options.top_p)
    if options.top_k > 0:
        kth = torch.topk(logits, min(options.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


@dataclass
class _PlanTables:
    counts: torch.Tensor  # [S, B] positions each row commits at step s (rows past their plan: all)
    blocks: torch.Tensor | None  # [S, B] active block (blocks schedule; -1 once a row's plan is over)
    block_of: torch.Tensor  # [B, L] block of each masked position, -1 elsewhere
    block_starts: frozenset[int]  # steps at which some row starts a new block (cache refresh points)


def _plan_tables(mask_counts: list[int], masked: torch.Tensor, options: SamplerOptions) -> _PlanTables:
    """Each row's schedule from its own mask count, laid out as device tables read by step index
    (built once on the host, so the loop reads no per-step plan from it)."""
    device = masked.device
    plans: list[list[tuple[int, int]]] = []
    for count in mask_counts:
        steps = options.steps if options.steps is not None else count
        if options.schedule == "blocks":
            plans.append(block_plan(count, steps, options.block_length))
        else:
            plans.append([(c, 0) for c in step_counts(count, steps)])
    length = max((len(p) for p in plans), default=0)
    everything = masked.shape[1]
    counts = [[p[s][0] if s < len(p) else everything for p in plans] for s in range(length)]
    blocks = [[p[s][1] if s < len(p) else -1 for p in plans] for s in range(length)]
    starts = {0}
    if options.schedule == "blocks":
        starts |= {s for s in range(1, length) if any(0 <= b != blocks[s - 1][i] for i, b in enumerate(blocks[s]))}
    rank = masked.long().cumsum(dim=1) - 1  # [B, L] order of each masked position in its row
    block_of = torch.where(masked, rank // options.block_length, torch.full_like(rank, -1))
    return _PlanTables(
        counts=torch.tensor(counts, dtype=torch.long, device=device).reshape(length, len(mask_counts)),
        blocks=torch.tensor(blocks, dtype=torch.long, device=device).reshape(length, len(mask_counts))
        if options.schedule == "blocks"
        else None,
        block_of=block_of,
        block_starts=frozenset(starts),
    )
