"""The triton engine in Triton's interpreter (CPU tensors; conftest sets TRITON_INTERPRET=1), with small tiles.

test_engines.py runs the engine-parametrized suite on it in float32 with the interpreter's
large tiles; here small tiles make every problem span many full, partial and empty tiles,
and the 16-bit paths (bfloat16, float16) run against the oracle under the 2x rule. The
interpreter pays per tile in Python, so each case runs once, in the dtype it needs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import dotattn  # noqa: E402
from dotattn import engines, masks  # noqa: E402
from dotattn._inputs import prepare  # noqa: E402
from dotattn import _tiles  # noqa: E402
from dotattn.engines.triton import launch  # noqa: E402
from dotattn.engines.triton.mask_args import MaskParts  # noqa: E402
from dotattn.testing import assert_matches_oracle, compare_to_oracle, oracle  # noqa: E402
from tests.conftest import qkv  # noqa: E402
from tests.test_engines import _mask_cases  # noqa: E402


@pytest.fixture
def tiles_16x32(monkeypatch):
    engine = engines.get("triton")
    monkeypatch.setattr(engine, "block_m", 16)
    monkeypatch.setattr(engine, "block_n", 32)


@pytest.mark.parametrize("kind", list(_mask_cases(2, 41, 47)))
def test_every_mask_kind_with_small_tiles(tiles_16x32, kind):
    q, k, v = qkv(2, 4, 41, 16, Hkv=2, Lk=47, dtype=torch.bfloat16)
    assert_matches_oracle(q, k, v, engine="triton", mask=_mask_cases(2, 41, 47)[kind], enable_gqa=True)


@pytest.mark.parametrize("kind", ["causal_bottom_right", "padding", "dense_float"])
def test_float16(tiles_16x32, kind):
    q, k, v = qkv(2, 2, 41, 16, Lk=47, dtype=torch.float16)
    assert_matches_oracle(q, k, v, engine="triton", mask=_mask_cases(2, 41, 47)[kind])


@pytest.mark.parametrize("E,Ev", [(1, 1), (17, 17), (80, 24), (24, 80)])
def test_awkward_head_dims_pad_to_a_power_of_two(tiles_16x32, E, Ev):
    q, k, v = qkv(1, 2, 37, E, Lk=29, Ev=Ev, dtype=torch.bfloat16)
    assert_matches_oracle(q, k, v, engine="triton", is_causal=True)


@pytest.mark.parametrize("Hkv", [1, 2], ids=["mqa", "gqa"])
def test_grouped_query_bfloat16_non_contiguous(tiles_16x32, Hkv):
    q, _, _ = qkv(2, 19, 8, 16, dtype=torch.bfloat16)  # laid out (B, L, H, E)
    k, v, _ = qkv(2, 23, Hkv, 16, dtype=torch.bfloat16, seed=1)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    assert not q.is_contiguous()
    assert_matches_oracle(q, k, v, engine="triton", enable_gqa=True, mask=masks.causal(align="bottom_right"))


def test_float_mask_gradient_with_small_tiles(tiles_16x32):
    q, k, v = qkv(3, 4, 29, 16, Lk=31, dtype=torch.bfloat16)
    for shape in [(3, 1, 29, 31), (4, 29, 1)]:
        bias = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
        results = assert_matches_oracle(q, k, v, bias, engine="triton", is_causal=True)
        assert "dmask" in [r.quantity for r in results]


def test_dropout_pattern_and_gradients_match_the_reference_engine(tiles_16x32):
    q, k, v = (x.requires_grad_() for x in qkv(2, 4, 37, 8, Hkv=2, Lk=45))

    def run(engine: str):
        g = torch.Generator().manual_seed(4)
        out = dotattn.scaled_dot_product_attention(
            q, k, v, dropout_p=0.3, generator=g, engine=engine, enable_gqa=True, mask=masks.sliding_window(20, 3),
        )
        return out, torch.autograd.grad(out.sum(), (q, k, v))

    out, grads = run("triton")
    ref_out, ref_grads = run("reference")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_and_lse_and_weights_with_small_tiles(tiles_16x32):
    q, k, v = (x.requires_grad_() for x in qkv(2, 2, 40, 8, Lk=50, dtype=torch.bfloat16))
    m = masks.padding([50, 20], q_lengths=[40, 9]) & masks.dense(torch.arange(40)[:, None] != 3)
    res = dotattn.scaled_dot_product_attention(q, k, v, mask=m, engine="triton", return_lse=True, return_weights=True)
    ref = oracle(q, k, v, mask=m)
    dead = torch.isinf(ref.lse)
    assert dead[1, :, 9:].all() and dead[:, :, 3].all()  # whole empty tiles and a dead row in a partial one
    assert not res.output.isnan().any() and (res.output[dead] == 0).all()
    assert torch.equal(torch.isinf(res.lse), dead)
    torch.testing.assert_close(res.lse[~dead], ref.lse[~dead].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(res.weights.float(), ref.weights.float(), atol=2e-2, rtol=2e-2)
    res.output.float().sum().backward()
    assert (q.grad[dead] == 0).all() and (k.grad[1, :, 20:] == 0).all()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


@pytest.mark.parametrize("deterministic", [False, True])
def test_a_shared_float_mask_gets_its_gradient_by_atomics_or_deterministically(tiles_16x32, monkeypatch, deterministic):
    monkeypatch.setattr(engines.get("triton"), "deterministic", deterministic)
    q, k, v = qkv(2, 4, 29, 16, Lk=31)
    bias = torch.randn(29, 31, generator=torch.Generator().manual_seed(5))  # shared by every (batch, head)
    assert_matches_oracle(q, k, v, bias, engine="triton", is_causal=True)


def test_backward_is_deterministic(tiles_16x32):
    q, k, v = (x.requires_grad_() for x in qkv(1, 4, 45, 16, Hkv=2, Lk=39))

    def grads():
        out = dotattn.scaled_dot_product_attention(q, k, v, engine="triton", enable_gqa=True, is_causal=True)
        return torch.autograd.grad(out.sum(), (q, k, v))

    assert all(torch.equal(a, b) for a, b in zip(grads(), grads()))


def test_the_gpu_rounding_of_p_and_ds_stays_near_torch(tiles_16x32, monkeypatch):
    """On CUDA, P and dS enter the 16-bit GEMMs rounded once (as FlashAttention); torch's CPU
    baseline keeps them in float32, so here the bound is looser than the 2x rule."""
    monkeypatch.setattr(engines.get("triton"), "split_half_gemms", False)
    q, k, v = qkv(2, 2, 41, 16, Lk=47, dtype=torch.bfloat16)
    for r in compare_to_oracle(q, k, v, engine="triton", is_causal=True):
        assert r.error <= 4 * r.torch_error + 1e-3 * 4, r


@pytest.mark.parametrize(
    "kwargs,full,partial",
    [({}, 256, 0), ({"is_causal": True}, 120, 16), ({"mask": masks.sliding_window(64)}, 0, 31)],
    ids=["full", "causal", "window64"],
)
def test_only_non_empty_tiles_are_listed_and_only_partial_ones_masked(kwargs, full, partial):
    problem = prepare(*qkv(1, 1, 1024, 8), **kwargs)
    full_count, full_idx, part_count, part_idx = _tiles.tile_lists(problem, 64, 64, transposed=False)
    assert int(full_count.sum()) == full and int(part_count.sum()) == partial
    if kwargs.get("is_causal"):  # query block 3 sees key tiles 0..2 unmasked, then the diagonal
        assert full_idx[0, 0, 3, :3].tolist() == [0, 1, 2] and part_idx[0, 0, 3, 0] == 3
    t_full, _, t_part, _ = _tiles.tile_lists(problem, 64, 64, transposed=True)
    assert int(t_full.sum()) == full and int(t_part.sum()) == partial


def test_masks_reach_the_kernel_as_spans_or_in_place_tensors():
    q, k, v = qkv(2, 3, 40, 8, Lk=50)
    parts = MaskParts.of(prepare(q, k, v, is_causal=True, mask=masks.padding([50, 20])))
    assert parts.lo.shape == (2, 1, 40) and parts.allowed is None and parts.bias is None
    keep = torch.rand(40, 50, generator=torch.Generator().manual_seed(0)) > 0.5
    parts = MaskParts.of(prepare(q, k, v, keep, is_causal=True))
    assert parts.lo is not None and parts.allowed.data_ptr() == keep.data_ptr()  # read in place
    bias = torch.randn(3, 1, 50)
    parts = MaskParts.of(prepare(q, k, v, bias))
    assert parts.bias.data_ptr() == bias.data_ptr() and parts.lo is None
    sparse = masks.block_sparse(torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) > 0.5, 8)
    parts = MaskParts.of(prepare(q, k, v, mask=sparse & masks.causal()))
    assert parts.lo is not None and parts.layout.data_ptr() == sparse.layout.data_ptr() and parts.allowed is None
    parts = MaskParts.of(prepare(q, k, v, keep, mask=sparse | masks.causal()))
    assert parts.lo is None and parts.layout is None and parts.allowed.shape == (1, 1, 40, 50)  # materialised


def test_auto_never_picks_it_for_cpu_tensors_and_a_cpu_problem_needs_the_interpreter(monkeypatch):
    q, k, v = qkv(1, 2, 8, 16)
    assert dotattn.explain(q, k, v).engine != "triton"
    assert "interpreter" in engines.get("triton").auto_skip(prepare(q, k, v))
    assert dotattn.explain(q, k, v, engine="triton").engine == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "device cpu is not supported (use cuda)" in " ".join(
        dotattn.explain(q, k, v, engine="triton").rejected["triton"])


def test_a_missing_triton_is_a_reason(monkeypatch):
    monkeypatch.setattr(launch, "MISSING", "triton is not installed (pip install triton)")
    q, k, v = qkv(1, 2, 8, 16)
    with pytest.raises(engines.EngineNotSupportedError, match=r"triton is not installed \(pip install triton\)"):
        dotattn.scaled_dot_product_attention(q, k, v, engine="triton")
