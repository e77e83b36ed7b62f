"""The training loop shared by `editor train` (the tiny model) and the LoRA adaptation of the
default model: it stops on its step budget, follows the warm-up/cosine schedule, logs, learns,
and falls back to the eager loss when a compiled one fails."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from editor.models.transformer import BidirectionalTransformer, TransformerConfig
from editor.training.data import Batch
from editor.training.train import UNTIMED_STEPS, LoopOutcome, learning_rate, masked_diffusion_loss, training_loop


@dataclass
class Settings:
    learning_rate: float = 1e-2
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2
    time_budget_s: float = 600.0
    max_steps: int | None = 12
    grad_clip: float = 1.0
    log_every: int = 4


def tiny_network() -> BidirectionalTransformer:
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32
    )
    return BidirectionalTransformer(config)


def same_batch_forever() -> Iterator[Batch]:
    generator = torch.Generator().manual_seed(1)
    targets = torch.randint(4, 32, (4, 12), generator=generator)  # [B, L]
    masked = torch.rand(4, 12, generator=generator) < 0.5
    batch = Batch(
        input_ids=targets.masked_fill(masked, 3),
        targets=targets,
        loss_mask=masked,
        weights=torch.full((4, 12), 2.0),
        attention_mask=torch.ones(4, 12, dtype=torch.bool),
    )
    while True:
        yield batch


def loop_on_cpu(
    settings: Settings,
    network: BidirectionalTransformer,
    loss_fn: Callable[[BidirectionalTransformer, Batch], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch] | None = None,
    **options: Any,
) -> LoopOutcome:
    """`training_loop` over all of `network`'s parameters on the CPU (the same batch by default)."""
    batch_source = same_batch_forever() if batches is None else batches
    params = list(network.parameters())
    return training_loop(settings, network, params, loss_fn, batch_source, optimizer, torch.device("cpu"), **options)


def test_the_loop_learns_and_stops_on_its_step_budget() -> None:
    network, settings = tiny_network(), Settings()
    batches = same_batch_forever()
    before = masked_diffusion_loss(network, next(batches)).item()
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate)
    outcome = loop_on_cpu(settings, network, masked_diffusion_loss, optimizer, batches)
    assert outcome.steps == 12
    assert [entry["step"] for entry in outcome.log] == [0, 4, 8]
    assert outcome.log[0]["lr"] == pytest.approx(settings.learning_rate / 2)  # warm-up: step 1 of 2
    assert masked_diffusion_loss(network, next(batches)).item() < before * 0.9


def test_learning_rate_warms_up_then_decays_to_its_floor() -> None:
    settings = Settings()
    assert learning_rate(settings, 0, 0.0) == pytest.approx(5e-3)
    assert learning_rate(settings, 5, 0.0) == pytest.approx(1e-2)
    assert learning_rate(settings, 5, 0.5) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))
    assert learning_rate(settings, 5, 1.0) == pytest.approx(1e-3)


def test_a_failing_compiled_loss_falls_back_to_the_eager_one() -> None:
    network, settings = tiny_network(), Settings(max_steps=3)
    calls: list[str] = []

    def broken(_network: BidirectionalTransformer, _batch: Batch) -> torch.Tensor:
        calls.append("compiled")
        raise RuntimeError("graph break")

    def eager(model: BidirectionalTransformer, batch: Batch) -> torch.Tensor:
        calls.append("eager")
        return masked_diffusion_loss(model, batch)

    optimizer = torch.optim.AdamW(network.parameters())
    outcome = loop_on_cpu(settings, network, broken, optimizer, eager_loss_fn=eager)
    assert outcome.steps == 3 and calls == ["compiled", "eager", "eager", "eager"]
    with pytest.raises(RuntimeError, match="graph break"):
        loop_on_cpu(settings, network, broken, optimizer)


def test_the_time_budget_starts_after_the_compiling_steps() -> None:
    """A run whose first steps are slow (torch.compile traces them) still gets its whole budget."""
    network, settings = tiny_network(), Settings(max_steps=None, time_budget_s=0.5, warmup_steps=0)
    calls = 0

    def slow_at_first(model: BidirectionalTransformer, batch: Batch) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls <= UNTIMED_STEPS:
            time.sleep(0.6)  # longer than the whole budget
        return masked_diffusion_loss(model, batch)

    optimizer = torch.optim.AdamW(network.parameters())
    outcome = loop_on_cpu(settings, network, slow_at_first, optimizer)
    assert outcome.startup_s >= 0.6 * UNTIMED_STEPS
    assert outcome.steps > UNTIMED_STEPS + 1  # steps ran after the slow ones, within the budget
    assert outcome.elapsed_s >= settings.time_budget_s
