"""The tiled engine with small tiles, so every problem spans many full, partial and empty tiles.

Each test runs both paths of the engine: the compiled kernel and the torch-ops fallback.
"""

from __future__ import annotations

import pytest
import torch

import dotattn
from dotattn import engines, masks
from dotattn._inputs import prepare
from dotattn import _tiles
from dotattn.engines import _tiled_kernel
from dotattn.engines.tiled import _Plan
from dotattn.testing import assert_matches_oracle, oracle
from tests.conftest import qkv
from tests.test_engines import _mask_cases

TILES = [(16, 32), (7, 5), (64, 16)]


@pytest.fixture(params=["kernel", "kernel_bf16_gemms", "torch_ops"])
def path(request, monkeypatch):
    """Which path of the tiled engine runs: the compiled kernel (bfloat16 inputs computed in
    float32 GEMMs, or in bfloat16 GEMMs whatever this machine measured) or torch ops."""
    monkeypatch.setattr(engines.get("tiled"), "use_kernel", request.param != "torch_ops")
    monkeypatch.setattr(engines.get("tiled"), "bf16_gemms", request.param == "kernel_bf16_gemms")
    return request.param


@pytest.fixture(params=TILES, ids=[f"{q}x{k}" for q, k in TILES])
def small_tiles(request, path, monkeypatch):
    engine = engines.get("tiled")
    monkeypatch.setattr(engine, "block_q", request.param[0])
    monkeypatch.setattr(engine, "block_k", request.param[1])
    return request.param


def test_the_compiled_kernel_is_built():
    """make test builds it; if the build broke, the suite would silently test only the fallback."""
    assert _tiled_kernel.MISSING is None
    q = torch.randn(1, 2, 8, 4)
    assert dotattn.explain(q, q, q, engine="tiled").detail == f"compiled kernel ({_tiled_kernel.LEVEL})"


def test_bfloat16_compute_is_chosen_by_measuring_this_machine():
    use_bf16, why = _tiled_kernel.bf16_gemms(16, 128, 256)
    assert ("measured" in why) and (use_bf16 == why.startswith("bfloat16 GEMMs"))
    q = torch.randn(1, 2, 8, 16).bfloat16()
    assert dotattn.explain(q, q, q, engine="tiled").detail == f"compiled kernel ({_tiled_kernel.LEVEL}), " + why


@pytest.mark.parametrize(
    "inputs,why",
    [("nan", "NaN or inf"), ("empty", "empty")],
)
def test_explain_names_the_torch_ops_fallback_and_why(inputs, why):
    q = torch.randn(1, 2, 8, 4)
    kwargs = {}
    if inputs == "nan":
        q = q.clone()
        q[0, 0, 0, 0] = float("nan")
    else:
        q = q[:, :, :0]
    detail = dotattn.explain(q, torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), engine="tiled", **kwargs).detail
    assert detail.startswith("torch ops, because") and why in detail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(_mask_cases(2, 41, 47)))
def test_every_mask_kind_with_small_tiles(small_tiles, dtype, kind):
    q, k, v = qkv(2, 4, 41, 16, Hkv=2, Lk=47, dtype=dtype)
    assert_matches_oracle(q, k, v, engine="tiled", mask=_mask_cases(2, 41, 47)[kind], enable_gqa=True)


def test_float_mask_gradient_with_small_tiles(small_tiles):
    q, k, v = qkv(3, 4, 29, 16, Lk=31)
    for shape in [(29, 31), (3, 1, 29, 31), (1, 4, 1, 31), (4, 29, 1)]:
        bias = torch.randn(shape, generator=torch.Generator().manual_seed(5))
        assert_matches_oracle(q, k, v, bias, engine="tiled", is_causal=True)


@pytest.mark.skipif(_tiled_kernel.MISSING is not None, reason="the compiled kernel is not built")
@pytest.mark.parametrize("structure", ["causal", "window", "padding"])
def test_spans_and_a_float_tensor_read_in_place_match_the_oracle(structure):
    """Spans ANDed with one float tensor (causal plus ALiBi, a learned bias): the kernel masks with
    the spans and reads the bias where it lies, no packed tiles, gradients to the bias included."""
    q, k, v = qkv(2, 4, 301, 16, Lk=333)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    alibi = slopes[:, None, None] * (torch.arange(333) - torch.arange(301)[:, None] - 32)  # (H, Lq, Lk)
    learned = torch.randn(2, 1, 301, 333, generator=torch.Generator().manual_seed(3))
    spans = {"causal": masks.causal("bottom_right"), "window": masks.sliding_window(40, 3),
             "padding": masks.padding([333, 100], [301, 50])}[structure]
    for bias in (alibi, learned):  # as attn_mask, so the oracle rule covers its gradient too
        tiles = _tiled_kernel.TileMask.of(prepare(q, k, v, bias, mask=spans), 64, 64, torch.float32)
        assert tiles.lo is not None and tiles.bias.dim() == 4 and tiles.allowed is None  # in place, not packed
        assert_matches_oracle(q, k, v, bias, mask=spans, engine="tiled")


