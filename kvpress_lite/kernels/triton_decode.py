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


@triton.jit(do_not_specialize=["T", "R", "TILES_PER_SPLIT", "S_HIST", "S_TOTAL"])  # no recompiles as T, R grow
def _decode_split_kernel(
    Q, KC, KS, KZ, VC, VS, VZ, RK, RV, KV_START, PM, PL, PO,
    scaling, softcap, T, R, HKV, TILES_PER_SPLIT, S_HIST, S_TOTAL,
    GQ: tl.constexpr, NQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
    KEY_PER_CHANNEL: tl.constexpr, HAS_START: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    MAGIC: tl.constexpr, OFF: tl.constexpr, KDT: tl.constexpr, VDT: tl.constexpr, PRECISION: tl.constexpr,
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
        lo = pid_s * span
        hi = tl.minimum(T, lo + span)
        lo = tl.maximum(lo, (start // BLOCK_N) * BLOCK_N)  # skip whole tiles of left padding
        bh_t = pid_bh.to(tl.int64) * T
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
                grp = (bh_t + t0) // G  # row of [B*HKV*T/G, D] (T is a multiple of G, tiles never straddle)
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
        bh_r = pid_bh.to(tl.int64) * R
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


@triton.jit(do_not_specialize=["T", "R", "TILES_PER_SPLIT", "S_HIST", "S_TOTAL"])  # no recompiles as T, R grow
def _decode_split_kernel_v2(
    Q, KC, KS, KZ, VC, VS, VZ, RK, RV, KV_START, PM, PL, PO,
    scaling, softcap, T, R, HKV, TILES_PER_SPLIT, S_HIST, S_TOTAL,
    GQ: tl.constexpr, NQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
    KEY_PER_CHANNEL: tl.constexpr, HAS_START: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    MAGIC: tl.constexpr, OFF: tl.constexpr, KDT: tl.constexpr, VDT: tl.constexpr, PRECISION: tl.constexpr,
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
        lo = pid_s * span
        hi = tl.minimum(T, lo + span)
        lo = tl.maximum(lo, (start // BLOCK_N) * BLOCK_N)
        bh_t = pid_bh.to(tl.int64) * T
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
        bh_r = pid_bh.to(tl.int64) * R
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


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, to exercise the reduction


def triton_decode_attention(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
                            residual_keys, residual_values, kv_start, bits: int, group_size: int,
                            key_per_channel: bool, scaling: float, softcap: float = 0.0, *,
                            block_n: int | None = None, num_splits: int | None = None, num_warps: int = 2,
                            num_stages: int = 3, magic: bool = True, variant: int = 2) -> torch.Tensor:
    """Triton path of `quantized_decode_attention` (arguments validated by the caller; see reference.py)."""
    b, hq, nq, d = query.shape
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
    if num_splits is None:  # ~8 programs per SM (measured best at 32k x 8 on an H200, docs/kernels.md)
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
    kernel = _decode_split_kernel_v2 if variant == 2 else _decode_split_kernel
    kernel[(b * hkv, s_total)](
        q, kc, ks, kz, vc, vs, vz, rk, rv, start, pm, pl, po,
        float(scaling), float(softcap or 1.0), t, r, hkv, tiles_per_split, s_hist, s_total,
        GQ=gq, NQ=nq, BLOCK_M=block_m, BLOCK_N=block_n, D=d, BITS=bits, G=group_size,
        KEY_PER_CHANNEL=bool(key_per_channel), HAS_START=kv_start is not None, USE_SOFTCAP=bool(softcap),
        MAGIC=magic, OFF=off, KDT=kdt, VDT=vdt, PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
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


__all__ = ["INTERPRET", "supported_shape", "triton_decode_attention"]
