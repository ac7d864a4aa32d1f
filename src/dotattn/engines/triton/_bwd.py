"""The Triton backward kernels (FlashAttention-2): delta, then dk/dv, then dq.

1. ``attn_bwd_preprocess``: delta = rowsum(dO * O), one float32 per query row.
2. ``attn_bwd_dkdv``: a program owns one key block of one (batch, kv head) and iterates
   over the query blocks that may see it, for each of the G query heads sharing the kv
   head in turn, so dk and dv are summed over the group in registers: no atomics, no
   copy of K or V per query head, and the same bits on every run.
3. ``attn_bwd_dq``: a program owns one query block of one (batch, query head) and
   iterates over its key tiles, as the forward does; with a float mask that wants a
   gradient it also writes the score gradient dS of each tile it visits.

Both recompute P = exp2(S - lse) from the saved lse (log2 units, +inf for rows that
see nothing, so P is 0 there) and regenerate the forward's dropout pattern from the
seed. The tile lists and mask arguments are those of ``_fwd.py``; the dk/dv kernel's
lists are the transposed block map's (query tiles per key tile).
"""

from __future__ import annotations

import triton
import triton.language as tl

from dotattn.engines.triton._fwd import _dot, _dot_rounded, _keep, _soft_cap, _tile_allowed, _tile_bias


