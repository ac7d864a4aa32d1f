"""The reference engine: the seed's four steps written literally.

1. first matmul, the compatibility matrix  S = Q Kᵀ          (..., Hq, Lq, Lk)
2. scale                                   S = S * scale     (1/sqrt(E) by default)
   mask                                    S = S + bias; S[not allowed] = -inf
3. stable row softmax                      P = exp(S - max S) / sum
4. second matmul                           O = P V           (..., Hq, Lq, Ev)

It runs any floating dtype on any device and differentiates through torch autograd.
In float64 it is the oracle every other engine is tested against
(:func:`dotattn.testing.oracle`). It materialises the (Lq, Lk) scores: O(L²) memory.
"""

from __future__ import annotations

import torch

from dotattn._dropout import keep_mask
from dotattn._inputs import Problem
from dotattn.engines._nonfinite import finite_part, nan_scores, nan_where_seen
from dotattn.engines.base import AttentionResult, Engine, Support, compute_dtype, lse_dtype

def _expand_heads(x: torch.Tensor, Hq: int) -> torch.Tensor:
    """(*batch, Hkv, L, D) -> (*batch, Hq, L, D): query head h uses kv head h // (Hq/Hkv)."""
    Hkv = x.shape[-3]
    if Hkv in (1, Hq):
        return x  # equal, or broadcast by matmul
    return x.repeat_interleave(Hq // Hkv, dim=-3)


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


def dropout_keep(problem: Problem, device: torch.device) -> torch.Tensor:
    """The shared keep pattern for the whole problem: bool (*batch, Hq, Lq, Lk)."""
    lead = (*problem.batch_shape, problem.Hq)
    bh = torch.arange(int(torch.Size(lead).numel()), device=device).reshape(*lead, 1, 1)
    rows = torch.arange(problem.Lq, device=device)[:, None]
    cols = torch.arange(problem.Lk, device=device)
    return keep_mask(problem.dropout_seed, problem.dropout_p, bh, rows, cols)


class ReferenceEngine(Engine):
    name = "reference"
    description = "the four steps written literally; O(L²) memory; the float64 oracle"
    support = Support(
        devices=None,
        dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16),
    )
    priority = 0  # the fallback: every faster engine outranks it

    def run(self, problem: Problem) -> AttentionResult:
        dtype = problem.dtype
        compute = compute_dtype(dtype)
        q, q_bad = finite_part(problem.query.to(compute))
        k, k_bad = finite_part(_expand_heads(problem.key, problem.Hq).to(compute))
        v, v_bad = finite_part(_expand_heads(problem.value, problem.Hq).to(compute))
        Lq, Lk = problem.Lq, problem.Lk

        # 1. first matmul: the compatibility matrix, (*batch, Hq, Lq, Lk)
        s = q @ k.transpose(-2, -1)
        # 2. scale, so the scores keep unit variance
        s = s * problem.scale
        s = nan_scores(s, q_bad, k_bad)

        allowed = None
        if problem.mask is not None:
            dense = problem.mask.to_dense(Lq, Lk, device=s.device)
            if problem.mask.is_additive:
                s = s + dense.to(compute)
                allowed = dense.detach() != float("-inf")
            else:
                allowed = dense
            s = s.masked_fill(~allowed, float("-inf"))

        # 3. numerically stable row softmax; a row with no allowed key gives zeros
        p, m, denom = stable_softmax(s)

        p_dropped = p
        if problem.dropout_p > 0:
            keep = dropout_keep(problem, s.device)
            p_dropped = p * keep / (1.0 - problem.dropout_p)

        # 4. second matmul, (*batch, Hq, Lq, Ev)
        out = nan_where_seen(p_dropped @ v, v_bad, allowed, s.shape)

        lse = weights = None
        if problem.return_lse:
            lse = (m + torch.log(denom)).squeeze(-1).detach().to(lse_dtype(dtype))
        if problem.return_weights:
            weights = p.detach().to(dtype)
        return AttentionResult(out.to(dtype), lse, weights)
