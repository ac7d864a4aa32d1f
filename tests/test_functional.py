"""The drop-in promise: torch's results wherever torch's are defined, and the dispatcher."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import dotattn
from dotattn import engines, masks
from dotattn._inputs import prepare
from dotattn.engines import Engine, Support
from tests.conftest import qkv


@st.composite
def torch_problems(draw):
    """A random call in torch's own domain, float64."""
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    Hkv = draw(st.integers(1, 3))
    Hq = Hkv * draw(st.integers(1, 3))
    Lq, Lk = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    E, Ev = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    q, k, v = qkv(batch, Hq, Lq, E, Hkv=Hkv, Lk=Lk, Ev=Ev, dtype=torch.float64, seed=draw(st.integers(0, 99)))
    kind = draw(st.sampled_from(["none", "bool", "float", "causal"]))
    kwargs = {"enable_gqa": Hq != Hkv, "scale": draw(st.sampled_from([None, 0.0, 0.3, 2.0]))}
    g = torch.Generator().manual_seed(1)
    shape = draw(st.sampled_from([(Lq, Lk), (1, Lk), (Hq, 1, Lk), (*batch, Hq, Lq, Lk)]))
    if kind == "bool":
        kwargs["attn_mask"] = torch.rand(shape, generator=g) > 0.3  # includes fully masked rows
    elif kind == "float":
        kwargs["attn_mask"] = torch.randn(shape, generator=g, dtype=torch.float64)
    elif kind == "causal":
        kwargs["is_causal"] = True
    return q, k, v, kwargs


@settings(max_examples=150, deadline=None)
@given(torch_problems())
def test_matches_torch_math_backend_in_float64(problem):
    q, k, v, kwargs = problem
    with sdpa_kernel(SDPBackend.MATH):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    got = dotattn.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def test_matches_torch_default_backend_in_float32():
    q, k, v = qkv(2, 4, 50, 32, Lk=70)
    bias = torch.randn(50, 70)
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": bias}, {"attn_mask": bias > 0}):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
        torch.testing.assert_close(dotattn.scaled_dot_product_attention(q, k, v, **kwargs), expected)


def test_causal_alignments_when_lengths_differ():
    q, k, v = qkv(1, 1, 3, 4, Lk=5, dtype=torch.float64)
    top_left = dotattn.scaled_dot_product_attention(q, k, v, is_causal=True, return_weights=True).weights
    bottom_right = dotattn.scaled_dot_product_attention(
        q, k, v, mask=masks.causal(align="bottom_right"), return_weights=True
    ).weights
    assert ((top_left[0, 0] > 0) == torch.tril(torch.ones(3, 5, dtype=torch.bool))).all()
    assert ((bottom_right[0, 0] > 0) == torch.tril(torch.ones(3, 5, dtype=torch.bool), diagonal=2)).all()


def test_lse_is_the_log_of_the_softmax_denominator():
    q, k, v = qkv(2, 2, 9, 8, Lk=11, dtype=torch.float64)
    bias = torch.randn(9, 11, dtype=torch.float64)
    res = dotattn.scaled_dot_product_attention(q, k, v, bias, scale=0.7, return_lse=True, return_weights=True)
    scores = q @ k.transpose(-2, -1) * 0.7 + bias
    torch.testing.assert_close(res.lse, torch.logsumexp(scores, -1))
    torch.testing.assert_close(res.weights, torch.softmax(scores, -1))


class _Picky(Engine):
    """A test engine that runs only float64 on a device that does not exist."""

    name = "picky"
    description = "test double"
    support = Support(devices=("tpu",), dtypes=(torch.float64,), dropout=False)
    priority = 100

    def extra_reasons(self, problem):
        return ["it is a test double"]


@pytest.fixture
def picky(monkeypatch):
    for name in ("_REGISTRY", "_ORDER", "_NAMES"):  # restored after the test, with _Picky gone
        monkeypatch.setattr(engines.registry, name, copy.copy(getattr(engines.registry, name)))
    engines.register(_Picky())


def test_forced_engine_lists_every_reason(picky):
    q, k, v = qkv(1, 1, 4, 4)
    with pytest.raises(dotattn.EngineNotSupportedError) as info:
        dotattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5, engine="picky")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message.startswith("picky cannot run this:")
    for reason in ["device cpu is not supported (use tpu)", "dtype float32 is not supported on cpu (use float64)",
                   "dropout_p=0.5 is not supported", "it is a test double"]:
        assert reason in message


def test_auto_skips_an_engine_that_cannot_run_and_explains_why(picky):
    q, k, v = qkv(1, 1, 4, 4)
    explanation = dotattn.explain(q, k, v)
    problem = prepare(q, k, v)  # auto takes the highest-ranked engine that can run it and does not pass it over
    first = next(e.name for e in engines.available() if not e.reasons(problem) and e.auto_skip(problem) is None)
    assert explanation.engine == first != "picky" and explanation.requested == "auto"
    assert "device cpu is not supported" in " ".join(explanation.rejected["picky"])
    text = str(explanation)
    assert text.splitlines()[0].startswith(f"engine: {explanation.engine} (chosen by auto)")
    assert "picky: device cpu is not supported" in text
    assert "reference: could run it, but" in text


def test_use_engine_nests_and_explicit_engine_wins(picky):
    q, k, v = qkv(1, 1, 4, 4)
    with dotattn.use_engine("picky"):
        assert dotattn.explain(q, k, v).engine is None
        with dotattn.use_engine("auto"):
            assert dotattn.explain(q, k, v).engine not in (None, "picky")
        assert dotattn.explain(q, k, v, engine="reference").engine == "reference"
    assert dotattn.explain(q, k, v).requested == "auto"


def test_auto_passes_tiled_over_for_tiny_tensor_masked_problems_but_a_forced_tiled_runs_them():
    tiny = [x.requires_grad_() for x in qkv(1, 1, 8, 4)]  # training: split_k would hand it to tiled
    dense = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    explanation = dotattn.explain(*tiny, dense)
    assert explanation.engine == "reference"
    assert "the problem is small" in " ".join(explanation.rejected["tiled"])
    assert dotattn.explain(*tiny, dense, engine="tiled").engine == "tiled"
    with dotattn.use_engine("tiled"):
        assert dotattn.explain(*tiny, dense).engine == "tiled"
    # no mask, or a mask made of numbers only (its tiles are cached): tiled at any size
    assert dotattn.explain(*tiny).engine == "tiled"
    assert dotattn.explain(*tiny, is_causal=True).engine == "tiled"
    assert dotattn.explain(*qkv(1, 8, 64, 4), dense.repeat(8, 8)).engine == "tiled"


def test_explain_consumes_no_randomness():
    q, k, v = qkv(1, 1, 4, 4)
    g = torch.Generator().manual_seed(3)
    dotattn.explain(q, k, v, dropout_p=0.5, generator=g)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(3).get_state())
