"""The Triton kernels as PyTorch operators that Inductor sees into (``torch.library.triton_op``).

A call traced by torch.compile on CUDA tensors whose static facts show that the triton engine
would run it eagerly (``traced_call``) calls these operators instead of the opaque
``dotattn::attention``. Their bodies launch the kernels through ``torch.library.wrap_triton``,
so the compiled graph holds each launch: Inductor compiles the kernels with the rest of the
graph and calls them from its own wrapper, with no dotattn Python in between.

    torch.ops.dotattn.triton_attention(q, k, v, lo, hi, scale, softcap)
        -> out (*batch, Hq, Lq, Ev) in q's dtype, lse (*batch, Hq, Lq) float32
    torch.ops.dotattn.triton_attention_backward(d_out, q, k, v, out, lse, lo, hi, scale, softcap)
        -> dq, dk, dv (shapes of q, k, v)

q (*batch, Hq, Lq, E), k (*batch, Hkv, Lk, E), v (*batch, Hkv, Lk, Ev), batch dims
broadcasting; lo, hi: the mask's row spans (query i sees keys lo <= j < hi; from
``split_k.traced_spans``: causal in both alignments, sliding windows, padding, prefix-LM and
their AND), ints broadcastable to (*batch, Hq, Lq), or None for no mask; softcap 0 for none.

What the eager engine decides from tensor data, these operators do in graph operations:
the tile lists come from the spans (``_tiles.span_tile_lists``), and the NaN/inf policy runs
on zeroed copies of q, k, v with the rows and columns that may see garbage marked afterwards
(``_nonfinite.mark_seen_in_spans``), an O((Lq + Lk)·E) cost that finite inputs pay too. Each
kernel runs in the first of its configs that fits (``configs.py``) instead of the fastest,
which only the eager engine times. Calls with dropout, a boolean or float tensor mask, or a
block-sparse layout keep the generic operator, as do calls in Triton's interpreter (which
runs the kernels on the tensors it is given, and cannot run them on the fake tensors of a
trace) and torch versions without ``torch.library.triton_op``.

The operators are registered on first use by a trace (``traced_call``) or by ``register``,
since registering imports triton and Inductor, which importing dotattn must not.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from dotattn._inputs import prepare
from dotattn._layout import flat_batch, spans_canonical
from dotattn._nonfinite import mark_seen_in_spans
from dotattn.engines.registry import available, generation
from dotattn.engines.split_k import traced_numbers, traced_sizes, traced_spans
from dotattn.engines.triton.launch import MISSING, Call, interpreting, kernel_lse, natural_lse, on_device, support
from dotattn.engines.triton.mask_args import MaskParts

__all__ = ["register", "traced_call"]


def _problem(q, k, v, scale: float, softcap: float):
    return prepare(q, k, v, None, 0.0, False, scale, True, return_lse=True, softcap=softcap or None)


def _call(p, lo, hi) -> Call:
    """The kernels' call for a problem whose mask is the spans lo, hi (None: no mask)."""
    if lo is not None:
        lo, hi = (x.to(device=p.device, dtype=torch.int32).contiguous()
                  for x in spans_canonical((lo, hi), p.batch_shape, p.Hq, p.Lq))
    return Call(p, None, MaskParts(lo=lo, hi=hi), p.device_type != "cuda", False, traced=True)


def _launching_on(device: torch.device):
    """The tensors' CUDA device made current where the operator runs for real (Triton launches
    on the current device); nothing while it is traced, where no launch happens and Inductor's
    wrapper guards the device."""
    from torch._library.triton import is_wrap_triton_enabled  # False inside triton_op's real call

    return contextlib.nullcontext() if is_wrap_triton_enabled() else on_device(device)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None,
             scale: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    p = _problem(q, k, v, scale, softcap)
    call = _call(p, lo, hi)
    with _launching_on(p.device):
        out, lse2 = call.forward(q, k, v, None)
    given = (flat_batch(x, p.batch_shape) for x in (q, k, v))
    out, lse = mark_seen_in_spans(*given, call.parts.lo, call.parts.hi, out, natural_lse(lse2))
    return (out.reshape(*p.batch_shape, p.Hq, p.Lq, p.Ev).to(q.dtype),
            lse.reshape(*p.batch_shape, p.Hq, p.Lq))


