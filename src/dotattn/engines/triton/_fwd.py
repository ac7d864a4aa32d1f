"""The Triton forward kernel, and the device helpers the backward kernels share.

Scores are kept in log2 units (``qk_scale = scale · log2 e``), so the softmax runs on
``exp2``; the saved lse is ``m_i + log2(l_i)`` in those units, +inf for a row that sees
no key (so backward's ``exp2(s - lse)`` is 0 there, never NaN). The engine converts it
to the natural log, -inf for such rows, before the user sees it.

A program owns one query block of one (batch, query head). It visits the key tiles the
mask's block map lists for its block, in two phases: FULL tiles without any mask work,
then PARTIAL tiles with the mask evaluated in the kernel: row spans (each row may attend
keys lo <= j < hi: causal in both alignments, sliding windows, padding, prefix-LM,
sorted documents and their intersections, from O(L) numbers), a block-sparse layout
(one entry per layout block), a boolean tensor read tile by tile, and an additive bias
read tile by tile. EMPTY tiles are never listed.

Shape legend: N flattened batch, Hq/Hkv heads (query head h reads kv head h // G),
Lq/Lk lengths, E head dim, Ev value dim, BLOCK_E/BLOCK_EV their next powers of two.
"""

from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST computes in float32: Triton's interpreter multiplies bfloat16
    operands as raw bits (triton 3.9), while a GPU's bf16 MMA takes exact products in
    float32 anyway, so the two agree."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _dot_rounded(p, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr):
    """acc + p @ b for a float32 p (probabilities, score gradients) and b in the input
    dtype: p is rounded to b's dtype, as FlashAttention does; with SPLIT (16-bit inputs)
    also its rounding error, p = hi + lo, for twice the precision at twice the MMAs."""
    hi = p.to(b.dtype)
    acc = _dot(hi, b, acc, PRECISION, UPCAST)
    if SPLIT:
        acc = _dot((p - hi.to(tl.float32)).to(b.dtype), b, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _tanh(x):
    """tanh from exp2 (1 - 2 / (e^2x + 1)): Triton's language has no tanh of its own."""
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _soft_cap(s, cap2):
    """Logit soft-capping on scores in log2 units: s -> cap2·tanh(s / cap2), with cap2 the cap
    in log2 units (softcap · log2 e), and the tanh, whose 1 - tanh² backward multiplies into dS."""
    t = _tanh(s / cap2)
    return cap2 * t, t


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 values held in int64, as ``dotattn._dropout.mix32``: a product
    wraps in int64, and its low 32 bits are the uint32 product."""
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _keep(seed, bh, offs_m, offs_n, threshold_shifted, TRANSPOSED: tl.constexpr):
    """The shared dropout pattern of one tile (``dotattn._dropout.keep_mask``): bool
    (BLOCK_M, BLOCK_N), or (BLOCK_N, BLOCK_M) when TRANSPOSED. The threshold arrives
    shifted by -2**31 so it fits an int32 argument."""
    row_key = _mix32(_mix32(bh.to(tl.int64) ^ seed) ^ _mix32(offs_m.to(tl.int64)))
    cols = offs_n.to(tl.int64)
    if TRANSPOSED:
        u = _mix32(row_key[None, :] ^ cols[:, None])
    else:
        u = _mix32(row_key[:, None] ^ cols[None, :])
    return (u - 2147483648) >= threshold_shifted


@triton.jit
def _tile_allowed(
    offs_m, offs_n, Lq, Lk,
    span_lo, span_hi,  # int32 (BLOCK_M,) of this block's rows
    allowed_base, stride_am, stride_ak,  # the bool mask of this (batch, head), as uint8
    layout_base, stride_lr, stride_lc, layout_bq, layout_bk,  # a block-sparse layout, as uint8
    HAS_SPANS: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_LAYOUT: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    """Which entries of a PARTIAL tile may attend: bool (BLOCK_M, BLOCK_N), or
    (BLOCK_N, BLOCK_M) when TRANSPOSED (the dk/dv kernel's layout)."""
    if TRANSPOSED:
        m = offs_m[None, :]
        n = offs_n[:, None]
        lo = span_lo[None, :]
        hi = span_hi[None, :]
    else:
        m = offs_m[:, None]
        n = offs_n[None, :]
        lo = span_lo[:, None]
        hi = span_hi[:, None]
    inside = (m < Lq) & (n < Lk)
    ok = inside
    if HAS_SPANS:
        ok = ok & (n >= lo) & (n < hi)
    if HAS_ALLOWED:
        ok = ok & (tl.load(allowed_base + m * stride_am + n * stride_ak, mask=inside, other=0) != 0)
    if HAS_LAYOUT:
        block = layout_base + (m // layout_bq) * stride_lr + (n // layout_bk) * stride_lc
        ok = ok & (tl.load(block, mask=inside, other=0) != 0)
    return ok


@triton.jit
def _tile_bias(offs_m, offs_n, Lq, Lk, bias_base, stride_bm, stride_bk, TRANSPOSED: tl.constexpr):
    """The additive mask of one tile in log2 units (times log2 e), float32, 0 outside Lq x Lk."""
    if TRANSPOSED:
        m = offs_m[None, :]
        n = offs_n[:, None]
    else:
        m = offs_m[:, None]
        n = offs_n[None, :]
    b = tl.load(bias_base + m * stride_bm + n * stride_bk, mask=(m < Lq) & (n < Lk), other=0.0)
    return b.to(tl.float32) * 1.4426950408889634


@triton.jit
def _softmax_step(s, m_i, l_i, acc):
    """One key tile folded into the running softmax of its rows: s (rows, keys) in log2 units,
    -inf where masked. Returns the tile's unnormalised weights p, and m_i, l_i and acc
    brought to the new row maxima (acc still lacks p @ v). A row that has seen only -inf
    keeps m_i -inf, l_i 0 and p 0, never NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@triton.jit
def _stats_step(s, p, offs_n, m_old, m_new, st_ps, st_sum, st_sq, st_count, st_first):
    """One key tile folded into the rows' monitor sums (log2 units): Σ p·s rescaled as l_i is
    (p from _softmax_step, m_old and m_new the row maxima before and after it), Σ s, Σ s²,
    allowed keys, and the score of key 0."""
    seen = s > float("-inf")
    s_seen = tl.where(seen, s, 0.0)  # 0 where masked, so that p·s stays 0
    alpha = tl.math.exp2(m_old - tl.where(m_new == float("-inf"), 0.0, m_new))
    st_ps = st_ps * alpha + tl.sum(p * s_seen, 1)
    st_sum += tl.sum(s_seen, 1)
    st_sq += tl.sum(s_seen * s_seen, 1)
    st_count += tl.sum(seen.to(tl.float32), 1)
    st_first = tl.maximum(st_first, tl.max(tl.where(offs_n[None, :] == 0, s, float("-inf")), 1))
    return st_ps, st_sum, st_sq, st_count, st_first


@triton.jit
def _softmax_result(acc, l_i, m_i, dead_lse):
    """The rows' output acc / l_i and lse m_i + log2(l_i); 0 and ``dead_lse`` for a row that saw no key."""
    alive = l_i > 0.0
    out = acc / tl.where(alive, l_i, 1.0)[:, None]
    return out, tl.where(alive, m_i + tl.math.log2(tl.where(alive, l_i, 1.0)), dead_lse)


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, st_ps, st_sum, st_sq, st_count, st_first, q,
    k_base, v_base, stride_kl, stride_ke, stride_vl, stride_ve,
    idx_base, count,  # the key tiles to visit: count indices at idx_base (or 0..count-1 when idx_base is None)
    offs_m, offs_e, offs_ev, Lq, Lk, E, Ev, qk_scale,
    span_lo, span_hi, allowed_base, stride_am, stride_ak,
    layout_base, stride_lr, stride_lc, layout_bq, layout_bk,
    bias_base, stride_bm, stride_bk,
    seed, bh, threshold_shifted, inv_keep, cap2,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, LISTED: tl.constexpr, EVEN_N: tl.constexpr,
    HAS_SPANS: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_LAYOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_CAP: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr, STATS: tl.constexpr,
):
    """One phase of the forward: fold ``count`` key tiles into the running m_i, l_i, acc, and
    with STATS the rows' monitor sums (log2 units): Σ p·s rescaled like l_i, Σ s, Σ s², allowed
    keys, and the score of key 0."""
    for t in range(0, count):
        if LISTED:
            start_n = tl.load(idx_base + t) * BLOCK_N
        else:
            start_n = t * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[None, :] * stride_kl + offs_e[:, None] * stride_ke  # (BLOCK_E, BLOCK_N)
        v_ptrs = v_base + offs_n[:, None] * stride_vl + offs_ev[None, :] * stride_ve  # (BLOCK_N, BLOCK_EV)
        kT = tl.load(k_ptrs, mask=(offs_n[None, :] < Lk) & (offs_e[:, None] < E), other=0.0)
        v = tl.load(v_ptrs, mask=(offs_n[:, None] < Lk) & (offs_ev[None, :] < Ev), other=0.0)
        s = _dot(q, kT, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), PRECISION, UPCAST) * qk_scale
        if HAS_CAP:  # before the mask, as the reference does
            s, _ = _soft_cap(s, cap2)
        if MASKED:  # partial tile: apply the mask
            if HAS_BIAS:
                s += _tile_bias(offs_m, offs_n, Lq, Lk, bias_base, stride_bm, stride_bk, False)
            ok = _tile_allowed(offs_m, offs_n, Lq, Lk, span_lo, span_hi, allowed_base, stride_am, stride_ak,
                               layout_base, stride_lr, stride_lc, layout_bq, layout_bk,
                               HAS_SPANS, HAS_ALLOWED, HAS_LAYOUT, False)
            s = tl.where(ok, s, float("-inf"))
        elif not EVEN_N:  # full tile: only the keys past Lk of the last tile
            s = tl.where(offs_n[None, :] < Lk, s, float("-inf"))
        m_old = m_i
        p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc)
        if STATS:  # from the weights before dropout, as the reference's
            st_ps, st_sum, st_sq, st_count, st_first = _stats_step(s, p, offs_n, m_old, m_i, st_ps, st_sum, st_sq,
                                                                   st_count, st_first)
        if HAS_DROPOUT:
            p = tl.where(_keep(seed, bh, offs_m, offs_n, threshold_shifted, False), p * inv_keep, 0.0)
        acc = _dot_rounded(p, v, acc, PRECISION, UPCAST, SPLIT)
    return acc, l_i, m_i, st_ps, st_sum, st_sq, st_count, st_first


