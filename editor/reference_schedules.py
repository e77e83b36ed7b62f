"""The published samplers' step plans, so that a fill can follow Dream's or LLaDA's own loop
(`SamplerOptions.reference`; docs/models.md).

- Dream (`generation_utils.py`, `_sample`): `steps` timesteps t from 1 down to `eps` (1e-3, its
  generation_config.json); at each step but the last it commits int(n * (1 - s / t)) of the n
  positions still masked (s the next timestep), at the last all that are left. Its `alg` is our
  schedule: `maskgit_plus` = confidence (the chosen token's probability), `topk_margin` = margin
  (top-1 minus top-2 probability), `entropy` = entropy (sum p log p), `origin` = random: there each
  masked position is committed with probability 1 - s / t, independently, so the count of a step is
  a binomial draw (made here from the row's seed) and the positions a uniform choice among the masks.
- LLaDA (`generate.py`, `generate`): the masked positions cut into blocks of `block_length` (semi-
  autoregressive when there are several), `steps / blocks` steps each; a block's masks are spread
  over its steps with the remainder on the first ones (`get_num_transfer_tokens`), and each step
  commits the most confident of the block's masks ("low_confidence" remasking), confidence taken
  from the untempered softmax; `cfg_scale` > 0 adds classifier-free guidance: logits
  un + (cfg_scale + 1)(cond - un), `un` from the canvas with every pinned position masked.

The plans below feed the sampler's own loop (editor/sampler.py), which then commits exactly what
the reference would at temperature 0 (tests/test_reference_schedules.py re-implements both loops).
"""

from __future__ import annotations

import math
import random

import torch

from editor.models.base import DiffusionModel, scored_logits
from editor.options import SamplerOptions

DREAM_EPS = 1e-3  # Dream-v0's generation_config.json `eps`
# Our schedule for each of Dream's `alg` values, and the LLaDA remasking each schedule means.
DREAM_ALGORITHMS = {"origin": "random", "maskgit_plus": "confidence", "topk_margin": "margin", "entropy": "entropy"}
LLADA_SCHEDULES = {"confidence": "low_confidence, one block", "blocks": "low_confidence, semi-autoregressive blocks"}


def dream_counts(masks: int, steps: int, eps: float = DREAM_EPS) -> list[int]:
    """Positions Dream commits at each of its `steps` steps (maskgit_plus, topk_margin, entropy),
    computed as its loop does: float32 timesteps, int() of the float32 product."""
    timesteps = torch.linspace(1, eps, steps + 1)
    counts, left = [], masks
    for step in range(steps):
        t, s = timesteps[step], timesteps[step + 1]
        count = int(torch.tensor(left, dtype=torch.float32) * (1 - s / t)) if step < steps - 1 else left
        counts.append(count)
        left -= count
    return counts


def dream_origin_counts(masks: int, steps: int, seed: int, eps: float = DREAM_EPS) -> list[int]:
    """Positions Dream's `origin` commits at each step: each of the n masked positions goes with
    probability 1 - s/t (all at the last step), so a step's count is Binomial(n, 1 - s/t)."""
    timesteps = torch.linspace(1, eps, steps + 1)
    draw = random.Random(seed)
    counts, left = [], masks
    for step in range(steps):
        chance = float(1 - timesteps[step + 1] / timesteps[step]) if step < steps - 1 else 1.0
        count = sum(draw.random() < chance for _ in range(left))
        counts.append(count)
        left -= count
    return counts


def llada_counts(masks: int, steps: int) -> list[int]:
    """LLaDA's `get_num_transfer_tokens` for one block: masks // steps each, the first masks % steps
    steps one more (steps that get none stay in the plan, as in the reference loop)."""
    base, extra = divmod(masks, steps)
    return [base + (1 if step < extra else 0) for step in range(steps)]


def llada_plan(masks: int, steps: int, block_length: int) -> list[tuple[int, int]]:
    """(count, block) per step: ceil(masks / block_length) blocks of `steps // blocks` steps each
    (LLaDA asserts that `steps` divides by the blocks; here a block gets at least one step)."""
    blocks = math.ceil(masks / block_length)
    per_block = max(1, steps // blocks)
    plan: list[tuple[int, int]] = []
    for block in range(blocks):
        size = min(block_length, masks - block * block_length)
        plan += [(count, block) for count in llada_counts(size, per_block)]
    return plan


def reference_plan(masks: int, options: SamplerOptions, seed: int) -> list[tuple[int, int]]:
    """(count, block) per step of a row with `masks` masked positions under `options.reference`."""
    if masks == 0:
        return []
    steps = options.steps if options.steps is not None else masks
    if options.reference == "dream":
        if options.schedule == "random":  # origin
            return [(count, 0) for count in dream_origin_counts(masks, steps, seed)]
        return [(count, 0) for count in dream_counts(masks, steps)]
    block_length = options.block_length if options.schedule == "blocks" else masks
    return llada_plan(masks, steps, block_length)


def guided_logits(
    model: DiffusionModel,
    ids: torch.Tensor,  # [B, L]
    pinned: torch.Tensor,  # [B, L] bool: the reference's prompt (never masked by the sampler)
    attention: torch.Tensor,  # [B, L] bool
    candidates: torch.Tensor,  # [B, M]
    scale: float,
) -> torch.Tensor:
    """LLaDA's classifier-free guidance at the candidates: [B, M, V] logits
    un + (scale + 1) * (cond - un), `un` from the canvas with every pinned position masked."""
    unconditional = torch.where(pinned & attention, model.special.mask, ids)
    both = scored_logits(
        model, torch.cat([ids, unconditional]), torch.cat([attention, attention]), candidates.repeat(2, 1)
    )
    conditional, unguided = both.chunk(2)
    return unguided + (scale + 1) * (conditional - unguided)


def untempered_confidence(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, M] probability of `tokens` [B, M] under softmax(logits [B, M, V]) with no temperature,
    what LLaDA ranks positions by whatever the temperature it sampled the tokens at."""
    return torch.softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


__all__ = [
    "DREAM_ALGORITHMS",
    "DREAM_EPS",
    "LLADA_SCHEDULES",
    "dream_counts",
    "dream_origin_counts",
    "guided_logits",
    "llada_counts",
    "llada_plan",
    "reference_plan",
    "untempered_confidence",
]
