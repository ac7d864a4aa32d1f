"""The transformers integration: dotattn as an ``attn_implementation``.

    import dotattn.hf
    name = dotattn.hf.register()
    model = AutoModel.from_pretrained(path, attn_implementation=name)

``register`` installs two functions under one name, as transformers needs both:

``attention_forward`` (transformers' ``AttentionInterface``), called by every attention layer:
    query: (B, Hq, Lq, E)   key: (B, Hkv, Lk, E)   value: (B, Hkv, Lk, Ev)
    attention_mask: what ``build_mask`` returned (a ``dotattn.masks`` mask, a bool tensor
    (B, 1, Lq, Lk) or None), or a 4-D tensor the caller passed itself (bool or additive float)
    returns (attn_output (B, Lq, Hq, Ev), attn_weights (B, Hq, Lq, Lk) or None), the layout
    of transformers' own ``sdpa_attention_forward``. GQA runs with ``enable_gqa``, never
    copying K and V; the weights come back when the model is called with
    ``output_attentions=True``, which transformers forwards to the layers as a keyword (it
    refuses ``config.output_attentions`` for any implementation but "eager").

``build_mask`` (transformers' ``AttentionMaskInterface``), called once per forward with the
sizes and the 2-D padding mask (B, kv) instead of transformers' dense (B, 1, Lq, Lk) mask.
For transformers' plain causal and bidirectional masks it returns a structured mask, so the
tiled engine skips masked tiles and needs no mask memory:

    causal, no cache or a DynamicCache   causal(top_left) or causal(bottom_right)
    padding that is one run per row      & padding(lengths) (right) or padding(lengths, side="left")
    padding with holes                   & dense((B, 1, 1, Lk)), one row shared by every query
    bidirectional without padding        None (no mask), when transformers allows skipping it

Sliding windows, chunks, packed sequences, image-block overlays and and/or combinations of
those are read from transformers' mask function and arrive structured too (``_structured``);
any other index-based mask function is evaluated tile by tile (``masks.from_mask_mod``).
Static caches (a tensor offset) and callers that ask for a materialised mask, which they may
then edit as a tensor, get transformers' own ``sdpa_mask``, so it means exactly what it means
for "sdpa"; where each of its rows is one run of keys (a static cache's: causal, left padding,
the unfilled slots), dotattn reads the runs from the tensor and skips the rest. As with
"sdpa", a None mask means ``is_causal`` (the argument, else ``module.is_causal``) decides,
top-left aligned, for more than one query.

Differences from "sdpa": a query row that sees no key (a left-padding position) gives zeros,
never NaN; dropout uses dotattn's own reproducible pattern, not torch's.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
import operator
from collections.abc import Callable

import torch

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )
except ImportError as e:
    raise ImportError(f"dotattn.hf needs transformers ({e}); install it with: pip install 'dotattn[hf]'") from e

from dotattn import diagnostics, engines, masks
from dotattn._text import table
from dotattn.functional import OBSERVER, scaled_dot_product_attention

__all__ = ["LayerCall", "MonitorCallback", "attention_forward", "build_mask", "explain", "register"]

# Older transformers size masks by cache_position instead, which build_mask does not read.
if "q_length" not in inspect.signature(sdpa_mask).parameters:
    raise ImportError(
        f"dotattn.hf needs a transformers whose sdpa_mask takes q_length and q_offset (5.x); "
        f"found {transformers.__version__}: pip install -U transformers"
    )


def register(name: str = "dotattn") -> str:
    """Register dotattn with transformers under ``name`` and return it; calling it again is harmless.

    Both registries are class-wide, so every model loaded afterwards can use
    ``attn_implementation=name``, and ``model.set_attn_implementation(name)`` switches a loaded one.
    """
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, build_mask)
    return name


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: masks.Mask | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One attention layer, for transformers. See the module docstring for the shapes.

    kwargs used: ``output_attentions`` (return the weights), ``position_bias``
    (B or 1, Hq or 1, Lq, Lk), an additive float bias as in T5, added like the "sdpa" path adds
    it, and ``softcap`` (Gemma 2's ``attn_logit_softcapping``), which dotattn applies itself.
    """
    if kwargs.get("s_aux") is not None:
        raise ValueError(
            f"dotattn cannot apply attention sinks (s_aux={kwargs['s_aux']!r}); "
            'load this model with attn_implementation="eager" instead'
        )
    attn_mask, mask = None, None
    if isinstance(attention_mask, masks.Mask):
        mask = attention_mask
    else:
        attn_mask = attention_mask
    # As in "sdpa": a given mask is complete, and without one is_causal decides; a single query
    # (decoding) sees every key, which top-left causal would hide.
    if attention_mask is None:
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        is_causal = bool(query.shape[2] > 1 and is_causal)
    else:
        is_causal = False
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        bias = masks.dense(position_bias)
        mask = bias if mask is None else mask & bias

    output_attentions = bool(kwargs.get("output_attentions", False))
    result = scaled_dot_product_attention(
        query, key, value, attn_mask,
        dropout_p=dropout if module.training else 0.0,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
        mask=mask,
        return_weights=output_attentions,
        softcap=kwargs.get("softcap"),
    )
    output, weights = (result.output, result.weights) if output_attentions else (result, None)
    return output.transpose(1, 2).contiguous(), weights  # (B, Lq, Hq, Ev)


