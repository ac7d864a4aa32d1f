"""Additive (Bahdanau) attention: score(i, j) = vᵀ tanh(W q_i + U k_j), softmax over keys.

Shape legend: *batch zero or more leading dims (B batch), broadcast among query, key
and value; Lq query length, Lk key length; Dq query features, Dk key features; H_a the
hidden size; Ev value features.

    query (*batch, Lq, Dq)   key (*batch, Lk, Dk)   value (*batch, Lk, Ev)
    returns output (*batch, Lq, Ev) and weights (*batch, Lq, Lk)

Cost, next to scaled dot-product attention (see benchmarks/additive_vs_dot.py):
W q is computed once per query and U k once per key, O((Lq·Dq + Lk·Dk)·H_a); the
scores need tanh of every (i, j, h) sum, O(Lq·Lk·H_a) elementwise work that no GEMM
can do, against one GEMM of O(Lq·Lk·E) for QKᵀ. Built at once, that (Lq, Lk, H_a)
tensor is the "more memory" of the usual comparison table, and autograd would keep
it for the backward. Here it never exists whole: the scores are computed for a block
of query rows at a time (about ``_BLOCK_ELEMENTS`` entries of the (i, j, h) tensor per
block), and the backward recomputes tanh block by block instead of saving it, so the
module holds O(Lq·Lk) (the scores and weights) plus one block, in training too.

Masks follow dotattn's semantics (README, "Semantics"): True = may attend, float masks
are added to the scores and get their gradient, a query row with no allowed key gives
output 0, weights 0 and zero gradients, and NaN/inf in a key, value or query that no
allowed (i, j) pair uses never reaches anything; NaN in an allowed one shows in exactly
the rows that use it.
"""

from __future__ import annotations

import functools
import math
import operator

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from dotattn import masks
from dotattn._inputs import _check_tensor
from dotattn._nonfinite import finite_part, nan_scores, nan_where_seen
from dotattn.engines.base import compute_dtype
from dotattn._softmax import stable_softmax

__all__ = ["AdditiveAttention"]

# Entries of the (*batch, rows, Lk, H_a) sigmoid tensor computed per block: 2**20 fp32 is
# 4 MiB. Forward+backward on a 2-core x86-64 machine: 2**18-2**20 fastest; 2**16 pays
# for the Python loop over blocks (1.3-1.8x), 2**22 and 2**24 for leaving the cache (up to
# 2x and 2.6x at L 1024, H_a 256).
_BLOCK_ELEMENTS = 2**20


