"""One transformer layer of ours against from-scratch re-implementations of each reference's math,
written here from the published modelling code's description (no code of theirs is imported):

- LLaDA (modeling_llada.py, `LLaDALlamaBlock`, OLMo style): RMS norms in float32 cast back before the
  scale; q/k/v without bias; rotary embeddings computed *and applied* in float32 when
  `rope_full_precision` (q and k cast up, rotated, cast back); attention over every position (no
  mask, not causal); x + ff_out(silu(ff_proj(h)) * up_proj(h)).
- Dream (modeling_dream.py, Qwen2's decoder layer): the same norms; q/k/v with bias, o_proj without;
  cos/sin computed in float32 and cast to the model dtype, the rotation applied in the model dtype;
  grouped queries (7 query heads per key/value head, as Dream-7B's 28 over 4); non-causal attention.

Each in float32 (tight) and bfloat16 (within bfloat16 rounding), unfused and with the fused
projections the server uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from editor.models.transformer import Block, TransformerConfig, rotary_tables


@dataclass
class Weights:
    """A layer's weights under the reference's names (LLaDA's; Dream's map one to one)."""

    attn_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    attn_out: torch.Tensor
    ff_norm: torch.Tensor
    ff_proj: torch.Tensor  # the gate
    up_proj: torch.Tensor
    ff_out: torch.Tensor


def weights_of(block: Block) -> Weights:
    attention, mlp = block.self_attn, block.mlp
    return Weights(
        attn_norm=block.input_layernorm.weight.detach(),
        q=attention.q_proj.weight.detach(),
        k=attention.k_proj.weight.detach(),
        v=attention.v_proj.weight.detach(),
        q_bias=None if attention.q_proj.bias is None else attention.q_proj.bias.detach(),
        k_bias=None if attention.k_proj.bias is None else attention.k_proj.bias.detach(),
        v_bias=None if attention.v_proj.bias is None else attention.v_proj.bias.detach(),
        attn_out=attention.o_proj.weight.detach(),
        ff_norm=block.post_attention_layernorm.weight.detach(),
        ff_proj=mlp.gate_proj.weight.detach(),
        up_proj=mlp.up_proj.weight.detach(),
        ff_out=mlp.down_proj.weight.detach(),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Variance in float32, normalised, cast back to x's dtype, then scaled (LLaDA's RMSLayerNorm, Qwen2's)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = x @ weight.T
    return out if bias is None else out + bias


def rope_angles(length: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D] in float32: positions x inverse frequencies, duplicated over both halves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, T, D] -> [B, T, H*D]: every query sees every key (no mask)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
    batch, heads, length, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)


def heads(t: torch.Tensor, count: int) -> torch.Tensor:
    batch, length, width = t.shape
    return t.view(batch, length, count, width // count).transpose(1, 2)  # [B, count, T, D]


def llada_block(x: torch.Tensor, w: Weights, config: TransformerConfig) -> torch.Tensor:
    """LLaDALlamaBlock.forward with rope_full_precision, as the reference computes it."""
    h = rms_norm(x, w.attn_norm, config.rms_norm_eps)
    q, k = heads(linear(h, w.q), config.num_heads), heads(linear(h, w.k), config.num_kv_heads)
    v = heads(linear(h, w.v), config.num_kv_heads)
    cos, sin = rope_angles(x.shape[1], config.head_dim, config.rope_theta)
    q32, k32 = q.float(), k.float()  # rope_full_precision: rotate in float32, cast back once
    q = (q32 * cos + rotate_half(q32) * sin).to(q.dtype)
    k = (k32 * cos + rotate_half(k32) * sin).to(k.dtype)
    x = x + linear(attention(q, k, v), w.attn_out)
    h = rms_norm(x, w.ff_norm, config.rms_norm_eps)
    return x + linear(F.silu(linear(h, w.ff_proj)) * linear(h, w.up_proj), w.ff_out)


def dream_layer(x: torch.Tensor, w: Weights, config: TransformerConfig) -> torch.Tensor:
    """Qwen2DecoderLayer.forward, non-causal (Dream), as the reference computes it."""
    h = rms_norm(x, w.attn_norm, config.rms_norm_eps)
    q = heads(linear(h, w.q, w.q_bias), config.num_heads)
    k = heads(linear(h, w.k, w.k_bias), config.num_kv_heads)
    v = heads(linear(h, w.v, w.v_bias), config.num_kv_heads)
    cos, sin = rope_angles(x.shape[1], config.head_dim, config.rope_theta)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # tables cast to the model dtype, rotation in it
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    x = x + linear(attention(q, k, v), w.attn_out)
    h = rms_norm(x, w.ff_norm, config.rms_norm_eps)
    return x + linear(F.silu(linear(h, w.ff_proj)) * linear(h, w.up_proj), w.ff_out)


LLADA = TransformerConfig(  # LLaDA-8B's shape of attention: as many kv heads as query heads
    vocab_size=8,
    hidden_size=64,
    num_layers=1,
    num_heads=4,
    num_kv_heads=4,
    intermediate_size=96,
    rope_theta=500_000.0,
    rms_norm_eps=1e-5,
    rope_full_precision=True,
)
DREAM = TransformerConfig(  # Dream-7B's grouping: 7 query heads share each key/value head
    vocab_size=8,
    hidden_size=112,
    num_layers=1,
    num_heads=14,
    num_kv_heads=2,
    intermediate_size=160,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    qkv_bias=True,
)
# float32: the same numbers up to summation order. bfloat16: each op rounds, in a different order in
# the two, so what must hold is that ours is as close to the exact result (float64) as the
# reference's own bfloat16 run is (measured: mean error 0.0076 against 0.0089 for LLaDA, 0.026
# against 0.039 for Dream, with |x| up to 7 and 15).
FLOAT32_TOLERANCE = 2e-5


def to_float64(weights: Weights) -> Weights:
    return Weights(**{name: None if value is None else value.double() for name, value in vars(weights).items()})  # type: ignore[arg-type]


def random_block(config: TransformerConfig, dtype: torch.dtype, seed: int) -> Block:
    generator = torch.Generator().manual_seed(seed)
    block = Block(config)
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)
    return block.to(dtype).eval()


def ours(block: Block, x: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    positions = torch.arange(x.shape[1])[None]
    rotary_dtype = torch.float32 if config.rope_full_precision else x.dtype
    cos, sin = rotary_tables(positions, config.head_dim, config.rope_theta, rotary_dtype)
    with torch.no_grad():
        out, _ = block(x, cos, sin, None, None)
    return out


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("config", "reference"), [(LLADA, llada_block), (DREAM, dream_layer)], ids=["llada", "dream"])
def test_a_layer_matches_the_reference_math(
    config: TransformerConfig,
    reference: Callable[[torch.Tensor, Weights, TransformerConfig], torch.Tensor],
    dtype: torch.dtype,
    fused: bool,
) -> None:
    block = random_block(config, dtype, seed=3)
    weights = weights_of(block)
    x = torch.randn(2, 40, config.hidden_size, generator=torch.Generator().manual_seed(4)).to(dtype)
    expected = reference(x, weights, config)
    if fused:
        block.self_attn.fuse()
        block.mlp.fuse()
    got = ours(block, x, config)
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=FLOAT32_TOLERANCE, rtol=FLOAT32_TOLERANCE)
    exact = reference(x.double(), to_float64(weights), config)
    our_error, their_error = (got.double() - exact).abs(), (expected.double() - exact).abs()
    assert our_error.mean() <= 1.25 * their_error.mean() + 1e-6
    assert our_error.max() <= 1.25 * their_error.max() + 1e-5
    # Not vacuous: the attention and MLP moved the residual stream far beyond the differences.
    assert (exact - x.double()).abs().mean() > 20 * max(float(their_error.mean()), 1e-5)


def test_llada_s_float32_rotation_is_what_the_tolerance_would_miss_in_bfloat16() -> None:
    """Rotating in bfloat16 instead (rope_full_precision off) lands further from the reference than
    the float32 rotation does, on long positions where bfloat16 rounds the angles' products."""
    block = random_block(LLADA, torch.bfloat16, seed=5)
    weights = weights_of(block)
    x = torch.randn(1, 512, LLADA.hidden_size, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    expected = llada_block(x, weights, LLADA).float()
    full = (ours(block, x, LLADA).float() - expected).abs().mean()
    half_config = TransformerConfig.from_dict({**LLADA.to_dict(), "rope_full_precision": False})
    half = (ours(block, x, half_config).float() - expected).abs().mean()
    assert full < half
