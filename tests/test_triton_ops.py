"""The Triton kernels as ``torch.library.triton_op`` operators (``dotattn.engines.triton.ops``).

In Triton's interpreter (conftest sets TRITON_INTERPRET=1) the operators run eagerly on CPU
tensors: against the float64 oracle under the 2x rule, forward and backward, for each mask the
traced path hands them (row spans of causal, windows, padding, prefix-LM and their AND); with
garbage in the inputs; through opcheck. Their graph operations (tile lists, the NaN marking)
equal what the eager engine derives from data.

What torch.compile makes of them needs Triton's real jit functions, which the interpreter
replaces, and CUDA tensors. A subprocess without TRITON_INTERPRET (``tests/fake_cuda_trace.py``)
traces calls on fake CUDA tensors with a stand-in Triton driver that names an sm_90 target
(no GPU, no CUDA build of torch), through ``torch.compile(fullgraph=True)`` with a backend
that keeps the graphs AOTAutograd hands Inductor: each graph must hold the kernels' launches,
with Triton's own analysis of what each launch writes, and no ``dotattn::attention``; and
``torch.export`` must keep the operator as a call. A trace on fake CUDA tensors cannot take
gradients (autograd needs a CUDA device guard), so the backward operator is traced on its
own; its autograd wiring is checked in the interpreter.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dotattn import masks
from dotattn._inputs import prepare
from dotattn._nonfinite import mark_seen_in_spans, mark_visible_garbage
from dotattn._tiles import row_spans, span_tile_lists, tile_lists
from dotattn.engines import AttentionResult
from dotattn.engines.split_k import traced_spans
from dotattn.engines.triton import MISSING
from dotattn.engines.triton import ops as triton_ops
from dotattn.testing import assert_matches_oracle, oracle
from tests.conftest import qkv

needs_triton = pytest.mark.skipif(MISSING is not None or not hasattr(torch.library, "triton_op"),
                                  reason=str(MISSING or "this torch has no torch.library.triton_op"))


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The operators, which dotattn registers on a trace's first use."""
    triton_ops.register()


def through_op(q, k, v, attn_mask=None, *, engine, return_lse, mask=None, is_causal=False, scale=None,
               enable_gqa=False, softcap=None):
    """scaled_dot_product_attention's call as the traced path makes it: the mask as row spans."""
    assert attn_mask is None and engine == "triton" and return_lse
    combined = masks.causal() if is_causal else None
    if mask is not None:
        combined = mask if combined is None else combined & mask
    batch = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    lo, hi = traced_spans(combined, q.shape[-2], k.shape[-2], (*batch, *q.shape[-3:-1]), flag_oversized=False)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return AttentionResult(*torch.ops.dotattn.triton_attention(q, k, v, lo, hi, scale, softcap or 0.0))


