"""One problem as kernel launches: the forward, the backward's three kernels, split-K decoding.

The kernels (``_fwd.py``, ``_bwd.py``, ``_decode.py``) are imported on the first launch, not
with dotattn: dotattn imports without triton, and Triton decides when a ``@triton.jit``
function is created whether it compiles for the GPU or runs in its interpreter
(``TRITON_INTERPRET=1``).

q, k, v reach the kernels as (N, H, L, D) views by strides: batch broadcasts and
non-contiguous layouts are read in place, query head h reads kv head h // G (GQA/MQA).
The kernels work in log2 units: their lse is log2 of the row sum plus the row max in log2
units, +inf for a row that sees nothing (``natural_lse``, ``kernel_lse`` convert).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import torch

from dotattn._inputs import ROW_STATS, Problem
from dotattn._layout import flat_batch
from dotattn._nonfinite import zeroed
from dotattn._tiles import span_tile_lists, tile_lists
from dotattn.engines.base import Support
from dotattn.engines.triton.configs import (
    DECODE_STAGE_BYTES,
    DECODE_STAGES,
    DECODE_WARPS,
    DKDV_CONFIGS,
    DQ_CONFIGS,
    FWD_CONFIGS,
    INTERPRETER_BLOCKS,
    decode_rows,
    fits,
    pow2,
    tuned_config,
)
from dotattn.engines.triton.mask_args import MaskParts, strides

LOG2E = 1.4426950408889634
MISSING = None if importlib.util.find_spec("triton") is not None else "triton is not installed (pip install triton)"
_NEG_INF = float("-inf")


def interpreting() -> bool:
    """Whether TRITON_INTERPRET=1 is set now (Triton's own switch to its interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compiled_too_early() -> bool:
    """Whether Triton created its jit functions for the GPU before TRITON_INTERPRET=1 was set:
    its language library when triton was imported, ours on the first run. The interpreter
    cannot run those."""
    tl = sys.modules.get("triton.language")
    if tl is not None and type(tl.zeros).__name__ == "JITFunction":  # a jit function in recent triton
        return True
    loaded = _loaded()
    return loaded is not None and not loaded.interpreted


# CUDA only; CPU tensors too while Triton interprets (TRITON_INTERPRET=1), for tests
_SUPPORT = Support(devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32), max_head_dim=256,
                   softcap=True)  # the prefill kernels'; the decoding kernels' reason is split_k's


def support() -> Support:
    """What the kernels take: CUDA tensors (CPU ones too in Triton's interpreter)."""
    if interpreting():
        return dataclasses.replace(_SUPPORT, devices=("cuda", "cpu"))
    return _SUPPORT


def unavailable(problem: Problem) -> list[str]:
    """Why the kernels cannot run here (beyond ``support``): triton missing, or compiled for
    the GPU before a test asked for the interpreter."""
    if MISSING is not None:
        return [MISSING]
    if problem.device_type == "cpu" and interpreting() and compiled_too_early():
        return ["triton was imported (or its kernels ran) before TRITON_INTERPRET=1 was set, so its kernels "
                "are compiled for the GPU and cannot take CPU tensors; set TRITON_INTERPRET=1 before "
                "importing triton"]
    return []


@dataclass(frozen=True)
class _Kernels:
    fwd: ModuleType
    bwd: ModuleType
    decode: ModuleType
    interpreted: bool  # TRITON_INTERPRET=1 when they were created


@functools.lru_cache(maxsize=1)
def kernels() -> _Kernels:
    """The kernel modules, imported once, on the first run."""
    from dotattn.engines.triton import _bwd, _decode, _fwd

    return _Kernels(_fwd, _bwd, _decode, interpreting())


def _loaded() -> _Kernels | None:
    return kernels() if kernels.cache_info().currsize else None


