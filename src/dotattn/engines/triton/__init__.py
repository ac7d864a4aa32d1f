"""The Triton engine: fused GPU kernels for the forward and the backward, every mask.

The kernels (``_fwd.py``, ``_bwd.py``) are imported on the first run, not with dotattn:
dotattn imports without triton, and Triton decides when a ``@triton.jit`` function is
created whether it compiles for the GPU or runs in its interpreter (``TRITON_INTERPRET=1``).
In the interpreter the engine takes CPU tensors, so the test suite runs it on machines
without a GPU; ``engine="auto"`` never picks it for CPU tensors.

What the kernels get from a problem (:class:`_Call`):

    q, k, v     (N, H, L, D) views of the inputs by strides: batch broadcasts and
                non-contiguous layouts are read in place, query head h reads kv head
                h // G (GQA/MQA), K and V are never copied per query head
    tile lists  the mask's ``block_map`` as, per query block, the FULL tiles and the
                PARTIAL tiles (EMPTY ones are not listed), and transposed for dk/dv
    spans       lo, hi int32 (Nm, Hm, Lq): the row spans of the mask's leaves that have
                them (causal in both alignments, windows, padding, prefix-LM, sorted
                documents), evaluated in the kernel on PARTIAL tiles
    layout      a block-sparse leaf's layout, one entry per layout block
    allowed     a boolean rest of the mask (dense, unsorted documents, | without spans,
                a second block-sparse leaf): the user's tensor read tile by tile in
                place, or the rest's ``to_dense`` when it is a combination
    bias        a float rest: read tile by tile; its gradient is dS, summed by autograd
                over the dims the bias broadcasts

Block sizes are autotuned per problem class on the GPU (configs filtered by the head
dim) and fixed in the interpreter (``block_m``, ``block_n`` override both).

Numerics: float32 runs exact ("ieee" dots), TF32 only when the user allows it through
``torch.backends.cuda.matmul.allow_tf32``. float16/bfloat16 operands enter the MMAs as
they are, accumulating in float32; P and dS are rounded to the input dtype for their
GEMMs, once on CUDA (as FlashAttention and torch's GPU kernels), as hi + lo halves on
CPU, where torch's kernels, the 2x rule's baseline there, keep them in float32.
dq, dk, dv are deterministic by construction: no atomics (dk/dv are summed over a GQA
group inside one program, dq has its own kernel). A float mask shared by batch rows or
heads gets its gradient by atomic adds into a buffer of its own size, unless
``deterministic`` (or torch.use_deterministic_algorithms): then each (batch, head)
stores its dS, O(B·H·Lq·Lk) memory, and torch sums them. NaN/inf inputs: the kernels run on copies with
them zeroed, then the outputs that may see one become NaN as in the reference engine
(an O(Lq·Lk) pass that only such inputs pay). ``return_weights`` is computed in torch
ops, O(Lq·Lk) like the weights themselves.
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

from dotattn import masks
from dotattn._inputs import Problem
from dotattn.engines._tiled_kernel import _spans_canonical, heads_canonical
from dotattn.engines.base import AttentionResult, Engine, Support, lse_dtype

LOG2E = 1.4426950408889634
MISSING = None if importlib.util.find_spec("triton") is not None else "triton is not installed (pip install triton)"
# The interpreter's tile sizes: large, since it pays per tile in Python (test_triton.py sets small
# ones to cover many full, partial and empty tiles).
INTERPRETER_BLOCKS = (128, 128)
_NEG_INF = float("-inf")


def _interpreting() -> bool:
    """Whether TRITON_INTERPRET=1 is set now (Triton's own switch to its interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _compiled_too_early() -> bool:
    """Whether Triton created its jit functions for the GPU before TRITON_INTERPRET=1 was set:
    its language library when triton was imported, ours on the first run. The interpreter
    cannot run those."""
    tl = sys.modules.get("triton.language")
    if tl is not None and type(tl.zeros).__name__ == "JITFunction":  # a jit function in recent triton
        return True
    loaded = _loaded()
    return loaded is not None and not loaded.interpreted


@dataclass(frozen=True)
class _Kernels:
    fwd: ModuleType
    bwd: ModuleType
    decode: ModuleType
    interpreted: bool  # TRITON_INTERPRET=1 when they were created


@functools.lru_cache(maxsize=1)
def _kernels() -> _Kernels:
    """The kernel modules, imported once, on the first run."""
    from dotattn.engines.triton import _bwd, _decode, _fwd

    return _Kernels(_fwd, _bwd, _decode, _interpreting())


def _loaded() -> _Kernels | None:
    return _kernels() if _kernels.cache_info().currsize else None


# ---------------------------------------------------------------------------
# Configs: (BLOCK_M, BLOCK_N, num_warps, num_stages), filtered by what fits
# ---------------------------------------------------------------------------

FWD_CONFIGS = [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 2)]
# dk/dv: keys along the rows (BLOCK_N) stay resident, queries stream (BLOCK_M)
DKDV_CONFIGS = [(64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 3), (32, 32, 4, 2)]
DQ_CONFIGS = [(128, 64, 8, 2), (128, 32, 4, 2), (64, 64, 4, 2), (64, 32, 4, 3), (32, 32, 4, 2)]
SHARED_MEMORY = 200 * 1024  # bytes a block may use, with margin below an H100's 227 KiB
# Split-K decoding (one config, not tuned: no GPU has timed it yet): at most 64 rows per
# program, keys in tiles of at most 64 whose K and V take 64 KiB per pipeline stage.
DECODE_ROWS, DECODE_STAGE_BYTES, DECODE_WARPS, DECODE_STAGES = 64, 64 * 1024, 4, 3


