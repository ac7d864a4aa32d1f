"""Rotary position embeddings (RoPE), the rotate-half convention of GPT-NeoX and Llama.

Shape legend: B batch, H heads, L length, E head dim, R rotated dims (R <= E, even).
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotates the first ``dim`` features of each head by position-dependent angles.

    Feature pair (c, c + dim/2) of the token at position p turns by p · base^(-2c/dim),
    so the score between positions p and p' depends on p - p' only. Features past
    ``dim`` pass through unchanged (partial rotary, as in GPT-NeoX).
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise ValueError(f"RotaryEmbedding: dim must be a positive even int, got {dim!r}")
        self.dim = dim
        self.base = base
        self.register_buffer("inv_freq", base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim), persistent=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, L, E) with E >= dim; positions: (L,) or (B, L) ints. Returns x's shape and dtype."""
        if x.shape[-1] < self.dim:
            raise ValueError(f"RotaryEmbedding: head dim {x.shape[-1]} is smaller than the rotated dim {self.dim}; "
                             "build it with dim <= head_dim")
        # angles in float64 then cos/sin in x's compute precision: positions up to 2^20 stay exact
        angles = positions.to(torch.float64)[..., None] * self.inv_freq.to(x.device)  # (.., L, R/2)
        if angles.dim() == 3:
            angles = angles[:, None]  # (B, 1, L, R/2): one set per batch row, shared by the heads
        dtype = torch.promote_types(x.dtype, torch.float32)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        half = self.dim // 2
        x1, x2, rest = x[..., :half].to(dtype), x[..., half: self.dim].to(dtype), x[..., self.dim:]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated
