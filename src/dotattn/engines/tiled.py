"""The tiled CPU engine: flash-style online softmax, forward and backward.

It has two paths with one semantics. The compiled kernel (``_tiled_kernel.py`` and
``csrc/``) runs whenever it is built and the inputs are finite (or their garbage is
where the mask hides it) and non-empty; this file's torch-ops path runs otherwise
(``TiledEngine.torch_ops_reason`` says why, and ``dotattn.explain`` prints it). Both paths share
the engine contract's ``forward``/``backward`` and the tile sizes; the torch-ops path is
described below.

Queries are cut into chunks of ``block_q`` positions and keys into tiles of
``block_k``; every step is one batched matmul over (batch x kv heads), with the
query heads of a group (GQA) stacked into the rows so K and V are never copied
per query head. The mask's ``block_map`` decides each tile's phase:

    EMPTY    skipped: no work, and its keys are never read
    FULL     no mask work
    PARTIAL  the mask's ``tile`` is applied (bool: -inf where masked; float: added)

Forward keeps the running row max ``m_i``, row sum ``l_i`` and accumulator ``acc``
(float32 for half precisions) and saves only q, k, v, the output and the lse.
Backward (FlashAttention-2) recomputes P = exp(S - lse) tile by tile with
``delta = rowsum(dO * O)``. Memory is O(B·H·L·(E+Ev)) plus one tile's workspace;
an (Lq, Lk) tensor exists only when the weights are asked for.

Shape legend: N flattened batch, Hkv kv heads, G query heads per kv head,
Lq/Lk lengths, E head dim, Ev value dim; "rows" of a chunk are G·bq.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dotattn import _score_mod, _tiles, masks
from dotattn._dropout import keep_mask
from dotattn._inputs import Problem
from dotattn._layout import grouped, heads_uncanonical
from dotattn._nonfinite import finite_part, garbage_is_masked
from dotattn.engines import _tiled_kernel
from dotattn.engines.base import Engine, Support, compute_dtype
from dotattn.engines.reference import autograd_on
from dotattn.engines.registry import register

BLOCK_Q = 128
BLOCK_K = 256
_NEG_INF = float("-inf")


def _rows_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, Hkv, G, r, d) @ (n, Hkv, d, c) -> (n, Hkv, G, r, c) as one batched matmul.

    The G query heads that share a kv head are stacked into the rows, so the kv
    operand is used as it is, never expanded per query head.
    """
    n, h, g, r, d = a.shape
    return (a.reshape(n, h, g * r, d) @ b).view(n, h, g, r, b.shape[-1])


def _heads_summed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over G of aᵀ b: (n, Hkv, G, r, c), (n, Hkv, G, r, d) -> (n, Hkv, c, d)."""
    n, h, g, r, c = a.shape
    return a.reshape(n, h, g * r, c).transpose(-2, -1) @ b.reshape(n, h, g * r, b.shape[-1])


def _phase(codes: torch.Tensor) -> torch.Tensor:
    """Block codes (n, h, g, nQ, nK) of one group -> one code per tile (nQ, nK).

    A tile is EMPTY only if it is empty for every row of the group, FULL only if full
    for every row; otherwise it is PARTIAL and the exact mask is applied.
    """
    flat = codes.flatten(0, 2)
    lo, hi = flat.amin(0), flat.amax(0)
    return torch.where(
        hi == masks.EMPTY, masks.EMPTY, torch.where(lo == masks.FULL, masks.FULL, masks.PARTIAL)
    )


@dataclass
class _Inputs:
    """q, k, v in canonical layout and compute dtype, with non-finite entries zeroed.

    q: (N, Hkv, G, Lq, E)  k: (N, Hkv, Lk, E)  v: (N, Hkv, Lk, Ev)
    q_bad: (N, Hkv, G, Lq) rows holding NaN/inf; k_bad: (N, Hkv, Lk); v_bad: (N, Hkv, Lk, Ev)
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_bad: torch.Tensor | None
    k_bad: torch.Tensor | None
    v_bad: torch.Tensor | None