@pytest.mark.skipif(_tiled_kernel.MISSING is not None, reason="the compiled kernel is not built")
@pytest.mark.parametrize("structure", ["none", "causal", "window", "padding"])
def test_alibi_from_its_slopes_is_computed_in_the_kernel(structure):
    """masks.alibi: the kernel adds slope_h · (j - i - off) per tile from the slopes, no bias
    tensor and no packed tiles, alone or with spans; equal to the oracle, which tiles the mask."""
    q, k, v = qkv(2, 4, 301, 16, Lk=333)
    alibi = masks.alibi(torch.tensor([0.5, 0.25, 0.125, 0.0625]), align="bottom_right")
    spans = {"none": None, "causal": masks.causal("bottom_right"), "window": masks.sliding_window(40, 3),
             "padding": masks.padding([333, 100], [301, 50])}[structure]
    mask = alibi if spans is None else alibi & spans
    tiles = _tiled_kernel.TileMask.of(prepare(q, k, v, mask=mask), 64, 64, torch.float32)
    assert tiles.slopes is not None and tiles.bias is None and tiles.allowed is None
    assert (tiles.lo is None) == (spans is None)
    assert_matches_oracle(q, k, v, mask=mask, engine="tiled")


def test_dropout_pattern_does_not_depend_on_tile_sizes(small_tiles):
    q, k, v = (x.requires_grad_() for x in qkv(2, 2, 37, 8, Lk=45))

    def run(engine: str):
        g = torch.Generator().manual_seed(4)
        out = dotattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, generator=g, engine=engine)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        return out, grads

    out, grads = run("tiled")
    ref_out, ref_grads = run("reference")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,visited,partial",
    [({}, 256, 0), ({"is_causal": True}, 136, 16), ({"mask": masks.sliding_window(64)}, 31, 31)],
    ids=["full", "causal", "window64"],
)
def test_only_non_empty_tiles_are_visited_and_only_partial_ones_masked(kwargs, visited, partial):
    problem = prepare(*qkv(1, 1, 1024, 8), **kwargs)
    plan = _Plan(problem, 64, 64)
    codes = [code for qi in range(16) for *_, code in plan.tiles(0, qi)]
    assert len(codes) == visited  # of 16 x 16 tiles
    assert codes.count(masks.PARTIAL) == partial
    # The kernel reads the same classification and masks partial tiles from row spans:
    # O(L) memory, nothing packed.
    tm = _tiled_kernel.TileMask.of(problem, 64, 64, torch.float32)
    if tm.index is None:
        assert visited == 256
    else:
        assert int((tm.index != -2).sum()) == visited and int((tm.index >= 0).sum()) == partial
        assert tm.allowed is None and tm.bias is None and tm.lo.shape == tm.hi.shape == (1, 1, 1024)


@pytest.mark.parametrize("kind", ["bool", "float-combined", "float-alone"])
def test_masks_without_row_spans_pack_only_their_partial_tiles(kind):
    q, k, v = qkv(2, 3, 100, 8)
    dense = torch.rand(100, 100, generator=torch.Generator().manual_seed(0)) > 0.5
    dense[:64] = True  # tiles of the first 64 rows are FULL
    dense[64:, :32] = False  # and EMPTY below them in the first 32 columns
    bias = torch.zeros(100, 100).masked_fill(~dense, float("-inf"))
    mask = {
        "bool": masks.dense(dense),
        "float-combined": masks.dense(bias) & masks.dense(dense),
        "float-alone": masks.dense(bias),
    }[kind]
    tm = _tiled_kernel.TileMask.of(prepare(q, k, v, mask=mask), 64, 32, torch.float32)
    assert tm.lo is None and tm.index.shape == (1, 1, 2, 4)
    assert tm.index[0, 0, 1, 0] == -2
    if kind == "bool":
        assert tm.index[0, 0, 0].tolist() == [-1] * 4 and tm.allowed.shape == (3, 64, 32)
    elif kind == "float-combined":  # a bias must still be added, so its tiles are never FULL
        assert tm.index[0, 0, 0].tolist() == [0, 1, 2, 3] and tm.bias.shape == (7, 64, 32)
    else:  # one float tensor is read where it lies, not copied
        assert tm.bias.shape == (1, 1, 100, 100) and tm.bias.data_ptr() == bias.data_ptr()
    assert_matches_oracle(q, k, v, mask=mask, engine="tiled")


