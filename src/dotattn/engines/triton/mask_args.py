"""A problem's mask as the kernels read it: row spans, a block-sparse layout, a boolean
rest and a float bias, all ANDed, each with broadcast strides.

Shape legend: Nm in {1, N}, Hm in {1, Hq}, R in {1, Lq}, C in {1, Lk}, nQb/nKb layout blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dotattn import _tiles, masks
from dotattn._inputs import Problem
from dotattn._layout import heads_canonical


def strides(t: torch.Tensor) -> list[int]:
    """Strides with 0 for size-1 dims, so broadcast dims read the same entries."""
    return [0 if size == 1 else stride for size, stride in zip(t.shape, t.stride())]


@dataclass
class MaskParts:
    """A problem's mask split for the kernel (all ANDed); None parts are absent.

    lo, hi:  int32 (Nm, Hm, Lq) row spans
    layout:  uint8 (Nm, Hm, nQb, nKb) a block-sparse layout of layout_blocks (bq, bk)
    allowed: uint8 (Nm, Hm, R, C) may-attend, R in {1, Lq}, C in {1, Lk}
    bias:    (Nm, Hm, R, C) float, differentiable (autograd reaches the user's tensors)
    """

    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    layout: torch.Tensor | None = None
    layout_blocks: tuple[int, int] = (1, 1)
    allowed: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @classmethod
    def of(cls, problem: Problem) -> MaskParts:
        p = problem
        if p.mask is None:
            return cls()
        device = p.device
        spans, rest = _tiles.spans_and_rest(p)
        parts = cls()
        if spans is not None:
            parts.lo, parts.hi = _tiles.row_spans(p, spans, device)
        sparse = next((leaf for leaf in rest if isinstance(leaf, masks.BlockSparse)), None)
        if sparse is not None:  # read one entry per layout block
            rest.remove(sparse)
            parts.layout = heads_canonical(sparse.layout.to(device), p.batch_shape, p.Hq).view(torch.uint8)
            parts.layout_blocks = sparse.block_size
        if rest:
            if len(rest) == 1 and isinstance(rest[0], masks.Dense):  # read in place
                dense = rest[0].tensor.to(device)
            else:
                combined = rest[0] if len(rest) == 1 else masks.And(*rest)
                dense = combined.to_dense(p.Lq, p.Lk, device=device)
            dense = heads_canonical(dense, p.batch_shape, p.Hq)
            if dense.is_floating_point():
                parts.bias = dense
            else:
                parts.allowed = dense.view(torch.uint8) if dense.dtype == torch.bool else dense.to(torch.uint8)
        return parts