def build_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> masks.Mask | torch.Tensor | None:
    """The mask of one forward, for transformers; the arguments are those of transformers' ``sdpa_mask``.

    Query i sits at position q_offset + i and key j at kv_offset + j; attention_mask (B, >= kv)
    bool marks the real keys (True), by position. Returns a ``dotattn.masks`` mask, None, or
    the bool tensor (B, 1, Lq, Lk) of ``sdpa_mask``; see the module docstring for which.
    """
    args = dict(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs,
    )
    # A caller that forbids skipping a plain causal or bidirectional mask wants a tensor it may
    # edit (Falcon adds ALiBi to it, Longformer slices it back to 2-D), so it gets the one "sdpa"
    # would get. transformers itself forbids it for the composite masks (windows, chunks,
    # packing, overlays), which are recognised below whatever the flag says.
    if mask_function is causal_mask_function and not kwargs.get("allow_is_causal_skip", True):
        return sdpa_mask(**args)
    if _building_ahead_for_generate():
        return sdpa_mask(**args)
    if mask_function is bidirectional_mask_function and not kwargs.get("allow_is_bidirectional_skip", False):
        return sdpa_mask(**args)
    try:
        base = _structured(mask_function, q_length, kv_length, q_offset, kv_offset)
    except _Unrecognised:
        base = _tile_by_tile(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset,
                             kwargs.get("device"))
        if base is None:
            return sdpa_mask(**args)

    padding = None
    if attention_mask is not None:
        real = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
        padding = _padding(real.bool())
    if base is None:
        return padding
    return base if padding is None else base & padding


def _building_ahead_for_generate() -> bool:
    """Whether transformers' ``create_masks_for_generate`` asks: generate() with a static cache
    builds the masks before the forward, which then passes on only a tensor (or a dict of them)
    and would take any other object for a 2-D padding mask. Such a caller gets the tensor.
    Not asked while compiling (dynamo cannot trace frames; generate() builds those masks
    eagerly anyway)."""
    if torch.compiler.is_compiling():
        return False
    frame = sys._getframe(2)
    for _ in range(6):  # build_mask <- create_*_mask <- create_masks_for_generate, give or take wrappers
        if frame is None:
            return False
        if frame.f_code.co_name == "create_masks_for_generate":
            return True
        frame = frame.f_back
    return False


class _Unrecognised(Exception):
    """A mask function that has no dotattn structure here: transformers' own tensor is used."""


def _closure(fn: Callable) -> dict:
    """The variables a transformers mask function closes over, by name."""
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def _tile_by_tile(fn: Callable, B: int, Lq: int, Lk: int, q_offset: int | torch.Tensor, kv_offset: int,
                  device: torch.device | str | None) -> masks.Mask | None:
    """Any other mask function as ``masks.from_mask_mod``, evaluated at its positions tile by tile;
    None when it is not index-based (it fails on broadcasting index tensors) or the offset is a
    tensor (a static cache)."""
    if isinstance(q_offset, torch.Tensor):
        return None
    mask = masks.from_mask_mod(lambda b, h, q, kv: fn(b, h, q + q_offset, kv + kv_offset), B, 1, Lq, Lk, device)
    try:
        mask.tile(Lq, Lk, 0, min(Lq, 1), 0, Lk)  # one row: does it evaluate on index tensors?
    except Exception:  # noqa: BLE001  any failure means: not index-based; transformers' tensor serves
        return None
    return mask


