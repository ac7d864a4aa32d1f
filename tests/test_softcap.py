"""Logit soft-capping (softcap=): scores -> c·tanh(scores/c) before the mask, forward and backward."""

from __future__ import annotations

import pytest
import torch

import dotattn
from dotattn import engines, masks
from dotattn.testing import assert_matches_oracle
from tests.conftest import engine_cases, qkv

CAPPED = [c for c in engine_cases() if engines.get(c.values[0]).support.softcap]
UNCAPPED = sorted({c.values[0] for c in engine_cases()} - {c.values[0] for c in CAPPED})


@pytest.mark.parametrize("engine,dtype", CAPPED)
@pytest.mark.parametrize("case", ["none", "causal-gqa", "bias", "padding"])
def test_softcap_matches_the_oracle_forward_and_backward(engine, dtype, case):
    # scale 1 and a cap of 5: many scores sit where tanh bends
    q, k, v = qkv(2, 4, 33, 16, Hkv=2 if case == "causal-gqa" else 4, Lk=40, dtype=dtype)
    kwargs: dict = dict(softcap=5.0, scale=1.0, enable_gqa=case == "causal-gqa")
    if case == "causal-gqa":
        kwargs["is_causal"] = True
    elif case == "bias":
        kwargs["attn_mask"] = torch.randn(2, 1, 33, 40, generator=torch.Generator().manual_seed(1)).to(dtype)
    elif case == "padding":
        kwargs["mask"] = masks.padding([40, 17], q_lengths=[33, 20])
    attn_mask = kwargs.pop("attn_mask", None)
    assert_matches_oracle(q, k, v, attn_mask, engine=engine, **kwargs)


def test_the_oracle_caps_the_scores():
    q, k, v = qkv(1, 1, 5, 4, dtype=torch.float64)
    ours = dotattn.scaled_dot_product_attention(q * 10, k, v, softcap=2.0, return_weights=True)
    s = (q * 10 @ k.transpose(-2, -1)) / 2
    expected = torch.softmax(2.0 * torch.tanh(s / 2.0), -1)
    torch.testing.assert_close(ours.weights, expected)


@pytest.mark.parametrize("engine", UNCAPPED)
def test_an_engine_without_it_says_so(engine):
    q, k, v = qkv(1, 2, 8, 16)
    explanation = dotattn.explain(q, k, v, softcap=30.0, engine=engine)
    assert explanation.engine is None
    assert any("softcap=30.0 is not supported" in r for r in explanation.rejected[engine])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decoding_step_is_capped_on_the_split_k_kernel(dtype):
    q, k, v = qkv(2, 8, 3, 64, Hkv=2, Lk=700, dtype=dtype)  # 3 queries per head against a 700-key cache
    mask = masks.padding(torch.tensor([700, 420]), side="left") & masks.causal(align="bottom_right")
    kwargs = dict(mask=mask, enable_gqa=True, softcap=2.0, scale=0.5)
    assert dotattn.explain(q, k, v, **kwargs).detail.startswith("split-K kernel")
    assert_matches_oracle(q, k, v, engine="split_k", backward=False, **kwargs)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), "50"])
def test_a_bad_softcap_names_the_fix(bad):
    q, k, v = qkv(1, 1, 4, 4)
    with pytest.raises(ValueError, match="softcap must be a positive finite number"):
        dotattn.scaled_dot_product_attention(q, k, v, softcap=bad)


def test_gemma2_through_transformers_matches_eager():
    transformers = pytest.importorskip("transformers")
    import dotattn.hf

    name = dotattn.hf.register()
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, sliding_window=4, attn_logit_softcapping=1.0, final_logit_softcapping=None)
    model = transformers.Gemma2ForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for impl in ("eager", name):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(input_ids=ids).logits
    torch.testing.assert_close(logits[name], logits["eager"], atol=1e-5, rtol=1e-4)


def test_the_monitor_measures_the_capped_logits():
    from dotattn.diagnostics import Monitor

    q, k, v = qkv(1, 2, 40, 16, dtype=torch.float64)
    with Monitor() as monitor:
        res = dotattn.scaled_dot_product_attention(q * 30, k, v, softcap=3.0, return_weights=True)
    stats = next(iter(monitor))
    p = res.weights
    entropy = -(p * p.clamp(min=1e-300).log()).sum(-1).mean((0, 2))  # per head
    torch.testing.assert_close(stats.entropy, entropy, atol=1e-9, rtol=1e-9)
    assert float(stats.score_mean.abs().max()) <= 3.0  # every capped logit lies in (-3, 3)
