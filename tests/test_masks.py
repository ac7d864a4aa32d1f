"""Tests for the mask algebra: dense forms against brute force, block maps against dense forms."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dotattn import masks as M
from dotattn.masks import EMPTY, FULL, PARTIAL

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------


def brute(rule, Lq: int, Lk: int) -> torch.Tensor:
    """(Lq, Lk) bool from a python predicate rule(i, j)."""
    return torch.tensor([[bool(rule(i, j)) for j in range(Lk)] for i in range(Lq)], dtype=torch.bool).reshape(Lq, Lk)


def allowed_of(mask: M.Mask, Lq: int, Lk: int) -> torch.Tensor:
    """Where the mask lets a query attend, broadcast to (*lead_shape, Lq, Lk)."""
    d = mask.to_dense(Lq, Lk)
    if mask.is_additive:
        assert d.is_floating_point()
        d = d != NEG_INF
    else:
        assert d.dtype == torch.bool
    return d.broadcast_to(*mask.lead_shape, Lq, Lk)


def exact_block_map(allowed: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """The exact tile codes of a bool tensor (..., Lq, Lk), tile by tile."""
    *lead, Lq, Lk = allowed.shape
    nq, nk = math.ceil(Lq / bq), math.ceil(Lk / bk)
    out = torch.empty(*lead, nq, nk, dtype=torch.int8)
    for a in range(nq):
        for b in range(nk):
            t = allowed[..., a * bq : (a + 1) * bq, b * bk : (b + 1) * bk]
            full, any_ = t.all(-1).all(-1), t.any(-1).any(-1)
            out[..., a, b] = torch.where(full, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)
    return out


def assert_sound(mask: M.Mask, Lq: int, Lk: int, bq: int, bk: int) -> None:
    """FULL tiles are all allowed, EMPTY tiles none; the map has the documented shape and dtype."""
    codes = mask.block_map(Lq, Lk, bq, bk)
    nq, nk = math.ceil(Lq / bq), math.ceil(Lk / bk)
    assert codes.dtype == torch.int8
    assert codes.shape == (*mask.lead_shape, nq, nk)
    allowed = allowed_of(mask, Lq, Lk)
    per_entry = codes.repeat_interleave(bq, -2)[..., :Lq, :].repeat_interleave(bk, -1)[..., :Lk]
    assert bool((allowed | (per_entry != FULL)).all()), "a FULL tile holds a masked entry"
    assert bool((~allowed | (per_entry != EMPTY)).all()), "an EMPTY tile holds an allowed entry"
    if mask.is_additive:
        assert not bool((codes == FULL).any()), "an additive mask reported a FULL tile"


# ---------------------------------------------------------------------------
# Strategies: masks drawn for a known problem size
# ---------------------------------------------------------------------------

ALIGNS = st.sampled_from(["top_left", "bottom_right"])


def _random_bool(draw, shape: tuple[int, ...]) -> torch.Tensor:
    """Bool tensor with a drawn density, including all-False and all-True so EMPTY/FULL tiles occur."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    p = draw(st.sampled_from([0.0, 0.2, 0.7, 1.0]))
    return torch.rand(shape, generator=gen) < p


@st.composite
def primitives(
    draw, Lq: int, Lk: int, B: int, H: int, additive_ok: bool = True, only_additive: bool = False
) -> M.Mask:
    kinds = ["causal", "window", "padding", "documents", "prefix", "block_sparse", "dense_bool"]
    kind = "dense_float" if only_additive else draw(st.sampled_from(kinds + (["dense_float"] if additive_ok else [])))
    if kind == "causal":
        return M.causal(draw(ALIGNS))
    if kind == "window":
        return M.sliding_window(draw(st.integers(0, 12)), draw(st.integers(0, 12)), align=draw(ALIGNS))
    if kind == "padding":
        kv = draw(st.lists(st.integers(0, Lk), min_size=B, max_size=B))
        q = draw(st.none() | st.lists(st.integers(0, Lq), min_size=B, max_size=B))
        return M.padding(kv, q, side=draw(st.sampled_from(["right", "left"])))
    if kind == "documents":
        ids = st.integers(-1, 3)

        def doc_ids(L: int) -> torch.Tensor:
            shape = draw(st.sampled_from([(L,), (B, L)]))
            n = math.prod(shape)
            values = torch.tensor(draw(st.lists(ids, min_size=n, max_size=n)), dtype=torch.long).reshape(shape)
            # Packed documents are runs of equal ids; unsorted ids are legal too.
            return values.sort(dim=-1).values if draw(st.booleans()) else values

        q = doc_ids(Lq)
        if Lq == Lk and draw(st.booleans()):
            return M.documents(q)
        return M.documents(q, doc_ids(Lk))
    if kind == "prefix":
        if draw(st.booleans()):
            return M.prefix_lm(draw(st.integers(0, Lk + 2)))
        return M.prefix_lm(draw(st.lists(st.integers(0, Lk + 2), min_size=B, max_size=B)))
    if kind == "block_sparse":
        bq, bk = draw(st.integers(1, 8)), draw(st.integers(1, 8))
        lead = draw(st.sampled_from([(), (H,)]))
        extra = draw(st.integers(0, 1))
        layout = _random_bool(draw, (*lead, math.ceil(Lq / bq) + extra, math.ceil(Lk / bk) + extra))
        return M.block_sparse(layout, (bq, bk) if bq != bk else bq)
    lead = draw(st.sampled_from([(), (H,), (B, 1), (B, H)]))
    shape = (*lead, draw(st.sampled_from([Lq, 1])), draw(st.sampled_from([Lk, 1])))
    allowed = _random_bool(draw, shape)
    if kind == "dense_bool":
        return M.dense(allowed)
    return M.dense(torch.randn(shape, dtype=torch.float64).masked_fill(~allowed, NEG_INF))


