"""Decode kernel v2 (`CHANNEL_PACKED` values, every bit width and group size): phase-split codes, tiles dequantized in
registers. The launcher is `triton_decode`; docs/kernels.md has the history and the measurements."""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (
    _entry_pos,
    _expand_groups,
    _history_range,
    _phase,
    _softmax_weights,
    _store_logits,
    _to_float,
    _valid_lengths,
)


@triton.jit(do_not_specialize=["T_CAP", "R_CAP", "TILES_PER_SPLIT", "S_HIST", "S_TOTAL"])  # no recompiles as T, R grow
def _decode_split_kernel_v2(
    Q, KC, KS, KZ, VC, VS, VZ, RK, RV, KV_START, LENS, PM, PL, PO, LG, EPOS,
    scaling, softcap, T_CAP, R_CAP, HKV, TILES_PER_SPLIT, S_HIST, S_TOTAL,
    GQ: tl.constexpr, NQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
    KEY_PER_CHANNEL: tl.constexpr, HAS_START: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    MAGIC: tl.constexpr, OFF: tl.constexpr, KDT: tl.constexpr, VDT: tl.constexpr, PRECISION: tl.constexpr,
    DYN_LEN: tl.constexpr = False, PROBS: tl.constexpr = False, HAS_POS: tl.constexpr = False,
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
    skip = start  # left padding skipped by whole tiles; not with entry positions (validity is per entry there)
    if HAS_POS:
        skip = 0
    NTOT = T_CAP + R_CAP  # entries of the logits / positions rows: history capacity, then residual capacity
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, DB], tl.float32)
    acc1 = tl.zeros([BLOCK_M, DB], tl.float32)
    acc2 = tl.zeros([BLOCK_M, DB], tl.float32)
    acc3 = tl.zeros([BLOCK_M, DB], tl.float32)
    span = TILES_PER_SPLIT * BLOCK_N
    if pid_s < S_HIST:
        lo, hi = _history_range(pid_s, T, span, S_HIST, BLOCK_N, DYN_LEN)
        lo = tl.maximum(lo, (skip // BLOCK_N) * BLOCK_N)
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
            vpos = _entry_pos(EPOS, pid_bh, NTOT, pos, n_ok, pos, HAS_POS)
            p, alpha, m_i, l_i, sl = _softmax_weights(s, pos, vpos, n_ok, qpos, start, m_i, l_i, scaling, softcap,
                                                      USE_SOFTCAP)
            if PROBS:
                _store_logits(LG, sl, pid_bh, offs_m, GQ * NQ, pos, n_ok, NTOT, False)
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
        lo = tl.maximum(lo, ((skip - T) // BLOCK_N) * BLOCK_N)
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
            vpos = _entry_pos(EPOS, pid_bh, NTOT, T_CAP + rr, n_ok, T + rr, HAS_POS)
            p, alpha, m_i, l_i, sl = _softmax_weights(s, T + rr, vpos, n_ok, qpos, start, m_i, l_i, scaling, softcap,
                                                      USE_SOFTCAP)
            if PROBS:
                _store_logits(LG, sl, pid_bh, offs_m, GQ * NQ, T_CAP + rr, n_ok, NTOT, False)
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
