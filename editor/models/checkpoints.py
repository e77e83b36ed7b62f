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
- Framing (docs/models.md): an instruct checkpoint is framed with its chat template, a base one as the
  reference code frames it (Dream: a bare bos; LLaDA: plain text). Which one a checkpoint is comes from
  its identity (the hub id or directory name says Instruct/Chat or Base) or the `framing` setting,
  never from the tokenizer having a chat template: LLaDA-8B-Base ships the same template as Instruct.
- Config keys we do not implement are refused by name; a key a config leaves out takes the reference
  implementation's default (DreamConfig's / LLaDA's ModelConfig's), not ours.
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
    META_BUILD_PARAMETERS,
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
    special_ids: Callable[[Config, Any, Path, bool], SpecialIds]  # config, tokenizer, path, chat framing
    logits_shifted: Callable[[Config], bool]
    base_frame_bos: bool = True  # a base model's frame: a bare bos (Dream, ours) or nothing (LLaDA)
    template_decides_framing: bool = False  # our own format only: a template is saved only for chat models


# --------------------------------------------------------------------------- framing

FRAMINGS = ("auto", "base", "chat")
_CHAT_WORDS = frozenset({"instruct", "chat"})
_BASE_WORDS = frozenset({"base"})


def framing_from_identity(names: list[str]) -> str | None:
    """'chat' or 'base' from the first of `names` (most specific first) whose words say which:
    `Dream-org/Dream-v0-Instruct-7B` -> chat, `LLaDA-8B-Base` -> base; None when none says."""
    for name in names:
        words = set(re.split(r"[^a-z0-9]+", name.lower()))
        chat, base = bool(words & _CHAT_WORDS), bool(words & _BASE_WORDS)
        if chat != base:
            return "chat" if chat else "base"
    return None


def _identity_names(name: str, path: Path) -> list[str]:
    """What names the checkpoint, most specific first: the hub id's or given path's last part, the
    directory's own name, and for a hub cache snapshot (`models--Dream-org--Dream-v0-Instruct-7B/
    snapshots/<hash>`) the repository directory above it. Not other ancestors: a checkpoint kept
    under `/data/base-models/` says nothing about itself."""
    given = [part for part in re.split(r"[/\\]", name) if part][-1:]
    resolved = path.resolve()
    cached = [part for part in reversed(resolved.parts) if part.startswith("models--")][:1]
    return [*given, resolved.name, *cached]


def checkpoint_is_chat(family: Family, framing: str, name: str, path: Path, tokenizer: Any) -> bool:
    """Whether to frame the checkpoint with its chat template (see the module docstring)."""
    if framing not in FRAMINGS:
        raise ModelLoadError(f"framing must be one of {FRAMINGS}, not {framing!r}")
    has_template = bool(tokenizer.chat_template)
    if framing == "auto":
        if family.template_decides_framing:
            return has_template
        decided = framing_from_identity(_identity_names(name, path))
        if decided is None and has_template:
            raise ModelLoadError(
                f"{name}: cannot tell whether this is a base or an instruct checkpoint (its name says neither, "
                "and a chat template in the tokenizer does not decide it: LLaDA-8B-Base ships one too); "
                "set EDITOR_FRAMING=base or EDITOR_FRAMING=chat"
            )
        framing = decided or "base"
    if framing == "chat" and not has_template:
        raise ModelLoadError(
            f"{name}: chat framing needs a chat template, and the tokenizer has none (EDITOR_FRAMING=base frames "
            "it as a base model)"
        )
    return framing == "chat"


# --------------------------------------------------------------------------- Dream (Qwen2 names)


def dream_rename(key: str) -> str | None:
    """`model.layers.0.self_attn.q_proj.weight` -> `layers.0.self_attn.q_proj.weight`."""
    if key.endswith("rotary_emb.inv_freq"):  # a buffer some exports keep; we compute it
        return None
    return key.removeprefix("model.")


# DreamConfig's defaults (configuration_dream.py, Qwen2's): what a key that config.json leaves out means.
DREAM_DEFAULTS: Config = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,  # null: as many as num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "use_sliding_window": False,
}


def _dream(config: Config, key: str) -> Any:
    return config[key] if key in config else DREAM_DEFAULTS[key]


def _rope_theta(config: dict[str, Any]) -> float:
    # transformers 5 writes rope settings under `rope_parameters`; Dream's own config is flat.
    parameters = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or parameters.get("rope_theta") or DREAM_DEFAULTS["rope_theta"])


def _unsupported(path: Path, family: str, key: str, value: Any, config: Config, supported: str) -> ModelLoadError:
    source = "" if key in config else " (absent from config.json, so the reference default)"
    return ModelLoadError(f"{path}: {family} config {key}={value!r}{source} is not implemented; supported: {supported}")


