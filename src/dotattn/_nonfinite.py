"""NaN and inf in the inputs: the one policy every engine follows.

A masked key (or a fully masked query) may hold garbage: padding buffers often do. The
semantics: garbage that no query row may see changes nothing; an output entry whose row
may see a NaN/inf query or key entry is NaN (the whole row, and its lse), and one whose
row may see a NaN/inf value entry is NaN (that value column), as the literal four steps
give. Inside a matmul 0 * NaN is NaN, so every engine computes on inputs with the
non-finite entries zeroed and puts NaN back only where a row may see them:

    ``finite_part``, ``nan_scores``, ``nan_where_seen``   the steps, for engines in torch ops
    ``zeroed``                                            the inputs a kernel runs on
    ``garbage_is_masked``                                 whether a kernel's zeroed run is
                                                          already exact (the mask hides it all)
    ``mark_visible_garbage``                              the NaN a kernel's zeroed run leaves
                                                          out, put back in one O(Lq·Lk) pass
    ``mark_seen_in_spans``                                the same for a mask of row spans, in
                                                          graph operations, O((Lq + Lk)·E): what
                                                          a compiled call does, which cannot ask
                                                          whether its inputs are finite

Problems with finite inputs (``Problem.inputs_finite``, one reduction) pay for none of it.
"""

from __future__ import annotations

import math

import torch

from dotattn._inputs import Problem
from dotattn._layout import spans_canonical

_NEG_INF = float("-inf")


