"""dotattn as PyTorch operators, so that torch.compile and torch.export keep it whole.

Under ``torch.compile`` (``fullgraph=True`` included) and ``torch.export``,
``scaled_dot_product_attention`` is one call of an operator in the ``dotattn`` namespace,
with a fake implementation that gives exact shapes and dtypes, and a backward operator:

    torch.ops.dotattn.attention(q, k, v, mask_tensors, mask_spec, scale, dropout_p, seed,
                                enable_gqa, engine, needs_grad, softcap)
        -> out (*batch, Hq, Lq, Ev) in q's dtype, lse (*batch, Hq, Lq) float32 (float64 for float64)
    torch.ops.dotattn.attention_backward(d_out, q, k, v, out, lse, mask_tensors, mask_spec, scale,
                                         dropout_p, seed, enable_gqa, engine, softcap)
        -> dq, dk, dv (shapes of q, k, v), and one gradient per float mask tensor

A decoding step that the split_k engine's C++ kernel would run (decided while tracing from
shapes, dtypes, strides, the mask's structure and the engine asked for, ``use_engine``
scopes included: ``split_k.traced_call``) calls that kernel's own operator instead,
with no Python between the compiled graph and the kernel:

    torch.ops.dotattn.split_k(q, k, v, lo, hi, scale, softcap, parts_per_thread, min_part_keys,
                              mask_tensors, mask_spec, enable_gqa) -> out, lse   (no autograd)

A call on CUDA tensors that the triton engine's prefill kernels would run, with no mask or a
mask of row spans and no dropout, calls those kernels as ``torch.library.triton_op``s
(``dotattn.engines.triton.ops``), which Inductor compiles with the rest of the graph.

The traced code reads no tensor data: the mask reaches the operator as its structure, a
string (``Mask.spec``), and its tensors; the dropout seed as a tensor drawn in the graph.
Everything that reads data runs inside the operator, eagerly, on the real tensors: the
argument checks, the engine choice (``engine``, "auto" included, with ``needs_grad`` standing
in for the inputs' requires_grad, so forward and backward choose alike), the mask's tile
classification, the NaN/inf policy and split_k's fallback. A bad argument therefore raises
when the compiled function first runs, not while it is traced.

Limits under compile: ``return_weights`` (an O(Lq·Lk) result, the eager path computes it)
and a dropout ``generator`` (the seed is drawn from torch's default generator in the graph)
raise; ``masks.view`` is not supported (ring attention runs eagerly).
"""

from __future__ import annotations

import functools
import math

import torch

from dotattn import engines, masks
from dotattn.engines.registry import traced_request
from dotattn.engines.split_k import traced_call
from dotattn.engines.triton import ops as triton_ops
from dotattn._inputs import lse_dtype, prepare

__all__ = ["attention", "limits"]


def limits(mask: masks.Mask | None, dropout_p: float, generator: torch.Generator | None,
           return_weights: bool, score_mod: object = None) -> list[str]:
    """Why a call with these arguments cannot run under torch.compile or torch.export, as
    sentences that say what to do instead (empty when it can). The traced call raises the
    first; ``dotattn.explain`` lists them all."""
    found = []
    if return_weights:
        found.append("return_weights=True is not supported (the weights are an (Lq, Lk) tensor the fused engines "
                     "never form); compute them eagerly, e.g. in a function wrapped with torch.compiler.disable")
    if generator is not None and dropout_p > 0:
        found.append("dropout with a generator= is not supported (the generator's state cannot be read while "
                     "tracing); leave generator=None and seed torch's default generator with torch.manual_seed(...)")
    if score_mod is not None:
        found.append("score_mod= is not supported (a Python function cannot cross into the operator); run this "
                     "call eagerly (torch.compiler.disable), or express the bias as a float mask")
    if mask is not None:
        try:
            mask.spec([])
        except NotImplementedError as e:
            found.append(f"the mask cannot cross into the operator: {e}; run this call eagerly "
                         "(torch.compiler.disable)")
    return found


@functools.lru_cache(maxsize=256)
def _template(spec: str):
    """The mask a spec describes, as a function of its tensors (specs are made by Mask.spec)."""
    code = compile(spec, "<dotattn mask spec>", "eval")
    return lambda tensors: eval(code, {"__builtins__": {}, "masks": masks, "T": tensors})


def _problem(q, k, v, mask_tensors, mask_spec, scale, dropout_p, seed, enable_gqa, needs_grad, softcap):
    mask = _template(mask_spec)(list(mask_tensors)) if mask_spec else None
    p = prepare(q, k, v, None, dropout_p, False, None if scale < 0 else scale, enable_gqa, mask=mask,
                return_lse=True, softcap=softcap or None)
    # What the traced call decided stands in for what these tensors (which need no grad
    # inside an operator) would say, and the seed drawn in the graph for the generator.
    return p.settle(requires_grad=needs_grad, dropout_seed=int(seed))


@torch.library.custom_op("dotattn::attention", mutates_args=())
def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_tensors: list[torch.Tensor], mask_spec: str,
    scale: float, dropout_p: float, seed: torch.Tensor, enable_gqa: bool, engine: str, needs_grad: bool,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    p = _problem(q, k, v, mask_tensors, mask_spec, scale, dropout_p, seed, enable_gqa, needs_grad, softcap)
    out, lse = engines.select(p, engine).forward(p)
    return (out.reshape(*p.batch_shape, p.Hq, p.Lq, p.Ev).to(p.dtype),
            lse.reshape(*p.batch_shape, p.Hq, p.Lq).to(lse_dtype(p.dtype)))


def _batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
    return tuple(torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3]))


