"""dotattn: scaled dot-product attention, one semantics across engines.

    import dotattn
    out = dotattn.scaled_dot_product_attention(q, k, v, mask=dotattn.masks.causal())
    print(dotattn.explain(q, k, v, is_causal=True))
"""

from __future__ import annotations

from dotattn import masks
from dotattn.engines import AttentionResult, EngineNotSupportedError, use_engine
from dotattn.functional import explain, scaled_dot_product_attention

__all__ = [
    "AttentionResult",
    "EngineNotSupportedError",
    "explain",
    "masks",
    "scaled_dot_product_attention",
    "use_engine",
]
__version__ = "0.1.0"