# (name, qkv arguments, call keywords): every mask kind the traced path hands the operator
CASES = [
    ("none", dict(B=2, Hq=2, Lq=150), {}),
    ("causal", dict(B=1, Hq=2, Lq=260), dict(is_causal=True)),
    ("causal bottom-right", dict(B=2, Hq=2, Lq=40, Lk=300), dict(mask=masks.causal(align="bottom_right"))),
    ("window", dict(B=1, Hq=2, Lq=300), dict(mask=masks.causal() & masks.sliding_window(48))),
    ("padding", dict(B=2, Hq=2, Lq=300), dict(mask=masks.padding(torch.tensor([300, 77])))),
    ("left padding, padded queries, causal", dict(B=2, Hq=2, Lq=200),
     dict(mask=masks.causal() & masks.padding(torch.tensor([200, 90]), torch.tensor([200, 60]), side="left"))),
    ("prefix-LM", dict(B=2, Hq=2, Lq=180), dict(mask=masks.prefix_lm(50))),
    ("GQA, softcap", dict(B=2, Hq=4, Hkv=2, Lq=160), dict(is_causal=True, enable_gqa=True, softcap=20.0)),
    ("MQA, Ev 40, scale", dict(B=2, Hq=4, Hkv=1, Lq=90, Ev=40), dict(enable_gqa=True, scale=0.3)),
    ("3-D", dict(B=(), Hq=3, Lq=70, E=32), dict(is_causal=True)),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name,shape,kwargs", CASES, ids=[c[0] for c in CASES])
def test_the_operator_matches_the_oracle(name, shape, kwargs, dtype):
    if dtype == torch.bfloat16 and name not in ("causal", "window", "GQA, softcap"):
        pytest.skip("bfloat16 on three masks keeps the interpreter's time down")
    q, k, v = qkv(**{"E": 16, **shape}, dtype=dtype)
    assert_matches_oracle(q, k, v, engine="triton", attention=through_op, **kwargs)


@needs_triton
def test_batch_dims_broadcast_and_gradients_sum_over_them():
    q, k, v = qkv((2, 3), 2, 50, 16)
    assert_matches_oracle(q, k[:1, :1], v[:1, :1], engine="triton", attention=through_op, is_causal=True)


@needs_triton
def test_garbage_no_row_may_see_changes_nothing_and_garbage_a_row_may_see_shows_as_the_oracle_puts_it():
    q, k, v = qkv(2, 2, 150, 16, Lk=150)
    pad = masks.causal() & masks.padding(torch.tensor([150, 100]), torch.tensor([150, 120]))
    dirty = [x.clone() for x in (q, k, v)]
    dirty[1][1, :, 100:] = float("nan")  # keys past the padding
    dirty[2][1, :, 100:] = float("inf")
    dirty[0][1, :, 120:] = float("nan")  # padded queries
    clean = through_op(q, k, v, engine="triton", return_lse=True, mask=pad)
    leaves = [x.requires_grad_() for x in dirty]
    res = through_op(*leaves, engine="triton", return_lse=True, mask=pad)
    torch.testing.assert_close(res.output, clean.output, atol=0, rtol=0)
    res.output.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    # visible: a NaN key in the first batch row, an inf value entry in one column
    seen = [x.clone() for x in (q, k, v)]
    seen[1][0, 1, 70] = float("nan")
    seen[2][0, 0, 30, 5] = float("inf")
    seen[0][0, 0, 10] = float("nan")
    res = through_op(*seen, engine="triton", return_lse=True, mask=pad)
    ref = oracle(*seen, mask=pad)
    assert torch.equal(res.output.isnan(), ref.output.isnan()) and res.output.isnan().any()
    assert torch.equal(res.lse.isnan(), ref.lse.isnan())


@needs_triton
def test_a_row_that_sees_nothing_gives_zeros_minus_infinite_lse_and_zero_gradients():
    q, k, v = (x.requires_grad_() for x in qkv(2, 2, 40, 16))
    mask = masks.padding(torch.tensor([40, 0]))
    res = through_op(q, k, v, engine="triton", return_lse=True, mask=mask)
    assert (res.output[1] == 0).all() and (res.lse[1] == float("-inf")).all()
    assert torch.isfinite(res.output).all()
    res.output.sum().backward()
    assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


@needs_triton
def test_a_padding_length_beyond_the_keys_counts_as_every_key():
    """Eager calls raise on it; a compiled call cannot read the lengths, so the operator
    clips the row's span to the keys."""
    q, k, v = qkv(2, 2, 40, 16)
    mask = masks.padding(torch.tensor([45, 10]))
    mask._kv_longest = None  # as when built while tracing, where nobody reads the lengths
    lo, hi = traced_spans(mask, 40, 40, (2, 2, 40), flag_oversized=False)
    out, _ = torch.ops.dotattn.triton_attention(q, k, v, lo, hi, 0.25, 0.0)
    want = [oracle(q[:1], k[:1], v[:1], scale=0.25).output,
            oracle(q[1:], k[1:], v[1:], scale=0.25, mask=masks.padding([10])).output]
    torch.testing.assert_close(out.double(), torch.cat(want), atol=1e-5, rtol=0)


@needs_triton
@pytest.mark.parametrize("case", ["causal", "padding", "GQA"])
def test_opcheck(case):
    """Schema and autograd registration, run for real in the interpreter (the fake-tensor
    checks need the real jit functions: the subprocess below traces them)."""
    q, k, v = qkv(2, 4, 64, 16, Hkv=2 if case == "GQA" else 4, dtype=torch.float32)
    mask = masks.padding(torch.tensor([64, 30])) if case == "padding" else masks.causal()
    lo, hi = traced_spans(mask, 64, 64, (2, 4, 64), flag_oversized=False)
    args = [x.requires_grad_() for x in (q, k, v)] + [lo, hi, 0.25, 0.0]
    utils = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(torch.ops.dotattn.triton_attention.default, tuple(args), test_utils=utils)
    out, lse = torch.ops.dotattn.triton_attention(*args)
    torch.library.opcheck(torch.ops.dotattn.triton_attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, lo, hi,
                           0.25, 0.0), test_utils=("test_schema",))


def test_eager_and_cpu_calls_keep_the_generic_operator():
    """The traced path takes CUDA tensors only, and never in the interpreter."""
    q, k, v = qkv(1, 2, 64, 16)
    assert triton_ops.traced_call(q, k, v, masks.causal(), None, None, False, "triton") is None
    assert triton_ops.traced_call(q, k, v, None, None, None, False, "auto") is None


SPAN_MASKS = [
    (masks.causal(), 300, 300), (masks.causal(align="bottom_right"), 100, 333),
    (masks.sliding_window(40), 257, 257), (masks.causal() & masks.sliding_window(64), 500, 500),
    (masks.padding(torch.tensor([300, 17])), 300, 300),
    (masks.causal() & masks.padding(torch.tensor([250, 3]), q_lengths=torch.tensor([100, 7]), side="left"), 250, 250),
    (masks.prefix_lm(50), 200, 200), (masks.padding(torch.tensor([0, 5])), 64, 64),
]