def test_a_dense_bool_mask_whose_rows_are_intervals_runs_as_row_spans():
    # a causal window built as a tensor, per batch row, with a row that sees nothing: the
    # kernel masks its partial tiles by comparisons and reads the tensor no more
    q, k, v = qkv(2, 3, 100, 8)
    i, j = torch.arange(100)[:, None], torch.arange(100)[None]
    allowed = ((j <= i) & (j > i - 40)).expand(2, 1, 100, 100).clone()
    allowed[1, 0, 7] = False
    problem = prepare(q, k, v, mask=masks.dense(allowed))
    tm = _tiled_kernel.TileMask.of(problem, 64, 32, torch.float32)
    assert tm.allowed is None and tm.bias is None and tm.lo.shape == (2, 1, 100)
    assert int(tm.hi[1, 0, 7] - tm.lo[1, 0, 7]) == 0
    assert_matches_oracle(q, k, v, mask=masks.dense(allowed), engine="tiled")


@pytest.mark.parametrize(
    "mask", [None, masks.causal(align="bottom_right"), masks.sliding_window(3, 1), masks.padding([7, 4], q_lengths=[5, 2])],
    ids=["none", "causal", "window", "padding-with-dead-rows"],
)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("bias_shape", [None, (5, 7), (2, 1, 1, 7)], ids=["no-bias", "bias", "bias-per-batch-row"])
def test_gradcheck_float64_with_small_tiles(path, mask, dropout_p, bias_shape):
    """Gradients of both paths against finite differences (a float attn_mask's included),
    GQA and Ev != E, tiles 3 x 2."""
    q, k, v = (x.requires_grad_() for x in qkv(2, 4, 5, 3, Hkv=2, Lk=7, Ev=2, dtype=torch.float64))
    inputs = (q, k, v)
    if bias_shape is not None:
        inputs += (torch.randn(bias_shape, dtype=torch.float64, requires_grad=True),)
    engine = engines.get("tiled")

    def f(q, k, v, bias=None):
        g = torch.Generator().manual_seed(2)
        return dotattn.scaled_dot_product_attention(
            q, k, v, bias, mask=mask, dropout_p=dropout_p, generator=g, enable_gqa=True, engine="tiled"
        )

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "block_q", 3)
        mp.setattr(engine, "block_k", 2)
        assert torch.autograd.gradcheck(f, inputs)


def test_tile_maps_of_number_only_masks_are_derived_once_per_size():
    q, k, v = qkv(1, 2, 50, 8)
    first = _tiled_kernel.TileMask.of(prepare(q, k, v, is_causal=True), 16, 32, torch.float32)
    again = _tiled_kernel.TileMask.of(prepare(q, k, v, mask=masks.causal()), 16, 32, torch.float32)
    other = _tiled_kernel.TileMask.of(prepare(q, k, v, is_causal=True), 16, 16, torch.float32)
    assert again is first and other is not first
    for n in range(_tiles.KEPT + 5):  # the cache stays bounded
        _tiled_kernel.TileMask.of(prepare(q, k, v, mask=masks.sliding_window(n)), 16, 32, torch.float32)
    assert len(_tiles._CACHE) <= _tiles.KEPT


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_garbage_the_mask_hides_runs_in_the_kernel_and_visible_garbage_in_torch_ops(dtype):
    q, k, v = qkv(2, 4, 30, 8, Hkv=2, Lk=40, dtype=dtype)
    pad = masks.padding([40, 25], q_lengths=[30, 18]) & masks.causal(align="bottom_right")
    ref = oracle(q, k, v, mask=pad, enable_gqa=True)
    q, k, v = (x.clone().requires_grad_(False) for x in (q, k, v))
    k[1, :, 25:] = float("nan")
    v[1, :, 25:] = float("inf")
    q[1, :, 18:] = float("nan")  # rows that see nothing
    leaves = [x.requires_grad_() for x in (q, k, v)]
    assert dotattn.explain(*leaves, mask=pad, enable_gqa=True, engine="tiled").detail.startswith("compiled kernel")
    out = dotattn.scaled_dot_product_attention(*leaves, mask=pad, enable_gqa=True, engine="tiled")
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.output.float(), atol=tol, rtol=0)
    out.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    assert (k.grad[1, :, 25:] == 0).all() and (q.grad[1, :, 18:] == 0).all()
    # garbage a query can see goes to torch ops, which marks exactly the rows that see it
    k2 = k.detach().clone()
    k2[0, 0, 3] = float("nan")
    explanation = dotattn.explain(q.detach(), k2, v.detach(), mask=pad, enable_gqa=True, engine="tiled")
    assert explanation.detail.startswith("torch ops, because") and "lets a query see" in explanation.detail