def decode_rows(R: int) -> int:
    """Query rows per split-K decoding program, for a kv head's R = G·Lq rows: all of them,
    up to DECODE_ROWS (padded to a power of two, at least 16 for the MMA)."""
    return min(DECODE_ROWS, _pow2(R))


def _fits(config: tuple[int, int, int, int], BE: int, BEV: int, itemsize: int, resident: str) -> bool:
    """Whether a config's tiles fit shared memory: the resident block once, the streamed
    tiles once per pipeline stage."""
    bm, bn, _, stages = config
    rows_resident, rows_streamed = (bm, bn) if resident == "m" else (bn, bm)
    need = rows_resident * (BE + BEV) * itemsize + stages * rows_streamed * (BE + BEV) * itemsize
    return need <= SHARED_MEMORY and bm * max(BE, BEV) <= 128 * 256 and bn * max(BE, BEV) <= 128 * 256


def _pow2(n: int) -> int:
    return max(16, 1 << max(0, n - 1).bit_length())


# ---------------------------------------------------------------------------
# The mask as the kernels read it
# ---------------------------------------------------------------------------


def _strides(t: torch.Tensor) -> list[int]:
    """Strides with 0 for size-1 dims, so broadcast dims read the same entries."""
    return [0 if size == 1 else stride for size, stride in zip(t.shape, t.stride())]