@st.composite
def combinations(draw, Lq: int, Lk: int, B: int, H: int, depth: int, additive_ok: bool = True) -> M.Mask:
    if depth == 0 or draw(st.booleans()):
        return draw(primitives(Lq, Lk, B, H, additive_ok))
    if draw(st.booleans()):
        return draw(combinations(Lq, Lk, B, H, depth - 1, additive_ok)) & draw(
            combinations(Lq, Lk, B, H, depth - 1, additive_ok)
        )
    # | is boolean only.
    return draw(combinations(Lq, Lk, B, H, depth - 1, False)) | draw(combinations(Lq, Lk, B, H, depth - 1, False))


@st.composite
def sizes(draw) -> tuple[int, int, int, int]:
    return draw(st.integers(0, 40)), draw(st.integers(0, 40)), draw(st.integers(1, 3)), draw(st.integers(1, 2))


BLOCK = st.integers(1, 16)
PROPERTY = settings(max_examples=150, deadline=None)


# ---------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------


@PROPERTY
@given(st.data(), sizes(), BLOCK, BLOCK)
def test_primitive_block_map_is_exact(data, size, bq, bk):
    Lq, Lk, B, H = size
    mask = data.draw(primitives(Lq, Lk, B, H))
    assert_sound(mask, Lq, Lk, bq, bk)
    if isinstance(mask, M.Documents):
        return  # documents is only promised sound
    expected = exact_block_map(allowed_of(mask, Lq, Lk), bq, bk)
    if mask.is_additive:
        expected = expected.clamp(max=PARTIAL)
    assert torch.equal(mask.block_map(Lq, Lk, bq, bk), expected)


@PROPERTY
@given(st.data(), sizes(), BLOCK, BLOCK)
def test_combination_block_map_is_sound(data, size, bq, bk):
    Lq, Lk, B, H = size
    mask = data.draw(combinations(Lq, Lk, B, H, depth=3))
    assert_sound(mask, Lq, Lk, bq, bk)


def _has_or(mask: M.Mask) -> bool:
    """Whether an | appears anywhere in the mask (a union of intervals may not be one)."""
    return isinstance(mask, M.Or) or any(_has_or(c) for c in getattr(mask, "children", ()))


@PROPERTY
@given(st.data(), sizes())
def test_row_spans_describe_the_mask_exactly(data, size):
    """Where a mask gives row spans, lo <= j < hi is exactly its allowed set; the
    interval-shaped primitives (and their & combinations) always give them."""
    Lq, Lk, B, H = size
    mask = data.draw(combinations(Lq, Lk, B, H, depth=2, additive_ok=False))
    spans = mask.row_spans(Lq, Lk)
    interval_kinds = (M.Causal, M.SlidingWindow, M.Padding, M.PrefixLM)
    if all(isinstance(leaf, interval_kinds) for leaf in mask.leaves()) and not _has_or(mask):
        assert spans is not None
    if spans is None:
        return
    lo, hi = spans
    assert lo.dtype == hi.dtype == torch.int64
    assert bool((lo >= 0).all() and (hi <= Lk).all())
    j = torch.arange(Lk)
    from_spans = (j >= lo[..., None]) & (j < hi[..., None])
    dense = allowed_of(mask, Lq, Lk)
    shape = torch.broadcast_shapes(from_spans.shape, dense.shape)
    assert torch.equal(from_spans.expand(shape), dense.expand(shape))


