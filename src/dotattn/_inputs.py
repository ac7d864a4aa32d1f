"""Validation and normalisation of a call into one problem record.

Every public entry point goes through :func:`prepare`, so every engine sees inputs
that are already checked, and every bad call fails here with a message that names
the argument, the bad value and the fix.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import reduce

import torch

from dotattn import _score_mod, masks
from dotattn._dropout import draw_seed


# The columns of a monitored row's statistics, which the kernels write (csrc/common.h) and
# dotattn.diagnostics reduces: ten sums and the max logit.
ROW_STATS = 11


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an engine computes in: half precisions in float32 (as torch's math
    backend does on CPU), others as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The lse's dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _cached:
    """functools.cached_property without the lock that Python before 3.12 takes on every first
    read (a decoding step reads three, each with its code out of cache). A problem belongs to
    one call, so no two threads compute one value."""

    def __init__(self, compute) -> None:
        self.compute, self.name, self.__doc__ = compute, compute.__name__, compute.__doc__

    def __get__(self, problem: Problem | None, owner: type | None = None):
        if problem is None:
            return self
        value = problem.__dict__[self.name] = self.compute(problem)  # later reads skip this descriptor
        return value


@dataclass(eq=False)  # not frozen: a frozen dataclass sets each of its 20 fields through object.__setattr__
class Problem:
    """One validated attention call.

    query: (*batch, Hq, Lq, E)   key: (*batch, Hkv, Lk, E)   value: (*batch, Hkv, Lk, Ev)
    where *batch are the leading dims, broadcastable among the three, and Hkv divides
    Hq (grouped-query attention) or is 1 (broadcast, as in torch). 2-D inputs (L, E)
    arrive with a head dim of 1 added and ``squeeze_head`` set.
    ``mask`` is everything that restricts attention (attn_mask, is_causal, mask) ANDed.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: masks.Mask | None
    scale: float
    dropout_p: float
    softcap: float  # scores -> softcap·tanh(scores/softcap) before the mask; 0: none
    generator: torch.Generator | None
    return_lse: bool
    return_weights: bool
    batch_shape: tuple[int, ...]
    squeeze_head: bool
    # What engines ask of the tensors, read from them once by prepare.
    dtype: torch.dtype
    device: torch.device
    device_type: str  # device.type, which costs a decoding step tens of µs to ask of torch each time
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    E: int
    Ev: int
    # A Monitor records this call: an engine that can computes each row's statistics while it
    # runs and leaves them in derived["row_stats"] (N, Hq, Lq, 11), see csrc/common.h.
    stats: bool = False
    # score_mod(score, b, h, q_idx, kv_idx) -> score, after the scale and softcap and before the
    # mask (dotattn._score_mod); None for none.
    score_mod: object = None

    def settle(self, *, requires_grad: bool, dropout_seed: int | None = None) -> Problem:
        """Fix what this problem would otherwise decide from its tensors on first use: whether
        gradients are wanted and, when given, the dropout seed. For a problem built where its
        tensors cannot say (inside a PyTorch operator, one block of a ring), so that an engine
        runs its forward and backward alike. Returns the problem."""
        self.__dict__["requires_grad"] = requires_grad  # the cached properties' own storage
        if dropout_seed is not None:
            self.__dict__["dropout_seed"] = dropout_seed
        return self

    @_cached
    def derived(self) -> dict:
        """Data engines derive from this problem once and reuse (a mask's tile codes, spans and
        packed tiles), so a backward does not derive it again. Data only: an object that holds
        the problem would make a cycle, which keeps its tensors alive until the garbage
        collector runs (a ring's blocks would pile up)."""
        return {}

    @_cached
    def score_mod_tensors(self) -> tuple[torch.Tensor, ...]:
        """The floating-point tensors ``score_mod`` captures (``_score_mod.captured``), which its
        gradients reach; () without one."""
        return () if self.score_mod is None else _score_mod.captured(self.score_mod)

    @_cached
    def dropout_seed(self) -> int:
        """Drawn from ``generator`` on first use, so explaining a call consumes no randomness."""
        return draw_seed(self.generator) if self.dropout_p > 0 else 0

    @_cached
    def row_spans(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The mask's ``Mask.row_spans`` for this call, derived once however many engines ask
        (a decoding step asks three times); None without a mask, for a float mask, or when
        some row's keys are not one interval."""
        m = self.mask
        return None if m is None or m.is_additive else m.row_spans(self.Lq, self.Lk)

    @_cached
    def inputs_finite(self) -> bool:
        """Whether query, key and value hold no NaN or inf (checked once, on first use).

        One reduction, since NaN and inf reach the sum of the three sums; only a total that
        is not finite (bad input, or an overflow) needs the elementwise check."""
        tensors = (self.query, self.key, self.value)
        total = tensors[0].sum() + tensors[1].sum() + tensors[2].sum()
        return bool(torch.isfinite(total)) or all(bool(torch.isfinite(x).all()) for x in tensors)

    @property
    def scores_shape(self) -> tuple[int, ...]:
        """(*batch, Hq, Lq, Lk): the shape every mask must broadcast to."""
        return (*self.batch_shape, self.Hq, self.Lq, self.Lk)

    @_cached
    def requires_grad(self) -> bool:
        """Whether autograd needs this call's gradients (decided on first use, which engine
        selection makes before any engine runs)."""
        if not torch.is_grad_enabled():  # before biases(), which a view computes by cutting
            return False
        if self.query.requires_grad or self.key.requires_grad or self.value.requires_grad:
            return True
        m = self.mask  # only a float mask has bias leaves
        if m is not None and m.is_additive and any(leaf.tensor.requires_grad for leaf in m.biases()):
            return True
        return any(t.requires_grad for t in self.score_mod_tensors)


def _broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """torch.broadcast_shapes for plain tuples, without its tracing machinery (it runs on
    every call); ValueError when the shapes do not broadcast."""
    out = [1] * max(len(s) for s in shapes)
    for shape in shapes:
        for i, size in enumerate(shape, start=len(out) - len(shape)):
            if size != 1:
                if out[i] not in (1, size):
                    raise ValueError(f"shapes {shapes} do not broadcast")
                out[i] = size
    return tuple(out)


def _check_tensor(name: str, x: object) -> tuple[torch.Size, torch.dtype]:
    """x's shape and dtype, once checked."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    shape, dtype = x.shape, x.dtype
    if not dtype.is_floating_point:
        raise TypeError(
            f"{name} has dtype {dtype}; attention needs a floating dtype "
            f"(convert with {name}.float() or {name}.to(torch.bfloat16))"
        )
    if len(shape) < 2:
        raise ValueError(
            f"{name} has shape {tuple(shape)}; it needs at least 2 dims (..., L, E)"
        )
    return shape, dtype


def _check_tensors(query: object, key: object, value: object) -> tuple[torch.Size, torch.Size, torch.Size, torch.dtype]:
    """The shapes of query, key and value and their one dtype, once checked."""
    (qs, dtype), (ks, k_dtype), (vs, v_dtype) = (
        _check_tensor("query", query), _check_tensor("key", key), _check_tensor("value", value))
    for name, x_dtype in (("key", k_dtype), ("value", v_dtype)):
        if x_dtype != dtype:
            raise TypeError(
                f"{name} has dtype {x_dtype} but query has {dtype}; query, key and value "
                f"must share one dtype (use {name}.to(query.dtype))"
            )
    return qs, ks, vs, dtype


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_scale(scale: object, E: int) -> float:
    if scale is None:
        if E == 0:
            raise ValueError("query has head dim 0, so the default scale 1/sqrt(E) is infinite; pass scale=")
        return 1.0 / math.sqrt(E)
    if type(scale) is float and math.isfinite(scale):  # the common case, before the ABC check
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}; leave it None for 1/sqrt(E)")
    return float(scale)


def _check_softcap(softcap: object) -> float:
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not (
            math.isfinite(float(softcap)) and float(softcap) > 0):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r} "
                         "(Gemma 2 uses 50.0 for attention logits)")
    return float(softcap)


def _check_dropout(dropout_p: object) -> float:
    if type(dropout_p) in (float, int) and dropout_p == 0:  # the common case, before the ABC check
        return 0.0
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a number in [0, 1), got {type(dropout_p).__name__} {dropout_p!r}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def _check_heads(Hq: int, Hkv: int, enable_gqa: bool) -> None:
    if Hq == Hkv or Hkv == 1:
        return
    if not enable_gqa:
        raise ValueError(
            f"query has {Hq} heads but key and value have {Hkv}; "
            "pass enable_gqa=True for grouped-query attention"
        )
    if Hq % Hkv:
        raise ValueError(
            f"query has {Hq} heads and key/value {Hkv}; grouped-query attention needs "
            "the query heads to be a multiple of the key/value heads"
        )


def _check_mask_fits(name: str, leaf: masks.Mask, scores_shape: tuple[int, ...]) -> None:
    lead = leaf.lead_shape
    target = scores_shape[:-2]
    fits = len(lead) <= len(target) and all(
        m in (1, t) for m, t in zip(reversed(lead), reversed(target))
    )
    if not fits:
        raise ValueError(
            f"{name} {leaf!r} has leading shape {tuple(lead)}, which does not broadcast to the "
            f"scores' leading shape {tuple(target)} (*batch, Hq); a per-batch mask needs one "
            "entry per batch row (dim -4 of the scores): for 3-D inputs (B, L, E) add a head dim "
            "with .unsqueeze(-3)"
        )


def prepare(
    query: object,
    key: object,
    value: object,
    attn_mask: object = None,
    dropout_p: object = 0.0,
    is_causal: object = False,
    scale: object = None,
    enable_gqa: object = False,
    *,
    mask: object = None,
    return_lse: object = False,
    return_weights: object = False,
    generator: object = None,
    softcap: object = None,
    score_mod: object = None,
) -> Problem:
    """Check a call's arguments and bundle them into a :class:`Problem`."""
    # Each check is a call only where the common case's test fails, and plain statements stand
    # where loops would: a decoding step runs this with its code out of cache, where each
    # function called, and each generator, costs microseconds.
    try:
        qs, ks, vs, dtype = query.shape, key.shape, value.shape, query.dtype
        usual = (dtype.is_floating_point and key.dtype == dtype and value.dtype == dtype
                 and len(qs) >= 2 and len(ks) >= 2 and len(vs) >= 2)
    except AttributeError:  # not tensors
        usual = False
    if not usual:
        qs, ks, vs, dtype = _check_tensors(query, key, value)
    device = query.device
    if key.device != device or value.device != device:
        name, x = ("key", key) if key.device != device else ("value", value)
        raise ValueError(
            f"{name} is on {x.device} but query is on {device}; query, key and value "
            f"must be on one device (use {name}.to(query.device))"
        )
    squeeze_head = len(qs) == len(ks) == len(vs) == 2
    q, k, v = query, key, value
    if 2 in (len(qs), len(ks), len(vs)):
        q, k, v = (x.unsqueeze(0) if len(shape) == 2 else x for x, shape in ((query, qs), (key, ks), (value, vs)))
        qs, ks, vs = ((1, *shape) if len(shape) == 2 else shape for shape in (qs, ks, vs))

    if ks[-1] != qs[-1]:
        raise ValueError(
            f"key has head dim {ks[-1]} but query has {qs[-1]}; "
            "query and key must share the last dim"
        )
    if vs[-2] != ks[-2]:
        raise ValueError(
            f"value has {vs[-2]} positions (dim -2) but key has {ks[-2]}; "
            "key and value must have the same length"
        )
    if vs[-3] != ks[-3]:
        raise ValueError(
            f"value has {vs[-3]} heads (dim -3) but key has {ks[-3]}; "
            "key and value must have the same number of heads"
        )
    if not type(enable_gqa) is type(is_causal) is type(return_lse) is type(return_weights) is bool:
        for name, flag in (("enable_gqa", enable_gqa), ("is_causal", is_causal), ("return_lse", return_lse),
                           ("return_weights", return_weights)):
            _check_flag(name, flag)
    Hq, Lq, E = qs[-3], qs[-2], qs[-1]
    Hkv, Lk, Ev = ks[-3], ks[-2], vs[-1]
    if Hq != Hkv and Hkv != 1 and not (enable_gqa and Hq % Hkv == 0):
        _check_heads(Hq, Hkv, enable_gqa)
    if len(qs) == len(ks) == len(vs) == 4 and qs[0] == ks[0] == vs[0]:  # (B, H, L, E), the usual layout
        batch_shape = (qs[0],)
    else:
        batch_q, batch_k, batch_v = qs[:-3], ks[:-3], vs[:-3]
        try:
            batch_shape = tuple(batch_q) if batch_q == batch_k == batch_v else _broadcast_shapes(batch_q, batch_k, batch_v)
        except ValueError:
            raise ValueError(
                f"the leading (batch) dims of query {tuple(batch_q)}, key {tuple(batch_k)} "
                f"and value {tuple(batch_v)} do not broadcast; give them equal sizes or size 1"
            ) from None

    problem_scale = 1.0 / math.sqrt(E) if scale is None and E else _check_scale(scale, E)
    p = 0.0 if type(dropout_p) is float and dropout_p == 0.0 else _check_dropout(dropout_p)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    scores_shape = (*batch_shape, Hq, Lq, Lk)

    parts: list[masks.Mask] = []
    if attn_mask is not None:
        parts.append(masks.dense(masks.check_mask_tensor(
            attn_mask, "attn_mask", device=device, shape=scores_shape, shape_legend=" (*batch, Hq, Lq, Lk)",
            optional=True)))
    if is_causal:
        parts.append(masks.causal())
    if mask is not None:
        if not isinstance(mask, masks.Mask):
            raise TypeError(
                f"mask must be a dotattn.masks.Mask (e.g. masks.causal()), got {type(mask).__name__}; "
                "pass tensors as attn_mask= or wrap them in masks.dense()"
            )
        for leaf in mask.leaves():
            if leaf.lead_shape:
                _check_mask_fits("mask", leaf, scores_shape)
        mask.check(Lq, Lk)
        parts.append(mask)
    combined = parts[0] if len(parts) == 1 else reduce(lambda a, b: a & b, parts) if parts else None
    # What hides nothing on this problem is left out (Mask.simplified): a decoding step's
    # causal(bottom_right) over one query then costs no engine anything.
    combined = None if combined is None else combined.simplified(Lq, Lk)

    return Problem(
        query=q,
        key=k,
        value=v,
        mask=combined,
        scale=problem_scale,
        dropout_p=p,
        softcap=0.0 if softcap is None else _check_softcap(softcap),
        generator=generator,
        return_lse=return_lse,
        return_weights=return_weights,
        batch_shape=batch_shape,
        squeeze_head=squeeze_head,
        dtype=dtype, device=device, device_type="cpu" if query.is_cpu else device.type, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, E=E, Ev=Ev,
        score_mod=None if score_mod is None else _score_mod.check(score_mod),
    )
