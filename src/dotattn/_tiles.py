"""The mask as tiles: block codes, row spans and tile lists, derived once per mask and size.

Engines that skip work tile by tile ask here how the mask meets their tiles:

    ``block_codes``   EMPTY / FULL / PARTIAL per (bq x bk) tile, int8 (Nm, Hm, nQ, nK)
    ``row_spans``     lo, hi int32 (Nm, Hm, Lq): query i may attend keys lo <= j < hi
    ``tile_lists``    per query tile, its FULL tiles then its PARTIAL tiles (EMPTY ones are
                      not listed), or per key tile when transposed, for GPU kernels
    ``span_tile_lists`` the same lists from row spans, in graph operations on the spans'
                      device: what a compiled call derives, since it reads no tensor data

A mask made of plain numbers (``Mask.value_key``: causal, windows, prefix-LM with an int,
and their combinations) answers the same for every call of a size, so its answers are kept
in one bounded cache shared by every engine (``derived``); a mask that holds tensors
(padding lengths, document ids, a dense tensor) is derived once per call, kept on the
problem for its backward.

Shape legend: Nm in {1, N} (the mask varies over the batch or not), Hm in {1, Hq},
nQ/nK tile counts.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable
from typing import Any

import torch

from dotattn import masks
from dotattn._inputs import Problem
from dotattn._layout import heads_canonical, spans_canonical

# The answers for the most recently used number-only masks; callers only read them.
_CACHE: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
KEPT = 256


def cached(key: tuple | None, make: Callable[[], Any]) -> Any:
    """make(), kept under ``key`` (None: not kept) among the KEPT most recently used."""
    if key is None:
        return make()
    found = _CACHE.get(key)
    if found is None:  # a thread racing on the same key derives the same thing
        found = _CACHE[key] = make()
        while len(_CACHE) > KEPT:
            with contextlib.suppress(KeyError):  # another thread may have just evicted it
                _CACHE.popitem(last=False)
    else:
        with contextlib.suppress(KeyError):
            _CACHE.move_to_end(key)
    return found


def derived(problem: Problem, what: tuple, make: Callable[[], Any], mask: masks.Mask | None = None) -> Any:
    """make(): ``what`` about ``mask`` (default: the problem's) for this problem. A number-only
    mask's answer is kept in the shared cache by its value and the size (such masks have no
    lead dims, so the size is (Lq, Lk)); a tensor mask's on the problem (``Problem.derived``),
    so forward and backward derive it once; a tensor mask that is only part of the problem's
    is derived anew."""
    mask = problem.mask if mask is None else mask
    value = ("none",) if mask is None else mask.value_key
    if value is not None:
        return cached((value, problem.Lq, problem.Lk, *what), make)
    if mask is not problem.mask:
        return make()
    found = problem.derived.get(what)
    if found is None:
        found = problem.derived[what] = make()
    return found


def block_codes(problem: Problem, block_q: int, block_k: int) -> torch.Tensor:
    """The tile codes of ``problem``'s mask (all FULL without one): int8 (Nm, Hm, nQ, nK) on the CPU."""
    p = problem

    def make() -> torch.Tensor:
        if p.mask is None:
            return torch.full((1, 1, -(-p.Lq // block_q), -(-p.Lk // block_k)), masks.FULL, dtype=torch.int8)
        return heads_canonical(p.mask.block_map(p.Lq, p.Lk, block_q, block_k), p.batch_shape, p.Hq)

    return derived(p, ("codes", block_q, block_k), make)


def spans_and_rest(problem: Problem) -> tuple[masks.Mask | None, list[masks.Mask]]:
    """The problem's mask (which must not be None) split into the AND of its leaves that are one
    span of keys per row (None when there is none) and the leaves that are not (float biases,
    dense, block-sparse, unsorted documents), ANDed together: how a kernel masks a tile with
    two comparisons per row and reads the rest as it lies."""
    p = problem
    leaves = list(p.mask.children) if isinstance(p.mask, masks.And) else [p.mask]
    spanned, rest = [], []
    for leaf in leaves:
        (rest if leaf.is_additive or leaf.row_spans(p.Lq, p.Lk) is None else spanned).append(leaf)
    return (None if not spanned else spanned[0] if len(spanned) == 1 else masks.And(*spanned)), rest


def row_spans(problem: Problem, mask: masks.Mask | None = None,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The row spans of ``mask`` (default: the problem's whole mask) as contiguous int32
    (Nm, Hm, Lq) lo, hi on ``device`` (default: the CPU); None when some row's keys are not
    one interval, or for a float mask."""
    p = problem
    mask = p.mask if mask is None else mask
    device = torch.device("cpu") if device is None else device

    def make() -> tuple[torch.Tensor, torch.Tensor] | None:
        spans = p.row_spans if mask is p.mask else mask.row_spans(p.Lq, p.Lk)
        if spans is None:
            return None
        return tuple(x.to(device=device, dtype=torch.int32).contiguous()
                     for x in spans_canonical(spans, p.batch_shape, p.Hq, p.Lq))

    if mask is None or mask.is_additive:
        return None
    return derived(p, ("spans", str(device)), make, mask)


def tile_lists(problem: Problem, block_m: int, block_n: int, transposed: bool) -> tuple[torch.Tensor, ...]:
    """The block codes as tile lists on the problem's device: full_count, full_idx, part_count,
    part_idx. Counts int32 (Nm, Hm, nQ), indices int32 (Nm, Hm, nQ, nK) whose first count
    entries are the tiles of that kind, in order; transposed, query tiles per key tile (nK, nQ)."""
    p = problem

    def make() -> tuple[torch.Tensor, ...]:
        codes = block_codes(p, block_m, block_n).to(p.device)
        return _lists(codes.transpose(-1, -2) if transposed else codes)

    return derived(p, ("lists", block_m, block_n, transposed, str(p.device)), make)


def span_tile_lists(lo: torch.Tensor | None, hi: torch.Tensor | None, Lq: int, Lk: int, block_m: int,
                    block_n: int, transposed: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``tile_lists`` of the mask whose rows see keys lo <= j < hi (int32 (Nm, Hm, Lq); None:
    every key), derived in graph operations on ``device`` from the spans alone, so that a traced
    call reads no tensor data and spans given as tensors (padding lengths) need no host round
    trip. The codes are exact: a tile is EMPTY when no row of it sees a key of it, FULL when
    every row sees all of its keys. O(Nm·Hm·Lq·nK) work, laid out in the lists' order from
    the start (no transposed copy)."""
    nQ, nK = -(-Lq // block_m), -(-Lk // block_n)
    if lo is None:
        return _lists(torch.full((1, 1, *((nK, nQ) if transposed else (nQ, nK))), masks.FULL, dtype=torch.int8,
                                 device=device))
    k0 = torch.arange(nK, device=device, dtype=lo.dtype) * block_n
    k1 = torch.clamp(k0 + block_n, max=Lk)
    # (Nm, Hm, 1, Lq) against (nK, 1) transposed, else (Nm, Hm, Lq, 1) against (nK,)
    lead = lo.shape[:-1]
    lo, hi = (x.unsqueeze(-2 if transposed else -1) for x in (lo, hi))
    if transposed:
        k0, k1 = k0.unsqueeze(-1), k1.unsqueeze(-1)
    sees = torch.maximum(lo, k0) < torch.minimum(hi, k1)  # some key of the tile
    short = (lo > k0) | (hi < k1)  # not every key of the tile
    pad = (0, nQ * block_m - Lq) if transposed else (0, 0, 0, nQ * block_m - Lq)
    # rows past Lq see nothing and do not keep a tile from being FULL
    sees = torch.nn.functional.pad(sees, pad, value=False)
    short = torch.nn.functional.pad(short, pad, value=False)
    shape, dim = ((*lead, nK, nQ, block_m), -1) if transposed else ((*lead, nQ, block_m, nK), -2)
    any_sees, any_short = sees.view(shape).any(dim), short.view(shape).any(dim)
    return _lists(torch.where(any_short, torch.where(any_sees, masks.PARTIAL, masks.EMPTY), masks.FULL))


def _lists(codes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tile codes (Nm, Hm, n, m) as full_count, full_idx, part_count, part_idx (``tile_lists``)."""
    out = []
    for kind in (masks.FULL, masks.PARTIAL):
        others = (codes != kind).to(torch.int8)
        # a stable sort puts the chosen tiles first, in order
        idx = torch.argsort(others, dim=-1, stable=True).to(torch.int32)
        count = codes.shape[-1] - others.sum(-1, dtype=torch.int32)
        out += [count.contiguous(), idx.contiguous()]
    return tuple(out)