def finite_part(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x with non-finite entries zeroed, and the bool map of those entries (None if none)."""
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return x, None
    return x.masked_fill(bad, 0.0), bad


def zeroed(x: torch.Tensor) -> torch.Tensor:
    """x with every NaN and inf replaced by 0 (a copy)."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def nan_scores(s: torch.Tensor, q_bad: torch.Tensor | None, k_bad: torch.Tensor | None) -> torch.Tensor:
    """Scores s (..., Lq, Lk) with NaN in every pair whose query or key held NaN/inf
    (q_bad (..., Lq, E), k_bad (..., Lk, E) from finite_part), for the mask to hide or keep."""
    if q_bad is None and k_bad is None:
        return s
    bad_row = q_bad.any(-1)[..., :, None] if q_bad is not None else False
    bad_col = k_bad.any(-1)[..., None, :] if k_bad is not None else False
    return s.masked_fill(bad_row | bad_col, float("nan"))


def nan_where_seen(
    out: torch.Tensor, v_bad: torch.Tensor | None, allowed: torch.Tensor | None, scores_shape: torch.Size,
) -> torch.Tensor:
    """out (..., Lq, Ev) with NaN in exactly the entries whose row may attend a key whose value
    held NaN/inf: v_bad (..., Lk, Ev) marks those, allowed (broadcastable to scores_shape) the
    pairs a row may attend (None: every pair)."""
    if v_bad is None:
        return out
    sees = torch.ones(scores_shape, dtype=out.dtype, device=out.device) if allowed is None else \
        allowed.to(out.dtype).expand(scores_shape)
    return out.masked_fill((sees @ v_bad.to(out.dtype)) > 0, float("nan"))


def garbage_is_masked(problem: Problem) -> bool:
    """Whether every NaN/inf in q, k, v sits where the mask hides it: in a query row that
    sees no key, or in a key that no row of its kv head's query heads sees. Then a kernel
    can run on the inputs with those entries zeroed (padding buffers full of garbage are the
    usual case) and needs no marking. Decided from row spans, so a mask without them
    answers False.
    """
    p = problem
    spans = p.row_spans
    if spans is None:
        return False
    N, G = math.prod(p.batch_shape), p.Hq // p.Hkv
    lo, hi = spans_canonical(spans, p.batch_shape, p.Hq, p.Lq)
    sees = lo < hi  # (Nm, Hm, Lq)

    def bad_rows(x: torch.Tensor, H: int, L: int) -> torch.Tensor:  # (N, H, L)
        bad = ~torch.isfinite(x).all(-1)
        return bad.expand(*p.batch_shape, H, L).reshape(N, H, L)

    if bool((bad_rows(p.query, p.Hq, p.Lq) & sees).any()):
        return False
    # How many rows see each key: +1 at lo, -1 at hi, summed along the keys.
    steps = torch.zeros(*sees.shape[:2], p.Lk + 1, dtype=torch.int32)
    steps.scatter_add_(-1, lo.clamp(max=p.Lk) * sees, sees.to(torch.int32))
    steps.scatter_add_(-1, hi.clamp(max=p.Lk) * sees, -sees.to(torch.int32))
    seen = steps.cumsum(-1)[..., : p.Lk] > 0  # (Nm, Hm, Lk)
    bad_keys = bad_rows(p.key, p.Hkv, p.Lk) | bad_rows(p.value, p.Hkv, p.Lk)
    return not bool((bad_keys.repeat_interleave(G, dim=1) & seen).any())


def mark_visible_garbage(problem: Problem, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A run on zeroed inputs made exact: NaN where a row may see a NaN/inf input, as the
    literal four steps give: the whole row (and its lse) for a bad query or key entry, the
    Ev column for a bad value entry. O(Lq·Lk); only non-finite inputs pay for it.

    out: (N, Hq, Lq, Ev) or (*batch, Hq, Lq, Ev), lse: the same without Ev; returned so.
    """
    p = problem
    shape_out, shape_lse = out.shape, lse.shape
    out = out.reshape(*p.batch_shape, p.Hq, p.Lq, p.Ev)
    lse = lse.reshape(*p.batch_shape, p.Hq, p.Lq)
    if p.mask is None:
        allowed = torch.ones(p.Lq, p.Lk, dtype=torch.bool, device=out.device)
    else:
        dense = p.mask.to_dense(p.Lq, p.Lk, device=out.device).detach()
        allowed = dense != _NEG_INF if dense.is_floating_point() else dense
    allowed = allowed.expand(*p.batch_shape, p.Hq, p.Lq, p.Lk).float()

    def bad(x: torch.Tensor) -> torch.Tensor:  # (*batch, Hq, L, D) per query head
        x = ~torch.isfinite(x.detach())
        x = x.expand(*p.batch_shape, *x.shape[-3:])
        return x.repeat_interleave(p.Hq // x.shape[-3], dim=-3) if x.shape[-3] != p.Hq else x

    q_bad, k_bad, v_bad = bad(p.query).any(-1), bad(p.key).any(-1), bad(p.value)
    row = ((allowed * q_bad[..., None]).sum(-1) > 0) | ((allowed @ k_bad[..., None].float())[..., 0] > 0)
    cell = (allowed @ v_bad.float()) > 0
    out = out.masked_fill(row[..., None] | cell, float("nan"))
    return out.reshape(shape_out), lse.masked_fill(row, float("nan")).reshape(shape_lse)


def mark_seen_in_spans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor | None,
                       hi: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mark_visible_garbage`` for a mask whose rows see keys lo <= j < hi (int (Nm, Hm, Lq);
    None: every key), in graph operations that read no tensor data in Python: prefix counts of
    the bad key and value entries, read at each row's span ends. For finite inputs it changes
    nothing, so a traced call runs it unconditionally.

    q (N, Hq, Lq, E), k (N, Hkv, Lk, E), v (N, Hkv, Lk, Ev) as given (not zeroed);
    out (N, Hq, Lq, Ev), lse (N, Hq, Lq); returned so.
    """
    N, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if lo is None:
        lo, hi = torch.zeros((), dtype=torch.int64, device=q.device), torch.full((), Lk, device=q.device)
    # row r = g·Lq + i of kv head hk is query i of head hk·G + g: spans per kv head's rows
    lo, hi = (x.clamp(0, Lk).to(torch.int64).expand(N, Hq, Lq).reshape(N, Hkv, -1) for x in (lo, hi))
    sees = lo < hi

    def in_span(bad: torch.Tensor) -> torch.Tensor:  # bad (N, Hkv, Lk, D) -> (N, Hkv, G·Lq, D)
        counts = torch.nn.functional.pad(bad.to(torch.int32).cumsum(2), (0, 0, 1, 0))
        D = bad.shape[-1]
        at = lambda idx: counts.gather(2, idx.unsqueeze(-1).expand(*idx.shape, D))  # noqa: E731
        return (at(hi) - at(lo) > 0) & sees.unsqueeze(-1)

    row = _bad(q).any(-1).reshape(N, Hkv, -1) & sees
    row = row | in_span(_bad(k).any(-1, keepdim=True)).squeeze(-1)
    cell = in_span(_bad(v))
    out = out.masked_fill((row.unsqueeze(-1) | cell).view(out.shape), float("nan"))
    return out, lse.masked_fill(row.view(lse.shape), float("nan"))


def _bad(x: torch.Tensor) -> torch.Tensor:
    """Where x holds NaN or inf (``~isfinite``, without a negation, which a trace on fake
    CUDA tensors in a CPU build of torch cannot run)."""
    return torch.isnan(x) | torch.isinf(x)
