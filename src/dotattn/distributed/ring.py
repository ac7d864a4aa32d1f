"""Ring attention: context parallelism over torch.distributed.

Each of W processes holds a shard of the sequence: its queries, keys and values at
L/W positions (``shard.py`` says which). Attention needs every query against every
key, so the K/V shards travel round the ring: at step t, rank r holds the K/V of rank
(r - t) mod W, sends it on to rank r+1 and receives the next one from rank r-1. The
transfer for step t+1 is started before step t's computation, so the two overlap.

    step t:  start send K/V(t) -> r+1, recv K/V(t+1) <- r-1
             attend my queries to K/V(t)         (an engine's forward, on a mask view)
             merge the partial output through its lse
             wait for K/V(t+1)

Every block runs one engine's ``forward`` and ``backward`` (the engine contract,
``dotattn.engines.base``): the one the registry picks for the whole problem, among the
engines that keep O(L) memory (the tiled engine on CPU tensors, triton on CUDA tensors;
gloo or NCCL carry them alike), or the one the caller names. Each block is a problem on
``masks.view`` of the whole problem's mask, so causal, window, document, padding and prefix masks are evaluated at global
positions, and a shard pair whose block map is EMPTY is never computed (with the
zigzag layout, its chunk pairs are: an EMPTY pair of chunks is left out of the block).
Partial outputs merge through their log-sum-exp in float32 (float64 for float64):

    lse = log(exp(lse_a) + exp(lse_b)),  out = out_a·exp(lse_a - lse) + out_b·exp(lse_b - lse)

Backward (one autograd node, as in FlashAttention-2) recomputes each block's P from the
merged lse and delta = rowsum(dO·O), which the contract's ``backward`` does when handed
the merged output and lse. dQ stays home; K/V go round the ring again, each
followed by the dK/dV partial that the ranks it visited have added to, which finally
arrives back at its owner.

Shape legend: B.. leading dims, Hq/Hkv heads, Sq = Lq/W and Sk = Lk/W shard lengths,
E head dim, Ev value dim, C a zigzag chunk's length (S/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dotattn import engines, masks
from dotattn._inputs import Problem, compute_dtype, prepare
from dotattn._softmax import merge_into
from dotattn.distributed.shard import check_layout, rank_and_world, same_on_every_rank, shard_ranges

_NEG_INF = float("-inf")
# Tags keep apart the messages between the same two ranks: K/V, and backward's dK/dV,
# one tag per tensor (base + index).
_TAG_KV, _TAG_DKV = 10, 20


# ---------------------------------------------------------------------------
# The ring
# ---------------------------------------------------------------------------


class _Transfer:
    """Tensors sent to the next rank while the previous rank's arrive (same shapes and dtypes).

    Each tensor goes as it is (made contiguous, which a shard of the contiguous layout
    may not be), so starting a transfer copies nothing that is already contiguous."""

    def __init__(self, ring: _Ring, tensors: tuple[torch.Tensor, ...], tag: int) -> None:
        self.sent = [t.contiguous() for t in tensors]
        if ring.world == 1:  # the ring is this process: what leaves arrives
            self.received, self.works = self.sent, []
            return
        self.received = [torch.empty_like(t) for t in self.sent]
        ops = [dist.P2POp(dist.isend, t, group=ring.group, tag=tag + i, group_peer=ring.next)
               for i, t in enumerate(self.sent)]
        ops += [dist.P2POp(dist.irecv, t, group=ring.group, tag=tag + i, group_peer=ring.prev)
                for i, t in enumerate(self.received)]
        self.works = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        for work in self.works:
            work.wait()
        return self.received


@dataclass
class _Block:
    """What one rank computes against one source rank's K/V: the chunks of each side that
    meet a non-EMPTY part of the mask, and the mask view of exactly those rows and columns."""

    q_chunks: list[int]
    k_chunks: list[int]
    mask: masks.Mask | None


def _take(x: torch.Tensor, chunks: list[int], n_chunks: int) -> torch.Tensor:
    """The given chunks (of n_chunks equal ones) of x along dim -2, concatenated."""
    if len(chunks) == n_chunks:
        return x
    C = x.shape[-2] // n_chunks
    parts = [x.narrow(-2, c * C, C) for c in chunks]
    return parts[0] if len(parts) == 1 else torch.cat(parts, -2)


def _chunk_slices(chunks: list[int], n_chunks: int, S: int) -> list[tuple[int, slice]]:
    """For each chunk: its offset in a _take of them, and its local rows."""
    C = S // n_chunks
    return [(i * C, slice(c * C, (c + 1) * C)) for i, c in enumerate(chunks)]


@dataclass
class _Ring:
    """One ring_attention call: the process group and everything the steps need."""

    group: dist.ProcessGroup | None
    rank: int
    world: int
    layout: str
    Lq: int
    Lk: int
    mask: masks.Mask | None  # the whole Lq x Lk problem's mask
    scale: float
    enable_gqa: bool
    batch_shape: tuple[int, ...]  # q, k and v's leading dims, broadcast
    engine: engines.Engine  # what computes each block
    needs_grad: bool  # whether the call's gradients are wanted (its blocks run as such)
    blocks: dict[int, _Block | None] = field(default_factory=dict, repr=False)  # by source rank, for backward

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.world

    @property
    def n_chunks(self) -> int:
        return 1 if self.layout == "contiguous" else 2

    def block(self, src: int) -> _Block | None:
        """My queries against rank ``src``'s keys; None when the mask leaves every pair EMPTY."""
        if src not in self.blocks:
            self.blocks[src] = self._block(src)
        return self.blocks[src]

    def _block(self, src: int) -> _Block | None:
        q_runs = shard_ranges(self.Lq, rank=self.rank, world=self.world, layout=self.layout)
        k_runs = shard_ranges(self.Lk, rank=src, world=self.world, layout=self.layout)
        n = self.n_chunks
        Cq, Ck = len(q_runs[0]), len(k_runs[0])
        if not Cq or not Ck:  # no queries, or no keys: outputs stay 0
            return None
        if self.mask is None:
            return _Block(list(range(n)), list(range(n)), None)
        whole = masks.view(self.mask, self.Lq, self.Lk, q_runs, k_runs)
        codes = whole.block_map(Cq * n, Ck * n, Cq, Ck)  # one tile per chunk pair
        live = (codes != masks.EMPTY).reshape(-1, n, n).any(0)  # (n, n), over every batch row and head
        q_chunks = [i for i in range(n) if bool(live[i].any())]
        k_chunks = [j for j in range(n) if bool(live[:, j].any())]
        if not q_chunks:
            return None
        if len(q_chunks) == len(k_chunks) == n:
            return _Block(q_chunks, k_chunks, whole)
        view = masks.view(self.mask, self.Lq, self.Lk, [q_runs[i] for i in q_chunks], [k_runs[j] for j in k_chunks])
        return _Block(q_chunks, k_chunks, view)

    def problem(self, block: _Block, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Problem:
        n = self.n_chunks
        problem = prepare(
            _take(q, block.q_chunks, n), _take(k, block.k_chunks, n), _take(v, block.k_chunks, n),
            scale=self.scale, enable_gqa=self.enable_gqa, mask=block.mask,
        )
        # Decided by the whole call, not by this step's tensors (a K/V that arrived needs no grad,
        # and autograd is off inside the ring's node): an engine that runs a problem that needs
        # gradients one way (split_k hands it to its fallback) then runs forward and backward alike.
        return problem.settle(requires_grad=self.needs_grad)

    def run_forward(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
        """A block's output (*batch, Hq, nq, Ev) and lse (*batch, Hq, nq), in the compute dtype."""
        p = problem
        out, lse = self.engine.forward(p)
        compute = compute_dtype(p.dtype)
        return (out.reshape(*p.batch_shape, p.Hq, p.Lq, p.Ev).to(compute),
                lse.reshape(*p.batch_shape, p.Hq, p.Lq).to(compute))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """out (*batch, Hq, Sq, Ev) and lse (*batch, Hq, Sq), in the compute dtype."""
        compute = compute_dtype(q.dtype)
        Sq = q.shape[-2]
        out = q.new_zeros(*self.batch_shape, q.shape[-3], Sq, v.shape[-1], dtype=compute)
        lse = q.new_full((*self.batch_shape, q.shape[-3], Sq), _NEG_INF, dtype=compute)
        kv = (k, v)
        merged: set[int] = set()  # the query chunks some block has reached
        for step in range(self.world):
            pending = _Transfer(self, kv, _TAG_KV) if step + 1 < self.world else None
            block = self.block((self.rank - step) % self.world)
            if block is not None:
                out_b, lse_b = self.run_forward(self.problem(block, q, *kv))
                for chunk, (offset, rows) in zip(block.q_chunks, _chunk_slices(block.q_chunks, self.n_chunks, Sq)):
                    part = slice(offset, offset + rows.stop - rows.start)
                    if chunk in merged:
                        merge_into(out[..., rows, :], lse[..., rows], out_b[..., part, :], lse_b[..., part])
                    else:  # the first block these rows see: nothing to merge with
                        out[..., rows, :] = out_b[..., part, :]
                        lse[..., rows] = lse_b[..., part]
                        merged.add(chunk)
            if pending is not None:
                kv = tuple(pending.wait())
        return out, lse

    def backward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        d_out: torch.Tensor, biases: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, ...]:
        """dq, dk, dv in the compute dtype and the shapes of q, k, v; then, for each tensor of
        ``biases`` (the whole mask's float leaves whose gradient is wanted, else empty), its
        gradient from MY query rows: the sum over ranks is the single-process gradient."""
        compute = compute_dtype(q.dtype)
        Sq, Sk = q.shape[-2], k.shape[-2]
        dq = q.new_zeros(q.shape, dtype=compute)
        d_biases = [torch.zeros(b.shape, dtype=compute, device=b.device) for b in biases]
        kv = (k, v)
        d_kv: _Transfer | None = None  # the partials of the K/V now held, on their way here
        # Every buffer is dropped as soon as it is done with, since each of them is a shard:
        # a rank holds its K/V and the next (2 + 2), their dK/dV partials (2 + 2), a block's
        # gradients and dq (benchmarks/ring.py --memory).
        for step in range(self.world):
            pending = _Transfer(self, kv, _TAG_KV) if step + 1 < self.world else None
            block = self.block((self.rank - step) % self.world)
            block_dkv = None
            if block is not None:
                problem = self.problem(block, q, *kv)
                n = self.n_chunks
                N, rows = math.prod(problem.batch_shape), (problem.Hq, problem.Lq)
                rows_lse = _take(lse.unsqueeze(-1), block.q_chunks, n).squeeze(-1)  # chunks run along dim -2
                block_dq, block_dk, block_dv, block_dbiases = self.engine.backward(
                    problem, _take(out, block.q_chunks, n).reshape(N, *rows, -1), rows_lse.reshape(N, *rows),
                    _take(d_out, block.q_chunks, n).reshape(N, *rows, -1), bias_grads=bool(biases),
                )
                block_dkv = (block_dk, block_dv)
                for offset, rows in _chunk_slices(block.q_chunks, n, Sq):
                    dq[..., rows, :] += block_dq[..., offset : offset + rows.stop - rows.start, :]
                for whole, part in zip(d_biases, block_dbiases):
                    block.mask.add_cut(whole, part)
                del block_dq, block_dk, block_dv, block_dbiases, problem
            if pending is None:  # the last step: the K/V are done with
                kv = None
            # The K/V's partials so far come from the ranks it visited before; add mine and pass them on.
            if d_kv is None:
                dk, dv = k.new_zeros(k.shape, dtype=compute), v.new_zeros(v.shape, dtype=compute)
            else:
                dk, dv = d_kv.wait()  # arrived, and what it sent has left
                d_kv = None
            if block_dkv is not None:
                for offset, cols in _chunk_slices(block.k_chunks, self.n_chunks, Sk):
                    width = cols.stop - cols.start
                    dk[..., cols, :] += block_dkv[0][..., offset : offset + width, :]
                    dv[..., cols, :] += block_dkv[1][..., offset : offset + width, :]
                block_dkv = None
            d_kv = _Transfer(self, (dk, dv), _TAG_DKV)  # after the last step, to their owner
            if pending is not None:
                kv = tuple(pending.wait())
        dk, dv = d_kv.wait()
        return dq, dk, dv, *d_biases


class _RingAttention(torch.autograd.Function):
    """The whole ring as one autograd node: saves q, k, v, the merged output and lse. The
    mask's float leaves are inputs too, so that autograd hands their gradients back."""

    @staticmethod
    def forward(ctx, ring: _Ring, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                *biases: torch.Tensor) -> torch.Tensor:
        out, lse = ring.forward(q, k, v)
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, out, lse, *biases)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        q, k, v, out, lse, *biases = ctx.saved_tensors
        wanted = tuple(biases) if any(ctx.needs_input_grad[4:]) else ()
        dq, dk, dv, *d_biases = ctx.ring.backward(q, k, v, out, lse, d_out, wanted)
        d_biases = [g.to(b.dtype) for g, b in zip(d_biases, biases)] or [None] * len(biases)
        return None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *d_biases


