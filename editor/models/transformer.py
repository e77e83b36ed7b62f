"""A compact bidirectional transformer of the Qwen2/LLaMA family.

RMSNorm, rotary positions, SwiGLU, grouped-query attention, optional q/k/v bias, and non-causal
attention through `scaled_dot_product_attention`. Parameter names follow Qwen2's layout, so Dream
checkpoints load by dropping the `model.` prefix and LLaDA checkpoints by renaming keys.

The forward pass can run a window of positions against cached keys/values of the rest of the
canvas (`past` + `return_kv`, or `forward_window` over a whole-canvas cache updated in place), which
is what the cached sampler needs; `hidden_at` applies the large output head only where logits are
wanted (docs/engine.md).
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
    # Rotate q and k in float32 whatever the model dtype (LLaDA's `rope_full_precision`); otherwise in
    # the model dtype with float32-computed tables, as Qwen2/Dream and Llama do.
    rope_full_precision: bool = False

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
        # Fused: accumulates in float32 and casts back before the weight, as Qwen2/LLaMA's norm does,
        # without materialising a float32 copy of the activations.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> KV:
    """positions [B, L] -> cos, sin [B, L, 1, D] in the "rotate half" layout of Qwen2/LLaMA, with the
    first half of sin negated: `apply_rotary` then swaps halves with one roll instead of chunk, neg, cat."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # [B, L, D/2]
    sin = angles.sin()
    signed_sin = torch.cat([-sin, sin], dim=-1)  # [B, L, D]
    cos = torch.cat([angles, angles], dim=-1).cos()
    return cos[:, :, None].to(dtype), signed_sin[:, :, None].to(dtype)


# Rows a rotary table starts with: a model's `max_positions` may be 131,072 (Dream), ~70 MB of
# tables and float32 temporaries that no canvas uses; tables grow (doubling) past this when needed.
ROTARY_START_ROWS = 4096


