"""Which positions of a sequence each process holds, and moving between whole and sharded.

Two layouts of a length-L sequence over W processes (ranks 0..W-1):

    contiguous  rank r holds positions r·L/W .. (r+1)·L/W - 1
    zigzag      the sequence is cut into 2W chunks; rank r holds chunks r and 2W-1-r,
                in that order. Under a causal mask every rank then does the same work
                (an early chunk that sees little, a late one that sees much).

Shape legend: L the whole sequence's length along ``dim``, W the world size.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: object) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f'layout must be "contiguous" or "zigzag", got {layout!r}')
    return layout  # type: ignore[return-value]


def _check_divides(L: int, world: int, layout: str, what: str) -> None:
    parts = world if layout == "contiguous" else 2 * world
    if L % parts:
        fix = -(-L // parts) * parts
        raise ValueError(
            f"{what} has length {L}, which the {layout} layout cannot split over {world} processes: it needs "
            f"a multiple of {parts} ({'the world size' if layout == 'contiguous' else '2 x the world size'}); "
            f"pad the sequence to {fix} and hide the padding with masks.padding"
        )


def shard_ranges(L: int, *, rank: int, world: int, layout: str = "contiguous") -> list[range]:
    """The positions of a length-L sequence that ``rank`` of ``world`` holds, in the order
    its shard stores them: one range (contiguous) or two (zigzag). Useful for anything that
    depends on the global position, such as rotary embeddings."""
    check_layout(layout)
    if not (isinstance(world, int) and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"rank {rank!r} of world {world!r}: need ints with 0 <= rank < world")
    _check_divides(L, world, layout, "the sequence")
    if layout == "contiguous":
        S = L // world
        return [range(rank * S, (rank + 1) * S)]
    C = L // (2 * world)
    return [range(c * C, (c + 1) * C) for c in (rank, 2 * world - 1 - rank)]


def rank_and_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in ``group`` (None: the default group) and the group's size."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "torch.distributed is not initialised; call torch.distributed.init_process_group(...) first "
            "(or pass rank= and world= to shard_sequence)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def same_on_every_rank(group: dist.ProcessGroup | None, what: str, value: object) -> None:
    """Raise the same ValueError on every rank unless ``value`` (a plain value with a stable
    repr) is equal on all of them. One 8-byte all-gather of a checksum of its repr; the
    values themselves travel only to name them in the error."""
    world = dist.get_world_size(group)
    checksum = torch.tensor([zlib.crc32(repr(value).encode())], dtype=torch.int64)
    checksums = [torch.empty_like(checksum) for _ in range(world)]
    dist.all_gather(checksums, checksum, group=group)
    if any(not torch.equal(c, checksum) for c in checksums):
        values: list[object] = [None] * world
        dist.all_gather_object(values, value, group=group)
        listing = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise ValueError(f"{what} differ across ranks ({listing}); every rank must pass the same")


def shard_sequence(
    x: torch.Tensor, *, dim: int = -2, group: dist.ProcessGroup | None = None, rank: int | None = None,
    world: int | None = None, layout: str = "contiguous",
) -> torch.Tensor:
    """This rank's shard of a whole sequence. x: (..., L, ...) with L at ``dim``; returns
    (..., L/W, ...). rank and world default to ``group``'s (None: the default process group);
    give both to shard without torch.distributed. Contiguous shards are views of x, zigzag
    shards copies. ValueError when L does not divide by W (contiguous) or 2W (zigzag)."""
    check_layout(layout)
    if (rank is None) != (world is None):
        raise ValueError(f"give rank and world together (got rank={rank!r}, world={world!r}), or neither")
    if rank is None:
        rank, world = rank_and_world(group)
    L = x.shape[dim]
    _check_divides(L, world, layout, f"x (shape {tuple(x.shape)}, dim {dim})")
    pieces = [x.narrow(dim, r.start, len(r)) for r in shard_ranges(L, rank=rank, world=world, layout=layout)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def gather_sequence(
    x: torch.Tensor, *, dim: int = -2, group: dist.ProcessGroup | None = None, layout: str = "contiguous",
) -> torch.Tensor:
    """The whole sequence from every rank's shard (the inverse of shard_sequence), on every rank.
    x: (..., L/W, ...) -> (..., L, ...). A collective: every rank of ``group`` must call it.
    Not differentiable."""
    check_layout(layout)
    rank, world = rank_and_world(group)
    same_on_every_rank(group, "gather_sequence: shard shapes, dtypes or layouts",
                       (tuple(x.shape), str(x.dtype), layout))
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.contiguous(), group=group)
    S = x.shape[dim]
    L = S * world
    _check_divides(L, world, layout, "the gathered sequence")
    # Put every rank's pieces at their global positions.
    placed: dict[int, torch.Tensor] = {}
    for r, shard in enumerate(shards):
        offset = 0
        for rng in shard_ranges(L, rank=r, world=world, layout=layout):
            placed[rng.start] = shard.narrow(dim, offset, len(rng))
            offset += len(rng)
    return torch.cat([placed[start] for start in sorted(placed)], dim)
