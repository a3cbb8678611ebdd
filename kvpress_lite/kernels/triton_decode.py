"""Triton flash-decoding over packed KIVI storage (imported only when triton is installed).

One program per (batch row, KV head, split of the sequence): all `G_q * q` query rows of the KV head (padded to
>= 16) share each K/V tile, which is read as packed codes, unpacked in registers (`tl.interleave` of the 2/4
sub-byte fields restores channel order, so the storage layout is read as is) and fed to tensor-core `tl.dot`s.
Per-channel key scales are folded into the query: q . (s * c + z) = (q * s) . c + q . z, so key codes enter the
dot without a multiply. Per-token scales (values, per-token keys) are broadcast over their channel group and
applied with one FMA. Codes become floats with a magic-number bitcast (OR into the mantissa of 128.0 in bf16 for
<= 4 bits, of 1024.0 in fp16 for 8 bits; the offset is folded into the bias/zero) instead of int->float converts.
The full-precision residual is read by extra splits. Each split writes a partial (max, sum, unnormalized output)
in fp32; a second small kernel combines the splits. Flash-decoding: https://pytorch.org/blog/flash-decoding/.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _unpack(packed, BITS: tl.constexpr):
    """uint8 `[N, D*BITS/8]` -> uint8 codes `[N, D]` in channel order (low bits first)."""
    if BITS == 8:
        return packed
    elif BITS == 4:
        return tl.interleave(packed & 0xF, packed >> 4)
    else:
        return tl.interleave(tl.interleave(packed & 0x3, (packed >> 4) & 0x3),
                             tl.interleave((packed >> 2) & 0x3, packed >> 6))


@triton.jit
def _to_float(codes, MAGIC: tl.constexpr):
    """Codes -> floats equal to `code + OFF` (MAGIC 1: bf16, OFF 128; 2: fp16, OFF 1024) or `code` (MAGIC 0, fp32)."""
    if MAGIC == 1:
        return (codes.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
    elif MAGIC == 2:
        return (codes.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    else:
        return codes.to(tl.float32)


@triton.jit
def _dequant_token(f, scale, zero, OFF: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr, G: tl.constexpr,
                   D: tl.constexpr):
    """`f` `[N, D]` (code + OFF), per-(token, channel-group) scale/zero `[N, NG]` fp32 -> fp32 `[N, D]`."""
    zero = zero - OFF * scale
    s = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, NG, G)), (BLOCK_N, D))
    z = tl.reshape(tl.broadcast_to(zero[:, :, None], (BLOCK_N, NG, G)), (BLOCK_N, D))
    return f.to(tl.float32) * s + z


@triton.jit
def _online_softmax(s, v, pos, n_ok, qpos, start, m_i, l_i, acc, scaling, softcap,
                    USE_SOFTCAP: tl.constexpr, VDT: tl.constexpr, PRECISION: tl.constexpr):
    """One tile of the online softmax in the log2 domain; `s` `[M, N]` raw scores, `v` `[N, D]` in VDT."""
    if USE_SOFTCAP:
        x = s * (scaling / softcap)
        t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)  # tanh(x), saturating without NaN
        s = t * (softcap * 1.4426950408889634)
    else:
        s = s * (scaling * 1.4426950408889634)
    ok = (pos[None, :] <= qpos[:, None]) & (pos[None, :] >= start) & n_ok[None, :]
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(VDT), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _valid_lengths(LENS, T_CAP, R_CAP, DYN_LEN: tl.constexpr):
    """(T, R): history and residual tokens to read: the capacities, or (DYN_LEN) the valid lengths `LENS[0:2]` loaded
    from the device, clamped to [0, capacity]."""
    if DYN_LEN:
        T = tl.minimum(tl.maximum(tl.load(LENS).to(tl.int32), 0), T_CAP)
        R = tl.minimum(tl.maximum(tl.load(LENS + 1).to(tl.int32), 0), R_CAP)
    else:
        T = T_CAP
        R = R_CAP
    return T, R


@triton.jit
def _history_range(pid_s, T, span, S_HIST, BLOCK_N: tl.constexpr, DYN_LEN: tl.constexpr):
    """[lo, hi) of history split `pid_s`: a fixed `span`, or (DYN_LEN) the S_HIST splits (a count from the capacity)
    sharing the valid tiles; idle splits get an empty range and write the neutral partial."""
    if DYN_LEN:
        span = tl.cdiv(tl.cdiv(T, BLOCK_N), S_HIST) * BLOCK_N
    lo = pid_s * span
    return lo, tl.minimum(T, lo + span)


@triton.jit(do_not_specialize=["T_CAP", "R_CAP", "TILES_PER_SPLIT", "S_HIST", "S_TOTAL"])  # no recompiles as T, R grow
def _decode_split_kernel(
    Q, KC, KS, KZ, VC, VS, VZ, RK, RV, KV_START, LENS, PM, PL, PO,
    scaling, softcap, T_CAP, R_CAP, HKV, TILES_PER_SPLIT, S_HIST, S_TOTAL,
    GQ: tl.constexpr, NQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
    KEY_PER_CHANNEL: tl.constexpr, HAS_START: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    MAGIC: tl.constexpr, OFF: tl.constexpr, KDT: tl.constexpr, VDT: tl.constexpr, PRECISION: tl.constexpr,
    DYN_LEN: tl.constexpr = False,
):
    pid_bh = tl.program_id(0)  # b * HKV + kv head
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    DB: tl.constexpr = D * BITS // 8
    NG: tl.constexpr = D // G
    M: tl.constexpr = GQ * NQ
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, DB)
    offs_g = tl.arange(0, NG)
    row_ok = offs_m < M
    head = pid_bh * GQ + offs_m // NQ  # global query head b * H_q + kvh * GQ + h_local
    qi = offs_m % NQ
    q = tl.load(Q + ((head * NQ + qi) * D)[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(tl.float32)
    T, R = _valid_lengths(LENS, T_CAP, R_CAP, DYN_LEN)
    qpos = T + R - NQ + qi
    if HAS_START:
        start = tl.load(KV_START + b).to(tl.int32)
    else:
        start = 0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    span = TILES_PER_SPLIT * BLOCK_N
    if pid_s < S_HIST:
        lo, hi = _history_range(pid_s, T, span, S_HIST, BLOCK_N, DYN_LEN)
        lo = tl.maximum(lo, (start // BLOCK_N) * BLOCK_N)  # skip whole tiles of left padding
        bh_t = pid_bh.to(tl.int64) * T_CAP  # row strides from the capacity
        if KEY_PER_CHANNEL:
            qk_dt = q  # placeholder so both branches define it
        else:
            qk_dt = q.to(KDT)
        for t0 in range(lo, hi, BLOCK_N):
            pos = t0 + offs_n
            n_ok = pos < T
            rows = bh_t + pos
            kb = tl.load(KC + rows[:, None] * DB + offs_j[None, :], mask=n_ok[:, None], other=0)
            kf = _to_float(_unpack(kb, BITS), MAGIC)
            if KEY_PER_CHANNEL:
                grp = (bh_t + t0) // G  # row of [B*HKV*T_CAP/G, D] (T_CAP % G == 0, tiles never straddle)
                ks = tl.load(KS + grp * D + offs_d).to(tl.float32)
                kz = tl.load(KZ + grp * D + offs_d).to(tl.float32)
                qs = (q * ks[None, :]).to(KDT)
                bias = tl.sum(q * kz[None, :], 1) - OFF * tl.sum(qs.to(tl.float32), 1)
                s = tl.dot(qs, tl.trans(kf.to(KDT)), input_precision=PRECISION) + bias[:, None]
            else:
                ks = tl.load(KS + rows[:, None] * NG + offs_g[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
                kz = tl.load(KZ + rows[:, None] * NG + offs_g[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
                k = _dequant_token(kf, ks, kz, OFF, BLOCK_N, NG, G, D).to(KDT)
                s = tl.dot(qk_dt, tl.trans(k), input_precision=PRECISION)
            vb = tl.load(VC + rows[:, None] * DB + offs_j[None, :], mask=n_ok[:, None], other=0)
            vf = _to_float(_unpack(vb, BITS), MAGIC)
            vs = tl.load(VS + rows[:, None] * NG + offs_g[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
            vz = tl.load(VZ + rows[:, None] * NG + offs_g[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
            v = _dequant_token(vf, vs, vz, OFF, BLOCK_N, NG, G, D).to(VDT)
            m_i, l_i, acc = _online_softmax(s, v, pos, n_ok, qpos, start, m_i, l_i, acc, scaling, softcap,
                                            USE_SOFTCAP, VDT, PRECISION)
    else:
        lo = (pid_s - S_HIST) * span
        hi = tl.minimum(R, lo + span)
        lo = tl.maximum(lo, ((start - T) // BLOCK_N) * BLOCK_N)
        bh_r = pid_bh.to(tl.int64) * R_CAP
        q_dt = q.to(VDT)
        for r0 in range(lo, hi, BLOCK_N):
            rr = r0 + offs_n
            n_ok = rr < R
            ptr = (bh_r + rr)[:, None] * D + offs_d[None, :]
            k = tl.load(RK + ptr, mask=n_ok[:, None], other=0.0).to(VDT)
            s = tl.dot(q_dt, tl.trans(k), input_precision=PRECISION)
            v = tl.load(RV + ptr, mask=n_ok[:, None], other=0.0).to(VDT)
            m_i, l_i, acc = _online_softmax(s, v, T + rr, n_ok, qpos, start, m_i, l_i, acc, scaling, softcap,
                                            USE_SOFTCAP, VDT, PRECISION)
    base = (pid_bh * S_TOTAL + pid_s) * BLOCK_M + offs_m
    tl.store(PM + base, m_i)
    tl.store(PL + base, l_i)
    tl.store(PO + base[:, None] * D + offs_d[None, :], acc)


@triton.jit(do_not_specialize=["S_TOTAL"])
def _decode_reduce_kernel(PM, PL, PO, O, S_TOTAL, GQ: tl.constexpr, NQ: tl.constexpr, BLOCK_M: tl.constexpr,
                          D: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_bh = tl.program_id(0)
    r = tl.program_id(1)  # query row of this KV head: (h_local, i)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    s_ok = offs_s < S_TOTAL
    base = (pid_bh * S_TOTAL + offs_s) * BLOCK_M + r
    m = tl.load(PM + base, mask=s_ok, other=float("-inf"))
    l_ = tl.load(PL + base, mask=s_ok, other=0.0)
    acc = tl.load(PO + base[:, None] * D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    mx = tl.max(m, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(m - mx)
    denom = tl.sum(w * l_, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(denom > 0, denom, 1.0)
    head = pid_bh * GQ + r // NQ
    tl.store(O + (head * NQ + r % NQ) * D + offs_d, out.to(O.dtype.element_ty))



@triton.jit
def _phase(packed, PH: tl.constexpr, BITS: tl.constexpr):
    """Codes of channels `j * (8 // BITS) + PH` from bytes `[..., j]` (uint8)."""
    if BITS == 8:
        return packed
    else:
        return (packed >> (PH * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _expand_groups(x, BLOCK_N: tl.constexpr, NG: tl.constexpr, GB: tl.constexpr):
    """`[N, NG]` per-(token, channel group) values -> `[N, NG * GB]`, byte column j taking group j // GB."""
    return tl.reshape(tl.broadcast_to(x[:, :, None], (BLOCK_N, NG, GB)), (BLOCK_N, NG * GB))


