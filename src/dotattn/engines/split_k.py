"""The split-K engine ("flash-decoding"): few queries against a key/value cache.

Decoding asks for one query (or a few) per head against up to thousands of cached keys. The
tiled engine gives each query head a task of its own, so every one of them reads its kv
head's keys and values again (Hq/Hkv times per step), and a GEMM over one or a few query
rows is mostly call overhead. This engine runs the compiled kernel's ``split_k_attention``
(``csrc/split_k.cpp``) instead, one call per step from stacking to merge, so a step
against a short cache pays little Python:

    rows     the G = Hq/Hkv query heads of a kv head stacked into G·Lq rows, so each key
             and value is read from memory once per step, for every row
    parts    the keys some row may attend, [min lo, max hi) per (batch, kv head), cut into
             S equal parts; tasks (batch x kv head x part) run in parallel, so one
             sequence with one kv head still fills every thread
    merge    each part's output and lse, merged by lse in float32 (float64 for float64)

The mask reaches the kernel as row spans (``Mask.row_spans``: causal in both alignments,
left or right padding, windows, and their combinations; a KV cache's decoding mask is
one). Keys outside every row's span, such as a left-padded row's padding, are never read:
the parts cover only the keys some row sees, so a part the mask's block map calls EMPTY
does not exist. Within a part a key outside a row's span meets that row only as weight
0: its score is never read, and its value (read for the row's block of four) adds
0 · value, which is NaN only when the value is garbage. Garbage that some row may see, or
that reaches an output that way, makes the kernel's output NaN, and the problem then
reruns on the tiled engine, which marks exactly the rows that saw it; no pass over the
cache looks for NaN beforehand (it would read the cache a second time per step).
The engine that reruns it, like every fallback below, is the one the registry would pick
with the split-K engines left out (``select(problem, exclude=...)``): tiled on CPU, triton on CUDA.

CUDA tensors run the same plan as two Triton kernels (``triton/_decode.py``): one program
per (part, batch x kv head, block of rows), then a merge; garbage shows the same way, and
reruns on the fallback. Not yet run on a GPU: tested in Triton's interpreter and
compiled for sm_90/sm_80 (tests/test_triton_compile.py).

A decoding step's usual eager call (no mask, or the causal and padding masks a KV cache
gives; nothing else asked for) skips ``prepare`` and the registry: ``eager_step`` hands it to
the kernel's ``split_k_step``, one C++ call that checks the three tensors' headers as they
would, builds the row spans and runs the kernel, or answers None, and the call takes the full
path. A cold 16-key step then costs less than torch SDPA's (docs/decoding.md).

Where auto stops giving split-K rows depends on the CPU as well as the kernel's level: above
AUTO_SURE_ROWS it times both engines once per process (``probe``).

For a monitored problem (``Problem.stats``) both kernels also leave each row's statistics in
``problem.derived["row_stats"]``: each part adds up its rows' figures and the merge combines
them by lse, as it does the outputs.

The split-K kernels are forward only. A problem whose inputs require grad runs on the
fallback engine, forward and backward: a flash-style
backward recomputes P = exp(s - lse) from its own scores, and scores rounded in other
ways than the forward's lse was (split-K's own dot products) doubled its dq error at a
peaked softmax (benchmarks/numerics.py --peaked). So do the problems the kernels do not
take (dropout, the weights, a float or span-less mask, empty inputs, a build without the
kernel); ``explain`` says so, and ``engine="auto"`` passes over this engine for them.

Shape legend: N flattened batch, Hq/Hkv heads, G = Hq/Hkv, Lq/Lk lengths, E head dim,
Ev value dim, R = G·Lq rows per kv head, S parts.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
# names, not torch.*: a compiled call guards each module it reaches by two paths
from torch import is_grad_enabled
from torch.fx.experimental.symbolic_shapes import statically_known_true

from dotattn import masks
from dotattn._inputs import Problem, prepare
from dotattn.engines import _tiled_kernel
from dotattn.engines.base import Engine, Support
from dotattn.engines.registry import available, first_choice, generation, get, register, select
from dotattn.engines.triton import configs as triton_configs
from dotattn.engines.triton import launch as triton_kernels

# Why this build cannot run the split-K kernel (None when it can), decided once.
_MISSING = _tiled_kernel.MISSING or (
    None if hasattr(_tiled_kernel.ext, "split_k_attention") else
    "the compiled kernel predates split_k_attention; rebuild it: "
    "pip install --no-build-isolation -e ."
)
# rows -> tiled's time over split_k's there on this CPU (SplitKEngine.probe), once measured.
_PROBED: dict[int, float] = {}
# The masks whose row spans are tensor ops on their own parameters alone, which traced_spans
# takes (ANDed): a compiled graph derives them as it runs.
_SPANNED = (masks.Causal, masks.SlidingWindow, masks.Padding, masks.PrefixLM)


class SplitKEngine(Engine):
    name = "split_k"
    description = ("flash-decoding for few queries against a KV cache: keys split into parts run in "
                   "parallel and merged by lse; a kv head's query heads share each key read")
    priority = 20  # tried before tiled; auto_skip hands it what has more rows per kv head than auto_max_rows

    # Where auto picks split-K over the tiled engine, per level of the CPU kernel that runs
    # (benchmarks/decode.py --crossover: decoding steps of 1 to 256 rows per kv head against
    # 16 to 16k keys, and self-attention of batches of short sequences, full, causal and
    # padded; warm and cold). AVX-512 on an AMD EPYC: split-K was faster in every case up to
    # 128 rows (1.05-9.8x); at 256, 768 causal heads of E 32 ran 0.86x. The same build on an
    # Intel Xeon, whose BLAS gives the tiled engine's GEMM tiles more: tiled won from 128 rows
    # (split-K 0.65-0.93x warm) and ran close at 64 (0.79-1.02x warm, 0.95-1.35x cold). The
    # AVX2 build (run on an AVX-512 CPU, whose BLAS kept AVX-512): 1.01-8.5x up to 64 rows but
    # 0.96x for 768 heads of E 32 without a mask; at 128 those ran 0.94x. Baseline and CUDA keep
    # the old 32, untimed.
    AUTO_MAX_ROWS = {"avx512": 128, "avx2": 64, "baseline": 32}
    # Up to this many rows split-K ran at least close to tiled on every CPU measured; above it,
    # up to the level's AUTO_MAX_ROWS, auto keeps split-K only where a probe on this CPU finds it
    # faster there (``probe``, once per process).
    AUTO_SURE_ROWS = 64
    # Parts per thread (CPU) or per streaming multiprocessor (CUDA), so that the scheduler
    # evens out uneven parts, and the fewest keys worth a part of its own.
    PARTS_PER_THREAD = 4
    PARTS_PER_SM = 4
    MIN_PART_KEYS = 256

    def __init__(self, kernel: str = "auto") -> None:
        """kernel: "auto" (the compiled C++ kernel for CPU tensors, the Triton kernels for CUDA
        ones) or "triton" (always; CPU tensors then need Triton's interpreter, for tests)."""
        if kernel not in ("auto", "triton"):
            raise ValueError(f"kernel must be 'auto' or 'triton', got {kernel!r}")
        self.kernel = kernel
        # CPU tensors run the C++ kernel, CUDA tensors the Triton ones, each in its dtypes
        self._both = Support(devices=("cpu", "cuda"), dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64),
                             dtypes_on={"cpu": (torch.float32, torch.bfloat16, torch.float64),
                                        "cuda": triton_kernels.support().dtypes},
                             softcap=True, score_mod=True)  # the C++ kernel's; the split-K Triton kernels' reason is in extra_reasons

    @property
    def support(self) -> Support:
        """Both kernels' (``kernel="auto"``), or the Triton kernels' alone, which in Triton's
        interpreter take CPU tensors too."""
        if self.kernel == "triton":  # the split-K Triton kernels do not soft-cap
            return dataclasses.replace(triton_kernels.support(), softcap=False)
        return self._both

    def _on_triton(self, problem: Problem) -> bool:
        return self.kernel == "triton" or problem.device_type == "cuda"

    def extra_reasons(self, problem: Problem) -> list[str]:
        p = problem
        if not self._on_triton(p):
            return []
        reasons = triton_kernels.unavailable(p)  # triton missing, or compiled for the GPU in a test
        limit = triton_kernels.support().max_head_dim
        if self.kernel == "auto" and max(p.E, p.Ev) > limit:
            reasons.append(f"head dim {max(p.E, p.Ev)} is above the Triton kernels' limit {limit}")
        if p.softcap:
            reasons.append(f"softcap={p.softcap} is not supported by the split-K Triton kernels (the CPU kernel "
                           "and the triton engine take it)")
        return reasons

    def fallback(self, problem: Problem) -> Engine:
        """The engine that runs what the kernels do not take: the registry's choice with the
        split-K engines left out (tiled on CPU, triton on CUDA), or the triton engine for
        ``kernel="triton"``, whose kernels it shares (in Triton's interpreter, for tests)."""
        split_k = tuple(e.name for e in available() if isinstance(e, SplitKEngine))  # this one, and any variant
        return select(problem, "triton" if self.kernel == "triton" else "auto", exclude=split_k)

    def fallback_reason(self, problem: Problem) -> str | None:
        """Why ``problem`` runs on ``fallback`` rather than a split-K kernel; None when it does not."""
        p = problem
        if not self._on_triton(p) and _MISSING is not None:
            return _MISSING
        if 0 in (math.prod(p.batch_shape), p.Hq, p.Lq, p.Lk, p.E, p.Ev):
            return "the problem is empty"
        if p.dropout_p > 0:
            return "dropout is keyed to each (head, query, key), which the split-K kernels do not draw"
        if p.return_weights:
            return "the weights are asked for, which need an (Lq, Lk) pass anyway"
        if p.score_mod is not None:
            return "score_mod= is a Python function, which the split-K kernels cannot call"
        if p.requires_grad:
            return ("an input requires grad: the backward recomputes the scores as its engine's forward "
                    "computes them, and split-K's own dot products round differently (at a peaked softmax "
                    "that doubled the dq error: benchmarks/numerics.py --peaked)")
        if p.mask is not None and p.row_spans is None:
            return "the mask is not one span of keys per query (a float, dense or block mask)"
        return None

    def auto_skip(self, problem: Problem, after: tuple[str, ...] | None = None) -> str | None:
        p = problem
        if after == ():  # nothing else would run it
            return None
        why = self.fallback_reason(p)
        if why is not None:
            return f"it would run on the {self.fallback(p).name} engine anyway, because {why}"
        rows, most = p.Hq // p.Hkv * p.Lq, self.auto_max_rows(p.device_type)
        if rows > most:
            timed = [f"; timed on this CPU at {n} rows, split_k ran {1 / ratio:.2f}x tiled's time"
                     for n, ratio in _PROBED.items() if n > most and not self._on_triton(p)]
            return (f"{rows} query rows per kv head (Hq/Hkv·Lq) is more than {most}: "
                    f"the {self.fallback(p).name} engine's GEMM tiles are faster{''.join(timed)}; "
                    "engine='split_k' forces it")
        return None

    def auto_max_rows(self, device_type: str, probe: bool = True) -> int:
        """The most query rows per kv head that auto runs here on ``device_type`` (see
        AUTO_MAX_ROWS): the loaded CPU kernel's level decides on CPU, and above AUTO_SURE_ROWS
        the probe of this CPU. A probe not yet run counts as lost without ``probe`` (the one-call
        step, whose rows then take the full path, which probes) and while torch.compile traces
        (tracing cannot time kernels: such a call takes the generic operator, which chooses
        when it runs)."""
        if device_type != "cpu" or self.kernel != "auto" or _tiled_kernel.LEVEL not in self.AUTO_MAX_ROWS:
            return min(self.AUTO_MAX_ROWS.values())
        most = self.AUTO_MAX_ROWS[_tiled_kernel.LEVEL]
        if most <= self.AUTO_SURE_ROWS:
            return most
        if most not in _PROBED:
            if not probe or torch.compiler.is_compiling():
                return self.AUTO_SURE_ROWS
            _PROBED[most] = self.probe(most)
        return most if _PROBED[most] >= 1 else self.AUTO_SURE_ROWS

    def probe(self, rows: int) -> float:
        """tiled's time over this engine's (> 1: split-K faster) on a self-attention of ``rows``
        queries and keys (B 2, H 8, E 64, float32, no mask) on this CPU, each engine's fastest
        of six runs, taking turns: about 15 ms. E 64 is where the CPUs measured differed most.
        The inputs are CPU tensors whatever ``torch.device`` scope the first caller is in."""
        g = torch.Generator().manual_seed(0)
        problem = prepare(*(torch.randn(2, 8, rows, 64, generator=g, device="cpu") for _ in range(3)))
        contenders = (self, self.fallback(problem))
        best = [math.inf, math.inf]
        for _ in range(6):
            for i, engine in enumerate(contenders):
                start = time.perf_counter()
                engine.forward(problem)
                best[i] = min(best[i], time.perf_counter() - start)
        return best[1] / best[0]

    def parts(self, problem: Problem) -> int:
        """How many parts the keys of each (batch, kv head) are cut into."""
        p = problem
        tasks = math.prod(p.batch_shape) * p.Hkv
        if p.device_type == "cuda":
            slots = self.PARTS_PER_SM * torch.cuda.get_device_properties(p.device).multi_processor_count
            rows = p.Hq // p.Hkv * p.Lq
            tasks *= -(-rows // triton_configs.decode_rows(rows))  # blocks of rows
            return max(1, min(-(-slots // tasks), p.Lk // self.MIN_PART_KEYS))
        return _tiled_kernel.ext.split_k_parts(tasks, p.Lk, self.PARTS_PER_THREAD, self.MIN_PART_KEYS)

    def traced_state(self, dtypes: tuple, devices: tuple, scale: float | None, softcap: float | None,
                     requested: str, needs_grad: bool) -> tuple | None:
        """Under torch.compile, the part of ``traced_call``'s decision that no size enters: None
        where no call without dropout or weights with these facts (q, k, v's dtypes and device
        types, the engine ``requested`` after scopes: ``registry.traced_request``) would run
        this engine's C++ kernel eagerly, else ``(parts_per_thread, min_part_keys, most)``,
        ``most`` the most query rows per kv head it runs (None for a forced engine)."""
        if not traced_numbers(scale, softcap):
            return None  # the generic operator says what is wrong with them
        if _MISSING is not None or self.kernel != "auto" or requested not in ("auto", self.name):
            return None
        if requested == "auto" and available()[0] is not self:  # an engine registered above this one
            return None
        if needs_grad:
            return None  # the spanned masks hold no float tensor that could require grad
        if set(devices) != {"cpu"} or len(set(dtypes)) != 1 or dtypes[0] not in self._both.dtypes_on["cpu"]:
            return None
        # A probe not yet run counts as lost: the graph then keeps the generic operator above
        # AUTO_SURE_ROWS rows, which chooses (and probes) when it runs.
        most = self.auto_max_rows("cpu", probe=False) if requested == "auto" else None
        return self.PARTS_PER_THREAD, self.MIN_PART_KEYS, most

    def detail(self, problem: Problem) -> str:
        p = problem
        why = self.fallback_reason(p)
        if why is not None:
            return f"runs on the {self.fallback(p).name} engine, because {why}"
        kernel = "split-K Triton kernels" if self._on_triton(p) else "split-K kernel"
        return f"{kernel}, {self.parts(p)} part(s) per (batch, kv head), {p.Hq // p.Hkv * p.Lq} query rows per kv head"

    def forward(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
        p = problem
        if self.fallback_reason(p) is not None:
            return self.fallback(p).forward(p)
        if self._on_triton(p):
            out, lse = triton_kernels.split_k_decode(p, self.parts(p))
            garbage = not bool(torch.isfinite(out).all())
        else:
            spans = p.row_spans or (None, None)  # no mask: every row sees every key
            # out (N, Hq, Lq, Ev), lse (N, Hq, Lq) in the compute dtype: new tensors, outside autograd;
            # a monitored problem's row statistics (N, Hq, Lq, 11), computed in the same pass
            out, lse, garbage, row_stats = _tiled_kernel.ext.split_k_attention(
                p.query, p.key, p.value, *spans, p.scale, self.parts(p), p.softcap, p.stats)
            if row_stats is not None:
                p.derived["row_stats"] = row_stats
        if garbage:  # garbage a row may see: the fallback marks exactly those rows (and measures them anew)
            p.derived.pop("row_stats", None)
            return self.fallback(p).forward(p)
        return out, lse

    def backward(self, problem, out, lse, d_out, *, bias_grads=False):
        """Problems that require grad run forward and backward on the fallback (``fallback_reason``)."""
        return self.fallback(problem).backward(problem, out, lse, d_out, bias_grads=bias_grads)


_ENGINE = register(SplitKEngine())
_STEP = None if _MISSING is not None else _tiled_kernel.ext.split_k_step


def eager_step(query, key, value, mask, is_causal, scale, enable_gqa, softcap, engine) -> torch.Tensor | None:
    """A decoding step's usual eager call, run in one call of the compiled kernel
    (``split_k_step`` in csrc/split_k.cpp), which checks the tensors as ``prepare`` and this
    engine would: the output (*B, Hq, Lq, Ev), or None where the call is not that step and the
    full path (prepare, select, run) must decide. The caller has checked that nothing else is
    asked for (dropout, a tensor mask, lse, weights, score_mod, an observer). ``mask`` is None,
    ``masks.causal`` in either alignment, ``masks.padding`` without query lengths, or the two
    ANDed (what a KVCache gives); the other arguments as for ``scaled_dot_product_attention``.
    Reads no tensor data: a cold step pays for each object it touches, and this touches few."""
    if _STEP is None or not type(query) is type(key) is type(value) is torch.Tensor:
        return None
    first, by_auto = first_choice(engine)
    if first is not _ENGINE or not (is_causal is False or is_causal is True):
        return None
    causal, padding = int(is_causal), None
    for part in () if mask is None else mask.children if type(mask) is masks.And else (mask,):
        kind = type(part)
        if kind is masks.Causal and not causal:
            causal = 1 if part.align == "top_left" else 2
        elif kind is masks.Padding and padding is None and part.q_lengths is None:
            padding = part
        else:
            return None
    if not (scale is None or type(scale) is float) or not (softcap is None or type(softcap) is float) \
            or type(enable_gqa) is not bool:
        return None
    return _STEP(query, key, value, scale, softcap, enable_gqa, causal,
                 None if padding is None else padding.kv_lengths, padding is not None and padding.side == "left",
                 _ENGINE.auto_max_rows("cpu", probe=False) if by_auto else -1, _ENGINE.PARTS_PER_THREAD,
                 _ENGINE.MIN_PART_KEYS)


def _traced_state(*facts, generation: int) -> tuple | None:
    """``traced_state(*facts)`` of the registry's split_k engine, called while tracing on plain
    Python values and kept in the graph as a constant: dynamo traces none of the engine state it
    reads, whose guards (dozens, checked before each call) cost a compiled 16-key step a tenth
    of its time. What that state could change is in the arguments (the scope's engine in
    ``facts``, the registry's ``generation``), so the graph is guarded on those alone. Marked
    for dynamo below."""
    return get("split_k").traced_state(*facts)


# What torch.compiler.assume_constant_result(_traced_state) does, without importing torch._dynamo
# (and with it triton, before a test or a user could set TRITON_INTERPRET) when dotattn is imported.
_traced_state._dynamo_marked_constant = True


def traced_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: masks.Mask | None, scale: float | None,
                softcap: float | None, enable_gqa: bool, requested: str) -> tuple | None:
    """Under torch.compile: the arguments after q, k, v with which ``dotattn::split_k`` runs a
    call without dropout or weights, ``(lo, hi, scale, softcap, parts_per_thread,
    min_part_keys)``, when its static facts (shapes, dtypes, devices, the mask's structure, the
    engine ``requested`` after scopes: ``registry.traced_request``) show that an eager call
    would run this engine's C++ kernel; None otherwise, and the generic operator chooses when it
    runs. Reads no tensor data; sizes may be symbolic. q (*B, Hq, Lq, E), k (*B, Hkv, Lk, E),
    v (*B, Hkv, Lk, Ev) as the call passes them; ``mask`` everything ANDed."""
    needs_grad = is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    state = _traced_state((q.dtype, k.dtype, v.dtype), (q.device.type, k.device.type, v.device.type), scale,
                          softcap, requested, needs_grad, generation=generation())
    if state is None:
        return None
    parts_per_thread, min_part_keys, most = state
    sizes = traced_sizes(q, k, v, enable_gqa)
    if sizes is None:
        return None
    batch, Hq, Hkv, Lq, Lk, E, _ = sizes
    if most is not None and not statically_known_true(Hq // Hkv * Lq <= most):
        return None  # a symbolic size is not guarded on, which would recompile at the threshold
    spans = traced_spans(mask, Lq, Lk, (*batch, Hq, Lq), flag_oversized=True)
    if spans is None:
        return None
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    return (*spans, scale, 0.0 if softcap is None else softcap, parts_per_thread, min_part_keys)


def traced_numbers(scale: float | None, softcap: float | None) -> bool:
    """Whether a traced call's scale and softcap are ones an operator's kernel takes as they
    are: None or finite floats, softcap positive. Called inside the traced-state functions,
    which dynamo runs as constants, so it adds no guards."""
    return all(x is None or type(x) is float and math.isfinite(x) for x in (scale, softcap)) \
        and (softcap is None or softcap > 0)


def traced_sizes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> tuple | None:
    """``(batch, Hq, Hkv, Lq, Lk, E, Ev)`` of a call being traced whose inputs are 3-D or more,
    agree and hold no empty dim; None otherwise (the generic operator then raises what an eager
    call would, or runs the empty problem). Size arithmetic adds no guards (the sizes are
    guarded already); each function called does."""
    if q.dim() < 3 or k.dim() < 3 or v.dim() < 3:
        return None
    (Hq, Lq, E), (Hkv, Lk, Ek), (Hv, Lv, Ev) = q.shape[-3:], k.shape[-3:], v.shape[-3:]
    batch = q.shape[:-3] if q.shape[:-3] == k.shape[:-3] == v.shape[:-3] else \
        torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    if (Hkv, Lk) != (Hv, Lv) or E != Ek or Hq % Hkv or (Hq != Hkv and not enable_gqa) \
            or 0 in (*batch, Hq, Lq, Lk, E, Ev):
        return None
    return batch, Hq, Hkv, Lq, Lk, E, Ev


def traced_spans(mask: masks.Mask | None, Lq: int, Lk: int, rows: tuple, *, flag_oversized: bool) -> tuple | None:
    """The row spans ``(lo, hi)`` (``(None, None)``: every row sees every key) with which the
    split-K kernel runs ``mask`` (everything ANDed) on an Lq x Lk problem whose rows are
    ``rows`` (*B, Hq, Lq), as graph operations on the mask's own tensors; None for a mask the
    kernel does not take. Decided from the mask's structure; reads no tensor data. With
    ``flag_oversized``, a padding length beyond its side's length pushes every span past the
    keys, which split_k's kernel rejects; without, it stays as it is (the Triton kernels clip
    spans to the keys). A keyword without a default: a default read while tracing would add
    guards to every compiled call."""
    mask = None if mask is None else mask.simplified(Lq, Lk)
    if mask is None:
        return None, None
    leaves = mask.leaves()
    if not isinstance(mask, (masks.And, *_SPANNED)) or not all(isinstance(m, _SPANNED) for m in leaves):
        return None
    lo, hi = mask.row_spans(Lq, Lk)  # checks the mask against the sizes, as prepare does
    # Padding lengths given as tensors are read by nobody while tracing, and with causal
    # their spans stay within the keys even where a length does not: one above its side's
    # length pushes every span past the keys, so that the kernel's span check raises.
    if flag_oversized:
        over = [n > L for m in leaves if isinstance(m, masks.Padding)
                for n, L in ((m.kv_lengths, Lk), (m.q_lengths, Lq)) if isinstance(n, torch.Tensor)]
        if over:
            hi = hi + (Lk + 1) * torch.stack([o.any() for o in over]).any()
    if not all(len(t.shape) <= len(rows) and all(n in (1, m) for n, m in zip(t.shape[::-1], rows[::-1]))
               for t in (lo, hi)):
        return None  # spans of another batch size: the generic operator says so
    return lo, hi
