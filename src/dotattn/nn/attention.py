"""MultiHeadAttention: the textbook projections X·Wq, X·Wk, X·Wv, per-head attention through
``dotattn.scaled_dot_product_attention``, and the output projection. Batch-first.

Shape legend: B batch, Lq query length, Lk key length, D embed dim, Dk/Dv key/value
input dims, H query heads, Hkv key/value heads, E head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from dotattn import masks
from dotattn.functional import scaled_dot_product_attention
from dotattn.nn.kv_cache import KVCache
from dotattn.nn.rope import RotaryEmbedding


def _key_padding(key_padding_mask: torch.Tensor, B: int, Lk: int) -> masks.Mask:
    """torch.nn.MultiheadAttention's key_padding_mask (B, Lk), bool True = ignore the key, or
    float (added), as a mask over (B, H, Lq, Lk)."""
    if key_padding_mask.shape != (B, Lk):
        raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected (B, Lk) = ({B}, {Lk})")
    kpm = key_padding_mask[:, None, None, :]
    return masks.dense(~kpm if kpm.dtype == torch.bool else kpm)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with grouped-query heads, optional rotary embeddings and a KV cache.

    embed_dim D: the width of the query input and of the output.
    num_heads H; num_kv_heads Hkv (default H; 1 is multi-query): H must be a multiple.
    head_dim E (default D // H); kdim, vdim: widths of the key and value inputs (default D).
    rope: a :class:`RotaryEmbedding` applied to queries and keys at their positions.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
        kdim: int | None = None, vdim: int | None = None, bias: bool = True, dropout: float = 0.0,
        rope: RotaryEmbedding | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        Hkv = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(num_heads, int) or num_heads < 1 or not isinstance(Hkv, int) or Hkv < 1 or num_heads % Hkv:
            raise ValueError(f"num_heads ({num_heads!r}) must be a positive multiple of num_kv_heads ({Hkv!r})")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; "
                                 "pass head_dim explicitly")
            head_dim = embed_dim // num_heads
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if rope is not None and not isinstance(rope, RotaryEmbedding):
            raise TypeError(f"rope must be a dotattn.nn.RotaryEmbedding or None, got {type(rope).__name__}")
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, Hkv, head_dim
        self.dropout = dropout
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, **kw)
        self.k_proj = nn.Linear(embed_dim if kdim is None else kdim, Hkv * head_dim, **kw)
        self.v_proj = nn.Linear(embed_dim if vdim is None else vdim, Hkv * head_dim, **kw)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, **kw)
        self.rope = rope

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiHeadAttention:
        """A copy of a ``torch.nn.MultiheadAttention``'s weights and options (dropout, bias, kdim, vdim).

        The result is batch-first whatever ``mha.batch_first`` says. add_bias_kv and
        add_zero_attn have no counterpart here and raise.
        """
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("from_torch: add_bias_kv and add_zero_attn are not supported; "
                             "append the extra key to the inputs instead")
        w = mha.out_proj.weight
        out = cls(mha.embed_dim, mha.num_heads, kdim=mha.kdim, vdim=mha.vdim, bias=mha.in_proj_bias is not None,
                  dropout=mha.dropout, device=w.device, dtype=w.dtype)
        D = mha.embed_dim
        weights = mha.in_proj_weight.split(D) if mha._qkv_same_embed_dim else \
            (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.split(D)
        with torch.no_grad():
            for proj, weight, bias in zip((out.q_proj, out.k_proj, out.v_proj), weights, biases):
                proj.weight.copy_(weight)
                if bias is not None:
                    proj.bias.copy_(bias)
            out.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                out.out_proj.bias.copy_(mha.out_proj.bias)
        return out

    def new_cache(self, batch_size: int, capacity: int, *, dtype: torch.dtype | None = None) -> KVCache:
        """An empty :class:`KVCache` sized for this layer."""
        w = self.k_proj.weight
        return KVCache(batch_size, self.num_kv_heads, capacity, self.head_dim, dtype=dtype or w.dtype, device=w.device)

    def _heads(self, x: torch.Tensor, H: int) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, H, self.head_dim).transpose(1, 2)  # (B, H, L, E)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None, *,
        mask: masks.Mask | None = None, attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None, is_causal: bool = False, need_weights: bool = False,
        cache: KVCache | None = None, lengths: torch.Tensor | None = None, engine: str = "auto",
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """query: (B, Lq, D); key: (B, Lk, Dk), value: (B, Lk, Dv), default query (self-attention).
        Returns (B, Lq, D), and the weights (B, H, Lq, Lk) too when ``need_weights``.

        mask, attn_mask, is_causal: as in ``dotattn.scaled_dot_product_attention`` (ANDed);
        key_padding_mask: (B, Lk) as in torch.nn.MultiheadAttention (True = ignore that key).
        cache: a :class:`KVCache`; this step's keys and values are appended to it and the
        queries attend all of it with the decoding alignment (``lengths`` as in
        ``KVCache.append``: real tokens per row of a left-padded first step). The masks
        given then apply to the whole cache (Lk = the cache's filled length).
        """
        key = query if key is None else key
        value = key if value is None else value
        B, Lq, _ = query.shape
        q = self._heads(self.q_proj(query), self.num_heads)
        k = self._heads(self.k_proj(key), self.num_kv_heads)
        v = self._heads(self.v_proj(value), self.num_kv_heads)
        if cache is not None:
            if self.rope is not None:
                positions = cache.positions(q.shape[2], lengths)
                q, k = self.rope(q, positions), self.rope(k, positions)
            k, v, cache_mask = cache.append(k, v, lengths)
            mask = cache_mask if mask is None else cache_mask & mask
        elif self.rope is not None:
            q = self.rope(q, torch.arange(q.shape[2], device=q.device))
            k = self.rope(k, torch.arange(k.shape[2], device=k.device))
        if key_padding_mask is not None:
            padding = _key_padding(key_padding_mask, B, k.shape[2])
            mask = padding if mask is None else mask & padding
        result = scaled_dot_product_attention(
            q, k, v, attn_mask, self.dropout if self.training else 0.0, is_causal,
            enable_gqa=self.num_kv_heads != self.num_heads, mask=mask, engine=engine, return_weights=need_weights,
        )
        out = result.output if need_weights else result
        out = self.out_proj(out.transpose(1, 2).reshape(B, Lq, self.num_heads * self.head_dim))
        return (out, result.weights) if need_weights else out
