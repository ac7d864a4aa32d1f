"""The tiled engine's compiled path: the C++ kernel in ``dotattn/csrc/tiled.cpp``.

The kernel (``dotattn/csrc``) computes scores, softmax and accumulators in float32 (float64 for float64
inputs). For bfloat16 inputs the GEMMs run either in bfloat16 with float32
accumulation (MKL's gemm_bf16bf16f32; P rounded to bfloat16 on the way in, as torch's
own CPU kernel does, and dS split into two bfloat16 parts, hi + lo, for twice the
precision: rounding it once made dk break the 2x rule) or in float32 after converting q, k, v once, O(L·E):
whichever the machine's tile GEMMs measured faster (:func:`bf16_gemms`), once per
head dim and tile size.

The mask reaches the kernel already classified tile by tile: an index map saying
EMPTY, FULL or PARTIAL. A PARTIAL tile is masked from the mask's row spans
(``Mask.row_spans``: each row may attend one interval of keys), which covers causal,
sliding-window, padding, prefix-LM, sorted-document masks and their combinations in
O(L) memory. A float tensor, alone or ANDed with such masks, is read where it lies, and an
ALiBi mask (``masks.alibi``) is computed in each tile from its slopes.
Other masks (dense boolean, block-sparse, several float biases) are packed: one
``mask.tile`` call per partial tile position, stored as uint8 "may attend" or as the
additive bias.

Shape legend: N flattened batch, Hq/Hkv heads, Lq/Lk lengths, E head dim, Ev value
dim, nQ/nK tile counts, P packed partial tiles, bq x bk the tile size.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

from dotattn import _tiles, masks
from dotattn._inputs import Problem, compute_dtype
from dotattn._layout import heads_canonical
from dotattn._nonfinite import zeroed

# The kernel is built once per x86-64 level (setup.py), best first; a level runs on a CPU
# whose torch reports at least that capability.
LEVELS = ("avx512", "avx2", "baseline")
_RUNS_ON = {"avx512": ("AVX512",), "avx2": ("AVX512", "AVX2"), "baseline": None}  # None: any CPU


def _load() -> tuple[ModuleType | None, str | None, str | None]:
    """The best kernel module this CPU runs, its level, and why there is none (None when there is).

    DOTATTN_CPU_LEVEL (avx2, baseline) forces a lower level, for tests; torch's own
    ATEN_CPU_CAPABILITY lowers what the CPU is taken to run, as it does for torch's kernels."""
    forced = os.environ.get("DOTATTN_CPU_LEVEL", "").lower() or LEVELS[0]
    if forced not in LEVELS:
        raise ValueError(f"DOTATTN_CPU_LEVEL is {forced!r}; use one of {', '.join(LEVELS)}")
    try:  # which torch the kernel was built against, known before its modules are loaded
        from dotattn._kernel_info import TORCH_VERSION
    except ImportError:
        TORCH_VERSION = None
    if TORCH_VERSION is not None and TORCH_VERSION != torch.__version__:
        # Its modules link to that torch's C++ symbols: loading them under another torch fails on
        # undefined symbols at best, so they are not loaded at all.
        warnings.warn(
            f"dotattn's compiled CPU kernel was built against torch {TORCH_VERSION}, but torch "
            f"{torch.__version__} is installed: the tiled and split_k engines run in torch ops, several "
            f"times slower. Install torch=={TORCH_VERSION.split('+')[0]}, or rebuild dotattn against this torch: "
            "pip install --no-build-isolation --force-reinstall --no-deps dotattn", RuntimeWarning, stacklevel=2)
        return None, None, (f"the compiled kernel was built against torch {TORCH_VERSION}, not this torch "
                            f"{torch.__version__}; rebuild it: pip install --no-build-isolation -e .")
    capability = torch.backends.cpu.get_cpu_capability()
    errors, broken = [], []
    for level in LEVELS[LEVELS.index(forced):]:
        if _RUNS_ON[level] is not None and capability not in _RUNS_ON[level]:
            continue
        try:
            module = importlib.import_module(f"dotattn._tiled_cpu_{level}")
        except ModuleNotFoundError as error:  # not built (a build without the kernel, or not for this CPU)
            errors.append(f"{level}: {error}")
            continue
        except ImportError as error:  # built, but it does not load (e.g. against another torch's symbols)
            errors.append(f"{level}: {error}")
            broken.append(level)
            continue
        built = getattr(module, "torch_version", None)
        if built != torch.__version__:  # torch's C++ ABI changes between releases
            errors.append(f"{level}: built against torch {built}")
            broken.append(level)
            continue
        module.register_ops()  # the dotattn::split_k operator's kernel, from this level alone
        return module, level, None
    if broken:  # a kernel was installed for this machine and cannot run: say so once, at import
        warnings.warn(
            f"dotattn's compiled CPU kernel does not run under torch {torch.__version__} "
            f"({'; '.join(errors)}): the tiled and split_k engines fall back to torch ops, several times "
            "slower. Rebuild it with torch already installed: pip install --no-build-isolation "
            "--force-reinstall --no-deps dotattn", RuntimeWarning, stacklevel=2)
    return None, None, (
        f"the compiled kernel is not built for this CPU or this torch {torch.__version__} "
        f"({'; '.join(errors) or 'no module'}); rebuild it with torch already installed: "
        "pip install --no-build-isolation -e .")


