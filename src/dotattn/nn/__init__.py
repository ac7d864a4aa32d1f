"""Modules that project, reshape and call the functional API: multi-head attention with
grouped-query heads, rotary embeddings and a KV cache; additive (Bahdanau) attention."""

from __future__ import annotations

from dotattn.nn.additive import AdditiveAttention
from dotattn.nn.attention import MultiHeadAttention
from dotattn.nn.kv_cache import KVCache
from dotattn.nn.rope import RotaryEmbedding

__all__ = ["AdditiveAttention", "KVCache", "MultiHeadAttention", "RotaryEmbedding"]
