"""Tiny checkpoints in the published Dream and LLaDA layouts (nothing is downloaded).

Each family's config.json is the published one (Dream-org/Dream-v0-*-7B, GSAI-ML/LLaDA-8B-*: Base and
Instruct ship the same config.json) with only the sizes shrunk and the special ids moved into the tiny
vocabulary; every other key is kept as published. The weights are bfloat16 shards named exactly as
the published ones, with a model.safetensors.index.json. The tokenizer files are the published
layouts: Dream's tokenizer_config.json names its remote-code `DreamTokenizer` (`auto_map`) over a
byte-level BPE `vocab.json` + `merges.txt` and no tokenizer.json, so loading it exercises our Qwen2
fallback; LLaDA's is a tokenizer.json with its chat template, which (like Llama 3's first template)
always appends the assistant header. Base and Instruct differ only by the directory's name, as on
the hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# --------------------------------------------------------------------------- Dream

DREAM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]
DREAM_IDS = {token: 256 + index for index, token in enumerate(DREAM_SPECIALS)}  # after the 256 byte tokens
DREAM_VOCAB = 272  # embedding rows padded past the tokenizer's 261, as 152064 > 151667
# Published: hidden 3584, 28 heads over 4 kv heads (7 query groups), 28 layers, intermediate 18944.
DREAM_SIZES = {"hidden_size": 56, "num_attention_heads": 7, "num_key_value_heads": 1}
DREAM_CONFIG: dict[str, Any] = {
    "architectures": ["DreamModel"],
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": DREAM_IDS["<|endoftext|>"],  # 151643
    "eos_token_id": DREAM_IDS["<|endoftext|>"],  # 151643
    "hidden_act": "silu",
    "hidden_size": 56,
    "initializer_range": 0.02,
    "intermediate_size": 96,
    "mask_token_id": DREAM_IDS["<|mask|>"],  # 151666
    "max_position_embeddings": 131072,
    "max_window_layers": 2,
    "model_type": "Dream",
    "num_attention_heads": 7,
    "num_hidden_layers": 2,
    "num_key_value_heads": 1,
    "pad_token_id": DREAM_IDS["<|endoftext|>"],  # 151643
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2",
    "use_cache": False,
    "use_sliding_window": False,
    "vocab_size": DREAM_VOCAB,
}
# Qwen2.5's template (the tool-calling branch left out): a default system turn, <|im_end|> ends a turn.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    '{%- endif %}{%- for message in messages %}{%- if (message.role == "user") or (message.role == '
    '"system" and not loop.first) or (message.role == "assistant") %}{{- \'<|im_start|>\' + message.role '
    "+ '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}{%- if "
    "add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
DREAM_TOKENIZER_CONFIG: dict[str, Any] = {
    "add_bos_token": False,
    "add_prefix_space": False,
    "added_tokens_decoder": {
        str(index): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token, index in DREAM_IDS.items()
    },
    "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
    "bos_token": "<|beginoftext|>",
    "chat_template": QWEN25_TEMPLATE,
    "clean_up_tokenization_spaces": False,
    "eos_token": "<|endoftext|>",
    "errors": "replace",
    "model_max_length": 131072,
    "pad_token": "<|endoftext|>",
    "split_special_tokens": False,
    "tokenizer_class": "DreamTokenizer",
    "unk_token": None,
}


def byte_characters() -> dict[int, str]:
    """GPT-2/Qwen2 byte-level BPE's printable stand-in for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    stand_ins = printable + [256 + index for index in range(len(others))]
    return {byte: chr(code) for byte, code in zip(printable + others, stand_ins, strict=True)}


def dream_text_ids(text: str) -> list[int]:
    """Token ids of plain text under the fixture's byte vocabulary (no merges): its UTF-8 bytes."""
    return list(text.encode("utf-8"))


