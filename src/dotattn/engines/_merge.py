"""Merging partial softmaxes by their log-sum-exp.

Attention over a set of keys cut into disjoint parts equals the parts' outputs weighted by
exp(lse_part - lse_all): the split-K kernel merges its key parts this way (in C++), and ring
attention the blocks that arrive from other ranks (``merge_into``).
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def merge_into(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Merge a partial softmax over other keys, (out_b, lse_b), into (out, lse), in place.

    out, out_b: (..., Ev), lse, lse_b: (...), float32 or float64 (out and lse may be views);
    a part whose row saw no key has lse -inf (and output 0). A row that neither saw stays
    0 and -inf, never NaN; a part's NaN or inf (garbage it saw) reaches the row's output.
    In place, with no temporary the size of out: a ring rank merges a block per step.
    """
    m = torch.maximum(lse, lse_b)
    m_safe = torch.where(m == _NEG_INF, 0.0, m)
    w, w_b = torch.exp(lse - m_safe), torch.exp(lse_b - m_safe)  # 0 for a part that saw nothing
    total = w + w_b
    alive = total > 0
    inv = torch.where(alive, total, 1.0).reciprocal()
    out.mul_((w * inv).unsqueeze(-1)).addcmul_(out_b, (w_b * inv).unsqueeze(-1))
    lse.copy_(torch.where(alive, m_safe + torch.log(total), _NEG_INF))
