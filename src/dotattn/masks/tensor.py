"""Masks given by a tensor: document ids (``documents``), a block layout (``block_sparse``),
or the mask itself (``dense``, boolean or an additive float bias)."""

from __future__ import annotations

import torch

from dotattn.masks.base import (
    _NEG_INF, PARTIAL, Mask, _cdiv, _codes, _is_integer, _placeholder, _positions, _summary, _tile_bounds,
)


def _tiles_of(x: torch.Tensor, block_q: int, block_k: int, fill: object) -> torch.Tensor:
    """x (..., R, C) as its block_q x block_k tiles, (..., nq, block_q, nk, block_k), the ragged
    last tiles padded with ``fill`` (a value that changes no tile's reduction)."""
    *lead, R, C = x.shape
    nq, nk = _cdiv(R, block_q), _cdiv(C, block_k)
    if (R % block_q, C % block_k) != (0, 0):
        padded = x.new_full((*lead, nq * block_q, nk * block_k), fill)
        padded[..., :R, :C] = x
        x = padded
    return x.reshape(*lead, nq, block_q, nk, block_k)


def _any_per_tile(x: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Whether each block_q x block_k tile of a bool tensor (..., R, C) holds a True: (..., ceil(R/bq), ceil(C/bk))."""
    return _tiles_of(x, block_q, block_k, False).any(dim=-1).any(dim=-2)


def _block_map_of_dense(allowed: torch.Tensor, Lq: int, Lk: int, block_q: int, block_k: int) -> torch.Tensor:
    """Block map of a dense bool tensor (..., Lq or 1, Lk or 1): int8 (..., nQ, nK).

    A size-1 (broadcast) dim is constant along its axis: it reduces to a single
    tile, which is then expanded to all nQ (or nK) tiles.
    """
    any_ = _any_per_tile(allowed, block_q, block_k)
    full = ~_any_per_tile(~allowed, block_q, block_k)
    return _codes(full, any_, (*allowed.shape[:-2], _cdiv(Lq, block_q), _cdiv(Lk, block_k)))


def _interval_rows(allowed: torch.Tensor, Lk: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A bool tensor (..., R, C), C in (Lk, 1), as int64 spans lo, hi (..., R) when each row's
    True entries are one run (lo = hi = 0 for a row with none); None otherwise. One pass in the
    compiled kernel on CPU (csrc/spans.cpp), three reductions in torch ops elsewhere."""
    # leading dims broadcast by strides (an expanded batch) are reduced once
    shared = [d for d in range(allowed.dim() - 2) if allowed.stride(d) == 0 and allowed.shape[d] > 1]
    if shared:
        spans = _interval_rows(allowed[tuple(slice(0, 1) if d in shared else slice(None)
                                             for d in range(allowed.dim()))], Lk)
        return None if spans is None else tuple(x.expand(*allowed.shape[:-1]) for x in spans)
    if allowed.shape[-1] == 1:  # one key column broadcast over every key: all or nothing
        hi = allowed[..., 0].long() * Lk
        return torch.zeros_like(hi), hi
    if allowed.is_cpu:
        from dotattn.engines._tiled_kernel import ext  # the kernel's loader imports the masks

        if ext is not None:
            return ext.interval_rows(allowed)
    u = allowed.view(torch.uint8)
    count = u.sum(-1, dtype=torch.int16 if Lk < 2**15 else torch.int32)
    first = u.argmax(-1)  # the first True (0 for a row without one)
    last = Lk - 1 - u.flip(-1).argmax(-1)
    if not bool(((count == 0) | (last - first + 1 == count)).all()):
        return None
    lo = torch.where(count > 0, first, 0)
    return lo, lo + count


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

    def spec(self, tensors: list[torch.Tensor]) -> str:
        kv = "None" if self.kv_defaulted else _placeholder(self.kv_doc_ids, tensors)
        return f"masks.documents({_placeholder(self.q_doc_ids, tensors)}, {kv})"

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

    def spec(self, tensors: list[torch.Tensor]) -> str:
        return f"masks.block_sparse({_placeholder(self.layout, tensors)}, {self.block_size})"

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


def check_mask_tensor(
    tensor: object, name: str, *, where: str = "", device: torch.device | None = None,
    shape: tuple[int, ...] | None = None, shape_legend: str = "", optional: bool = False,
) -> torch.Tensor:
    """``tensor`` once checked as a mask given as a tensor: bool (True = may attend) or float
    (added to the scores, -inf = masked), on ``device`` and broadcastable to ``shape`` without
    growing it, when given. Errors name it as ``where + name`` and say how to fix it."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{where}{name} must be a torch.Tensor{' or None' if optional else ''}, "
                        f"got {type(tensor).__name__}")
    if tensor.dtype != torch.bool and not tensor.is_floating_point():
        raise TypeError(
            f"{where}{name} has dtype {tensor.dtype}; use a bool tensor (True = may attend, e.g. tensor != 0) "
            "or a floating bias added to the scores (-inf = masked, e.g. tensor.float())"
        )
    if device is not None and tensor.device != device:
        raise ValueError(
            f"{where}{name} is on {tensor.device} but query is on {device}; move it with {name}.to({str(device)!r})"
        )
    if shape is not None and not (
        tensor.dim() <= len(shape) and all(s in (1, t) for s, t in zip(reversed(tensor.shape), reversed(shape)))
    ):
        raise ValueError(
            f"{where}{name} has shape {tuple(tensor.shape)}, which does not broadcast to the scores' shape "
            f"{tuple(shape)}{shape_legend}"
        )
    return tensor


class Dense(Mask):
    """A given tensor (..., Lq or 1, Lk or 1): bool (True = may attend) or float (additive bias)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        check_mask_tensor(tensor, "tensor", where="dense: ")
        if tensor.dim() < 2:
            raise ValueError(
                f"dense: tensor has shape {tuple(tensor.shape)}; it needs at least 2 dims (..., Lq, Lk) "
                "(add a query dim with tensor[None, :])"
            )
        self.tensor = tensor
        self.is_additive = tensor.is_floating_point()

    def __repr__(self) -> str:
        return f"dense({_summary(self.tensor)})"

    def spec(self, tensors: list[torch.Tensor]) -> str:
        return f"masks.dense({_placeholder(self.tensor, tensors)})"

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

    def _row_spans(self, Lq, Lk, device):
        # A boolean tensor whose every row allows one run of keys (a causal or windowed mask
        # built as a tensor, a static cache's mask: transformers' sdpa_mask) is row spans, so the
        # kernels mask its tiles by comparisons and never read it again, and split_k takes it.
        # One pass over the tensor, which stops at the first row that is not a run; the spans
        # are cached while the tensor is unchanged (its version counter).
        if self.is_additive:
            return None
        try:
            key = (Lq, Lk, str(device), self.tensor._version)
        except RuntimeError:  # an inference-mode tensor has no version counter: nothing is cached
            key = None
        cached = self.__dict__.get("_spans")
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        spans = _interval_rows(self.tensor.detach().to(device), Lk)
        if key is not None:
            self._spans = (key, spans)
        return spans

    def _block_map(self, Lq, Lk, block_q, block_k, device):
        t = self.tensor.detach().to(device)
        if not self.is_additive:
            return _block_map_of_dense(t, Lq, Lk, block_q, block_k)
        # A bias must still be added on a tile where every key is visible, so a tile is PARTIAL
        # unless all of it is -inf: one max per tile, one pass over the tensor.
        top = _tiles_of(t, block_q, block_k, _NEG_INF).amax(dim=(-3, -1))
        seen = top != _NEG_INF  # NaN counts as seen: it must reach the rows that see it
        return _codes(torch.zeros_like(seen), seen, (*t.shape[:-2], _cdiv(Lq, block_q), _cdiv(Lk, block_k)))


def documents(q_doc_ids: torch.Tensor, kv_doc_ids: torch.Tensor | None = None) -> Documents:
    """Packed sequences. q_doc_ids: (Lq,) or (B, Lq) ints; kv_doc_ids: (Lk,) or (B, Lk), default q_doc_ids.

    Query i may attend key j iff q_doc_ids[i] == kv_doc_ids[j]; a negative id marks
    padding and matches nothing. lead_shape () for 1-D ids, (B, 1) otherwise.
    """
    return Documents(q_doc_ids, kv_doc_ids)


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
