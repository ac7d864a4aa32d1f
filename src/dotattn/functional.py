"""``scaled_dot_product_attention``: validate -> pick engine -> run.

Shape legend: B.. leading (batch) dims, Hq query heads, Hkv key/value heads,
Lq query length, Lk key length, E head dim of query and key, Ev head dim of value.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable
from typing import Protocol

import torch
from torch.compiler import is_compiling  # one global: a compiled call guards each attribute it reads

from dotattn import engines, masks
# the functions themselves, not the module: each module a compiled call reaches by two paths costs a guard
from dotattn._ops import attention as op_attention, limits as op_limits
from dotattn._inputs import Problem, prepare
from dotattn.engines import AttentionResult, Explanation
from dotattn.engines.split_k import eager_step
from dotattn.masks import Mask


class Observer(Protocol):
    """What watches the calls in a context (``dotattn.diagnostics.Monitor`` is one)."""

    recording: bool  # whether it records the calls now (a sampling monitor skips most)

    def record(self, problem: Problem, result: AttentionResult) -> None:
        """One call's problem and result, which carries the lse; an engine that can has left
        each row's statistics in ``problem.derived["row_stats"]``."""


# The observer of the calls in this context, or None; a Monitor sets itself here on entering,
# so this module never imports the layers above it.
OBSERVER: contextvars.ContextVar[Observer | None] = contextvars.ContextVar("dotattn_observer", default=None)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    mask: Mask | None = None,
    engine: str = "auto",
    return_lse: bool = False,
    return_weights: bool = False,
    generator: torch.Generator | None = None,
    softcap: float | None = None,
    score_mod: Callable | None = None,
) -> torch.Tensor | AttentionResult:
    """softmax(Q Kᵀ · scale + mask) V, a drop-in for torch's function of the same name.

    query: (B.., Hq, Lq, E)   key: (B.., Hkv, Lk, E)   value: (B.., Hkv, Lk, Ev)
    returns (B.., Hq, Lq, Ev), or an AttentionResult when return_lse or return_weights.
    B.. is zero or more leading dims that broadcast among the three; 2-D inputs (L, E)
    work too.

    The positional arguments mean what they mean in torch 2.13:
      attn_mask  bool (True = may attend) or float (added to the scores), broadcastable
                 to (B.., Hq, Lq, Lk)
      dropout_p  inverted dropout on the weights; the pattern is dotattn's own
                 (counter-based, reproducible with ``generator``), not torch's
      is_causal  query i sees keys j <= i (top-left aligned, like torch); for the
                 decoding alignment use ``mask=masks.causal(align="bottom_right")``
      scale      defaults to 1/sqrt(E)
      enable_gqa Hq may be a multiple of Hkv (grouped-query attention)
    Unlike torch, attn_mask, is_causal and mask may be given together: they are ANDed.

    Keyword-only extras:
      mask            a ``dotattn.masks`` mask (causal, sliding_window, padding, ...)
      engine          "auto" or an engine name; ``dotattn.explain`` tells which runs
      return_lse      also return lse (B.., Hq, Lq): log of each row's softmax denominator
      return_weights  also return the weights (B.., Hq, Lq, Lk), before dropout
      generator       the torch.Generator that seeds dropout
      softcap         logit soft-capping (Gemma 2, Grok): scores -> softcap·tanh(scores/softcap),
                      after the scale and before the mask; None for none
      score_mod       FlexAttention's score_mod(score, b, h, q_idx, kv_idx) -> score, after the
                      scale and softcap and before the mask, with broadcasting int64 index
                      tensors (b the flattened batch row); gradients reach the tensors it
                      captures. Runs on the reference and tiled (torch-ops) engines, eagerly

    A query row with no allowed key gives output 0, lse -inf, weights 0 and zero
    gradients. Masked-out keys never influence anything, even when they hold NaN or inf.
    Gradients flow to query, key, value and a float attn_mask (the score gradient);
    lse and weights carry none.
    """
    if is_compiling():
        return _traced(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, mask, engine,
                       return_lse, return_weights, generator, softcap, score_mod)
    # A decoding step's usual call runs in one call of the split-K kernel, which checks the
    # tensors itself (split_k.eager_step); None sends it down the full path.
    observer = OBSERVER.get()
    if attn_mask is None and type(dropout_p) is float and dropout_p == 0.0 and return_lse is False \
            and return_weights is False and generator is None and score_mod is None \
            and (observer is None or not observer.recording):
        out = eager_step(query, key, value, mask, is_causal, scale, enable_gqa, softcap, engine)
        if out is not None:
            return out
    problem = prepare(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
        mask=mask, return_lse=return_lse, return_weights=return_weights, generator=generator, softcap=softcap,
        score_mod=score_mod,
    )
    # The steps of a call in line, not in helpers: a decoding step runs them with their code out
    # of cache, where each function called costs microseconds.
    if observer is None or not observer.recording:
        result = engines.select(problem, engine).run(problem)
    else:  # observers get the lse, which every engine has at hand, and the row statistics where it can
        observed = dataclasses.replace(problem, return_lse=True, stats=True)
        result = engines.select(observed, engine).run(observed)
        observer.record(observed, result)
        if not problem.return_lse:
            result = result._replace(lse=None)
    if problem.squeeze_head:
        result = AttentionResult(*(None if t is None else t.squeeze(0) for t in result))
    return result if return_lse or return_weights else result.output


def _traced(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, mask, engine,
            return_lse, return_weights, generator, softcap, score_mod) -> torch.Tensor | AttentionResult:
    """The call under torch.compile or torch.export: one ``dotattn::attention`` operator
    (``dotattn._ops``), which checks the arguments and picks the engine when it runs."""
    combined = None  # attn_mask & causal & mask, with what is not given left out
    for part in (None if attn_mask is None else masks.dense(attn_mask), masks.causal() if is_causal else None, mask):
        if part is not None:
            combined = part if combined is None else combined & part
    found = op_limits(combined, dropout_p, generator, return_weights, score_mod)
    if found:
        raise ValueError(f"under torch.compile or torch.export, {found[0]}")
    squeeze = query.dim() == key.dim() == value.dim() == 2
    q, k, v = (x.unsqueeze(0) if x.dim() == 2 else x for x in (query, key, value))  # as prepare() does
    out, lse = op_attention(q, k, v, combined, dropout_p, scale, enable_gqa, engine, generator, softcap)
    if squeeze:
        out, lse = out.squeeze(0), lse.squeeze(0)
    return AttentionResult(out, lse) if return_lse else out


def explain(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    mask: Mask | None = None,
    engine: str = "auto",
    return_lse: bool = False,
    return_weights: bool = False,
    generator: torch.Generator | None = None,
    softcap: float | None = None,
    score_mod: Callable | None = None,
) -> Explanation:
    """Which engine ``scaled_dot_product_attention`` would run with these arguments, and
    why each other engine would not. Takes the same arguments; computes nothing.
    ``print()`` it for a readable report.
    """
    problem = prepare(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
        mask=mask, return_lse=return_lse, return_weights=return_weights, generator=generator, softcap=softcap,
        score_mod=score_mod,
    )
    limits = op_limits(problem.mask, problem.dropout_p, problem.generator, problem.return_weights,
                       problem.score_mod)
    return dataclasses.replace(engines.explain_problem(problem, engine), compile_limits=tuple(limits))