@dataclass
class _Plan:
    """Everything about a problem the tile loops need, derived once."""

    problem: Problem
    block_q: int
    block_k: int
    N: int = field(init=False)
    G: int = field(init=False)
    groups: list[slice] = field(init=False)
    phases: list[torch.Tensor] = field(init=False)
    biases: list[masks.Dense] = field(init=False)

    def __post_init__(self) -> None:
        p = self.problem
        self.N = math.prod(p.batch_shape)
        self.G = p.Hq // p.Hkv
        self.biases = [] if p.mask is None else p.mask.biases()
        codes = _tiles.block_codes(p, self.block_q, self.block_k)  # (Nm, Hq or 1, nQ, nK)
        codes = codes.reshape(codes.shape[0], p.Hkv, self.G, *codes.shape[2:]) if codes.shape[1] != 1 else \
            codes.unsqueeze(2)  # (Nm, h, g, nQ, nK)
        if codes.shape[0] == 1:
            self.groups = [slice(0, self.N)]
            self.phases = [_phase(codes)]
        else:  # the mask differs per batch row (padding, documents): skip per row
            self.groups = [slice(n, n + 1) for n in range(self.N)]
            self.phases = [_phase(codes[n : n + 1]) for n in range(self.N)]

    def inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> _Inputs:
        p = self.problem
        compute = compute_dtype(q.dtype)
        batch = p.batch_shape
        q = q.expand(*batch, p.Hq, p.Lq, p.E).reshape(self.N, p.Hkv, self.G, p.Lq, p.E)
        k = k.expand(*batch, p.Hkv, p.Lk, p.E).reshape(self.N, p.Hkv, p.Lk, p.E)
        v = v.expand(*batch, p.Hkv, p.Lk, p.Ev).reshape(self.N, p.Hkv, p.Lk, p.Ev)
        q, q_bad = finite_part(q.to(compute))
        k, k_bad = finite_part(k.to(compute))
        v, v_bad = finite_part(v.to(compute))
        return _Inputs(
            q, k, v,
            None if q_bad is None else q_bad.any(-1),
            None if k_bad is None else k_bad.any(-1),
            v_bad,
        )

    def tiles(self, group: int, qi: int):
        """The key tiles of query chunk ``qi`` in ``group`` that are not EMPTY: (kj, k0, k1, code)."""
        row = self.phases[group][qi].tolist()
        for kj, code in enumerate(row):
            if code != masks.EMPTY:
                k0 = kj * self.block_k
                yield kj, k0, min(k0 + self.block_k, self.problem.Lk), code

    def scores(
        self, x: _Inputs, rows: slice, q0: int, q1: int, k0: int, k1: int, code: int, graph: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scaled (soft-capped, score_mod'ed when asked), masked scores of one tile, (n, Hkv, G, bq, bk),
        and the mask tile applied (canonical bool or float, None for a FULL tile). ``graph``: see
        ``_score_mod``."""
        p = self.problem
        s = _rows_matmul(x.q[rows, :, :, q0:q1], x.k[rows, :, k0:k1].transpose(-2, -1))
        s.mul_(p.scale)
        if p.softcap:
            s.div_(p.softcap).tanh_().mul_(p.softcap)
        if p.score_mod is not None:
            s = self._score_mod(s, rows, q0, k0, graph)
        if x.q_bad is not None or x.k_bad is not None:
            bad = torch.zeros(s.shape, dtype=torch.bool)
            if x.q_bad is not None:
                bad |= x.q_bad[rows, :, :, q0:q1, None]
            if x.k_bad is not None:
                bad |= x.k_bad[rows, :, None, None, k0:k1]
            s.masked_fill_(bad, float("nan"))
        if code == masks.FULL:
            return s, None
        t = grouped(p.mask.tile(p.Lq, p.Lk, q0, q1, k0, k1, device=s.device), p.batch_shape, p.Hkv, self.G)
        t = t[rows] if t.shape[0] > 1 else t
        if p.mask.is_additive:
            s.add_(t)
            s.masked_fill_(t == _NEG_INF, _NEG_INF)
        else:
            s.masked_fill_(~t, _NEG_INF)
        return s, t

    def _score_mod(self, s: torch.Tensor, rows: slice, q0: int, k0: int, graph: list | None) -> torch.Tensor:
        """The problem's score_mod on one tile's scores s (n, Hkv, G, bq, bk), with the tile's
        indices in that layout (b the flattened batch row). With ``graph`` (backward), the tile
        runs under autograd and its (scores in, scores out) pair is appended to it, so the tile's
        score gradient can be taken back through the function to the scores and the tensors it
        captures; the scores returned are a copy that later steps may change in place."""
        p = self.problem
        if graph is None:
            return _score_mod.apply_tile(p.score_mod, s, rows, p.Hkv, q0, k0)
        s_in = s.detach().requires_grad_()
        with autograd_on():
            s_out = _score_mod.apply_tile(p.score_mod, s_in, rows, p.Hkv, q0, k0)
        graph.append((s_in, s_out))
        return s_out.detach().clone()

    def keep(self, rows: slice, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        """The shared dropout pattern of one tile, (n, Hkv, G, bq, bk)."""
        p = self.problem
        bh = torch.arange(self.N * p.Hq).reshape(self.N, p.Hkv, self.G, 1, 1)[rows]
        return keep_mask(
            p.dropout_seed, p.dropout_p, bh,
            torch.arange(q0, q1)[:, None], torch.arange(k0, k1),
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """out (N, Hkv, G, Lq, Ev) in the compute dtype, lse (N, Hkv, G, Lq) float32/64."""
        p = self.problem
        x = self.inputs(q, k, v)
        acc_dtype = x.q.dtype
        out = x.q.new_zeros(self.N, p.Hkv, self.G, p.Lq, p.Ev)
        lse = x.q.new_full((self.N, p.Hkv, self.G, p.Lq), _NEG_INF)
        for g, rows in enumerate(self.groups):
            for qi, q0 in enumerate(range(0, p.Lq, self.block_q)):
                q1 = min(q0 + self.block_q, p.Lq)
                n = rows.stop - rows.start
                m_i = x.q.new_full((n, p.Hkv, self.G, q1 - q0, 1), _NEG_INF)
                l_i = x.q.new_zeros((n, p.Hkv, self.G, q1 - q0, 1))
                acc = x.q.new_zeros((n, p.Hkv, self.G, q1 - q0, p.Ev), dtype=acc_dtype)
                contaminated = None
                for _, k0, k1, code in self.tiles(g, qi):
                    s, t = self.scores(x, rows, q0, q1, k0, k1, code)
                    m_new = torch.maximum(m_i, s.amax(-1, keepdim=True))
                    m_safe = torch.where(m_new == _NEG_INF, 0.0, m_new)
                    alpha = torch.exp(m_i - m_safe)
                    s.sub_(m_safe).exp_()  # s is now P~ = exp(S - m)
                    l_i.mul_(alpha).add_(s.sum(-1, keepdim=True))
                    if p.dropout_p > 0:
                        s.mul_(self.keep(rows, q0, q1, k0, k1)).mul_(1.0 / (1.0 - p.dropout_p))
                    acc.mul_(alpha).add_(_rows_matmul(s, x.v[rows, :, k0:k1]))
                    m_i = m_new
                    if x.v_bad is not None:
                        sees = torch.ones_like(s) if t is None else self._allowed(t).to(s.dtype).expand_as(s)
                        hit = _rows_matmul(sees, x.v_bad[rows, :, k0:k1].to(s.dtype)) > 0
                        contaminated = hit if contaminated is None else contaminated | hit
                alive = l_i > 0
                acc.div_(torch.where(alive, l_i, 1.0))
                if contaminated is not None:
                    acc.masked_fill_(contaminated, float("nan"))
                out[rows, :, :, q0:q1] = acc
                lse[rows, :, :, q0:q1] = torch.where(alive, m_i + torch.log(l_i), _NEG_INF).squeeze(-1)
        return out, lse

    def _allowed(self, t: torch.Tensor) -> torch.Tensor:
        return t != _NEG_INF if self.problem.mask.is_additive else t

    def backward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        d_out: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """dq, dk, dv in canonical layout (compute dtype) and one gradient per float bias leaf."""
        p = self.problem
        x = self.inputs(q, k, v)
        d_out = d_out.to(x.q.dtype)
        delta = (d_out * out).sum(-1, keepdim=True)  # (N, Hkv, G, Lq, 1)
        lse_safe = torch.where(lse == _NEG_INF, 0.0, lse).unsqueeze(-1)
        dq = torch.zeros_like(x.q)
        dk = torch.zeros_like(x.k)
        dv = torch.zeros_like(x.v)
        bias_grads = [torch.zeros_like(grouped(b.tensor, p.batch_shape, p.Hkv, self.G), dtype=x.q.dtype)
                      for b in self.biases]
        captured = [t for t in p.score_mod_tensors if t.requires_grad]
        captured_grads = [torch.zeros_like(t) for t in captured]
        graph: list | None = None if p.score_mod is None else []
        for g, rows in enumerate(self.groups):
            for qi, q0 in enumerate(range(0, p.Lq, self.block_q)):
                q1 = min(q0 + self.block_q, p.Lq)
                q_c = x.q[rows, :, :, q0:q1]
                do_c = d_out[rows, :, :, q0:q1]
                for _, k0, k1, code in self.tiles(g, qi):
                    s, _ = self.scores(x, rows, q0, q1, k0, k1, code, graph)
                    prob = s.sub_(lse_safe[rows, :, :, q0:q1]).exp_()  # (n, Hkv, G, bq, bk)
                    dp = _rows_matmul(do_c, x.v[rows, :, k0:k1].transpose(-2, -1))
                    if p.dropout_p > 0:
                        kept = self.keep(rows, q0, q1, k0, k1).to(prob.dtype).mul_(1.0 / (1.0 - p.dropout_p))
                        dp.mul_(kept)
                        p_drop = prob * kept
                    else:
                        p_drop = prob
                    dv[rows, :, k0:k1] += _heads_summed(p_drop, do_c)
                    if p.softcap:  # 1 - tanh(s/c)², soft-capping's derivative, from the zeroed inputs
                        raw = _rows_matmul(q_c, x.k[rows, :, k0:k1].transpose(-2, -1)).mul_(p.scale / p.softcap)
                        d_cap = 1 - raw.tanh_().square_()
                    ds = prob.mul_(dp.sub_(delta[rows, :, :, q0:q1]))  # dS, the score gradient
                    for bias, grad in zip(self.biases, bias_grads):
                        self._add_bias_grad(grad, bias, ds, rows, q0, q1, k0, k1)
                    if graph:  # dS of score_mod's output -> of its input, and of the tensors it captures
                        s_in, s_out = graph.pop()
                        d_in, *d_captured = torch.autograd.grad(s_out, [s_in, *captured], ds, allow_unused=True)
                        ds = torch.zeros_like(ds) if d_in is None else d_in
                        for total, part in zip(captured_grads, d_captured):
                            if part is not None:
                                total += part
                    if p.softcap:  # dS of the capped scores -> of scale Q Kᵀ
                        ds.mul_(d_cap)
                    dq[rows, :, :, q0:q1] += _rows_matmul(ds, x.k[rows, :, k0:k1]).mul_(p.scale)
                    dk[rows, :, k0:k1] += _heads_summed(ds, q_c).mul_(p.scale)
        if p.score_mod is not None:
            _score_mod.store_grads(p, captured, captured_grads)
        return dq, dk, dv, bias_grads

    def gradients(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        d_out: torch.Tensor, bias_grads: bool,
    ) -> tuple[torch.Tensor, ...]:
        """dq, dk, dv in the shapes of q, k, v (compute dtype), then one gradient per float bias
        leaf (computed whether or not ``bias_grads``: the score gradient is at hand anyway).
        out, lse, d_out: (N, Hkv, G, Lq, ·)."""
        p = self.problem
        dq, dk, dv, grads = self.backward(q, k, v, out, lse, d_out)
        batch = p.batch_shape
        dq = dq.reshape(*batch, p.Hq, p.Lq, p.E).sum_to_size(q.shape)
        dk = dk.reshape(*batch, p.Hkv, p.Lk, p.E).sum_to_size(k.shape)
        dv = dv.reshape(*batch, p.Hkv, p.Lk, p.Ev).sum_to_size(v.shape)
        return (dq, dk, dv, *(_uncanonical(g, b.tensor, batch) for b, g in zip(self.biases, grads)))

    def _add_bias_grad(
        self, grad: torch.Tensor, bias: masks.Dense, ds: torch.Tensor, rows: slice,
        q0: int, q1: int, k0: int, k1: int,
    ) -> None:
        """Add a tile's score gradient into a bias leaf's canonical gradient (Nb, h, g, R, C),
        summing over the dims the bias broadcasts along."""
        Nb, h, _, R, C = grad.shape
        part = ds
        if Nb == 1:
            part = part.sum(0, keepdim=True)
        if h == 1:
            part = part.sum((1, 2), keepdim=True)
        r = slice(q0, q1) if R != 1 else slice(0, 1)
        c = slice(k0, k1) if C != 1 else slice(0, 1)
        if R == 1:
            part = part.sum(-2, keepdim=True)
        if C == 1:
            part = part.sum(-1, keepdim=True)
        target = grad[rows] if Nb != 1 else grad
        target[..., r, c] += part


def _uncanonical(grad: torch.Tensor, like: torch.Tensor, batch: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``grouped`` for a gradient: (Nb, h, g, R, C) -> like.shape, summing broadcast dims."""
    Nb, h, g, R, C = grad.shape
    return heads_uncanonical(grad.reshape(Nb, h * g, R, C), batch, like.shape)


class TiledEngine(Engine):
    name = "tiled"
    description = "flash-style online softmax over tiles, compiled (torch ops as fallback); skips masked tiles; O(L) memory"
    support = Support(devices=("cpu",), dtypes=(torch.float32, torch.bfloat16, torch.float64), softcap=True,
                      score_mod=True)  # score_mod on the torch-ops path
    priority = 10

    # Below this many scores (B·H·Lq·Lk), with a mask that holds tensors (whose tiles are
    # classified anew each call), the reference engine's few whole-tensor ops beat the
    # tiled engine's set-up, so auto passes it over (benchmarks/crossover.py). Without a
    # mask, or with a number-only mask (cached), tiled is faster at every size measured.
    AUTO_MIN_SCORES = 32768

    def __init__(self, block_q: int = BLOCK_Q, block_k: int = BLOCK_K, use_kernel: bool = True,
                 bf16_gemms: bool | None = None) -> None:
        self.block_q = block_q
        self.block_k = block_k
        self.use_kernel = use_kernel
        self.bf16_gemms = bf16_gemms  # None: decided by measuring this machine

    def _bf16_gemms(self, E: int) -> tuple[bool, str]:
        """Whether the kernel runs bfloat16 problems of head dim E in bfloat16 GEMMs, and why."""
        if self.bf16_gemms is None:
            return _tiled_kernel.bf16_gemms(E, self.block_q, self.block_k)
        return self.bf16_gemms, ("bfloat16 GEMMs" if self.bf16_gemms else "bfloat16 computed in float32 GEMMs") + (
            " (set on this engine)")

    def auto_skip(self, problem: Problem, after: tuple[str, ...] | None = None) -> str | None:
        p = problem
        if p.mask is None or p.mask.value_key is not None or (after is not None and "reference" not in after):
            return None
        scores = math.prod(p.batch_shape) * p.Hq * p.Lq * p.Lk
        if scores < self.AUTO_MIN_SCORES:
            return (f"the problem is small (B·H·Lq·Lk = {scores} < {self.AUTO_MIN_SCORES}) and its mask holds "
                    "tensors, which the tiled engine classifies per call: the reference engine is faster; "
                    "engine='tiled' forces it")
        return None

    def torch_ops_reason(self, problem: Problem) -> str | None:
        """Why this problem runs in torch ops rather than the compiled kernel; None when it does not."""
        p = problem
        if not self.use_kernel:
            return "this instance is set to torch ops"
        if _tiled_kernel.MISSING is not None:
            return _tiled_kernel.MISSING
        if 0 in (math.prod(p.batch_shape), p.Hq, p.Lq, p.Lk, p.E, p.Ev):
            return "the problem is empty"
        if p.score_mod is not None:
            return "score_mod= is a Python function, which the compiled kernel cannot call: torch ops call it per tile"
        if not p.inputs_finite and not garbage_is_masked(p):
            return ("query, key or value hold NaN or inf that the mask lets a query see (or a mask without "
                    "row spans hides), which the torch-ops path marks exactly")
        return None

    def detail(self, problem: Problem) -> str:
        why = self.torch_ops_reason(problem)
        if why is not None:
            return f"torch ops, because {why}"
        kernel = f"compiled kernel ({_tiled_kernel.LEVEL})"
        if problem.dtype == torch.bfloat16:
            return f"{kernel}, " + self._bf16_gemms(problem.E)[1]
        return kernel

    def plan(self, problem: Problem) -> _Plan | _tiled_kernel.KernelCall:
        """How this engine runs ``problem``: the compiled kernel's call, else the torch-ops plan
        (their mask tiles are derived once per problem, ``_tiles.derived``)."""
        p = problem
        if self.torch_ops_reason(p) is None:
            bf16 = p.dtype == torch.bfloat16 and self._bf16_gemms(p.E)[0]
            return _tiled_kernel.KernelCall(p, self.block_q, self.block_k, bf16)
        return _Plan(p, self.block_q, self.block_k)

    def forward(self, problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
        p = problem
        out, lse = self.plan(p).forward(p.query, p.key, p.value)
        N = math.prod(p.batch_shape)
        return out.reshape(N, p.Hq, p.Lq, p.Ev), lse.reshape(N, p.Hq, p.Lq)

    def backward(self, problem, out, lse, d_out, *, bias_grads=False):
        p = problem
        plan = self.plan(p)
        if isinstance(plan, _Plan):  # its layout splits the heads: (N, Hkv, G, ...)
            out, d_out = (x.reshape(plan.N, p.Hkv, plan.G, p.Lq, p.Ev) for x in (out, d_out))
            lse = lse.reshape(plan.N, p.Hkv, plan.G, p.Lq)
        dq, dk, dv, *d_biases = plan.gradients(p.query, p.key, p.value, out, lse, d_out, bias_grads)
        return dq, dk, dv, tuple(d_biases) if bias_grads else tuple(None for _ in d_biases)


register(TiledEngine())
