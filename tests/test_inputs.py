"""Every bad call raises ValueError or TypeError that names the argument, the value and the fix."""

from __future__ import annotations

import pytest
import torch

import dotattn
from dotattn import masks

B, H, L, E = 2, 4, 6, 8


def _qkv(**shapes):
    q = torch.randn(shapes.get("q", (B, H, L, E)))
    k = torch.randn(shapes.get("k", (B, H, L, E)))
    v = torch.randn(shapes.get("v", (B, H, L, E)))
    return q, k, v


def _call(**kwargs):
    q, k, v = _qkv()
    args = {"query": q, "key": k, "value": v, **kwargs}
    return dotattn.scaled_dot_product_attention(**args)


BAD = {
    "query not a tensor": (lambda: _call(query=[[1.0]]), TypeError, ["query", "list"]),
    "value not a tensor": (lambda: _call(value=None), TypeError, ["value", "NoneType"]),
    "integer query": (lambda: _call(query=torch.ones(B, H, L, E, dtype=torch.int64)), TypeError,
                      ["query", "int64", ".float()"]),
    "complex key": (lambda: _call(key=torch.ones(B, H, L, E, dtype=torch.complex64)), TypeError,
                    ["key", "complex64"]),
    "1-d query": (lambda: _call(query=torch.randn(E)), ValueError, ["query", "(8,)", "at least 2 dims"]),
    "head dims differ": (lambda: _call(key=torch.randn(B, H, L, 5)), ValueError,
                         ["key has head dim 5", "query has 8", "share the last dim"]),
    "lengths of k and v differ": (lambda: _call(value=torch.randn(B, H, L + 1, E)), ValueError,
                                  ["value has 7 positions", "key has 6"]),
    "heads of k and v differ": (lambda: _call(value=torch.randn(B, 2, L, E)), ValueError,
                                ["value has 2 heads", "key has 4"]),
    "batch dims do not broadcast": (lambda: _call(key=torch.randn(3, H, L, E), value=torch.randn(3, H, L, E)),
                                    ValueError, ["(2,)", "(3,)", "do not broadcast"]),
    "heads differ without enable_gqa": (
        lambda: _call(key=torch.randn(B, 2, L, E), value=torch.randn(B, 2, L, E)), ValueError,
        ["query has 4 heads", "have 2", "enable_gqa=True"]),
    "Hq not a multiple of Hkv": (
        lambda: _call(key=torch.randn(B, 3, L, E), value=torch.randn(B, 3, L, E), enable_gqa=True),
        ValueError, ["4 heads", "3", "multiple"]),
    "dtype mismatch": (lambda: _call(key=torch.randn(B, H, L, E, dtype=torch.float64)), TypeError,
                       ["key has dtype torch.float64", "query has torch.float32", "key.to(query.dtype)"]),
    "device mismatch": (lambda: _call(value=torch.randn(B, H, L, E, device="meta")), ValueError,
                        ["value is on meta", "query is on cpu"]),
    "attn_mask wrong shape": (lambda: _call(attn_mask=torch.ones(L, L + 1, dtype=torch.bool)), ValueError,
                              ["attn_mask has shape (6, 7)", "(2, 4, 6, 6)"]),
    "attn_mask too many dims": (lambda: _call(attn_mask=torch.ones(3, B, H, L, L, dtype=torch.bool)),
                                ValueError, ["attn_mask has shape (3, 2, 4, 6, 6)"]),
    "attn_mask integer": (lambda: _call(attn_mask=torch.ones(L, L, dtype=torch.int32)), TypeError,
                          ["attn_mask has dtype torch.int32", "bool"]),
    "attn_mask not a tensor": (lambda: _call(attn_mask=[[True]]), TypeError, ["attn_mask", "list"]),
    "attn_mask on another device": (lambda: _call(attn_mask=torch.ones(L, L, dtype=torch.bool, device="meta")),
                                    ValueError, ["attn_mask is on meta", "attn_mask.to('cpu')"]),
    "dropout_p negative": (lambda: _call(dropout_p=-0.1), ValueError, ["dropout_p", "-0.1", "[0, 1)"]),
    "dropout_p one": (lambda: _call(dropout_p=1.0), ValueError, ["dropout_p", "1.0"]),
    "dropout_p a string": (lambda: _call(dropout_p="0.1"), TypeError, ["dropout_p", "str"]),
    "scale nan": (lambda: _call(scale=float("nan")), ValueError, ["scale must be finite", "nan"]),
    "scale inf": (lambda: _call(scale=float("inf")), ValueError, ["scale must be finite", "inf"]),
    "scale a string": (lambda: _call(scale="0.5"), TypeError, ["scale", "str"]),
    "scale a tensor": (lambda: _call(scale=torch.tensor(0.5)), TypeError, ["scale", "Tensor"]),
    "is_causal not a bool": (lambda: _call(is_causal="yes"), TypeError, ["is_causal", "'yes'"]),
    "mask not a Mask": (lambda: _call(mask=torch.ones(L, L, dtype=torch.bool)), TypeError,
                        ["mask must be a dotattn.masks.Mask", "masks.dense()"]),
    "generator wrong type": (lambda: _call(dropout_p=0.1, generator=0), TypeError, ["generator", "int"]),
    "negative window": (lambda: masks.sliding_window(-1), ValueError, ["before", "-1"]),
    "kv length longer than the sequence": (lambda: _call(mask=masks.padding([L, L + 3])), ValueError,
                                           ["9", "6"]),
    "q length longer than the sequence": (lambda: _call(mask=masks.padding([L, L], q_lengths=[L + 1, 1])),
                                          ValueError, ["7", "6"]),
    "padding of the wrong batch size": (lambda: _call(mask=masks.padding([1, 2, 3])), ValueError,
                                        ["padding", "(3, 1)", "(2, 4)"]),
    "document ids of the wrong length": (lambda: _call(mask=masks.documents(torch.zeros(L + 2, dtype=torch.long))),
                                         ValueError, ["8", "6"]),
    "unknown engine": (lambda: _call(engine="fast"), ValueError, ["unknown engine 'fast'", "'reference'", "'auto'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_explained(case):
    make, error, fragments = BAD[case]
    with pytest.raises(error) as info:
        make()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_use_engine_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown engine 'nope'"):
        with dotattn.use_engine("nope"):
            pass


def test_errors_are_raised_before_any_work():
    q, k, v = _qkv()
    with pytest.raises(ValueError):
        dotattn.explain(q, k, torch.randn(B, H, L + 1, E))


def test_heads_of_one_broadcast_as_in_torch():
    q, k, v = _qkv(k=(B, 1, L, E), v=(B, 1, L, E))
    out = dotattn.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_zero_head_dim_needs_a_scale():
    q = torch.randn(2, 3, 0)
    with pytest.raises(ValueError, match="head dim 0.*pass scale="):
        dotattn.scaled_dot_product_attention(q, q, torch.randn(2, 3, 4))
    out = dotattn.scaled_dot_product_attention(q, q, torch.ones(2, 3, 4), scale=1.0)
    torch.testing.assert_close(out, torch.ones(2, 3, 4))
