"""Checkpoints in the Qwen/Llama block layout, loaded into our `BidirectionalTransformer` by one
loader: a `Family` says, as data, how a family names its weights, reads its config, and aligns its
logits; `load_checkpoint` does the rest (read, rename, build, tokenizer, special ids).

- Dream (Dream-org/Dream-v0-*): Qwen2 weights with non-causal attention. Dream predicts token i
  from the output at position i-1 (it kept the autoregressive head of the Qwen2.5 model it started
  from), so its logits are shifted.
- LLaDA (GSAI-ML/LLaDA-8B-*): an OLMo-style "llama" block layout, renamed into ours; not shifted.
  Facts taken from LLaDA's modeling_llada.py / configuration_llada.py (hub remote code):
  - `LLaDALlamaBlock`: x + attn_out(attention(rope(q_proj, k_proj), v_proj)(attn_norm(x))), then
    x + ff_out(act(ff_proj(h)) * up_proj(h)) with h = ff_norm(x): ff_proj is the gate, up_proj the up.
  - With `activation_type: "silu"` the activation's output multiplier is 1, so `mlp_hidden_size`
    (12288 for the 8B model, ff_proj [12288, 4096]) is the per-branch width, not 2x as with "swiglu".
  - Rotary embeddings use the rotate-half layout (cos/sin of cat(freqs, freqs)), as Llama and Qwen2.
  - RMS norm in float32, eps `rms_norm_eps` (default 1e-5); attention is non-causal; logits are not shifted.
- native (`model_type: "editor-dlm"`): our own format, written by `save_native`; config.json holds
  `TransformerConfig` fields and the special ids, weights are named as our state dict.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from editor.models.base import SpecialIds
from editor.models.native import (
    ModelLoadError,
    NativeDiffusionModel,
    build_network,
    default_dtype,
    load_tensors,
    load_tokenizer,
    read_config,
    require,
    resolve_checkpoint,
    special_ids_from,
)
from editor.models.transformer import TransformerConfig

Config = dict[str, Any]
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """What differs between checkpoint families; everything else is `load_checkpoint`."""

    name: str
    check: Callable[[Config, Path], None]  # raises ModelLoadError for a config we cannot run
    rename: Callable[[Config], Callable[[str], str | None]]  # config -> checkpoint key -> our key (None: skip)
    transformer_config: Callable[[Config, Tensors, Path], TransformerConfig]
    special_ids: Callable[[Config, Any, Path], SpecialIds]  # config, tokenizer, path
    logits_shifted: Callable[[Config], bool]


# --------------------------------------------------------------------------- Dream (Qwen2 names)


def dream_rename(key: str) -> str | None:
    """`model.layers.0.self_attn.q_proj.weight` -> `layers.0.self_attn.q_proj.weight`."""
    if key.endswith("rotary_emb.inv_freq"):  # a buffer some exports keep; we compute it
        return None
    return key.removeprefix("model.")


def _rope_theta(config: dict[str, Any]) -> float:
    # transformers 5 writes rope settings under `rope_parameters`; Dream's own config is flat.
    parameters = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or parameters.get("rope_theta") or 10_000.0)


def _check_dream(config: dict[str, Any], path: Path) -> None:
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


def _dream_config(config: Config, tensors: Tensors, path: Path) -> TransformerConfig:
    # Qwen2 always has q/k/v biases; read it off the weights rather than trusting a flag.
    for key in ("hidden_size", "num_attention_heads"):
        require(config, key, path)
    return dream_transformer_config(config, "layers.0.self_attn.q_proj.bias" in tensors, path)


# --------------------------------------------------------------------------- LLaDA (OLMo names)

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


def _check_llada(config: dict[str, Any], path: Path) -> None:
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


def _llada_renamer(config: Config) -> Callable[[str], str | None]:
    group_size = int(config.get("block_group_size") or 1)
    return lambda key: llada_rename(key, group_size)


# --------------------------------------------------------------------------- native (our names)

_NATIVE_REQUIRED = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")


def _check_native(config: Config, path: Path) -> None:
    for key in _NATIVE_REQUIRED:
        require(config, key, path)


def _native_special_ids(config: Config, _tokenizer: Any, path: Path) -> SpecialIds:
    return SpecialIds(
        mask=int(require(config, "mask_token_id", path)),
        pad=int(require(config, "pad_token_id", path)),
        bos=config.get("bos_token_id"),
        eos=config.get("eos_token_id"),
        extra_end=tuple(int(i) for i in config.get("extra_end_token_ids", ())),
    )


def _hub_special_ids(config: Config, tokenizer: Any, path: Path) -> SpecialIds:
    return special_ids_from(config, tokenizer, path, instruct=bool(tokenizer.chat_template))


DREAM = Family(
    "dream",
    _check_dream,
    lambda _config: dream_rename,
    _dream_config,
    _hub_special_ids,
    logits_shifted=lambda _config: True,
)
LLADA = Family(
    "llada",
    _check_llada,
    _llada_renamer,
    lambda config, _tensors, path: llada_transformer_config(config, path),
    _hub_special_ids,
    logits_shifted=lambda _config: False,
)
NATIVE = Family(
    "native",
    _check_native,
    lambda _config: lambda key: key,
    lambda config, _tensors, _path: TransformerConfig.from_dict(config),
    _native_special_ids,
    logits_shifted=lambda config: bool(config.get("logits_shifted", False)),
)
FAMILIES = {family.name: family for family in (DREAM, LLADA, NATIVE)}


def load_checkpoint(
    family: Family,
    path_or_id: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> NativeDiffusionModel:
    """Load a checkpoint of `family` (local directory or hub id) into our transformer."""
    path = resolve_checkpoint(path_or_id)
    config = read_config(path)
    family.check(config, path)
    tensors = load_tensors(path, family.rename(config), dtype=dtype, device=device)
    network = build_network(family.transformer_config(config, tensors, path), tensors, path)
    tokenizer = load_tokenizer(path)
    return NativeDiffusionModel(
        network,
        tokenizer,
        family.special_ids(config, tokenizer, path),
        logits_shifted=family.logits_shifted(config),
        name=name or str(path_or_id),
        use_chat_template=bool(tokenizer.chat_template),
    )


def load_native(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, name: str | None = None
) -> NativeDiffusionModel:
    """Our own format (config.json = TransformerConfig fields + special ids)."""
    resolved = default_dtype(device, dtype)
    return load_checkpoint(NATIVE, path, device=device, dtype=resolved, name=name or str(path))


__all__ = [
    "DREAM",
    "FAMILIES",
    "LLADA",
    "NATIVE",
    "Family",
    "load_checkpoint",
    "load_native",
]
