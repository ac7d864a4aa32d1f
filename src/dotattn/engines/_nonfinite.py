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
