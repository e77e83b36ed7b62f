"""Adapting an autoregressive GGUF model into a masked diffusion model with a LoRA adapter, the way
Dream was made from Qwen2.5 (at our scale):

- attention becomes bidirectional (our transformer has no causal mask);
- the next-token alignment is kept: the token at position i is predicted by the output at i-1
  (shifted logits), and position 0 always holds the beginning-of-text id;
- the masked-diffusion (MDLM) loss, the same as the tiny model's (`train.masked_diffusion_loss`);
- a reused special token is the mask; its embedding row gets a trained delta (tied to the head);
- only LoRA factors on every linear of every block, the RMSNorm weights and that row are trained;
  the base weights stay frozen in bfloat16 autocast.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from editor.models.adapter import LORA_TARGETS, MASK_DELTA, lowered_rank, read_adapter, write_adapter
from editor.models.base import SpecialIds
from editor.models.gguf import read_gguf, sha256_of
from editor.models.transformer import BidirectionalTransformer
from editor.training.data import Batch, BatchSpec, TokenizedCorpus, tokenize_corpus
from editor.training.train import batch_loader, training_loop

# The reused mask token of the default model: `<issue_start>`, a code-corpus marker that everyday
# text never contains. Beginning of text, padding and end are all `<|endoftext|>`, as in pre-training.
SMOLLM_SPECIAL = SpecialIds(mask=8, pad=0, bos=0, eos=0)


class LoRALinear(nn.Module):
    """y = W x + scale * B A x with W frozen; A [r, in] random, B [out, r] zero at the start."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


class MaskRowEmbedding(nn.Module):
    """The frozen (tied) embedding with a trained delta on one row; `weight()` is what both the
    embedding lookup and the head use, so training sees exactly what merging produces."""

    def __init__(self, embedding: nn.Embedding, row: int) -> None:
        super().__init__()
        self.base = embedding
        self.base.weight.requires_grad_(False)
        self.row = row
        self.mask_delta = nn.Parameter(torch.zeros(embedding.embedding_dim))

    def weight(self) -> torch.Tensor:  # [V, C]
        onehot = torch.zeros(self.base.num_embeddings, 1, device=self.mask_delta.device)
        onehot[self.row] = 1.0
        return self.base.weight + onehot * self.mask_delta

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, C]
        return F.embedding(ids, self.weight())


class TiedHead(nn.Module):
    def __init__(self, embedding: MaskRowEmbedding) -> None:
        super().__init__()
        self.embedding = [embedding]  # a list, so the module is not registered twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, C] -> [B, L, V]
        return F.linear(x, self.embedding[0].weight())


def add_lora(network: BidirectionalTransformer, rank: int, alpha: float, mask_id: int) -> list[nn.Parameter]:
    """Freeze `network`, wrap its block linears in LoRA, make norms and the mask row trainable.
    Returns the trainable parameters."""
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    for layer in network.layers:
        for target in LORA_TARGETS:
            parent_name, _, child = target.partition(".")
            parent = getattr(layer, parent_name)
            setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    if not network.config.tie_embeddings:
        raise ValueError("the mask-row delta assumes tied embeddings")
    embedding = MaskRowEmbedding(network.embed_tokens, mask_id)
    network.embed_tokens = embedding  # type: ignore[assignment]
    network.lm_head = TiedHead(embedding)  # type: ignore[assignment]
    for name, parameter in network.named_parameters():
        if "norm" in name:
            parameter.requires_grad_(True)
    return [p for p in network.parameters() if p.requires_grad]


def adapter_tensors(network: BidirectionalTransformer) -> dict[str, torch.Tensor]:
    """The trained tensors under the adapter file's names (see `editor.models.adapter`)."""
    out: dict[str, torch.Tensor] = {}
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        if name == "embed_tokens.mask_delta":
            out[MASK_DELTA] = parameter.detach().float().cpu()
        else:
            out[name] = parameter.detach().float().cpu()
    return out