@PROPERTY
@given(st.data(), sizes())
def test_simplified_leaves_out_only_what_hides_nothing(data, size):
    """simplified() equals the mask on the problem, None exactly when a causal or window
    mask (or their combination) allows every pair, and keeps what it cannot decide."""
    Lq, Lk, B, H = size
    mask = data.draw(combinations(Lq, Lk, B, H, depth=2))
    simple = mask.simplified(Lq, Lk)
    dense = mask.to_dense(Lq, Lk).broadcast_to(*mask.lead_shape, Lq, Lk)
    if simple is None:
        assert bool((dense != (NEG_INF if mask.is_additive else False)).all())
        return
    assert simple.is_additive == mask.is_additive
    shape = torch.broadcast_shapes(mask.lead_shape, simple.lead_shape)
    assert torch.equal(simple.to_dense(Lq, Lk).expand(*shape, Lq, Lk), dense.expand(*shape, Lq, Lk))
    if isinstance(mask, (M.Causal, M.SlidingWindow)):  # exact for the number-only primitives
        assert not bool(dense.all())


def test_simplified_decoding_masks():
    bottom_right = M.causal(align="bottom_right")
    assert bottom_right.simplified(1, 4096) is None  # a decoding step's one query sees every key
    assert bottom_right.simplified(2, 4096) is bottom_right
    assert M.causal().simplified(7, 1) is None and M.causal().simplified(1, 2) is not None
    padding = M.padding([3, 4], side="left")
    assert (padding & bottom_right).simplified(1, 4) is padding
    assert (M.sliding_window(8, align="bottom_right") & bottom_right).simplified(1, 9) is None
    assert M.sliding_window(8, align="bottom_right").simplified(1, 10) is not None
    for empty in [(0, 5), (5, 0)]:  # nothing to hide
        assert bottom_right.simplified(*empty) is None and M.sliding_window(0).simplified(*empty) is None


def test_row_spans_are_none_where_rows_are_not_intervals():
    assert M.dense(torch.tensor([[True, False, True]])).row_spans(1, 3) is None
    assert M.documents(torch.tensor([0, 1, 0])).row_spans(3, 3) is None  # document 0 is split
    assert (M.sliding_window(0) | M.causal(align="bottom_right")).row_spans(1, 5) is not None
    assert (M.sliding_window(0, align="bottom_right") | M.prefix_lm(1)).row_spans(1, 5) is None  # keys 0 and 4