def _structured(fn: Callable, Lq: int, Lk: int, q_offset: int | torch.Tensor, kv_offset: int) -> masks.Mask | None:
    """transformers' mask function over query positions q_offset + i and key positions
    kv_offset + j as a dotattn mask on (Lq, Lk); None when it allows every pair.

    Recognised: causal and bidirectional, the sliding-window overlays (causal and
    bidirectional), the chunked overlay, packed sequences (with their position remapping),
    blockwise overlays (image blocks), and and_masks / or_masks of those. Positional patterns
    depend on q position - kv position = i - j + (q_offset - kv_offset), which is dotattn's
    top_left alignment when the offsets are equal (no cache) and bottom_right when the queries
    are the last keys (a DynamicCache, a sliding-window cache); other offsets raise
    _Unrecognised, as does anything else.
    """
    if isinstance(q_offset, torch.Tensor):
        # Static caches give the offset as a tensor so that compiled graphs do not depend on
        # its value; reading it here would break that.
        raise _Unrecognised
    shift = q_offset - kv_offset

    def align() -> str:
        if shift == 0:
            return "top_left"
        if shift == Lk - Lq:
            return "bottom_right"
        raise _Unrecognised

    def ids(t: torch.Tensor, offset: int, L: int) -> torch.Tensor:  # (B, >= offset + L) by position
        if t.shape[-1] < offset + L:
            raise _Unrecognised
        return t[:, offset:offset + L]

    name = getattr(fn, "__qualname__", "")
    if fn is causal_mask_function:
        return masks.causal(align=align())
    if fn is bidirectional_mask_function:
        return None
    cells = _closure(fn) if hasattr(fn, "__code__") else {}
    if name.startswith("sliding_window_overlay."):  # kv > q - w: up to w - 1 keys back, any ahead
        return masks.sliding_window(cells["sliding_window"] - 1, max(Lq, Lk), align=align())
    if name.startswith("sliding_window_bidirectional_overlay."):  # |q - kv| <= w
        w = cells["sliding_window"]
        return masks.sliding_window(w, w, align=align())
    if name.startswith("chunked_overlay."):  # the same chunk of chunk_size, counted from a row's first real token
        size, left = cells["chunk_size"], cells["left_padding"]
        q_pos = torch.arange(q_offset, q_offset + Lq, device=left.device)
        kv_pos = torch.arange(kv_offset, kv_offset + Lk, device=left.device)
        # Positions before a row's first token fall in negative chunks, which dotattn's documents
        # hide; they are that row's left padding, which the padding mask hides anyway.
        return masks.documents((q_pos - left[:, None]) // size, (kv_pos - left[:, None]) // size)
    if name.startswith("blockwise_overlay."):  # the same block, and a block id >= 0
        block = cells["block_sequence_ids"]
        return masks.documents(ids(block, q_offset, Lq), ids(block, kv_offset, Lk))
    if name.startswith("packed_sequence_mask_function."):  # the same packed sequence (ids >= 0)
        packed = cells["packed_sequence_mask"]
        return masks.documents(ids(packed, q_offset, Lq), ids(packed, kv_offset, Lk))
    if name.startswith(("and_masks.", "or_masks.")):
        parts = list(cells["mask_functions"])
        if name.startswith("and_masks."):
            # Packed sequences remap positions to each sequence's own, which moves every pair of
            # one sequence by the same amount (a sequence's positions count up by 1): a pattern
            # of position differences is unchanged on the pairs the packing mask allows.
            packed = any(getattr(f, "__qualname__", "").startswith("packed_sequence_mask_function.") for f in parts)
            parts = [_closure(f)["mask_function"] if packed and getattr(f, "__qualname__", "").startswith(
                "remap_positions_for_packed_sequence.") else f for f in parts]
        terms = [_structured(f, Lq, Lk, q_offset, kv_offset) for f in parts]
        if name.startswith("and_masks."):
            kept = [t for t in terms if t is not None]
            window = next((t for t in kept if isinstance(t, masks.SlidingWindow) and t.after >= max(Lq, Lk)), None)
            causal = next((t for t in kept if isinstance(t, masks.Causal)), None)
            if window is not None and causal is not None and window.align == causal.align:
                # Mistral's window: the overlay and causal as one band, before keys back and none ahead
                kept = [masks.sliding_window(window.before, 0, align=window.align)] + [
                    t for t in kept if t is not window and t is not causal]
            return functools.reduce(operator.and_, kept) if kept else None
        if any(t is None for t in terms):
            return None
        return functools.reduce(operator.or_, terms)
    raise _Unrecognised


def _padding(real: torch.Tensor) -> masks.Mask | None:
    """Which keys hold real tokens, real (B, Lk) bool, as a dotattn mask; None when all do.
    Under torch.compile the pattern is not read (that would break the graph): the keys then
    arrive as a (B, 1, 1, Lk) tensor mask, exact for any pattern, without padding's spans."""
    if torch.compiler.is_compiling():
        return masks.dense(real[:, None, None, :])
    if bool(real.all()):
        return None
    lengths = real.sum(dim=-1)
    rises = bool((~real[:, :-1] & real[:, 1:]).any())  # a pad followed by a real token
    falls = bool((real[:, :-1] & ~real[:, 1:]).any())  # a real token followed by a pad
    if not rises:
        return masks.padding(lengths)
    if not falls:
        return masks.padding(lengths, side="left")
    return masks.dense(real[:, None, None, :])  # (B, 1, 1, Lk): holes, one row for every query


@dataclass(frozen=True)
class LayerCall:
    """One attention call of a model's forward: the module that made it, its sizes, the mask
    it got, and the engine that ran it (with how, and why the others did not)."""

    layer: str
    shape: str
    mask: str
    explanation: engines.Explanation


def explain(model: torch.nn.Module, **inputs) -> list[LayerCall]:
    """Run ``model(**inputs)`` once, without gradients, print a line per attention call (the
    layer, q/k shapes, the mask as dotattn got it, the engine and how it ran), and return them.
    The model must be loaded with dotattn's attn_implementation (``register``)."""
    calls: list[LayerCall] = []
    running: list[str] = []

    class _Recorder:
        recording = True

        def record(self, problem, result) -> None:
            shape = f"q {tuple(problem.query.shape)} k {tuple(problem.key.shape)}"
            calls.append(LayerCall(running[-1] if running else "?", shape, repr(problem.mask),
                                   engines.explain_problem(problem)))

    def entering(name: str):
        def hook(module, args) -> None:
            running.append(name or "model")
        return hook

    def leaving(module, args, output) -> None:  # a hook that returned something would replace the output
        running.pop()

    hooks = []
    for name, module in model.named_modules():
        hooks += [module.register_forward_pre_hook(entering(name)), module.register_forward_hook(leaving)]
    token = OBSERVER.set(_Recorder())
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        OBSERVER.reset(token)
        for hook in hooks:
            hook.remove()
    rows = [[c.layer, c.shape, c.mask, f"{c.explanation.engine}: {c.explanation.detail or ''}".rstrip(": ")]
            for c in calls]
    print(table(["layer", "shapes", "mask", "engine"], rows))
    return calls


class MonitorCallback(transformers.TrainerCallback):
    """A transformers ``TrainerCallback`` that records the model's attention every ``every``
    optimizer steps with a :class:`dotattn.diagnostics.Monitor`, numbered by the trainer's
    ``global_step``, and hands each recorded step to the monitor's exporters and watch:

        monitor = Monitor(every=50).to_tensorboard(writer).watch(entropy_below=0.1, logit_growth=5.0)
        trainer = Trainer(model, args, train_dataset=data, callbacks=[dotattn.hf.MonitorCallback(monitor)])

    ``monitor``: a Monitor without a model (the callback gives it the trainer's model and ends
    each step itself); default ``Monitor(every=every)``. The model must run dotattn's
    ``attn_implementation`` (``register``). Calls made by evaluation during training count
    towards the step in which it runs."""

    def __init__(self, monitor: diagnostics.Monitor | None = None, *, every: int = 50) -> None:
        self.monitor = diagnostics.Monitor(every=every) if monitor is None else monitor
        if self.monitor.model is not None or self.monitor.steps != "manual":
            raise ValueError("MonitorCallback gives the monitor the trainer's model and ends its steps: "
                             "pass a Monitor built without a model (Monitor(every=...))")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.monitor.model = model
        self.monitor.__enter__()
        self.monitor.step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.monitor.step(state.global_step)  # ends the step just taken; the next has this number

    def on_train_end(self, args, state, control, **kwargs):
        self.monitor.__exit__(None, None, None)
        self.monitor.model = None
