"""LLaDA checkpoints (GSAI-ML/LLaDA-8B-*): an OLMo-style "llama" block layout, renamed into ours.

Facts taken from LLaDA's modeling_llada.py / configuration_llada.py (hub remote code):
- `LLaDALlamaBlock`: x + attn_out(attention(rope(q_proj, k_proj), v_proj)(attn_norm(x))), then
  x + ff_out(act(ff_proj(h)) * up_proj(h)) with h = ff_norm(x): ff_proj is the gate, up_proj the up.
- With `activation_type: "silu"` the activation's output multiplier is 1, so `mlp_hidden_size`
  (12288 for the 8B model, ff_proj [12288, 4096]) is the per-branch width, not 2x as with "swiglu".
- Rotary embeddings use the rotate-half layout (cos/sin of cat(freqs, freqs)), as Llama and Qwen2.
- RMS norm in float32, eps `rms_norm_eps` (default 1e-5); attention is non-causal; logits are not shifted.
"""

from __future__ import annotations

import re
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

_TOP_LEVEL = {
    "model.transformer.wte.weight": "embed_tokens.weight",
    "model.transformer.ln_f.weight": "norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}
_BLOCK_PARTS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj",  # SiLU is applied to ff_proj: it is the gate
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
}
_BLOCK_KEY = re.compile(r"^model\.transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)$")
_GROUPED_KEY = re.compile(r"^model\.transformer\.block_groups\.(\d+)\.(\d+)\.(\w+)\.(weight|bias)$")

# What LLaDA-8B's config.json says; a key that is absent is taken to have this value.
_SUPPORTED = {
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "rope": True,
    "alibi": False,
    "include_bias": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "attention_layer_norm": False,
}


def llada_rename(key: str, group_size: int = 1) -> str | None:
    """`model.transformer.blocks.3.ff_proj.weight` -> `layers.3.mlp.gate_proj.weight`."""
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key]
    if match := _BLOCK_KEY.match(key):
        layer, part, kind = int(match[1]), match[2], match[3]
    elif match := _GROUPED_KEY.match(key):  # block_group_size > 1 nests blocks in groups
        layer, part, kind = int(match[1]) * group_size + int(match[2]), match[3], match[4]
    else:
        return key  # left for build_network to report as unexpected
    if part not in _BLOCK_PARTS:
        return key
    return f"layers.{layer}.{_BLOCK_PARTS[part]}.{kind}"


def _check_supported(config: dict[str, Any], path: Path) -> None:
    for key, wanted in _SUPPORTED.items():
        value = config.get(key, wanted)
        if value is None:  # e.g. bias_for_layer_norm-style "inherit" values
            continue
        if str(value).lower() != str(wanted).lower():
            raise ModelLoadError(f"{path}: LLaDA config {key}={value!r} is not supported (need {wanted!r})")


def _kv_heads(config: dict[str, Any], heads: int) -> int:
    if config.get("n_kv_heads") is not None:
        return int(config["n_kv_heads"])
    return 1 if config.get("multi_query_attention") else heads


def llada_transformer_config(config: dict[str, Any], path: Path) -> TransformerConfig:
    d_model = int(require(config, "d_model", path))
    heads = int(require(config, "n_heads", path))
    mlp = config.get("mlp_hidden_size") or int(config.get("mlp_ratio", 4)) * d_model
    return TransformerConfig(
        # Embedding rows (and logits) may be padded past the tokenizer's vocabulary.
        vocab_size=int(config.get("embedding_size") or require(config, "vocab_size", path)),
        hidden_size=d_model,
        num_layers=int(require(config, "n_layers", path)),
        num_heads=heads,
        num_kv_heads=_kv_heads(config, heads),
        intermediate_size=int(mlp),  # per branch: activation_type is "silu" (see module docstring)
        rope_theta=float(config.get("rope_theta", 10_000.0)),
        rms_norm_eps=float(config.get("rms_norm_eps") or 1e-5),
        qkv_bias=bool(config.get("include_qkv_bias") or False),
        tie_embeddings=bool(config.get("weight_tying", False)),
        max_positions=int(config.get("max_sequence_length", 4096)),
    )


def load_llada(
    path_or_id: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> NativeDiffusionModel:
    """Load a LLaDA-format checkpoint (local directory or hub id) into our transformer."""
    path = resolve_checkpoint(path_or_id)
    config = read_config(path)
    _check_supported(config, path)
    transformer_config = llada_transformer_config(config, path)
    group_size = int(config.get("block_group_size") or 1)
    tensors = load_tensors(path, lambda key: llada_rename(key, group_size), dtype=dtype, device=device)
    network = build_network(transformer_config, tensors, path)
    tokenizer = load_tokenizer(path)
    instruct = bool(tokenizer.chat_template)
    special = special_ids_from(config, tokenizer, path, instruct=instruct)
    return NativeDiffusionModel(
        network, tokenizer, special, logits_shifted=False, name=name or str(path_or_id), use_chat_template=instruct
    )
