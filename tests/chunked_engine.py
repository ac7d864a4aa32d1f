"""A test-only engine: keys in chunks, each chunk's partial softmax merged by its lse.

Importing this module registers it as "chunked". It is written against the engine contract
(``dotattn.engines.base``) and the shared pieces below the engines, nothing else, and the
tests run it through the engine-parametrized suite, ring attention and ``dotattn check``:
an engine is one file.

Shape legend: N flattened batch, Hq query heads (kv heads repeated per query head here),
Lq/Lk lengths, E head dim, Ev value dim, c a chunk's keys.
"""

from __future__ import annotations

import torch

from dotattn._dropout import keep_mask
from dotattn._inputs import Problem, compute_dtype
from dotattn._layout import flat_batch, heads_canonical, heads_uncanonical
from dotattn._nonfinite import finite_part, nan_scores, nan_where_seen
from dotattn._softmax import merge_into, stable_softmax
from dotattn.engines import Engine, Support, register

CHUNK = 16
_NEG_INF = float("-inf")


class ChunkedEngine(Engine):
    name = "chunked"
    description = "test-only: keys in chunks of 16 in torch ops, partial softmaxes merged by lse"
    support = Support(devices=("cpu",), dtypes=(torch.float64, torch.float32, torch.bfloat16))
    priority = -1  # auto never prefers it

    @staticmethod
    def _inputs(p: Problem) -> tuple[torch.Tensor | None, ...]:
        """q (N, Hq, Lq, E), k (N, Hq, Lk, E), v (N, Hq, Lk, Ev) in the compute dtype with garbage
        zeroed, then the maps of that garbage (None where there is none)."""
        dtype, G = compute_dtype(p.dtype), p.Hq // p.Hkv
        q = flat_batch(p.query, p.batch_shape).to(dtype)
        k, v = (flat_batch(x, p.batch_shape).to(dtype).repeat_interleave(G, dim=1) for x in (p.key, p.value))
        (q, q_bad), (k, k_bad), (v, v_bad) = finite_part(q), finite_part(k), finite_part(v)
        return q, k, v, q_bad, k_bad, v_bad

    @staticmethod
    def _scores(p: Problem, x: tuple, k0: int, k1: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The masked scores of keys k0:k1, (N, Hq, Lq, c), and where a row may attend (None: everywhere)."""
        q, k, _, q_bad, k_bad, _ = x
        s = nan_scores((q @ k[..., k0:k1, :].transpose(-2, -1)) * p.scale, q_bad,
                       None if k_bad is None else k_bad[..., k0:k1, :])
        if p.mask is None:
            return s, None
        t = heads_canonical(p.mask.tile(p.Lq, p.Lk, 0, p.Lq, k0, k1, device=s.device), p.batch_shape, p.Hq)
        allowed = t != _NEG_INF if p.mask.is_additive else t
        s = s + t.to(s.dtype) if p.mask.is_additive else s
        return s.masked_fill(~allowed, _NEG_INF), allowed

    @staticmethod
    def _dropped(p: Problem, w: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
        """w (N, Hq, Lq, c) with the shared dropout pattern of keys k0:k1 applied, rescaled."""
        if p.dropout_p == 0:
            return w
        bh = torch.arange(w.shape[0] * p.Hq).reshape(w.shape[0], p.Hq, 1, 1)
        keep = keep_mask(p.dropout_seed, p.dropout_p, bh, torch.arange(p.Lq)[:, None], torch.arange(k0, k1))
        return w * keep / (1.0 - p.dropout_p)

    def forward(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
        p = problem
        x = self._inputs(p)
        q, v_bad = x[0], x[5]
        out = q.new_zeros(q.shape[0], p.Hq, p.Lq, p.Ev)
        lse = q.new_full((q.shape[0], p.Hq, p.Lq), _NEG_INF)
        for k0 in range(0, p.Lk, CHUNK):
            k1 = min(k0 + CHUNK, p.Lk)
            s, allowed = self._scores(p, x, k0, k1)
            w, m, denom = stable_softmax(s)
            part = nan_where_seen(self._dropped(p, w, k0, k1) @ x[2][..., k0:k1, :], None if v_bad is None else v_bad[..., k0:k1, :],
                                  allowed, s.shape)
            merge_into(out, lse, part, (m + torch.log(denom)).squeeze(-1))
        return out, lse

    def backward(self, problem, out, lse, d_out, *, bias_grads=False):
        p = problem
        x = self._inputs(p)
        q, k, v = x[:3]
        do = d_out.to(q.dtype)
        delta = (do * out.to(q.dtype)).sum(-1, keepdim=True)  # (N, Hq, Lq, 1)
        lse = torch.where(lse == _NEG_INF, 0.0, lse).to(q.dtype)[..., None]
        dq, dk, dv, ds_all = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), []
        for k0 in range(0, p.Lk, CHUNK):
            k1 = min(k0 + CHUNK, p.Lk)
            prob = torch.exp(self._scores(p, x, k0, k1)[0] - lse)  # P, 0 where masked
            dv[..., k0:k1, :] = self._dropped(p, prob, k0, k1).transpose(-2, -1) @ do
            ds = prob * (self._dropped(p, do @ v[..., k0:k1, :].transpose(-2, -1), k0, k1) - delta)
            dq += (ds @ k[..., k0:k1, :]) * p.scale
            dk[..., k0:k1, :] = (ds.transpose(-2, -1) @ q) * p.scale
            ds_all.append(ds)
        N, G = q.shape[0], p.Hq // p.Hkv
        # per query head -> per kv head, then the broadcast dims of the inputs summed
        dk, dv = (g.reshape(N, p.Hkv, G, p.Lk, g.shape[-1]).sum(2) for g in (dk, dv))
        grads = [g.reshape(*p.batch_shape, *g.shape[1:]).sum_to_size(t.shape)
                 for g, t in zip((dq, dk, dv), (p.query, p.key, p.value))]
        leaves = [] if p.mask is None else p.mask.biases()
        if not bias_grads or not ds_all:
            return (*grads, tuple(None for _ in leaves))
        ds = torch.cat(ds_all, -1)  # the score gradient, (N, Hq, Lq, Lk)
        return (*grads, tuple(heads_uncanonical(ds, p.batch_shape, leaf.tensor.shape) for leaf in leaves))


register(ChunkedEngine())
