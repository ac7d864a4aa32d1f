"""Masks decided by positions alone: causal, sliding window, padding and prefix LM.

Each compares index vectors, so it never builds more than the tile asked for, and
classifies tiles from their corners. ``padding`` and a per-row ``prefix_lm`` also hold
a small (B,) length tensor.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch

from dotattn.masks.base import Mask, _codes, _is_integer, _placeholder, _positions, _summary, _tile_bounds


_ALIGNS = ("top_left", "bottom_right")
_SIDES = ("right", "left")


def _check_align(align: object, where: str) -> str:
    if align not in _ALIGNS:
        raise ValueError(f'{where}: align must be "top_left" or "bottom_right", got {align!r}')
    return align  # type: ignore[return-value]


def _align_offset(align: str, Lq: int, Lk: int) -> int:
    """Column of the key that query 0 lines up with: 0 for top_left, Lk - Lq for bottom_right."""
    return 0 if align == "top_left" else Lk - Lq


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
    if torch.compiler.is_compiling():  # reading the values would break the graph: check() skips them
        return value, None
    low, high = (int(x) for x in torch.aminmax(value))
    if low < 0:
        raise ValueError(f"{where}: {name} holds {low}; lengths must be non-negative")
    return value, high


def _check_at_most(longest: int | None, limit: int, mask: Mask, name: str, dim: str) -> None:
    """``longest`` is None for lengths given while tracing: the operator's run checks them."""
    if longest is not None and longest > limit:
        raise ValueError(
            f"{mask!r}: {name} holds {longest} but {dim} is {limit}; "
            f"a length counts a row's real positions, so it must be at most {dim}"
        )


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


class Causal(_Positional):
    """Query i may attend key j iff j <= i + off; off = 0 (top_left) or Lk - Lq (bottom_right)."""

    def __init__(self, align: str = "top_left") -> None:
        self.align = _check_align(align, "causal")

    def __repr__(self) -> str:
        return f"causal({self.align})"

    def spec(self, tensors: list[torch.Tensor]) -> str:
        return f"masks.causal({self.align!r})"

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

    def spec(self, tensors: list[torch.Tensor]) -> str:
        return f"masks.sliding_window({self.before}, {self.after}, align={self.align!r})"

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

    def spec(self, tensors: list[torch.Tensor]) -> str:
        q = "None" if self.q_lengths is None else _placeholder(self.q_lengths, tensors)
        return f"masks.padding({_placeholder(self.kv_lengths, tensors)}, {q}, side={self.side!r})"

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return (self.kv_lengths.shape[0], 1)  # not len(): Tensor.__len__ is Python

    @property
    def _device(self) -> torch.device | None:
        return self.kv_lengths.device

    def check(self, Lq: int, Lk: int) -> None:
        super().check(Lq, Lk)
        if self._kv_longest is None or self._kv_longest > Lk or self._q_longest is None or self._q_longest > Lq:
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
        kv = self.kv_lengths.to(device, torch.long).view(-1, 1, 1)  # int64 whatever the lengths' int dtype
        lo, hi = (kv.new_zeros(()), kv) if self.side == "right" else (torch.rsub(kv, Lk), kv.new_full((), Lk))
        if self.q_lengths is not None:
            i, q = torch.arange(Lq, device=device), self.q_lengths.to(device, torch.long).view(-1, 1, 1)
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

    def spec(self, tensors: list[torch.Tensor]) -> str:
        p = self.prefix_lengths
        return f"masks.prefix_lm({p if isinstance(p, int) else _placeholder(p, tensors)})"

    @property
    def value_key(self) -> tuple | None:
        return ("prefix_lm", self.prefix_lengths) if isinstance(self.prefix_lengths, int) else None

    @property
    def lead_shape(self) -> tuple[int, ...]:
        p = self.prefix_lengths
        return () if isinstance(p, int) else (p.shape[0], 1)

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


def prefix_lm(prefix_lengths: int | torch.Tensor | Sequence[int]) -> PrefixLM:
    """Prefix LM: key j allowed iff j < prefix (bidirectional) or j <= i (causal, top-left).

    prefix_lengths: an int shared by all rows, or (B,) ints (lead_shape (B, 1)).
    """
    return PrefixLM(prefix_lengths)
