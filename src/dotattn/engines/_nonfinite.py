"""Keeping NaN and inf in masked-out entries away from everything else.

A masked key (or a fully masked query) may hold garbage: padding buffers often do.
Inside a matmul, 0 * NaN is NaN, so engines zero every non-finite entry first and
put NaN back only where an allowed entry used a bad value.
"""

from __future__ import annotations

import torch


def finite_part(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x with non-finite entries zeroed, and the bool map of those entries (None if none)."""
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return x, None
    return x.masked_fill(bad, 0.0), bad


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
