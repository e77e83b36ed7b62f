"""Dream checkpoints (Dream-org/Dream-v0-*): Qwen2 weights with non-causal attention.

Dream predicts token i from the output at position i-1 (it keeps the autoregressive head of the
Qwen2.5 model it started from), so its logits are shifted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from editor.models.native import (
    ModelLoadError,
    NativeDiffusionModel,
    build_network,
    load_tensors,
    load_tokenizer,
    read_config,
    require,
    resolve_checkpoint,
    special_ids_from,
)
from editor.models.transformer import TransformerConfig


def dream_rename(key: str) -> str | None:
    """`model.layers.0.self_attn.q_proj.weight` -> `layers.0.self_attn.q_proj.weight`."""
    if key.endswith("rotary_emb.inv_freq"):  # a buffer some exports keep; we compute it
        return None
    return key.removeprefix("model.")


def _rope_theta(config: dict[str, Any]) -> float:
    # transformers 5 writes rope settings under `rope_parameters`; Dream's own config is flat.
    parameters = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or parameters.get("rope_theta") or 10_000.0)


def _check_supported(config: dict[str, Any], path: Path) -> None:
    scaling = config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type != "default":
        raise ModelLoadError(f"{path}: rope scaling {rope_type!r} is not supported")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != config["hidden_size"] // config["num_attention_heads"]:
        raise ModelLoadError(f"{path}: head_dim {head_dim} != hidden_size / num_attention_heads is not supported")


def dream_transformer_config(config: dict[str, Any], qkv_bias: bool, path: Path) -> TransformerConfig:
    heads = int(require(config, "num_attention_heads", path))
    return TransformerConfig(
        vocab_size=int(require(config, "vocab_size", path)),
        hidden_size=int(require(config, "hidden_size", path)),
        num_layers=int(require(config, "num_hidden_layers", path)),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        intermediate_size=int(require(config, "intermediate_size", path)),
        rope_theta=_rope_theta(config),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_positions=int(config.get("max_position_embeddings", 4096)),
    )


def load_dream(
    path_or_id: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> NativeDiffusionModel:
    """Load a Dream-format checkpoint (local directory or hub id) into our transformer."""
    path = resolve_checkpoint(path_or_id)
    config = read_config(path)
    for key in ("hidden_size", "num_attention_heads"):
        require(config, key, path)
    _check_supported(config, path)
    tensors = load_tensors(path, dream_rename, dtype=dtype, device=device)
    # Qwen2 always has q/k/v biases; read it off the weights rather than trusting a flag.
    qkv_bias = "layers.0.self_attn.q_proj.bias" in tensors
    network = build_network(dream_transformer_config(config, qkv_bias, path), tensors, path)
    tokenizer = load_tokenizer(path)
    instruct = bool(tokenizer.chat_template)
    special = special_ids_from(config, tokenizer, path, instruct=instruct)
    return NativeDiffusionModel(
        network, tokenizer, special, logits_shifted=True, name=name or str(path_or_id), use_chat_template=instruct
    )