@triton.jit
def _store_row_stats(base, ok, l_i, m_i, lse2, st_ps, st_sum, st_sq, st_count, st_first):
    """Rows' monitor figures, 11 float32 each at ``base`` (a row's pointer) where ``ok``, in
    natural units and the layout of the CPU kernels (csrc/common.h): sees a key, sees none, 0,
    allowed keys, Σ s, Σ s², entropy, normalized entropy, max p, p of key 0, max s. The sums
    arrive in log2 units, st_ps = Σ p·s with p relative to l_i."""
    alive = l_i > 0.0
    one = tl.where(alive, 1.0, 0.0)
    entropy = tl.where(alive, 0.6931471805599453 * (lse2 - st_ps / tl.where(alive, l_i, 1.0)), 0.0)
    normalized = tl.where(alive & (st_count > 1.0),
                          entropy / tl.log(tl.where(st_count > 1.0, st_count, 2.0)), 0.0)
    lse_safe = tl.where(alive, lse2, 0.0)
    tl.store(base + 0, one, mask=ok)
    tl.store(base + 1, 1.0 - one, mask=ok)
    tl.store(base + 2, 0.0 * one, mask=ok)
    tl.store(base + 3, st_count, mask=ok)
    tl.store(base + 4, 0.6931471805599453 * st_sum, mask=ok)
    tl.store(base + 5, 0.4804530139182014 * st_sq, mask=ok)
    tl.store(base + 6, entropy, mask=ok)
    tl.store(base + 7, normalized, mask=ok)
    tl.store(base + 8, tl.where(alive, tl.math.exp2(m_i - lse_safe), 0.0), mask=ok)
    tl.store(base + 9, tl.where(alive, tl.math.exp2(st_first - lse_safe), 0.0), mask=ok)
    tl.store(base + 10, tl.where(alive, 0.6931471805599453 * m_i, float("-inf")), mask=ok)


