"""masks.view: part of a larger problem's mask, against slices of the larger mask's dense form."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dotattn import masks as M
from dotattn.masks import FULL, PARTIAL
from tests.test_masks import (
    BLOCK, PROPERTY, allowed_of, assert_sound, combinations, exact_block_map, primitives, sizes,
)


@st.composite
def runs(draw, L: int) -> list[range]:
    """One to three ranges inside range(0, L), possibly empty, overlapping or out of order."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        a = draw(st.integers(0, L))
        out.append(range(a, draw(st.integers(a, L))))
    return out


def positions(rs: list[range]) -> torch.Tensor:
    return torch.tensor([i for r in rs for i in r], dtype=torch.long)


def sliced(mask: M.Mask, Lq: int, Lk: int, rows: list[range], cols: list[range]) -> torch.Tensor:
    """The larger mask's dense form at the view's rows and cols: (*lead_shape, nq, nk)."""
    whole = mask.to_dense(Lq, Lk).broadcast_to(*mask.lead_shape, Lq, Lk)
    return whole[..., positions(rows), :][..., positions(cols)]


@PROPERTY
@given(st.data(), sizes())
def test_view_dense_and_tiles_are_slices_of_the_larger_mask(data, size):
    Lq, Lk, B, H = size
    mask = data.draw(combinations(Lq, Lk, B, H, depth=2))
    rows, cols = data.draw(runs(Lq)), data.draw(runs(Lk))
    v = M.view(mask, Lq, Lk, rows, cols)
    nq, nk = len(positions(rows)), len(positions(cols))
    expected = sliced(mask, Lq, Lk, rows, cols)
    assert v.lead_shape == mask.lead_shape and v.is_additive == mask.is_additive
    assert torch.equal(v.to_dense(nq, nk).broadcast_to(expected.shape), expected)
    q0 = data.draw(st.integers(0, nq))
    q1 = data.draw(st.integers(q0, nq))
    k0 = data.draw(st.integers(0, nk))
    k1 = data.draw(st.integers(k0, nk))
    part = v.tile(nq, nk, q0, q1, k0, k1)
    assert part.dtype == expected.dtype
    assert torch.equal(part.broadcast_to(*mask.lead_shape, q1 - q0, k1 - k0), expected[..., q0:q1, k0:k1])


@PROPERTY
@given(st.data(), sizes(), BLOCK, BLOCK)
def test_view_block_map_is_sound_and_exact_for_primitives(data, size, bq, bk):
    Lq, Lk, B, H = size
    primitive = data.draw(st.booleans())
    mask = data.draw(primitives(Lq, Lk, B, H) if primitive else combinations(Lq, Lk, B, H, depth=2))
    rows, cols = data.draw(runs(Lq)), data.draw(runs(Lk))
    v = M.view(mask, Lq, Lk, rows, cols)
    nq, nk = len(positions(rows)), len(positions(cols))
    assert_sound(v, nq, nk, bq, bk)
    if primitive and not isinstance(mask, M.Documents):  # a union of exact codes is exact
        expected = exact_block_map(allowed_of(v, nq, nk), bq, bk)
        if mask.is_additive:
            expected = expected.clamp(max=PARTIAL)
        assert torch.equal(v.block_map(nq, nk, bq, bk), expected)


@PROPERTY
@given(st.data(), sizes())
def test_view_row_spans_describe_the_view_exactly(data, size):
    Lq, Lk, B, H = size
    mask = data.draw(combinations(Lq, Lk, B, H, depth=2, additive_ok=False))
    rows, cols = data.draw(runs(Lq)), data.draw(runs(Lk))
    v = M.view(mask, Lq, Lk, rows, cols)
    nq, nk = len(positions(rows)), len(positions(cols))
    spans = v.row_spans(nq, nk)
    if mask.row_spans(Lq, Lk) is not None and len(cols) == 1:
        assert spans is not None  # one run of columns cuts one interval per row
    if spans is None:
        return
    lo, hi = spans
    assert bool((lo >= 0).all() and (hi <= nk).all())
    j = torch.arange(nk)
    from_spans = (j >= lo[..., None]) & (j < hi[..., None])
    dense = allowed_of(v, nq, nk)
    shape = torch.broadcast_shapes(from_spans.shape, dense.shape)
    assert torch.equal(from_spans.expand(shape), dense.expand(shape))


