"""score_mod=: FlexAttention's function of the scores, against a literal float64 oracle, with gradients
to q, k, v and to the tensors it captures, on every engine that takes it (and a clear reason on the others)."""

from __future__ import annotations

import functools

import pytest
import torch

import dotattn
from dotattn import masks

B, H, Lq, Lk, E = 2, 4, 37, 300, 16  # several key tiles and query chunks of the tiled engine
ENGINES = ["reference", "tiled", "tiled_torch_ops", "split_k"]  # split_k hands it to tiled


def _slopes() -> torch.Tensor:
    return (2.0 ** -torch.arange(1, H + 1, dtype=torch.float32)).requires_grad_()


def _mods() -> dict:
    """name -> (score_mod, the tensors it captures that require grad)."""
    slopes = _slopes()
    table = (0.1 * torch.randn(Lq + Lk - 1, generator=torch.Generator().manual_seed(1))).requires_grad_()
    per_batch = torch.tensor([0.5, -0.25], requires_grad=True)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def relative(score, b, h, q_idx, kv_idx, bias):
        return score + bias[q_idx - kv_idx + Lk - 1]

    return {
        "distance": (lambda score, b, h, q_idx, kv_idx: score - 0.01 * (q_idx - kv_idx).abs(), []),
        "alibi (captured slopes)": (alibi, [slopes]),
        "relative table (partial)": (functools.partial(relative, bias=table), [table]),
        "per batch row": (lambda score, b, h, q_idx, kv_idx: score * (1 + per_batch[b]), [per_batch]),
        "tanh cap": (lambda score, b, h, q_idx, kv_idx: 5.0 * torch.tanh(score / 5.0), []),
    }


MODS = list(_mods())
MASKS = {
    "none": lambda: None,
    "causal": lambda: masks.causal("bottom_right"),
    "padding, a row with no key": lambda: masks.padding(torch.tensor([Lk, 0])),
}


def _oracle(q, k, v, score_mod, mask):
    """The literal steps in float64: out, lse."""
    q, k, v = (x.double() for x in (q, k, v))
    s = q @ k.transpose(-2, -1) / E**0.5
    b = torch.arange(B)[:, None, None, None]
    h = torch.arange(H)[:, None, None]
    s = score_mod(s, b, h, torch.arange(Lq)[:, None], torch.arange(Lk))
    if mask is not None:
        s = s.masked_fill(~mask.to_dense(Lq, Lk), float("-inf"))
    lse = torch.logsumexp(s, -1)
    alive = lse > float("-inf")
    p = torch.where(alive[..., None], torch.exp(s - torch.where(alive, lse, 0.0)[..., None]), 0.0)
    return p @ v, lse


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("mod", MODS)
def test_score_mod_matches_the_oracle_with_gradients(engine, mask_kind, mod):
    score_mod, captured = _mods()[mod]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, E, generator=g).requires_grad_() for L in (Lq, Lk, Lk))
    d_out = torch.randn(B, H, Lq, E, generator=g)
    mask = MASKS[mask_kind]()
    result = dotattn.scaled_dot_product_attention(q, k, v, mask=mask, engine=engine, score_mod=score_mod,
                                                  return_lse=True)
    out_o, lse_o = _oracle(q, k, v, score_mod, mask)
    torch.testing.assert_close(result.output, out_o.float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(result.lse, lse_o.float(), atol=2e-5, rtol=1e-5)
    leaves = [q, k, v, *captured]
    ours = torch.autograd.grad(result.output, leaves, d_out)
    theirs = torch.autograd.grad(out_o, leaves, d_out.double())
    for name, a, b in zip(["dq", "dk", "dv", *["captured"] * len(captured)], ours, theirs):
        torch.testing.assert_close(a, b.to(a.dtype), atol=1e-4 * max(1.0, b.abs().max().item()), rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    if mask_kind.startswith("padding"):  # the row with no key: zeros, lse -inf, no gradient
        assert not result.output[1].any() and (result.lse[1] == float("-inf")).all()
        assert not ours[0][1].any()


def test_score_mod_in_float64_and_bfloat16_on_tiled():
    score_mod, _ = _mods()["alibi (captured slopes)"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, E, generator=g) for L in (Lq, Lk, Lk))
    out_o, _ = _oracle(q, k, v, score_mod, masks.causal())
    out64 = dotattn.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True,
                                                 engine="tiled", score_mod=score_mod)
    torch.testing.assert_close(out64, out_o, atol=1e-12, rtol=1e-12)
    out16 = dotattn.scaled_dot_product_attention(*(x.bfloat16() for x in (q, k, v)), is_causal=True,
                                                 engine="tiled", score_mod=score_mod)
    torch.testing.assert_close(out16.float(), out_o.float(), atol=3e-2, rtol=3e-2)


def test_score_mod_composes_with_softcap_a_float_mask_and_gqa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Lq, E, generator=g).requires_grad_()
    k, v = (torch.randn(B, 2, Lk, E, generator=g).requires_grad_() for _ in range(2))
    bias = torch.randn(1, H, Lq, Lk, generator=g).requires_grad_()
    score_mod = _mods()["distance"][0]
    results = [dotattn.scaled_dot_product_attention(q, k, v, bias, enable_gqa=True, softcap=3.0, score_mod=score_mod,
                                                    engine=e) for e in ("reference", "tiled")]
    torch.testing.assert_close(results[1], results[0], atol=2e-5, rtol=1e-4)
    grads = [torch.autograd.grad(r.sum(), [q, k, v, bias]) for r in results]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_return_weights_apply_the_score_mod():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    score_mod = _mods()["distance"][0]
    weights = dotattn.scaled_dot_product_attention(q, k, v, score_mod=score_mod, return_weights=True).weights
    s = score_mod(q @ k.transpose(-2, -1) / 8**0.5, None, None, torch.arange(5)[:, None], torch.arange(5))
    torch.testing.assert_close(weights, s.softmax(-1))


def test_engines_without_score_mod_say_so_and_compile_raises():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    explanation = dotattn.explain(q, k, v, score_mod=lambda s, b, h, i, j: s)
    assert explanation.engine == "tiled"
    assert "score_mod" in " ".join(explanation.rejected.get("triton", ["score_mod"]))
    assert "score_mod" in explanation.detail  # torch ops, because ...
    assert any("score_mod" in limit for limit in explanation.compile_limits)
    with pytest.raises(TypeError, match="score_mod must be a function"):
        dotattn.scaled_dot_product_attention(q, k, v, score_mod=3)
    with pytest.raises(ValueError, match="does not broadcast"):
        dotattn.scaled_dot_product_attention(q, k, v, score_mod=lambda s, b, h, i, j: s[..., :2])


def test_a_monitor_measures_the_modified_scores():
    from dotattn.diagnostics import Monitor

    q, k, v = (torch.randn(1, 2, 40, 8, generator=torch.Generator().manual_seed(0)) for _ in range(3))
    shift = lambda score, b, h, q_idx, kv_idx: score + 100.0 * (kv_idx == 3)  # noqa: E731
    with Monitor() as monitor:
        dotattn.scaled_dot_product_attention(q, k, v, is_causal=True, score_mod=shift)
    (recorded,) = monitor.layers.values()
    assert (recorded.max_logit > 90).all()  # key 3's +100 is what the softmax saw
