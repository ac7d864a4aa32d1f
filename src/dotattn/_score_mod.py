"""``score_mod=``: a FlexAttention-style function that rewrites the scores, and the tensors it captures.

    score_mod(score, b, h, q_idx, kv_idx) -> new score

``score`` holds scaled (and soft-capped) scores; ``b``, ``h``, ``q_idx`` and ``kv_idx`` are
int64 index tensors that broadcast against it: the flattened batch row, the query head, the
query position and the key position. The function uses torch ops that broadcast (no
``.item()``, no Python branches on values), as FlexAttention's do, and returns a tensor
that broadcasts to the scores. The mask is applied after it, so a score_mod never needs to
write -inf itself (it may, and that key is then masked).

Engines call it on whatever block of scores they hold (the reference engine on all of them,
the tiled engine's torch-ops path tile by tile), so the same function must give the same
value for a (b, h, q, kv) however the block is cut. Gradients reach the scores (and so q
and k) through it and, for tensors it captures, the tensors themselves: those found in its
closure, the globals it names, a ``functools.partial``'s arguments and the parameters of a
module it captures (``captured``).

Shape legend: S the scores of a block, any shape that ends (..., rows, keys).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch

ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check(score_mod: object) -> ScoreMod | None:
    """``score_mod`` when it is None or callable; TypeError naming it otherwise."""
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be a function (score, b, h, q_idx, kv_idx) -> score or None, "
                        f"got {type(score_mod).__name__}")
    return score_mod


def captured(score_mod: ScoreMod) -> tuple[torch.Tensor, ...]:
    """The floating-point tensors ``score_mod`` captures, each once, in a stable order: what its
    gradients can reach (see the module docstring)."""
    found: dict[int, torch.Tensor] = {}

    def add(value: object) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                found.setdefault(id(value), value)
        elif isinstance(value, torch.nn.Module):
            for parameter in value.parameters():
                add(parameter)
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)

    fn = score_mod
    while isinstance(fn, functools.partial):
        for value in (*fn.args, *fn.keywords.values()):
            add(value)
        fn = fn.func
    if inspect.ismethod(fn):
        add(fn.__self__)
        fn = fn.__func__
    if inspect.isfunction(fn):
        names = inspect.getclosurevars(fn)
        for value in (*names.nonlocals.values(), *names.globals.values()):
            add(value)
    elif isinstance(fn, torch.nn.Module):
        add(fn)
    return tuple(found.values())


def store_grads(problem, wanted: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """Leave the gradients of the captured tensors an engine differentiated (``wanted``, those of
    ``problem.score_mod_tensors`` that require grad) in ``problem.derived["score_mod_grads"]``,
    one per captured tensor (None for the others), where the autograd node takes them."""
    by_tensor = dict(zip(map(id, wanted), grads))
    problem.derived["score_mod_grads"] = tuple(by_tensor.get(id(t)) for t in problem.score_mod_tensors)


def apply(score_mod: ScoreMod, s: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
          kv_idx: torch.Tensor) -> torch.Tensor:
    """``score_mod`` on the scores s (S) with their indices (int64, broadcasting against s):
    its result in s's shape and dtype; ValueError naming the shapes when it does not broadcast."""
    out = score_mod(s, b, h, q_idx, kv_idx)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"score_mod returned {type(out).__name__}; it must return a tensor (the new scores)")
    try:
        return out.to(s.dtype).expand(s.shape)
    except RuntimeError:
        raise ValueError(f"score_mod returned shape {tuple(out.shape)}, which does not broadcast to the "
                         f"scores {tuple(s.shape)}; combine the arguments with broadcasting torch ops") from None


def apply_dense(score_mod: ScoreMod, s: torch.Tensor, batch_shape: tuple[int, ...]) -> torch.Tensor:
    """``apply`` on a whole problem's scores s (*batch, Hq, Lq, Lk), b the flattened batch row."""
    *_, Hq, Lq, Lk = s.shape
    lead = (*batch_shape, 1, 1, 1)
    b = torch.arange(math.prod(lead), device=s.device).reshape(lead)
    h = torch.arange(Hq, device=s.device)[:, None, None]
    return apply(score_mod, s, b, h, torch.arange(Lq, device=s.device)[:, None], torch.arange(Lk, device=s.device))


def apply_tile(score_mod: ScoreMod, s: torch.Tensor, rows: slice, Hkv: int, q0: int, k0: int) -> torch.Tensor:
    """``apply`` on one tile of scores in the grouped layout, s (n, Hkv, G, bq, bk): batch rows
    ``rows`` (of the flattened batch), query head hk·G + g, queries q0.., keys k0.."""
    n, _, G, bq, bk = s.shape
    b = torch.arange(rows.start, rows.start + n, device=s.device).view(-1, 1, 1, 1, 1)
    h = torch.arange(Hkv * G, device=s.device).view(1, Hkv, G, 1, 1)
    q_idx = torch.arange(q0, q0 + bq, device=s.device)[:, None]
    return apply(score_mod, s, b, h, q_idx, torch.arange(k0, k0 + bk, device=s.device))
