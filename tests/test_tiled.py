"""The tiled engine with small tiles, so every problem spans many full, partial and empty tiles."""

from __future__ import annotations

import pytest
import torch

import dotattn
from dotattn import engines, masks
from dotattn._inputs import prepare
from dotattn.engines.tiled import _Plan
from dotattn.testing import assert_matches_oracle
from tests.conftest import qkv
from tests.test_engines import _mask_cases

TILES = [(16, 32), (7, 5), (64, 16)]


@pytest.fixture(params=TILES, ids=[f"{q}x{k}" for q, k in TILES])
def small_tiles(request, monkeypatch):
    engine = engines.get("tiled")
    monkeypatch.setattr(engine, "block_q", request.param[0])
    monkeypatch.setattr(engine, "block_k", request.param[1])
    return request.param


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
