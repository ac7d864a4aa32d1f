"""The mask algebra: which keys each query may attend, as small composable objects.

Convention
----------
Attention scores have shape (..., H, Lq, Lk). A boolean mask value True means
"query i may attend key j" (torch's ``attn_mask`` convention). A floating mask is
an additive bias added to the scores, with -inf where a key is masked. Masks are
built without knowing Lq and Lk (``causal()``, ``padding(kv_lengths)``, ...),
combined with ``&`` and ``|``, and only evaluated once the sizes are known.

Shape legend: B batch, H heads, Lq query length, Lk key length,
nQ = ceil(Lq / block_q), nK = ceil(Lk / block_k). ``lead_shape`` is the part of a
mask's dense form before (Lq, Lk): () for position-only masks, (B, 1) for
per-batch masks, whatever a dense tensor or block layout carries.

Two views of every mask
-----------------------
``tile(Lq, Lk, q0, q1, k0, k1)`` gives the dense values of one rectangle of the
Lq x Lk problem without building the whole mask; ``to_dense`` is the whole
rectangle. ``block_map(Lq, Lk, block_q, block_k)`` gives one int8 code per tile:

    EMPTY   (0)  no entry of the tile may attend: an engine skips the tile
    PARTIAL (1)  mixed, or additive: the engine calls ``tile`` and applies it
    FULL    (2)  every entry may attend: the engine runs the tile unmasked

Soundness
---------
EMPTY and FULL are guarantees for every mask, so an engine that trusts them is
correct. For primitives the classification is exact (PARTIAL means mixed), except
``documents``, which may report PARTIAL for a tile that is in fact empty. An
additive tile is never FULL, since its bias must still be added. A combination
maps ``&`` to the elementwise minimum of its children's codes and ``|`` to the
maximum (EMPTY < PARTIAL < FULL): sound, but possibly conservative, e.g. a tile
where two children are PARTIAL is reported PARTIAL even when their allowed
entries never meet (``&``) or together cover the tile (``|``).
"""

from __future__ import annotations

import abc
import functools
import itertools
from collections.abc import Sequence

import torch

__all__ = [
    "EMPTY",
    "PARTIAL",
    "FULL",
    "Mask",
    "Causal",
    "SlidingWindow",
    "Padding",
    "Documents",
    "PrefixLM",
    "BlockSparse",
    "Dense",
    "And",
    "Or",
    "causal",
    "sliding_window",
    "padding",
    "documents",
    "prefix_lm",
    "block_sparse",
    "dense",
]

EMPTY, PARTIAL, FULL = 0, 1, 2

_ALIGNS = ("top_left", "bottom_right")
_SIDES = ("right", "left")
_NEG_INF = float("-inf")
# How many values of a parameter tensor a repr shows before "...".
_REPR_ITEMS = 6


# ---------------------------------------------------------------------------
# Private helpers shared by the mask kinds
# ---------------------------------------------------------------------------


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


def _check_align(align: object, where: str) -> str:
    if align not in _ALIGNS:
        raise ValueError(f'{where}: align must be "top_left" or "bottom_right", got {align!r}')
    return align  # type: ignore[return-value]


def _align_offset(align: str, Lq: int, Lk: int) -> int:
    """Column of the key that query 0 lines up with: 0 for top_left, Lk - Lq for bottom_right."""
    return 0 if align == "top_left" else Lk - Lq


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


