"""The softmax pieces engines share: the stable row softmax, merging partial softmaxes by
their log-sum-exp, and the weights rebuilt from the lse.

Attention over a set of keys cut into disjoint parts equals the parts' outputs weighted by
exp(lse_part - lse_all): the split-K kernel merges its key parts this way (in C++), ring
attention the blocks that arrive from other ranks (``merge_into``). An engine that keeps
only the lse gives the weights as P = exp(S - lse) (``weights_from_lse``).
"""

from __future__ import annotations

import torch

from dotattn import _score_mod
from dotattn._inputs import Problem, compute_dtype
from dotattn._layout import kv_per_query_head
from dotattn._nonfinite import finite_part, nan_scores

_NEG_INF = float("-inf")


def stable_softmax(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row softmax of scores s (..., Lq, Lk), -inf where masked: p (..., Lq, Lk), and the row
    max m and sum denom (..., Lq, 1), lse = m + log(denom). A row with no allowed key gives
    p = 0 (denom 0), never NaN."""
    if s.shape[-1] > 0:
        m = s.detach().amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    else:
        m = s.new_zeros((*s.shape[:-1], 1))
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    return e / torch.where(denom == 0, torch.ones_like(denom), denom), m, denom


def weights_from_lse(problem: Problem, lse: torch.Tensor) -> torch.Tensor:
    """The softmax weights P = exp(S - lse) before dropout, (*batch, Hq, Lq, Lk) in the compute
    dtype, from a forward's lse ((N, Hq, Lq) or (*batch, Hq, Lq), natural log). O(Lq·Lk), like
    the weights themselves; no gradient. A row with lse -inf (no allowed key) gives 0, a row
    that saw garbage (lse NaN) NaN, as the literal four steps give."""
    p = problem
    compute = compute_dtype(p.dtype)
    with torch.no_grad():
        q, q_bad = finite_part(p.query.to(compute))
        k, k_bad = finite_part(kv_per_query_head(p.key, p.Hq).to(compute))
        s = (q @ k.transpose(-2, -1)) * p.scale  # (*batch, Hq, Lq, Lk)
        if p.softcap:
            s = p.softcap * torch.tanh(s / p.softcap)
        if p.score_mod is not None:
            s = _score_mod.apply_dense(p.score_mod, s, p.batch_shape)
        s = nan_scores(s, q_bad, k_bad)
        if p.mask is not None:
            dense = p.mask.to_dense(p.Lq, p.Lk, device=s.device)
            s = s + dense.to(compute) if dense.is_floating_point() else s.masked_fill(~dense, _NEG_INF)
        lse = lse.reshape(*p.batch_shape, p.Hq, p.Lq).to(compute)
        alive = lse != _NEG_INF
        w = torch.exp(s - torch.where(alive, lse, 0.0)[..., None])
        return torch.where(alive[..., None], w, 0.0)


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
