"""A preallocated key/value cache for one attention layer, for step-by-step decoding.

Shape legend: B batch, Hkv key/value heads, C capacity, T new positions in one step,
E head dim, Ev value dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dotattn import masks


class KVCache:
    """Keys and values of one layer, in buffers allocated once: k (B, Hkv, C, E), v (B, Hkv, C, Ev).

    Rows are left-padded, the way batched generation pads prompts of different lengths:
    every step writes T positions at the same offset ``filled`` in every row, and row b's
    real tokens are the last ``lengths[b]`` of the filled part. So a step's queries see
    keys through ``masks.padding(lengths, side="left") & masks.causal(align="bottom_right")``:
    the decoding alignment, where the last query is the newest position. While no row has
    been padded the padding term allows everything and is left out: the mask is then
    ``masks.causal(align="bottom_right")`` alone, which costs a step less to evaluate.

        cache = KVCache(B, Hkv, capacity=1024, head_dim=64)
        keys, values, mask = cache.append(k_prompt, v_prompt, lengths=prompt_lengths)  # prefill
        keys, values, mask = cache.append(k_step, v_step)                            # each new token
    """

    def __init__(
        self, batch_size: int, num_kv_heads: int, capacity: int, head_dim: int, value_dim: int | None = None,
        *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
    ) -> None:
        for name, n in [("batch_size", batch_size), ("num_kv_heads", num_kv_heads), ("capacity", capacity),
                        ("head_dim", head_dim), ("value_dim", head_dim if value_dim is None else value_dim)]:
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {n!r}")
        Ev = head_dim if value_dim is None else value_dim
        self.k = torch.zeros(batch_size, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, num_kv_heads, capacity, Ev, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens per row
        self.filled = 0  # positions written, the same in every row
        self.padded = False  # whether some row holds padding (then lengths differ from filled)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reset(self) -> None:
        """Forget every token (the buffers stay allocated)."""
        self.lengths.zero_()
        self.filled = 0
        self.padded = False

    def positions(self, T: int, lengths: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """(B, T) positions of the next T slots, counted from each row's first real token
        (what rotary embeddings need); ``lengths`` as in :meth:`append`. Left padding gets
        negative positions, which no query sees."""
        start = self.filled + T - (self.lengths + self._new_lengths(T, lengths))  # (B,) first real token
        return torch.arange(self.filled, self.filled + T, device=self.lengths.device) - start[:, None]

    def _new_lengths(self, T: int, lengths: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
        B = self.k.shape[0]
        if lengths is None:
            return torch.full((B,), T, dtype=torch.long, device=self.lengths.device)
        new = torch.as_tensor(lengths, dtype=torch.long, device=self.lengths.device)
        if new.shape != (B,):
            raise ValueError(f"KVCache: lengths must be {B} ints in [0, {T}], got shape {tuple(new.shape)}")
        if torch.compiler.is_compiling():  # reading the values would break the graph: unchecked
            return new
        if bool(((new < 0) | (new > T)).any()):
            raise ValueError(f"KVCache: lengths must be {B} ints in [0, {T}], got {new.tolist()}")
        if bool(((new < T) & (self.lengths > 0)).any()):
            raise ValueError(
                f"KVCache: lengths {new.tolist()} pad rows that already hold tokens ({self.lengths.tolist()}); "
                "only a row's first step may be left-padded, so its real tokens stay contiguous")
        return new

    def append(
        self, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, masks.Mask]:
        """Write one step and return what its queries attend: keys (B, Hkv, filled, E),
        values (B, Hkv, filled, Ev) (views of the buffers) and the mask for queries (B, H, T, E).

        key: (B, Hkv, T, E)   value: (B, Hkv, T, Ev)
        lengths: (B,) how many of the T positions are real tokens in each row (the rest
        is left padding, whose queries see nothing); default all T. Only a row's first
        step may be padded.
        """
        B, Hkv, T = key.shape[:3]
        if key.shape[:2] != self.k.shape[:2] or key.shape[3] != self.k.shape[3] or value.shape[:3] != (B, Hkv, T) \
                or value.shape[3] != self.v.shape[3]:
            raise ValueError(
                f"KVCache.append: key {tuple(key.shape)} and value {tuple(value.shape)} do not fit the cache's "
                f"(B, Hkv, T, E) = ({self.k.shape[0]}, {self.k.shape[1]}, T, {self.k.shape[3]}) and "
                f"Ev = {self.v.shape[3]}")
        if self.filled + T > self.capacity:
            raise ValueError(f"KVCache.append: {T} more positions overflow the capacity {self.capacity} "
                             f"({self.filled} filled); build the cache with a larger capacity or reset() it")
        new = T if lengths is None else self._new_lengths(T, lengths)  # real tokens per row in this step
        # Under torch.compile, given lengths count as padding (reading them would break the graph):
        # the padding term then allows what it does not hide.
        self.padded = self.padded or (lengths is not None and (torch.compiler.is_compiling() or bool((new < T).any())))
        self.k[:, :, self.filled:self.filled + T] = key
        self.v[:, :, self.filled:self.filled + T] = value
        self.filled += T
        self.lengths += new
        mask = masks.causal(align="bottom_right")
        if self.padded:  # query lengths only where this step pads some queries
            mask = masks.padding(self.lengths.clone(), None if lengths is None else new, side="left") & mask
        return self.k[:, :, :self.filled], self.v[:, :, :self.filled], mask
