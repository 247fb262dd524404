"""Transformer blocks built from plain nn.Linear layers (so sparsify can swap every projection).

``DecoderBlock``: LLaMA-shaped (RMSNorm, rotary-free causal self-attention with q/k/v/o projections,
SwiGLU MLP gate/up/down). ``EncoderLayer``: BERT-shaped (post-LayerNorm, GELU MLP). Random init; these
exist for benchmarks, tests and the demo, not for loading pretrained weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool, bias: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads, self.head_dim, self.causal = heads, dim // heads, causal
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        b, t, _ = x.shape
        # -1 heads: a channel-slimmed copy has fewer heads of the same size (``heads`` is kept in step).
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and t > 1)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class DecoderBlock(nn.Module):
    """LLaMA-shaped block: ``x + attn(norm(x))`` then ``x + down(silu(gate(x)) * up(x))``. (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int = 4096, hidden: int = 11008, heads: int = 32) -> None:
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.attn = SelfAttention(dim, heads, causal=True)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class EncoderLayer(nn.Module):
    """BERT-shaped post-LN layer. (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int = 768, hidden: int = 3072, heads: int = 12) -> None:
        super().__init__()
        self.attn = SelfAttention(dim, heads, causal=False, bias=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.fc2(F.gelu(self.fc1(x))))


def encoder(layers: int = 2, dim: int = 384, hidden: int = 1536, heads: int = 12) -> nn.Sequential:
    """A MiniLM/BERT-style stack of ``layers`` encoder layers."""
    return nn.Sequential(*[EncoderLayer(dim, hidden, heads) for _ in range(layers)])
