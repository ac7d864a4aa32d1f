"""What an engine declares and implements.

An engine is one way of computing attention (the literal reference, a tiled CPU
kernel, a GPU kernel). It declares what it supports in a :class:`Support` record
and implements :meth:`Engine.run`. The dispatcher asks every engine for the
reasons it cannot run a problem; an engine with no reasons can run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from dotattn._inputs import Problem
    from dotattn.masks import Mask


class AttentionResult(NamedTuple):
    """What ``scaled_dot_product_attention`` returns when lse or weights are asked for.

    output:  (..., Hq, Lq, Ev), the query's dtype
    lse:     (..., Hq, Lq) float32 (float64 for float64 inputs), natural log of each
             row's softmax denominator; -inf for a row with no allowed key. No gradient.
    weights: (..., Hq, Lq, Lk), the softmax probabilities before dropout. No gradient.
    Fields that were not asked for are None.
    """

    output: torch.Tensor
    lse: torch.Tensor | None = None
    weights: torch.Tensor | None = None


class EngineNotSupportedError(ValueError):
    """A forced engine cannot run the problem; the message lists every reason."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an engine computes in: half precisions in float32 (as torch's math
    backend does on CPU), others as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The lse's dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Support:
    """What an engine can run. ``None`` means "no restriction"."""

    devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int | None = None
    mask_kinds: tuple[type[Mask], ...] | None = None
    dropout: bool = True
    backward: bool = True
    weights: bool = True
    # device -> the dtypes it takes, for an engine whose devices take different ones
    dtypes_on: dict[str, tuple[torch.dtype, ...]] | None = None

    def reasons(self, problem: Problem) -> list[str]:
        """Every declared limit the problem breaks, as sentences that say how to avoid it."""
        reasons = []
        device = problem.device.type
        if self.devices is not None and device not in self.devices:
            reasons.append(f"device {device} is not supported (use {' or '.join(self.devices)})")
        dtypes = self.dtypes if self.dtypes_on is None else self.dtypes_on.get(device, self.dtypes)
        if problem.dtype not in dtypes:
            names = " or ".join(dtype_name(d) for d in dtypes)
            reasons.append(
                f"dtype {dtype_name(problem.dtype)} is not supported on {device} (use {names})"
            )
        head_dim = max(problem.E, problem.Ev)
        if self.max_head_dim is not None and head_dim > self.max_head_dim:
            reasons.append(f"head dim {head_dim} is above the limit {self.max_head_dim}")
        if self.mask_kinds is not None and problem.mask is not None:
            for leaf in problem.mask.leaves():
                if not isinstance(leaf, self.mask_kinds):
                    reasons.append(f"mask {leaf!r} is not supported")
        if problem.dropout_p > 0 and not self.dropout:
            reasons.append(f"dropout_p={problem.dropout_p} is not supported (use dropout_p=0)")
        if problem.requires_grad and not self.backward:
            reasons.append("backward is not supported and an input requires grad")
        if problem.return_weights and not self.weights:
            reasons.append("return_weights=True is not supported")
        return reasons


class Engine:
    """One way of computing attention. Subclasses set ``name``, ``support`` and ``run``.

    ``priority`` orders the engines for ``engine="auto"``: the highest-priority engine
    with no reasons runs the problem.
    """

    name: str
    description: str
    support: Support
    priority: int = 0

    def reasons(self, problem: Problem) -> list[str]:
        """Why this engine cannot run ``problem``; empty when it can."""
        return self.support.reasons(problem) + self.extra_reasons(problem)

    def extra_reasons(self, problem: Problem) -> list[str]:
        """Limits that the :class:`Support` record cannot express (e.g. a missing extension)."""
        return []

    def auto_skip(self, problem: Problem) -> str | None:
        """Why ``engine="auto"`` should pass over this engine although it can run ``problem``
        (e.g. a lower-ranked engine is faster at this size); None when it should not.
        A forced engine ignores it."""
        return None

    def detail(self, problem: Problem) -> str | None:
        """How this engine will run ``problem`` when it has more than one way (e.g. a compiled
        kernel or its fallback), for ``explain``; None when there is only one."""
        return None

    def run(self, problem: Problem) -> AttentionResult:
        """Compute attention for a validated problem.

        Inputs keep their layout: query (*batch, Hq, Lq, E), key (*batch, Hkv, Lk, E),
        value (*batch, Hkv, Lk, Ev), where *batch broadcasts. Returns output
        (*batch, Hq, Lq, Ev) and, when asked, lse (*batch, Hq, Lq) and weights
        (*batch, Hq, Lq, Lk).
        """
        raise NotImplementedError