@triton.jit
def _softmax_weights(s, pos, n_ok, qpos, start, m_i, l_i, scaling, softcap, USE_SOFTCAP: tl.constexpr):
    """Scaled, capped, masked scores -> (p, alpha, m_new, l_new) of the online softmax (log2 domain)."""
    if USE_SOFTCAP:
        x = s * (scaling / softcap)
        t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)  # tanh(x), saturating without NaN
        s = t * (softcap * 1.4426950408889634)
    else:
        s = s * (scaling * 1.4426950408889634)
    ok = (pos[None, :] <= qpos[:, None]) & (pos[None, :] >= start) & n_ok[None, :]
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit(do_not_specialize=["T_CAP", "R_CAP", "TILES_PER_SPLIT", "S_HIST", "S_TOTAL"])  # no recompiles as T, R grow
def _decode_split_kernel_v2(
    Q, KC, KS, KZ, VC, VS, VZ, RK, RV, KV_START, LENS, PM, PL, PO,
    scaling, softcap, T_CAP, R_CAP, HKV, TILES_PER_SPLIT, S_HIST, S_TOTAL,
    GQ: tl.constexpr, NQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
    KEY_PER_CHANNEL: tl.constexpr, HAS_START: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    MAGIC: tl.constexpr, OFF: tl.constexpr, KDT: tl.constexpr, VDT: tl.constexpr, PRECISION: tl.constexpr,
    DYN_LEN: tl.constexpr = False,
):
    """Phase-split variant: channel `j * PB + ph` of every operand is handled as column j of phase ph, so packed
    bytes never need re-interleaving; the outputs are written to their strided channels at the end."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    PB: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // PB
    NG: tl.constexpr = D // G
    GB: tl.constexpr = G // PB
    M: tl.constexpr = GQ * NQ
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, DB)
    offs_g = tl.arange(0, NG)
    row_ok = offs_m < M
    head = pid_bh * GQ + offs_m // NQ
    qi = offs_m % NQ
    q_row = Q + ((head * NQ + qi) * D)[:, None] + offs_j[None, :] * PB
    q0 = tl.load(q_row, mask=row_ok[:, None], other=0.0).to(tl.float32)
    q1 = q0
    q2 = q0
    q3 = q0
    if PB >= 2:
        q1 = tl.load(q_row + 1, mask=row_ok[:, None], other=0.0).to(tl.float32)
    if PB == 4:
        q2 = tl.load(q_row + 2, mask=row_ok[:, None], other=0.0).to(tl.float32)
        q3 = tl.load(q_row + 3, mask=row_ok[:, None], other=0.0).to(tl.float32)
    T, R = _valid_lengths(LENS, T_CAP, R_CAP, DYN_LEN)
    qpos = T + R - NQ + qi
    if HAS_START:
        start = tl.load(KV_START + b).to(tl.int32)
    else:
        start = 0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, DB], tl.float32)
    acc1 = tl.zeros([BLOCK_M, DB], tl.float32)
    acc2 = tl.zeros([BLOCK_M, DB], tl.float32)
    acc3 = tl.zeros([BLOCK_M, DB], tl.float32)
    span = TILES_PER_SPLIT * BLOCK_N
    if pid_s < S_HIST:
        lo, hi = _history_range(pid_s, T, span, S_HIST, BLOCK_N, DYN_LEN)
        lo = tl.maximum(lo, (start // BLOCK_N) * BLOCK_N)
        bh_t = pid_bh.to(tl.int64) * T_CAP  # row strides from the capacity
        for t0 in range(lo, hi, BLOCK_N):
            pos = t0 + offs_n
            n_ok = pos < T
            rows = bh_t + pos
            kb = tl.load(KC + rows[:, None] * DB + offs_j[None, :], mask=n_ok[:, None], other=0)
            if KEY_PER_CHANNEL:
                kp = KS + ((bh_t + t0) // G) * D + offs_j * PB
                zp = KZ + ((bh_t + t0) // G) * D + offs_j * PB
                qs = (q0 * tl.load(kp).to(tl.float32)[None, :]).to(KDT)
                bias = tl.sum(q0 * tl.load(zp).to(tl.float32)[None, :], 1) - OFF * tl.sum(qs.to(tl.float32), 1)
                s = tl.dot(qs, tl.trans(_to_float(_phase(kb, 0, BITS), MAGIC).to(KDT)), input_precision=PRECISION)
                if PB >= 2:
                    qs = (q1 * tl.load(kp + 1).to(tl.float32)[None, :]).to(KDT)
                    bias += tl.sum(q1 * tl.load(zp + 1).to(tl.float32)[None, :], 1) - OFF * tl.sum(qs.to(tl.float32), 1)
                    s += tl.dot(qs, tl.trans(_to_float(_phase(kb, 1, BITS), MAGIC).to(KDT)), input_precision=PRECISION)
                if PB == 4:
                    qs = (q2 * tl.load(kp + 2).to(tl.float32)[None, :]).to(KDT)
                    bias += tl.sum(q2 * tl.load(zp + 2).to(tl.float32)[None, :], 1) - OFF * tl.sum(qs.to(tl.float32), 1)
                    s += tl.dot(qs, tl.trans(_to_float(_phase(kb, 2, BITS), MAGIC).to(KDT)), input_precision=PRECISION)
                    qs = (q3 * tl.load(kp + 3).to(tl.float32)[None, :]).to(KDT)
                    bias += tl.sum(q3 * tl.load(zp + 3).to(tl.float32)[None, :], 1) - OFF * tl.sum(qs.to(tl.float32), 1)
                    s += tl.dot(qs, tl.trans(_to_float(_phase(kb, 3, BITS), MAGIC).to(KDT)), input_precision=PRECISION)
                s += bias[:, None]
            else:
                ks = tl.load(KS + rows[:, None] * NG + offs_g[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
                kz = tl.load(KZ + rows[:, None] * NG + offs_g[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
                ksb = _expand_groups(ks, BLOCK_N, NG, GB)
                kzb = _expand_groups(kz - OFF * ks, BLOCK_N, NG, GB)
                k = _to_float(_phase(kb, 0, BITS), MAGIC).to(tl.float32) * ksb + kzb
                s = tl.dot(q0.to(KDT), tl.trans(k.to(KDT)), input_precision=PRECISION)
                if PB >= 2:
                    k = _to_float(_phase(kb, 1, BITS), MAGIC).to(tl.float32) * ksb + kzb
                    s += tl.dot(q1.to(KDT), tl.trans(k.to(KDT)), input_precision=PRECISION)
                if PB == 4:
                    k = _to_float(_phase(kb, 2, BITS), MAGIC).to(tl.float32) * ksb + kzb
                    s += tl.dot(q2.to(KDT), tl.trans(k.to(KDT)), input_precision=PRECISION)
                    k = _to_float(_phase(kb, 3, BITS), MAGIC).to(tl.float32) * ksb + kzb
                    s += tl.dot(q3.to(KDT), tl.trans(k.to(KDT)), input_precision=PRECISION)
            p, alpha, m_i, l_i = _softmax_weights(s, pos, n_ok, qpos, start, m_i, l_i, scaling, softcap, USE_SOFTCAP)
            p = p.to(VDT)
            vb = tl.load(VC + rows[:, None] * DB + offs_j[None, :], mask=n_ok[:, None], other=0)
            vs = tl.load(VS + rows[:, None] * NG + offs_g[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
            vz = tl.load(VZ + rows[:, None] * NG + offs_g[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
            vsb = _expand_groups(vs, BLOCK_N, NG, GB)
            vzb = _expand_groups(vz - OFF * vs, BLOCK_N, NG, GB)
            v = (_to_float(_phase(vb, 0, BITS), MAGIC).to(tl.float32) * vsb + vzb).to(VDT)
            acc0 = acc0 * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            if PB >= 2:
                v = (_to_float(_phase(vb, 1, BITS), MAGIC).to(tl.float32) * vsb + vzb).to(VDT)
                acc1 = acc1 * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            if PB == 4:
                v = (_to_float(_phase(vb, 2, BITS), MAGIC).to(tl.float32) * vsb + vzb).to(VDT)
                acc2 = acc2 * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
                v = (_to_float(_phase(vb, 3, BITS), MAGIC).to(tl.float32) * vsb + vzb).to(VDT)
                acc3 = acc3 * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    else:
        lo = (pid_s - S_HIST) * span
        hi = tl.minimum(R, lo + span)
        lo = tl.maximum(lo, ((start - T) // BLOCK_N) * BLOCK_N)
        bh_r = pid_bh.to(tl.int64) * R_CAP
        for r0 in tl.range(lo, hi, BLOCK_N, num_stages=1):
            rr = r0 + offs_n
            n_ok = rr < R
            ptr = (bh_r + rr)[:, None] * D + offs_j[None, :] * PB
            s = tl.dot(q0.to(VDT), tl.trans(tl.load(RK + ptr, mask=n_ok[:, None], other=0.0).to(VDT)),
                       input_precision=PRECISION)
            if PB >= 2:
                s += tl.dot(q1.to(VDT), tl.trans(tl.load(RK + ptr + 1, mask=n_ok[:, None], other=0.0).to(VDT)),
                            input_precision=PRECISION)
            if PB == 4:
                s += tl.dot(q2.to(VDT), tl.trans(tl.load(RK + ptr + 2, mask=n_ok[:, None], other=0.0).to(VDT)),
                            input_precision=PRECISION)
                s += tl.dot(q3.to(VDT), tl.trans(tl.load(RK + ptr + 3, mask=n_ok[:, None], other=0.0).to(VDT)),
                            input_precision=PRECISION)
            p, alpha, m_i, l_i = _softmax_weights(s, T + rr, n_ok, qpos, start, m_i, l_i, scaling, softcap,
                                                  USE_SOFTCAP)
            p = p.to(VDT)
            v = tl.load(RV + ptr, mask=n_ok[:, None], other=0.0).to(VDT)
            acc0 = acc0 * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            if PB >= 2:
                v = tl.load(RV + ptr + 1, mask=n_ok[:, None], other=0.0).to(VDT)
                acc1 = acc1 * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            if PB == 4:
                v = tl.load(RV + ptr + 2, mask=n_ok[:, None], other=0.0).to(VDT)
                acc2 = acc2 * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
                v = tl.load(RV + ptr + 3, mask=n_ok[:, None], other=0.0).to(VDT)
                acc3 = acc3 * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    base = (pid_bh * S_TOTAL + pid_s) * BLOCK_M + offs_m
    tl.store(PM + base, m_i)
    tl.store(PL + base, l_i)
    po = PO + base[:, None] * D + offs_j[None, :] * PB
    tl.store(po, acc0)
    if PB >= 2:
        tl.store(po + 1, acc1)
    if PB == 4:
        tl.store(po + 2, acc2)
        tl.store(po + 3, acc3)


# ---------------------------------------------------------------------------------------------- v3
# Exact codes as 16-bit floats, two packed per 32-bit register, straight from the packed bytes (inline PTX, GPU only):
# prmt spreads bytes b0, b1 into the two 16-bit halves, lop3 ORs a nibble into the mantissa of a magic number
# (bf16 0x4300 = 128, fp16 0x6400 = 1024) and one packed fma removes the magic. fp16 (10 mantissa bits) takes the
# high nibble in place (1024 + 16 c, scale 1/16); bf16 has 7, so the high nibble is shifted down by one first
# (128 + 8 c, scale 1/8). ~1.5 instructions per code; int8 adds the two nibbles with one more fma.
def _asm_int4(kind):
    if kind == "bf16":  # magic, one, -magic, hi scale, -magic * hi scale, hi mask, hi shift
        magic, one, neg_magic, hscale, hneg, hmask, shift = ("0x43004300", "0x3F803F80", "0xC300C300", "0x3E003E00",
                                                             "0xC180C180", "0x00780078", 1)
        op = "bf16x2"
    else:
        magic, one, neg_magic, hscale, hneg, hmask, shift = ("0x64006400", "0x3C003C00", "0xE400E400", "0x2C002C00",
                                                             "0xD400D400", "0x00F000F0", 0)
        op = "f16x2"
    src0, src1 = ("h0", "h1") if shift else ("t0", "t1")
    shifts = f"shr.b32 h0, t0, {shift};\n    shr.b32 h1, t1, {shift};" if shift else ""
    return f"""{{
    .reg .b32 t0, t1, h0, h1, one, nm, hs, hn;
    mov.b32 one, {one};
    mov.b32 nm, {neg_magic};
    mov.b32 hs, {hscale};
    mov.b32 hn, {hneg};
    prmt.b32 t0, $4, 0, 0x4140;
    prmt.b32 t1, $4, 0, 0x4342;
    {shifts}
    lop3.b32 $0, t0, 0x000F000F, {magic}, 0xEA;
    lop3.b32 $1, t1, 0x000F000F, {magic}, 0xEA;
    lop3.b32 $2, {src0}, {hmask}, {magic}, 0xEA;
    lop3.b32 $3, {src1}, {hmask}, {magic}, 0xEA;
    fma.rn.{op} $0, $0, one, nm;
    fma.rn.{op} $1, $1, one, nm;
    fma.rn.{op} $2, $2, hs, hn;
    fma.rn.{op} $3, $3, hs, hn;
    }}"""


ASM_INT4_BF16 = tl.constexpr(_asm_int4("bf16"))
ASM_INT4_FP16 = tl.constexpr(_asm_int4("fp16"))
# int8, bf16 (c <= 255 is exact in bf16, 128 + c is not): a = (128 + lo) - 384 = lo - 256, c = 2 (128 + 8 hi) + a
ASM_INT8_BF16 = tl.constexpr("""{
    .reg .b32 t0, t1, h0, h1, l0, l1, one, two, m384;
    mov.b32 one, 0x3F803F80;
    mov.b32 two, 0x40004000;
    mov.b32 m384, 0xC3C0C3C0;
    prmt.b32 t0, $2, 0, 0x4140;
    prmt.b32 t1, $2, 0, 0x4342;
    shr.b32 h0, t0, 1;
    shr.b32 h1, t1, 1;
    lop3.b32 l0, t0, 0x000F000F, 0x43004300, 0xEA;
    lop3.b32 l1, t1, 0x000F000F, 0x43004300, 0xEA;
    lop3.b32 $0, h0, 0x00780078, 0x43004300, 0xEA;
    lop3.b32 $1, h1, 0x00780078, 0x43004300, 0xEA;
    fma.rn.bf16x2 l0, l0, one, m384;
    fma.rn.bf16x2 l1, l1, one, m384;
    fma.rn.bf16x2 $0, $0, two, l0;
    fma.rn.bf16x2 $1, $1, two, l1;
    }""")
# int8, fp16: 1024 + c is exact
ASM_INT8_FP16 = tl.constexpr("""{
    .reg .b32 one, nm;
    mov.b32 one, 0x3C003C00;
    mov.b32 nm, 0xE400E400;
    prmt.b32 $0, $2, 0, 0x4140;
    prmt.b32 $1, $2, 0, 0x4342;
    or.b32 $0, $0, 0x64006400;
    or.b32 $1, $1, 0x64006400;
    fma.rn.f16x2 $0, $0, one, nm;
    fma.rn.f16x2 $1, $1, one, nm;
    }""")


@triton.jit
def _codes(b, BITS: tl.constexpr, ASM: tl.constexpr, DT: tl.constexpr):
    """uint8 bytes `[..., J]` -> exact codes in DT: (phase 0 = low nibble, phase 1 = high nibble) for 4 bits, (code,
    code) for 8 bits. ASM: inline PTX on packed registers (CUDA, DT bf16/fp16); else plain Triton (interpreter)."""
    if ASM:
        if BITS == 4:
            if DT == tl.bfloat16:
                lo, hi = tl.inline_asm_elementwise(ASM_INT4_BF16, "=r,=r,=r,=r,r", [b],
                                                   dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
            else:
                lo, hi = tl.inline_asm_elementwise(ASM_INT4_FP16, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                                   is_pure=True, pack=4)
            return lo, hi
        else:
            if DT == tl.bfloat16:
                c = tl.inline_asm_elementwise(ASM_INT8_BF16, "=r,=r,r", [b], dtype=tl.bfloat16, is_pure=True, pack=4)
            else:
                c = tl.inline_asm_elementwise(ASM_INT8_FP16, "=r,=r,r", [b], dtype=tl.float16, is_pure=True, pack=4)
            return c, c
    else:
        if BITS == 4:
            return (b & 0xF).to(tl.float32).to(DT), (b >> 4).to(tl.float32).to(DT)
        else:
            c = b.to(tl.float32).to(DT)
            return c, c


@triton.jit(do_not_specialize=["T_CAP", "R_CAP", "TILES_PER_SPLIT", "S_HIST", "S_TOTAL"])  # no recompiles as T, R grow
def _decode_split_kernel_v3(
    Q, KC, KS, KZ, VC, VS, VZ, RK, RV, KV_START, LENS, PM, PL, PO,
    scaling, softcap, T_CAP, R_CAP, HKV, TILES_PER_SPLIT, S_HIST, S_TOTAL,
    GQ: tl.constexpr, NQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
    KEY_PER_CHANNEL: tl.constexpr, HAS_START: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    ASM: tl.constexpr, VDT: tl.constexpr, PRECISION: tl.constexpr, BIAS_DOT: tl.constexpr = False,
    CDT: tl.constexpr = None, V_JOIN: tl.constexpr = False, DYN_LEN: tl.constexpr = False,
):
    """v3 (4 and 8 bits, D / G <= 2 value groups): phase-split like v2, codes enter both dots as exact small integers
    (`_codes`), and per-token value scales/zeros never touch the [N, D] tile: for value group g
    `o_g += (p * s_g) @ c_g` and `o_g += p @ z_g` (the zeros of all groups in one [N, 16] dot, added at the end).
    CDT: the codes' float type in the dots (the queries' 16-bit type; fp16 for 8-bit codes, where 1024 + c is exact);
    BIAS_DOT: per-channel key zeros enter the score dot (z broadcast over tokens) instead of a row reduction.
    V_JOIN (4 bits): a value group's two phases are joined back into channel order before the dot (the 16-bit tile
    reaches the MMA through shared memory instead of byte gathers), one accumulator per group."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    PB: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // PB
    NG: tl.constexpr = D // G
    GB: tl.constexpr = G // PB
    M: tl.constexpr = GQ * NQ
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, DB)
    offs_c = tl.arange(0, GB)
    VJ: tl.constexpr = V_JOIN and PB == 2
    AW: tl.constexpr = G if VJ else GB  # accumulator width: a value group in channel order, or one phase of it
    offs_a = tl.arange(0, AW)
    offs_z = tl.arange(0, 16)
    offs_g = tl.arange(0, NG)
    row_ok = offs_m < M
    head = pid_bh * GQ + offs_m // NQ
    qi = offs_m % NQ
    q_row = Q + ((head * NQ + qi) * D)[:, None] + offs_j[None, :] * PB
    q0 = tl.load(q_row, mask=row_ok[:, None], other=0.0).to(tl.float32)
    q1 = q0
    if PB == 2:
        q1 = tl.load(q_row + 1, mask=row_ok[:, None], other=0.0).to(tl.float32)
    T, R = _valid_lengths(LENS, T_CAP, R_CAP, DYN_LEN)
    qpos = T + R - NQ + qi
    if HAS_START:
        start = tl.load(KV_START + b).to(tl.int32)
    else:
        start = 0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    a00 = tl.zeros([BLOCK_M, AW], tl.float32)  # a<phase><group>
    a10 = tl.zeros([BLOCK_M, AW], tl.float32)
    a01 = tl.zeros([BLOCK_M, AW], tl.float32)
    a11 = tl.zeros([BLOCK_M, AW], tl.float32)
    zacc = tl.zeros([BLOCK_M, 16], tl.float32)  # column g: sum_n p * value_zero[n, g]
    span = TILES_PER_SPLIT * BLOCK_N
    if pid_s < S_HIST:
        lo, hi = _history_range(pid_s, T, span, S_HIST, BLOCK_N, DYN_LEN)
        lo = tl.maximum(lo, (start // BLOCK_N) * BLOCK_N)
        bh_t = pid_bh.to(tl.int64) * T_CAP  # row strides from the capacity
        for t0 in range(lo, hi, BLOCK_N):
            pos = t0 + offs_n
            n_ok = pos < T
            rows = bh_t + pos
            kb = tl.load(KC + rows[:, None] * DB + offs_j[None, :], mask=n_ok[:, None], other=0)
            k0, k1 = _codes(kb, BITS, ASM, CDT)
            if KEY_PER_CHANNEL:
                kp = KS + ((bh_t + t0) // G) * D + offs_j * PB
                zp = KZ + ((bh_t + t0) // G) * D + offs_j * PB
                qs = (q0 * tl.load(kp).to(tl.float32)[None, :]).to(CDT)
                s = tl.dot(qs, tl.trans(k0), input_precision=PRECISION)
                if PB == 2:
                    qs = (q1 * tl.load(kp + 1).to(tl.float32)[None, :]).to(CDT)
                    s = tl.dot(qs, tl.trans(k1), acc=s, input_precision=PRECISION)
                if BIAS_DOT:  # q . z on the tensor cores: z broadcast over the tile's tokens (exact bf16 products)
                    zb = tl.broadcast_to(tl.load(zp)[:, None], (DB, BLOCK_N)).to(VDT)
                    s = tl.dot(q0.to(VDT), zb, acc=s, input_precision=PRECISION)
                    if PB == 2:
                        zb = tl.broadcast_to(tl.load(zp + 1)[:, None], (DB, BLOCK_N)).to(VDT)
                        s = tl.dot(q1.to(VDT), zb, acc=s, input_precision=PRECISION)
                else:
                    bias = tl.sum(q0 * tl.load(zp).to(tl.float32)[None, :], 1)
                    if PB == 2:
                        bias += tl.sum(q1 * tl.load(zp + 1).to(tl.float32)[None, :], 1)
                    s += bias[:, None]
            else:
                ks = tl.load(KS + rows[:, None] * NG + offs_g[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
                kz = tl.load(KZ + rows[:, None] * NG + offs_g[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
                ksb = _expand_groups(ks, BLOCK_N, NG, DB // NG)
                kzb = _expand_groups(kz, BLOCK_N, NG, DB // NG)
                k = (k0.to(tl.float32) * ksb + kzb).to(VDT)
                s = tl.dot(q0.to(VDT), tl.trans(k), input_precision=PRECISION)
                if PB == 2:
                    k = (k1.to(tl.float32) * ksb + kzb).to(VDT)
                    s += tl.dot(q1.to(VDT), tl.trans(k), input_precision=PRECISION)
            p, alpha, m_i, l_i = _softmax_weights(s, pos, n_ok, qpos, start, m_i, l_i, scaling, softcap, USE_SOFTCAP)
            vz = tl.load(VZ + rows[:, None] * NG + offs_z[None, :], mask=n_ok[:, None] & (offs_z < NG)[None, :],
                         other=0).to(VDT)
            zacc = zacc * alpha[:, None] + tl.dot(p.to(VDT), vz, input_precision=PRECISION)
            vs = tl.load(VS + rows * NG, mask=n_ok, other=0).to(tl.float32)
            pg = (p * vs[None, :]).to(CDT)
            vb = tl.load(VC + rows[:, None] * DB + offs_c[None, :], mask=n_ok[:, None], other=0)
            v0, v1 = _codes(vb, BITS, ASM, CDT)
            if VJ:
                a00 = a00 * alpha[:, None] + tl.dot(pg, tl.reshape(tl.join(v0, v1), (BLOCK_N, G)),
                                                    input_precision=PRECISION)
            else:
                a00 = a00 * alpha[:, None] + tl.dot(pg, v0, input_precision=PRECISION)
                if PB == 2:
                    a10 = a10 * alpha[:, None] + tl.dot(pg, v1, input_precision=PRECISION)
            if NG == 2:
                vs = tl.load(VS + rows * NG + 1, mask=n_ok, other=0).to(tl.float32)
                pg = (p * vs[None, :]).to(CDT)
                vb = tl.load(VC + rows[:, None] * DB + GB + offs_c[None, :], mask=n_ok[:, None], other=0)
                v0, v1 = _codes(vb, BITS, ASM, CDT)
                if VJ:
                    a01 = a01 * alpha[:, None] + tl.dot(pg, tl.reshape(tl.join(v0, v1), (BLOCK_N, G)),
                                                        input_precision=PRECISION)
                else:
                    a01 = a01 * alpha[:, None] + tl.dot(pg, v0, input_precision=PRECISION)
                    if PB == 2:
                        a11 = a11 * alpha[:, None] + tl.dot(pg, v1, input_precision=PRECISION)
    else:
        lo = (pid_s - S_HIST) * span
        hi = tl.minimum(R, lo + span)
        lo = tl.maximum(lo, ((start - T) // BLOCK_N) * BLOCK_N)
        bh_r = pid_bh.to(tl.int64) * R_CAP
        for r0 in tl.range(lo, hi, BLOCK_N, num_stages=1):
            rr = r0 + offs_n
            n_ok = rr < R
            base_r = (bh_r + rr)[:, None] * D
            ptr = base_r + offs_j[None, :] * PB
            s = tl.dot(q0.to(VDT), tl.trans(tl.load(RK + ptr, mask=n_ok[:, None], other=0.0).to(VDT)),
                       input_precision=PRECISION)
            if PB == 2:
                s += tl.dot(q1.to(VDT), tl.trans(tl.load(RK + ptr + 1, mask=n_ok[:, None], other=0.0).to(VDT)),
                            input_precision=PRECISION)
            p, alpha, m_i, l_i = _softmax_weights(s, T + rr, n_ok, qpos, start, m_i, l_i, scaling, softcap,
                                                  USE_SOFTCAP)
            p = p.to(VDT)
            if VJ:
                ptr = base_r + offs_a[None, :]
            else:
                ptr = base_r + offs_a[None, :] * PB
            v = tl.load(RV + ptr, mask=n_ok[:, None], other=0.0).to(VDT)
            a00 = a00 * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            if PB == 2 and not VJ:
                v = tl.load(RV + ptr + 1, mask=n_ok[:, None], other=0.0).to(VDT)
                a10 = a10 * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            if NG == 2:
                v = tl.load(RV + ptr + G, mask=n_ok[:, None], other=0.0).to(VDT)
                a01 = a01 * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
                if PB == 2 and not VJ:
                    v = tl.load(RV + ptr + G + 1, mask=n_ok[:, None], other=0.0).to(VDT)
                    a11 = a11 * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    base = (pid_bh * S_TOTAL + pid_s) * BLOCK_M + offs_m
    tl.store(PM + base, m_i)
    tl.store(PL + base, l_i)
    if VJ:
        po = PO + base[:, None] * D + offs_a[None, :]
    else:
        po = PO + base[:, None] * D + offs_a[None, :] * PB
    z0 = tl.sum(tl.where(offs_z[None, :] == 0, zacc, 0.0), 1)[:, None]
    tl.store(po, a00 + z0)
    if PB == 2 and not VJ:
        tl.store(po + 1, a10 + z0)
    if NG == 2:
        z1 = tl.sum(tl.where(offs_z[None, :] == 1, zacc, 0.0), 1)[:, None]
        tl.store(po + G, a01 + z1)
        if PB == 2 and not VJ:
            tl.store(po + G + 1, a11 + z1)


def v3_supported(bits: int, head_dim: int, group_size: int) -> bool:
    """v3 covers 4 and 8 bits with at most two value groups per head (D / G <= 2); v2 runs the rest."""
    return bits in (4, 8) and head_dim // group_size <= 2


# default kernel variant: 3 where it applies (4/8 bits, D / G <= 2), else 2 (docs/kernels.md); the environment variable
# KVPRESS_DECODE_VARIANT=1/2/3 overrides it (tests, benchmarks)
DEFAULT_VARIANT = int(os.environ.get("KVPRESS_DECODE_VARIANT", "3"))
# v3 launch defaults per bit width with 2 warps, from the H200 sweeps at 32k x 8 (docs/kernels.md): pipeline stages,
# register cap, and the programs per SM that it leaves resident (252 registers: 4; capped at 168: 6). The split count
# is then chosen so that the history programs fill the GPU once (one wave): the kernel is latency-bound, and a
# second, partly filled wave cost up to 35% in the sweeps.
V3_DEFAULTS = {4: dict(num_stages=2, maxnreg=168, per_sm=6), 8: dict(num_stages=3, maxnreg=None, per_sm=4)}

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, to exercise the reduction


def triton_decode_attention(query, packed=None, kv_start=None, scaling=None, softcap=0.0, config=None, **flat):
    """`[B, H_q, q, D]` decode attention of `query` over `packed` (a `kernels.packed.PackedKV`): the seam's entry.

    config: None, or a dict of the launcher's tuning keywords (block_n, num_splits, num_warps, variant, ...).
    Without `packed`, the pre-seam flat keywords (key_codes=..., bits=..., key_per_channel=...) reach the launcher
    unchanged (tests/test_kernels.py, benchmarks/kernel_bench.py until the kernel rewrite lands).
    """
    if packed is None:
        return _triton_decode_flat(query, kv_start=kv_start, scaling=scaling, softcap=softcap, **flat, **(config or {}))
    residual = packed.has_residual
    return _triton_decode_flat(
        query, packed.key_codes, packed.key_scale, packed.key_zero, packed.value_codes, packed.value_scale,
        packed.value_zero, packed.residual_keys if residual else None, packed.residual_values if residual else None,
        kv_start, packed.bits, packed.group_size, packed.key_per_channel,
        query.shape[-1] ** -0.5 if scaling is None else scaling, softcap, lengths=packed.lengths, **(config or {}))


def _triton_decode_flat(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
                        residual_keys, residual_values, kv_start, bits: int, group_size: int,
                        key_per_channel: bool, scaling: float, softcap: float = 0.0, *,
                        block_n: int | None = None, num_splits: int | None = None, num_warps: int = 2,
                        num_stages: int | None = None, magic: bool = True, variant: int | None = None,
                        bias_dot: bool = True, v_join: bool = False,
                        maxnreg: int | None | str = "auto", lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Triton path of `quantized_decode_attention` (arguments validated by the caller; see reference.py).

    lengths: None, or int `(2,)` (T_valid, R_valid) on the device (valid-length mode): the history/residual tensors
    are capacity buffers; the kernels read the valid lengths themselves (DYN_LEN), and every host-side value (grid,
    split counts, block sizes, launch arguments) depends only on the shapes, so one launch can be replayed by a CUDA
    graph while the lengths change.
    """
    b, hq, nq, d = query.shape
    if variant is None:
        variant = DEFAULT_VARIANT
    if variant == 3 and not v3_supported(bits, d, group_size):
        variant = 2
    per_sm = None  # resident programs per SM, when known (v3 defaults)
    if variant == 3:
        tuned = V3_DEFAULTS[bits]
        if num_stages is None:
            num_stages = tuned["num_stages"]
        if maxnreg == "auto":
            maxnreg = tuned["maxnreg"] if num_warps == 2 else None
            per_sm = tuned["per_sm"] if num_warps == 2 and num_stages == tuned["num_stages"] else None
    if maxnreg == "auto":
        maxnreg = None
    if num_stages is None:
        num_stages = 3
    has_hist = key_codes is not None and key_codes.shape[2] > 0
    has_res = residual_keys is not None and residual_keys.shape[2] > 0
    any_kv = key_codes if has_hist else residual_keys
    hkv = any_kv.shape[1]
    gq = hq // hkv
    t = key_codes.shape[2] if has_hist else 0
    r = residual_keys.shape[2] if has_res else 0
    dtype = query.dtype
    if block_n is None:
        block_n = 64
    if has_hist and key_per_channel:
        block_n = min(block_n, group_size)  # a tile lies inside one key group (power-of-two G, checked by caller)
    block_m = max(16, triton.next_power_of_2(gq * nq))

    n_tiles_h = triton.cdiv(t, block_n)
    n_tiles_r = triton.cdiv(r, block_n)
    if num_splits is None and per_sm is not None:  # v3: one wave of history programs (docs/kernels.md)
        num_splits = max(1, per_sm * _num_sms(query.device) // (b * hkv))
    elif num_splits is None:  # v1/v2: ~8 programs per SM (measured at 32k x 8 on an H200, docs/kernels.md)
        num_splits = max(1, triton.cdiv(8 * _num_sms(query.device), b * hkv))
    tiles_per_split = max(1, triton.cdiv(n_tiles_h + n_tiles_r, num_splits))
    s_hist = triton.cdiv(n_tiles_h, tiles_per_split)
    s_total = s_hist + triton.cdiv(n_tiles_r, tiles_per_split)

    # magic-number code conversion: bf16 holds 128 + c exactly for c < 128, fp16 holds 1024 + c for c < 1024
    if not magic or dtype == torch.float32:
        magic = 0
    else:
        magic = 1 if bits <= 4 and dtype == torch.bfloat16 else 2
    off = {0: 0.0, 1: 128.0, 2: 1024.0}[magic]
    vdt = _TL_DTYPES[dtype]
    kdt = {0: vdt, 1: tl.bfloat16, 2: tl.float16}[magic]
    if INTERPRET:  # the interpreter keeps bf16 as raw uint16 and cannot dot it: compute in fp32 there
        vdt = tl.float32 if vdt == tl.bfloat16 else vdt
        kdt = tl.float32 if kdt == tl.bfloat16 else kdt
    precision = "ieee" if dtype == torch.float32 else None

    dev = query.device
    f32 = torch.float32
    pm = torch.empty((b * hkv, s_total, block_m), device=dev, dtype=f32)
    pl = torch.empty_like(pm)
    po = torch.empty((b * hkv, s_total, block_m, d), device=dev, dtype=f32)
    out = torch.empty((b, hq, nq, d), device=dev, dtype=dtype)
    q = query.contiguous()
    dummy = pm  # never dereferenced when its segment is empty
    kc, ks, kz, vc, vs, vz = (x.contiguous() if has_hist else dummy
                              for x in (key_codes, key_scale, key_zero, value_codes, value_scale, value_zero))
    rk, rv = (x.contiguous() if has_res else dummy for x in (residual_keys, residual_values))
    start = kv_start.contiguous() if kv_start is not None else dummy
    common = dict(GQ=gq, NQ=nq, BLOCK_M=block_m, BLOCK_N=block_n, D=d, BITS=bits, G=group_size,
                  KEY_PER_CHANNEL=bool(key_per_channel), HAS_START=kv_start is not None, USE_SOFTCAP=bool(softcap),
                  VDT=vdt, PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    if maxnreg is not None and not INTERPRET:  # register cap per thread: more programs per SM, a few spills
        common["maxnreg"] = int(maxnreg)
    # valid-length mode: t, r above (and all that derives from them) are the capacities; the kernels bound their loops
    # and masks by the lengths they load themselves
    lens = lengths.contiguous() if lengths is not None else dummy
    common["DYN_LEN"] = lengths is not None
    args = (q, kc, ks, kz, vc, vs, vz, rk, rv, start, lens, pm, pl, po,
            float(scaling), float(softcap or 1.0), t, r, hkv, tiles_per_split, s_hist, s_total)
    if variant == 3:  # exact codes, value scales folded into p; inline PTX needs a GPU and 16-bit floats
        asm = bool(magic) and not INTERPRET and dtype in (torch.bfloat16, torch.float16)
        cdt = tl.float16 if asm and bits == 8 else vdt
        _decode_split_kernel_v3[(b * hkv, s_total)](*args, ASM=asm, BIAS_DOT=bool(bias_dot), CDT=cdt,
                                                      V_JOIN=bool(v_join), **common)
    else:
        kernel = _decode_split_kernel_v2 if variant == 2 else _decode_split_kernel
        kernel[(b * hkv, s_total)](*args, MAGIC=magic, OFF=off, KDT=kdt, **common)
    _decode_reduce_kernel[(b * hkv, gq * nq)](
        pm, pl, po, out, s_total, GQ=gq, NQ=nq, BLOCK_M=block_m, D=d,
        BLOCK_S=triton.next_power_of_2(s_total), num_warps=4,
    )
    return out


def supported_shape(head_dim: int, bits: int, group_size: int, key_per_channel: bool) -> str | None:
    """None if the Triton kernel handles this layout, else the reason it does not."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim={head_dim} must be a power of two >= 16"
    if group_size & (group_size - 1) or group_size > head_dim or group_size * bits < 8:
        return f"group_size={group_size} must be a power of two <= head_dim and >= {8 // bits} (codes per byte)"
    if not INTERPRET and head_dim * bits // 8 < 16:
        return f"head_dim * bits / 8 = {head_dim * bits // 8} bytes per token must be >= 16 (tensor-core dot)"
    if not INTERPRET and key_per_channel and group_size < 16:
        return f"per-channel keys need group_size >= 16 (a key tile lies in one group), got {group_size}"
    return None


__all__ = ["INTERPRET", "supported_shape", "triton_decode_attention", "v3_supported"]