def _empty_result(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _batch(q, k, v)
    Hq, Lq, Ev = q.shape[-3], q.shape[-2], v.shape[-1]
    return q.new_empty(*batch, Hq, Lq, Ev), q.new_empty(*batch, Hq, Lq, dtype=lse_dtype(q.dtype))


@_attention.register_fake
def _(q, k, v, mask_tensors, mask_spec, scale, dropout_p, seed, enable_gqa, engine, needs_grad, softcap):
    return _empty_result(q, k, v)


# The split-K kernel as its own operator, which a compiled decoding step calls with no Python
# in between (``attention`` below decides while tracing): its kernel is csrc/split_k.cpp's
# split_k_op, registered for CPU by the kernel level dotattn loads (its register_ops). lo, hi:
# row spans (Mask.row_spans) or None; parts_per_thread, min_part_keys: how the keys are cut
# (SplitKEngine). Where some row saw garbage, the kernel reruns the problem (mask_tensors,
# mask_spec) as dotattn::attention on the tiled engine, as the split_k engine does.
_LIBRARY = torch.library.Library("dotattn", "FRAGMENT")
_LIBRARY.define("split_k(Tensor q, Tensor k, Tensor v, Tensor? lo, Tensor? hi, float scale, float softcap, "
                "int parts_per_thread, int min_part_keys, Tensor[] mask_tensors, str mask_spec, bool enable_gqa) "
                "-> (Tensor, Tensor)")


_SPLIT_K = torch.ops.dotattn.split_k  # looked up once: a compiled call pays a guard per attribute it reads


@torch.library.register_fake("dotattn::split_k")
def _(q, k, v, lo, hi, scale, softcap, parts_per_thread, min_part_keys, mask_tensors, mask_spec, enable_gqa):
    return _empty_result(q, k, v)


@torch.library.custom_op("dotattn::attention_backward", mutates_args=())
def _attention_backward(
    d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    mask_tensors: list[torch.Tensor], mask_spec: str, scale: float, dropout_p: float, seed: torch.Tensor,
    enable_gqa: bool, engine: str, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    p = _problem(q, k, v, mask_tensors, mask_spec, scale, dropout_p, seed, enable_gqa, True, softcap)
    N = math.prod(p.batch_shape)
    floats = [t for t in mask_tensors if t.is_floating_point()]
    dq, dk, dv, d_biases = engines.select(p, engine).backward(
        p, out.reshape(N, p.Hq, p.Lq, p.Ev), lse.reshape(N, p.Hq, p.Lq), d_out.reshape(N, p.Hq, p.Lq, p.Ev),
        bias_grads=bool(floats))
    # one gradient per float mask tensor: the float tensors are the mask's bias leaves
    leaves = [] if p.mask is None else p.mask.biases()
    by_tensor = {id(leaf.tensor): g for leaf, g in zip(leaves, d_biases) if g is not None}
    d_floats = [by_tensor[id(t)].to(t.dtype) if id(t) in by_tensor else torch.zeros_like(t) for t in floats]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_floats


@_attention_backward.register_fake
def _(d_out, q, k, v, out, lse, mask_tensors, mask_spec, scale, dropout_p, seed, enable_gqa, engine, softcap):
    floats = [torch.empty_like(t) for t in mask_tensors if t.is_floating_point()]
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), floats


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask_tensors, mask_spec, scale, dropout_p, seed, enable_gqa, engine, _, softcap = inputs
    ctx.save_for_backward(q, k, v, *output, seed, *mask_tensors)
    ctx.args = (mask_spec, scale, dropout_p, enable_gqa, engine, softcap)
    ctx.floats = [t.is_floating_point() for t in mask_tensors]


def _backward(ctx, d_out: torch.Tensor, _d_lse: torch.Tensor):
    q, k, v, out, lse, seed, *mask_tensors = ctx.saved_tensors
    mask_spec, scale, dropout_p, enable_gqa, engine, softcap = ctx.args
    dq, dk, dv, d_floats = torch.ops.dotattn.attention_backward(
        d_out, q, k, v, out, lse, mask_tensors, mask_spec, scale, dropout_p, seed, enable_gqa, engine, softcap)
    d_floats = iter(d_floats)
    d_mask = [next(d_floats) if is_float else None for is_float in ctx.floats]
    return dq, dk, dv, d_mask, None, None, None, None, None, None, None, None


_attention.register_autograd(_backward, setup_context=_setup_context)


def attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: masks.Mask | None, dropout_p: float,
    scale: float | None, enable_gqa: bool, engine: str, generator: torch.Generator | None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One call as the operator: out (*batch, Hq, Lq, Ev) and lse (*batch, Hq, Lq). Reads no
    tensor data, so it traces as one node; ``mask`` is everything ANDed (attn_mask, is_causal, mask)."""
    tensors: list[torch.Tensor] = []
    spec = "" if mask is None else mask.spec(tensors)
    if not dropout_p:
        requested = traced_request(engine)
        # a decoding step: the kernel's own operator, no Python when it runs
        arguments = traced_call(query, key, value, mask, scale, softcap, enable_gqa, requested)
        if arguments is not None:
            return _SPLIT_K(query, key, value, *arguments, tensors, spec, enable_gqa)
        # CUDA: the Triton kernels as operators Inductor sees into
        arguments = triton_ops.traced_call(query, key, value, mask, scale, softcap, enable_gqa, requested)
        if arguments is not None:
            return torch.ops.dotattn.triton_attention(query, key, value, *arguments)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, *tensors))
    seed = (torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if dropout_p > 0
            else torch.zeros((), dtype=torch.int64))
    return torch.ops.dotattn.attention(query, key, value, tensors, spec, -1.0 if scale is None else float(scale),
                                       float(dropout_p), seed, enable_gqa, engine, needs_grad,
                                       0.0 if softcap is None else float(softcap))