@triton.jit
def attn_bwd_preprocess(
    Out, DOut, Delta,
    stride_ob, stride_oh, stride_ol, stride_oe,
    stride_db, stride_dh, stride_dl, stride_de,
    Hq, Lq, Ev,
    BLOCK_M: tl.constexpr, BLOCK_EV: tl.constexpr,
):
    """delta (N, Hq, Lq) float32 = rowsum(dO * O); grid (cdiv(Lq, BLOCK_M), N·Hq)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    n = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_ev = tl.arange(0, BLOCK_EV)
    inside = (offs_m[:, None] < Lq) & (offs_ev[None, :] < Ev)
    o = tl.load(Out + n * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_ev[None, :] * stride_oe,
                mask=inside, other=0.0).to(tl.float32)
    do = tl.load(DOut + n * stride_db + h * stride_dh + offs_m[:, None] * stride_dl + offs_ev[None, :] * stride_de,
                 mask=inside, other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,
    q_base, do_base, stride_ql, stride_qe, stride_dl, stride_de, lse_base, delta_base,
    idx_base, count,
    offs_n, offs_e, offs_ev, Lq, Lk, E, Ev, qk_scale,
    span_lo_base, span_hi_base, allowed_base, stride_am, stride_ak, layout_base, stride_lr, stride_lc, layout_bq,
    layout_bk, bias_base, stride_bm, stride_bk,
    seed, bh, threshold_shifted, inv_keep, cap2,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, EVEN_N: tl.constexpr,
    HAS_SPANS: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_LAYOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_CAP: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
):
    """One phase of dk/dv for one query head: ``count`` query tiles, in the transposed
    layout (keys along the rows) so dk and dv accumulate without transposing P."""
    for t in range(0, count):
        start_m = tl.load(idx_base + t) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_m = offs_m < Lq
        qT = tl.load(q_base + offs_m[None, :] * stride_ql + offs_e[:, None] * stride_qe,
                     mask=in_m[None, :] & (offs_e[:, None] < E), other=0.0)  # (BLOCK_E, BLOCK_M)
        do = tl.load(do_base + offs_m[:, None] * stride_dl + offs_ev[None, :] * stride_de,
                     mask=in_m[:, None] & (offs_ev[None, :] < Ev), other=0.0)  # (BLOCK_M, BLOCK_EV)
        lse = tl.load(lse_base + offs_m, mask=in_m, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=in_m, other=0.0)
        sT = _dot(k, qT, tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), PRECISION, UPCAST) * qk_scale
        if HAS_CAP:
            sT, tT = _soft_cap(sT, cap2)
        if MASKED:  # partial tile: apply the mask
            if HAS_BIAS:
                sT += _tile_bias(offs_m, offs_n, Lq, Lk, bias_base, stride_bm, stride_bk, True)
            span_lo = tl.zeros([BLOCK_M], dtype=tl.int32)
            span_hi = tl.zeros([BLOCK_M], dtype=tl.int32)
            if HAS_SPANS:
                span_lo = tl.load(span_lo_base + offs_m, mask=in_m, other=0)
                span_hi = tl.load(span_hi_base + offs_m, mask=in_m, other=0)
            ok = _tile_allowed(offs_m, offs_n, Lq, Lk, span_lo, span_hi, allowed_base, stride_am, stride_ak,
                               layout_base, stride_lr, stride_lc, layout_bq, layout_bk,
                               HAS_SPANS, HAS_ALLOWED, HAS_LAYOUT, True)
            sT = tl.where(ok, sT, float("-inf"))
        elif not EVEN_N:
            sT = tl.where(offs_n[:, None] < Lk, sT, float("-inf"))
        pT = tl.math.exp2(sT - lse[None, :])  # (BLOCK_N, BLOCK_M), 0 where masked or the row sees nothing
        dpT = _dot(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), PRECISION, UPCAST)
        if HAS_DROPOUT:
            keepT = _keep(seed, bh, offs_m, offs_n, threshold_shifted, True)
            dv = _dot_rounded(tl.where(keepT, pT * inv_keep, 0.0), do, dv, PRECISION, UPCAST, SPLIT)
            dpT = tl.where(keepT, dpT * inv_keep, 0.0)
        else:
            dv = _dot_rounded(pT, do, dv, PRECISION, UPCAST, SPLIT)
        dsT = pT * (dpT - delta[None, :])
        if HAS_CAP:  # to the scores before the cap
            dsT = dsT * (1.0 - tT * tT)
        dk = _dot_rounded(dsT, tl.trans(qT), dk, PRECISION, UPCAST, SPLIT)
    return dk, dv


@triton.jit
def attn_bwd_dkdv(
    Q, K, V, DOut, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_kl, stride_ke,
    stride_vb, stride_vh, stride_vl, stride_ve,
    stride_db, stride_dh, stride_dl, stride_de,
    Hq, Hkv, G, Lq, Lk, E, Ev, qk_scale, scale,
    SpanLo, SpanHi, stride_sb, stride_sh,
    Allowed, stride_ab, stride_ah, stride_am, stride_ak,
    Layout, stride_lb, stride_lh, stride_lr, stride_lc, layout_bq, layout_bk,
    Bias, stride_bb, stride_bh, stride_bm, stride_bk,
    FullCount, FullIdx, PartCount, PartIdx, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im,
    seed, threshold_shifted, inv_keep, cap2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    EVEN_N: tl.constexpr,
    HAS_SPANS: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_LAYOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_CAP: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
):
    """dk (N, Hkv, Lk, E), dv (N, Hkv, Lk, Ev); grid (cdiv(Lk, BLOCK_N), N·Hkv).
    The tile lists are (Nm, Hm, nK, nQ): query tiles per key tile."""
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    n = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    in_n = offs_n < Lk
    k = tl.load(K + n * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kl + offs_e[None, :] * stride_ke,
                mask=in_n[:, None] & (offs_e[None, :] < E), other=0.0)
    v = tl.load(V + n * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vl + offs_ev[None, :] * stride_ve,
                mask=in_n[:, None] & (offs_ev[None, :] < Ev), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_EV], dtype=tl.float32)
    for g in range(0, G):  # the query heads that share this kv head
        h = hk * G + g
        bh = n * Hq + h
        q_base = Q + n * stride_qb + h * stride_qh
        do_base = DOut + n * stride_db + h * stride_dh
        at = n * stride_cb + h * stride_ch + tl.program_id(0) * stride_cm
        lists = n * stride_ib + h * stride_ih + tl.program_id(0) * stride_im
        span_lo_base = SpanLo + n * stride_sb + h * stride_sh
        span_hi_base = SpanHi + n * stride_sb + h * stride_sh
        allowed_base = Allowed + n * stride_ab + h * stride_ah
        layout_base = Layout + n * stride_lb + h * stride_lh
        bias_base = Bias + n * stride_bb + h * stride_bh
        # off-band tiles: no mask needed
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, stride_ql, stride_qe, stride_dl, stride_de,
            Lse + bh * Lq, Delta + bh * Lq, FullIdx + lists, tl.load(FullCount + at),
            offs_n, offs_e, offs_ev, Lq, Lk, E, Ev, qk_scale,
            span_lo_base, span_hi_base, allowed_base, stride_am, stride_ak, layout_base, stride_lr, stride_lc,
            layout_bq, layout_bk, bias_base, stride_bm, stride_bk,
            seed, bh, threshold_shifted, inv_keep, cap2,
            BLOCK_M, False, EVEN_N, HAS_SPANS, HAS_ALLOWED, HAS_LAYOUT, HAS_BIAS, HAS_DROPOUT, HAS_CAP, PRECISION,
            UPCAST, SPLIT,
        )
        # partial tiles: apply the mask
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, stride_ql, stride_qe, stride_dl, stride_de,
            Lse + bh * Lq, Delta + bh * Lq, PartIdx + lists, tl.load(PartCount + at),
            offs_n, offs_e, offs_ev, Lq, Lk, E, Ev, qk_scale,
            span_lo_base, span_hi_base, allowed_base, stride_am, stride_ak, layout_base, stride_lr, stride_lc,
            layout_bq, layout_bk, bias_base, stride_bm, stride_bk,
            seed, bh, threshold_shifted, inv_keep, cap2,
            BLOCK_M, True, EVEN_N, HAS_SPANS, HAS_ALLOWED, HAS_LAYOUT, HAS_BIAS, HAS_DROPOUT, HAS_CAP, PRECISION,
            UPCAST, SPLIT,
        )
    out = bhk.to(tl.int64) * Lk
    tl.store(DK + (out + offs_n[:, None]) * E + offs_e[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=in_n[:, None] & (offs_e[None, :] < E))
    tl.store(DV + (out + offs_n[:, None]) * Ev + offs_ev[None, :], dv.to(DV.dtype.element_ty),
             mask=in_n[:, None] & (offs_ev[None, :] < Ev))


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta,
    k_base, v_base, stride_kl, stride_ke, stride_vl, stride_ve, ds_base, stride_gm, stride_gk,
    idx_base, count,
    offs_m, offs_e, offs_ev, Lq, Lk, E, Ev, qk_scale,
    span_lo, span_hi, allowed_base, stride_am, stride_ak,
    layout_base, stride_lr, stride_lc, layout_bq, layout_bk,
    bias_base, stride_bm, stride_bk,
    seed, bh, threshold_shifted, inv_keep, cap2,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, LISTED: tl.constexpr, EVEN_N: tl.constexpr,
    HAS_SPANS: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_LAYOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_CAP: tl.constexpr,
    STORE_DS: tl.constexpr, ATOMIC_DS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """One phase of dq: ``count`` key tiles."""
    for t in range(0, count):
        if LISTED:
            start_n = tl.load(idx_base + t) * BLOCK_N
        else:
            start_n = t * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < Lk
        kT = tl.load(k_base + offs_n[None, :] * stride_kl + offs_e[:, None] * stride_ke,
                     mask=in_n[None, :] & (offs_e[:, None] < E), other=0.0)
        vT = tl.load(v_base + offs_n[None, :] * stride_vl + offs_ev[:, None] * stride_ve,
                     mask=in_n[None, :] & (offs_ev[:, None] < Ev), other=0.0)
        s = _dot(q, kT, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), PRECISION, UPCAST) * qk_scale
        if HAS_CAP:
            s, t = _soft_cap(s, cap2)
        if MASKED:
            if HAS_BIAS:
                s += _tile_bias(offs_m, offs_n, Lq, Lk, bias_base, stride_bm, stride_bk, False)
            ok = _tile_allowed(offs_m, offs_n, Lq, Lk, span_lo, span_hi, allowed_base, stride_am, stride_ak,
                               layout_base, stride_lr, stride_lc, layout_bq, layout_bk,
                               HAS_SPANS, HAS_ALLOWED, HAS_LAYOUT, False)
            s = tl.where(ok, s, float("-inf"))
        elif not EVEN_N:
            s = tl.where(in_n[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = _dot(do, vT, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), PRECISION, UPCAST)
        if HAS_DROPOUT:
            dp = tl.where(_keep(seed, bh, offs_m, offs_n, threshold_shifted, False), dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        if STORE_DS:  # the gradient of an additive mask is the score gradient
            ds_ptrs = ds_base + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gk
            if ATOMIC_DS:  # programs of the (batch, head) rows the mask broadcasts over share it
                tl.atomic_add(ds_ptrs, ds, mask=(offs_m[:, None] < Lq) & in_n[None, :])
            else:
                tl.store(ds_ptrs, ds, mask=(offs_m[:, None] < Lq) & in_n[None, :])
        if HAS_CAP:  # to the scores before the cap (the mask's gradient above is after it)
            ds = ds * (1.0 - t * t)
        dq = _dot_rounded(ds, tl.trans(kT), dq, PRECISION, UPCAST, SPLIT)
    return dq


@triton.jit
def attn_bwd_dq(
    Q, K, V, DOut, Lse, Delta, DQ, DS,
    stride_qb, stride_qh, stride_ql, stride_qe,
    stride_kb, stride_kh, stride_kl, stride_ke,
    stride_vb, stride_vh, stride_vl, stride_ve,
    stride_db, stride_dh, stride_dl, stride_de,
    Hq, G, Lq, Lk, E, Ev, qk_scale, scale,
    SpanLo, SpanHi, stride_sb, stride_sh,
    Allowed, stride_ab, stride_ah, stride_am, stride_ak,
    Layout, stride_lb, stride_lh, stride_lr, stride_lc, layout_bq, layout_bk,
    Bias, stride_bb, stride_bh, stride_bm, stride_bk,
    stride_gb, stride_gh, stride_gm, stride_gk,  # DS: (N, Hq, Lq, Lk), or the bias's shape when ATOMIC_DS
    FullCount, FullIdx, PartCount, PartIdx, stride_cb, stride_ch, stride_cm, stride_ib, stride_ih, stride_im,
    n_k_tiles, seed, threshold_shifted, inv_keep, cap2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    HAS_MAP: tl.constexpr, EVEN_N: tl.constexpr,
    HAS_SPANS: tl.constexpr, HAS_ALLOWED: tl.constexpr, HAS_LAYOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_CAP: tl.constexpr,
    STORE_DS: tl.constexpr, ATOMIC_DS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """dq (N, Hq, Lq, E) and, with STORE_DS, dS of the visited tiles, float32: stored per
    (batch, head) into (N, Hq, Lq, Lk), or with ATOMIC_DS added into a buffer of the float
    mask's own shape (its broadcast dims by stride 0); grid (cdiv(Lq, BLOCK_M), N·Hq)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    n = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    in_m = offs_m < Lq
    q = tl.load(Q + n * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_e[None, :] * stride_qe,
                mask=in_m[:, None] & (offs_e[None, :] < E), other=0.0)
    do = tl.load(DOut + n * stride_db + h * stride_dh + offs_m[:, None] * stride_dl + offs_ev[None, :] * stride_de,
                 mask=in_m[:, None] & (offs_ev[None, :] < Ev), other=0.0)
    lse = tl.load(Lse + bh.to(tl.int64) * Lq + offs_m, mask=in_m, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * Lq + offs_m, mask=in_m, other=0.0)
    k_base = K + n * stride_kb + (h // G) * stride_kh
    v_base = V + n * stride_vb + (h // G) * stride_vh
    ds_base = DS + n * stride_gb + h * stride_gh
    span_lo = tl.zeros([BLOCK_M], dtype=tl.int32)
    span_hi = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_SPANS:
        span_lo = tl.load(SpanLo + n * stride_sb + h * stride_sh + offs_m, mask=in_m, other=0)
        span_hi = tl.load(SpanHi + n * stride_sb + h * stride_sh + offs_m, mask=in_m, other=0)
    allowed_base = Allowed + n * stride_ab + h * stride_ah
    layout_base = Layout + n * stride_lb + h * stride_lh
    bias_base = Bias + n * stride_bb + h * stride_bh

    dq = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    if HAS_MAP:
        at = n * stride_cb + h * stride_ch + tl.program_id(0) * stride_cm
        lists = n * stride_ib + h * stride_ih + tl.program_id(0) * stride_im
        # off-band tiles: no mask needed
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kl, stride_ke, stride_vl, stride_ve,
            ds_base, stride_gm, stride_gk,
            FullIdx + lists, tl.load(FullCount + at),
            offs_m, offs_e, offs_ev, Lq, Lk, E, Ev, qk_scale,
            span_lo, span_hi, allowed_base, stride_am, stride_ak, layout_base, stride_lr, stride_lc, layout_bq,
            layout_bk, bias_base, stride_bm, stride_bk,
            seed, bh, threshold_shifted, inv_keep, cap2,
            BLOCK_N, False, True, EVEN_N, HAS_SPANS, HAS_ALLOWED, HAS_LAYOUT, HAS_BIAS, HAS_DROPOUT, HAS_CAP,
            STORE_DS, ATOMIC_DS, PRECISION, UPCAST, SPLIT,
        )
        # partial tiles: apply the mask
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kl, stride_ke, stride_vl, stride_ve,
            ds_base, stride_gm, stride_gk,
            PartIdx + lists, tl.load(PartCount + at),
            offs_m, offs_e, offs_ev, Lq, Lk, E, Ev, qk_scale,
            span_lo, span_hi, allowed_base, stride_am, stride_ak, layout_base, stride_lr, stride_lc, layout_bq,
            layout_bk, bias_base, stride_bm, stride_bk,
            seed, bh, threshold_shifted, inv_keep, cap2,
            BLOCK_N, True, True, EVEN_N, HAS_SPANS, HAS_ALLOWED, HAS_LAYOUT, HAS_BIAS, HAS_DROPOUT, HAS_CAP,
            STORE_DS, ATOMIC_DS, PRECISION, UPCAST, SPLIT,
        )
    else:
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kl, stride_ke, stride_vl, stride_ve,
            ds_base, stride_gm, stride_gk,
            FullIdx, n_k_tiles,
            offs_m, offs_e, offs_ev, Lq, Lk, E, Ev, qk_scale,
            span_lo, span_hi, allowed_base, stride_am, stride_ak, layout_base, stride_lr, stride_lc, layout_bq,
            layout_bk, bias_base, stride_bm, stride_bk,
            seed, bh, threshold_shifted, inv_keep, cap2,
            BLOCK_N, False, False, EVEN_N, HAS_SPANS, HAS_ALLOWED, HAS_LAYOUT, HAS_BIAS, HAS_DROPOUT, HAS_CAP,
            STORE_DS, ATOMIC_DS, PRECISION, UPCAST, SPLIT,
        )
    tl.store(DQ + (bh.to(tl.int64) * Lq + offs_m[:, None]) * E + offs_e[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=in_m[:, None] & (offs_e[None, :] < E))
