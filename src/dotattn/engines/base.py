"""The engine contract: what an engine declares and implements.

An engine is one way of computing attention (the literal reference, a tiled CPU
kernel, a GPU kernel). It declares what it supports in a :class:`Support` record, says
why it cannot run a problem (:meth:`Engine.reasons`; an engine with no reasons can run
it), and implements two methods in one canonical layout (``dotattn._layout``):

    forward(problem)                      -> out (N, Hq, Lq, Ev), lse (N, Hq, Lq)
    backward(problem, out, lse, d_out)    -> dq, dk, dv, d_bias

N is the problem's batch dims flattened; lse is the natural log of each row's softmax
denominator (-inf for a row with no allowed key). dq, dk, dv have the shapes of the
problem's query, key and value (broadcast dims summed); d_bias holds one gradient per
float leaf of the mask (``Mask.biases()``), in that leaf's shape, or None each when not
asked for. Outputs and gradients may be in the compute dtype or the input dtype; the
caller casts.

Everything else is shared: :meth:`Engine.run` drives every engine through one autograd
node (:class:`_Attention`, which saves q, k, v, the output and the lse; backward hands
them back), and the weights, when asked for, are rebuilt from the lse
(``dotattn._softmax.weights_from_lse``). Ring attention, the split-K engine's fallback,
diagnostics and the CLI reach engines only through this contract and the registry, so an
engine is one file that registers itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from dotattn._inputs import compute_dtype, lse_dtype
from dotattn._softmax import weights_from_lse

if TYPE_CHECKING:
    from dotattn._inputs import Problem
    from dotattn.masks import Mask

__all__ = ["AttentionResult", "Engine", "EngineNotSupportedError", "Support", "compute_dtype", "dtype_name",
           "lse_dtype"]


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
    # materialises the (Lq, Lk) scores: O(L²) memory (ring attention's auto never picks it)
    quadratic_memory: bool = False
    softcap: bool = False  # logit soft-capping (softcap=)
    score_mod: bool = False  # a score_mod= function (dotattn._score_mod)

    def reasons(self, problem: Problem) -> list[str]:
        """Every declared limit the problem breaks, as sentences that say how to avoid it."""
        reasons = []
        device = problem.device_type
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
        if problem.softcap and not self.softcap:
            reasons.append(f"softcap={problem.softcap} is not supported (the reference, tiled and split_k engines take it on CPU, triton on CUDA)")
        if problem.score_mod is not None and not self.score_mod:
            reasons.append("score_mod= is not supported (a Python function these kernels cannot call; the reference "
                           "and tiled engines take it)")
        if problem.dropout_p > 0 and not self.dropout:
            reasons.append(f"dropout_p={problem.dropout_p} is not supported (use dropout_p=0)")
        if problem.requires_grad and not self.backward:
            reasons.append("backward is not supported and an input requires grad")
        if problem.return_weights and not self.weights:
            reasons.append("return_weights=True is not supported")
        return reasons


class Engine:
    """One way of computing attention. Subclasses set ``name``, ``description``, ``support``
    and ``priority`` and implement ``forward`` and ``backward`` (see the module docstring).

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

    def auto_skip(self, problem: Problem, after: tuple[str, ...] | None = None) -> str | None:
        """Why ``engine="auto"`` should pass over this engine although it can run ``problem``
        (e.g. a lower-ranked engine is faster at this size); None when it should not.
        ``after`` names the engines auto would try next, in order: a skip in favour of one
        that is not among them does not apply (None: every registered engine may follow). A forced
        engine ignores it."""
        return None

    def detail(self, problem: Problem) -> str | None:
        """How this engine will run ``problem`` when it has more than one way (e.g. a compiled
        kernel or its fallback), for ``explain``; None when there is only one."""
        return None

    def forward(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
        """out (N, Hq, Lq, Ev) and lse (N, Hq, Lq), natural log, -inf for a row that sees no key.

        Reads problem.query (*batch, Hq, Lq, E), key (*batch, Hkv, Lk, E) and value
        (*batch, Hkv, Lk, Ev), whose *batch broadcasts (N = prod(batch)). Runs with autograd
        off; saves nothing: ``backward`` gets the output and lse back.
        """
        raise NotImplementedError

    def backward(
        self, problem: Problem, out: torch.Tensor, lse: torch.Tensor, d_out: torch.Tensor, *,
        bias_grads: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """dq, dk, dv (the shapes of problem.query, key, value) and d_bias, from ``forward``'s
        out (N, Hq, Lq, Ev) and lse (N, Hq, Lq) and the output's gradient d_out (N, Hq, Lq, Ev).

        d_bias: one gradient per ``problem.mask.biases()`` leaf, in its shape, when
        ``bias_grads``; else None each. Ring attention hands in the output and lse merged over
        every rank's keys, so P = exp(S - lse) and delta = rowsum(dO·O) must come from them,
        never from a forward of this engine's own.
        """
        raise NotImplementedError

    def run(self, problem: Problem) -> AttentionResult:
        """Compute attention for a validated problem: the output (*batch, Hq, Lq, Ev) in the
        input dtype and, when asked, the lse (*batch, Hq, Lq) and the weights (*batch, Hq, Lq, Lk).
        Differentiable when the problem requires grad; otherwise ``forward`` runs alone."""
        p = problem
        if p.requires_grad:
            biases = () if p.mask is None else tuple(leaf.tensor for leaf in p.mask.biases())
            out, lse = _Attention.apply(self, p, p.query, p.key, p.value, *biases, *p.score_mod_tensors)
        else:
            out, lse = self.forward(p)
        # Each op costs a decoding step microseconds when its code is out of cache, so the
        # no-op ones are left out: out is (N, ...) already for one batch dim.
        if len(p.batch_shape) != 1:
            out = out.view(*p.batch_shape, p.Hq, p.Lq, p.Ev) if out.is_contiguous() else \
                out.reshape(*p.batch_shape, p.Hq, p.Lq, p.Ev)
            lse = lse.reshape(*p.batch_shape, p.Hq, p.Lq)
        if out.dtype != p.dtype:
            out = out.to(p.dtype)
        weights = self.weights(p, lse).to(p.dtype) if p.return_weights else None
        lse = lse.detach().to(lse_dtype(p.dtype)) if p.return_lse else None
        return tuple.__new__(AttentionResult, (out, lse, weights))  # its Python __new__ costs a cold call

    def weights(self, problem: Problem, lse: torch.Tensor) -> torch.Tensor:
        """The softmax weights (*batch, Hq, Lq, Lk) before dropout, from ``forward``'s lse."""
        return weights_from_lse(problem, lse.detach())


class _Attention(torch.autograd.Function):
    """Every engine as one autograd node: forward saves q, k, v, the output and the lse;
    backward hands them to the engine's ``backward``. The mask's float leaves are inputs
    too, so that autograd hands their gradients back, and so are the tensors a score_mod
    captures, whose gradients an engine that takes score_mod leaves in
    ``problem.derived["score_mod_grads"]`` (one per ``problem.score_mod_tensors``)."""

    @staticmethod
    def forward(ctx, engine: Engine, problem: Problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                *leaves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = engine.forward(problem)
        # The problem holds q, k and v too; saving them as well lets autograd check that
        # nothing modified them in place before backward.
        ctx.engine, ctx.problem = engine, problem
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out: torch.Tensor, _d_lse: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        p = ctx.problem
        biases = () if p.mask is None else p.mask.biases()
        dq, dk, dv, d_biases = ctx.engine.backward(
            p, out, lse, d_out, bias_grads=any(ctx.needs_input_grad[5:5 + len(biases)]))
        d_biases = tuple(None if g is None else g.to(b.tensor.dtype) for g, b in zip(d_biases, biases))
        d_captured = p.derived.pop("score_mod_grads", (None,) * len(p.score_mod_tensors))
        return None, None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *d_biases, *d_captured
