"""Merging partial softmaxes by their log-sum-exp.

Attention over a set of keys cut into disjoint parts equals the parts' outputs weighted by
exp(lse_part - lse_all): the split-K engine merges its key parts this way, and ring
attention the blocks that arrive from other ranks.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def merge_parts(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S partial softmaxes over disjoint key sets by their lse.

    out: (S, ..., Ev), lse: (S, ...), float32 or float64; a part whose row saw no key has
    lse -inf (and output 0). Returns out (..., Ev) and lse (...): 0 and -inf for a row that
    no part saw, never NaN.
    """
    if out.shape[0] == 1:
        return out[0], lse[0]
    m = lse.amax(0)
    m_safe = torch.where(m == _NEG_INF, 0.0, m)
    w = torch.exp(lse - m_safe)  # (S, ...): 0 for a part that saw nothing
    total = w.sum(0)
    alive = total > 0
    merged = (w.unsqueeze(-1) * out).sum(0) / torch.where(alive, total, 1.0).unsqueeze(-1)
    return merged, torch.where(alive, m_safe + torch.log(total), _NEG_INF)
