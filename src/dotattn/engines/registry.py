"""The engine registry and the dispatcher that explains itself.

Every engine registers itself here, in the module that defines it. ``engine="auto"`` runs the highest-priority engine that
reports no reason against the problem and does not ask auto to pass it over (an
engine may, where a lower-ranked one is faster at that size; ``explain`` shows why),
while a forced engine runs whenever it can. A forced engine that cannot run raises
:class:`EngineNotSupportedError` listing every reason. ``use_engine`` scopes a
default through a context variable, so it is safe across threads and async tasks; under
torch.compile, which cannot read a context variable, the graph reads the scope of the
calling thread (:func:`traced_request`) and is recompiled when it changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from dotattn._inputs import Problem
from dotattn.engines.base import Engine, EngineNotSupportedError

__all__ = ["Explanation", "available", "explain_problem", "first_choice", "get", "register", "select", "use_engine"]

_REGISTRY: dict[str, Engine] = {}
# The registry by priority, the order auto tries them in, and their names (kept by register).
_ORDER: tuple[Engine, ...] = ()
_NAMES: tuple[str, ...] = ()
_SCOPED: contextvars.ContextVar[str] = contextvars.ContextVar("dotattn_engine", default="auto")
# The same scope per thread, for torch.compile: dynamo cannot read a ContextVar, but it reads
# (and guards on) an attribute of a threading.local in the thread that calls the graph.
class _ThreadScope(threading.local):
    def __init__(self) -> None:  # runs in each thread that reads it: outside every scope
        self.name = "auto"


_THREAD_SCOPE = _ThreadScope()
# Counts the changes to the registry (register): a compiled graph that decided from the
# registry without tracing it is guarded on this number instead (split_k.traced_call).
_GENERATION = 0


def register(engine: Engine) -> Engine:
    """Add an engine to the registry (by its ``name``); returns it."""
    global _ORDER, _NAMES
    _REGISTRY[engine.name] = engine
    _ORDER = tuple(sorted(_REGISTRY.values(), key=lambda e: -e.priority))
    _NAMES = tuple(e.name for e in _ORDER)
    changed()
    return engine


def changed() -> None:
    """Note a change to the registry, so that compiled graphs guarded on ``generation`` recompile."""
    global _GENERATION
    _GENERATION += 1


def generation() -> int:
    """How many changes to the registry this process has seen (``changed``)."""
    return _GENERATION


def available() -> list[Engine]:
    """The registered engines, in the order ``auto`` tries them."""
    return list(_ORDER)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or (name != "auto" and name not in _REGISTRY):
        known = ", ".join(repr(n) for n in ["auto", *_REGISTRY])
        raise ValueError(f"unknown engine {name!r}; choose one of {known}")
    return name


def get(name: str) -> Engine:
    """The engine called ``name``; ValueError listing the known names if there is none."""
    if _check_name(name) == "auto":
        raise ValueError("'auto' is a choice, not an engine; use select() to resolve it")
    return _REGISTRY[name]


@contextlib.contextmanager
def use_engine(name: str) -> Iterator[None]:
    """Within the block, ``engine="auto"`` means ``name`` (or "auto" to undo an outer scope)."""
    token = _SCOPED.set(_check_name(name))
    outer, _THREAD_SCOPE.name = _THREAD_SCOPE.name, name
    try:
        yield
    finally:
        _SCOPED.reset(token)
        _THREAD_SCOPE.name = outer


def traced_request(engine: str) -> str:
    """What ``engine`` asks for in a call being traced by torch.compile: itself, or for "auto"
    this thread's innermost ``use_engine`` scope (or "auto"). Read while tracing, so the
    compiled graph is guarded on it: entering another scope recompiles. (Asyncio tasks that
    share a thread and interleave different scopes around one compiled function share this
    value.)"""
    return _THREAD_SCOPE.name if engine == "auto" else _check_name(engine)


def first_choice(engine: str) -> tuple[Engine | None, bool]:
    """The engine a call asking for ``engine`` tries first, after ``use_engine`` scopes, and
    whether auto tries it (then its ``auto_skip`` applies); (None, False) for an unknown name."""
    if type(engine) is not str:
        return None, False
    if engine == "auto":
        engine = _SCOPED.get()
        if engine == "auto":
            return (_ORDER[0] if _ORDER else None), True
    return _REGISTRY.get(engine), False


@dataclass(frozen=True)
class Explanation:
    """Which engine runs a problem, and why each other engine does not.

    engine:    the chosen engine's name, or None when the requested engine cannot run
    requested: what the caller asked for ("auto" or a name), after ``use_engine``
    rejected:  engine name -> reasons, for every other engine considered
    detail:    how the chosen engine will run it (e.g. "compiled kernel"), or None
    compile_limits: why the call cannot run under torch.compile or torch.export (empty when
               it can; ``dotattn.explain`` fills it)
    """

    engine: str | None
    requested: str
    rejected: dict[str, list[str]]
    detail: str | None = None
    compile_limits: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.engine is None:
            lines = [f"{self.requested} cannot run this problem"]
        else:
            how = "chosen by auto" if self.requested == "auto" else "requested"
            lines = [f"engine: {self.engine} ({how})" + (f": {self.detail}" if self.detail else "")]
        lines += [f"  {name}: " + "; ".join(reasons) for name, reasons in self.rejected.items()]
        lines += [f"  under torch.compile: {limit}" for limit in self.compile_limits]
        return "\n".join(lines)


def explain_problem(problem: Problem, engine: str = "auto", exclude: tuple[str, ...] = ()) -> Explanation:
    """Resolve ``engine`` for ``problem`` without running it, with how the chosen engine runs it.
    ``exclude`` as for :func:`select`."""
    chosen, requested, rejected = _resolve(problem, engine, exclude=exclude)
    detail = None if chosen is None else _REGISTRY[chosen].detail(problem)
    return Explanation(chosen, requested, rejected, detail)


def _resolve(problem: Problem, engine: str, every_reason: bool = True,
             exclude: tuple[str, ...] = ()) -> tuple[str | None, str, dict[str, list[str]]]:
    """The chosen engine's name (None if none can run), the resolved request, and why each other was
    not used; without ``every_reason``, the engines after the chosen one are not asked (a call
    needs only the choice, and a decoding step pays for every question). Engines in ``exclude``
    are never chosen; a ``use_engine`` scope that names one of them means "auto"."""
    requested = "auto" if engine == "auto" else _check_name(engine)
    if requested == "auto":
        requested = _SCOPED.get()
        if requested in exclude:
            requested = "auto"
    candidates = _ORDER if requested == "auto" else (_REGISTRY[requested],)
    if exclude:
        candidates = tuple(c for c in candidates if c.name not in exclude)
    names = _NAMES if candidates is _ORDER else tuple(c.name for c in candidates)
    chosen = None
    rejected: dict[str, list[str]] = {}
    for i, candidate in enumerate(candidates):
        if chosen is not None and not every_reason:
            break
        reasons = candidate.reasons(problem)
        ask = requested == "auto" and chosen is None and not reasons
        skip = candidate.auto_skip(problem, names[i + 1:]) if ask else None
        if reasons:
            rejected[candidate.name] = reasons
        elif skip is not None:
            rejected[candidate.name] = [skip]
        elif chosen is None:
            chosen = candidate.name
        else:
            rejected[candidate.name] = [f"could run it, but {chosen} ranks higher"]
    return chosen, requested, rejected


def select(problem: Problem, engine: str = "auto", exclude: tuple[str, ...] = ()) -> Engine:
    """The engine that will run ``problem``; EngineNotSupportedError with every reason if none.
    ``exclude`` names engines not to choose (an engine that hands a problem on names itself)."""
    chosen, _, rejected = _resolve(problem, engine, every_reason=False, exclude=exclude)
    if chosen is None:
        message = "; ".join(
            f"{name} cannot run this: " + "; ".join(reasons)
            for name, reasons in rejected.items()
        )
        raise EngineNotSupportedError(message)
    return _REGISTRY[chosen]

