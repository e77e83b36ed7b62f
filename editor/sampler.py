"""The bidirectional sampler (docs/sampler.md).

A batch of canvases (rows of different lengths, right-padded) starts with every free position
masked. Each step the model scores the whole canvas, a token is chosen for every masked position,
and the schedule decides which of them are committed; committed tokens never change, and pinned
positions are re-written after every step. Each row keeps its own step budget, computed from its
own mask count, so rows with different numbers of masks finish exactly on schedule.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from editor.constraints import PositionRule, VocabularyRules
from editor.models.base import DiffusionModel, SpecialIds, aligned_logits
from editor.options import FillCancelled, SamplerOptions, Schedule


@dataclass(frozen=True)
class Commit:
    row: int
    position: int
    token_id: int
    confidence: float


@dataclass(frozen=True)
class StepEvent:
    step: int
    commits: list[Commit]  # every position committed this step, in position order per row
    remaining: list[int]  # masks left per row after this step


@dataclass
class Row:
    """One canvas row as the sampler sees it."""

    ids: list[int]
    pinned: list[bool]
    rules: list[PositionRule]


@dataclass
class SampleOutput:
    ids: list[list[int]]
    confidences: list[list[float]]  # per position; 1.0 at pinned positions
    steps: int
    seed: int


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


def choose_tokens(
    logits: torch.Tensor, options: SamplerOptions, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [M, V] (disallowed already -inf) -> tokens [M], probabilities [M, V] they were drawn from."""
    logits = logits.float()
    if options.temperature > 0:
        logits = logits / options.temperature
        if options.top_p < 1.0:
            logits = _top_p(logits, options.top_p)
        if options.top_k > 0:
            kth = torch.topk(logits, min(options.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if options.temperature == 0:
        return probs.argmax(dim=-1), probs
    # Gumbel-max in float64, as the LLaDA reference samples (float32 noise loses low-probability tokens).
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
    return (logits.double() + gumbel).argmax(dim=-1), probs


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the mass before it already reaches top_p (the top token always stays).
    drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def position_scores(
    schedule: Schedule, tokens: torch.Tensor, probs: torch.Tensor, positions: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Higher = commit sooner. Returns (score [M], confidence of the chosen token [M])."""
    chosen = probs.gather(-1, tokens[:, None]).squeeze(-1)  # [M]
    if schedule == "random":
        return torch.rand(chosen.shape, generator=generator, device=chosen.device), chosen
    if schedule == "left-to-right":
        return -positions.float(), chosen
    if schedule == "margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        return top2[:, 0] - top2[:, 1], chosen
    if schedule == "entropy":
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)
        return -entropy, chosen
    return chosen, chosen  # confidence, blocks, threshold


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


def masked_logits(
    model: DiffusionModel,
    ids: torch.Tensor,
    attention: torch.Tensor,
    masked: torch.Tensor,
    allowed: torch.Tensor,
    rule_index: torch.Tensor,
) -> torch.Tensor:
    """Logits [M, V] at the masked positions only, with every disallowed token at -inf."""
    logits = aligned_logits(model, ids, attention)  # [B, L, V]
    picked = logits[masked].float()  # [M, V]
    return picked.masked_fill(~allowed[rule_index[masked]], float("-inf"))


def penalize_neighbours(
    logits: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, special: SpecialIds, penalty: float
) -> torch.Tensor:
    """logits [M, V] at `positions` [M, 2] made less keen on the token on either side (ids [B, L]),
    CTRL-style (positive logits divided by `penalty`, negative ones multiplied), so that a fill does
    not repeat the word beside it ("team team"). Masks and end tokens beside a blank are left alone."""
    out = logits.clone()
    skip = torch.tensor([special.mask, *special.end_ids], device=ids.device)
    for offset in (-1, 1):
        beside = positions[:, 1] + offset  # [M]
        inside = (beside >= 0) & (beside < ids.shape[1])
        tokens = ids[positions[:, 0], beside.clamp(0, ids.shape[1] - 1)]  # [M]
        which = (inside & ~torch.isin(tokens, skip)).nonzero().squeeze(-1)
        values = out[which, tokens[which]]
        out[which, tokens[which]] = torch.where(values > 0, values / penalty, values * penalty)
    return out


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
    device = model.device
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**63)
    generator = torch.Generator(device=device).manual_seed(seed)
    ids, pinned, attention = pad_rows(rows, model.special.pad, device)
    pinned_ids = ids.clone()
    allowed, rule_index = rule_table(rows, vocabulary, device)
    masked = ~pinned & attention  # [B, L] positions still to fill
    ids[masked] = model.special.mask
    confidences = torch.ones(ids.shape, dtype=torch.float32, device=device)
    plans = _plans(masked, options)
    step = 0
    while bool(masked.any()):
        if should_cancel is not None and should_cancel():
            raise FillCancelled(f"fill cancelled at step {step}")
        positions = masked.nonzero()  # [M, 2] (row, position), row-major
        logits = masked_logits(model, ids, attention, masked, allowed, rule_index)
        if options.repetition_penalty != 1.0:
            logits = penalize_neighbours(logits, ids, positions, model.special, options.repetition_penalty)
        tokens, probs = choose_tokens(logits, options, generator)
        scores, chosen = position_scores(options.schedule, tokens, probs, positions[:, 1], generator)
        if options.alg_temp > 0 and options.schedule in ("confidence", "margin", "entropy", "blocks"):
            # Sample positions (Gumbel-top-k) instead of taking the top ones.
            uniform = torch.rand(scores.shape, generator=generator, device=device).clamp_min(1e-20)
            scores = scores / options.alg_temp - torch.log(-torch.log(uniform))
        commit = _select(positions, scores, chosen, masked, plans, step, options)
        committed = positions[commit]
        ids[committed[:, 0], committed[:, 1]] = tokens[commit]
        confidences[committed[:, 0], committed[:, 1]] = chosen[commit]
        masked[committed[:, 0], committed[:, 1]] = False
        ids = torch.where(pinned, pinned_ids, ids)  # pinned positions are re-written every step
        if on_step is not None:
            on_step(_event(step, committed, tokens[commit], chosen[commit], masked))
        step += 1
    return SampleOutput(
        ids=[ids[i, : len(row.ids)].tolist() for i, row in enumerate(rows)],
        confidences=[confidences[i, : len(row.ids)].tolist() for i, row in enumerate(rows)],
        steps=step,
        seed=seed,
    )


@dataclass
class _RowPlan:
    counts: list[int]  # positions to commit at each step
    blocks: list[int] | None  # active block at each step (blocks schedule)
    block_of: torch.Tensor | None  # [L] block number of each masked position, -1 elsewhere


def _plans(masked: torch.Tensor, options: SamplerOptions) -> list[_RowPlan]:
    plans = []
    for row in masked:
        count = int(row.sum())
        steps = options.steps if options.steps is not None else count
        if options.schedule == "blocks":
            plan = block_plan(count, steps, options.block_length)
            block_of = torch.full(row.shape, -1, dtype=torch.long, device=row.device)
            block_of[row] = torch.arange(count, device=row.device) // options.block_length
            plans.append(_RowPlan([c for c, _ in plan], [b for _, b in plan], block_of))
        else:
            plans.append(_RowPlan(step_counts(count, steps), None, None))
    return plans


def _select(
    positions: torch.Tensor,
    scores: torch.Tensor,
    chosen: torch.Tensor,
    masked: torch.Tensor,
    plans: list[_RowPlan],
    step: int,
    options: SamplerOptions,
) -> torch.Tensor:
    """[M] bool: which of the masked positions to commit this step, per row by its own budget."""
    commit = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    rows = positions[:, 0]
    for row_number, plan in enumerate(plans):
        in_row = (rows == row_number).nonzero().squeeze(-1)  # [m]
        if in_row.numel() == 0:
            continue
        eligible = in_row
        if options.schedule == "threshold":
            count = _threshold_count(chosen[in_row], options, step, in_row.numel())
        else:
            count = plan.counts[step] if step < len(plan.counts) else in_row.numel()
            if plan.blocks is not None and plan.block_of is not None and step < len(plan.blocks):
                block_of = plan.block_of[positions[in_row, 1]]
                eligible = in_row[block_of == plan.blocks[step]]
        best = torch.topk(scores[eligible], min(count, eligible.numel())).indices
        commit[eligible[best]] = True
    return commit


def _threshold_count(chosen: torch.Tensor, options: SamplerOptions, step: int, remaining: int) -> int:
    """Every position above the threshold, at least one, and enough to finish within `steps`."""
    above = int((chosen > options.threshold).sum())
    if options.steps is None:
        return max(1, above)
    steps_left = max(1, options.steps - step)
    return min(remaining, max(1, above, math.ceil(remaining / steps_left)))


def _event(
    step: int, committed: torch.Tensor, tokens: torch.Tensor, chosen: torch.Tensor, masked: torch.Tensor
) -> StepEvent:
    commits = [
        Commit(row=int(r), position=int(p), token_id=int(t), confidence=float(c))
        for (r, p), t, c in zip(committed.tolist(), tokens.tolist(), chosen.tolist(), strict=True)
    ]
    return StepEvent(step=step, commits=commits, remaining=masked.sum(dim=1).tolist())
