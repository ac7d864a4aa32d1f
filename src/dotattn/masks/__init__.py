"""The mask algebra: which keys each query may attend, as small composable objects.

Convention
----------
Attention scores have shape (..., H, Lq, Lk). A boolean mask value True means
"query i may attend key j" (torch's ``attn_mask`` convention). A floating mask is
an additive bias added to the scores, with -inf where a key is masked. Masks are
built without knowing Lq and Lk (``causal()``, ``padding(kv_lengths)``, ...),
combined with ``&`` and ``|``, and only evaluated once the sizes are known.

Shape legend: B batch, H heads, Lq query length, Lk key length,
nQ = ceil(Lq / block_q), nK = ceil(Lk / block_k). ``lead_shape`` is the part of a
mask's dense form before (Lq, Lk): () for position-only masks, (B, 1) for
per-batch masks, whatever a dense tensor or block layout carries.

Two views of every mask
-----------------------
``tile(Lq, Lk, q0, q1, k0, k1)`` gives the dense values of one rectangle of the
Lq x Lk problem without building the whole mask; ``to_dense`` is the whole
rectangle. ``block_map(Lq, Lk, block_q, block_k)`` gives one int8 code per tile:

    EMPTY   (0)  no entry of the tile may attend: an engine skips the tile
    PARTIAL (1)  mixed, or additive: the engine calls ``tile`` and applies it
    FULL    (2)  every entry may attend: the engine runs the tile unmasked

Soundness
---------
EMPTY and FULL are guarantees for every mask, so an engine that trusts them is
correct. For primitives the classification is exact (PARTIAL means mixed), except
``documents``, which may report PARTIAL for a tile that is in fact empty. An
additive tile is never FULL, since its bias must still be added. A combination
maps ``&`` to the elementwise minimum of its children's codes and ``|`` to the
maximum (EMPTY < PARTIAL < FULL): sound, but possibly conservative, e.g. a tile
where two children are PARTIAL is reported PARTIAL even when their allowed
entries never meet (``&``) or together cover the tile (``|``).

Modules
-------
``base`` (Mask, the codes, shared helpers), ``positional`` (causal, sliding_window,
padding, prefix_lm), ``alibi`` (the ALiBi bias from its slopes), ``tensor`` (documents,
block_sparse, dense), ``combinators``
(``&`` and ``|``: And, Or), ``view`` (View, view) and ``mask_mod`` (from_mask_mod: a
FlexAttention-style mask function, evaluated tile by tile). Import from ``dotattn.masks``
itself, which re-exports them all.
"""

from __future__ import annotations

from dotattn.masks.base import EMPTY, FULL, PARTIAL, Mask
from dotattn.masks.combinators import And, Or
from dotattn.masks.positional import (
    Causal,
    Padding,
    PrefixLM,
    SlidingWindow,
    causal,
    padding,
    prefix_lm,
    sliding_window,
)
from dotattn.masks.tensor import BlockSparse, Dense, Documents, block_sparse, check_mask_tensor, dense, documents
# The function rebinds the name the submodule got: dotattn.masks.view is the function,
# and the module stays reachable as sys.modules["dotattn.masks.view"] (which pickle uses).
from dotattn.masks.mask_mod import FromMaskMod, from_mask_mod
from dotattn.masks.view import View, view
from dotattn.masks.alibi import ALiBi, alibi  # noqa: E402  rebinds the submodule's name, as view does

__all__ = [
    "check_mask_tensor",
    "EMPTY",
    "PARTIAL",
    "FULL",
    "Mask",
    "Causal",
    "SlidingWindow",
    "Padding",
    "Documents",
    "PrefixLM",
    "BlockSparse",
    "Dense",
    "And",
    "Or",
    "causal",
    "sliding_window",
    "padding",
    "documents",
    "prefix_lm",
    "block_sparse",
    "dense",
    "View",
    "view",
    "FromMaskMod",
    "from_mask_mod",
    "ALiBi",
    "alibi",
]
