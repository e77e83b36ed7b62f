"""Masked-diffusion training of the bundled model.

Objective (LLaDA/MDLM): per sequence a noise level t ~ U(eps, 1); each token is masked with
probability t; cross-entropy on masked positions weighted by 1/t, averaged over the batch's tokens.
The schedule is tied to a wall-clock budget so one run fits the lent GPU's 10-minute command limit
(counted after the first steps, so compilation does not shorten it); the number of steps
actually taken is logged so the run can be repeated with `max_steps`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from editor.models.base import SpecialIds
from editor.models.checkpoints import load_native
from editor.models.loading import save_native
from editor.models.transformer import BidirectionalTransformer, TransformerConfig
from editor.training.data import Batch, BatchSampler, BatchSpec, TokenizedCorpus

# The shipped configuration: ~17M parameters, about 35 MB in float16.
DEFAULT_MODEL = {
    "hidden_size": 384,
    "num_layers": 9,
    "num_heads": 6,
    "num_kv_heads": 2,
    "intermediate_size": 1024,
    "rope_theta": 10_000.0,
    "rms_norm_eps": 1e-6,
    "qkv_bias": False,
    "tie_embeddings": True,
    "max_positions": 2048,
}


@dataclass
class TrainConfig:
    tokenizer_dir: Path
    train_data: Path  # .npz from `tokenize_corpus`
    out_dir: Path
    seed: int = 1234
    time_budget_s: float = 480.0
    max_steps: int | None = None
    learning_rate: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 300
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch: BatchSpec = field(default_factory=BatchSpec)
    model: dict[str, object] = field(default_factory=lambda: dict(DEFAULT_MODEL))
    compile: bool = True
    init_from: Path | None = None  # continue from a saved model directory (weights only)
    log_every: int = 50
    data_workers: int = 6


def masked_diffusion_loss(model: BidirectionalTransformer, batch: Batch) -> torch.Tensor:
    logits = model(batch.input_ids, attention_mask=batch.attention_mask)  # [B, L, V]
    # Every position is scored and unmasked ones weighted 0: static shapes suit torch.compile.
    losses = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), reduction="none")  # [B*L]
    weights = (batch.loss_mask * batch.weights).flatten()  # [B*L]
    return (losses * weights).sum() / batch.attention_mask.sum()


UNTIMED_STEPS = 2  # steps before the budget's clock starts


class LoopSettings(Protocol):
    """What the shared training loop reads from a run's config (TrainConfig, LoRAConfig)."""

    learning_rate: float
    min_lr_ratio: float
    warmup_steps: int
    time_budget_s: float
    max_steps: int | None
    grad_clip: float
    log_every: int


def learning_rate(config: LoopSettings, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay over the run's progress (time or steps, whichever ends)."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.learning_rate * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


class BatchStream(torch.utils.data.IterableDataset[dict[str, torch.Tensor]]):
    """Endless batches; each DataLoader worker draws from its own seed so the GPU never waits."""

    def __init__(self, corpus: TokenizedCorpus, spec: BatchSpec, special: SpecialIds, seed: int) -> None:
        self.corpus, self.spec, self.special, self.seed = corpus, spec, special, seed

    def __iter__(self):  # type: ignore[no-untyped-def]
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        sampler = BatchSampler(
            self.corpus,
            self.spec,
            bos_id=self.special.bos,  # type: ignore[arg-type]
            pad_id=self.special.pad,
            mask_id=self.special.mask,
            seed=self.seed * 1000 + worker,
        )
        while True:
            yield sampler.sample()


def batch_loader(
    corpus: TokenizedCorpus, spec: BatchSpec, special: SpecialIds, seed: int, workers: int
) -> Iterator[Batch]:
    stream = BatchStream(corpus, spec, special, seed)
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        collate_fn=lambda batch: batch,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )
    return iter(loader)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(**{name: value.to(device, non_blocking=True) for name, value in vars(batch).items()})


