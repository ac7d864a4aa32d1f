"""AdditiveAttention (Bahdanau) against an explicit per-(i, j) float64 loop: outputs, weights,
gradients (gradcheck), every mask kind, fully masked rows, garbage in masked keys, batch dims."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.func import functional_call

import dotattn.nn.additive as additive
from dotattn import masks
from dotattn.nn.additive import AdditiveAttention

F64 = torch.float64


def _module(Dq: int = 5, Dk: int = 4, H: int = 6, *, bias: bool = True, seed: int = 0) -> AdditiveAttention:
    torch.manual_seed(seed)
    m = AdditiveAttention(Dq, Dk, H, bias=bias).double()
    with torch.no_grad():  # larger weights than the default init, so tanh leaves its linear part
        for p in m.parameters():
            p.mul_(3)
    return m


def _inputs(B=(2,), Lq=5, Lk=7, Dq=5, Dk=4, Ev=3, seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*B, Lq, Dq, generator=g, dtype=F64)
    k = torch.randn(*B, Lk, Dk, generator=g, dtype=F64)
    v = torch.randn(*B, Lk, Ev, generator=g, dtype=F64)
    return tuple(x.requires_grad_(requires_grad) for x in (q, k, v))


def brute_force(m: AdditiveAttention, q, k, v, allowed=None, bias=None):
    """The formula written out one (i, j) pair at a time, in float64, for one batch row.

    q (Lq, Dq), k (Lk, Dk), v (Lk, Ev); allowed (Lq, Lk) bool (True = may attend);
    bias (Lq, Lk) float added to the scores (-inf = masked). A row with no allowed key
    gives output 0 and weights 0.
    """
    W = m.W.weight.detach()
    b = m.W.bias.detach() if m.W.bias is not None else torch.zeros(W.shape[0], dtype=F64)
    U, vv = m.U.weight.detach(), m.v.weight.detach()[0]
    q, k, v = q.detach(), k.detach(), v.detach()
    Lq, Lk = q.shape[0], k.shape[0]
    out = torch.zeros(Lq, v.shape[-1], dtype=F64)
    weights = torch.zeros(Lq, Lk, dtype=F64)
    for i in range(Lq):
        scores = {}
        for j in range(Lk):
            extra = 0.0 if bias is None else float(bias[i, j])
            if (allowed is not None and not bool(allowed[i, j])) or extra == -math.inf:
                continue
            z = W @ q[i] + b + U @ k[j]  # (H_a,)
            scores[j] = float(vv @ torch.tanh(z)) + extra
        if not scores:
            continue
        top = max(scores.values())
        denom = sum(math.exp(s - top) for s in scores.values())
        for j, s in scores.items():
            weights[i, j] = math.exp(s - top) / denom
            out[i] += weights[i, j] * v[j]
    return out, weights


def brute_force_batched(m, q, k, v, allowed=None, bias=None):
    """brute_force over the leading dims of (*batch, L, D) inputs; masks broadcast to (*batch, Lq, Lk)."""
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    Lq, Lk = q.shape[-2], k.shape[-2]
    q, k, v = (x.expand(*batch, *x.shape[-2:]) for x in (q, k, v))
    allowed = None if allowed is None else allowed.expand(*batch, Lq, Lk)
    bias = None if bias is None else bias.expand(*batch, Lq, Lk)
    out = torch.zeros(*batch, Lq, v.shape[-1], dtype=F64)
    weights = torch.zeros(*batch, Lq, Lk, dtype=F64)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in batch)).reshape(-1, len(batch)).tolist():
        idx = tuple(idx)
        out[idx], weights[idx] = brute_force(
            m, q[idx], k[idx], v[idx], None if allowed is None else allowed[idx], None if bias is None else bias[idx]
        )
    return out, weights


@pytest.mark.parametrize("bias", [True, False])
def test_matches_the_per_pair_loop(bias):
    m = _module(bias=bias)
    q, k, v = _inputs()
    out, w = m(q, k, v)
    out_ref, w_ref = brute_force_batched(m, q, k, v)
    assert out.shape == (2, 5, 3) and w.shape == (2, 5, 7)
    assert torch.allclose(out, out_ref, atol=1e-12, rtol=0)
    assert torch.allclose(w, w_ref, atol=1e-12, rtol=0)


def _mask_case(kind: str, B: int, Lq: int, Lk: int):
    """(forward kwargs, allowed (B, Lq, Lk) or None, bias (B, Lq, Lk) or None) for one mask kind."""
    g = torch.Generator().manual_seed(7)
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    lengths = torch.tensor([Lk, 3])
    if kind == "causal":
        return {"mask": masks.causal()}, (j <= i).expand(B, Lq, Lk), None
    if kind == "causal_bottom_right":
        return {"mask": masks.causal(align="bottom_right")}, (j <= i + Lk - Lq).expand(B, Lq, Lk), None
    if kind == "padding":
        return {"mask": masks.padding(lengths)}, (j < lengths[:, None, None]).expand(B, Lq, Lk), None
    if kind == "dense_mask":
        dense = torch.rand(Lq, Lk, generator=g) > 0.4
        return {"mask": masks.dense(dense)}, dense.expand(B, Lq, Lk), None
    if kind == "float_dense_mask":
        bias = torch.randn(Lq, Lk, generator=g, dtype=F64).masked_fill(torch.rand(Lq, Lk, generator=g) > 0.7, -math.inf)
        return {"mask": masks.dense(bias)}, None, bias.expand(B, Lq, Lk)
    if kind == "bool_attn_mask":
        dense = torch.rand(B, Lq, Lk, generator=g) > 0.4
        return {"attn_mask": dense}, dense, None
    if kind == "float_attn_mask":
        bias = torch.randn(B, Lq, Lk, generator=g, dtype=F64)
        bias = bias.masked_fill(torch.rand(B, Lq, Lk, generator=g) > 0.7, -math.inf)
        return {"attn_mask": bias}, None, bias
    if kind == "key_padding_mask":
        ignore = j[0] >= lengths[:, None]  # (B, Lk), True = ignore
        return {"key_padding_mask": ignore}, (~ignore)[:, None, :].expand(B, Lq, Lk), None
    if kind == "all_together":
        ignore = j[0] >= lengths[:, None]
        bias = torch.randn(B, Lq, Lk, generator=g, dtype=F64)
        allowed = (j <= i + Lk - Lq) & (~ignore)[:, None, :]
        return ({"mask": masks.causal(align="bottom_right"), "attn_mask": bias, "key_padding_mask": ignore},
                allowed, bias)
    raise AssertionError(kind)


MASK_KINDS = ["causal", "causal_bottom_right", "padding", "dense_mask", "float_dense_mask",
              "bool_attn_mask", "float_attn_mask", "key_padding_mask", "all_together"]


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_every_mask_kind_matches_the_loop(kind):
    B, Lq, Lk = 2, 5, 7
    m = _module()
    q, k, v = _inputs(B=(B,), Lq=Lq, Lk=Lk)
    kwargs, allowed, bias = _mask_case(kind, B, Lq, Lk)
    out, w = m(q, k, v, **kwargs)
    out_ref, w_ref = brute_force_batched(m, q, k, v, allowed, bias)
    assert torch.allclose(out, out_ref, atol=1e-12, rtol=0)
    assert torch.allclose(w, w_ref, atol=1e-12, rtol=0)
    # the mask did something: some weight is zero where the unmasked run's is not
    assert bool((w == 0).any()) and not bool((m(q, k, v)[1] == 0).any())


def _gradcheck(m, q, k, v, **kwargs):
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    float_mask = kwargs.pop("attn_mask", None)

    def f(q, k, v, mask_tensor, *params):
        extra = {} if mask_tensor is None else {"attn_mask": mask_tensor}
        return functional_call(m, dict(zip(names, params)), (q, k, v), {**kwargs, **extra})

    return torch.autograd.gradcheck(f, (q, k, v, float_mask, *params), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("rows_per_block", ["all", "one"])
def test_gradcheck_with_masks_and_a_learned_bias(monkeypatch, rows_per_block):
    if rows_per_block == "one":  # many blocks of one query row: the recompute-per-block backward
        monkeypatch.setattr(additive, "_BLOCK_ELEMENTS", 1)
    m = _module(Dq=3, Dk=2, H=3)
    q, k, v = _inputs(B=(2,), Lq=4, Lk=5, Dq=3, Dk=2, Ev=2, requires_grad=True)
    bias = torch.randn(2, 4, 5, dtype=F64, requires_grad=True)
    # causal & padding([5, 2]) with q_lengths: row 3 of batch 1 sees nothing
    mask = masks.causal(align="bottom_right") & masks.padding([5, 2], q_lengths=[4, 3])
    assert _gradcheck(m, q, k, v, mask=mask, attn_mask=bias)


def test_gradcheck_with_broadcast_batch_dims():
    m = _module(Dq=3, Dk=2, H=3, bias=False)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 3, 3, generator=g, dtype=F64, requires_grad=True)  # (2, 1, Lq, Dq)
    k = torch.randn(3, 4, 2, generator=g, dtype=F64, requires_grad=True)  # (3, Lk, Dk): broadcast over dim 0
    v = torch.randn(4, 2, generator=g, dtype=F64, requires_grad=True)  # (Lk, Ev): no batch dims
    assert _gradcheck(m, q, k, v, key_padding_mask=torch.tensor([False, False, True, False]))


def test_scores_function_against_the_formula_through_autograd(monkeypatch):
    """The blocked scores and their hand-written backward against plain autograd through tanh."""
    monkeypatch.setattr(additive, "_BLOCK_ELEMENTS", 2 * 7 * 4 * 3)  # 3 query rows per block
    g = torch.Generator().manual_seed(4)
    wq = torch.randn(2, 8, 4, generator=g, dtype=F64, requires_grad=True)  # (B, Lq, H_a)
    uk = torch.randn(1, 7, 4, generator=g, dtype=F64, requires_grad=True)  # (1, Lk, H_a), broadcast
    v = torch.randn(4, generator=g, dtype=F64, requires_grad=True)
    ds = torch.randn(2, 8, 7, generator=g, dtype=F64)
    s = additive._AdditiveScores.apply(wq, uk, v)
    s_ref = torch.tanh(wq[:, :, None, :] + uk[:, None, :, :]) @ v
    assert torch.allclose(s, s_ref, atol=1e-14, rtol=0)
    grads = torch.autograd.grad(s, (wq, uk, v), ds)
    grads_ref = torch.autograd.grad(s_ref, (wq, uk, v), ds)
    for a, b in zip(grads, grads_ref):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-13, rtol=0)


def test_fully_masked_rows_give_zeros_and_zero_gradients():
    m = _module()
    q, k, v = _inputs(B=(2,), Lq=5, Lk=7, requires_grad=True)
    # batch 0: rows >= 3 see nothing (q_lengths); batch 1: every key ignored
    ignore = torch.tensor([[False] * 7, [True] * 7])
    out, w = m(q, k, v, mask=masks.padding([7, 7], q_lengths=[3, 5]), key_padding_mask=ignore)
    (out.square().sum() + w.square().sum()).backward()
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert (out[0, 3:] == 0).all() and (w[0, 3:] == 0).all()
    assert (out[1] == 0).all() and (w[1] == 0).all()
    assert (out[0, :3] != 0).all()
    assert (q.grad[0, 3:] == 0).all() and (q.grad[1] == 0).all()
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all()
    assert q.grad[0, :3].abs().sum() > 0
    for p in m.parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_fully_masked_everywhere_gives_zero_parameter_gradients():
    m = _module()
    q, k, v = _inputs(B=(2,), requires_grad=True)
    out, w = m(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.bool))
    (out.sum() + w.sum()).backward()
    assert (out == 0).all() and (w == 0).all()
    for t in (q, k, v, *m.parameters()):
        assert (t.grad == 0).all()


def _run_with_grads(m, q, k, v, **kwargs):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    m.zero_grad()
    out, w = m(q, k, v, **kwargs)
    (out.square().sum() + w.square().sum()).backward()
    return out.detach(), w.detach(), [t.grad.clone() for t in (q, k, v, *m.parameters())]


@pytest.mark.parametrize("garbage", [math.nan, math.inf, -math.inf])
def test_garbage_in_masked_keys_values_and_queries_never_leaks(garbage):
    m = _module()
    q, k, v = _inputs(B=(2,), Lq=5, Lk=7)
    kwargs = {"mask": masks.padding([7, 3], q_lengths=[5, 4])}  # batch 1: keys >= 3 and row 4 masked
    clean = _run_with_grads(m, q, k, v, **kwargs)
    q_bad, k_bad, v_bad = q.clone(), k.clone(), v.clone()
    k_bad[1, 3:] = garbage
    v_bad[1, 3:, 1] = garbage
    q_bad[1, 4] = garbage
    dirty = _run_with_grads(m, q_bad, k_bad, v_bad, **kwargs)
    for a, b in zip((clean[0], clean[1], *clean[2]), (dirty[0], dirty[1], *dirty[2])):
        assert torch.isfinite(b).all()
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_nan_in_an_allowed_key_or_value_shows_in_exactly_the_rows_that_see_it():
    m = _module()
    q, k, v = _inputs(B=(1,), Lq=6, Lk=6)
    out_clean, w_clean = m(q, k, v, mask=masks.causal())
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[0, 3, 0] = math.nan  # rows >= 3 see key 3
    out, w = m(q, k_bad, v, mask=masks.causal())
    assert out[0, 3:].isnan().all() and w[0, 3:].isnan().all()
    assert torch.equal(out[0, :3], out_clean[0, :3]) and torch.equal(w[0, :3], w_clean[0, :3])
    v_bad[0, 4, 2] = math.nan  # rows >= 4 use value 4; only its feature 2 turns NaN
    out, w = m(q, k, v_bad, mask=masks.causal())
    assert out[0, 4:, 2].isnan().all() and torch.isfinite(out[0, 4:, :2]).all()
    assert torch.equal(out[0, :4], out_clean[0, :4]) and torch.equal(w, w_clean)


def test_weight_rows_sum_to_one_where_a_key_is_allowed():
    m = _module()
    q, k, v = _inputs(B=(3,), Lq=9, Lk=8)
    allowed = torch.rand(3, 9, 8, generator=torch.Generator().manual_seed(5)) > 0.7
    allowed[0, 2] = False  # make sure one row sees nothing
    _, w = m(q, k, v, attn_mask=allowed)
    sums = w.sum(-1)
    any_allowed = allowed.any(-1)
    assert torch.allclose(sums[any_allowed], torch.ones_like(sums[any_allowed]), atol=1e-14)
    assert (sums[~any_allowed] == 0).all() and (~any_allowed).any()
    assert (w[~allowed] == 0).all()


def test_leading_batch_dims_broadcast_like_torch():
    m = _module()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 4, 5, generator=g, dtype=F64)  # (2, 3, Lq, Dq)
    k = torch.randn(3, 6, 4, generator=g, dtype=F64)  # (3, Lk, Dk)
    v = torch.randn(2, 1, 6, 2, generator=g, dtype=F64)  # (2, 1, Lk, Ev)
    attn_mask = torch.rand(3, 4, 6, generator=g) > 0.3  # (3, Lq, Lk)
    ignore = torch.rand(2, 3, 6, generator=g) > 0.8  # (*batch, Lk)
    out, w = m(q, k, v, attn_mask=attn_mask, key_padding_mask=ignore, mask=masks.padding([6, 6, 5]))
    allowed = attn_mask & ~ignore[..., None, :] & (torch.arange(6) < torch.tensor([6, 6, 5])[:, None, None])
    out_ref, w_ref = brute_force_batched(m, q, k, v, allowed)
    assert out.shape == (2, 3, 4, 2) and w.shape == (2, 3, 4, 6)
    assert torch.allclose(out, out_ref, atol=1e-12, rtol=0)
    assert torch.allclose(w, w_ref, atol=1e-12, rtol=0)


def test_no_batch_dims():
    m = _module()
    q, k, v = _inputs(B=())
    out, w = m(q, k, v, mask=masks.causal())
    out_ref, w_ref = brute_force(m, q, k, v, torch.ones(5, 7, dtype=torch.bool).tril())
    assert out.shape == (5, 3) and torch.allclose(out, out_ref, atol=1e-12, rtol=0)
    assert torch.allclose(w, w_ref, atol=1e-12, rtol=0)


def test_blocks_of_query_rows_change_nothing(monkeypatch):
    m = AdditiveAttention(16, 16, 32).double()
    x = torch.randn(2, 33, 16, dtype=F64)
    whole = _run_with_grads(m, x, x, x, mask=masks.causal())
    monkeypatch.setattr(additive, "_BLOCK_ELEMENTS", 2 * 33 * 32 * 5)  # 5 rows per block, a ragged last one
    blocked = _run_with_grads(m, x, x, x, mask=masks.causal())
    for a, b in zip((whole[0], whole[1], *whole[2]), (blocked[0], blocked[1], *blocked[2])):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-12)


def test_empty_problems():
    m = _module()
    q, k, v = _inputs(B=(2,), Lq=5, Lk=0)
    out, w = m(q, k, v)
    assert out.shape == (2, 5, 3) and (out == 0).all() and w.shape == (2, 5, 0)
    q, k, v = _inputs(B=(2,), Lq=0, Lk=4)
    out, w = m(q, k, v)
    assert out.shape == (2, 0, 3) and w.shape == (2, 0, 4)


def test_bfloat16_is_close_to_float64():
    m = _module()
    q, k, v = _inputs()
    out_ref, _ = m(q, k, v, mask=masks.causal())
    out, w = m.to(torch.bfloat16)(*(x.to(torch.bfloat16) for x in (q, k, v)), mask=masks.causal())
    assert out.dtype == w.dtype == torch.bfloat16
    assert (out.double() - out_ref).abs().max() < 0.1


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count(bias):
    m = AdditiveAttention(10, 7, 12, bias=bias)
    assert sum(p.numel() for p in m.parameters()) == 12 * (10 + 7 + 1) + (12 if bias else 0)


@pytest.mark.parametrize("call,error,words", [
    (lambda m, q, k, v: m(q[..., :4], k, v), ValueError,
     "query has 4 features (last dim) but the module was built with query_dim=5"),
    (lambda m, q, k, v: m(q, k[..., :3], v), ValueError, "key_dim=4"),
    (lambda m, q, k, v: m(q, k, v[:, :6]), ValueError, "value has 6 positions"),
    (lambda m, q, k, v: m(q, k, v.float()), TypeError, "value has dtype torch.float32"),
    (lambda m, q, k, v: m(q[None].expand(3, 2, 5, 5), k[None].expand(2, 2, 7, 4), v), ValueError, "do not broadcast"),
    (lambda m, q, k, v: m(q, k, v, attn_mask=torch.ones(3, 5, 7, dtype=torch.bool)), ValueError,
     "attn_mask has shape (3, 5, 7)"),
    (lambda m, q, k, v: m(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.long)), TypeError, "torch.int64"),
    (lambda m, q, k, v: m(q, k, v, key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError,
     "key_padding_mask has shape (2, 6)"),
    (lambda m, q, k, v: m(q, k, v, mask=masks.dense(torch.ones(2, 5, 7, dtype=torch.bool))), ValueError,
     "additive attention has one head"),
    (lambda m, q, k, v: m(q, k, v, mask=torch.ones(5, 7, dtype=torch.bool)), TypeError, "pass tensors as attn_mask"),
])
def test_errors_name_the_value_and_the_fix(call, error, words):
    m = _module()
    q, k, v = _inputs()
    with pytest.raises(error, match=re.escape(words)):
        call(m, q, k, v)


def test_constructor_rejects_bad_sizes():
    with pytest.raises(ValueError, match="hidden_dim must be a positive int, got 0"):
        AdditiveAttention(4, 4, 0)
