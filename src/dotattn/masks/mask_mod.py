"""FlexAttention-style mask functions as dotattn masks: ``from_mask_mod``.

A ``mask_mod(b, h, q_idx, kv_idx) -> bool`` says whether query q_idx of batch row b and
head h may attend key kv_idx. FlexAttention compiles it into a block mask; here it is
evaluated on index tensors that broadcast, b (B, 1, 1, 1), h (1, H, 1, 1), q_idx (1, 1, bq, 1),
kv_idx (1, 1, 1, bk), one tile or one row of tiles at a time, never the whole Lq x Lk, and
its tile codes are kept per tile size. So any index-based mask_mod (comparisons, arithmetic,
indexing captured tensors with the indices) runs on every engine, with tile skipping and no
compiler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dotattn.masks.base import EMPTY, FULL, PARTIAL, Mask, _check_size

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class FromMaskMod(Mask):
    """A mask_mod over B batch rows, H heads, Lq queries and Lk keys; lead_shape (B, H)."""

    def __init__(self, mask_mod: MaskMod, B: int, H: int, Lq: int, Lk: int,
                 device: torch.device | str | None = None) -> None:
        if not callable(mask_mod):
            raise TypeError(f"from_mask_mod: mask_mod must be callable (b, h, q_idx, kv_idx) -> bool, "
                            f"got {type(mask_mod).__name__}")
        for name, value in (("B", B), ("H", H)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"from_mask_mod: {name} is {value!r}; it must be a positive int (1 broadcasts)")
        _check_size(Lq, "Lq")
        _check_size(Lk, "Lk")
        self.mask_mod, self.B, self.H, self.Lq, self.Lk = mask_mod, B, H, Lq, Lk
        self.device = None if device is None else torch.device(device)
        self._maps: dict[tuple[int, int], torch.Tensor] = {}

    def __repr__(self) -> str:
        name = getattr(self.mask_mod, "__name__", type(self.mask_mod).__name__)
        return f"from_mask_mod({name}, B={self.B}, H={self.H}, Lq={self.Lq}, Lk={self.Lk})"

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return (self.B, self.H)

    @property
    def _device(self) -> torch.device | None:
        return self.device

    def check(self, Lq: int, Lk: int) -> None:
        super().check(Lq, Lk)
        if (Lq, Lk) != (self.Lq, self.Lk):
            raise ValueError(f"{self!r} describes Lq={self.Lq}, Lk={self.Lk} but the problem is Lq={Lq}, Lk={Lk}; "
                             "build it with the problem's lengths")

    def _tile(self, Lq: int, Lk: int, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> torch.Tensor:
        b = torch.arange(self.B, device=device)[:, None, None, None]
        h = torch.arange(self.H, device=device)[None, :, None, None]
        q = torch.arange(q0, q1, device=device)[None, None, :, None]
        kv = torch.arange(k0, k1, device=device)[None, None, None, :]
        allowed = torch.as_tensor(self.mask_mod(b, h, q, kv), device=device)
        if allowed.dtype != torch.bool:
            raise TypeError(f"{self!r}: mask_mod returned {allowed.dtype}; it must return bool (True = may attend)")
        return allowed.expand(self.B, self.H, q1 - q0, k1 - k0)

    def _block_map(self, Lq: int, Lk: int, block_q: int, block_k: int, device: torch.device) -> torch.Tensor:
        found = self._maps.get((block_q, block_k))
        if found is None:
            nQ, nK = -(-Lq // block_q), -(-Lk // block_k)
            found = torch.full((self.B, self.H, nQ, nK), EMPTY, dtype=torch.int8, device=device)
            pad = nK * block_k - Lk
            for qi in range(nQ):  # one row of tiles at a time: (B, H, bq, Lk) booleans
                q0 = qi * block_q
                row = self._tile(Lq, Lk, q0, min(q0 + block_q, Lq), 0, Lk, device)
                if pad:  # the clipped last tile: pad with copies of its own last key, which decide nothing new
                    row = torch.cat([row, row[..., -1:].expand(*row.shape[:-1], pad)], -1)
                tiles = row.reshape(self.B, self.H, row.shape[2], nK, block_k)
                full, some = tiles.all(-1).all(2), tiles.any(-1).any(2)  # (B, H, nK)
                found[:, :, qi] = torch.where(full, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.int8)
            self._maps[(block_q, block_k)] = found
        return found


def from_mask_mod(mask_mod: MaskMod, B: int, H: int, Lq: int, Lk: int,
                  device: torch.device | str | None = None) -> FromMaskMod:
    """A FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool`` as a dotattn mask for B
    batch rows, H heads (1 for either broadcasts), Lq queries and Lk keys. The arguments are
    index tensors that broadcast: b (B, 1, 1, 1), h (1, H, 1, 1), q_idx (1, 1, bq, 1),
    kv_idx (1, 1, 1, bk); tensors the function captures may be indexed with them."""
    return FromMaskMod(mask_mod, B, H, Lq, Lk, device)