def _runs(Lq: int, Lk: int, seed: int) -> torch.Tensor:
    """(2, 3, Lq, Lk) bool whose rows are each one run of keys (some empty, some full)."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randint(0, Lk + 1, (2, 3, Lq, 1), generator=g) for _ in range(2))
    j = torch.arange(Lk)
    return (j >= torch.minimum(a, b)) & (j < torch.maximum(a, b))


@pytest.mark.parametrize("kernel", [True, False], ids=["compiled", "torch-ops"])
def test_a_dense_bool_mask_gives_row_spans_when_its_rows_are_runs(kernel, monkeypatch):
    """Dense's row spans, from the compiled kernel (csrc/spans.cpp) and from torch ops, over
    runs (empty and full rows included), broadcast dims, an expanded batch, and rows with a
    hole anywhere; cached until the tensor changes in place."""
    import dotattn.engines._tiled_kernel as kernel_module

    if not kernel:
        monkeypatch.setattr(kernel_module, "ext", None)
    elif kernel_module.ext is None:
        pytest.skip("the compiled kernel is not built")
    cases = [_runs(5, 33, 0), _runs(1, 1, 1), _runs(7, 200, 2)[:, :1], _runs(4, 9, 3)[:1, :1].expand(2, 3, 4, 9),
             _runs(3, 17, 4).transpose(-1, -2).transpose(-1, -2)[..., ::1], torch.ones(2, 1, 1, 5, dtype=torch.bool),
             torch.zeros(2, 1, 6, 1, dtype=torch.bool), torch.ones(1, 1, 3, 1, dtype=torch.bool)]
    for allowed in cases:
        Lq, Lk = allowed.shape[-2], 5 if allowed.shape[-1] == 1 else allowed.shape[-1]
        lo, hi = M.dense(allowed).row_spans(Lq, Lk)
        assert lo.dtype == hi.dtype == torch.int64
        j = torch.arange(Lk)
        assert torch.equal((j >= lo[..., None]) & (j < hi[..., None]), allowed.expand(*allowed.shape[:-1], Lk))
        assert bool(((hi > lo) | ((lo == 0) & (hi == 0))).all())  # a row that sees nothing: 0, 0
    for where in [0, 16, 32]:  # a hole at the start, the middle or the end of a run
        holes = torch.ones(2, 1, 4, 33, dtype=torch.bool)
        holes[1, 0, 2, where] = False
        if where in (0, 32):  # there the row is still one run
            assert M.dense(holes).row_spans(4, 33) is not None
            holes[1, 0, 2, where + (1 if where == 0 else -1)] = True
            holes[1, 0, 2, where + (2 if where == 0 else -2)] = False
        assert M.dense(holes).row_spans(4, 33) is None
    mask = M.dense(torch.ones(1, 8, dtype=torch.bool))
    assert mask.row_spans(1, 8)[1].item() == 8
    mask.tensor[0, 4:] = False  # changed in place: its version moves, the spans follow
    assert mask.row_spans(1, 8)[1].item() == 4


@PROPERTY
@given(st.data(), sizes())
def test_and_or_match_elementwise_ops(data, size):
    Lq, Lk, B, H = size
    a = data.draw(combinations(Lq, Lk, B, H, depth=1, additive_ok=False))
    b = data.draw(combinations(Lq, Lk, B, H, depth=1, additive_ok=False))
    da, db = a.to_dense(Lq, Lk), b.to_dense(Lq, Lk)
    both, either = (a & b).to_dense(Lq, Lk), (a | b).to_dense(Lq, Lk)
    assert both.dtype == either.dtype == torch.bool
    assert torch.equal(both, da & db)
    assert torch.equal(either, da | db)
    assert (a & b).lead_shape == (a | b).lead_shape == torch.broadcast_shapes(a.lead_shape, b.lead_shape)


@PROPERTY
@given(st.data(), sizes())
def test_and_with_additive_adds_bias(data, size):
    Lq, Lk, B, H = size
    bias = data.draw(primitives(Lq, Lk, B, H, only_additive=True))
    other = data.draw(combinations(Lq, Lk, B, H, depth=1, additive_ok=False))
    combined = (bias & other).to_dense(Lq, Lk)
    neg_inf = torch.tensor(NEG_INF, dtype=torch.float64)
    expected = bias.to_dense(Lq, Lk) + torch.where(other.to_dense(Lq, Lk), 0.0, neg_inf)
    assert combined.dtype == torch.float64
    assert torch.equal(combined, expected)


@PROPERTY
@given(st.data(), sizes())
def test_tile_is_a_slice_of_to_dense(data, size):
    Lq, Lk, B, H = size
    mask = data.draw(combinations(Lq, Lk, B, H, depth=2))
    q0 = data.draw(st.integers(0, Lq))
    q1 = data.draw(st.integers(q0, Lq))
    k0 = data.draw(st.integers(0, Lk))
    k1 = data.draw(st.integers(k0, Lk))
    whole = mask.to_dense(Lq, Lk).broadcast_to(*mask.lead_shape, Lq, Lk)
    part = mask.tile(Lq, Lk, q0, q1, k0, k1)
    assert part.dtype == whole.dtype
    assert torch.equal(part.broadcast_to(*mask.lead_shape, q1 - q0, k1 - k0), whole[..., q0:q1, k0:k1])


# ---------------------------------------------------------------------------
# Each primitive against a brute-force loop
# ---------------------------------------------------------------------------

SHAPES = [(3, 5), (5, 3), (4, 4), (1, 6)]


@pytest.mark.parametrize("Lq,Lk", SHAPES)
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_causal_dense(Lq, Lk, align):
    off = 0 if align == "top_left" else Lk - Lq
    assert torch.equal(M.causal(align).to_dense(Lq, Lk), brute(lambda i, j: j <= i + off, Lq, Lk))


def test_causal_alignments_match_torch_and_decoding():
    # top_left is torch's is_causal; bottom_right lets the last query see every key.
    assert torch.equal(M.causal().to_dense(3, 5), torch.ones(3, 5, dtype=torch.bool).tril())
    assert bool(M.causal("bottom_right").to_dense(3, 5)[-1].all())
    assert not bool(M.causal("bottom_right").to_dense(5, 3)[0].any())


@pytest.mark.parametrize("Lq,Lk", SHAPES)
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("before,after", [(0, 0), (2, 0), (1, 2)])
def test_sliding_window_dense(Lq, Lk, align, before, after):
    off = 0 if align == "top_left" else Lk - Lq
    expected = brute(lambda i, j: i + off - before <= j <= i + off + after, Lq, Lk)
    assert torch.equal(M.sliding_window(before, after, align=align).to_dense(Lq, Lk), expected)


def test_padding_dense():
    kv, q = [2, 4, 0], [1, 3, 3]
    got = M.padding(torch.tensor(kv), q).to_dense(3, 4)
    assert got.shape == (3, 1, 3, 4)
    for b in range(3):
        assert torch.equal(got[b, 0], brute(lambda i, j: j < kv[b] and i < q[b], 3, 4))
    kv_only = M.padding(kv).to_dense(5, 4)
    for b in range(3):
        assert torch.equal(kv_only[b, 0], brute(lambda i, j: j < kv[b], 5, 4))


def test_left_padding_dense():
    kv, q = [2, 4, 0], [1, 3, 3]
    got = M.padding(kv, q, side="left").to_dense(3, 4)
    for b in range(3):
        assert torch.equal(got[b, 0], brute(lambda i, j: j >= 4 - kv[b] and i >= 3 - q[b], 3, 4))
    assert repr(M.padding(kv, side="left")) == "padding(kv_lengths=[2, 4, 0], side='left')"


def test_documents_dense():
    q_ids = [0, 0, 1, 1, -1]
    kv_ids = [0, 1, 1, -1, -1, 2]
    got = M.documents(torch.tensor(q_ids), torch.tensor(kv_ids)).to_dense(5, 6)
    # A negative id is padding: it matches nothing, not even another negative id.
    assert torch.equal(got, brute(lambda i, j: q_ids[i] == kv_ids[j] and q_ids[i] >= 0, 5, 6))


def test_documents_batched_and_default_kv():
    ids = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    mask = M.documents(ids)
    assert mask.lead_shape == (2, 1)
    got = mask.to_dense(4, 4)
    for b in range(2):
        row = ids[b].tolist()
        assert torch.equal(got[b, 0], brute(lambda i, j: row[i] == row[j], 4, 4))
    # 1-D query ids against per-batch key ids broadcast over the batch.
    mixed = M.documents(torch.tensor([0, 1]), ids)
    assert mixed.to_dense(2, 4).shape == (2, 1, 2, 4)


@pytest.mark.parametrize("Lq,Lk", [(4, 5), (5, 4)])
def test_prefix_lm_dense(Lq, Lk):
    assert torch.equal(M.prefix_lm(2).to_dense(Lq, Lk), brute(lambda i, j: j < 2 or j <= i, Lq, Lk))
    got = M.prefix_lm([0, 3]).to_dense(Lq, Lk)
    assert got.shape == (2, 1, Lq, Lk)
    for b, p in enumerate([0, 3]):
        assert torch.equal(got[b, 0], brute(lambda i, j: j < p or j <= i, Lq, Lk))


def test_block_sparse_dense():
    layout = torch.tensor([[True, False, True], [False, True, False]])
    got = M.block_sparse(layout, (2, 3)).to_dense(4, 7)
    assert torch.equal(got, brute(lambda i, j: bool(layout[i // 2, j // 3]), 4, 7))
    per_head = torch.stack([layout, ~layout])
    got = M.block_sparse(per_head, 2).to_dense(3, 5)
    assert got.shape == (2, 3, 5)
    for h in range(2):
        assert torch.equal(got[h], brute(lambda i, j: bool(per_head[h, i // 2, j // 2]), 3, 5))


def test_dense_passes_tensor_through_and_keeps_broadcast_dims():
    t = torch.rand(2, 1, 5) > 0.5
    mask = M.dense(t)
    assert mask.lead_shape == (2,)
    assert torch.equal(mask.to_dense(3, 5), t)
    assert mask.tile(3, 5, 1, 3, 2, 4).shape == (2, 1, 2)


# ---------------------------------------------------------------------------
# Block maps on known examples and on problems too large to build densely
# ---------------------------------------------------------------------------


def test_block_map_examples():
    assert torch.equal(
        M.causal().block_map(4, 4, 2, 2), torch.tensor([[PARTIAL, EMPTY], [FULL, PARTIAL]], dtype=torch.int8)
    )
    # Ragged last tiles: Lq = 5 with block 2 gives a 1-row third tile.
    assert torch.equal(
        M.padding([3]).block_map(5, 5, 2, 2),
        torch.tensor([[[[FULL, PARTIAL, EMPTY]] * 3]], dtype=torch.int8),
    )
    ids = torch.tensor([0, 0, 1, 1, -1, -1])
    assert torch.equal(
        M.documents(ids).block_map(6, 6, 2, 2),
        torch.tensor([[FULL, EMPTY, EMPTY], [EMPTY, FULL, EMPTY], [EMPTY, EMPTY, EMPTY]], dtype=torch.int8),
    )


def test_position_block_maps_do_not_build_the_dense_mask():
    # A dense 2**24 x 2**24 mask would need 2**48 bytes; index-vector maps need only the tile grid.
    L = 2**24
    positional = [M.causal("bottom_right"), M.sliding_window(4096, 16), M.padding([L, 3], [5, L]), M.prefix_lm([7, L])]
    for mask in positional:
        codes = mask.block_map(L, L, 2**16, 2**16)
        assert codes.shape == (*mask.lead_shape, 256, 256)
        assert mask.tile(L, L, L - 3, L, L - 5, L).shape == (*mask.lead_shape, 3, 5)
    assert int(M.causal().block_map(L, L, 2**16, 2**16)[-1, 0]) == FULL


def test_combination_block_maps_are_min_and_max():
    a, b = M.causal(), M.sliding_window(1)
    ma, mb = a.block_map(8, 8, 2, 2), b.block_map(8, 8, 2, 2)
    assert torch.equal((a & b).block_map(8, 8, 2, 2), torch.minimum(ma, mb))
    assert torch.equal((a | b).block_map(8, 8, 2, 2), torch.maximum(ma, mb))


# ---------------------------------------------------------------------------
# Additive masks
# ---------------------------------------------------------------------------


def test_additive_and_causal_gives_bias_with_neg_inf():
    bias = torch.randn(1, 4, 6)
    got = (M.dense(bias) & M.causal()).to_dense(4, 6)
    keep = brute(lambda i, j: j <= i, 4, 6)
    assert got.dtype == torch.float32 and got.shape == (1, 4, 6)
    assert torch.equal(got[0][keep], bias[0][keep])
    assert bool((got[0][~keep] == NEG_INF).all())
    # Two biases add.
    both = (M.dense(bias) & M.dense(bias)).to_dense(4, 6)
    assert torch.equal(both, 2 * bias)


def test_additive_keeps_low_precision_dtype():
    bias = torch.zeros(3, 3, dtype=torch.bfloat16)
    assert (M.dense(bias) & M.causal()).to_dense(3, 3).dtype == torch.bfloat16


def test_additive_block_map_is_never_full():
    mask = M.dense(torch.zeros(8, 8))
    assert mask.is_additive and (mask & M.causal()).is_additive
    assert bool((mask.block_map(8, 8, 4, 4) == PARTIAL).all())
    assert int((mask & M.causal()).block_map(8, 8, 4, 4)[1, 0]) == PARTIAL
    neg = M.dense(torch.full((4, 4), NEG_INF))
    assert bool((neg.block_map(4, 4, 2, 2) == EMPTY).all())


def test_or_with_additive_raises():
    bias = M.dense(torch.zeros(4, 4))
    for expr in (lambda: bias | M.causal(), lambda: M.causal() | bias, lambda: (bias & M.causal()) | M.causal()):
        with pytest.raises(TypeError, match=re.escape("dense(<float32 tensor of shape (4, 4)>)")):
            expr()


def test_gradient_flows_to_dense_tensor():
    x = torch.randn(1, 5, 7, requires_grad=True)
    mask = M.dense(x) & M.causal()
    keep = brute(lambda i, j: j <= i, 5, 7)
    out = mask.tile(5, 7, 1, 4, 2, 6)
    out[out.isfinite()].sum().backward()
    expected = torch.zeros(5, 7)
    expected[1:4, 2:6] = keep[1:4, 2:6].float()
    assert torch.equal(x.grad[0], expected)

    x.grad = None
    M.dense(x).to_dense(5, 7).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# ---------------------------------------------------------------------------
# Structure: lead shapes, leaves, repr
# ---------------------------------------------------------------------------


def test_lead_shapes():
    assert M.causal().lead_shape == ()
    assert M.sliding_window(3).lead_shape == ()
    assert M.prefix_lm(3).lead_shape == ()
    assert M.prefix_lm([1, 2, 3]).lead_shape == (3, 1)
    assert M.padding([1, 2]).lead_shape == (2, 1)
    assert M.documents(torch.zeros(5, dtype=torch.long)).lead_shape == ()
    assert M.documents(torch.zeros(3, 5, dtype=torch.long)).lead_shape == (3, 1)
    assert M.block_sparse(torch.ones(4, 2, 2, dtype=torch.bool), 8).lead_shape == (4,)
    assert M.dense(torch.ones(2, 3, 1, 5, dtype=torch.bool)).lead_shape == (2, 3)
    heads = M.block_sparse(torch.ones(4, 2, 2, dtype=torch.bool), 8)
    assert (M.padding([1, 2]) & heads).lead_shape == (2, 4)


def test_lead_shape_mismatch_names_both_masks():
    with pytest.raises(ValueError, match=re.escape("padding(kv_lengths=[1, 2])")) as info:
        M.causal() & M.padding([1, 2]) & M.padding([1, 2, 3])
    assert "padding(kv_lengths=[1, 2, 3])" in str(info.value)


def test_leaves_and_flattening():
    a, b, c, d = M.causal(), M.sliding_window(4), M.prefix_lm(2), M.padding([3])
    mask = (a & b) & (c | d)
    assert mask.leaves() == [a, b, c, d]
    assert isinstance(a & b & c, M.And) and len((a & b & c).children) == 3
    assert a.leaves() == [a]


def test_non_mask_operands_are_rejected():
    with pytest.raises(TypeError):
        M.causal() & torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(TypeError):
        True | M.causal()


@pytest.mark.parametrize(
    "mask,text",
    [
        (M.causal(), "causal(top_left)"),
        (M.causal("bottom_right"), "causal(bottom_right)"),
        (M.sliding_window(128), "sliding_window(128)"),
        (M.sliding_window(128, 4, align="bottom_right"), "sliding_window(128, 4, bottom_right)"),
        (M.sliding_window(8, 0, align="bottom_right"), "sliding_window(8, 0, bottom_right)"),
        (M.padding([3, 5]), "padding(kv_lengths=[3, 5])"),
        (M.padding(torch.arange(10)), "padding(kv_lengths=[0, 1, 2, 3, 4, 5, ...])"),
        (M.padding([3, 5], [1, 2]), "padding(kv_lengths=[3, 5], q_lengths=[1, 2])"),
        (M.prefix_lm(4), "prefix_lm(4)"),
        (M.prefix_lm([4, 2]), "prefix_lm([4, 2])"),
        (M.documents(torch.tensor([0, 0, 1])), "documents(q_doc_ids=[0, 0, 1])"),
        (
            M.block_sparse(torch.ones(2, 3, dtype=torch.bool), (16, 32)),
            "block_sparse(<bool tensor of shape (2, 3)>, block_size=(16, 32))",
        ),
        (M.dense(torch.zeros(1, 4, 8)), "dense(<float32 tensor of shape (1, 4, 8)>)"),
        (M.causal() & M.sliding_window(128), "causal(top_left) & sliding_window(128)"),
        (
            (M.causal() | M.prefix_lm(4)) & M.padding([3, 5]),
            "(causal(top_left) | prefix_lm(4)) & padding(kv_lengths=[3, 5])",
        ),
        (M.causal() & M.prefix_lm(4) | M.padding([3]), "causal(top_left) & prefix_lm(4) | padding(kv_lengths=[3])"),
    ],
)
def test_repr(mask, text):
    assert repr(mask) == text


# ---------------------------------------------------------------------------
# Errors: constructors and check()
# ---------------------------------------------------------------------------


def zero_ids(*shape: int) -> torch.Tensor:
    """Document ids of a given shape, all in document 0."""
    return torch.zeros(shape, dtype=torch.long)


@pytest.mark.parametrize(
    "build,error,text",
    [
        (lambda: M.causal("bottom"), ValueError, "'bottom'"),
        (lambda: M.sliding_window(4, align="left"), ValueError, "'left'"),
        (lambda: M.sliding_window(-1), ValueError, "before is -1"),
        (lambda: M.sliding_window(3, -2), ValueError, "after is -2"),
        (lambda: M.sliding_window(2.5), TypeError, "2.5"),
        (lambda: M.padding([3, -1]), ValueError, "-1"),
        (lambda: M.padding([3, 1], [-4, 0]), ValueError, "-4"),
        (lambda: M.padding(torch.tensor([1.5])), TypeError, "torch.float32"),
        (lambda: M.padding(torch.tensor([[1, 2]])), ValueError, "(1, 2)"),
        (lambda: M.padding([1, 2], [1]), ValueError, "q_lengths has 1 entries but kv_lengths has 2"),
        (lambda: M.padding("3"), TypeError, "str"),
        (lambda: M.padding([3], side="middle"), ValueError, "'middle'"),
        (lambda: M.padding([1.0]), TypeError, "[1.0]"),
        (lambda: M.documents([0, 1]), TypeError, "list"),
        (lambda: M.documents(torch.tensor([0.0, 1.0])), TypeError, "torch.float32"),
        (lambda: M.documents(torch.zeros(1, 2, 3, dtype=torch.long)), ValueError, "(1, 2, 3)"),
        (lambda: M.documents(zero_ids(2, 3), zero_ids(3, 3)), ValueError, "2 batch rows but kv_doc_ids has 3"),
        (lambda: M.prefix_lm(-3), ValueError, "-3"),
        (lambda: M.prefix_lm([2, -5]), ValueError, "-5"),
        (lambda: M.prefix_lm(2.0), TypeError, "float"),
        (lambda: M.block_sparse(torch.ones(2, 2), 4), TypeError, "torch.float32"),
        (lambda: M.block_sparse([[True]], 4), TypeError, "list"),
        (lambda: M.block_sparse(torch.ones(3, dtype=torch.bool), 4), ValueError, "(3,)"),
        (lambda: M.block_sparse(torch.ones(2, 2, dtype=torch.bool), 0), ValueError, "block_size is 0"),
        (lambda: M.block_sparse(torch.ones(2, 2, dtype=torch.bool), (4, -1)), ValueError, "(4, -1)"),
        (lambda: M.dense([[True]]), TypeError, "list"),
        (lambda: M.dense(torch.ones(2, 2, dtype=torch.long)), TypeError, "torch.int64"),
        (lambda: M.dense(torch.ones(2, 2, dtype=torch.complex64)), TypeError, "torch.complex64"),
        (lambda: M.dense(torch.ones(4, dtype=torch.bool)), ValueError, "(4,)"),
    ],
)
def test_constructor_errors(build, error, text):
    with pytest.raises(error, match=re.escape(text)):
        build()


@pytest.mark.parametrize(
    "mask,Lq,Lk,text",
    [
        (M.padding([3, 9]), 4, 5, "kv_lengths holds 9 but Lk is 5"),
        (M.padding([3, 5], [2, 7]), 4, 5, "q_lengths holds 7 but Lq is 4"),
        (M.documents(zero_ids(4), zero_ids(6)), 5, 6, "q_doc_ids has length 4 but Lq is 5"),
        (M.documents(zero_ids(4), zero_ids(6)), 4, 7, "kv_doc_ids has length 6 but Lk is 7"),
        (M.documents(zero_ids(4)), 4, 6, "Lq=4 and Lk=6"),
        (M.block_sparse(torch.ones(2, 3, dtype=torch.bool), 4), 9, 12, "2 x 3 blocks but Lq=9, Lk=12"),
        (M.block_sparse(torch.ones(2, 3, dtype=torch.bool), (4, 2)), 8, 7, "need 2 x 4"),
        (M.dense(torch.ones(3, 5, dtype=torch.bool)), 4, 5, "last two dims are (3, 5) but the problem is Lq=4, Lk=5"),
        (M.dense(torch.ones(1, 4)), 3, 5, "(1, 4)"),
        (M.causal() & M.padding([3, 9]), 4, 5, "kv_lengths holds 9"),
        (M.causal() | (M.prefix_lm(1) & M.padding([9])), 4, 5, "kv_lengths holds 9"),
    ],
)
def test_check_errors(mask, Lq, Lk, text):
    for call in (lambda: mask.check(Lq, Lk), lambda: mask.to_dense(Lq, Lk), lambda: mask.block_map(Lq, Lk, 2, 2)):
        with pytest.raises(ValueError, match=re.escape(text)) as info:
            call()
        assert repr(mask.leaves()[-1]) in str(info.value)


def test_size_and_range_errors():
    with pytest.raises(ValueError, match="Lq must be a non-negative int, got -1"):
        M.causal().to_dense(-1, 3)
    with pytest.raises(ValueError, match="block_k must be a positive int, got 0"):
        M.causal().block_map(3, 3, 2, 0)
    with pytest.raises(ValueError, match=re.escape("tile q-range 2:5 is outside 0:4")):
        M.causal().tile(4, 4, 2, 5, 0, 4)


# ---------------------------------------------------------------------------
# Empty problems
# ---------------------------------------------------------------------------

EMPTY_CASES = [
    M.causal(),
    M.causal("bottom_right"),
    M.sliding_window(2, 1),
    M.padding([0, 0]),
    M.prefix_lm([0, 0]),
    M.dense(torch.ones(2, 1, 1, dtype=torch.bool)),
    M.dense(torch.zeros(1, 1)),
    M.causal() & M.padding([0, 0]),
]


@pytest.mark.parametrize("mask", EMPTY_CASES, ids=repr)
@pytest.mark.parametrize("Lq,Lk", [(0, 5), (5, 0), (0, 0)])
def test_zero_lengths(mask, Lq, Lk):
    dense = mask.to_dense(Lq, Lk).broadcast_to(*mask.lead_shape, Lq, Lk)
    assert dense.numel() == 0
    codes = mask.block_map(Lq, Lk, 2, 2)
    assert codes.shape == (*mask.lead_shape, math.ceil(Lq / 2), math.ceil(Lk / 2))


def test_zero_lengths_for_sized_masks():
    assert M.documents(torch.zeros(0, dtype=torch.long)).block_map(0, 0, 4, 4).shape == (0, 0)
    docs = M.documents(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    assert docs.to_dense(0, 3).shape == (2, 1, 0, 3)
    assert docs.block_map(0, 3, 2, 2).shape == (2, 1, 0, 2)
    sparse = M.block_sparse(torch.zeros(0, 2, dtype=torch.bool), 4)
    assert sparse.to_dense(0, 5).shape == (0, 5)
    assert sparse.block_map(0, 5, 2, 2).shape == (0, 3)
    assert M.padding([]).to_dense(3, 3).shape == (0, 1, 3, 3)


def test_value_key_is_shared_by_equal_number_only_masks_and_absent_with_tensors():
    assert M.causal().value_key == M.causal().value_key != M.causal(align="bottom_right").value_key
    assert (M.causal() & M.sliding_window(4)).value_key == (M.causal() & M.sliding_window(4)).value_key
    assert (M.causal() & M.sliding_window(4)).value_key != (M.causal() | M.sliding_window(4)).value_key
    assert M.prefix_lm(3).value_key is not None and M.prefix_lm([3, 4]).value_key is None
    assert (M.causal() & M.padding([3])).value_key is None
    assert M.dense(torch.ones(2, 2, dtype=torch.bool)).value_key is None


def test_alibi_is_the_slope_times_the_distance_to_the_diagonal():
    slopes = torch.tensor([0.5, 0.125])
    for align, off in (("top_left", 0), ("bottom_right", 7 - 4)):
        dense = M.alibi(slopes, align=align).to_dense(4, 7)
        i, j = torch.arange(4)[:, None], torch.arange(7)
        torch.testing.assert_close(dense, slopes[:, None, None] * (j - i - off))
    assert (M.alibi(slopes).block_map(40, 70, 16, 16) == PARTIAL).all()
    with pytest.raises(ValueError, match="score_mod"):
        M.alibi(slopes.clone().requires_grad_())
    with pytest.raises(ValueError, match="1-D float"):
        M.alibi(torch.ones(2, 2))
