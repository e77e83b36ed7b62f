"""`SamplerOptions.reference`: at temperature 0 the sampler commits exactly what Dream's and LLaDA's
own generation loops commit, step by step. The loops are re-implemented here from the published
generation code (Dream's `generation_utils._sample`, LLaDA's `generate.generate`), on tiny random
models; the one change to them is that tokens a fill never writes (the mask, specials, ids past the
tokenizer) get -inf logits in both, as our vocabulary rules do."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from editor.constraints import PositionRule
from editor.filling import vocabulary_rules
from editor.models import NativeDiffusionModel, aligned_logits
from editor.options import SamplerOptions
from editor.reference_schedules import dream_counts, dream_origin_counts, llada_counts, llada_plan
from editor.sampler import Row, StepEvent, effective_steps, sample

pytestmark = pytest.mark.usefixtures("tiny_one_thread")

PROMPT = 6  # pinned positions before the masks
PLAIN = {"repetition_penalty": 1.0, "no_repeat_ngram": 0, "single_spaces": False, "temperature": 0.0}


def canvas(model: NativeDiffusionModel, masks: int) -> list[int]:
    prompt = [int(i) for i in model.tokenizer("the cat sat on a mat", add_special_tokens=False)["input_ids"]]
    return [*(prompt * PROMPT)[:PROMPT], *[model.special.mask] * masks]


def allowed(model: NativeDiffusionModel) -> torch.Tensor:
    return vocabulary_rules(model).mask(PositionRule())  # [V] bool


def run_ours(model: NativeDiffusionModel, ids: list[int], options: SamplerOptions) -> tuple[list[int], list[set[int]]]:
    """The sampler's final canvas and the positions it committed at each step."""
    row = Row(ids=ids, pinned=[i < PROMPT for i in range(len(ids))], rules=[PositionRule()] * len(ids), seed=7)
    steps: list[set[int]] = []

    def record(event: StepEvent) -> None:
        steps.append({commit.position for commit in event.commits})

    output = sample(model, [row], options, vocabulary_rules(model), on_step=record)
    return output.ids[0], steps


# --------------------------------------------------------------------------- Dream


def dream_reference(
    model: NativeDiffusionModel, ids: list[int], steps: int, alg: str, eps: float = 1e-3
) -> tuple[list[int], list[set[int]]]:
    """Dream's `_sample` at temperature 0, alg_temp 0 (maskgit_plus, topk_margin, entropy)."""
    mask = model.special.mask
    x = torch.tensor([ids])
    timesteps = torch.linspace(1, eps, steps + 1)
    committed: list[set[int]] = []
    for i in range(steps):
        mask_index = x == mask
        logits = aligned_logits(model, x, torch.ones_like(x, dtype=torch.bool))  # Dream's shift included
        logits = logits.masked_fill(~allowed(model), float("-inf"))
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        probs = torch.softmax(mask_logits, dim=-1)
        confidence, x0 = probs.max(dim=-1)
        if alg == "topk_margin":
            ranked = torch.sort(probs, dim=-1, descending=True).values
            confidence = ranked[:, 0] - ranked[:, 1]
        elif alg == "entropy":
            confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        number = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
        full_confidence[mask_index] = confidence
        chosen: set[int] = set()
        if number > 0:
            _, transfer_index = torch.topk(full_confidence, number)
            x_ = torch.zeros_like(x) + mask
            x_[mask_index] = x0.clone()
            x[0, transfer_index[0]] = x_[0, transfer_index[0]]
            chosen = {int(p) for p in transfer_index[0]}
        committed.append(chosen)
    return x[0].tolist(), committed


@pytest.mark.parametrize(
    ("alg", "schedule"), [("maskgit_plus", "confidence"), ("topk_margin", "margin"), ("entropy", "entropy")]
)
@pytest.mark.parametrize(("masks", "steps"), [(12, 12), (12, 5), (9, 20)])
def test_dream_reference_commits_what_dream_s_loop_commits(
    tiny_shifted_model: NativeDiffusionModel, alg: str, schedule: str, masks: int, steps: int
) -> None:
    ids = canvas(tiny_shifted_model, masks)
    expected, expected_steps = dream_reference(tiny_shifted_model, ids, steps, alg)
    options = SamplerOptions(reference="dream", schedule=schedule, steps=steps, **PLAIN)
    got, got_steps = run_ours(tiny_shifted_model, ids, options)
    assert got == expected
    assert got_steps == expected_steps  # the same positions at every step, empty steps included
    assert effective_steps(masks, options) == steps


def test_dream_s_step_counts_follow_its_timesteps() -> None:
    # With one step per mask Dream's first step commits int(n * (1 - eps) / n) = 0 positions.
    assert dream_counts(10, 10)[0] == 0 and sum(dream_counts(10, 10)) == 10
    assert dream_counts(100, 4) == [24, 25, 25, 26]
    assert len(dream_counts(3, 8)) == 8 and sum(dream_counts(3, 8)) == 3