def _check_dream(config: dict[str, Any], path: Path) -> None:
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type != "default":
        raise _unsupported(path, "Dream", "rope_scaling", scaling, config, "null (plain rotary positions)")
    if str(_dream(config, "hidden_act")).lower() != "silu":
        raise _unsupported(path, "Dream", "hidden_act", _dream(config, "hidden_act"), config, "'silu'")
    if _dream(config, "use_sliding_window"):
        raise _unsupported(path, "Dream", "use_sliding_window", True, config, "false (every layer sees the canvas)")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != _dream(config, "hidden_size") // _dream(config, "num_attention_heads"):
        raise _unsupported(path, "Dream", "head_dim", head_dim, config, "hidden_size / num_attention_heads")


def dream_transformer_config(config: dict[str, Any], qkv_bias: bool, path: Path) -> TransformerConfig:
    heads = int(_dream(config, "num_attention_heads"))
    kv_heads = _dream(config, "num_key_value_heads")
    return TransformerConfig(
        vocab_size=int(_dream(config, "vocab_size")),
        hidden_size=int(_dream(config, "hidden_size")),
        num_layers=int(_dream(config, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(heads if kv_heads is None else kv_heads),
        intermediate_size=int(_dream(config, "intermediate_size")),
        rope_theta=_rope_theta(config),
        rms_norm_eps=float(_dream(config, "rms_norm_eps")),
        qkv_bias=qkv_bias,
        tie_embeddings=bool(_dream(config, "tie_word_embeddings")),
        max_positions=int(_dream(config, "max_position_embeddings")),
    )


def _dream_config(config: Config, tensors: Tensors, path: Path) -> TransformerConfig:
    # Qwen2 always has q/k/v biases; read it off the weights rather than trusting a flag.
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

# LLaDA's ModelConfig defaults (configuration_llada.py, OLMo's): what a key config.json leaves out means.
LLADA_DEFAULTS: Config = {
    "d_model": 768,
    "n_heads": 12,
    "n_kv_heads": None,
    "n_layers": 12,
    "mlp_ratio": 4,
    "mlp_hidden_size": None,
    "activation_type": "swiglu",
    "block_type": "sequential",
    "block_group_size": 1,
    "alibi": False,
    "rope": False,
    "rope_full_precision": True,
    "rope_theta": 10000.0,
    "multi_query_attention": None,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "layer_norm_type": "default",
    "layer_norm_with_affine": True,
    "rms_norm_eps": 1e-05,
    "max_sequence_length": 1024,
    "include_bias": True,
    "include_qkv_bias": False,
    "bias_for_layer_norm": None,  # null: as include_bias
    "scale_logits": False,
    "clip_qkv": None,
    "vocab_size": 50257,
    "embedding_size": 50304,
    "weight_tying": True,
}
# The values we implement, for the keys where we implement only some (LLaDA-8B's values).
_LLADA_IMPLEMENTED: dict[str, tuple[Any, str]] = {
    "block_type": ("llama", "'llama'"),
    "activation_type": ("silu", "'silu' (ff_proj gates up_proj)"),
    "layer_norm_type": ("rms", "'rms' (RMSNorm)"),
    "layer_norm_with_affine": (True, "true"),
    "rope": (True, "true"),
    "alibi": (False, "false"),
    "include_bias": (False, "false"),
    "input_emb_norm": (False, "false"),
    "scale_logits": (False, "false"),
    "attention_layer_norm": (False, "false"),
    "clip_qkv": (None, "null"),
}


def _llada(config: Config, key: str) -> Any:
    return config[key] if key in config else LLADA_DEFAULTS[key]


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


def _same(value: Any, wanted: Any) -> bool:
    if wanted is None or isinstance(wanted, bool):
        return value is wanted or (isinstance(value, str) and value.lower() == str(wanted).lower())
    return str(value).lower() == str(wanted).lower()


def _check_llada(config: dict[str, Any], path: Path) -> None:
    for key, (wanted, supported) in _LLADA_IMPLEMENTED.items():
        value = _llada(config, key)
        if not _same(value, wanted):
            raise _unsupported(path, "LLaDA", key, value, config, supported)
    layer_norm_bias = _llada(config, "bias_for_layer_norm")
    if layer_norm_bias is None:
        layer_norm_bias = _llada(config, "include_bias")
    if layer_norm_bias:
        raise _unsupported(path, "LLaDA", "bias_for_layer_norm", layer_norm_bias, config, "false (norms without bias)")


def _kv_heads(config: dict[str, Any], heads: int) -> int:
    if _llada(config, "n_kv_heads") is not None:
        return int(config["n_kv_heads"])
    return 1 if _llada(config, "multi_query_attention") else heads


def llada_transformer_config(config: dict[str, Any], path: Path) -> TransformerConfig:
    d_model = int(_llada(config, "d_model"))
    heads = int(_llada(config, "n_heads"))
    mlp = _llada(config, "mlp_hidden_size") or int(_llada(config, "mlp_ratio")) * d_model
    return TransformerConfig(
        # Embedding rows (and logits) may be padded past the tokenizer's vocabulary.
        vocab_size=int(_llada(config, "embedding_size") or _llada(config, "vocab_size")),
        hidden_size=d_model,
        num_layers=int(_llada(config, "n_layers")),
        num_heads=heads,
        num_kv_heads=_kv_heads(config, heads),
        intermediate_size=int(mlp),  # per branch: activation_type is "silu" (see module docstring)
        rope_theta=float(_llada(config, "rope_theta")),
        rms_norm_eps=float(_llada(config, "rms_norm_eps")),
        qkv_bias=bool(_llada(config, "include_qkv_bias")),
        tie_embeddings=bool(_llada(config, "weight_tying")),
        max_positions=int(_llada(config, "max_sequence_length")),
        rope_full_precision=bool(_llada(config, "rope_full_precision")),
    )


def _llada_renamer(config: Config) -> Callable[[str], str | None]:
    group_size = int(_llada(config, "block_group_size") or 1)
    return lambda key: llada_rename(key, group_size)


# --------------------------------------------------------------------------- native (our names)

_NATIVE_REQUIRED = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")


def _check_native(config: Config, path: Path) -> None:
    for key in _NATIVE_REQUIRED:
        require(config, key, path)


def _native_special_ids(config: Config, _tokenizer: Any, path: Path, _chat: bool) -> SpecialIds:
    return SpecialIds(
        mask=int(require(config, "mask_token_id", path)),
        pad=int(require(config, "pad_token_id", path)),
        bos=config.get("bos_token_id"),
        eos=config.get("eos_token_id"),
        extra_end=tuple(int(i) for i in config.get("extra_end_token_ids", ())),
    )


def _hub_special_ids(config: Config, tokenizer: Any, path: Path, chat: bool) -> SpecialIds:
    return special_ids_from(config, tokenizer, path, instruct=chat)


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
    base_frame_bos=False,  # LLaDA's generate.py: "The Base model does not require" the chat template
)
NATIVE = Family(
    "native",
    _check_native,
    lambda _config: lambda key: key,
    lambda config, _tensors, _path: TransformerConfig.from_dict(config),
    _native_special_ids,
    logits_shifted=lambda config: bool(config.get("logits_shifted", False)),
    template_decides_framing=True,
)
FAMILIES = {family.name: family for family in (DREAM, LLADA, NATIVE)}


def load_checkpoint(
    family: Family,
    path_or_id: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
    framing: str = "auto",
    meta_build_parameters: int = META_BUILD_PARAMETERS,
) -> NativeDiffusionModel:
    """Load a checkpoint of `family` (local directory or hub id) into our transformer. `framing`:
    'auto' (from the checkpoint's identity), 'base' or 'chat'; networks of more than
    `meta_build_parameters` parameters are built on `meta` (`build_network`)."""
    path = resolve_checkpoint(path_or_id)
    config = read_config(path)
    family.check(config, path)
    tokenizer = load_tokenizer(path)
    label = name or str(path_or_id)
    chat = checkpoint_is_chat(family, framing, str(path_or_id), path, tokenizer)
    tensors = load_tensors(path, family.rename(config), dtype=dtype, device=device)
    model_config = family.transformer_config(config, tensors, path)
    network = build_network(model_config, tensors, path, meta_above=meta_build_parameters)
    return NativeDiffusionModel(
        network,
        tokenizer,
        family.special_ids(config, tokenizer, path, chat),
        logits_shifted=family.logits_shifted(config),
        name=label,
        use_chat_template=chat,
        bos_in_base_frame=family.base_frame_bos,
    )


def load_native(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, name: str | None = None
) -> NativeDiffusionModel:
    """Our own format (config.json = TransformerConfig fields + special ids)."""
    resolved = default_dtype(device, dtype)
    return load_checkpoint(NATIVE, path, device=device, dtype=resolved, name=name or str(path))


__all__ = [
    "DREAM",
    "DREAM_DEFAULTS",
    "FAMILIES",
    "FRAMINGS",
    "LLADA",
    "LLADA_DEFAULTS",
    "NATIVE",
    "Family",
    "checkpoint_is_chat",
    "framing_from_identity",
    "load_checkpoint",
    "load_native",
]
