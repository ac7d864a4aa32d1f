"""Views: some rows and columns of a larger problem's mask, as a mask of their own
(``view``), for context-parallel attention's blocks of queries and keys."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch

from dotattn.masks.base import _NEG_INF, EMPTY, FULL, PARTIAL, Mask, _codes, _tile_bounds
from dotattn.masks.combinators import And, Or
from dotattn.masks.positional import _Positional
from dotattn.masks.tensor import Dense, Documents


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
