"""Quantized weights (`EDITOR_QUANTIZE`, docs/engine.md "Quantized weights") through torchao.

- `int8`: weight-only int8, one scale per output channel (torchao's `Int8WeightOnlyConfig`); the
  activations stay in the model's dtype. Halves the bytes a bf16 step reads; any device.
- `fp8`: float8 (e4m3) weights with one scale per output channel and activations cast to float8
  per row at each call (torchao's `Float8DynamicActivationFloat8WeightConfig`), so the matrix
  products run on the tensor cores' FP8 path. Needs a GPU of compute capability 8.9 or newer
  (Ada, Hopper) and bfloat16 weights.

Only the linear layers of the transformer blocks are quantized: the embedding is a gather (its
bytes are read a row at a time) and the output head scores every vocabulary entry, where the
rounding would move the confidences the sampler ranks by. Quantize after loading and fusing, and
before CUDA graphs are captured (graphs hold the weights' addresses).

torchao is an optional dependency (`pip install 'dllm-editor[quantize]'`), imported only here and
only when a model is quantized.
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

import torch
from torch import nn

Quantize = Literal["none", "int8", "fp8"]
QUANTIZE_CHOICES: tuple[str, ...] = get_args(Quantize)
FP8_CAPABILITY = (8, 9)  # float8 matrix products: Ada (8.9) and Hopper (9.0) and newer


class QuantizeError(ValueError):
    """A quantization the model, device or installation cannot run."""


def check_quantize(mode: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Refuse what cannot run, before any weight is touched: an unknown mode, torchao missing,
    `fp8` off a GPU with float8 matrix products or on weights other than bfloat16."""
    if mode not in QUANTIZE_CHOICES:
        raise QuantizeError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, not {mode!r}")
    if mode == "none":
        return
    _torchao()
    if mode == "fp8":
        where = torch.device(device)
        if where.type != "cuda" or not torch.cuda.is_available():
            raise QuantizeError(
                f"quantize=fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper); the model "
                f"is on {where}. Use quantize=int8 or none here"
            )
        capability = torch.cuda.get_device_capability(where)
        if capability < FP8_CAPABILITY:
            raise QuantizeError(
                f"quantize=fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                f"{torch.cuda.get_device_name(where)} is {capability[0]}.{capability[1]}. Use quantize=int8 or none"
            )
        if dtype != torch.bfloat16:
            raise QuantizeError(f"quantize=fp8 takes bfloat16 weights, not {str(dtype).removeprefix('torch.')}")


def quantize_linears(module: nn.Module, mode: str, keep: tuple[nn.Module | None, ...] = ()) -> int:
    """Quantize, in place, every `nn.Linear` under `module` but those in `keep` (the output head);
    returns how many were quantized. `mode` 'none' does nothing. Call `check_quantize` first."""
    if mode == "none":
        return 0
    torchao = _torchao()
    config = (
        torchao.Int8WeightOnlyConfig()
        if mode == "int8"
        else torchao.Float8DynamicActivationFloat8WeightConfig(granularity=torchao.PerRow())
    )
    kept = {id(m) for m in keep if m is not None}

    def quantizable(child: nn.Module, name: str) -> bool:  # torchao's filter: (module, qualified name)
        return isinstance(child, nn.Linear) and id(child) not in kept

    chosen = sum(quantizable(child, name) for name, child in module.named_modules())
    torchao.quantize_(module, config, filter_fn=quantizable)
    return chosen


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds in memory; a torchao tensor counts its inner tensors (the int8 or float8
    data and its scales), not the dtype it computes in."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
        return sum(tensor_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)
    return tensor.numel() * tensor.element_size()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers in memory, each shared tensor once (a tied head)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


def _torchao():  # type: ignore[no-untyped-def]  # torchao ships no type information
    try:
        # torchao logs each optional C++ extension it finds no kernels for (on the CPU: all of them).
        logging.getLogger("torchao").setLevel(logging.ERROR)
        import torchao.quantization
    except ImportError as error:
        raise QuantizeError(
            "quantized weights need torchao: pip install 'dllm-editor[quantize]' (or pip install torchao)"
        ) from error
    return torchao.quantization


__all__ = [
    "QUANTIZE_CHOICES",
    "Quantize",
    "QuantizeError",
    "check_quantize",
    "quantize_linears",
    "tensor_bytes",
    "weight_bytes",
]