def _any_per_tile(x: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Whether each block_q x block_k tile of a bool tensor (..., R, C) holds a True: (..., ceil(R/bq), ceil(C/bk))."""
    *lead, R, C = x.shape
    nq, nk = _cdiv(R, block_q), _cdiv(C, block_k)
    # Pad with False so the ragged last tiles see only their real entries.
    padded = x.new_zeros(*lead, nq * block_q, nk * block_k)
    padded[..., :R, :C] = x
    return padded.view(*lead, nq, block_q, nk, block_k).any(dim=-1).any(dim=-2)


def _block_map_of_dense(allowed: torch.Tensor, Lq: int, Lk: int, block_q: int, block_k: int) -> torch.Tensor:
    """Block map of a dense bool tensor (..., Lq or 1, Lk or 1): int8 (..., nQ, nK).

    A size-1 (broadcast) dim is constant along its axis: it reduces to a single
    tile, which is then expanded to all nQ (or nK) tiles.
    """
    any_ = _any_per_tile(allowed, block_q, block_k)
    full = ~_any_per_tile(~allowed, block_q, block_k)
    return _codes(full, any_, (*allowed.shape[:-2], _cdiv(Lq, block_q), _cdiv(Lk, block_k)))


def _bias_of(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a bool mask: 0 where allowed, -inf where masked."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, _NEG_INF)


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


def _lengths_tensor(value: object, where: str, name: str) -> tuple[torch.Tensor, int]:
    """Validate a per-batch length argument (1-D int tensor or list of ints, non-negative) into
    a tensor (B,), with its largest entry (0 when empty)."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise TypeError(f"{where}: {name} must hold ints, got {value!r}; pass a list of ints or an int tensor")
        value = torch.tensor(value, dtype=torch.long).reshape(len(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{where}: {name} must be a 1-D int tensor or a list of ints, got {type(value).__name__} {value!r}"
        )
    if not _is_integer(value):
        raise TypeError(f"{where}: {name} has dtype {value.dtype}; lengths must be integers (use {name}.long())")
    if value.dim() != 1:
        raise ValueError(
            f"{where}: {name} has shape {tuple(value.shape)}; it must be 1-D, one length per batch row (B,)"
        )
    if not value.numel():
        return value, 0
    low, high = (int(x) for x in torch.aminmax(value))
    if low < 0:
        raise ValueError(f"{where}: {name} holds {low}; lengths must be non-negative")
    return value, high


def _check_at_most(longest: int, limit: int, mask: Mask, name: str, dim: str) -> None:
    if longest > limit:
        raise ValueError(
            f"{mask!r}: {name} holds {longest} but {dim} is {limit}; "
            f"a length counts a row's real positions, so it must be at most {dim}"
        )


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
    """Which keys each query may attend; see the module docstring for the convention and the tile codes.

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
        return [leaf for leaf in self.leaves() if isinstance(leaf, Dense) and leaf.is_additive]

    def __and__(self, other: object) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
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


def _terms(mask: Mask, kind: type) -> tuple[Mask, ...]:
    """Children of a combination of the same kind, so a & b & c is one flat And."""
    return mask.children if isinstance(mask, kind) else (mask,)


class _Positional(Mask):
    """A mask decided by comparing index vectors: it never builds more than the tile asked for.

    Subclasses give ``_allowed(i, j)`` for index tensors i (q, 1) and j (1, k), and
    ``_tiles_allowed`` for tile bounds, which returns (full, any) from the first
    and last row/column of each tile only: O(nQ * nK) work for a block map.
    """

    def _tile(self, Lq: int, Lk: int, q0: int, q1: int, k0: int, k1: int, device: torch.device) -> torch.Tensor:
        i, j = _positions(q0, q1, k0, k1, device)
        allowed = self._allowed(i, j, Lq, Lk, device)
        return allowed.expand(*self.lead_shape, q1 - q0, k1 - k0).contiguous()

    def _block_map(self, Lq: int, Lk: int, block_q: int, block_k: int, device: torch.device) -> torch.Tensor:
        q_first, q_last = _tile_bounds(Lq, block_q, device)
        k_first, k_last = _tile_bounds(Lk, block_k, device)
        full, any_ = self._tiles_allowed(
            q_first[:, None], q_last[:, None], k_first[None, :], k_last[None, :], Lq, Lk, device
        )
        return _codes(full, any_, (*self.lead_shape, len(q_first), len(k_first)))

    @abc.abstractmethod
    def _allowed(self, i: torch.Tensor, j: torch.Tensor, Lq: int, Lk: int, device: torch.device) -> torch.Tensor:
        """Whether query i may attend key j, broadcast to (*lead_shape, q, k)."""

    @abc.abstractmethod
    def _tiles_allowed(
        self,
        q_first: torch.Tensor,
        q_last: torch.Tensor,
        k_first: torch.Tensor,
        k_last: torch.Tensor,
        Lq: int,
        Lk: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(every entry allowed, some entry allowed) per tile, from tile bounds (nQ, 1) and (1, nK), last inclusive."""


def _per_batch(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A per-batch parameter (B,) shaped (B, 1, 1, 1) to broadcast against (q, k) index tensors."""
    return t.to(device)[:, None, None, None]


# ---------------------------------------------------------------------------
# Primitive masks
# ---------------------------------------------------------------------------


class Causal(_Positional):
    """Query i may attend key j iff j <= i + off; off = 0 (top_left) or Lk - Lq (bottom_right)."""

    def __init__(self, align: str = "top_left") -> None:
        self.align = _check_align(align, "causal")

    def __repr__(self) -> str:
        return f"causal({self.align})"

    @property
    def value_key(self) -> tuple:
        return ("causal", self.align)

    def _allowed(self, i, j, Lq, Lk, device):
        return j <= i + _align_offset(self.align, Lq, Lk)

    def simplified(self, Lq: int, Lk: int) -> Mask | None:
        # Query 0 sees the fewest keys: all of them when the last key is within its reach.
        return None if Lq == 0 or Lk == 0 or Lk - 1 <= _align_offset(self.align, Lq, Lk) else self

    def _row_spans(self, Lq, Lk, device):
        start = _align_offset(self.align, Lq, Lk) + 1  # row i sees keys < i + start
        hi = torch.arange(start, start + Lq, device=device)
        return hi.new_zeros(()), hi if 0 <= start and start + Lq - 1 <= Lk else hi.clamp_(0, Lk)

    def _tiles_allowed(self, q_first, q_last, k_first, k_last, Lq, Lk, device):
        # Each row allows a prefix of the keys that grows with i, so the top-right corner
        # decides fullness and the bottom-left corner emptiness.
        return self._allowed(q_first, k_last, Lq, Lk, device), self._allowed(q_last, k_first, Lq, Lk, device)


class SlidingWindow(_Positional):
    """Query i may attend keys i+off-before .. i+off+after (inclusive); off as for ``causal``."""

    def __init__(self, before: int, after: int = 0, *, align: str = "top_left") -> None:
        for name, value in (("before", before), ("after", after)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"sliding_window: {name} must be an int, got {type(value).__name__} {value!r}")
            if value < 0:
                raise ValueError(
                    f"sliding_window: {name} is {value}; window sizes must be non-negative "
                    "(before counts keys to the left of the diagonal, after to the right)"
                )
        self.before, self.after = before, after
        self.align = _check_align(align, "sliding_window")

    @property
    def value_key(self) -> tuple:
        return ("sliding_window", self.before, self.after, self.align)

    def __repr__(self) -> str:
        if self.after == 0 and self.align == "top_left":
            return f"sliding_window({self.before})"
        return f"sliding_window({self.before}, {self.after}, {self.align})"

    def _allowed(self, i, j, Lq, Lk, device):
        centre = i + _align_offset(self.align, Lq, Lk)
        return (j >= centre - self.before) & (j <= centre + self.after)

    def simplified(self, Lq: int, Lk: int) -> Mask | None:
        # The last query's window must reach key 0, and the first query's the last key.
        off = _align_offset(self.align, Lq, Lk)
        reaches = Lq - 1 + off - self.before <= 0 and off + self.after >= Lk - 1
        return None if Lq == 0 or Lk == 0 or reaches else self

    def _row_spans(self, Lq, Lk, device):
        centre = torch.arange(Lq, device=device) + _align_offset(self.align, Lq, Lk)
        return (centre - self.before).clamp(0, Lk), (centre + self.after + 1).clamp(0, Lk)

    def _tiles_allowed(self, q_first, q_last, k_first, k_last, Lq, Lk, device):
        # The band is off-before <= j - i <= off+after, and over a tile j - i spans exactly
        # [k_first - q_last, k_last - q_first]: the tile is full when both ends lie in the band
        # (its bottom-left and top-right corners are allowed), non-empty when the ranges meet.
        full = self._allowed(q_last, k_first, Lq, Lk, device) & self._allowed(q_first, k_last, Lq, Lk, device)
        off = _align_offset(self.align, Lq, Lk)
        any_ = (k_first - q_last <= off + self.after) & (k_last - q_first >= off - self.before)
        return full, any_


class Padding(_Positional):
    """Per batch row b, with side "right": key j allowed iff j < kv_lengths[b], query rows
    i >= q_lengths[b] see nothing. With side "left" the real tokens are the last ones:
    key j allowed iff j >= Lk - kv_lengths[b], rows i < Lq - q_lengths[b] see nothing.

    The mask keeps the length tensors it is given and checks their largest entries once,
    here: do not modify them afterwards (``KVCache`` hands each step's mask a copy)."""

    def __init__(self, kv_lengths: torch.Tensor | Sequence[int], q_lengths: torch.Tensor | Sequence[int] | None = None,
                 *, side: str = "right"):
        self.kv_lengths, self._kv_longest = _lengths_tensor(kv_lengths, "padding", "kv_lengths")
        self.q_lengths, self._q_longest = (None, 0) if q_lengths is None else \
            _lengths_tensor(q_lengths, "padding", "q_lengths")
        if self.q_lengths is not None and len(self.q_lengths) != len(self.kv_lengths):
            raise ValueError(
                f"padding: q_lengths has {len(self.q_lengths)} entries but kv_lengths has "
                f"{len(self.kv_lengths)}; pass one query length per batch row"
            )
        if side not in _SIDES:
            raise ValueError(f"padding: side must be one of {_SIDES}, got {side!r}")
        self.side = side

    def __repr__(self) -> str:
        q = "" if self.q_lengths is None else f", q_lengths={_summary(self.q_lengths)}"
        side = "" if self.side == "right" else f", side={self.side!r}"
        return f"padding(kv_lengths={_summary(self.kv_lengths)}{q}{side})"

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return (len(self.kv_lengths), 1)

    @property
    def _device(self) -> torch.device | None:
        return self.kv_lengths.device

    def check(self, Lq: int, Lk: int) -> None:
        super().check(Lq, Lk)
        _check_at_most(self._kv_longest, Lk, self, "kv_lengths", "Lk")
        _check_at_most(self._q_longest, Lq, self, "q_lengths", "Lq")

    def _real(self, i: torch.Tensor, L: int, lengths: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Whether position i (of a length-L side) holds a real token, per batch row."""
        if self.side == "right":
            return i < _per_batch(lengths, device)
        return i >= L - _per_batch(lengths, device)

    def _allowed(self, i, j, Lq, Lk, device):
        allowed = self._real(j, Lk, self.kv_lengths, device)
        if self.q_lengths is not None:
            allowed = allowed & self._real(i, Lq, self.q_lengths, device)
        return allowed

    def _row_spans(self, Lq, Lk, device):
        # Few small ops, since a decoding step derives these anew: (B, 1, 1) per batch row,
        # and hi (B, 1, Lq) set to 0 (lo >= hi: nothing) in the rows of padding queries.
        kv = self.kv_lengths.to(device).view(-1, 1, 1)
        lo, hi = (kv.new_zeros(()), kv) if self.side == "right" else (Lk - kv, kv.new_full((), Lk))
        if self.q_lengths is not None:
            i, q = torch.arange(Lq, device=device), self.q_lengths.to(device).view(-1, 1, 1)
            hi = hi * (i < q if self.side == "right" else i >= Lq - q)
        return lo, hi

    def _tiles_allowed(self, q_first, q_last, k_first, k_last, Lq, Lk, device):
        # The allowed set is a rectangle anchored at the (0, 0) corner (right padding) or the
        # (Lq, Lk) corner (left): a tile is full when its corner farthest from the anchor is
        # in it, non-empty when its nearest corner is.
        near, far = ((q_first, k_first), (q_last, k_last)) if self.side == "right" else ((q_last, k_last), (q_first, k_first))
        return self._allowed(*far, Lq, Lk, device), self._allowed(*near, Lq, Lk, device)


class PrefixLM(_Positional):
    """Key j allowed iff j < prefix (bidirectional prefix) or j <= i (causal, top-left)."""

    def __init__(self, prefix_lengths: int | torch.Tensor | Sequence[int]) -> None:
        if isinstance(prefix_lengths, int) and not isinstance(prefix_lengths, bool):
            if prefix_lengths < 0:
                raise ValueError(f"prefix_lm: prefix_lengths is {prefix_lengths}; it must be non-negative")
            self.prefix_lengths: int | torch.Tensor = prefix_lengths
        else:
            self.prefix_lengths, _ = _lengths_tensor(prefix_lengths, "prefix_lm", "prefix_lengths")

    def __repr__(self) -> str:
        p = self.prefix_lengths
        return f"prefix_lm({p if isinstance(p, int) else _summary(p)})"

    @property
    def value_key(self) -> tuple | None:
        return ("prefix_lm", self.prefix_lengths) if isinstance(self.prefix_lengths, int) else None

    @property
    def lead_shape(self) -> tuple[int, ...]:
        p = self.prefix_lengths
        return () if isinstance(p, int) else (len(p), 1)

    @property
    def _device(self) -> torch.device | None:
        p = self.prefix_lengths
        return None if isinstance(p, int) else p.device

    def _last_visible(self, i, device):
        """The last key row i may attend: the prefix is visible to all, the rest causally."""
        p = self.prefix_lengths
        if isinstance(p, int):
            return i.clamp(min=p - 1)
        return torch.maximum(i, _per_batch(p, device) - 1)

    def _allowed(self, i, j, Lq, Lk, device):
        return j <= self._last_visible(i, device)

    def _row_spans(self, Lq, Lk, device):
        i = torch.arange(Lq, device=device)[:, None]  # (Lq, 1), as the query index of _allowed
        hi = (self._last_visible(i, device) + 1).clamp(0, Lk)[..., 0]
        return torch.zeros_like(hi), hi

    def _tiles_allowed(self, q_first, q_last, k_first, k_last, Lq, Lk, device):
        # As for causal: the last visible key grows with i, so the top-right corner decides
        # fullness and the bottom-left corner emptiness.
        return self._allowed(q_first, k_last, Lq, Lk, device), self._allowed(q_last, k_first, Lq, Lk, device)


class Documents(Mask):
    """Packed sequences: query i may attend key j iff their document ids are equal and non-negative."""

    def __init__(self, q_doc_ids: torch.Tensor, kv_doc_ids: torch.Tensor | None = None) -> None:
        for name, ids in (("q_doc_ids", q_doc_ids), ("kv_doc_ids", kv_doc_ids)):
            if ids is None:
                continue
            if not isinstance(ids, torch.Tensor):
                raise TypeError(
                    f"documents: {name} must be an int tensor (L,) or (B, L), got {type(ids).__name__}; "
                    "wrap it with torch.tensor(...)"
                )
            if not _is_integer(ids):
                raise TypeError(f"documents: {name} has dtype {ids.dtype}; document ids must be integers (use .long())")
            if ids.dim() not in (1, 2):
                raise ValueError(f"documents: {name} has shape {tuple(ids.shape)}; it must be (L,) or (B, L)")
        self.kv_defaulted = kv_doc_ids is None
        self.q_doc_ids = q_doc_ids
        self.kv_doc_ids = q_doc_ids if kv_doc_ids is None else kv_doc_ids
        batches = [ids.shape[0] for ids in (self.q_doc_ids, self.kv_doc_ids) if ids.dim() == 2]
        try:
            self._batch = torch.broadcast_shapes(*((b,) for b in batches))
        except RuntimeError:
            raise ValueError(
                f"documents: q_doc_ids has {batches[0]} batch rows but kv_doc_ids has {batches[1]}; "
                "give both the same B (or pass 1-D ids shared by every row)"
            ) from None

    def __repr__(self) -> str:
        kv = "" if self.kv_defaulted else f", kv_doc_ids={_summary(self.kv_doc_ids)}"
        return f"documents(q_doc_ids={_summary(self.q_doc_ids)}{kv})"

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return (*self._batch, 1) if self._batch else ()

    @property
    def _device(self) -> torch.device | None:
        return self.q_doc_ids.device

    def check(self, Lq: int, Lk: int) -> None:
        super().check(Lq, Lk)
        if self.kv_defaulted and Lq != Lk:
            raise ValueError(
                f"{self!r}: kv_doc_ids defaults to q_doc_ids, which needs Lq == Lk, but Lq={Lq} and Lk={Lk}; "
                "pass kv_doc_ids for the keys"
            )
        for name, ids, L, dim in (("q_doc_ids", self.q_doc_ids, Lq, "Lq"), ("kv_doc_ids", self.kv_doc_ids, Lk, "Lk")):
            if ids.shape[-1] != L:
                raise ValueError(
                    f"{self!r}: {name} has length {ids.shape[-1]} but {dim} is {L}; give one id per position"
                )

    def _ids(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Ids as (L,) or (B, 1, L), so that per-batch ids broadcast against the head dim."""
        ids = ids.to(device)
        return ids[:, None, :] if ids.dim() == 2 else ids

    def _tile(self, Lq, Lk, q0, q1, k0, k1, device):
        q = self._ids(self.q_doc_ids, device)[..., q0:q1, None]
        k = self._ids(self.kv_doc_ids, device)[..., None, k0:k1]
        # A negative id marks padding, which matches nothing, not even another negative id.
        allowed = (q == k) & (q >= 0)
        return allowed.expand(*self.lead_shape, q1 - q0, k1 - k0).contiguous()

    def _row_spans(self, Lq, Lk, device):
        # Sorted key ids (padding, id < 0, only at the end) put every document in one run of
        # keys, found by binary search; otherwise a document's keys need not be one interval.
        kv = self._ids(self.kv_doc_ids, device)
        q = self._ids(self.q_doc_ids, device)
        big = torch.iinfo(kv.dtype).max
        kv = torch.where(kv >= 0, kv, big)
        if Lk > 1 and not bool((kv[..., 1:] >= kv[..., :-1]).all()):
            return None
        q = torch.where(q >= 0, q, big)  # a padded query finds only the padded keys...
        lead = torch.broadcast_shapes(kv.shape[:-1], q.shape[:-1])
        kv, q = kv.expand(*lead, Lk).contiguous(), q.expand(*lead, Lq).contiguous()
        lo = torch.searchsorted(kv, q, side="left")
        hi = torch.where(q == big, lo, torch.searchsorted(kv, q, side="right"))  # ...and so sees nothing
        return lo, hi

    def _block_map(self, Lq, Lk, block_q, block_k, device):
        return self._codes_of_ranges(_tile_min_max(self._ids(self.q_doc_ids, device), block_q),
                                     _tile_min_max(self._ids(self.kv_doc_ids, device), block_k))

    def _codes_of_ranges(self, q_ids: tuple[torch.Tensor, torch.Tensor],
                         k_ids: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Tile codes (*lead_shape, nQ, nK) from each tile's smallest and largest query id
        (..., nQ) and key id (..., nK). Only id ranges are known per tile, so a tile whose
        ranges overlap without a shared id is reported PARTIAL: sound, not exact."""
        (q_min, q_max), (k_min, k_max) = q_ids, k_ids
        nQ, nK = q_min.shape[-1], k_min.shape[-1]
        q_min, q_max = q_min[..., :, None], q_max[..., :, None]
        k_min, k_max = k_min[..., None, :], k_max[..., None, :]
        any_ = (q_max >= k_min) & (k_max >= q_min) & (q_max >= 0) & (k_max >= 0)
        full = (q_min == q_max) & (k_min == k_max) & (q_min == k_min) & (q_min >= 0)
        return _codes(full, any_, (*self.lead_shape, nQ, nK))


def _tile_min_max(ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest id of each tile of ids (..., L): each (..., ceil(L / block))."""
    L = ids.shape[-1]
    n = _cdiv(L, block)
    pad = n * block - L
    if pad:
        # Repeating the last id leaves every tile's min and max unchanged.
        ids = torch.cat([ids, ids[..., -1:].expand(*ids.shape[:-1], pad)], dim=-1)
    tiles = ids.reshape(*ids.shape[:-1], n, block)
    return tiles.amin(dim=-1), tiles.amax(dim=-1)


class BlockSparse(Mask):
    """Entry (i, j) allowed iff layout[..., i // bq, j // bk]; layout (..., nQb, nKb) bool."""

    def __init__(self, layout: torch.Tensor, block_size: int | tuple[int, int]) -> None:
        if not isinstance(layout, torch.Tensor):
            raise TypeError(f"block_sparse: layout must be a bool tensor (..., nQb, nKb), got {type(layout).__name__}")
        if layout.dtype != torch.bool:
            raise TypeError(f"block_sparse: layout has dtype {layout.dtype}; it must be bool (use layout.bool())")
        if layout.dim() < 2:
            raise ValueError(
                f"block_sparse: layout has shape {tuple(layout.shape)}; it needs at least 2 dims (..., nQb, nKb)"
            )
        sizes = (block_size, block_size) if isinstance(block_size, int) else block_size
        if (
            not isinstance(sizes, (tuple, list))
            or len(sizes) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes)
        ):
            raise ValueError(
                f"block_sparse: block_size is {block_size!r}; it must be a positive int or a pair (bq, bk) of them"
            )
        self.layout = layout
        self.block_size: tuple[int, int] = (sizes[0], sizes[1])

    def __repr__(self) -> str:
        bq, bk = self.block_size
        size = bq if bq == bk else self.block_size
        return f"block_sparse({_summary(self.layout)}, block_size={size})"

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return tuple(self.layout.shape[:-2])

    @property
    def _device(self) -> torch.device | None:
        return self.layout.device

    def check(self, Lq: int, Lk: int) -> None:
        super().check(Lq, Lk)
        bq, bk = self.block_size
        need = (_cdiv(Lq, bq), _cdiv(Lk, bk))
        have = tuple(self.layout.shape[-2:])
        if have[0] < need[0] or have[1] < need[1]:
            raise ValueError(
                f"{self!r}: layout has {have[0]} x {have[1]} blocks but Lq={Lq}, Lk={Lk} with block_size "
                f"{self.block_size} need {need[0]} x {need[1]}; "
                "give a layout of at least ceil(L / block) blocks per dim"
            )

    def _tile(self, Lq, Lk, q0, q1, k0, k1, device):
        i, j = _positions(q0, q1, k0, k1, device)
        bq, bk = self.block_size
        return self.layout.to(device)[..., i // bq, j // bk]

    def _block_map(self, Lq, Lk, block_q, block_k, device):
        bq, bk = self.block_size
        q_first, q_last = _tile_bounds(Lq, block_q, device)
        k_first, k_last = _tile_bounds(Lk, block_k, device)
        # Each tile touches the layout blocks r0..r1 x c0..c1, every one of them in part, so
        # counting their True blocks classifies the tile exactly.
        r0, r1 = (q_first // bq)[:, None], (q_last // bq)[:, None]
        c0, c1 = (k_first // bk)[None, :], (k_last // bk)[None, :]
        layout = self.layout.to(device)
        *lead, nqb, nkb = layout.shape
        sums = torch.zeros(*lead, nqb + 1, nkb + 1, dtype=torch.long, device=device)  # 2-D prefix sums
        sums[..., 1:, 1:] = layout.long().cumsum(-2).cumsum(-1)
        count = sums[..., r1 + 1, c1 + 1] - sums[..., r0, c1 + 1] - sums[..., r1 + 1, c0] + sums[..., r0, c0]
        blocks = (r1 - r0 + 1) * (c1 - c0 + 1)
        return _codes(count == blocks, count > 0, (*self.lead_shape, len(q_first), len(k_first)))


class Dense(Mask):
    """A given tensor (..., Lq or 1, Lk or 1): bool (True = may attend) or float (additive bias)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"dense: tensor must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != torch.bool and not tensor.is_floating_point():
            raise TypeError(
                f"dense: tensor has dtype {tensor.dtype}; use a bool tensor (True = may attend, e.g. tensor != 0) "
                "or a floating bias (-inf = masked, e.g. tensor.float())"
            )
        if tensor.dim() < 2:
            raise ValueError(
                f"dense: tensor has shape {tuple(tensor.shape)}; it needs at least 2 dims (..., Lq, Lk) "
                "(add a query dim with tensor[None, :])"
            )
        self.tensor = tensor
        self.is_additive = tensor.is_floating_point()

    def __repr__(self) -> str:
        return f"dense({_summary(self.tensor)})"

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape[:-2])

    @property
    def _device(self) -> torch.device | None:
        return self.tensor.device

    def check(self, Lq: int, Lk: int) -> None:
        super().check(Lq, Lk)
        rows, cols = self.tensor.shape[-2:]
        if rows not in (Lq, 1) or cols not in (Lk, 1):
            raise ValueError(
                f"{self!r}: last two dims are ({rows}, {cols}) but the problem is Lq={Lq}, Lk={Lk}; "
                f"they must be ({Lq} or 1, {Lk} or 1)"
            )

    def _tile(self, Lq, Lk, q0, q1, k0, k1, device):
        rows, cols = self.tensor.shape[-2:]
        # A size-1 dim broadcasts over every query (or key), so every tile takes all of it.
        r = slice(None) if rows == 1 else slice(q0, q1)
        c = slice(None) if cols == 1 else slice(k0, k1)
        return self.tensor.to(device)[..., r, c]

    def _block_map(self, Lq, Lk, block_q, block_k, device):
        t = self.tensor.detach().to(device)
        allowed = t != _NEG_INF if self.is_additive else t
        codes = _block_map_of_dense(allowed, Lq, Lk, block_q, block_k)
        # A bias must still be added on a tile where every key is visible.
        return codes.clamp_(max=PARTIAL) if self.is_additive else codes


# ---------------------------------------------------------------------------
# Combinations
# ---------------------------------------------------------------------------


class _Combination(Mask):
    """A flat combination of two or more masks; subclasses give the operator."""

    _symbol: str

    def __init__(self, *children: Mask) -> None:
        self.children = children
        # Shapes that broadcast pairwise broadcast together, so a failure always has one culprit pair to name.
        for k, child in enumerate(children):
            for earlier in children[:k]:
                try:
                    torch.broadcast_shapes(earlier.lead_shape, child.lead_shape)
                except RuntimeError:
                    raise ValueError(
                        f"cannot combine {earlier!r} (lead_shape {earlier.lead_shape}) with {child!r} "
                        f"(lead_shape {child.lead_shape}): their leading dims do not broadcast; "
                        "give per-batch masks the same batch size B"
                    ) from None
        self._lead = tuple(torch.broadcast_shapes(*(c.lead_shape for c in children)))

    def __repr__(self) -> str:
        return f" {self._symbol} ".join(self._child_repr(c) for c in self.children)

    def _child_repr(self, child: Mask) -> str:
        return repr(child)

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return self._lead

    @property
    def _device(self) -> torch.device | None:
        return next((d for d in (c._device for c in self.children) if d is not None), None)

    def check(self, Lq: int, Lk: int) -> None:
        for child in self.children:
            child.check(Lq, Lk)

    def leaves(self) -> list[Mask]:
        return [leaf for child in self.children for leaf in child.leaves()]

    @property
    def value_key(self) -> tuple | None:
        keys = tuple(c.value_key for c in self.children)
        return None if None in keys else (self._symbol, keys)


class And(_Combination):
    """Allowed where every child allows.

    With an additive child the result is a bias: the sum of the children's biases,
    plus -inf where a boolean child masks.
    """

    _symbol = "&"

    def __init__(self, *children: Mask) -> None:
        super().__init__(*children)
        self.is_additive = any(c.is_additive for c in children)

    def _child_repr(self, child: Mask) -> str:
        # & binds tighter than |, so an Or inside an And needs parentheses.
        return f"({child!r})" if isinstance(child, Or) else repr(child)

    def _tile(self, Lq, Lk, q0, q1, k0, k1, device):
        tiles = [(c.is_additive, c._tile(Lq, Lk, q0, q1, k0, k1, device)) for c in self.children]
        keeps = [t for additive, t in tiles if not additive]
        allowed = functools.reduce(torch.logical_and, keeps) if keeps else None
        if not self.is_additive:
            return allowed
        bias = functools.reduce(torch.add, [t for additive, t in tiles if additive])
        return bias if allowed is None else bias + _bias_of(allowed, bias.dtype)

    def _block_map(self, Lq, Lk, block_q, block_k, device):
        maps = [c._block_map(Lq, Lk, block_q, block_k, device) for c in self.children]
        return functools.reduce(torch.minimum, maps)

    def _row_spans(self, Lq, Lk, device):
        spans = [c._row_spans(Lq, Lk, device) for c in self.children]
        if any(sp is None for sp in spans):
            return None
        lo = functools.reduce(torch.maximum, [sp[0] for sp in spans])
        return lo, functools.reduce(torch.minimum, [sp[1] for sp in spans])

    def simplified(self, Lq: int, Lk: int) -> Mask | None:
        kept = [c for c in (child.simplified(Lq, Lk) for child in self.children) if c is not None]
        if len(kept) == len(self.children) and all(a is b for a, b in zip(kept, self.children)):
            return self
        return None if not kept else kept[0] if len(kept) == 1 else And(*kept)


class Or(_Combination):
    """Allowed where any child allows; boolean masks only."""

    _symbol = "|"

    def simplified(self, Lq: int, Lk: int) -> Mask | None:
        return None if any(child.simplified(Lq, Lk) is None for child in self.children) else self

    def _tile(self, Lq, Lk, q0, q1, k0, k1, device):
        return functools.reduce(torch.logical_or, [c._tile(Lq, Lk, q0, q1, k0, k1, device) for c in self.children])

    def _block_map(self, Lq, Lk, block_q, block_k, device):
        maps = [c._block_map(Lq, Lk, block_q, block_k, device) for c in self.children]
        return functools.reduce(torch.maximum, maps)

    def _row_spans(self, Lq, Lk, device):
        spans = [c._row_spans(Lq, Lk, device) for c in self.children]
        if any(sp is None for sp in spans):
            return None

        def union(a, b):
            (lo_a, hi_a), (lo_b, hi_b) = a, b
            empty_a, empty_b = lo_a >= hi_a, lo_b >= hi_b
            # Two intervals make one when either is empty or they overlap or touch.
            if not bool((empty_a | empty_b | (torch.maximum(lo_a, lo_b) <= torch.minimum(hi_a, hi_b))).all()):
                return None
            lo = torch.where(empty_a, lo_b, torch.where(empty_b, lo_a, torch.minimum(lo_a, lo_b)))
            hi = torch.where(empty_a, hi_b, torch.where(empty_b, hi_a, torch.maximum(hi_a, hi_b)))
            return lo, hi

        out = spans[0]
        for sp in spans[1:]:
            out = union(out, sp)
            if out is None:
                return None
        return out


# ---------------------------------------------------------------------------
# Constructors
# ---------------------------------------------------------------------------


def causal(align: str = "top_left") -> Causal:
    """Causal mask, aligned "top_left" or "bottom_right".

    top_left: query i sees keys j <= i, like torch's is_causal. bottom_right:
    j <= i + (Lk - Lq), the decoding alignment where the last query sees every key.
    """
    return Causal(align)


def sliding_window(before: int, after: int = 0, *, align: str = "top_left") -> SlidingWindow:
    """Local attention: query i sees keys i+off-before .. i+off+after, off = 0 (top_left) or Lk - Lq (bottom_right)."""
    return SlidingWindow(before, after, align=align)


def padding(
    kv_lengths: torch.Tensor | Sequence[int], q_lengths: torch.Tensor | Sequence[int] | None = None,
    *, side: str = "right",
) -> Padding:
    """Padded batches. kv_lengths, q_lengths: (B,) non-negative ints, the real tokens per row.

    side "right" (real tokens first): key j is allowed for row b iff j < kv_lengths[b];
    query rows i >= q_lengths[b] see nothing (fully masked rows, which the library turns
    into zero output). side "left" (real tokens last, as in batched generation and KV
    caches): key j is allowed iff j >= Lk - kv_lengths[b]; rows i < Lq - q_lengths[b]
    see nothing. lead_shape (B, 1).
    """
    return Padding(kv_lengths, q_lengths, side=side)


def documents(q_doc_ids: torch.Tensor, kv_doc_ids: torch.Tensor | None = None) -> Documents:
    """Packed sequences. q_doc_ids: (Lq,) or (B, Lq) ints; kv_doc_ids: (Lk,) or (B, Lk), default q_doc_ids.

    Query i may attend key j iff q_doc_ids[i] == kv_doc_ids[j]; a negative id marks
    padding and matches nothing. lead_shape () for 1-D ids, (B, 1) otherwise.
    """
    return Documents(q_doc_ids, kv_doc_ids)


def prefix_lm(prefix_lengths: int | torch.Tensor | Sequence[int]) -> PrefixLM:
    """Prefix LM: key j allowed iff j < prefix (bidirectional) or j <= i (causal, top-left).

    prefix_lengths: an int shared by all rows, or (B,) ints (lead_shape (B, 1)).
    """
    return PrefixLM(prefix_lengths)


def block_sparse(layout: torch.Tensor, block_size: int | tuple[int, int]) -> BlockSparse:
    """Block-sparse mask. layout: (..., nQb, nKb) bool, leading dims broadcast like attn_mask (e.g. (H, nQb, nKb)).

    Entry (i, j) is allowed iff layout[..., i // bq, j // bk]; block_size is bq = bk or (bq, bk).
    """
    return BlockSparse(layout, block_size)


def dense(tensor: torch.Tensor) -> Dense:
    """An explicit mask. tensor: (..., Lq or 1, Lk or 1), bool (True = may attend) or floating (additive bias).

    A float tensor keeps autograd: ``tile`` is a slice, so gradients flow back to it.
    """
    return Dense(tensor)


# ---------------------------------------------------------------------------
# Views: part of a larger problem's mask
# ---------------------------------------------------------------------------


def _runs_of(value: object, L: int, name: str) -> tuple[tuple[int, int], ...]:
    """A range, or a list of ranges (step 1) inside range(0, L), as ((start, stop), ...)."""
    items = (value,) if isinstance(value, range) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(r, range) for r in items):
        raise TypeError(f"view: {name} must be a range or a list of ranges, got {value!r}")
    for r in items:
        if r.step != 1 or not 0 <= r.start <= r.stop <= L:
            raise ValueError(
                f"view: {name} holds {r!r}, which is not a step-1 range inside range(0, {L}); "
                f"give positions of the {L}-long side as ranges like range(a, b) with 0 <= a <= b <= {L}"
            )
    return tuple((r.start, r.stop) for r in items)


def _pieces(runs: tuple[tuple[int, int], ...], a: int, b: int) -> list[tuple[int, int]]:
    """The larger problem's positions of a view's positions a:b, as one (start, stop) per run they meet."""
    out, offset = [], 0
    for g0, g1 in runs:
        lo, hi = max(a, offset), min(b, offset + g1 - g0)
        if lo < hi:
            out.append((g0 + lo - offset, g0 + hi - offset))
        offset += g1 - g0
    return out


def _runs_meeting(
    runs: tuple[tuple[int, int], ...], first: torch.Tensor, last: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each non-empty run: which of the view's tiles (first..last inclusive, local) meet it,
    and those tiles' parts in it, as the larger problem's first and last positions."""
    out, offset = [], 0
    for g0, g1 in runs:
        n = g1 - g0
        if n:
            lo, hi = first.clamp(min=offset), last.clamp(max=offset + n - 1)
            meets = lo <= hi
            out.append((meets, torch.where(meets, lo - offset + g0, g0), torch.where(meets, hi - offset + g0, g0)))
        offset += n
    return out


def _range_min_max(ids: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest id of ids[..., f:l+1] for each pair of first, last (n,): each (..., n)."""
    if not len(first):
        return ids.new_empty(*ids.shape[:-1], 0), ids.new_empty(*ids.shape[:-1], 0)
    parts = [ids[..., f : l + 1] for f, l in zip(first.tolist(), last.tolist())]
    return torch.stack([p.amin(-1) for p in parts], -1), torch.stack([p.amax(-1) for p in parts], -1)


def _rect_codes(
    mask: Mask, Lq: int, Lk: int, q_first: torch.Tensor, q_last: torch.Tensor, k_first: torch.Tensor,
    k_last: torch.Tensor, device: torch.device,
) -> torch.Tensor:
    """Tile codes of arbitrary rectangles of an Lq x Lk mask: rows q_first..q_last (nQ, 1) by
    columns k_first..k_last (1, nK), inclusive; int8 (*lead_shape, nQ, nK). As sound as
    ``block_map``: exact for primitives, min/max for combinations, id ranges for documents."""
    nQ, nK = q_first.shape[0], k_first.shape[1]
    if isinstance(mask, _Positional):
        full, any_ = mask._tiles_allowed(q_first, q_last, k_first, k_last, Lq, Lk, device)
        return _codes(full, any_, (*mask.lead_shape, nQ, nK))
    if isinstance(mask, (And, Or)):
        combine = torch.minimum if isinstance(mask, And) else torch.maximum
        return functools.reduce(
            combine, [_rect_codes(c, Lq, Lk, q_first, q_last, k_first, k_last, device) for c in mask.children]
        )
    if isinstance(mask, Documents):  # block_map's test, on the id ranges of these rectangles
        return mask._codes_of_ranges(_range_min_max(mask._ids(mask.q_doc_ids, device), q_first[:, 0], q_last[:, 0]),
                                     _range_min_max(mask._ids(mask.kv_doc_ids, device), k_first[0], k_last[0]))
    # Dense, block-sparse and anything else: classify each rectangle's dense values.
    out = torch.empty((*mask.lead_shape, nQ, nK), dtype=torch.int8, device=device)
    for a, (q0, q1) in enumerate(zip(q_first[:, 0].tolist(), q_last[:, 0].tolist())):
        for b, (k0, k1) in enumerate(zip(k_first[0].tolist(), k_last[0].tolist())):
            t = mask._tile(Lq, Lk, q0, q1 + 1, k0, k1 + 1, device)
            allowed = t != _NEG_INF if mask.is_additive else t
            full, any_ = allowed.all(-1).all(-1), allowed.any(-1).any(-1)
            out[..., a, b] = torch.where(full, FULL, torch.where(any_, PARTIAL, EMPTY))
    return out.clamp_(max=PARTIAL) if mask.is_additive else out


class View(Mask):
    """Some rows and columns of a larger Lq x Lk problem's mask, as a mask of their own.

    ``rows`` and ``cols`` are ranges of the larger problem's positions, or lists of them
    (concatenated in order): the view is nq x nk, nq and nk the total lengths. Entry (a, b)
    of the view is entry (rows[a], cols[b]) of ``mask`` evaluated on the whole Lq x Lk
    problem, so a causal or document mask keeps its global positions. Context-parallel
    attention gives each process's block of queries and keys such a view.

    ``tile``, ``block_map`` and ``row_spans`` delegate to ``mask`` at the larger problem's
    positions; a block map is as sound as ``mask``'s (a tile that straddles two runs gets
    the combined code of its parts). ``biases()`` are the larger mask's float leaves cut to
    the view's rows and columns (``cut``), so a gradient reaches the larger bias through
    autograd, and ``add_cut`` puts a gradient computed for a cut back at its positions.
    """

    def __init__(self, mask: Mask, Lq: int, Lk: int, rows: range | Sequence[range],
                 cols: range | Sequence[range]) -> None:
        if not isinstance(mask, Mask):
            raise TypeError(f"view: mask must be a dotattn.masks.Mask, got {type(mask).__name__}")
        mask.check(Lq, Lk)
        self.mask, self.Lq, self.Lk = mask, Lq, Lk
        self.rows, self.cols = _runs_of(rows, Lq, "rows"), _runs_of(cols, Lk, "cols")
        self.nq = sum(b - a for a, b in self.rows)
        self.nk = sum(b - a for a, b in self.cols)
        self.is_additive = mask.is_additive

    def __repr__(self) -> str:
        def runs(rs):
            return "[" + ", ".join(f"{a}:{b}" for a, b in rs) + "]"

        return f"view({self.mask!r} of {self.Lq} x {self.Lk}, rows={runs(self.rows)}, cols={runs(self.cols)})"

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return self.mask.lead_shape

    @property
    def _device(self) -> torch.device | None:
        return self.mask._device

    @property
    def value_key(self) -> tuple | None:
        key = self.mask.value_key
        return None if key is None else ("view", key, self.Lq, self.Lk, self.rows, self.cols)

    def check(self, Lq: int, Lk: int) -> None:
        super().check(Lq, Lk)
        if (Lq, Lk) != (self.nq, self.nk):
            raise ValueError(
                f"{self!r} covers {self.nq} x {self.nk} positions but the problem is Lq={Lq}, Lk={Lk}; "
                "a view's rows and cols must add up to the query and key lengths"
            )

    def biases(self) -> list[Dense]:
        return [Dense(self.cut(leaf.tensor)) for leaf in self.mask.biases()]

    def cut(self, tensor: torch.Tensor) -> torch.Tensor:
        """(..., Lq or 1, Lk or 1) -> (..., nq or 1, nk or 1): the view's rows and columns of a
        tensor of the larger problem (a size-1 dim broadcasts, so it stays). A narrow when
        the view has one run per side, else a cat of narrows; autograd flows through either."""
        for dim, runs in ((-2, self.rows), (-1, self.cols)):
            if tensor.shape[dim] != 1:
                parts = [tensor.narrow(dim, a, b - a) for a, b in runs] or [tensor.narrow(dim, 0, 0)]
                tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim)
        return tensor

    def add_cut(self, whole: torch.Tensor, part: torch.Tensor) -> None:
        """The inverse of ``cut`` for gradients: adds ``part`` (the shape of ``cut(whole)``) into
        ``whole`` at the view's positions, in place."""
        def runs(dim: int, own: tuple[tuple[int, int], ...]) -> list[tuple[int, int, int]]:
            if whole.shape[dim] == 1:  # broadcast: the one entry takes every position's share
                return [(0, 0, 1)]
            offsets = itertools.accumulate((b - a for a, b in own), initial=0)
            return [(a, offset, b - a) for (a, b), offset in zip(own, offsets)]

        for r, r_off, nr in runs(-2, self.rows):
            for c, c_off, nc in runs(-1, self.cols):
                whole.narrow(-2, r, nr).narrow(-1, c, nc).add_(part.narrow(-2, r_off, nr).narrow(-1, c_off, nc))

    def _tile(self, Lq, Lk, q0, q1, k0, k1, device):
        rows, cols = _pieces(self.rows, q0, q1), _pieces(self.cols, k0, k1)
        if len(rows) == 1 and len(cols) == 1:  # inside one run: the larger mask's own tile
            return self.mask._tile(self.Lq, self.Lk, *rows[0], *cols[0], device)
        if not rows or not cols:
            like = self.mask._tile(self.Lq, self.Lk, 0, 0, 0, 0, device)
            return torch.empty((*self.lead_shape, q1 - q0, k1 - k0), dtype=like.dtype, device=device)
        lead = self.lead_shape
        return torch.cat([
            torch.cat([self.mask._tile(self.Lq, self.Lk, a, b, c, d, device).expand(*lead, b - a, d - c)
                       for c, d in cols], -1)
            for a, b in rows
        ], -2)

    def _block_map(self, Lq, Lk, block_q, block_k, device):
        q_first, q_last = _tile_bounds(Lq, block_q, device)
        k_first, k_last = _tile_bounds(Lk, block_k, device)
        full = torch.ones(len(q_first), len(k_first), dtype=torch.bool, device=device)
        any_ = torch.zeros_like(full)
        # A tile that meets several runs is the union of rectangles of the larger problem:
        # FULL when each is, EMPTY when each is.
        for q_meets, qf, ql in _runs_meeting(self.rows, q_first, q_last):
            for k_meets, kf, kl in _runs_meeting(self.cols, k_first, k_last):
                codes = _rect_codes(self.mask, self.Lq, self.Lk, qf[:, None], ql[:, None], kf[None, :],
                                    kl[None, :], device)
                meets = q_meets[:, None] & k_meets[None, :]
                full = full & (~meets | (codes == FULL))
                any_ = any_ | (meets & (codes != EMPTY))
        return _codes(full, any_, (*self.lead_shape, len(q_first), len(k_first)))

    def _row_spans(self, Lq, Lk, device):
        spans = self.mask._row_spans(self.Lq, self.Lk, device)
        if spans is None:
            return None
        lo, hi = torch.broadcast_tensors(*spans)
        lo, hi = lo.expand(*lo.shape[:-1], self.Lq), hi.expand(*hi.shape[:-1], self.Lq)
        rows = torch.cat([torch.arange(a, b, device=device) for a, b in self.rows]
                         or [torch.zeros(0, dtype=torch.long, device=device)])
        lo, hi = lo[..., rows], hi[..., rows]
        # Each run of columns holds one piece of a row's interval, in view positions; the
        # pieces make one interval when every nonempty one starts where the last one ended.
        out_lo = out_hi = None
        offset = 0
        for c0, c1 in self.cols:
            a = lo.clamp(c0, c1) - c0 + offset
            b = hi.clamp(c0, c1) - c0 + offset
            offset += c1 - c0
            if out_lo is None:
                out_lo, out_hi = a, b
                continue
            had, has = out_lo < out_hi, a < b
            if not bool((~had | ~has | (out_hi == a)).all()):
                return None
            out_lo, out_hi = torch.where(had, out_lo, a), torch.where(has, b, out_hi)
        if out_lo is None:  # no columns at all
            return torch.zeros_like(lo), torch.zeros_like(hi)
        return out_lo, out_hi


def view(mask: Mask, Lq: int, Lk: int, rows: range | Sequence[range], cols: range | Sequence[range]) -> View:
    """Rows ``rows`` and columns ``cols`` (ranges, or lists of ranges) of ``mask`` on an Lq x Lk problem.

    E.g. ``view(causal(), 1024, 1024, range(256, 512), range(0, 256))`` is the causal mask
    of queries 256..511 against keys 0..255, an nq x nk = 256 x 256 mask (FULL everywhere).
    """
    return View(mask, Lq, Lk, rows, cols)


__all__ += ["View", "view"]
