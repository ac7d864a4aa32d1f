"""dotattn.diagnostics: the Monitor's statistics against the same numbers computed from dense float64 weights."""

from __future__ import annotations

import math

import pytest
import torch

import dotattn
from dotattn import diagnostics, masks
from dotattn.benchmarking import peak_bytes
from dotattn.nn import MultiHeadAttention
from tests.conftest import engine_cases, qkv


def dense_stats(q, k, mask, scale=None):
    """Per-head statistics from the full (B, H, Lq, Lk) float64 logits and weights, GQA by repeating k."""
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    Lq, Lk = q.shape[-2], k.shape[-2]
    s = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    allowed = torch.ones_like(s, dtype=torch.bool)
    if mask is not None:
        dense = mask.to_dense(Lq, Lk)
        if dense.dtype == torch.bool:
            allowed = allowed & dense
        else:
            s = s + dense.double()
            allowed = allowed & (dense > float("-inf"))
    s = s.masked_fill(~allowed, float("-inf"))
    sees = allowed.any(-1)  # (B, H, Lq)
    p = torch.softmax(s, -1).nan_to_num(0)
    plogp = torch.where(p > 0, p * p.log(), 0)
    entropy = -plogp.sum(-1)
    n = allowed.sum(-1).double()
    normalized = torch.where(n > 1, entropy / n.log().clamp(min=1e-300), 0)
    rows = sees.sum((0, 2)).double()
    s_ok = torch.where(allowed, s, 0)
    mean = s_ok.sum((0, 2, 3)) / allowed.sum((0, 2, 3))
    std = ((torch.where(allowed, s - mean[:, None, None], 0) ** 2).sum((0, 2, 3)) / allowed.sum((0, 2, 3))).sqrt()

    def per_row_mean(x):
        return torch.where(sees, x, 0).sum((0, 2)) / rows

    return {
        "score_mean": mean, "score_std": std, "entropy": per_row_mean(entropy),
        "normalized_entropy": per_row_mean(normalized), "max_prob": per_row_mean(p.amax(-1)),
        "first_token_mass": per_row_mean(p[..., 0]), "masked_rows": (~sees).sum((0, 2)).double(),
        "max_logit": s.amax((0, 2, 3)),
    }


MASKS = {
    "none": None,
    "causal": masks.causal(),
    "padding_bottom_right": masks.padding([150, 0, 90]) & masks.causal(align="bottom_right"),
    "window": masks.sliding_window(40),
    # tiles full in one batch row and partial in another
    "padding_per_row": masks.padding([280, 100, 280], q_lengths=[300, 120, 260]),
    "float_bias": masks.dense(torch.randn(3, 1, 300, 280, generator=torch.Generator().manual_seed(1))),
}


@pytest.mark.parametrize("engine,dtype", engine_cases())
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_statistics_match_dense_weights(engine, dtype, mask_name):
    q, k, v = qkv(3, 4, 300, 16, Hkv=2, Lk=280, dtype=dtype)
    mask = MASKS[mask_name]
    with diagnostics.Monitor() as monitor:
        dotattn.scaled_dot_product_attention(q, k, v, mask=mask, enable_gqa=True, engine=engine)
    (stats,) = monitor
    assert stats.name == "call 0" and stats.calls == 1 and stats.heads == 4
    for name, want in dense_stats(q, k, mask).items():
        tol = 2e-4 if dtype == torch.float32 else 2e-2  # the engine's lse against exact float64
        torch.testing.assert_close(getattr(stats, name), want, atol=tol, rtol=tol, msg=name)


def test_results_are_unchanged_and_lse_is_not_added():
    q, k, v = qkv(2, 2, 40, 8)
    plain = dotattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    with diagnostics.Monitor():
        watched = dotattn.scaled_dot_product_attention(q, k, v, is_causal=True)
        with_weights = dotattn.scaled_dot_product_attention(q, k, v, is_causal=True, return_weights=True)
    assert torch.equal(plain, watched)
    assert with_weights.lse is None and with_weights.weights is not None
    assert diagnostics.active() is None


def test_gradients_flow_while_monitoring():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 20, 8))
    with diagnostics.Monitor():
        dotattn.scaled_dot_product_attention(q, k, v).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_calls_are_named_by_module_and_add_up_over_runs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(MultiHeadAttention(16, 4), MultiHeadAttention(16, 2))
    x = torch.randn(2, 10, 16)

    def run(x):
        for layer in model:
            x = layer(x)
        return x

    with diagnostics.Monitor(model) as monitor:
        run(x)
        run(x)
    assert list(monitor.layers) == ["0", "1"]
    assert [s.calls for s in monitor] == [2, 2]
    assert [s.heads for s in monitor] == [4, 2]
    assert monitor.layers["0"].rows.tolist() == [40.0] * 4  # 2 runs x batch 2 x 10 rows
    # the hooks are gone after the block
    with diagnostics.Monitor() as unnamed:
        run(x)
    assert list(unnamed.layers) == ["call 0", "call 1"]


def test_one_name_with_two_head_counts_is_an_error():
    with diagnostics.Monitor() as monitor:
        monitor._running.append("shared")
        dotattn.scaled_dot_product_attention(*qkv(1, 4, 5, 8))
        with pytest.raises(ValueError, match="4 heads and then 2"):
            dotattn.scaled_dot_product_attention(*qkv(1, 2, 5, 8))


def test_flags_find_saturated_uniform_sink_masked_and_nonfinite_heads():
    q, k, v = qkv(1, 4, 64, 16)
    q[0, 0] *= 40  # head 0: very peaked rows
    q[0, 1] = 0  # head 1: uniform rows
    q[0, 2] = k[0, 2, :1] * 20  # head 2: every query points at key 0
    v[0, 3, 5, 0] = float("nan")  # head 3: NaN at a key every row sees
    with diagnostics.Monitor() as monitor:
        dotattn.scaled_dot_product_attention(q, k, v, mask=masks.padding([64], q_lengths=[60]))
    flags = {(f.head, f.what) for f in monitor.flags()}
    assert (0, "saturated") in flags and (1, "near-uniform") in flags and (2, "attention sink") in flags
    assert (3, "non-finite rows") in flags and (3, "masked rows") in flags
    assert not any(h == 1 and w == "saturated" for h, w in flags)
    stats = next(iter(monitor))
    assert stats.normalized_entropy[1] == pytest.approx(1.0, abs=1e-6)
    assert stats.entropy[1] == pytest.approx(math.log(64), abs=1e-5)
    assert stats.masked_rows.tolist() == [4.0] * 4
    assert "saturated" in monitor.table() and "attention sink" in str(monitor.flags()[0]) + monitor.table()


def test_tiled_engine_is_monitored_without_the_weights_matrix():
    L = 2048
    q, k, v = qkv(1, 1, L, 32)
    with diagnostics.Monitor() as monitor:
        peak = peak_bytes(lambda: dotattn.scaled_dot_product_attention(q, k, v, is_causal=True, engine="tiled"))
    assert monitor.layers["call 0"].rows.item() == L
    assert peak < L * L * 4 / 4, f"peak {peak} bytes; the L x L float32 weights alone are {L * L * 4}"


def test_plot_draws_a_grid(tmp_path):
    pytest.importorskip("matplotlib")
    with diagnostics.Monitor() as monitor:
        for H in (4, 2):
            dotattn.scaled_dot_product_attention(*qkv(1, H, 12, 8))
    path = monitor.plot(tmp_path / "d.png")
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="no attention call"):
        diagnostics.Monitor().plot(tmp_path / "e.png")
