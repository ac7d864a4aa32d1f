"""The reference engine: the seed's four steps written literally.

1. first matmul, the compatibility matrix  S = Q Kᵀ          (..., Hq, Lq, Lk)
2. scale                                   S = S * scale     (1/sqrt(E) by default)
   soft-cap, when asked                    S = c·tanh(S / c)
   mask                                    S = S + bias; S[not allowed] = -inf
3. stable row softmax                      P = exp(S - max S) / sum
4. second matmul                           O = P V           (..., Hq, Lq, Ev)

It runs any floating dtype on any device. Its backward is torch autograd through the
same steps, recomputed. In float64 it is the oracle every other engine is tested against
(:func:`dotattn.testing.oracle`). It materialises the (Lq, Lk) scores: O(L²) memory.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from dotattn import _score_mod
from dotattn._dropout import keep_mask
from dotattn._inputs import Problem
from dotattn._layout import kv_per_query_head
from dotattn._nonfinite import finite_part, nan_scores, nan_where_seen
from dotattn._softmax import stable_softmax
from dotattn.engines.base import Engine, Support, compute_dtype
from dotattn.engines.registry import register


def dropout_keep(problem: Problem, device: torch.device) -> torch.Tensor:
    """The shared keep pattern for the whole problem: bool (*batch, Hq, Lq, Lk)."""
    lead = (*problem.batch_shape, problem.Hq)
    bh = torch.arange(int(torch.Size(lead).numel()), device=device).reshape(*lead, 1, 1)
    rows = torch.arange(problem.Lq, device=device)[:, None]
    cols = torch.arange(problem.Lk, device=device)
    return keep_mask(problem.dropout_seed, problem.dropout_p, bh, rows, cols)


def four_steps(problem: Problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out (*batch, Hq, Lq, Ev) and lse (*batch, Hq, Lq) in the compute dtype, differentiable
    in q, k, v and ``offset`` (*batch, Hq, Lq, Lk), added to the masked scores when given: its
    gradient is the score gradient dS, which every float mask leaf gets summed to its shape."""
    compute = compute_dtype(problem.dtype)
    q, q_bad = finite_part(q.to(compute))
    k, k_bad = finite_part(kv_per_query_head(k, problem.Hq).to(compute))
    v, v_bad = finite_part(kv_per_query_head(v, problem.Hq).to(compute))
    Lq, Lk = problem.Lq, problem.Lk

    # 1. first matmul: the compatibility matrix, (*batch, Hq, Lq, Lk)
    s = q @ k.transpose(-2, -1)
    # 2. scale, so the scores keep unit variance
    s = s * problem.scale
    if problem.softcap:  # logit soft-capping, before the mask
        s = problem.softcap * torch.tanh(s / problem.softcap)
    if problem.score_mod is not None:  # the caller's function of the score and its indices
        s = _score_mod.apply_dense(problem.score_mod, s, problem.batch_shape)
    s = nan_scores(s, q_bad, k_bad)

    allowed = None
    mask = problem.mask
    if mask is not None:
        dense = mask.to_dense(Lq, Lk, device=s.device)
        if mask.is_additive:
            s = s + dense.to(compute)
            allowed = dense.detach() != float("-inf")
        else:
            allowed = dense
        if offset is not None:
            s = s + offset
        s = s.masked_fill(~allowed, float("-inf"))

    # 3. numerically stable row softmax; a row with no allowed key gives zeros
    p, m, denom = stable_softmax(s)

    if problem.dropout_p > 0:
        p = p * dropout_keep(problem, s.device) / (1.0 - problem.dropout_p)

    # 4. second matmul, (*batch, Hq, Lq, Ev)
    out = nan_where_seen(p @ v, v_bad, allowed, s.shape)
    return out, (m + torch.log(denom)).squeeze(-1)


@contextlib.contextmanager
def autograd_on() -> Iterator[None]:
    """Autograd on, also inside a PyTorch operator (``dotattn._ops``), whose implementation runs
    with the autograd dispatch keys excluded (autograd is the operator's own registration)."""
    K = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (K.AutogradFunctionality, K.AutogradOther, K.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


class ReferenceEngine(Engine):
    name = "reference"
    description = "the four steps written literally; O(L²) memory; the float64 oracle"
    support = Support(
        devices=None,
        dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16),
        quadratic_memory=True,
        softcap=True,
        score_mod=True,
    )
    priority = 0  # the fallback: every faster engine outranks it

    def forward(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
        p = problem
        out, lse = four_steps(p, p.query, p.key, p.value)
        N = math.prod(p.batch_shape)
        return out.reshape(N, p.Hq, p.Lq, p.Ev), lse.reshape(N, p.Hq, p.Lq)

    def backward(self, problem, out, lse, d_out, *, bias_grads=False):
        """Autograd through the four steps, recomputed (the oracle's gradients are torch's own)."""
        p = problem
        leaves = [x.detach().requires_grad_() for x in (p.query, p.key, p.value)]
        biases = [] if p.mask is None else p.mask.biases()
        offset = None
        if bias_grads and biases:
            offset = torch.zeros(p.scores_shape, dtype=compute_dtype(p.dtype), device=p.device, requires_grad=True)
        captured = [t for t in p.score_mod_tensors if t.requires_grad]
        with autograd_on():
            again, _ = four_steps(p, *leaves, offset)
        wanted = [*leaves, *([] if offset is None else [offset]), *captured]
        grads = torch.autograd.grad(again, wanted, d_out.reshape(again.shape).to(again.dtype), allow_unused=True)
        dq, dk, dv, *ds = (torch.zeros_like(x) if g is None else g for g, x in zip(grads, wanted))
        if p.score_mod is not None:
            _score_mod.store_grads(p, captured, ds[len(ds) - len(captured):])
        ds = ds[:len(ds) - len(captured)]
        d_biases = tuple(ds[0].sum_to_size(leaf.tensor.shape) if ds else None for leaf in biases)
        return dq, dk, dv, d_biases


register(ReferenceEngine())