class RotaryCache:
    """cos/sin rows for positions 0..n-1, built once per (device, dtype, n): a forward pass gathers
    rows instead of recomputing angles. `n` starts at min(`length`, ROTARY_START_ROWS) and doubles
    when a longer canvas comes."""

    def __init__(self, head_dim: int, theta: float, length: int) -> None:
        self.head_dim = head_dim
        self.theta = theta
        self.length = min(length, ROTARY_START_ROWS)
        self._tables: dict[tuple[torch.device, torch.dtype], KV] = {}
        # Tables a grown one replaced: a captured CUDA graph may still read them, so they stay alive.
        self._retired: list[KV] = []

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype, limit: int) -> KV:
        """positions [B, W] long, all < `limit` -> cos, signed sin [B, W, 1, D]."""
        key = (positions.device, dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < limit:
            if table is not None:
                self._retired.append(table)
            length = self.length
            while length < limit:
                length *= 2
            cos, sin = rotary_tables(
                torch.arange(length, device=positions.device)[None], self.head_dim, self.theta, dtype
            )
            table = self._tables[key] = (cos[0], sin[0])  # [n, 1, D] each
        return table[0][positions], table[1][positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [B, W, H, D] rotated by its positions' angles (cos, signed sin [B, W, 1, D] from
    `rotary_tables`): x * cos + rotate_half(x) * sin, in three kernels rather than five. Float32
    tables with a lower-precision x rotate in float32 and round once (`rope_full_precision`)."""
    if cos.dtype != x.dtype:
        return apply_rotary(x.to(cos.dtype), cos, signed_sin).to(x.dtype)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


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
        self.qkv_proj: nn.Linear | None = None  # q, k and v in one matrix after `fuse`

    def fuse(self) -> None:
        """One matrix product for q, k and v instead of three (inference only: the parameters
        change names, so a fused network is neither trained nor saved)."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        weight = parts[0].weight
        fused = nn.Linear(
            weight.shape[1],
            sum(p.out_features for p in parts),
            bias=parts[0].bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))  # [(H + 2 Hkv) D, C]
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in parts if p.bias is not None]))
        self.qkv_proj = fused.requires_grad_(False)
        del self.q_proj, self.k_proj, self.v_proj

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, KV]:
        """x [B, W, C] -> q [B, H, W, D] and k, v [B, Hkv, W, D], rotary applied to q and k."""
        batch, width, _ = x.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(batch, width, heads + 2 * kv_heads, self.head_dim)
            qk = apply_rotary(qkv[:, :, : heads + kv_heads], cos, sin)  # q and k rotated together
            q, k, v = qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, heads + kv_heads :]
        else:
            q = apply_rotary(self.q_proj(x).view(batch, width, heads, self.head_dim), cos, sin)
            k = apply_rotary(self.k_proj(x).view(batch, width, kv_heads, self.head_dim), cos, sin)
            v = self.v_proj(x).view(batch, width, kv_heads, self.head_dim)
        return q.transpose(1, 2), (k.transpose(1, 2), v.transpose(1, 2))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, causal: bool = False
    ) -> torch.Tensor:
        """q [B, H, W, D], k/v [B, Hkv, K, D], key_mask [B, 1, 1, K] or None -> [B, W, C]. Non-causal:
        every position sees the whole canvas except padding; with no padding there is no mask, so
        SDPA may pick its fused kernels, and grouped-query heads are shared inside it, not copied.
        `causal` (no key_mask: right padding is never seen from the left) is the left-to-right
        attention of the base model an adapter started from (editor.judging)."""
        batch, _, width, _ = q.shape
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, is_causal=causal, enable_gqa=self.num_kv_heads != self.num_heads
        )  # [B, H, W, D]
        return self.o_proj(out.transpose(1, 2).reshape(batch, width, self.num_heads * self.head_dim))

    def forward(
        self,
        x: torch.Tensor,  # [B, W, C]
        cos: torch.Tensor,  # [B, W, 1, D]
        sin: torch.Tensor,  # [B, W, 1, D], first half negated (`rotary_tables`)
        key_mask: torch.Tensor | None,  # [B, 1, 1, K] bool, True = attend; K = cached + W; None = all
        past: KV | None,
        causal: bool = False,
    ) -> tuple[torch.Tensor, KV]:
        q, (k, v) = self.project(x, cos, sin)
        new_kv = (k, v)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # [B, Hkv, K, D]
            v = torch.cat([past[1], v], dim=2)
        return self.attend(q, k, v, key_mask, causal), new_kv

    def forward_cached(
        self,
        x: torch.Tensor,  # [B, W, C]
        cos: torch.Tensor,  # [B, W, 1, D]
        sin: torch.Tensor,  # [B, W, 1, D], first half negated (`rotary_tables`)
        key_mask: torch.Tensor | None,  # [B, 1, 1, L]
        cache: KV,  # [B, Hkv, L, D] each over the whole canvas; the window's rows are overwritten
        window: torch.Tensor,  # [B, W] canvas positions of x's rows
    ) -> torch.Tensor:
        q, (k, v) = self.project(x, cos, sin)
        index = window[:, None, :, None].expand(-1, self.num_kv_heads, -1, self.head_dim)  # [B, Hkv, W, D]
        cache[0].scatter_(2, index, k)
        cache[1].scatter_(2, index, v)
        return self.attend(q, cache[0], cache[1], key_mask)