@dataclass
class _MaskParts:
    """A problem's mask split for the kernel (all ANDed); None parts are absent.

    lo, hi:  int32 (Nm, Hm, Lq) row spans
    layout:  uint8 (Nm, Hm, nQb, nKb) a block-sparse layout of layout_blocks (bq, bk)
    allowed: uint8 (Nm, Hm, R, C) may-attend, R in {1, Lq}, C in {1, Lk}
    bias:    (Nm, Hm, R, C) float, differentiable (autograd reaches the user's tensors)
    """

    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    layout: torch.Tensor | None = None
    layout_blocks: tuple[int, int] = (1, 1)
    allowed: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @classmethod
    def of(cls, problem: Problem) -> _MaskParts:
        p = problem
        if p.mask is None:
            return cls()
        device = p.device
        leaves = list(p.mask.children) if isinstance(p.mask, masks.And) else [p.mask]
        spanned, rest = [], []
        for leaf in leaves:
            (rest if leaf.is_additive or leaf.row_spans(p.Lq, p.Lk) is None else spanned).append(leaf)
        parts = cls()
        if spanned:
            parts.lo, parts.hi = _spans(spanned[0] if len(spanned) == 1 else masks.And(*spanned), p)
        sparse = next((leaf for leaf in rest if isinstance(leaf, masks.BlockSparse)), None)
        if sparse is not None:  # read one entry per layout block
            rest.remove(sparse)
            parts.layout = heads_canonical(sparse.layout.to(device), p.batch_shape, p.Hq).view(torch.uint8)
            parts.layout_blocks = sparse.block_size
        if rest:
            if len(rest) == 1 and isinstance(rest[0], masks.Dense):  # read in place
                dense = rest[0].tensor.to(device)
            else:
                combined = rest[0] if len(rest) == 1 else masks.And(*rest)
                dense = combined.to_dense(p.Lq, p.Lk, device=device)
            dense = heads_canonical(dense, p.batch_shape, p.Hq)
            if dense.is_floating_point():
                parts.bias = dense
            else:
                parts.allowed = dense.view(torch.uint8) if dense.dtype == torch.bool else dense.to(torch.uint8)
        return parts


_SPANS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_MAPS: dict[tuple, tuple[torch.Tensor, ...]] = {}
_KEPT = 64  # cached entries per cache, for masks made of plain numbers


def _cached(cache: dict, key: tuple | None, make):
    if key is None:
        return make()
    found = cache.get(key)
    if found is None:
        found = cache[key] = make()
        while len(cache) > _KEPT:
            cache.pop(next(iter(cache)))
    return found