def dream_names(layers: int) -> list[str]:
    names = ["model.embed_tokens.weight"]
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        names += [prefix + f"self_attn.{p}_proj.{kind}" for p in "qkv" for kind in ("weight", "bias")]
        names += [prefix + "self_attn.o_proj.weight"]
        names += [prefix + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        names += [prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"]
    return [*names, "model.norm.weight", "lm_head.weight"]


def dream_shape(name: str, config: dict[str, Any]) -> tuple[int, ...]:
    hidden, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    rows = {"q_proj": hidden, "k_proj": kv, "v_proj": kv, "o_proj": hidden, "gate_proj": inner, "up_proj": inner}
    if name.endswith("norm.weight"):
        return (hidden,)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (vocab, hidden)
    part = name.split(".")[-2]
    if part == "down_proj":
        return (hidden, inner)
    if name.endswith(".bias"):
        return (rows[part],)
    return (rows[part], hidden)


def write_dream_published(directory: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Dream checkpoint in the published layout; returns its tensors (checkpoint names, bfloat16)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(DREAM_CONFIG, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(DREAM_GENERATION_CONFIG, indent=2))
    characters = byte_characters()
    (directory / "vocab.json").write_text(json.dumps({characters[b]: b for b in range(256)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(DREAM_TOKENIZER_CONFIG, indent=2))
    names = dream_names(DREAM_CONFIG["num_hidden_layers"])
    return write_shards(directory, {name: dream_shape(name, DREAM_CONFIG) for name in names}, seed)


DREAM_GENERATION_CONFIG: dict[str, Any] = {
    "_from_model_config": True,
    "alg": "origin",
    "alg_temp": None,
    "bos_token_id": DREAM_IDS["<|endoftext|>"],
    "eos_token_id": DREAM_IDS["<|endoftext|>"],
    "eps": 0.001,
    "mask_token_id": None,
    "output_history": False,
    "pad_token_id": DREAM_IDS["<|endoftext|>"],
    "steps": 512,
    "temperature": 0.0,
    "top_k": None,
    "top_p": None,
    "transformers_version": "4.46.2",
}

# --------------------------------------------------------------------------- LLaDA

WORDS = ["the", "cat", "sat", "on", "a", "mat", "fill", "in", "blanks", "of", "document", "user", "assistant"]
LLADA_SPECIALS = [
    "<|startoftext|>",  # 126080
    "<|endoftext|>",  # 126081
    "<|mdm_mask|>",  # 126336
    "<|start_header_id|>",  # 126346
    "<|end_header_id|>",  # 126347
    "<|eot_id|>",  # 126348
]
LLADA_IDS = {token: 1 + len(WORDS) + index for index, token in enumerate(LLADA_SPECIALS)}  # after [UNK] + words
LLADA_WORD_IDS = {word: 1 + index for index, word in enumerate(WORDS)}
LLADA_VOCAB = 32  # embedding_size == vocab_size, padded past the tokenizer, as 126464 > 126349
# Published: d_model 4096, 32 heads and 32 kv heads, 32 layers, mlp_hidden_size 12288.
LLADA_CONFIG: dict[str, Any] = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 32,
    "embedding_dropout": 0.0,
    "embedding_size": LLADA_VOCAB,
    "eos_token_id": LLADA_IDS["<|endoftext|>"],  # 126081
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": LLADA_IDS["<|mdm_mask|>"],  # 126336
    "max_sequence_length": 4096,
    "mlp_hidden_size": 96,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 4,
    "n_kv_heads": 4,
    "n_layers": 2,
    "pad_token_id": LLADA_IDS["<|endoftext|>"],  # 126081
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "transformers_version": "4.46.3",
    "use_cache": False,
    "vocab_size": LLADA_VOCAB,
    "weight_tying": False,
}
# LLaDA's template: Llama 3's first one, which appends the assistant header whatever add_generation_prompt says.
LLADA_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)
LLADA_TOKENIZER_CONFIG: dict[str, Any] = {
    "added_tokens_decoder": {
        str(index): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token, index in LLADA_IDS.items()
    },
    "bos_token": "<|startoftext|>",
    "chat_template": LLADA_TEMPLATE,
    "clean_up_tokenization_spaces": False,
    "eos_token": "<|endoftext|>",
    "model_max_length": 1000000000000000019884624838656,
    "tokenizer_class": "PreTrainedTokenizerFast",
}
_LLADA_PARTS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out", "attn_norm", "ff_norm")


def llada_names(layers: int) -> list[str]:
    names = ["model.transformer.wte.weight"]
    for layer in range(layers):
        names += [f"model.transformer.blocks.{layer}.{part}.weight" for part in _LLADA_PARTS]
    return [*names, "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"]


def llada_shape(name: str, config: dict[str, Any]) -> tuple[int, ...]:
    hidden, inner, vocab = config["d_model"], config["mlp_hidden_size"], config["embedding_size"]
    kv = config["n_kv_heads"] * hidden // config["n_heads"]
    if name in ("model.transformer.wte.weight", "model.transformer.ff_out.weight"):
        return (vocab, hidden)
    part = name.split(".")[-2]
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "attn_out": (hidden, hidden),
        "ff_proj": (inner, hidden),
        "up_proj": (inner, hidden),
        "ff_out": (hidden, inner),
    }
    return shapes.get(part, (hidden,))


def llada_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, **LLADA_WORD_IDS, **LLADA_IDS}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in LLADA_SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def write_llada_published(directory: Path, seed: int = 1) -> dict[str, torch.Tensor]:
    """A LLaDA checkpoint in the published layout; returns its tensors (checkpoint names, bfloat16)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(LLADA_CONFIG, indent=2))
    llada_tokenizer().save_pretrained(str(directory))
    (directory / "tokenizer_config.json").write_text(json.dumps(LLADA_TOKENIZER_CONFIG, indent=2))
    names = llada_names(LLADA_CONFIG["n_layers"])
    return write_shards(directory, {name: llada_shape(name, LLADA_CONFIG) for name in names}, seed)


# --------------------------------------------------------------------------- weights


def write_shards(directory: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random bfloat16 tensors (norm scales near 1) in two shards plus model.safetensors.index.json."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        value = 1.0 + 0.1 * noise if "norm" in name or name.endswith("ln_f.weight") else 0.2 * noise
        tensors[name] = value.to(torch.bfloat16)
    names = list(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2]}
    halves["model-00002-of-00002.safetensors"] = names[len(names) // 2 :]
    weight_map: dict[str, str] = {}
    for file, part in halves.items():
        save_file({name: tensors[name] for name in part}, str(directory / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return tensors


def edit_config(directory: Path, **changes: Any) -> None:
    """Set (or, with the value `DELETE`, remove) keys of a written checkpoint's config.json."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


DELETE = object()