def lower_adapter_rank(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Every LoRA pair replaced by its best rank-`rank` approximation (SVD of B @ A)."""
    out = dict(tensors)
    for name in tensors:
        if name.endswith(".lora_A"):
            stem = name.removesuffix(".lora_A")
            out[name], out[stem + ".lora_B"] = lowered_rank(tensors[name], tensors[stem + ".lora_B"], rank)
    return out


def shifted_diffusion_loss(model: BidirectionalTransformer, batch: Batch) -> torch.Tensor:
    """MDLM loss with shifted logits: the output at i-1 scores the token at i."""
    logits = model(batch.input_ids, attention_mask=batch.attention_mask)[:, :-1]  # [B, L-1, V]
    targets = batch.targets[:, 1:]
    weights = (batch.loss_mask * batch.weights)[:, 1:]
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")  # [B*(L-1)]
    return (losses * weights.flatten()).sum() / batch.attention_mask.sum()


@dataclass
class LoRAConfig:
    gguf: Path
    corpus: Path  # .txt(.xz) to tokenize, or a .npz from prepare-data
    out_dir: Path
    rank: int = 64
    alpha: float = 64.0
    seed: int = 1234
    time_budget_s: float = 480.0
    max_steps: int | None = None
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    grad_clip: float = 1.0
    batch: BatchSpec = field(default_factory=lambda: BatchSpec(batch_size=128))
    compile: bool = True
    log_every: int = 50
    data_workers: int = 6
    storage: str = "int8"
    save_rank: int | None = None  # lower the rank (SVD) before saving; None keeps `rank`
    init_adapter: Path | None = None  # continue from this adapter directory (its rank and alpha win)


def build_adapted(gguf: Path, rank: int, alpha: float) -> tuple[BidirectionalTransformer, object, list[nn.Parameter]]:
    base = read_gguf(gguf)
    network = BidirectionalTransformer(base.config)
    network.load_state_dict(base.tensors, strict=False)
    network.lm_head.weight = network.embed_tokens.weight
    trainable = add_lora(network, rank, alpha, SMOLLM_SPECIAL.mask)
    return network, base.tokenizer, trainable


def load_adapter_weights(network: BidirectionalTransformer, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Start from a saved adapter (a run continued from an earlier one): its factors, norms and mask
    delta go into the LoRA-wrapped network under the same names `adapter_tensors` wrote them."""
    trainable = {name for name, parameter in network.named_parameters() if parameter.requires_grad}
    unknown = sorted(set(tensors) - trainable)
    missing = sorted(trainable - set(tensors))
    if unknown or missing:
        raise ValueError(f"{path}: adapter does not fit this network (unknown {unknown[:3]}, missing {missing[:3]})")
    network.load_state_dict(tensors, strict=False)


def run_record(config: LoRAConfig, summary: dict[str, object]) -> dict[str, object]:
    """What an adapter's config.json keeps about the run that made it (enough to repeat it)."""
    return {
        **{k: v for k, v in summary.items() if k != "config"},
        "learning_rate": config.learning_rate,
        "warmup_steps": config.warmup_steps,
        "seed": config.seed,
        "corpus": config.corpus.name,
        "time_budget_s": config.time_budget_s,
        "whole_paragraph_share": config.batch.whole_paragraph_share,
        "span_share": config.batch.span_share,
        "padded_span_share": config.batch.padded_span_share,
        "infill_share": config.batch.infill_share,
        "continued_from": config.init_adapter.name if config.init_adapter else None,
    }


def train_lora(config: LoRAConfig) -> dict[str, object]:
    """Train an adapter; writes `out_dir/adapter` (the shippable directory), `out_dir/full.safetensors`
    (the trained tensors in float32, for measuring storage choices) and `out_dir/training.json`."""
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start_from: dict[str, torch.Tensor] | None = None
    earlier_runs: list[object] = []
    if config.init_adapter is not None:
        adapter_config, start_from = read_adapter(config.init_adapter)
        config.rank, config.alpha = int(adapter_config["lora_rank"]), float(adapter_config["lora_alpha"])
        earlier = adapter_config.get("training")
        earlier_runs = [*adapter_config.get("earlier_runs", []), *([earlier] if earlier else [])]
    network, tokenizer, trainable = build_adapted(config.gguf, config.rank, config.alpha)
    if config.init_adapter is not None and start_from is not None:
        load_adapter_weights(network, start_from, config.init_adapter)
    network.to(device).train()
    corpus = (
        TokenizedCorpus.load(config.corpus)
        if config.corpus.suffix == ".npz"
        else tokenize_corpus(config.corpus, tokenizer)
    )
    print(f"corpus: {len(corpus.tokens):,} tokens in {len(corpus.starts):,} paragraphs", flush=True)
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, betas=(0.9, 0.99), weight_decay=0.0, fused=device.type == "cuda"
    )
    use_compile = config.compile and device.type == "cuda"
    step_fn = torch.compile(shifted_diffusion_loss) if use_compile else shifted_diffusion_loss
    batches = batch_loader(corpus, config.batch, SMOLLM_SPECIAL, config.seed, config.data_workers)
    print(f"trainable: {sum(p.numel() for p in trainable) / 1e6:.2f}M parameters on {device}", flush=True)
    outcome = training_loop(
        config, network, trainable, step_fn, batches, optimizer, device, eager_loss_fn=shifted_diffusion_loss
    )
    step, log = outcome.steps, outcome.log
    tensors = adapter_tensors(network)
    summary = {
        "steps": step,
        "tokens_seen": step * config.batch.batch_size * config.batch.seq_len,
        "elapsed_s": round(outcome.elapsed_s, 1),
        "startup_s": round(outcome.startup_s, 1),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "final_loss": log[-1]["loss"] if log else None,
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    config.out_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(config.out_dir / "full.safetensors"))
    save_rank = config.save_rank or config.rank
    shipped = lower_adapter_rank(tensors, save_rank) if save_rank < config.rank else tensors
    base_sha = sha256_of(config.gguf)
    write_adapter(
        config.out_dir / "adapter",
        shipped,
        rank=save_rank,
        alpha=config.alpha * save_rank / config.rank,  # keeps scale = alpha / rank
        special=SMOLLM_SPECIAL,
        storage=config.storage,
        base_sha256=base_sha,
        extra={"training": run_record(config, summary), "earlier_runs": earlier_runs},
    )
    (config.out_dir / "training.json").write_text(json.dumps({"summary": summary, "log": log}, indent=1))
    return summary


