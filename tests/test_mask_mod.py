"""masks.from_mask_mod: FlexAttention's mask_mods, evaluated tile by tile, on every engine."""

from __future__ import annotations

import pytest
import torch
from dotattn import masks
from dotattn.testing import assert_matches_oracle
from tests.conftest import engine_cases, qkv

B, H, LQ, LK = 2, 2, 70, 90
_DOCS = torch.tensor([[0] * 30 + [1] * 40 + [2] * 20, [0] * 50 + [1] * 40])
_RANDOM = torch.rand(LQ, LK, generator=torch.Generator().manual_seed(0)) > 0.5


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 8


def documents(b, h, q_idx, kv_idx):
    return _DOCS[b, q_idx] == _DOCS[b, kv_idx]


def prefix(b, h, q_idx, kv_idx):
    return (kv_idx < 20) | (q_idx >= kv_idx)


def per_head(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx + 10 * h) & (kv_idx >= b * 5)


def random(b, h, q_idx, kv_idx):
    return _RANDOM[q_idx, kv_idx]


MODS = [causal, window, documents, prefix, per_head, random]


@pytest.mark.parametrize("mask_mod", MODS, ids=lambda f: f.__name__)
def test_dense_form_equals_flexattentions_create_mask(mask_mod, monkeypatch):
    # FlexAttention may import triton: in the interpreter's mode, as conftest sets up for the triton engines
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from torch.nn.attention.flex_attention import create_mask

    ours = masks.from_mask_mod(mask_mod, B, H, LQ, LK).to_dense(LQ, LK)
    theirs = create_mask(mask_mod, B, H, LQ, LK, device="cpu")
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("mask_mod", MODS, ids=lambda f: f.__name__)
def test_tile_codes_are_exact_for_the_dense_form(mask_mod):
    mask = masks.from_mask_mod(mask_mod, B, H, LQ, LK)
    dense = mask.to_dense(LQ, LK)
    codes = mask.block_map(LQ, LK, 32, 16)
    assert codes.shape == (B, H, 3, 6) and mask.block_map(LQ, LK, 32, 16) is codes  # kept per tile size
    for qi in range(3):
        for kj in range(6):
            tile = dense[:, :, qi * 32:(qi + 1) * 32, kj * 16:(kj + 1) * 16]
            want = torch.where(tile.all(-1).all(-1), masks.FULL, torch.where(tile.any(-1).any(-1), masks.PARTIAL,
                                                                             masks.EMPTY))
            assert torch.equal(codes[:, :, qi, kj], want.to(torch.int8))


@pytest.mark.parametrize("mask_mod", [documents, per_head, random], ids=lambda f: f.__name__)
@pytest.mark.parametrize("engine,dtype", [c for c in engine_cases() if c.values[1] == torch.float32])
def test_engines_match_the_oracle_with_a_mask_mod(engine, dtype, mask_mod):
    q, k, v = qkv(B, H, LQ, 16, Lk=LK, dtype=dtype)
    assert_matches_oracle(q, k, v, engine=engine, mask=masks.from_mask_mod(mask_mod, B, H, LQ, LK))


def test_a_wrong_size_or_a_non_bool_result_names_the_fix():
    with pytest.raises(ValueError, match="build it with the problem's lengths"):
        masks.from_mask_mod(causal, 1, 1, 8, 8).to_dense(8, 9)
    with pytest.raises(TypeError, match="must return bool"):
        masks.from_mask_mod(lambda b, h, q, kv: q - kv, 1, 1, 4, 4).to_dense(4, 4)
    with pytest.raises(ValueError, match="B is 0"):
        masks.from_mask_mod(causal, 0, 1, 4, 4)