def test_dream_origin_commits_a_binomial_count_of_argmax_tokens(tiny_shifted_model: NativeDiffusionModel) -> None:
    """`origin` commits each mask with probability 1 - s/t: the counts are drawn from the row's seed
    (reproducible, adding up), and the tokens are what Dream's loop writes at those positions."""
    counts = dream_origin_counts(40, 8, seed=3)
    assert counts == dream_origin_counts(40, 8, seed=3) and sum(counts) == 40 and len(counts) == 8
    assert counts != dream_origin_counts(40, 8, seed=4)
    model = tiny_shifted_model
    ids = canvas(model, 10)
    options = SamplerOptions(reference="dream", schedule="random", steps=5, **PLAIN)
    got, got_steps = run_ours(model, ids, options)
    x = torch.tensor([ids])
    for positions in got_steps:  # Dream's origin step with the transfer positions ours drew
        logits = aligned_logits(model, x, torch.ones_like(x, dtype=torch.bool))
        tokens = logits.masked_fill(~allowed(model), float("-inf")).argmax(dim=-1)
        for position in positions:
            x[0, position] = tokens[0, position]
    assert got == x[0].tolist() and len(got_steps) == 5


# --------------------------------------------------------------------------- LLaDA


def llada_reference(
    model: NativeDiffusionModel, prompt: list[int], gen_length: int, steps: int, block_length: int, cfg_scale: float
) -> tuple[list[int], list[set[int]]]:
    """LLaDA's `generate` at temperature 0, remasking 'low_confidence'."""
    mask_id = model.special.mask
    x = torch.full((1, len(prompt) + gen_length), mask_id, dtype=torch.long)
    x[:, : len(prompt)] = torch.tensor(prompt)
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    committed: list[set[int]] = []

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        return model.forward_logits(ids, torch.ones_like(ids, dtype=torch.bool))

    for num_block in range(num_blocks):
        start = len(prompt) + num_block * block_length
        block_mask_index = x[:, start : start + block_length] == mask_id
        num_transfer_tokens = torch.tensor([llada_counts(int(block_mask_index.sum()), steps)])
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits, un_logits = torch.chunk(logits_of(torch.cat([x, un_x])), 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = logits_of(x)
            logits = logits.masked_fill(~allowed(model), float("-inf"))  # after guidance: no inf - inf
            x0 = torch.argmax(logits.to(torch.float64).exp(), dim=-1)  # add_gumbel_noise at temperature 0
            p = torch.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.gather(p, dim=-1, index=x0[..., None]).squeeze(-1)
            x0_p[:, start + block_length :] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            _, select_index = torch.topk(confidence[0], k=int(num_transfer_tokens[0, i]))
            x[0, select_index] = x0[0, select_index]
            committed.append({int(p) for p in select_index})
    return x[0].tolist(), committed


@pytest.mark.parametrize(
    ("gen_length", "steps", "block_length", "cfg_scale"),
    [(16, 16, 16, 0.0), (16, 8, 4, 0.0), (12, 6, 4, 0.0), (12, 12, 12, 1.5), (16, 8, 8, 0.5)],
)
def test_llada_reference_commits_what_llada_s_loop_commits(
    tiny_model: NativeDiffusionModel, gen_length: int, steps: int, block_length: int, cfg_scale: float
) -> None:
    ids = canvas(tiny_model, gen_length)
    expected, expected_steps = llada_reference(tiny_model, ids[:PROMPT], gen_length, steps, block_length, cfg_scale)
    schedule = "confidence" if block_length == gen_length else "blocks"
    options = SamplerOptions(
        reference="llada",
        schedule=schedule,
        steps=steps,
        block_length=block_length,
        cfg_scale=cfg_scale,
        **PLAIN,
    )
    got, got_steps = run_ours(tiny_model, ids, options)
    assert got == expected
    assert got_steps == expected_steps


def test_guidance_changes_the_fill(tiny_model: NativeDiffusionModel) -> None:
    ids = canvas(tiny_model, 16)
    plain = run_ours(tiny_model, ids, SamplerOptions(reference="llada", steps=16, **PLAIN))[0]
    guided = run_ours(tiny_model, ids, SamplerOptions(reference="llada", steps=16, cfg_scale=3.0, **PLAIN))[0]
    assert guided != plain


def test_llada_plans_spread_each_block_over_its_steps() -> None:
    assert llada_counts(5, 3) == [2, 2, 1]
    assert llada_counts(2, 4) == [1, 1, 0, 0]  # steps that get none stay, as in the reference
    assert llada_plan(8, 4, 4) == [(2, 0), (2, 0), (2, 1), (2, 1)]
    assert llada_plan(6, 4, 4) == [(2, 0), (2, 0), (1, 1), (1, 1)]  # a shorter last block


@pytest.mark.parametrize(
    ("reference", "schedule"), [("dream", "blocks"), ("dream", "threshold"), ("llada", "margin"), ("llada", "random")]
)
def test_a_schedule_the_reference_does_not_have_is_refused(reference: str, schedule: str) -> None:
    with pytest.raises(ValidationError, match="has no"):
        SamplerOptions(reference=reference, schedule=schedule)