ext, LEVEL, MISSING = _load()
if MISSING is None and not ext.has_blas():
    MISSING = "this torch exports no BLAS (SGEMM) for the compiled kernel"


# bfloat16 GEMMs must beat float32 by this much to pay for rounding P and splitting dS each tile:
# on an AVX2 machine whose bf16 tile GEMMs measured 1.1-1.4x float32, the whole forward
# ran 0.93x and forward+backward 0.89x of the float32 path.
BF16_MIN_SPEEDUP = 1.5


@functools.lru_cache(maxsize=None)
def bf16_gemms(E: int, block_q: int, block_k: int) -> tuple[bool, str]:
    """Whether bfloat16 problems of head dim E run their GEMMs in bfloat16, and why."""
    f32, *bf16 = ext.tile_gemm_seconds(block_q, block_k, E, 30)
    if not bf16:
        return False, "bfloat16 computed in float32 GEMMs (this torch's MKL has no bf16 GEMM)"
    speedup = f32 / bf16[0]
    if speedup >= BF16_MIN_SPEEDUP:
        return True, f"bfloat16 GEMMs (measured {speedup:.2f}x float32 on this machine)"
    return False, (f"bfloat16 computed in float32 GEMMs (bf16 GEMMs measured {speedup:.2f}x float32 on "
                   f"this machine, below {BF16_MIN_SPEEDUP}x)")