def _spans(mask: masks.Mask, p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Row spans as int32 (Nm, Hm, Lq) on the problem's device."""
    def make():
        return tuple(x.to(device=p.device, dtype=torch.int32).contiguous()
                     for x in _spans_canonical(mask.row_spans(p.Lq, p.Lk), p))

    key = mask.value_key
    return _cached(_SPANS, None if key is None else (key, p.Lq, p.Lk, str(p.device)), make)


def _tile_lists(problem: Problem, block_m: int, block_n: int, transposed: bool) -> tuple[torch.Tensor, ...]:
    """The block map as tile lists: full_count, full_idx, part_count, part_idx.

    counts int32 (Nm, Hm, nQ), indices int32 (Nm, Hm, nQ, nK) whose first count entries
    are the tiles of that kind; transposed, query tiles per key tile (nK, nQ).
    """
    p = problem

    def make():
        nq, nk = -(-p.Lq // block_m), -(-p.Lk // block_n)
        if p.mask is None:
            codes = torch.full((1, 1, nq, nk), masks.FULL, dtype=torch.int8)
        else:
            codes = heads_canonical(p.mask.block_map(p.Lq, p.Lk, block_m, block_n), p.batch_shape, p.Hq)
        codes = codes.to(p.device)
        if transposed:
            codes = codes.transpose(-1, -2)
        out = []
        for kind in (masks.FULL, masks.PARTIAL):
            chosen = codes == kind
            # a stable sort puts the chosen tiles first, in order
            idx = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True).to(torch.int32)
            out += [chosen.sum(-1, dtype=torch.int32).contiguous(), idx.contiguous()]
        return tuple(out)

    key = None if p.mask is None else p.mask.value_key
    if p.mask is None:
        key = ("none",)
    key = None if key is None else (key, p.Lq, p.Lk, block_m, block_n, transposed, str(p.device))
    return _cached(_MAPS, key, make)


# ---------------------------------------------------------------------------
# One problem, as kernel launches
# ---------------------------------------------------------------------------


def _canonical(x: torch.Tensor, batch: tuple[int, ...]) -> torch.Tensor:
    """(*batch', H, L, D) -> (N, H, L, D), a view where the strides allow one."""
    H, L, D = x.shape[-3:]
    return x.expand(*batch, H, L, D).reshape(math.prod(batch), H, L, D)


@dataclass
class _Call:
    """Everything the kernels need besides the tensors, derived once per problem."""

    problem: Problem
    blocks: tuple[int, int] | None  # fixed (BLOCK_M, BLOCK_N), or None to autotune
    parts: _MaskParts
    split: bool  # 16-bit inputs: P and dS enter their GEMMs as hi + lo halves
    deterministic: bool  # a broadcast float mask's gradient: per (batch, head) then summed, not atomics

    def __post_init__(self) -> None:
        p = self.problem
        self.N = math.prod(p.batch_shape)
        self.G = p.Hq // p.Hkv
        self.BE, self.BEV = _pow2(p.E), _pow2(p.Ev)
        dtype = p.dtype
        cuda = p.device.type == "cuda"
        self.interpreted = _kernels().interpreted
        if dtype == torch.float32:
            self.precision = "tf32" if cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"
        else:
            self.precision = "tf32"  # ignored for 16-bit operands
        self.upcast = self.interpreted and dtype == torch.bfloat16
        # Triton's interpreter rounds float32 -> 16-bit by truncation (triton 3.9), so there the
        # kernels store float32 and torch rounds to nearest; a GPU rounds to nearest itself.
        self.store_dtype = torch.float32 if self.interpreted else dtype
        self.empty = 0 in (self.N, p.Hq, p.Lq, p.Lk)
        if p.dropout_p > 0:
            threshold = min(int(round(p.dropout_p * 2**32)), 2**32 - 1)
            self.dropout = (p.dropout_seed, threshold - 2**31, 1.0 / (1.0 - p.dropout_p))
        else:
            self.dropout = (0, 0, 1.0)

    def _mask_args(self, bias: torch.Tensor | None) -> list:
        """SpanLo, SpanHi and their strides, then Allowed, Layout (and its block sizes), Bias, each with strides."""
        parts = self.parts
        dummy = torch.empty(1, dtype=torch.int32, device=self.problem.device)
        if parts.lo is not None:
            s = _strides(parts.lo)
            args = [parts.lo, parts.hi, s[0], s[1]]
        else:
            args = [dummy, dummy, 0, 0]
        args += [parts.allowed, *_strides(parts.allowed)] if parts.allowed is not None else [dummy, 0, 0, 0, 0]
        args += ([parts.layout, *_strides(parts.layout), *parts.layout_blocks] if parts.layout is not None
                 else [dummy, 0, 0, 0, 0, 1, 1])
        args += [bias, *_strides(bias)] if bias is not None else [dummy, 0, 0, 0, 0]
        return args

    def _flags(self, bias: torch.Tensor | None) -> dict:
        p = self.problem
        return dict(
            HAS_SPANS=self.parts.lo is not None, HAS_ALLOWED=self.parts.allowed is not None,
            HAS_LAYOUT=self.parts.layout is not None,
            HAS_BIAS=bias is not None, HAS_DROPOUT=p.dropout_p > 0,
            PRECISION=self.precision, UPCAST=self.upcast, SPLIT=self.split and p.dtype != torch.float32,
        )

    def _lists(self, bm: int, bn: int, transposed: bool) -> list:
        fc, fi, pc, pi = _tile_lists(self.problem, bm, bn, transposed)
        return [fc, fi, pc, pi, *_strides(fc), *_strides(fi)[:3]]

    def _tuned(self, kind: str, configs: list, resident: str, launch, bias) -> tuple[int, int, int, int]:
        """The block sizes for one kernel: fixed, or the fastest config that fits (timed once
        per problem class)."""
        if self.blocks is not None or self.interpreted:
            bm, bn = self.blocks or INTERPRETER_BLOCKS
            return bm, bn, 4, 2
        p = self.problem
        itemsize = p.query.element_size()
        fitting = [c for c in configs if _fits(c, self.BE, self.BEV, itemsize, resident)] or configs[-1:]
        key = (kind, p.dtype, self.BE, self.BEV, _pow2(p.Lq), _pow2(p.Lk), tuple(self._flags(bias).items()),
               p.device.index)
        return _tuned_config(key, fitting, launch)

    # -- forward ------------------------------------------------------------------

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None):
        """out (N, Hq, Lq, Ev) in the store dtype, lse (N, Hq, Lq) float32 in log2 units."""
        p = self.problem
        q, k, v = self._inputs(q, k, v)
        out = torch.zeros(self.N, p.Hq, p.Lq, p.Ev, dtype=self.store_dtype, device=q.device)
        lse = torch.full((self.N, p.Hq, p.Lq), float("inf"), dtype=torch.float32, device=q.device)
        if self.empty:
            return out, lse

        def launch(config):
            bm, bn, warps, stages = config
            grid = (-(-p.Lq // bm), self.N * p.Hq)
            lists = self._lists(bm, bn, False) if p.mask is not None else [lse] * 4 + [0] * 6
            _kernels().fwd.attn_fwd[grid](
                q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                p.Hq, self.G, p.Lq, p.Lk, p.E, p.Ev, p.scale * LOG2E,
                *self._mask_args(bias), *lists, -(-p.Lk // bn), *self.dropout,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=self.BE, BLOCK_EV=self.BEV,
                HAS_MAP=p.mask is not None, EVEN_N=p.Lk % bn == 0, **self._flags(bias),
                num_warps=warps, num_stages=stages,
            )

        launch(self._tuned("fwd", FWD_CONFIGS, "m", launch, bias))
        return out, lse

    def _inputs(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        """(N, H, L, D) views; with NaN/inf somewhere, copies with them zeroed (the engine
        marks the outputs that may see them afterwards)."""
        xs = [_canonical(x.detach(), self.problem.batch_shape) for x in xs]
        if not self.problem.inputs_finite:
            xs = [torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for x in xs]
        return xs

    # -- split-K decoding -----------------------------------------------------------

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: int):
        """The split-K forward (``_decode.py``) of a problem whose mask is row spans or none:
        out (N, Hq, Lq, Ev) in the store dtype and lse (N, Hq, Lq) float32 in log2 units, as
        ``forward`` gives them. Inputs are read as they are (no pass looks for NaN or inf):
        garbage shows as an output that is not finite, which the caller checks."""
        p = self.problem
        q, k, v = (_canonical(x.detach(), p.batch_shape) for x in (q, k, v))
        R = self.G * p.Lq
        BR = decode_rows(R)
        rows = self.N * p.Hkv * R
        part_out = torch.empty(parts, rows, p.Ev, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(parts, rows, dtype=torch.float32, device=q.device)
        out = torch.empty(self.N, p.Hkv, R, p.Ev, dtype=self.store_dtype, device=q.device)
        lse = torch.empty(self.N, p.Hkv, R, dtype=torch.float32, device=q.device)
        if self.interpreted:
            bn, warps, stages = INTERPRETER_BLOCKS[1], 4, 1
        else:
            bn, warps, stages = 64, DECODE_WARPS, DECODE_STAGES
            while bn > 16 and bn * (self.BE + self.BEV) * p.query.element_size() > DECODE_STAGE_BYTES:
                bn //= 2
        flags = self._flags(None)
        kern = _kernels().decode
        kern.decode_parts[(parts, self.N * p.Hkv, -(-R // BR))](
            q, k, v, part_out, part_lse, *q.stride(), *k.stride(), *v.stride(), *self._mask_args(None)[:4],
            p.Hkv, self.G, p.Lq, p.Lk, p.E, p.Ev, R, parts, p.scale * LOG2E,
            BLOCK_R=BR, BLOCK_N=bn, BLOCK_E=self.BE, BLOCK_EV=self.BEV, HAS_SPANS=flags["HAS_SPANS"],
            PRECISION=flags["PRECISION"], UPCAST=flags["UPCAST"], SPLIT=flags["SPLIT"],
            num_warps=warps, num_stages=stages,
        )
        merge_rows = 16
        kern.decode_merge[(-(-rows // merge_rows),)](
            part_out, part_lse, out, lse, rows, p.Ev, parts, BLOCK_ROWS=merge_rows, BLOCK_EV=self.BEV,
        )
        # row r = g·Lq + i of kv head hk is query i of head hk·G + g: (N, Hkv, G·Lq) is (N, Hq, Lq)
        return out.view(self.N, p.Hq, p.Lq, p.Ev), lse.view(self.N, p.Hq, p.Lq)

    # -- backward -----------------------------------------------------------------

    def backward(self, q, k, v, bias, out, lse, d_out, bias_grad: bool):
        """dq, dk, dv in the shapes and dtypes of q, k, v (broadcast dims summed), and the
        bias's gradient (its shape) when ``bias_grad``."""
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
            ds_strides = _strides(ds)
        if not self.empty:
            kern = _kernels()
            delta = torch.empty(self.N, p.Hq, p.Lq, dtype=torch.float32, device=qc.device)
            bm_pre = 64
            kern.bwd.attn_bwd_preprocess[(-(-p.Lq // bm_pre), self.N * p.Hq)](
                out, do, delta, *out.stride(), *do.stride(), p.Hq, p.Lq, p.Ev, BLOCK_M=bm_pre, BLOCK_EV=self.BEV,
            )
            common = [*qc.stride(), *kc.stride(), *vc.stride(), *do.stride()]

            def launch_dkdv(config):
                bm, bn, warps, stages = config
                kern.bwd.attn_bwd_dkdv[(-(-p.Lk // bn), self.N * p.Hkv)](
                    qc, kc, vc, do, lse, delta, dk, dv, *common,
                    p.Hq, p.Hkv, self.G, p.Lq, p.Lk, p.E, p.Ev, p.scale * LOG2E, p.scale,
                    *self._mask_args(bias), *self._lists(bm, bn, True), *self.dropout,
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=self.BE, BLOCK_EV=self.BEV,
                    EVEN_N=p.Lk % bn == 0, **self._flags(bias), num_warps=warps, num_stages=stages,
                )

            def launch_dq(config):
                bm, bn, warps, stages = config
                lists = self._lists(bm, bn, False) if p.mask is not None else [lse] * 4 + [0] * 6
                if atomic:  # it adds into ds, and the autotuner launches it more than once
                    ds.zero_()
                kern.bwd.attn_bwd_dq[(-(-p.Lq // bm), self.N * p.Hq)](
                    qc, kc, vc, do, lse, delta, dq, ds if ds is not None else dq, *common,
                    p.Hq, self.G, p.Lq, p.Lk, p.E, p.Ev, p.scale * LOG2E, p.scale,
                    *self._mask_args(bias), *ds_strides, *lists, -(-p.Lk // bn), *self.dropout,
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=self.BE, BLOCK_EV=self.BEV,
                    HAS_MAP=p.mask is not None, EVEN_N=p.Lk % bn == 0, **self._flags(bias),
                    STORE_DS=ds is not None, ATOMIC_DS=atomic, num_warps=warps, num_stages=stages,
                )

            launch_dkdv(self._tuned("dkdv", DKDV_CONFIGS, "n", launch_dkdv, bias))
            launch_dq(self._tuned("dq", DQ_CONFIGS, "m", launch_dq, bias))
        batch = p.batch_shape
        grads = [g.reshape(*batch, *g.shape[1:]).sum_to_size(x.shape).to(x.dtype)
                 for g, x in zip((dq, dk, dv), (q, k, v))]
        bias_g = None if ds is None else ds.sum_to_size(bias.shape).to(bias.dtype)
        return (*grads, bias_g)


_TUNED: dict[tuple, tuple[int, int, int, int]] = {}


def _tuned_config(key: tuple, configs: list, launch) -> tuple[int, int, int, int]:
    """The fastest of ``configs`` for ``launch``, timed on the first call of each key. Every
    launch writes the same outputs (one that accumulates clears its buffer first), so timing
    them is harmless."""
    found = _TUNED.get(key)
    if found is None:
        from triton.testing import do_bench

        timings = {}
        for config in configs:
            try:
                timings[config] = do_bench(lambda: launch(config), warmup=5, rep=20)
            except Exception:  # a config the compiler rejects (resources): not a candidate
                continue
        if not timings:
            raise RuntimeError(f"triton engine: no kernel config compiled for {key}; configs tried: {configs}")
        found = _TUNED[key] = min(timings, key=timings.get)
    return found


class _TritonAttention(torch.autograd.Function):
    """One autograd node: saves q, k, v, the bias, the output and the lse; backward runs
    the three backward kernels."""

    @staticmethod
    def forward(ctx, call: _Call, q, k, v, bias):
        out, lse = call.forward(q, k, v, bias)
        ctx.call = call
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        with _on_device(q.device):
            grads = ctx.call.backward(q, k, v, bias, out, lse, d_out, bias is not None and ctx.needs_input_grad[4])
        return (None, *grads)


def natural_lse(lse2: torch.Tensor) -> torch.Tensor:
    """The kernels' lse (log2 units, +inf for a row that sees nothing) as the natural log, -inf there."""
    return torch.where(torch.isinf(lse2), _NEG_INF, lse2 / LOG2E)


def kernel_lse(lse: torch.Tensor) -> torch.Tensor:
    """The inverse of ``natural_lse``: what backward's kernels take as a row's lse."""
    return torch.where(lse == _NEG_INF, float("inf"), lse.float() * LOG2E)


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device, so make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _visible_garbage(problem: Problem, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN where a row may see a NaN/inf input, as the reference engine gives: the whole row
    (and its lse) for a bad query or key entry, the Ev column for a bad value entry.
    The kernels ran on zeroed copies; this O(Lq·Lk) pass runs only for non-finite inputs."""
    p = problem
    if p.mask is None:
        allowed = torch.ones(p.Lq, p.Lk, dtype=torch.bool, device=out.device)
    else:
        dense = p.mask.to_dense(p.Lq, p.Lk, device=out.device).detach()
        allowed = dense != _NEG_INF if dense.is_floating_point() else dense
    allowed = allowed.expand(*p.batch_shape, p.Hq, p.Lq, p.Lk).float()

    def bad(x: torch.Tensor) -> torch.Tensor:  # (*batch, Hq, L, D) per query head
        x = ~torch.isfinite(x.detach())
        x = x.expand(*p.batch_shape, *x.shape[-3:])
        return x.repeat_interleave(p.Hq // x.shape[-3], dim=-3) if x.shape[-3] != p.Hq else x

    q_bad, k_bad, v_bad = bad(p.query).any(-1), bad(p.key).any(-1), bad(p.value)
    row = ((allowed * q_bad[..., None]).sum(-1) > 0) | ((allowed @ k_bad[..., None].float())[..., 0] > 0)
    cell = (allowed @ v_bad.float()) > 0
    return out.masked_fill(row[..., None] | cell, float("nan")), lse.masked_fill(row, float("nan"))


class TritonEngine(Engine):
    name = "triton"
    description = "fused Triton kernels (forward, and dk/dv + dq backward) for CUDA; every mask; O(L) memory"
    # Among the engines that run CUDA tensors it outranks the reference engine; the tiled
    # engine is CPU-only, so their order decides nothing (ranked below it, a CPU problem
    # never even asks the interpreter).
    priority = 5

    # CUDA only; CPU tensors too while Triton interprets (TRITON_INTERPRET=1), for tests
    _SUPPORT = Support(devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32), max_head_dim=256)

    def __init__(self, block_m: int | None = None, block_n: int | None = None,
                 split_half_gemms: bool | None = None, deterministic: bool | None = None) -> None:
        self.block_m = block_m  # None: autotuned on the GPU, INTERPRETER_BLOCKS in the interpreter
        self.block_n = block_n
        # float16/bfloat16: P and dS are rounded to the input dtype for their GEMMs. On CUDA
        # once, as FlashAttention and torch's own GPU kernels do; on CPU (the interpreter) as
        # hi + lo halves, since torch's CPU kernels, the baseline there, keep them in float32.
        # None: decided by the device; True/False: always.
        self.split_half_gemms = split_half_gemms
        # dq, dk, dv are deterministic always; this decides a broadcast float mask's gradient.
        # None: torch.use_deterministic_algorithms decides.
        self.deterministic = deterministic

    def _split(self, problem: Problem) -> bool:
        if self.split_half_gemms is None:
            return problem.device.type != "cuda"
        return self.split_half_gemms

    @property
    def support(self) -> Support:
        if _interpreting():
            return dataclasses.replace(self._SUPPORT, devices=("cuda", "cpu"))
        return self._SUPPORT

    def extra_reasons(self, problem: Problem) -> list[str]:
        if MISSING is not None:
            return [MISSING]
        if problem.device.type == "cpu" and _interpreting() and _compiled_too_early():
            return ["triton was imported (or this engine ran) before TRITON_INTERPRET=1 was set, so its kernels "
                    "are compiled for the GPU and cannot take CPU tensors; set TRITON_INTERPRET=1 before "
                    "importing triton"]
        return []

    def auto_skip(self, problem: Problem) -> str | None:
        if problem.device.type == "cpu":
            return "CPU tensors run in Triton's interpreter, which is for tests; engine='triton' forces it"
        return None

    def detail(self, problem: Problem) -> str:
        how = "Triton interpreter" if _interpreting() else "compiled Triton kernels"
        parts = _MaskParts.of(problem)
        masked = [name for name, part in (("row spans", parts.lo), ("a block-sparse layout", parts.layout),
                                          ("a boolean tensor", parts.allowed), ("a bias", parts.bias))
                  if part is not None]
        return how + (", partial tiles masked by " + " and ".join(masked) if masked else "")

    def plan(self, problem: Problem) -> _Call:
        """How this engine runs ``problem``: the kernels' call, whose ``forward`` and
        ``backward`` ``dotattn.distributed`` also uses to run the blocks of a ring."""
        p = problem
        blocks = None if self.block_m is None else (self.block_m, self.block_n or self.block_m)
        deterministic = self.deterministic
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        return _Call(p, blocks, _MaskParts.of(p), self._split(p), deterministic)

    def run(self, problem: Problem) -> AttentionResult:
        p = problem
        call = self.plan(p)
        with _on_device(p.device):
            out, lse2 = _TritonAttention.apply(call, p.query, p.key, p.value, call.parts.bias)
        out = out.reshape(*p.batch_shape, p.Hq, p.Lq, p.Ev).to(p.dtype)
        lse = natural_lse(lse2.reshape(*p.batch_shape, p.Hq, p.Lq))
        if not p.inputs_finite:
            out, lse = _visible_garbage(p, out, lse)
        weights = None
        if p.return_weights:
            weights = self._weights(p, call.parts, lse).to(p.dtype)
        return AttentionResult(out, lse.to(lse_dtype(p.dtype)) if p.return_lse else None, weights)

    @staticmethod
    def _weights(p: Problem, parts: _MaskParts, lse: torch.Tensor) -> torch.Tensor:
        """P = exp(S - lse), (*batch, Hq, Lq, Lk), in torch ops: the weights are O(Lq·Lk) anyway."""
        with torch.no_grad():
            G = p.Hq // p.Hkv
            k = p.key if G == 1 else p.key.repeat_interleave(G, dim=-3)
            s = (p.query.float() @ k.float().transpose(-2, -1)) * p.scale
            if p.mask is not None:
                dense = p.mask.to_dense(p.Lq, p.Lk, device=s.device)
                s = s + dense.float() if dense.is_floating_point() else s.masked_fill(~dense, _NEG_INF)
            alive = torch.isfinite(lse)
            w = torch.exp(s - torch.where(alive, lse, 0.0)[..., None])
            return torch.where(alive[..., None] & (s != _NEG_INF), w, 0.0)