def _whole_problem_meta(query: object, key: object, value: object, world: int) -> tuple:
    """Stand-ins of the whole sequence's q, k, v (every position shares one element, so
    they cost no memory), for validating a call at its global sizes. Anything that is not
    a tensor of at least 2 dims passes through, for prepare() to name."""
    def whole(x: object) -> object:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return x
        shape = list(x.shape)
        shape[-2] *= world
        return x.new_zeros((), requires_grad=x.requires_grad).expand(shape)

    return whole(query), whole(key), whole(value)


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    mask: masks.Mask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    layout: str = "contiguous",
    engine: str = "auto",
) -> torch.Tensor:
    """Attention over a sequence sharded across the ranks of ``group`` (None: the default group).

    query: (B.., Hq, Sq, E)   key: (B.., Hkv, Sk, E)   value: (B.., Hkv, Sk, Ev)
    returns this rank's (B.., Hq, Sq, Ev). Sq = Lq/W and Sk = Lk/W: each rank passes its
    shard (``shard_sequence`` with the same ``layout``), and gets its shard of the output.
    A collective: every rank of the group calls it, with equal shapes.

    Same semantics as ``dotattn.scaled_dot_product_attention`` on the whole sequence:
    scale defaults to 1/sqrt(E); is_causal is top-left aligned on the whole Lq x Lk;
    ``mask`` (causal, sliding_window, padding, documents, prefix_lm, ...) and
    ``attn_mask`` describe the WHOLE problem (document ids of all Lk positions, an
    attn_mask (.., Lq or 1, Lk or 1) identical on every rank) and are evaluated at global
    positions. A row with no allowed key gives output 0 and zero gradients. Gradients flow
    to query, key, value and a float attn_mask (or float ``masks.dense`` leaf). Such a bias
    is the whole problem's, the same on every rank, so each rank's gradient of it holds the
    part that comes from the rank's own query rows (zero at the others): summed over the
    ranks (an all_reduce, which data-parallel training does for a parameter anyway) it is
    the single-process gradient. No dropout.

    layout "contiguous" (rank r holds positions r·L/W onward) or "zigzag" (chunks r and
    2W-1-r of 2W: every rank does the same causal work).

    engine computes each block: a registered engine's name (any engine that implements the
    contract of ``dotattn.engines.base``), or "auto": the registry's choice for the whole
    problem among the engines that keep O(L) memory (triton for CUDA tensors, over NCCL say;
    tiled for CPU tensors, over gloo).
    """
    rank, world = rank_and_world(group)
    # Before any check that could fail on some ranks only: a rank that raised alone would
    # leave the others waiting in the ring.
    shapes = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in (query, key, value))
    mask_shape = tuple(attn_mask.shape) if isinstance(attn_mask, torch.Tensor) else None
    same_on_every_rank(
        group, "ring_attention: the arguments (shapes of query, key, value; layout; is_causal; mask; "
        "attn_mask shape; scale; enable_gqa; engine)",
        (shapes, layout, is_causal, repr(mask), mask_shape, scale, enable_gqa, engine),
    )
    check_layout(layout)
    if engine != "auto" and engine not in {e.name for e in engines.available()}:
        known = ", ".join(repr(e.name) for e in engines.available())
        raise ValueError(f'engine must be "auto" or a registered engine ({known}), got {engine!r}')
    if all(isinstance(x, torch.Tensor) and x.dim() >= 2 for x in (query, key)):
        if layout == "zigzag" and (query.shape[-2] % 2 or key.shape[-2] % 2):
            raise ValueError(
                f"the zigzag layout holds two equal chunks per rank, but the shards are {query.shape[-2]} "
                f"(query) and {key.shape[-2]} (key) long; shard a sequence whose length divides by "
                f"2 x world = {2 * world} (shard_sequence(..., layout='zigzag') checks it)"
            )
    meta = _whole_problem_meta(query, key, value, world)
    try:
        whole = prepare(*meta, attn_mask, 0.0, is_causal, scale, enable_gqa, mask=mask)
    except ValueError as error:
        raise ValueError(
            f"{error} (ring_attention checks its arguments against the whole sequence of {world} shards: "
            "attn_mask and mask describe every position, not this rank's shard)"
        ) from error
    # A ring exists for sequences that outgrow one machine: auto leaves out engines that
    # materialise the scores.
    quadratic = tuple(e.name for e in engines.available() if e.support.quadratic_memory) if engine == "auto" else ()
    chosen = engines.explain_problem(whole, engine, exclude=quadratic)
    if chosen.engine is None:
        raise ValueError("ring_attention computes its blocks with one engine, and none can run this: " + "; ".join(
            f"the {name} engine, which cannot run this: " + "; ".join(reasons) for name, reasons in chosen.rejected.items()))
    biases = [] if whole.mask is None else [leaf.tensor for leaf in whole.mask.biases()]
    ring = _Ring(group, rank, world, layout, whole.Lq, whole.Lk, whole.mask, whole.scale, enable_gqa,
                 whole.batch_shape, engines.get(chosen.engine), whole.requires_grad)
    squeeze = query.dim() == key.dim() == value.dim() == 2  # (S, E) inputs, as prepare allows
    q, k, v = (x.unsqueeze(0) if squeeze else x for x in (query, key, value))
    out = _RingAttention.apply(ring, q, k, v, *biases)
    return out.squeeze(0) if squeeze else out