@dataclass
class Call:
    """Everything the kernels need besides the tensors, derived once per problem."""

    problem: Problem
    blocks: tuple[int, int] | None  # fixed (BLOCK_M, BLOCK_N), or None to autotune
    parts: MaskParts
    split: bool  # 16-bit inputs: P and dS enter their GEMMs as hi + lo halves
    deterministic: bool  # a broadcast float mask's gradient: per (batch, head) then summed, not atomics
    # The body of a torch op (``ops.py``), traced by torch.compile: the kernels launch through
    # torch.library.wrap_triton, each in the first config that fits (no timing), the inputs are
    # always zeroed copies, and the tile lists come from ``parts``' row spans in graph operations
    # (the problem itself has no mask).
    traced: bool = False

    def __post_init__(self) -> None:
        p = self.problem
        self.N = math.prod(p.batch_shape)
        self.G = p.Hq // p.Hkv
        self.BE, self.BEV = pow2(p.E), pow2(p.Ev)
        dtype = p.dtype
        cuda = p.device_type == "cuda"
        self.interpreted = kernels().interpreted
        if dtype == torch.float32:
            self.precision = "tf32" if cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"
        else:
            self.precision = "tf32"  # ignored for 16-bit operands
        self.upcast = self.interpreted and dtype == torch.bfloat16
        # Triton's interpreter rounds float32 -> 16-bit by truncation (triton 3.9), so there the
        # kernels store float32 and torch rounds to nearest; a GPU rounds to nearest itself.
        self.store_dtype = torch.float32 if self.interpreted else dtype
        self.empty = 0 in (self.N, p.Hq, p.Lq, p.Lk)
        self.has_map = p.mask is not None or self.parts.lo is not None  # tile lists to follow
        # the scalars every kernel takes after its tile lists: the dropout seed, its threshold
        # (shifted to fit an int32) and 1/keep, then the soft cap in the kernels' log2 units
        if p.dropout_p > 0:
            threshold = min(int(round(p.dropout_p * 2**32)), 2**32 - 1)
            self.scalars = (p.dropout_seed, threshold - 2**31, 1.0 / (1.0 - p.dropout_p))
        else:
            self.scalars = (0, 0, 1.0)
        self.scalars += (p.softcap * LOG2E if p.softcap else 1.0,)

    def _mask_args(self, bias: torch.Tensor | None) -> list:
        """SpanLo, SpanHi and their strides, then Allowed, Layout (and its block sizes), Bias, each with strides."""
        parts = self.parts
        dummy = torch.empty(1, dtype=torch.int32, device=self.problem.device)
        if parts.lo is not None:
            s = strides(parts.lo)
            args = [parts.lo, parts.hi, s[0], s[1]]
        else:
            args = [dummy, dummy, 0, 0]
        args += [parts.allowed, *strides(parts.allowed)] if parts.allowed is not None else [dummy, 0, 0, 0, 0]
        args += ([parts.layout, *strides(parts.layout), *parts.layout_blocks] if parts.layout is not None
                 else [dummy, 0, 0, 0, 0, 1, 1])
        args += [bias, *strides(bias)] if bias is not None else [dummy, 0, 0, 0, 0]
        return args

    def _flags(self, bias: torch.Tensor | None) -> dict:
        p = self.problem
        return dict(
            HAS_SPANS=self.parts.lo is not None, HAS_ALLOWED=self.parts.allowed is not None,
            HAS_LAYOUT=self.parts.layout is not None,
            HAS_BIAS=bias is not None, HAS_DROPOUT=p.dropout_p > 0, HAS_CAP=p.softcap > 0,
            PRECISION=self.precision, UPCAST=self.upcast, SPLIT=self.split and p.dtype != torch.float32,
        )

    def _lists(self, bm: int, bn: int, transposed: bool) -> list:
        if not (self.has_map or transposed):  # every tile is FULL: the kernel walks them all, reading no list
            none = self._none()
            return [none] * 4 + [0] * 6
        p = self.problem
        fc, fi, pc, pi = (span_tile_lists(self.parts.lo, self.parts.hi, p.Lq, p.Lk, bm, bn, transposed, p.device)
                          if self.traced else tile_lists(p, bm, bn, transposed))
        return [fc, fi, pc, pi, *strides(fc), *strides(fi)[:3]]

    def _none(self) -> torch.Tensor:
        """What a kernel gets for a tensor it does not read (a flag turns its use off)."""
        return torch.empty(1, dtype=torch.float32, device=self.problem.device)

    def _kernel(self, kernel):
        """``kernel`` as launched: through wrap_triton in a traced op, so the graph holds the launch."""
        if self.traced:
            from torch.library import wrap_triton

            return wrap_triton(kernel)
        return kernel

    def _tuned(self, kind: str, configs: list, resident: str, launch, bias) -> tuple[int, int, int, int]:
        """The block sizes for one kernel: fixed, or the fastest config that fits (timed once
        per problem class)."""
        if self.blocks is not None or self.interpreted:
            bm, bn = self.blocks or INTERPRETER_BLOCKS
            return bm, bn, 4, 2
        p = self.problem
        itemsize = p.query.element_size()
        fitting = [c for c in configs if fits(c, self.BE, self.BEV, itemsize, resident)] or configs[-1:]
        if self.traced:
            return fitting[0]
        key = (kind, p.dtype, self.BE, self.BEV, pow2(p.Lq), pow2(p.Lk), tuple(self._flags(bias).items()),
               p.device.index)
        return tuned_config(key, fitting, launch)

    # -- forward ------------------------------------------------------------------

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None):
        """out (N, Hq, Lq, Ev) in the store dtype, lse (N, Hq, Lq) float32 in log2 units; for a
        monitored problem (``Problem.stats``) each row's statistics (N, Hq, Lq, 11) float32 go to
        ``problem.derived["row_stats"]``, computed in the same pass (the layout of csrc/common.h)."""
        p = self.problem
        q, k, v = self._inputs(q, k, v)
        out = torch.zeros(self.N, p.Hq, p.Lq, p.Ev, dtype=self.store_dtype, device=q.device)
        lse = torch.full((self.N, p.Hq, p.Lq), float("inf"), dtype=torch.float32, device=q.device)
        if self.empty:
            return out, lse
        stats = torch.empty(self.N, p.Hq, p.Lq, ROW_STATS, device=q.device) if p.stats else self._none()

        def launch(config):
            bm, bn, warps, stages = config
            grid = (-(-p.Lq // bm), self.N * p.Hq)
            self._kernel(kernels().fwd.attn_fwd)[grid](
                q, k, v, out, lse, stats, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                p.Hq, self.G, p.Lq, p.Lk, p.E, p.Ev, p.scale * LOG2E,
                *self._mask_args(bias), *self._lists(bm, bn, False), -(-p.Lk // bn), *self.scalars,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=self.BE, BLOCK_EV=self.BEV,
                HAS_MAP=self.has_map, EVEN_N=p.Lk % bn == 0, **self._flags(bias), STATS=p.stats,
                num_warps=warps, num_stages=stages,
            )

        launch(self._tuned("fwd", FWD_CONFIGS, "m", launch, bias))
        if p.stats:
            p.derived["row_stats"] = stats
        return out, lse

    def _inputs(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        """(N, H, L, D) views; with NaN/inf somewhere, copies with them zeroed (the engine
        marks the outputs that may see them afterwards)."""
        xs = [flat_batch(x.detach(), self.problem.batch_shape) for x in xs]
        if self.traced or not self.problem.inputs_finite:
            xs = [zeroed(x) for x in xs]
        return xs

    # -- split-K decoding -----------------------------------------------------------

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: int):
        """The split-K forward (``_decode.py``) of a problem whose mask is row spans or none:
        out (N, Hq, Lq, Ev) in the store dtype and lse (N, Hq, Lq) float32 in log2 units, as
        ``forward`` gives them. Inputs are read as they are (no pass looks for NaN or inf):
        garbage shows as an output that is not finite, which the caller checks."""
        p = self.problem
        q, k, v = (flat_batch(x.detach(), p.batch_shape) for x in (q, k, v))
        R = self.G * p.Lq
        BR = decode_rows(R)
        rows = self.N * p.Hkv * R
        part_out = torch.empty(parts, rows, p.Ev, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(parts, rows, dtype=torch.float32, device=q.device)
        out = torch.empty(self.N, p.Hkv, R, p.Ev, dtype=self.store_dtype, device=q.device)
        lse = torch.empty(self.N, p.Hkv, R, dtype=torch.float32, device=q.device)
        # a monitored problem's row statistics: each part's, then merged (the forward's layout)
        part_stats, stats = ((torch.empty(parts, rows, 6, device=q.device),
                              torch.empty(rows, ROW_STATS, device=q.device)) if p.stats else (part_lse, lse))
        if self.interpreted:
            bn, warps, stages = INTERPRETER_BLOCKS[1], 4, 1
        else:
            bn, warps, stages = 64, DECODE_WARPS, DECODE_STAGES
            while bn > 16 and bn * (self.BE + self.BEV) * p.query.element_size() > DECODE_STAGE_BYTES:
                bn //= 2
        flags = self._flags(None)
        kern = kernels().decode
        kern.decode_parts[(parts, self.N * p.Hkv, -(-R // BR))](
            q, k, v, part_out, part_lse, part_stats, *q.stride(), *k.stride(), *v.stride(), *self._mask_args(None)[:4],
            p.Hkv, self.G, p.Lq, p.Lk, p.E, p.Ev, R, parts, p.scale * LOG2E,
            BLOCK_R=BR, BLOCK_N=bn, BLOCK_E=self.BE, BLOCK_EV=self.BEV, HAS_SPANS=flags["HAS_SPANS"],
            PRECISION=flags["PRECISION"], UPCAST=flags["UPCAST"], SPLIT=flags["SPLIT"], STATS=p.stats,
            num_warps=warps, num_stages=stages,
        )
        merge_rows = 16
        kern.decode_merge[(-(-rows // merge_rows),)](
            part_out, part_lse, part_stats, out, lse, stats, rows, p.Ev, parts, BLOCK_ROWS=merge_rows,
            BLOCK_EV=self.BEV, STATS=p.stats,
        )
        if p.stats:
            p.derived["row_stats"] = stats.view(self.N, p.Hq, p.Lq, ROW_STATS)
        # row r = g·Lq + i of kv head hk is query i of head hk·G + g: (N, Hkv, G·Lq) is (N, Hq, Lq)
        return out.view(self.N, p.Hq, p.Lq, p.Ev), lse.view(self.N, p.Hq, p.Lq)

    # -- backward -----------------------------------------------------------------

    def backward(self, q, k, v, bias, out, lse, d_out, bias_grad: bool):
        """dq, dk, dv in the shapes of q, k, v (broadcast dims summed; the store dtype), and the
        bias's gradient (its shape (Nm, Hm, R, C), float32) when ``bias_grad``.
        out, d_out (N, Hq, Lq, Ev); lse (N, Hq, Lq) in the kernels' log2 units."""
        p = self.problem
        qc, kc, vc = self._inputs(q, k, v)
        do = d_out.to(qc.dtype)
        dq = torch.zeros(self.N, p.Hq, p.Lq, p.E, dtype=self.store_dtype, device=qc.device)
        dk = torch.zeros(self.N, p.Hkv, p.Lk, p.E, dtype=self.store_dtype, device=qc.device)
        dv = torch.zeros(self.N, p.Hkv, p.Lk, p.Ev, dtype=self.store_dtype, device=qc.device)
        # A float mask's gradient is dS summed over the dims it broadcasts along. A (Lq, Lk)
        # mask shared by batch rows or heads gets their dS added in place by atomics, unless
        # deterministic; otherwise every (batch, head) stores its own and torch sums them.
        ds, ds_strides, atomic = None, [0, 0, 0, 0], False
        if bias_grad:
            Nm, Hm, R, C = bias.shape
            atomic = not self.deterministic and (R, C) == (p.Lq, p.Lk) and (Nm, Hm) != (self.N, p.Hq)
            shape = bias.shape if atomic else (self.N, p.Hq, p.Lq, p.Lk)
            ds = torch.zeros(shape, dtype=torch.float32, device=qc.device)
            ds_strides = strides(ds)
        if not self.empty:
            kern = kernels()
            delta = torch.empty(self.N, p.Hq, p.Lq, dtype=torch.float32, device=qc.device)
            bm_pre = 64
            self._kernel(kern.bwd.attn_bwd_preprocess)[(-(-p.Lq // bm_pre), self.N * p.Hq)](
                out, do, delta, *out.stride(), *do.stride(), p.Hq, p.Lq, p.Ev, BLOCK_M=bm_pre, BLOCK_EV=self.BEV,
            )
            common = [*qc.stride(), *kc.stride(), *vc.stride(), *do.stride()]

            def launch_dkdv(config):
                bm, bn, warps, stages = config
                self._kernel(kern.bwd.attn_bwd_dkdv)[(-(-p.Lk // bn), self.N * p.Hkv)](
                    qc, kc, vc, do, lse, delta, dk, dv, *common,
                    p.Hq, p.Hkv, self.G, p.Lq, p.Lk, p.E, p.Ev, p.scale * LOG2E, p.scale,
                    *self._mask_args(bias), *self._lists(bm, bn, True), *self.scalars,
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=self.BE, BLOCK_EV=self.BEV,
                    EVEN_N=p.Lk % bn == 0, **self._flags(bias), num_warps=warps, num_stages=stages,
                )

            def launch_dq(config):
                bm, bn, warps, stages = config
                if atomic:  # it adds into ds, and the autotuner launches it more than once
                    ds.zero_()
                self._kernel(kern.bwd.attn_bwd_dq)[(-(-p.Lq // bm), self.N * p.Hq)](
                    qc, kc, vc, do, lse, delta, dq, ds if ds is not None else self._none(), *common,
                    p.Hq, self.G, p.Lq, p.Lk, p.E, p.Ev, p.scale * LOG2E, p.scale,
                    *self._mask_args(bias), *ds_strides, *self._lists(bm, bn, False), -(-p.Lk // bn), *self.scalars,
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=self.BE, BLOCK_EV=self.BEV,
                    HAS_MAP=self.has_map, EVEN_N=p.Lk % bn == 0, **self._flags(bias),
                    STORE_DS=ds is not None, ATOMIC_DS=atomic, num_warps=warps, num_stages=stages,
                )

            launch_dkdv(self._tuned("dkdv", DKDV_CONFIGS, "n", launch_dkdv, bias))
            launch_dq(self._tuned("dq", DQ_CONFIGS, "m", launch_dq, bias))
        batch = p.batch_shape
        grads = [g.reshape(*batch, *g.shape[1:]).sum_to_size(x.shape) for g, x in zip((dq, dk, dv), (q, k, v))]
        bias_g = None if ds is None else ds.sum_to_size(bias.shape)
        return (*grads, bias_g)


def natural_lse(lse2: torch.Tensor) -> torch.Tensor:
    """The kernels' lse (log2 units, +inf for a row that sees nothing) as the natural log, -inf there."""
    return torch.where(torch.isinf(lse2), _NEG_INF, lse2 / LOG2E)


def kernel_lse(lse: torch.Tensor) -> torch.Tensor:
    """The inverse of ``natural_lse``: what backward's kernels take as a row's lse."""
    return torch.where(lse == _NEG_INF, float("inf"), lse.float() * LOG2E)


def on_device(device: torch.device):
    """Triton launches on the current CUDA device, so make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def split_k_decode(problem: Problem, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K decoding kernels on a problem whose mask is row spans or none, keys cut into
    ``parts``: out (N, Hq, Lq, Ev) and lse (N, Hq, Lq), natural log. Inputs are read as they are
    (no pass looks for NaN or inf): garbage shows as an output that is not finite, which the
    caller checks."""
    p = problem
    call = Call(p, None, MaskParts.of(p), p.device_type != "cuda", False)
    with on_device(p.device):
        out, lse2 = call.decode(p.query, p.key, p.value, parts)
    return out, natural_lse(lse2)
