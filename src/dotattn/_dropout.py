"""The dropout pattern every engine shares.

Whether entry (row bh, query i, key j) of the attention weights is kept depends only
on (seed, bh, i, j) through a counter-based hash, never on the order in which tiles
are visited. So the backward pass regenerates the forward's pattern, and engines with
different tile sizes drop the same entries. The pattern differs from torch's, which
draws from its generator's stream.

The hash is lowbias32 (Chris Wellons' integer hash) on uint32 values held in int64
tensors; multiplications are split in 16-bit halves so no int64 product overflows.
A GPU kernel can compute the same bits with native uint32 arithmetic.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32, without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: a bijective hash of uint32 values (held in int64)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def draw_seed(generator: torch.Generator | None) -> int:
    """One 31-bit seed from ``generator`` (torch's default generator when None)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))


def keep_mask(
    seed: int, p: float, bh: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Which weights survive dropout with probability ``p``.

    bh:   (..., 1, 1) int64 flat (batch x head) index of each output row block
    rows: (Lq', 1) int64 global query positions
    cols: (Lk',) int64 global key positions
    returns bool (..., Lq', Lk'): True where the weight is kept
    """
    row_key = mix32(mix32(bh ^ seed) ^ mix32(rows))  # (..., Lq', 1)
    u = mix32(row_key ^ cols)  # (..., Lq', Lk'), uniform on [0, 2**32)
    return u >= int(round(p * 2**32))