def test_view_of_causal_keeps_global_positions():
    # The zigzag layout's rank 0 of 2: chunks 0 and 3 of four 4-long chunks.
    v = M.view(M.causal(), 16, 16, [range(0, 4), range(12, 16)], [range(4, 8), range(8, 12)])
    assert torch.equal(v.block_map(8, 8, 4, 4), torch.tensor([[0, 0], [FULL, FULL]], dtype=torch.int8))
    lo, hi = v.row_spans(8, 8)
    assert hi[:4].tolist() == [0] * 4 and (lo[4:].tolist(), hi[4:].tolist()) == ([0] * 4, [8] * 4)
    assert v.value_key == ("view", ("causal", "top_left"), 16, 16, ((0, 4), (12, 16)), ((4, 8), (8, 12)))


@pytest.mark.parametrize("shape", [(2, 16, 12), (1, 16, 1), (2, 1, 12)], ids=["full", "per_query", "per_key"])
@pytest.mark.parametrize("engine", ["reference", "tiled"])
def test_a_view_trains_the_larger_bias(shape, engine):
    """A float leaf reaches a view's problem as its cut, so the larger bias gets the gradient
    of the view's positions (overlapping runs count twice), and add_cut is cut's adjoint."""
    import dotattn

    g = torch.Generator().manual_seed(0)
    bias = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    rows, cols = [range(0, 3), range(10, 16), range(1, 4)], [range(5, 12), range(0, 2)]
    r, c = positions(rows), positions(cols)
    q = torch.randn(2, len(r), 5, generator=g, dtype=torch.float64)
    k = torch.randn(2, len(c), 5, generator=g, dtype=torch.float64)
    v = torch.randn(2, len(c), 3, generator=g, dtype=torch.float64)
    view = M.view(M.dense(bias) & M.causal(), 16, 12, rows, cols)
    out = dotattn.scaled_dot_product_attention(q, k, v, mask=view, engine=engine)
    (grad,) = torch.autograd.grad(out.square().sum(), bias)
    cut = bias[..., r, :] if shape[-2] > 1 else bias
    cut = cut[..., c] if shape[-1] > 1 else cut
    causal = M.view(M.causal(), 16, 12, rows, cols)
    expected = dotattn.scaled_dot_product_attention(q, k, v, attn_mask=cut, mask=causal, engine="reference")
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), bias)
    assert torch.allclose(out, expected, atol=1e-12, rtol=0)
    assert torch.allclose(grad, expected_grad, atol=1e-12, rtol=0)
    assert torch.equal(view.cut(bias), cut)
    part = torch.randn(cut.shape, generator=g, dtype=torch.float64)
    whole = torch.zeros(shape, dtype=torch.float64)
    view.add_cut(whole, part)
    assert torch.allclose((whole * bias).sum(), (part * cut).sum(), atol=1e-12, rtol=0)


def test_view_errors_name_the_values():
    with pytest.raises(ValueError, match=r"range\(4, 20\).*inside range\(0, 16\)"):
        M.view(M.causal(), 16, 16, range(4, 20), range(0, 16))
    with pytest.raises(TypeError, match="range or a list of ranges"):
        M.view(M.causal(), 16, 16, (0, 4), range(0, 16))
    v = M.view(M.causal(), 16, 16, range(0, 4), range(0, 8))
    with pytest.raises(ValueError, match="covers 4 x 8 positions but the problem is Lq=4, Lk=4"):
        v.block_map(4, 4, 2, 2)
    with pytest.raises(ValueError, match="kv_doc_ids defaults to q_doc_ids"):
        M.view(M.documents(torch.zeros(16, dtype=torch.long)), 16, 8, range(0, 4), range(0, 4))
