"""The Triton split-K decoding kernels ("flash-decoding"): few query rows, a long KV cache.

The forward kernel (``_fwd.py``) gives each (batch, query head) one program per block of
queries. A decoding step has one query per head, so that is B·Hq programs, each reading
its kv head's whole cache, G = Hq/Hkv times over, with one useful row of BLOCK_M. Here:

    rows   the G·Lq query rows of one kv head are one block of rows (r = g·Lq + i is
           query i of query head hk·G + g), so each key and value is read once for them
    parts  the keys some row of the block may attend, [min lo, max hi), cut into S equal
           parts; one program per (part, batch x kv head, row block) fills the GPU
    merge  a second kernel merges the S partial softmaxes of each row by their lse

Scores are in log2 units as in ``_fwd.py``. A part's lse is -inf for a row that saw no key
in it; the merged lse is +inf for a row that no part saw, as the forward kernel writes it.
A key outside a row's span meets that row only as a -inf score. A value row that holds
NaN or inf and that some other row of the block sees can still reach this row's output
(its weight 0 times inf), and so can garbage a row may see: either way the output is not
finite, and the engine then reruns the problem on an engine that marks exactly the rows
that saw it (the split-K engine's rule on the CPU, too).

Shape legend: N flattened batch, Hkv kv heads, G = Hq/Hkv, R = G·Lq rows per kv head,
S parts, E/Ev head dims, BLOCK_E/BLOCK_EV their next powers of two.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dotattn.engines.triton._fwd import (_dot, _dot_rounded, _softmax_result, _softmax_step, _stats_step,
                                         _store_row_stats)


@triton.jit
def decode_parts(
    Q, K, V, PartOut, PartLse, PartStats,
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_kl, stride_ke,
    stride_vb, stride_vh, stride_vl, stride_ve,
    SpanLo, SpanHi, stride_sb, stride_sh,  # int32 row spans (Nm, Hm, Lq), strides 0 where broadcast
    Hkv, G, Lq, Lk, E, Ev, R, n_parts, qk_scale,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    HAS_SPANS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
    STATS: tl.constexpr,
):
    """Each part's softmax on its own: PartOut (S, N·Hkv·R, Ev) and PartLse (S, N·Hkv·R),
    float32, log2 units, and with STATS PartStats (S, N·Hkv·R, 6): Σ p·s (p normalised within
    the part), max s, Σ s, Σ s², allowed keys, s of key 0, log2 units; grid (S, N·Hkv, cdiv(R, BLOCK_R))."""
    part = tl.program_id(0)
    nk = tl.program_id(1).to(tl.int64)
    n = nk // Hkv
    hk = nk % Hkv
    rows = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < R
    h = hk * G + rows // Lq  # each row's query head and query
    i = rows % Lq
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    q = tl.load(Q + n * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_ql + offs_e[None, :] * stride_qe,
                mask=live[:, None] & (offs_e[None, :] < E), other=0.0)
    if HAS_SPANS:
        span = n * stride_sb + h * stride_sh + i
        lo = tl.load(SpanLo + span, mask=live, other=0)
        hi = tl.load(SpanHi + span, mask=live, other=0)
    else:
        lo = tl.zeros([BLOCK_R], dtype=tl.int32)
        hi = tl.zeros([BLOCK_R], dtype=tl.int32) + Lk
    sees = live & (lo < hi)
    # the keys some row sees, then this part's share of them
    first = tl.min(tl.where(sees, lo, Lk))
    last = tl.max(tl.where(sees, hi, 0))
    per_part = tl.cdiv(tl.maximum(last - first, 0), n_parts)
    start = first + part * per_part
    end = tl.minimum(last, start + per_part)

    k_base = K + n * stride_kb + hk * stride_kh
    v_base = V + n * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_EV], dtype=tl.float32)
    st_ps = tl.zeros([BLOCK_R], dtype=tl.float32)
    st_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    st_sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    st_count = tl.zeros([BLOCK_R], dtype=tl.float32)
    st_first = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_part = offs_n < end
        kT = tl.load(k_base + offs_n[None, :] * stride_kl + offs_e[:, None] * stride_ke,
                     mask=in_part[None, :] & (offs_e[:, None] < E), other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_ev[None, :] * stride_ve,
                    mask=in_part[:, None] & (offs_ev[None, :] < Ev), other=0.0)
        s = _dot(q, kT, tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32), PRECISION, UPCAST) * qk_scale
        ok = in_part[None, :] & (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_old = m_i
        p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc)
        if STATS:
            st_ps, st_sum, st_sq, st_count, st_first = _stats_step(s, p, offs_n, m_old, m_i, st_ps, st_sum, st_sq,
                                                                   st_count, st_first)
        acc = _dot_rounded(p, v, acc, PRECISION, UPCAST, SPLIT)

    acc, lse = _softmax_result(acc, l_i, m_i, float("-inf"))
    n_rows = tl.num_programs(1).to(tl.int64) * R
    at = part * n_rows + nk * R + rows  # (BLOCK_R,) row index into (S, N·Hkv·R)
    tl.store(PartOut + at[:, None] * Ev + offs_ev[None, :], acc, mask=live[:, None] & (offs_ev[None, :] < Ev))
    tl.store(PartLse + at, lse, mask=live)
    if STATS:
        part_stats = PartStats + at * 6
        tl.store(part_stats + 0, tl.where(l_i > 0.0, st_ps / tl.where(l_i > 0.0, l_i, 1.0), 0.0), mask=live)
        tl.store(part_stats + 1, m_i, mask=live)
        tl.store(part_stats + 2, st_sum, mask=live)
        tl.store(part_stats + 3, st_sq, mask=live)
        tl.store(part_stats + 4, st_count, mask=live)
        tl.store(part_stats + 5, st_first, mask=live)


@triton.jit
def decode_merge(
    PartOut, PartLse, PartStats, Out, Lse, Stats, n_rows, Ev, n_parts,
    BLOCK_ROWS: tl.constexpr, BLOCK_EV: tl.constexpr, STATS: tl.constexpr,
):
    """Out (n_rows, Ev) in its dtype and Lse (n_rows,) float32 log2, +inf for a row that no part
    saw: the S parts of PartOut (S, n_rows, Ev), PartLse (S, n_rows) merged by their lse
    (a part's NaN or inf reaches the row even where its weight is 0); with STATS, the parts'
    PartStats (S, n_rows, 6) merged into Stats (n_rows, 11), the forward's row figures;
    grid (cdiv(n_rows, BLOCK_ROWS),)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    live = rows < n_rows
    offs_ev = tl.arange(0, BLOCK_EV)
    cell = live[:, None] & (offs_ev[None, :] < Ev)
    m = tl.full([BLOCK_ROWS], float("-inf"), dtype=tl.float32)
    for s in range(0, n_parts):
        m = tl.maximum(m, tl.load(PartLse + s * n_rows + rows, mask=live, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_EV], dtype=tl.float32)
    # the monitor's sums (STATS): Σ p·s relative to total, max s, Σ s, Σ s², allowed keys, s of key 0
    st_ps = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    st_max = tl.full([BLOCK_ROWS], float("-inf"), dtype=tl.float32)
    st_sum = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    st_sq = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    st_count = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    st_first = tl.full([BLOCK_ROWS], float("-inf"), dtype=tl.float32)
    for s in range(0, n_parts):
        w = tl.math.exp2(tl.load(PartLse + s * n_rows + rows, mask=live, other=float("-inf")) - m_safe)
        total += w
        part = tl.load(PartOut + (s * n_rows + rows)[:, None] * Ev + offs_ev[None, :], mask=cell, other=0.0)
        acc += w[:, None] * part
        if STATS:
            part_stats = PartStats + (s * n_rows + rows) * 6
            st_ps += w * tl.load(part_stats + 0, mask=live, other=0.0)
            st_max = tl.maximum(st_max, tl.load(part_stats + 1, mask=live, other=float("-inf")))
            st_sum += tl.load(part_stats + 2, mask=live, other=0.0)
            st_sq += tl.load(part_stats + 3, mask=live, other=0.0)
            st_count += tl.load(part_stats + 4, mask=live, other=0.0)
            st_first = tl.maximum(st_first, tl.load(part_stats + 5, mask=live, other=float("-inf")))
    acc, lse = _softmax_result(acc, total, m_safe, float("inf"))
    tl.store(Out + rows[:, None] * Ev + offs_ev[None, :], acc.to(Out.dtype.element_ty), mask=cell)
    tl.store(Lse + rows, lse, mask=live)
    if STATS:
        _store_row_stats(Stats + rows * 11, live, total, st_max, lse, st_ps, st_sum, st_sq, st_count, st_first)