def _block_rows(batch_numel: int, Lk: int, hidden: int) -> int:
    """Query rows per block, so that one block holds about _BLOCK_ELEMENTS tanh entries."""
    return max(1, _BLOCK_ELEMENTS // max(1, batch_numel * Lk * hidden))


class _AdditiveScores(torch.autograd.Function):
    """s[..., i, j] = Σ_h v[h] · tanh(wq[..., i, h] + uk[..., j, h]), a block of query rows at a time.

    wq: (*bq, Lq, H_a)   uk: (*bk, Lk, H_a)   v: (H_a,)   returns s (*batch, Lq, Lk),
    *batch the broadcast of *bq and *bk. Saves only its inputs; backward recomputes the block.

    tanh is evaluated as tanh(z) = 2·sigmoid(2z) - 1, with the 2s folded into wq, uk and v
    (O(L·H_a) work) and the -1 into one subtraction of Σ_h v[h] per score: torch's CPU
    sigmoid runs about 3x faster than its tanh (1.1 against 0.32 Gelem/s on one core of
    the project's machine), and the absolute error stays at the dtype's epsilon.
    """

    @staticmethod
    def forward(ctx, wq: torch.Tensor, uk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch = torch.broadcast_shapes(wq.shape[:-2], uk.shape[:-2])
        Lq, Lk, hidden = wq.shape[-2], uk.shape[-2], wq.shape[-1]
        s = wq.new_empty(*batch, Lq, Lk)
        wq2, uk2, v2, v_sum = 2 * wq, 2 * uk, 2 * v, v.sum()
        rows = _block_rows(math.prod(batch), Lk, hidden)
        for i0 in range(0, Lq, rows):
            i1 = min(i0 + rows, Lq)
            sig = (wq2[..., i0:i1, None, :] + uk2[..., None, :, :]).sigmoid_()  # (*batch, rows, Lk, H_a)
            s[..., i0:i1, :] = torch.matmul(sig, v2).sub_(v_sum)
        ctx.save_for_backward(wq, uk, v)
        return s

    @staticmethod
    @once_differentiable
    def backward(ctx, ds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        wq, uk, v = ctx.saved_tensors
        batch = ds.shape[:-2]
        Lq, Lk, hidden = wq.shape[-2], uk.shape[-2], wq.shape[-1]
        dwq = wq.new_empty(*batch, Lq, hidden)
        duk = uk.new_zeros(*batch, Lk, hidden)
        dv = v.new_zeros(hidden)
        wq2, uk2, v4 = 2 * wq, 2 * uk, 4 * v
        rows = _block_rows(math.prod(batch), Lk, hidden)
        for i0 in range(0, Lq, rows):
            i1 = min(i0 + rows, Lq)
            sig = (wq2[..., i0:i1, None, :] + uk2[..., None, :, :]).sigmoid_()  # (*batch, rows, Lk, H_a)
            ds_block = ds[..., i0:i1, :]  # (*batch, rows, Lk)
            # d s / d v = tanh = 2·sig - 1
            dv += 2 * torch.einsum("...ij,...ijh->h", ds_block, sig) - ds_block.sum()
            # d s / d(wq_i + uk_j) = ds_ij · v · (1 - tanh²) = ds_ij · 4v · sig·(1 - sig), in place
            g = sig.addcmul_(sig, sig, value=-1).mul_(v4).mul_(ds_block[..., None])
            dwq[..., i0:i1, :] = g.sum(-2)
            duk += g.sum(-3)
        return dwq.sum_to_size(wq.shape), duk.sum_to_size(uk.shape), dv


def _check_positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"AdditiveAttention: {name} must be a positive int, got {value!r}")
    return value


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without growing it."""
    return len(shape) <= len(target) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


class AdditiveAttention(nn.Module):
    """Additive (Bahdanau) attention with dotattn's mask semantics.

    score(i, j) = vᵀ tanh(W q_i + U k_j + b), weights = softmax over allowed keys j,
    output_i = Σ_j weights_ij value_j.

    Args:
        query_dim: Dq, the query's last dim.
        key_dim: Dk, the key's last dim.
        hidden_dim: H_a, the size of the tanh layer.
        bias: add one learned bias b (H_a,) inside the tanh, held by ``W``. U carries none
            (a second bias would only add to the first) and v none (a constant added to
            every score of a row cancels in the softmax).

    Parameters: ``W`` (H_a, Dq) [+ b (H_a,)], ``U`` (H_a, Dk), ``v`` (1, H_a):
    H_a·(Dq + Dk + 1) numbers, + H_a with the bias. The value is not projected, so
    its size Ev is whatever the caller passes.
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int, *, bias: bool = True) -> None:
        super().__init__()
        self.query_dim = _check_positive("query_dim", query_dim)
        self.key_dim = _check_positive("key_dim", key_dim)
        self.hidden_dim = _check_positive("hidden_dim", hidden_dim)
        if not isinstance(bias, bool):
            raise TypeError(f"AdditiveAttention: bias must be True or False, got {bias!r}")
        self.W = nn.Linear(query_dim, hidden_dim, bias=bias)
        self.U = nn.Linear(key_dim, hidden_dim, bias=False)
        self.v = nn.Linear(hidden_dim, 1, bias=False)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, hidden_dim={self.hidden_dim}"

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
        mask: masks.Mask | None = None, attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query: (*batch, Lq, Dq)   key: (*batch, Lk, Dk)   value: (*batch, Lk, Ev)
        returns output (*batch, Lq, Ev) and weights (*batch, Lq, Lk), both in query's dtype.

        The three masks are ANDed (float ones added to the scores):

        mask: a ``dotattn.masks`` Mask, read as dotattn reads it for scores
            (*batch, H, Lq, Lk) with one head, H = 1: its ``lead_shape`` must broadcast
            to (*batch, 1), so a per-batch mask such as ``masks.padding(lengths)``, lead
            (B, 1), indexes the last batch dim, B for (B, L, D) inputs.
        attn_mask: (..., Lq, Lk) broadcasting to (*batch, Lq, Lk); bool (True = may
            attend) or float (added to the scores, -inf masks; gets its gradient).
        key_padding_mask: (..., Lk) broadcasting to (*batch, Lk), (B, Lk) for (B, L, D)
            inputs, as in torch.nn.MultiheadAttention: bool True = IGNORE that key, or
            float (added to the scores).
        """
        for name, x in (("query", query), ("key", key), ("value", value)):
            _check_tensor(name, x)
        q, k = query, key
        batch_shape, Lq, Lk = self._check_shapes(q, k, value)
        allowed, bias = self._mask_parts(mask, attn_mask, key_padding_mask, batch_shape, Lq, Lk, q.device)

        # Garbage (NaN/inf) is zeroed before it can reach a product, and put back below
        # only where an allowed pair uses it.
        q, q_bad = finite_part(q)
        k, k_bad = finite_part(k)
        value, v_bad = finite_part(value)

        # W q once per query, U k once per key; the (Lq, Lk, H_a) sum exists a block at a time.
        # Half precisions compute the scores from here on in float32, as the engines do.
        compute = compute_dtype(q.dtype)
        wq, uk = self.W(q).to(compute), self.U(k).to(compute)  # (*batch, Lq, H_a), (*batch, Lk, H_a)
        s = _AdditiveScores.apply(wq, uk, self.v.weight.view(-1).to(compute))  # (*batch, Lq, Lk)
        s = nan_scores(s, q_bad, k_bad)
        if bias is not None:
            s = s + bias.to(compute)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))

        # The reference engine's steps 3 and 4 on the additive scores (the functional API takes
        # dot-product scores only): a row with no allowed key gives zeros.
        weights, _, _ = stable_softmax(s)  # (*batch, Lq, Lk)
        out = nan_where_seen(weights @ value.to(compute), v_bad, allowed, s.shape)  # (*batch, Lq, Ev)
        return out.to(query.dtype), weights.to(query.dtype)

    def _check_shapes(
        self, q: torch.Tensor, k: torch.Tensor, value: torch.Tensor
    ) -> tuple[tuple[int, ...], int, int]:
        """Validate features, lengths, dtypes and devices; returns (*batch, Lq, Lk)."""
        for name, x, want, arg in (("query", q, self.query_dim, "query_dim"), ("key", k, self.key_dim, "key_dim")):
            if x.shape[-1] != want:
                raise ValueError(
                    f"AdditiveAttention: {name} has {x.shape[-1]} features (last dim) but the module was "
                    f"built with {arg}={want}; pass a {name} of shape (..., L, {want}) or build the module "
                    f"with {arg}={x.shape[-1]}"
                )
        if value.shape[-2] != k.shape[-2]:
            raise ValueError(
                f"AdditiveAttention: value has {value.shape[-2]} positions (dim -2) but key has "
                f"{k.shape[-2]}; key and value must have the same length Lk"
            )
        param = self.W.weight
        for name, x in (("query", q), ("key", k), ("value", value)):
            if x.dtype != param.dtype:
                raise TypeError(
                    f"AdditiveAttention: {name} has dtype {x.dtype} but the module's parameters are "
                    f"{param.dtype}; convert the input ({name}.to({param.dtype})) or the module "
                    f"(module.to({x.dtype}))"
                )
            if x.device != param.device:
                raise ValueError(
                    f"AdditiveAttention: {name} is on {x.device} but the module's parameters are on "
                    f"{param.device}; move one of them ({name}.to({str(param.device)!r}))"
                )
        try:
            batch_shape = tuple(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], value.shape[:-2]))
        except RuntimeError:
            raise ValueError(
                f"AdditiveAttention: the leading (batch) dims of query {tuple(q.shape[:-2])}, key "
                f"{tuple(k.shape[:-2])} and value {tuple(value.shape[:-2])} do not broadcast; give them "
                "equal sizes or size 1"
            ) from None
        return batch_shape, q.shape[-2], k.shape[-2]

    @staticmethod
    def _mask_parts(
        mask: object, attn_mask: object, key_padding_mask: object,
        batch_shape: tuple[int, ...], Lq: int, Lk: int, device: torch.device,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The three masks as (allowed, bias), each broadcastable to (*batch, Lq, Lk) or None:
        allowed bool (True = may attend), bias float (added to the scores, -inf = masked)."""
        scores_shape = (*batch_shape, Lq, Lk)
        bools: list[torch.Tensor] = []
        floats: list[torch.Tensor] = []

        def add(part: torch.Tensor) -> None:
            (floats if part.is_floating_point() else bools).append(part)

        if mask is not None:
            if not isinstance(mask, masks.Mask):
                raise TypeError(
                    f"AdditiveAttention: mask must be a dotattn.masks.Mask (e.g. masks.causal()), got "
                    f"{type(mask).__name__}; pass tensors as attn_mask="
                )
            if not _broadcasts_to(mask.lead_shape, (*batch_shape, 1)):
                raise ValueError(
                    f"AdditiveAttention: mask {mask!r} has leading shape {tuple(mask.lead_shape)}, which does "
                    f"not broadcast to {(*batch_shape, 1)}: additive attention has one head, so the mask is "
                    "read as for scores (*batch, H=1, Lq, Lk); give a dense tensor (*batch, Lq, Lk) as "
                    "attn_mask= instead, or add the head dim with .unsqueeze(-3)"
                )
            dense = mask.to_dense(Lq, Lk, device=device)  # (*lead, Lq, Lk), lead[-1] == 1 if any
            add(dense.squeeze(-3) if mask.lead_shape else dense)
        for name, tensor, shape in (("attn_mask", attn_mask, scores_shape),
                                    ("key_padding_mask", key_padding_mask, (*batch_shape, Lk))):
            if tensor is None:
                continue
            legend = " (*batch, Lq, Lk)" if name == "attn_mask" else " (*batch, Lk), (B, Lk) for (B, L, D) inputs"
            masks.check_mask_tensor(tensor, name, where="AdditiveAttention: ", device=device, shape=shape,
                                    shape_legend=legend, optional=True)
            if name == "key_padding_mask":
                # torch's convention: True = ignore this key; one row shared by every query
                tensor = (~tensor if tensor.dtype == torch.bool else tensor).unsqueeze(-2)
            add(tensor)

        bias = functools.reduce(operator.add, floats) if floats else None
        allowed = [b.detach() != float("-inf") for b in floats] + bools
        return (functools.reduce(operator.and_, allowed) if allowed else None), bias
