"""The engines, and the registry that picks one per problem and explains why.

Each engine module registers its engine when imported; this package imports them all, in
the order of registration (``auto`` ties break by it), and re-exports the registry.
"""

from __future__ import annotations

from dotattn.engines.base import AttentionResult, Engine, EngineNotSupportedError, Support
from dotattn.engines.registry import (
    Explanation,
    available,
    explain_problem,
    get,
    register,
    select,
    use_engine,
)

# The engine modules register themselves. triton imports without triton installed: its
# kernels load on the first run, and it reports "triton is not installed" when missing.
from dotattn.engines import reference, tiled, triton, split_k  # noqa: E402,F401  isort: skip

__all__ = [
    "AttentionResult",
    "Engine",
    "EngineNotSupportedError",
    "Explanation",
    "Support",
    "available",
    "explain_problem",
    "get",
    "register",
    "select",
    "use_engine",
]