class SwiGLU(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # gate and up in one matrix after `fuse`

    def fuse(self) -> None:
        """One matrix product for gate and up (inference only, as `Attention.fuse`)."""
        gate, up = self.gate_proj, self.up_proj
        fused = nn.Linear(
            gate.in_features,
            gate.out_features + up.out_features,
            bias=False,
            device=gate.weight.device,
            dtype=gate.weight.dtype,
        )
        with torch.no_grad():
            fused.weight.copy_(torch.cat([gate.weight, up.weight]))  # [2I, C]
        self.gate_up_proj = fused.requires_grad_(False)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [B, W, I] each
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask: torch.Tensor | None,
        past: KV | None,
        causal: bool = False,
    ) -> tuple[torch.Tensor, KV]:
        attended, kv = self.self_attn(self.input_layernorm(x), cos, sin, key_mask, past, causal)
        x = x + attended
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv

    def forward_cached(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask: torch.Tensor | None,
        cache: KV,
        window: torch.Tensor,
    ) -> torch.Tensor:
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, key_mask, cache, window)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        self.rotary = RotaryCache(config.head_dim, config.rope_theta, config.max_positions)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, W]
        attention_mask: torch.Tensor | None = None,  # [B, K] bool over cached + window keys; None = all
        position_ids: torch.Tensor | None = None,  # [B, W]
        past: list[KV] | None = None,  # per layer, [B, Hkv, K - W, D]
        return_kv: bool = False,
        hidden_at: torch.Tensor | None = None,  # [B, M] window indices to score; None = all W
        causal: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[KV]]:
        """Logits [B, W, V] for the window ([B, M, V] with `hidden_at`); with `return_kv`, also each
        layer's keys/values of the window, so a caller can cache them and later run a smaller window
        against them. `causal`: each position sees only those before it (no past, no mask)."""
        if causal and (past is not None or attention_mask is not None):
            raise ValueError("a causal pass takes no past keys/values and no attention mask")
        batch, width = input_ids.shape
        cached = 0 if past is None else past[0][0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(cached, cached + width, device=input_ids.device).expand(batch, width)
        key_mask = None if attention_mask is None else attention_mask[:, None, None, :]  # [B, 1, 1, K]
        x = self.embed_tokens(input_ids)  # [B, W, C]
        cos, sin = self.rotary(position_ids, self.rotary_dtype(x.dtype), cached + width)
        window_kv: list[KV] = []
        for index, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, key_mask, None if past is None else past[index], causal)
            window_kv.append(kv)
        logits = self.head(x, hidden_at)
        return (logits, window_kv) if return_kv else logits

    def forward_window(
        self,
        cache: list[KV],  # per layer [B, Hkv, L, D]: keys/values of the whole canvas, updated in place
        input_ids: torch.Tensor,  # [B, W] the tokens now at the window's positions
        window: torch.Tensor,  # [B, W] canvas positions of the window
        position_ids: torch.Tensor,  # [B, W] rotary positions of the window
        attention_mask: torch.Tensor | None,  # [B, L] bool over the canvas; None = no padding
        hidden_at: torch.Tensor | None = None,  # [B, M] window indices to score; None = all W
        logits: bool = True,
    ) -> torch.Tensor:
        """Logits [B, M, V] of a window of the canvas run against cached keys/values of the rest
        (with `logits=False`: the final-normed hidden states [B, M, C] the head would take). The
        window's own keys/values are recomputed and written into `cache`, so a position that
        leaves the window keeps the keys/values of its last run."""
        length = cache[0][0].shape[2]
        key_mask = None if attention_mask is None else attention_mask[:, None, None, :]
        x = self.embed_tokens(input_ids)  # [B, W, C]
        cos, sin = self.rotary(position_ids, self.rotary_dtype(x.dtype), length)
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            assert isinstance(layer, Block)
            x = layer.forward_cached(x, cos, sin, key_mask, layer_cache, window)
        return self.head(x, hidden_at) if logits else self.normed(x, hidden_at)

    def rotary_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype q and k are rotated in: float32 with `rope_full_precision`, else the model's."""
        return torch.float32 if self.config.rope_full_precision else dtype

    def head(self, x: torch.Tensor, hidden_at: torch.Tensor | None) -> torch.Tensor:
        """Final norm and output head, only at `hidden_at` ([B, M] indices into x's W) when given:
        the head is the largest matrix of a small model and its output the largest tensor."""
        return self.lm_head(self.normed(x, hidden_at))  # [B, M, V]

    def normed(self, x: torch.Tensor, hidden_at: torch.Tensor | None) -> torch.Tensor:
        """The final norm of x [B, W, C] at `hidden_at` ([B, M] indices into W; None = all): [B, M, C]."""
        if hidden_at is not None:
            x = x.gather(1, hidden_at[..., None].expand(-1, -1, x.shape[-1]))  # [B, M, C]
        return self.norm(x)

    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up into one matrix product each (for inference on the GPU, where a
        window's small products run far below the memory bandwidth; docs/engine.md). The
        parameters change names, so fuse only a network that is neither trained nor saved."""
        for layer in self.layers:
            assert isinstance(layer, Block)
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