@pytest.mark.parametrize("mask,Lq,Lk", SPAN_MASKS, ids=[repr(m[0]) for m in SPAN_MASKS])
@pytest.mark.parametrize("bm,bn,transposed", [(64, 32, False), (32, 64, True), (128, 128, False), (16, 128, True)])
def test_tile_lists_from_spans_equal_the_masks_own(mask, Lq, Lk, bm, bn, transposed):
    q, k = torch.zeros(2, 2, Lq, 8), torch.zeros(2, 2, Lk, 8)
    p = prepare(q, k, k, mask=mask)
    lo, hi = row_spans(p)
    ours = span_tile_lists(lo, hi, Lq, Lk, bm, bn, transposed, torch.device("cpu"))
    for got, want in zip(ours, tile_lists(p, bm, bn, transposed)):
        assert torch.equal(got, want)


def test_tile_lists_without_a_mask_are_all_full():
    lists = span_tile_lists(None, None, 100, 300, 64, 128, True, torch.device("cpu"))
    fc, fi, pc, _ = lists
    assert fc.shape == (1, 1, 3) and (fc == 2).all() and (pc == 0).all() and fi.shape == (1, 1, 3, 2)


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("mask", [None, masks.causal() & masks.padding(torch.tensor([40, 25]))], ids=["none", "spans"])
def test_the_nan_marking_in_graph_operations_equals_the_eager_pass(mask, G):
    q, k, v = qkv(2, 2 * G, 40, 8, Hkv=2, Ev=6)
    q[0, 1, 3, 2] = float("nan")
    k[1, 0, 10] = float("inf")
    k[1, 1, 39, 0] = float("nan")  # past the padding: no row sees it
    v[0, 1, 7, 4] = float("-inf")
    v[1, 0, 30, 1] = float("nan")
    p = prepare(q, k, v, mask=mask, enable_gqa=True)
    out, lse = torch.zeros(2, 2 * G, 40, 6), torch.zeros(2, 2 * G, 40)
    lo, hi = (None, None) if mask is None else row_spans(p)
    got = mark_seen_in_spans(q, k, v, lo, hi, out, lse)
    want = mark_visible_garbage(p, out, lse)
    for a, b in zip(got, want):
        assert torch.equal(a.isnan(), b.isnan()) and a.isnan().any()


@pytest.fixture(scope="module")
def traced():
    if MISSING is not None or not hasattr(torch.library, "triton_op"):
        pytest.skip(str(MISSING or "this torch has no torch.library.triton_op"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_cuda_trace.py")
    run = subprocess.run([sys.executable, script], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("REPORT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(lines[0].removeprefix("REPORT "))


FORWARD = [["attn_fwd", ["Lse", "Out"]]]


@pytest.mark.parametrize("name", ["causal", "no mask, float32", "window", "padding", "bottom-right, softcap"])
def test_a_compiled_call_on_cuda_tensors_holds_the_forward_kernels_launch(traced, name):
    case = traced[name]
    assert case["graphs"] == [FORWARD]  # one graph, one launch, which writes its outputs only
    Lq = {"bottom-right, softcap": 128, "causal": 512, "window": 1024, "padding": 384}.get(name, 256)
    assert case["shape"] == [2, 8, Lq, 64]
    assert case["dtype"] == ("torch.float32" if "float32" in name else "torch.bfloat16")


@pytest.mark.parametrize("name", ["dropout", "dense mask", "decoding step", "reference engine"])
def test_calls_the_kernels_operators_do_not_take_keep_the_generic_operator(traced, name):
    launches = [launch for graph in traced[name]["graphs"] for launch in graph]
    assert ["dotattn.attention.default", None] in launches
    assert not any(name.startswith("attn_") for name, _ in launches)


def test_lengths_256_to_4096_compile_once_with_dynamic_shapes(traced):
    assert traced["dynamic lengths"]["graphs"] == [FORWARD]


def test_the_backward_operator_is_the_three_backward_kernels_launches(traced):
    case = traced["backward"]
    assert case["graphs"] == [[["attn_bwd_preprocess", ["Delta"]], ["attn_bwd_dkdv", ["DK", "DV"]],
                               ["attn_bwd_dq", ["DQ"]]]]
    assert case["shapes"] == [[2, 8, 512, 128], [2, 2, 512, 128], [2, 2, 512, 128]]


def test_export_keeps_the_operator_as_a_call(traced):
    """torch.export does not decompose triton_ops: the program calls the operator, which
    launches the kernels when it runs."""
    assert traced["export"]["graphs"] == [[["dotattn.triton_attention.default", None]]]

