"""``a & b`` and ``a | b``: flat combinations of masks, with their tile codes the minimum
and maximum of their children's (see the ``dotattn.masks`` docstring on soundness)."""

from __future__ import annotations

import functools

import torch

from dotattn.masks.base import _NEG_INF, Mask


def _bias_of(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a bool mask: 0 where allowed, -inf where masked."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, _NEG_INF)


def _terms(mask: Mask, kind: type) -> tuple[Mask, ...]:
    """Children of a combination of the same kind, so a & b & c is one flat And."""
    return mask.children if isinstance(mask, kind) else (mask,)


class _Combination(Mask):
    """A flat combination of two or more masks; subclasses give the operator."""

    _symbol: str

    def __init__(self, *children: Mask) -> None:
        self.children = children
        # Shapes that broadcast pairwise broadcast together, so a failure always has one culprit pair to name.
        for k, child in enumerate(children):
            for earlier in children[:k]:
                try:
                    torch.broadcast_shapes(earlier.lead_shape, child.lead_shape)
                except RuntimeError:
                    raise ValueError(
                        f"cannot combine {earlier!r} (lead_shape {earlier.lead_shape}) with {child!r} "
                        f"(lead_shape {child.lead_shape}): their leading dims do not broadcast; "
                        "give per-batch masks the same batch size B"
                    ) from None
        self._lead = tuple(torch.broadcast_shapes(*(c.lead_shape for c in children)))

    def __repr__(self) -> str:
        return f" {self._symbol} ".join(self._child_repr(c) for c in self.children)

    def _child_repr(self, child: Mask) -> str:
        return repr(child)

    def spec(self, tensors: list[torch.Tensor]) -> str:
        return f" {self._symbol} ".join(f"({c.spec(tensors)})" for c in self.children)

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return self._lead

    @property
    def _device(self) -> torch.device | None:
        return next((d for d in (c._device for c in self.children) if d is not None), None)

    def check(self, Lq: int, Lk: int) -> None:
        for child in self.children:
            child.check(Lq, Lk)

    def leaves(self) -> list[Mask]:
        return [leaf for child in self.children for leaf in child.leaves()]

    @property
    def value_key(self) -> tuple | None:
        keys = tuple(c.value_key for c in self.children)
        return None if None in keys else (self._symbol, keys)


class And(_Combination):
    """Allowed where every child allows.

    With an additive child the result is a bias: the sum of the children's biases,
    plus -inf where a boolean child masks.
    """

    _symbol = "&"

    def __init__(self, *children: Mask) -> None:
        super().__init__(*children)
        self.is_additive = any(c.is_additive for c in children)

    def _child_repr(self, child: Mask) -> str:
        # & binds tighter than |, so an Or inside an And needs parentheses.
        return f"({child!r})" if isinstance(child, Or) else repr(child)

    def _tile(self, Lq, Lk, q0, q1, k0, k1, device):
        tiles = [(c.is_additive, c._tile(Lq, Lk, q0, q1, k0, k1, device)) for c in self.children]
        keeps = [t for additive, t in tiles if not additive]
        allowed = functools.reduce(torch.logical_and, keeps) if keeps else None
        if not self.is_additive:
            return allowed
        bias = functools.reduce(torch.add, [t for additive, t in tiles if additive])
        return bias if allowed is None else bias + _bias_of(allowed, bias.dtype)

    def _block_map(self, Lq, Lk, block_q, block_k, device):
        maps = [c._block_map(Lq, Lk, block_q, block_k, device) for c in self.children]
        return functools.reduce(torch.minimum, maps)

    def _row_spans(self, Lq, Lk, device):
        spans = [c._row_spans(Lq, Lk, device) for c in self.children]
        if any(sp is None for sp in spans):
            return None
        lo = functools.reduce(torch.maximum, [sp[0] for sp in spans])
        return lo, functools.reduce(torch.minimum, [sp[1] for sp in spans])

    def simplified(self, Lq: int, Lk: int) -> Mask | None:
        kept = [c for c in (child.simplified(Lq, Lk) for child in self.children) if c is not None]
        if len(kept) == len(self.children) and all(a is b for a, b in zip(kept, self.children)):
            return self
        return None if not kept else kept[0] if len(kept) == 1 else And(*kept)


class Or(_Combination):
    """Allowed where any child allows; boolean masks only."""

    _symbol = "|"

    def simplified(self, Lq: int, Lk: int) -> Mask | None:
        return None if any(child.simplified(Lq, Lk) is None for child in self.children) else self

    def _tile(self, Lq, Lk, q0, q1, k0, k1, device):
        return functools.reduce(torch.logical_or, [c._tile(Lq, Lk, q0, q1, k0, k1, device) for c in self.children])

    def _block_map(self, Lq, Lk, block_q, block_k, device):
        maps = [c._block_map(Lq, Lk, block_q, block_k, device) for c in self.children]
        return functools.reduce(torch.maximum, maps)

    def _row_spans(self, Lq, Lk, device):
        spans = [c._row_spans(Lq, Lk, device) for c in self.children]
        if any(sp is None for sp in spans):
            return None

        def union(a, b):
            (lo_a, hi_a), (lo_b, hi_b) = a, b
            empty_a, empty_b = lo_a >= hi_a, lo_b >= hi_b
            # Two intervals make one when either is empty or they overlap or touch.
            if not bool((empty_a | empty_b | (torch.maximum(lo_a, lo_b) <= torch.minimum(hi_a, hi_b))).all()):
                return None
            lo = torch.where(empty_a, lo_b, torch.where(empty_b, lo_a, torch.minimum(lo_a, lo_b)))
            hi = torch.where(empty_a, hi_b, torch.where(empty_b, hi_a, torch.maximum(hi_a, hi_b)))
            return lo, hi

        out = spans[0]
        for sp in spans[1:]:
            out = union(out, sp)
            if out is None:
                return None
        return out
