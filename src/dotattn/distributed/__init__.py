"""Context parallelism over torch.distributed: attention over a sequence sharded across processes.

    from dotattn.distributed import ring_attention, shard_sequence, gather_sequence
    q, k, v = (shard_sequence(x, layout="zigzag") for x in (q, k, v))   # (B, H, L/W, E) each
    out = ring_attention(q, k, v, is_causal=True, layout="zigzag")        # this rank's shard
    whole = gather_sequence(out, layout="zigzag")                           # (B, H, L, E)
"""

from __future__ import annotations

from dotattn.distributed.ring import ring_attention
from dotattn.distributed.shard import LAYOUTS, gather_sequence, shard_ranges, shard_sequence

__all__ = ["LAYOUTS", "gather_sequence", "ring_attention", "shard_ranges", "shard_sequence"]