@dataclass
class TileMask:
    """The mask as the kernel reads it.

    index:   int32 (Nm, Hm, nQ, nK): EMPTY_TILE, FULL_TILE, or a PARTIAL tile's number p >= 0
    then one of
    lo, hi:  int32 (Nm, Hm, Lq): row spans, query i may attend keys lo <= j < hi
    allowed: uint8 (P, bq, bk): packed boolean tiles
    bias:    (P, bq, bk) in the compute dtype: packed additive tiles; or, for a mask that is
             one float tensor, that tensor as (Nm, Hm, Lq or 1, Lk or 1), read in place
    or both lo, hi and a bias read in place, for spans ANDed with one float tensor
    slopes:  (Hq,) in the compute dtype, for an ALiBi mask (alone or ANDed with spans): the kernel
             adds slope_h · (j - i - alibi_offset) to every non-EMPTY tile
    """

    index: torch.Tensor | None = None
    allowed: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    slopes: torch.Tensor | None = None  # ALiBi's, (Hq,) in the compute dtype
    alibi_offset: int = 0

    @classmethod
    def of(cls, problem: Problem, block_q: int, block_k: int, dtype: torch.dtype) -> TileMask:
        """The mask of ``problem`` for tiles block_q x block_k. Masks made of plain numbers
        (``Mask.value_key``: causal, windows, ...) are derived once per size and reused, others
        once per problem (``_tiles.derived``)."""
        p = problem
        if p.mask is None:
            return cls()
        return _tiles.derived(p, ("kernel", block_q, block_k), lambda: cls._derive(p, block_q, block_k, dtype))

    @classmethod
    def _derive(cls, problem: Problem, block_q: int, block_k: int, dtype: torch.dtype) -> TileMask:
        p = problem
        codes = _tiles.block_codes(p, block_q, block_k)
        index = torch.full(codes.shape, ext.FULL_TILE, dtype=torch.int32)
        index[codes == masks.EMPTY] = ext.EMPTY_TILE
        partial = codes == masks.PARTIAL
        spans = _tiles.row_spans(p)
        if spans is not None:
            index[partial] = 0
            return cls(index, lo=spans[0], hi=spans[1])
        spanned, rest = _tiles.spans_and_rest(p)
        leaf = rest[0] if len(rest) == 1 else None
        if isinstance(leaf, masks.ALiBi) or isinstance(leaf, masks.Dense) and leaf.is_additive:
            # one bias, alone or with spans (causal plus ALiBi, a relative or learned bias): every
            # tile the mask leaves is masked by the spans and gets the bias, with no packed tiles:
            # ALiBi computed in the tile from its slopes, a float tensor read where it lies
            index[codes != masks.EMPTY] = 0
            spans = (None, None) if spanned is None else _tiles.row_spans(p, spanned)
            if isinstance(leaf, masks.ALiBi):
                slopes = leaf.slopes.to(dtype).expand(p.Hq).contiguous()
                return cls(index, None, None, *spans, slopes, leaf.offset(p.Lq, p.Lk))
            bias = heads_canonical(leaf.tensor.to(dtype), p.batch_shape, p.Hq)
            bias = bias if bias.stride(-1) == 1 or bias.shape[-1] == 1 else bias.contiguous()
            return cls(index, None, bias, *spans)
        index[partial] = torch.arange(int(partial.sum()), dtype=torch.int32)
        pack = torch.empty(  # the kernel reads only the part of an edge tile inside Lq x Lk
            (int(partial.sum()), block_q, block_k),
            dtype=dtype if p.mask.is_additive else torch.uint8,
        )
        Nm, Hm = codes.shape[:2]
        for qi, kj in partial.any(0).any(0).nonzero().tolist():
            q0, k0 = qi * block_q, kj * block_k
            q1, k1 = min(q0 + block_q, p.Lq), min(k0 + block_k, p.Lk)
            tile = heads_canonical(p.mask.tile(p.Lq, p.Lk, q0, q1, k0, k1), p.batch_shape, p.Hq)
            where = partial[:, :, qi, kj]
            slots = index[:, :, qi, kj][where].long()
            pack[slots, : q1 - q0, : k1 - k0] = tile.expand(Nm, Hm, q1 - q0, k1 - k0)[where].to(pack.dtype)
        if p.mask.is_additive:
            return cls(index, None, pack)
        return cls(index, pack, None)