def _backward(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None, scale: float,
              softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = _problem(q, k, v, scale, softcap)
    N = math.prod(p.batch_shape)
    rows, cols = (N, p.Hq, p.Lq), (N, p.Hq, p.Lq, p.Ev)
    with _launching_on(p.device):
        dq, dk, dv, _ = _call(p, lo, hi).backward(
            q, k, v, None, out.reshape(cols), kernel_lse(lse.reshape(rows)), d_out.reshape(cols), False)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, lo, hi, scale, softcap = inputs
    ctx.save_for_backward(q, k, v, *output, lo, hi)
    ctx.args = (scale, softcap)


def _grad(ctx, d_out: torch.Tensor, _d_lse: torch.Tensor):
    q, k, v, out, lse, lo, hi = ctx.saved_tensors
    dq, dk, dv = torch.ops.dotattn.triton_attention_backward(d_out, q, k, v, out, lse, lo, hi, *ctx.args)
    return dq, dk, dv, None, None, None, None


@functools.lru_cache(maxsize=1)
def register() -> bool:
    """Define ``dotattn::triton_attention`` and its backward (once); False where this torch has
    no ``torch.library.triton_op`` (torch < 2.6) or triton is missing."""
    if MISSING is not None or not hasattr(torch.library, "triton_op"):
        return False
    forward = torch.library.triton_op("dotattn::triton_attention", _forward, mutates_args=())
    torch.library.triton_op("dotattn::triton_attention_backward", _backward, mutates_args=())
    forward.register_autograd(_grad, setup_context=_setup_context)
    return True


def _traced_state(dtypes: tuple, devices: tuple, scale: float | None, softcap: float | None, requested: str,
                  *, generation: int) -> tuple[int, int] | None:
    """Under torch.compile, the part of ``traced_call``'s decision that no size enters: None
    where no call without dropout with these facts (q, k, v's dtypes and device types, the
    engine ``requested`` after scopes) would run the triton engine's prefill kernels eagerly,
    else ``(most, max_head_dim)``: the most query rows per kv head that another engine takes
    first (split_k's decoding kernels, for auto; 0 for none) and the kernels' largest head
    dim. Registers the operators. Called while tracing on plain Python values
    and kept in the graph as a constant (marked for dynamo below), guarded on the registry's
    ``generation`` and the scope's engine."""
    if not traced_numbers(scale, softcap):
        return None  # the generic operator says what is wrong with them
    supported = support()
    if interpreting() or set(devices) != {"cuda"} or len(set(dtypes)) != 1 or dtypes[0] not in supported.dtypes:
        return None
    most = 0
    if requested == "auto":
        for engine in available():
            if engine.name == "triton":
                break
            if engine.name == "split_k":  # takes CUDA decoding steps up to this many rows per kv head
                most = engine.auto_max_rows("cuda", probe=False)
            elif engine.support.devices is None or "cuda" in engine.support.devices:
                return None  # an engine ranked above triton that runs CUDA tensors
        else:
            return None
    elif requested != "triton":
        return None
    return (most, supported.max_head_dim) if register() else None


_traced_state._dynamo_marked_constant = True  # as split_k._traced_state


def traced_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float | None,
                softcap: float | None, enable_gqa: bool, requested: str) -> tuple | None:
    """Under torch.compile: the arguments after q, k, v with which ``dotattn::triton_attention``
    runs a call without dropout or weights, ``(lo, hi, scale, softcap)``, when its static facts
    (shapes, dtypes, devices, the mask's structure, the engine ``requested`` after scopes:
    ``registry.traced_request``) show that an eager call would run the triton engine's prefill
    kernels; None otherwise. Reads no tensor data; sizes may be symbolic. q (*B, Hq, Lq, E),
    k (*B, Hkv, Lk, E), v (*B, Hkv, Lk, Ev) as the call passes them; ``mask`` everything ANDed."""
    state = _traced_state((q.dtype, k.dtype, v.dtype), (q.device.type, k.device.type, v.device.type), scale,
                          softcap, requested, generation=generation())
    if state is None:
        return None
    most, max_head_dim = state
    sizes = traced_sizes(q, k, v, enable_gqa)
    if sizes is None:
        return None
    batch, Hq, Hkv, Lq, Lk, E, Ev = sizes
    # Guarded comparisons: the kernels specialize on the head dims anyway, and a symbolic
    # length recompiles only where it crosses split_k's threshold (decoding steps).
    if max(E, Ev) > max_head_dim or (most and Hq // Hkv * Lq <= most):
        return None
    spans = traced_spans(mask, Lq, Lk, (*batch, Hq, Lq), flag_oversized=False)
    if spans is None:
        return None
    return (*spans, 1.0 / math.sqrt(E) if scale is None else scale, 0.0 if softcap is None else softcap)