LossFn = Callable[[BidirectionalTransformer, Batch], torch.Tensor]


@dataclass(frozen=True)
class LoopOutcome:
    steps: int
    log: list[dict[str, float]]  # one entry every `log_every` steps
    elapsed_s: float  # from the end of the untimed first steps (the budget's clock)
    startup_s: float  # the untimed first steps: compilation, data workers


def training_loop(
    config: LoopSettings,
    network: BidirectionalTransformer,
    parameters: list[torch.nn.Parameter],
    loss_fn: LossFn,
    batches: Iterator[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    eager_loss_fn: LossFn | None = None,
) -> LoopOutcome:
    """Steps until the time budget (or `max_steps`) is spent: warm-up then cosine learning rate
    over the run's progress, bf16 autocast on CUDA, gradient clipping, a JSON log line every
    `log_every` steps. With `eager_loss_fn`, a failure of `loss_fn` (a compiled graph) switches
    to the eager function instead of ending the run."""
    log: list[dict[str, float]] = []
    began = started = time.perf_counter()
    step = 0
    while True:
        if step == UNTIMED_STEPS:
            # The budget counts from here: the first steps compile the graph (torch.compile traced
            # again on the second call in a measured run) and start the data workers, which takes
            # minutes on a cold machine and must not eat the schedule.
            started = time.perf_counter()
        elapsed = time.perf_counter() - started if step >= UNTIMED_STEPS else 0.0
        progress = elapsed / config.time_budget_s
        if config.max_steps is not None:
            progress = max(progress, step / config.max_steps)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, progress)
        batch = to_device(next(batches), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            try:
                loss = loss_fn(network, batch)
            except Exception as error:
                if eager_loss_fn is None or loss_fn is eager_loss_fn:
                    raise
                print(f"torch.compile failed ({error!r}); continuing eagerly", flush=True)
                loss_fn = eager_loss_fn
                loss = loss_fn(network, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        if step % config.log_every == 0:
            entry = {
                "step": step,
                "loss": round(loss.item(), 4),
                "lr": optimizer.param_groups[0]["lr"],
                "elapsed_s": round(elapsed, 1),
            }
            log.append(entry)
            print(json.dumps(entry), flush=True)
        step += 1
    return LoopOutcome(step, log, time.perf_counter() - started, startup_s=started - began)


def train(config: TrainConfig) -> dict[str, object]:
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(config.tokenizer_dir))
    special = SpecialIds(
        mask=tokenizer.mask_token_id, pad=tokenizer.pad_token_id, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id
    )
    model_config = TransformerConfig(vocab_size=len(tokenizer), **config.model)  # type: ignore[arg-type]
    model = BidirectionalTransformer(model_config)
    if config.init_from is not None:
        model.load_state_dict(load_native(config.init_from).network.state_dict())
    model.to(device)
    corpus = TokenizedCorpus.load(config.train_data)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    step_fn = (
        torch.compile(masked_diffusion_loss) if config.compile and device.type == "cuda" else masked_diffusion_loss
    )
    batches = batch_loader(corpus, config.batch, special, config.seed, config.data_workers)
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters on {device}", flush=True)
    outcome = training_loop(config, model, list(model.parameters()), step_fn, batches, optimizer, device)
    step, log = outcome.steps, outcome.log
    summary = {
        "steps": step,
        "tokens_seen": step * config.batch.batch_size * config.batch.seq_len,
        "elapsed_s": round(outcome.elapsed_s, 1),
        "startup_s": round(outcome.startup_s, 1),
        "parameters": model.num_parameters(),
        "final_loss": log[-1]["loss"] if log else None,
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "model_config": model_config.to_dict(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    config.out_dir.mkdir(parents=True, exist_ok=True)
    save_native(model.cpu(), tokenizer, special, config.out_dir, dtype=torch.float16)
    (config.out_dir / "training.json").write_text(json.dumps({"summary": summary, "log": log}, indent=1))
    return summary