@dataclass
class KernelCall:
    """Everything the kernel needs besides q, k, v, derived once per problem."""

    problem: Problem
    block_q: int
    block_k: int
    bf16_gemms: bool  # bfloat16 inputs: GEMMs in bfloat16 (else float32)

    def __post_init__(self) -> None:
        p = self.problem
        self.N = math.prod(p.batch_shape)
        self.dtype = compute_dtype(p.dtype)
        # what q, k, v, dO and the output are stored in for the kernel
        self.storage = torch.bfloat16 if self.bf16_gemms else self.dtype
        self.mask = TileMask.of(p, self.block_q, self.block_k, self.dtype)
        self.biases = [] if p.mask is None else p.mask.biases()

    def canonical(self, x: torch.Tensor) -> torch.Tensor:
        """(*batch', H, L, D) -> (N, H, L, D) in the storage dtype, last dim contiguous."""
        H, L, D = x.shape[-3:]
        x = x.expand(*self.problem.batch_shape, H, L, D).reshape(self.N, H, L, D).to(self.storage)
        if not self.problem.inputs_finite:  # the garbage sits where the mask hides it: zero it
            x = zeroed(x)
        return x if x.stride(-1) == 1 else x.contiguous()

    def _extra(self) -> tuple:
        p = self.problem
        m = self.mask
        return (m.index, m.allowed, m.bias, m.lo, m.hi, m.slopes, m.alibi_offset, p.scale, self.block_q,
                self.block_k, p.dropout_p, p.dropout_seed, p.softcap)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """out (N, Hq, Lq, Ev) and lse (N, Hq, Lq) in the compute dtype. For a monitored problem
        (``Problem.stats``) the kernel also leaves each row's statistics in
        ``problem.derived["row_stats"]`` (N, Hq, Lq, 11), computed in the same pass (the layout of csrc/common.h)."""
        p = self.problem
        out, lse, *row_stats = ext.forward(self.canonical(q), self.canonical(k), self.canonical(v), *self._extra(),
                                           p.stats)
        if row_stats:
            p.derived["row_stats"] = row_stats[0]
        return out, lse

    def gradients(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        d_out: torch.Tensor, bias_grads: bool,
    ) -> tuple[torch.Tensor | None, ...]:
        """dq, dk, dv in the shapes of q, k, v (broadcast dims summed; compute dtype), then one
        gradient per float bias leaf when ``bias_grads`` (else None each).
        out, lse, d_out: (N, Hq, Lq, ·)."""
        p = self.problem
        d_out = d_out.to(self.storage).contiguous()
        delta = (d_out.to(self.dtype) * out.to(self.dtype)).sum(-1)  # (N, Hq, Lq)
        ds_index = ds_tiles = None
        if bias_grads:  # every (n, h, partial tile) gets a slot for its score gradient
            partial = (self.mask.index >= 0).expand(self.N, p.Hq, *self.mask.index.shape[2:])
            ds_index = torch.full(partial.shape, -1, dtype=torch.int32)
            ds_index[partial] = torch.arange(int(partial.sum()), dtype=torch.int32)
            # zeros: with row spans the kernel writes only the keys some row of the tile may see
            ds_tiles = torch.zeros(int(partial.sum()), self.block_q, self.block_k, dtype=self.dtype)
        grads = ext.backward(
            self.canonical(q), self.canonical(k), self.canonical(v), d_out, lse.contiguous(), delta, *self._extra(),
            ds_index, ds_tiles,
        )
        dqkv = tuple(
            g.reshape(*p.batch_shape, *g.shape[1:]).sum_to_size(x.shape)
            for g, x in zip(grads, (q, k, v))
        )
        if not bias_grads:
            return (*dqkv, *(None for _ in self.biases))
        return (*dqkv, *(self._bias_grad(b.tensor, ds_index, ds_tiles) for b in self.biases))

    def _bias_grad(self, bias: torch.Tensor, ds_index: torch.Tensor, ds_tiles: torch.Tensor) -> torch.Tensor:
        """A float mask's gradient: the score gradient dS of every partial tile (the only tiles
        an additive mask has besides EMPTY ones), summed over the dims the bias broadcasts.

        bias: (..., R, C), R in {1, Lq}, C in {1, Lk}; ds_index (N, Hq, nQ, nK); ds_tiles (P', bq, bk).
        """
        p = self.problem
        grad = torch.zeros(bias.shape, dtype=self.dtype)
        R, C = bias.shape[-2:]
        for qi, kj in (ds_index >= 0).any(0).any(0).nonzero().tolist():
            q0, k0 = qi * self.block_q, kj * self.block_k
            q1, k1 = min(q0 + self.block_q, p.Lq), min(k0 + self.block_k, p.Lk)
            slots = ds_index[:, :, qi, kj]  # (N, Hq)
            if bool((slots >= 0).all()):
                tile = ds_tiles[slots.flatten().long(), : q1 - q0, : k1 - k0]
            else:  # some (n, h) skipped this tile: their dS is 0
                tile = ds_tiles.new_zeros(self.N, p.Hq, q1 - q0, k1 - k0)
                tile[slots >= 0] = ds_tiles[slots[slots >= 0].long(), : q1 - q0, : k1 - k0]
            tile = tile.reshape(*p.batch_shape, p.Hq, q1 - q0, k1 - k0)
            rows = slice(q0, q1) if R != 1 else slice(0, 1)
            cols = slice(k0, k1) if C != 1 else slice(0, 1)
            target = grad[..., rows, cols]
            target += tile.sum_to_size(target.shape)
        return grad
