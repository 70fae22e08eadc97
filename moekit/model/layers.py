"""Transformer building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP.

Shape legend: B batch, T sequence, D model dim, H query heads, G kv heads, Dh head dim, F FFN dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019), computed in float32 for stability under bf16."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_frequencies(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [..., T, Dh] for integer ``positions`` [..., T] (RoFormer, Su et al. 2021).

    Uses the "rotate half" layout of Llama/Mixtral checkpoints (pairs are (i, i + Dh/2)).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # [..., T, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)  # [..., T, Dh]
    return angles.cos(), angles.sin()


def apply_rope(x_BHTDh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """Rotate q or k by position. cos/sin: [T, Dh] or [B, T, Dh].

    ``interleave``: rotary pairs are (x0, x1), (x2, x3), ... (DeepSeek's layout); the result is laid
    out as [evens rotated, odds rotated], exactly as transformers' ``apply_rotary_pos_emb_interleave``
    (attention scores are unchanged by that fixed permutation as long as q and k share it).
    """
    if cos.dim() == 3:  # per-batch positions -> broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    if interleave:
        half = cos.shape[-1] // 2
        c, s_ = cos[..., :half].to(x_BHTDh.dtype), sin[..., :half].to(x_BHTDh.dtype)
        x1, x2 = x_BHTDh[..., 0::2], x_BHTDh[..., 1::2]
        return torch.cat([x1 * c - x2 * s_, x2 * c + x1 * s_], dim=-1)
    half = x_BHTDh.shape[-1] // 2
    x1, x2 = x_BHTDh[..., :half], x_BHTDh[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    # In the activations' dtype, as Llama/Mixtral reference code does (cos/sin are exact in float32).
    return x_BHTDh * cos.to(x_BHTDh.dtype) + rotated * sin.to(x_BHTDh.dtype)


class KVCache(nn.Module):
    """Preallocated key/value cache for one attention layer: k [B, G, T_max, Dh], v [B, G, T_max, Dv]."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None, v_head_dim: int | None = None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        v_shape = (batch, n_kv_heads, max_len, v_head_dim or head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(v_shape, dtype=dtype, device=device), persistent=False)
        self.length = 0

    def update(self, k_BGTDh: torch.Tensor, v_BGTDh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values; return all keys/values seen so far."""
        t = k_BGTDh.shape[2]
        if self.length + t > self.k.shape[2]:
            raise ValueError(f"KV cache full: {self.length} + {t} tokens > max_len {self.k.shape[2]}")
        self.k[:, :, self.length:self.length + t] = k_BGTDh
        self.v[:, :, self.length:self.length + t] = v_BGTDh
        self.length += t
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention on ``scaled_dot_product_attention``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":  # Qwen3: RMSNorm over each head's Dh
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        elif cfg.qk_norm == "full":  # OLMoE: RMSNorm over the whole projection
            self.q_norm = RMSNorm(cfg.n_heads * cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.n_kv_heads * cfg.head_dim, cfg.norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHTDh = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k_BGTDh = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BGTDh = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q_BHTDh, k_BGTDh = self.q_norm(q_BHTDh), self.k_norm(k_BGTDh)
        q_BHTDh, k_BGTDh = apply_rope(q_BHTDh, cos, sin), apply_rope(k_BGTDh, cos, sin)
        if cache is not None:
            k_BGTDh, v_BGTDh = cache.update(k_BGTDh, v_BGTDh)
        # mask None means plain causal attention over T == S (the fast training path).
        # NOTE: on CPU, torch's flash-attention kernel is faster in float32 than in bfloat16 (fwd+bwd
        # 13.3 vs 16.7 ms for [8, 8, 256, 32], torch 2.13), so _sdpa computes it in float32 there.
        y = _sdpa(q_BHTDh, k_BGTDh, v_BGTDh, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def _sdpa(q_BHTD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor, mask: torch.Tensor | None,
          scale: float | None = None) -> torch.Tensor:
    """Causal scaled dot-product attention; float32 on CPU even under bf16 (see Attention.forward)."""
    T, G, H = q_BHTD.shape[2], k_BGSD.shape[1], q_BHTD.shape[1]
    dtype = q_BHTD.dtype
    if q_BHTD.device.type == "cpu" and dtype == torch.bfloat16:
        q_BHTD, k_BGSD, v_BGSD = q_BHTD.float(), k_BGSD.float(), v_BGSD.float()
    with torch.autocast(q_BHTD.device.type, enabled=False):
        y = F.scaled_dot_product_attention(q_BHTD, k_BGSD, v_BGSD, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=G != H, scale=scale)
    return y.to(dtype)


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 sec. 2.1, used by DeepSeek-V3).

    Keys and values come from one compressed latent of width ``kv_lora_rank`` per token (plus a single
    rotary key head of width ``qk_rope_head_dim`` shared by all heads); queries optionally through a
    low-rank ``q_lora_rank`` bottleneck. Weight names follow transformers' DeepseekV3Attention.
    NOTE: the cache holds the expanded keys and values (simple, exact), not the latent.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.n_heads
        self.n_heads, self.nope, self.rope, self.v_dim = H, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank, self.interleave = cfg.kv_lora_rank, cfg.rope_interleave
        qk = self.nope + self.rope
        self.scale = qk ** -0.5
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.dim, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, self.kv_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, cfg.dim, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTQ, k_BHTQ, v_BHTV = self.project(x_BTD, cos, sin)
        if cache is not None:
            k_BHTQ, v_BHTV = cache.update(k_BHTQ, v_BHTV)
        y = _sdpa(q_BHTQ, k_BHTQ, v_BHTV.contiguous(), mask, self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))

    def project(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated queries and expanded keys [B, H, T, nope + rope], values [B, H, T, Dv]."""
        B, T, _ = x_BTD.shape
        H = self.n_heads
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BHTQ = q.view(B, T, H, self.nope + self.rope).transpose(1, 2)
        q_nope, q_rot = q_BHTQ.split([self.nope, self.rope], dim=-1)
        kv_nope_BTR, k_rot_BTr = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_nope_BTR)).view(B, T, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v_BHTV = kv.split([self.nope, self.v_dim], dim=-1)
        q_rot = apply_rope(q_rot, cos, sin, self.interleave)
        k_rot_B1Tr = apply_rope(k_rot_BTr[:, None], cos, sin, self.interleave)
        q_BHTQ = torch.cat([q_nope, q_rot], dim=-1)
        k_BHTQ = torch.cat([k_nope, k_rot_B1Tr.expand(B, H, T, self.rope)], dim=-1)
        return q_BHTQ, k_BHTQ, v_BHTV


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
