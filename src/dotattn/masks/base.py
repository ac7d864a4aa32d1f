"""The Mask base class, the tile codes EMPTY / PARTIAL / FULL, and the helpers the mask kinds share."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dotattn.masks.tensor import Dense


EMPTY, PARTIAL, FULL = 0, 1, 2

_NEG_INF = float("-inf")
# How many values of a parameter tensor a repr shows before "...".
_REPR_ITEMS = 6


# ---------------------------------------------------------------------------
# Private helpers shared by the mask kinds
# ---------------------------------------------------------------------------


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


def _positions(
    q0: int, q1: int, k0: int, k1: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of a tile, ready to broadcast: i (q1-q0, 1), j (1, k1-k0)."""
    i = torch.arange(q0, q1, device=device)[:, None]
    j = torch.arange(k0, k1, device=device)[None, :]
    return i, j


def _tile_bounds(L: int, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index (inclusive) of each of the ceil(L / block) tiles; the last tile is clipped to L."""
    first = torch.arange(0, L, block, device=device)
    last = torch.clamp(first + block, max=L) - 1
    return first, last


def _codes(full: torch.Tensor, any_: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Tile codes from "every entry may attend" and "some entry may attend", broadcast to shape."""
    codes = torch.where(full, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)
    return codes.expand(*shape).contiguous()


def _placeholder(tensor: torch.Tensor, tensors: list[torch.Tensor]) -> str:
    """``T[i]``: ``tensor`` appended to ``tensors`` (a spec's tensor, see Mask.spec)."""
    tensors.append(tensor)
    return f"T[{len(tensors) - 1}]"


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _summary(t: torch.Tensor) -> str:
    """Short repr of a parameter tensor: its values for 1-D, its dtype and shape otherwise."""
    if t.dim() == 1:
        items = [str(v) for v in t[:_REPR_ITEMS].tolist()]
        if t.numel() > _REPR_ITEMS:
            items.append("...")
        return "[" + ", ".join(items) + "]"
    return f"<{str(t.dtype).removeprefix('torch.')} tensor of shape {tuple(t.shape)}>"


def _check_size(value: object, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _check_block(value: object, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# ---------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------


class Mask(abc.ABC):
    """Which keys each query may attend; see the ``dotattn.masks`` docstring for the convention and the tile codes.

    Subclasses implement ``_tile`` and ``_block_map`` (sizes already validated,
    device already resolved) and may override ``check`` and ``lead_shape``.
    """

    is_additive: bool = False

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """Leading dims of the dense form before (Lq, Lk)."""
        return ()

    @property
    def _device(self) -> torch.device | None:
        """Device of the mask's parameter tensors; None when it has none (position-only masks)."""
        return None

    def check(self, Lq: int, Lk: int) -> None:
        """Raise ValueError if this mask cannot describe an Lq x Lk problem."""
        if not (type(Lq) is type(Lk) is int and Lq >= 0 and Lk >= 0):  # prepare's sizes always are
            _check_size(Lq, "Lq")
            _check_size(Lk, "Lk")

    def tile(
        self, Lq: int, Lk: int, q0: int, q1: int, k0: int, k1: int, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Dense values of rows q0:q1, columns k0:k1 of an Lq x Lk problem, without building the whole mask.

        Returns (*lead_shape, q1-q0, k1-k0): bool (True = may attend), or a float
        bias (-inf where masked) when ``is_additive``. A dense tensor's size-1
        (broadcast) dims stay 1. Parameter tensors are moved to ``device``
        (default: their own). Sizes are not re-validated here, since an engine
        calls this once per partial tile: call ``check(Lq, Lk)`` once first.
        """
        for name, lo, hi, L in (("q", q0, q1, Lq), ("k", k0, k1, Lk)):
            if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= L):
                raise ValueError(
                    f"{self!r}: tile {name}-range {lo}:{hi} is outside 0:{L}; need 0 <= {name}0 <= {name}1 <= L{name}"
                )
        return self._tile(Lq, Lk, q0, q1, k0, k1, self._resolve(device))

    def to_dense(self, Lq: int, Lk: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The whole mask, (*lead_shape, Lq, Lk); validated with ``check`` first."""
        self.check(Lq, Lk)
        return self.tile(Lq, Lk, 0, Lq, 0, Lk, device)

    def block_map(self, Lq: int, Lk: int, block_q: int, block_k: int) -> torch.Tensor:
        """Tile codes, int8 (*lead_shape, nQ, nK), on the mask's device; the last tiles are clipped to Lq, Lk."""
        self.check(Lq, Lk)
        _check_block(block_q, "block_q")
        _check_block(block_k, "block_k")
        return self._block_map(Lq, Lk, block_q, block_k, self._resolve(None))

    def simplified(self, Lq: int, Lk: int) -> Mask | None:
        """This mask on an Lq x Lk problem with the parts that allow every (query, key) pair
        left out: None when the whole mask does (a decoding step's causal(bottom_right) over
        one query; a window wider than the problem), else a mask equal to this one there.
        Decided from numbers alone, never from a tensor; ``prepare`` applies it, so that an
        engine neither evaluates nor applies a mask that hides nothing."""
        return self

    def row_spans(self, Lq: int, Lk: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each query row's allowed keys as one interval lo <= j < hi, when they are one.

        Returns int64 (lo, hi), each broadcastable to (*lead_shape, Lq), with 0 <= lo, hi <= Lk;
        a row with lo >= hi sees nothing. None when some row's allowed keys are not one
        interval (dense, block-sparse, float masks, unsorted documents). An engine that
        gets spans masks a tile with two comparisons per row and needs no mask memory.
        """
        self.check(Lq, Lk)
        return self._row_spans(Lq, Lk, self._resolve(None))

    def _row_spans(self, Lq: int, Lk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def spec(self, tensors: list[torch.Tensor]) -> str:
        """This mask as an expression over ``dotattn.masks`` (``masks.causal('top_left')``) whose
        tensors are ``T[i]``, appended to ``tensors``: how a mask crosses into a PyTorch
        operator (``dotattn._ops``), which takes strings and tensors. Structure only: no tensor
        data is read, so it traces under torch.compile."""
        raise NotImplementedError(f"{self!r} cannot cross into an operator (it has no spec)")

    @property
    def value_key(self) -> tuple | None:
        """A hashable value that equal masks share, for masks made of plain numbers only
        (causal, sliding window, an int prefix, and combinations of them), so that engines
        can cache what they derive from a mask; None for masks that hold tensors."""
        return None

    def leaves(self) -> list[Mask]:
        """The primitive masks in this mask, left to right."""
        return [self]

    def biases(self) -> list[Dense]:
        """The leaves that add a float tensor to the scores (the ones a gradient reaches), left to right."""
        from dotattn.masks.tensor import Dense  # tensor.py imports this module: a late import

        return [leaf for leaf in self.leaves() if isinstance(leaf, Dense) and leaf.is_additive]

    def __and__(self, other: object) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        # combinators.py subclasses Mask from this module, so And and Or are imported late.
        from dotattn.masks.combinators import And, _terms

        return And(*_terms(self, And), *_terms(other, And))

    def __or__(self, other: object) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        for m in (self, other):
            if m.is_additive:
                raise TypeError(
                    f"{m!r} is an additive (float) mask, and | is defined for boolean masks only; "
                    "combine a bias with & instead, or pass its boolean form dense(tensor != float('-inf'))"
                )
        from dotattn.masks.combinators import Or, _terms

        return Or(*_terms(self, Or), *_terms(other, Or))

    def _resolve(self, device: torch.device | str | None) -> torch.device:
        if device is not None:
            return torch.device(device)
        return self._device or torch.device("cpu")

    @abc.abstractmethod
    def _tile(self, Lq: int, Lk: int, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> torch.Tensor:
        """``tile`` after validation, with the device resolved."""

    @abc.abstractmethod
    def _block_map(self, Lq: int, Lk: int, block_q: int, block_k: int, device: torch.device) -> torch.Tensor:
        """``block_map`` after validation, on ``device``."""
