"""``alibi``: the ALiBi bias (Press et al., "Train Short, Test Long"), slope_h · (j - i), as structure.

ALiBi adds a per-head penalty linear in the query-key distance. As a float tensor that bias
is (H, Lq, Lk), 512 MiB in float32 at 8 heads and L 4096, read every tile; as this mask it
is H slopes. The tiled engine's compiled kernel computes slope_h · (j - i - off) in each
tile from them; every other engine takes its tiles from ``tile``, the same values.
``align`` places the diagonal as for ``causal`` ("bottom_right": off = Lk - Lq, for a KV
cache). The bias is 0 on the diagonal and slope_h · (j - i - off) elsewhere, negative for
earlier keys: AND it with ``causal`` for causal ALiBi. The slopes get no gradient (learned
slopes: ``score_mod=``).

Shape legend: H heads; lead_shape is (H,), the scores' head dim.
"""

from __future__ import annotations

import torch

from dotattn.masks.base import PARTIAL, Mask, _cdiv, _placeholder, _summary
from dotattn.masks.positional import _align_offset, _check_align


class ALiBi(Mask):
    """slope_h · (j - i - off) added to the scores of head h; see the module docstring."""

    is_additive = True

    def __init__(self, slopes: torch.Tensor | list[float], *, align: str = "top_left") -> None:
        slopes = torch.as_tensor(slopes)
        if slopes.dim() != 1 or not slopes.is_floating_point():
            raise ValueError(f"alibi: slopes must be a 1-D float tensor, one slope per head, got "
                             f"{slopes.dtype} of shape {tuple(slopes.shape)}")
        if slopes.requires_grad:
            raise ValueError("alibi: the slopes get no gradient here; for learned slopes pass "
                             "score_mod=lambda s, b, h, i, j: s + slopes[h] * (j - i)")
        self.slopes = slopes
        self.align = _check_align(align, "alibi")

    def __repr__(self) -> str:
        align = "" if self.align == "top_left" else f", align={self.align!r}"
        return f"alibi({_summary(self.slopes)}{align})"

    def spec(self, tensors: list[torch.Tensor]) -> str:
        return f"masks.alibi({_placeholder(self.slopes, tensors)}, align={self.align!r})"

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return (self.slopes.shape[0],)

    @property
    def _device(self) -> torch.device | None:
        return self.slopes.device

    def offset(self, Lq: int, Lk: int) -> int:
        """off in slope_h · (j - i - off): the diagonal's key for query 0."""
        return _align_offset(self.align, Lq, Lk)

    def _tile(self, Lq, Lk, q0, q1, k0, k1, device):
        i = torch.arange(q0, q1, device=device)[:, None] + self.offset(Lq, Lk)
        j = torch.arange(k0, k1, device=device)
        return self.slopes.to(device)[:, None, None] * (j - i)

    def _block_map(self, Lq, Lk, block_q, block_k, device):
        # a bias is added on every tile: none is FULL, none EMPTY
        shape = (*self.lead_shape, _cdiv(Lq, block_q), _cdiv(Lk, block_k))
        return torch.full(shape, PARTIAL, dtype=torch.int8, device=device)


def alibi(slopes: torch.Tensor | list[float], *, align: str = "top_left") -> ALiBi:
    """The ALiBi bias slope_h · (j - i - off), slopes (H,) one per head (typically 2^(-8h/H),
    h = 1..H); off as for ``causal(align)``. AND it with ``causal()`` for causal ALiBi."""
    return ALiBi(slopes, align=align)
