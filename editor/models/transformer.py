"""A compact bidirectional transformer of the Qwen2/LLaMA family.

RMSNorm, rotary positions, SwiGLU, grouped-query attention, optional q/k/v bias, and non-causal
attention through `scaled_dot_product_attention`. Parameter names follow Qwen2's layout, so Dream
checkpoints load by dropping the `model.` prefix and LLaDA checkpoints by renaming keys.

The forward pass can run a window of positions against cached keys/values of the rest of the
canvas (`past` + `return_kv`), which is what a block-cached sampler needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TransformerConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False
    max_positions: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> TransformerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})  # type: ignore[arg-type]


KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [B, H_kv, L, D] each


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as Qwen2/LLaMA do, then return to the input dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> KV:
    """positions [B, L] -> cos, sin [B, 1, L, D] in the "rotate half" layout of Qwen2/LLaMA."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # [B, L, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [B, L, D]
    return angles.cos()[:, None].to(dtype), angles.sin()[:, None].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [B, W, C]
        cos: torch.Tensor,  # [B, 1, W, D]
        sin: torch.Tensor,
        key_mask: torch.Tensor,  # [B, 1, 1, K] bool, True = attend; K = cached + W
        past: KV | None,
    ) -> tuple[torch.Tensor, KV]:
        batch, width, _ = x.shape
        q = self.q_proj(x).view(batch, width, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, W, D]
        k = self.k_proj(x).view(batch, width, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, W, D]
        v = self.v_proj(x).view(batch, width, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        new_kv = (k, v)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # [B, Hkv, K, D]
            v = torch.cat([past[1], v], dim=2)
        if self.num_kv_heads != self.num_heads:
            repeat = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(repeat, dim=1)  # [B, H, K, D]
            v = v.repeat_interleave(repeat, dim=1)
        # Non-causal: every position sees the whole canvas except padding.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # [B, H, W, D]
        out = out.transpose(1, 2).reshape(batch, width, self.num_heads * self.head_dim)
        return self.o_proj(out), new_kv


class SwiGLU(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor, past: KV | None
    ) -> tuple[torch.Tensor, KV]:
        attended, kv = self.self_attn(self.input_layernorm(x), cos, sin, key_mask, past)
        x = x + attended
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class BidirectionalTransformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, W]
        attention_mask: torch.Tensor | None = None,  # [B, K] bool over cached + window keys
        position_ids: torch.Tensor | None = None,  # [B, W]
        past: list[KV] | None = None,  # per layer, [B, Hkv, K - W, D]
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[KV]]:
        """Logits [B, W, V] for the window; with `return_kv`, also each layer's keys/values of the
        window, so a caller can cache them and later run a smaller window against them."""
        batch, width = input_ids.shape
        cached = 0 if past is None else past[0][0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(cached, cached + width, device=input_ids.device).expand(batch, width)
        if attention_mask is None:
            attention_mask = torch.ones(batch, cached + width, dtype=torch.bool, device=input_ids.device)
        key_mask = attention_mask[:, None, None, :]  # [B, 1, 1, K]
        x = self.embed_tokens(input_ids)  # [B, W, C]
        cos, sin = rotary_tables(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        window_kv: list[KV] = []
        for index, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, key_mask, None if past is None else past[index])
            window_kv.append(kv)
        logits = self.lm_head(self.norm(x))  # [B, W, V]
        return (logits, window_kv) if return_kv else logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
