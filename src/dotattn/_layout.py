"""The one canonical layout engines work in, and the reshapes into and out of it.

A problem's tensors arrive as (*batch, H, L, D) with leading dims that broadcast among
query, key, value and the mask. Engines flatten the batch into one dim N:

    q (N, Hq, L, D)      k, v (N, Hkv, L, D)      out (N, Hq, Lq, Ev)      lse (N, Hq, Lq)

A tensor that broadcasts along the batch or the heads (a mask's lead dims, a row span)
keeps size 1 there: (Nm, Hm, R, C) with Nm in {1, N} and Hm in {1, Hq}, so it is never
copied per batch row or head. The tiled engine's torch-ops path further splits Hq into
(Hkv, G), the G query heads that share a kv head (``grouped``).

Shape legend: N flattened batch, Hq/Hkv heads, G = Hq/Hkv, L length, D head dim,
R rows (Lq or 1), C columns (Lk or 1).
"""

from __future__ import annotations

import math

import torch


def flat_batch(x: torch.Tensor, batch: tuple[int, ...]) -> torch.Tensor:
    """(*batch', H, L, D) whose lead broadcasts to ``batch`` -> (N, H, L, D); a view where the
    strides allow one (a broadcast batch dim then reads the same entries)."""
    H, L, D = x.shape[-3:]
    return x.expand(*batch, H, L, D).reshape(math.prod(batch), H, L, D)


def heads_canonical(t: torch.Tensor, batch: tuple[int, ...], Hq: int) -> torch.Tensor:
    """(*lead, R, C) broadcastable to (*batch, Hq, R, C) -> (Nm, Hm, R, C), Nm in {1, N}, Hm in {1, Hq}.

    Copies only when a batch lead is partly broadcast."""
    R, C = t.shape[-2:]
    lead = (1,) * (len(batch) + 1 - (t.dim() - 2)) + tuple(t.shape[:-2])
    t = t.reshape(*lead, R, C)
    Hm = lead[-1]
    if any(b != 1 for b in lead[:-1]):
        return t.expand(*batch, Hm, R, C).reshape(math.prod(batch), Hm, R, C)
    return t.reshape(1, Hm, R, C)


def heads_uncanonical(grad: torch.Tensor, batch: tuple[int, ...], shape: torch.Size) -> torch.Tensor:
    """The inverse of ``heads_canonical`` for a gradient: (Nm, Hm, R', C'), Nm in {1, N}, summed
    to ``shape`` (..., R or 1, C or 1), which broadcasts to (*batch, Hq, R', C')."""
    Nm, Hm, R, C = grad.shape
    grad = grad.reshape(*(batch if Nm != 1 else (1,) * len(batch)), Hm, R, C)
    if len(shape) > grad.dim():
        grad = grad.reshape((1,) * (len(shape) - grad.dim()) + tuple(grad.shape))
    return grad.sum_to_size((1,) * (grad.dim() - len(shape)) + tuple(shape)).reshape(shape)


def grouped(t: torch.Tensor, batch: tuple[int, ...], Hkv: int, G: int) -> torch.Tensor:
    """(*lead, R, C) broadcastable to (*batch, Hq, R, C) -> (Nm, h, g, R, C): (h, g) is (Hkv, G)
    when the lead varies over heads, else (1, 1)."""
    t = heads_canonical(t, batch, Hkv * G)  # (Nm, Hq or 1, R, C)
    Nm, Hm, R, C = t.shape
    return t.reshape(Nm, Hkv, G, R, C) if Hm != 1 else t.reshape(Nm, 1, 1, R, C)


def spans_canonical(
    spans: tuple[torch.Tensor, torch.Tensor], batch: tuple[int, ...], Hq: int, Lq: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row spans (lo, hi) broadcastable to (*lead, Lq) (a padding mask's are (B, 1, 1)) as
    (Nm, Hm, Lq) each, through a trailing dim of 1."""
    return tuple(heads_canonical(x.expand(*x.shape[:-1], Lq).unsqueeze(-1), batch, Hq).squeeze(-1)
                 for x in torch.broadcast_tensors(*spans))


def kv_per_query_head(x: torch.Tensor, Hq: int) -> torch.Tensor:
    """(*batch, Hkv, L, D) -> (*batch, Hq, L, D): query head h uses kv head h // (Hq/Hkv).
    Copies for GQA only: equal head counts, or one kv head (broadcast by matmul), pass as they are."""
    Hkv = x.shape[-3]
    if Hkv in (1, Hq):
        return x
    return x.repeat_interleave(Hq // Hkv, dim=-3)