__all__ = ["SMOLLM_SPECIAL", "LoRAConfig", "LoRALinear", "add_lora", "lower_adapter_rank", "train_lora"]


def measure_storage(out_dir: Path, gguf: Path, valid_paths: list[Path]) -> list[dict[str, object]]:
    """Bits/char at mask rate 0.15 on each held-out split for the base model alone and for the
    trained adapter at each rank and storage we could ship (what shrinking the adapter costs)."""
    from editor.models.adapter import merge_adapter, pack_tensors, read_safetensors, unpack_tensors
    from editor.models.native import NativeDiffusionModel, build_network
    from editor.training.evaluate import ROW_KINDS, evaluate_rate, token_char_counts, unigram_log_probs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = read_gguf(gguf)
    tensors = read_safetensors(out_dir / "full.safetensors")
    rank = int(tensors[next(n for n in tensors if n.endswith(".lora_A"))].shape[0])
    alpha = float(json.loads((out_dir / "training.json").read_text())["summary"]["config"]["alpha"])
    special = SMOLLM_SPECIAL
    splits = {path.name: tokenize_corpus(path, base.tokenizer) for path in valid_paths}
    chars = token_char_counts(base.tokenizer, base.config.vocab_size)
    variants: list[tuple[str, int, str | None]] = [("base model, no adapter", 0, None)]
    for keep in sorted({rank, 64, 32, 16} - {r for r in (64, 32, 16) if r > rank}, reverse=True):
        for name in ("float32", "float16", "int8"):
            variants.append((f"rank {keep}, {name}", keep, name))
    results: list[dict[str, object]] = []
    for label, keep, storage in variants:
        if storage is None:
            merged = dict(base.tensors)
        else:
            lowered = lower_adapter_rank(tensors, keep) if keep < rank else tensors
            factors = {n for n in lowered if n.endswith((".lora_A", ".lora_B"))}
            stored = lowered if storage == "float32" else unpack_tensors(pack_tensors(lowered, storage, factors))
            config = {"lora_rank": keep, "lora_alpha": alpha * keep / rank, "mask_token_id": special.mask}
            merged = merge_adapter(base.tensors, stored, config, out_dir)
            size = sum(
                t.numel() * (1 if storage == "int8" else 2 if storage == "float16" else 4)
                for n, t in lowered.items()
                if n in factors
            )
        network = build_network(base.config, {k: v.to(device) for k, v in merged.items()}, out_dir)
        model = NativeDiffusionModel(
            network, base.tokenizer, special, logits_shifted=True, name=label, use_chat_template=False
        )
        entry: dict[str, object] = {"variant": label, "rank": keep, "storage": storage}
        if storage is not None:
            entry["factor_bytes"] = size
        for name, corpus in splits.items():
            for kind, make_rows in ROW_KINDS.items():
                result = evaluate_rate(
                    model,
                    make_rows(corpus, special.bos or 0, 257),
                    0.15,
                    unigram_log_probs(corpus.tokens, base.config.vocab_size),
                    char_counts=chars,
                    batch_size=64,
                )
                entry[f"{name} ({kind} rows)"] = {
                    "accuracy": round(result.accuracy, 4),
                    "nll": round(result.nll, 4),
                    "bits_per_char": round(result.bits_per_char, 4),
                }
        print(json.dumps(entry), flush=True)
        results.append(entry)
    return results