@triton.jit
def attn_fwd(
    Q, K, V, Out, Lse, Stats,
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_kl, stride_ke,
    stride_vb, stride_vh, stride_vl, stride_ve,
    stride_ob, stride_oh, stride_ol, stride_oe,
    Hq, G, Lq, Lk, E, Ev, qk_scale,
    # the mask: row spans (Nm, Hm, Lq), a bool tensor and a bias, each (Nm, Hm, R, C) by strides
    SpanLo, SpanHi, stride_sb, stride_sh,
    Allowed, stride_ab, stride_ah, stride_am, stride_ak,
    Layout, stride_lb, stride_lh, stride_lr, stride_lc, layout_bq, layout_bk,
    Bias, stride_bb, stride_bh, stride_bm, stride_bk,
    # the block map as tile lists (Nm, Hm, nQ[, nK]): FULL tiles, then PARTIAL tiles
    FullCount, FullIdx, PartCount, PartIdx, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im,
    n_k_tiles, seed, threshold_shifted, inv_keep, cap2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    HAS_MAP: tl.constexpr, EVEN_N: tl.constexpr,
    HAS_SPANS: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_LAYOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_CAP: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr, STATS: tl.constexpr,
):
    """out (N, Hq, Lq, Ev) and lse (N, Hq, Lq) float32, log2 units; with STATS each row's
    monitor figures in Stats (N, Hq, Lq, 11) float32; grid (cdiv(Lq, BLOCK_M), N·Hq)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    n = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    q_ptrs = Q + n * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_e[None, :] * stride_qe
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Lq) & (offs_e[None, :] < E), other=0.0)
    k_base = K + n * stride_kb + (h // G) * stride_kh
    v_base = V + n * stride_vb + (h // G) * stride_vh

    span_lo = tl.zeros([BLOCK_M], dtype=tl.int32)
    span_hi = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_SPANS:
        span_lo = tl.load(SpanLo + n * stride_sb + h * stride_sh + offs_m, mask=offs_m < Lq, other=0)
        span_hi = tl.load(SpanHi + n * stride_sb + h * stride_sh + offs_m, mask=offs_m < Lq, other=0)
    allowed_base = Allowed + n * stride_ab + h * stride_ah
    layout_base = Layout + n * stride_lb + h * stride_lh
    bias_base = Bias + n * stride_bb + h * stride_bh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_EV], dtype=tl.float32)
    # the rows' monitor sums (STATS), log2 units
    st_ps = tl.zeros([BLOCK_M], dtype=tl.float32)
    st_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    st_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    st_count = tl.zeros([BLOCK_M], dtype=tl.float32)
    st_first = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if HAS_MAP:
        at = n * stride_cb + h * stride_ch + tl.program_id(0) * stride_cm
        lists = n * stride_ib + h * stride_ih + tl.program_id(0) * stride_im
        # off-band tiles: every entry may attend, no mask work
        acc, l_i, m_i, st_ps, st_sum, st_sq, st_count, st_first = _attn_fwd_inner(
            acc, l_i, m_i, st_ps, st_sum, st_sq, st_count, st_first, q, k_base, v_base, stride_kl, stride_ke, stride_vl, stride_ve,
            FullIdx + lists, tl.load(FullCount + at),
            offs_m, offs_e, offs_ev, Lq, Lk, E, Ev, qk_scale,
            span_lo, span_hi, allowed_base, stride_am, stride_ak, layout_base, stride_lr, stride_lc, layout_bq,
            layout_bk, bias_base, stride_bm, stride_bk,
            seed, bh, threshold_shifted, inv_keep, cap2,
            BLOCK_N, False, True, EVEN_N, HAS_SPANS, HAS_ALLOWED, HAS_LAYOUT, HAS_BIAS, HAS_DROPOUT, HAS_CAP, PRECISION,
            UPCAST, SPLIT, STATS,
        )
        # partial tiles (the diagonal band, the edges): apply the mask
        acc, l_i, m_i, st_ps, st_sum, st_sq, st_count, st_first = _attn_fwd_inner(
            acc, l_i, m_i, st_ps, st_sum, st_sq, st_count, st_first, q, k_base, v_base, stride_kl, stride_ke, stride_vl, stride_ve,
            PartIdx + lists, tl.load(PartCount + at),
            offs_m, offs_e, offs_ev, Lq, Lk, E, Ev, qk_scale,
            span_lo, span_hi, allowed_base, stride_am, stride_ak, layout_base, stride_lr, stride_lc, layout_bq,
            layout_bk, bias_base, stride_bm, stride_bk,
            seed, bh, threshold_shifted, inv_keep, cap2,
            BLOCK_N, True, True, EVEN_N, HAS_SPANS, HAS_ALLOWED, HAS_LAYOUT, HAS_BIAS, HAS_DROPOUT, HAS_CAP, PRECISION,
            UPCAST, SPLIT, STATS,
        )
    else:  # no mask: every tile is full
        acc, l_i, m_i, st_ps, st_sum, st_sq, st_count, st_first = _attn_fwd_inner(
            acc, l_i, m_i, st_ps, st_sum, st_sq, st_count, st_first, q, k_base, v_base, stride_kl, stride_ke, stride_vl, stride_ve,
            FullIdx, n_k_tiles,
            offs_m, offs_e, offs_ev, Lq, Lk, E, Ev, qk_scale,
            span_lo, span_hi, allowed_base, stride_am, stride_ak, layout_base, stride_lr, stride_lc, layout_bq,
            layout_bk, bias_base, stride_bm, stride_bk,
            seed, bh, threshold_shifted, inv_keep, cap2,
            BLOCK_N, False, False, EVEN_N, HAS_SPANS, HAS_ALLOWED, HAS_LAYOUT, HAS_BIAS, HAS_DROPOUT, HAS_CAP, PRECISION,
            UPCAST, SPLIT, STATS,
        )

    acc, lse = _softmax_result(acc, l_i, m_i, float("inf"))  # lse +inf for a dead row (the engine reports -inf)
    if STATS:
        _store_row_stats(Stats + (bh.to(tl.int64) * Lq + offs_m) * 11, offs_m < Lq, l_i, m_i, lse,
                         st_ps, st_sum, st_sq, st_count, st_first)
    o_ptrs = Out + n * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_ev[None, :] * stride_oe
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_ev[None, :] < Ev))
    tl.store(Lse + bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)
