"""A plain GPT of about ReverieLM's size, the baseline that throughput is compared against.

nanoGPT's recipe: pre-norm blocks, causal attention through SDPA (flash on GPU), GELU MLP,
tied byte embedding. Used only by benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GPTBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm, self.mlp_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.up, self.down = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)
                   for t in self.qkv(self.attn_norm(x)).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).flatten(-2))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class GPT(nn.Module):
    def __init__(self, n_layers: int = 12, d_model: int = 768, n_heads: int = 12, max_len: int = 2048) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(GPTBlock(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.n_layers, self.d_model = n_layers, d_model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.norm(x), self.embed.weight)

    def flops_per_token(self, seq_len: int) -> float:
        """6N for the weights plus causal attention scores and values (nanoGPT's estimate)."""
        n = sum(p.numel() for p in self.parameters()) - self.pos.weight.numel()
        return 6 * n + 6 * self.n_layers * self.d_model * seq_len
