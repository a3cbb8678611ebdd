"""Decode kernels v4 and v4t (`TOKEN_PACKED` values, any bits, D / G <= 4): value tiles loaded channel-major with
tokens packed along the bytes (the tensor cores' B-operand order for `p @ V`); v4t puts the query rows on the N side of
the dots. The launcher is `triton_decode`; docs/kernels.md has the measurements."""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_codes import _codes, _codes_raw
from .triton_common import _entry_pos, _expand_groups, _history_range, _softmax_weights, _store_logits, _valid_lengths


# Loads in the v4 loops are contiguous rows of >= 4 bytes per thread (key scales/zeros of all channels, value
# scales/zeros of all groups of a token), split into phases/columns in registers: strided 2-byte loads cannot be
# pipelined (cp.async moves 4, 8 or 16 bytes) and stalled every tile for a full memory latency (docs/kernels.md).
@triton.jit
def _phases(x, PB: tl.constexpr, DB: tl.constexpr):
    """`[D]` per-channel values -> (even channels, odd channels) `[D / 2]` for PB == 2, else (x, x)."""
    if PB == 2:
        return tl.split(tl.reshape(x, (DB, 2)))
    else:
        return x, x


@triton.jit
def _columns(x, NZ: tl.constexpr, N: tl.constexpr):
    """`[N, NZ]` (NZ 2 or 4) -> its columns `[N]` (c0, c1, c2, c3; c2 = c3 = c0 when NZ == 2)."""
    if NZ == 2:
        c0, c1 = tl.split(x)
        return c0, c1, c0, c0
    else:
        x0, x1 = tl.split(tl.reshape(x, (N, 2, 2)))
        c0, c2 = tl.split(x0)
        c1, c3 = tl.split(x1)
        return c0, c1, c2, c3


@triton.jit
def _codes_in_order(b, BITS: tl.constexpr, ASM: tl.constexpr, DT: tl.constexpr, ROWS: tl.constexpr,
                    COLS: tl.constexpr):
    """uint8 bytes `[ROWS, COLS]` -> codes `[ROWS, COLS * 8 // BITS]` in DT, the fields of each byte in order (low
    bits first) along the last dim: the channels of a channel-packed row, the tokens of a token-packed row."""
    if BITS == 8:
        c, _ = _codes(b, 8, ASM, DT)
        return c
    elif BITS == 4:
        lo, hi = _codes(b, 4, ASM, DT)
        return tl.reshape(tl.join(lo, hi), (ROWS, COLS * 2))
    else:
        p0 = (b & 3).to(tl.float32).to(DT)
        p1 = ((b >> 2) & 3).to(tl.float32).to(DT)
        p2 = ((b >> 4) & 3).to(tl.float32).to(DT)
        p3 = (b >> 6).to(tl.float32).to(DT)
        return tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), (ROWS, COLS * 4))


@triton.jit
def _value_group(acc, alpha, p, VC, vs, vrow0, prow, pcol, pcol_ok, g: tl.constexpr, G: tl.constexpr,
                 BITS: tl.constexpr, NP: tl.constexpr, ASM: tl.constexpr, CDT: tl.constexpr, PRECISION: tl.constexpr):
    """acc * alpha + (p * s_g) @ c_g for value group g (per-token scales `vs` `[N]`): codes `[G, NP]` bytes of
    channels g*G.. (token-packed rows)."""
    offs_gr = tl.arange(0, G)
    vb = tl.load(VC + (vrow0 + g * G + offs_gr)[:, None] * prow + pcol[None, :], mask=pcol_ok[None, :], other=0)
    v = _codes_in_order(vb, BITS, ASM, CDT, G, NP)  # [G, N]
    pg = (p * vs[None, :]).to(CDT)
    return acc * alpha[:, None] + tl.dot(pg, tl.trans(v), input_precision=PRECISION)


@triton.jit(do_not_specialize=["T_CAP", "R_CAP", "P16", "TILES_PER_SPLIT", "S_HIST", "S_TOTAL"])
def _decode_split_kernel_v4(
    Q, KC, KS, KZ, VC, VS, VZ, RK, RV, KV_START, LENS, PM, PL, PO, LG, EPOS,
    scaling, softcap, T_CAP, R_CAP, P16, HKV, TILES_PER_SPLIT, S_HIST, S_TOTAL,
    GQ: tl.constexpr, NQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
    KEY_PER_CHANNEL: tl.constexpr, HAS_START: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    ASM: tl.constexpr, VDT: tl.constexpr, PRECISION: tl.constexpr, CDT: tl.constexpr, K_JOIN: tl.constexpr,
    BIAS_DOT: tl.constexpr = True, DYN_LEN: tl.constexpr = False, PROBS: tl.constexpr = False,
    HAS_POS: tl.constexpr = False,
):
    """v4: value codes token-packed (`[B*H, D, P]`, P = 16 * P16 bytes per channel row; layouts.py), keys
    channel-packed. Values: per value group g (NG = D / G <= 4), `o_g += (p * s_g) @ c_g` with the codes tile
    `[G, BLOCK_N]` loaded channel-major (tokens along the bytes, the B-operand order of the dot over tokens), and all
    groups' zeros from one `[N, 16]` dot `p @ z`. Keys: K_JOIN joins the codes of a byte back into channel order (one
    dot with the whole query, any bits); else (4/8 bits) phase-split like v3 (two dots over even/odd channels)."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    PB: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // PB
    NG: tl.constexpr = D // G
    NP: tl.constexpr = BLOCK_N // PB
    KJ: tl.constexpr = K_JOIN or PB == 4
    QW: tl.constexpr = D if KJ else DB  # query columns per key dot
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, DB)
    offs_q = tl.arange(0, QW)
    offs_p = tl.arange(0, NP)
    offs_gc = tl.arange(0, G)
    NZ: tl.constexpr = 2 if NG == 1 else NG  # value scale/zero columns loaded per token (>= 2: 4-byte rows)
    offs_z = tl.arange(0, NZ)
    offs_d = tl.arange(0, D)
    offs_g = tl.arange(0, NG)
    row_ok = offs_m < GQ * NQ
    head = pid_bh * GQ + offs_m // NQ
    qi = offs_m % NQ
    if KJ:
        q_row = Q + ((head * NQ + qi) * D)[:, None] + offs_q[None, :]
    else:
        q_row = Q + ((head * NQ + qi) * D)[:, None] + offs_q[None, :] * PB
    q0 = tl.load(q_row, mask=row_ok[:, None], other=0.0).to(tl.float32)
    q1 = q0
    if not KJ and PB == 2:
        q1 = tl.load(q_row + 1, mask=row_ok[:, None], other=0.0).to(tl.float32)
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
    a0 = tl.zeros([BLOCK_M, G], tl.float32)  # one accumulator per value group (channels g*G ..)
    a1 = tl.zeros([BLOCK_M, G], tl.float32)
    a2 = tl.zeros([BLOCK_M, G], tl.float32)
    a3 = tl.zeros([BLOCK_M, G], tl.float32)
    zacc = tl.zeros([BLOCK_M, NZ], tl.float32)  # column g: sum_n p * value_zero[n, g]
    span = TILES_PER_SPLIT * BLOCK_N
    if pid_s < S_HIST:
        lo, hi = _history_range(pid_s, T, span, S_HIST, BLOCK_N, DYN_LEN)
        lo_t = tl.maximum(lo, skip) // BLOCK_N  # whole tiles of left padding skipped
        hi_t = tl.cdiv(hi, BLOCK_N)
        bh_t = pid_bh.to(tl.int64) * T_CAP  # token rows of keys and value scales (capacity strides)
        prow = P16 * 16  # bytes per token-packed channel row (a multiple of 16: vector loads)
        vrow0 = pid_bh.to(tl.int64) * D
        for it in range(lo_t, hi_t):
            t0 = it * BLOCK_N
            pos = t0 + offs_n
            n_ok = pos < T
            rows = bh_t + pos
            kb = tl.load(KC + rows[:, None] * DB + offs_j[None, :], mask=n_ok[:, None], other=0)
            if KEY_PER_CHANNEL:
                kp = KS + ((bh_t + t0) // G) * D
                zp = KZ + ((bh_t + t0) // G) * D
                if KJ:
                    k = _codes_in_order(kb, BITS, ASM, CDT, BLOCK_N, DB)  # [N, D]
                    qs = (q0 * tl.load(kp + offs_q).to(tl.float32)[None, :]).to(CDT)
                    s = tl.dot(qs, tl.trans(k), input_precision=PRECISION)
                    if BIAS_DOT:
                        zb = tl.broadcast_to(tl.load(zp + offs_q)[:, None], (D, BLOCK_N)).to(VDT)
                        s = tl.dot(q0.to(VDT), zb, acc=s, input_precision=PRECISION)
                    else:
                        s += tl.sum(q0 * tl.load(zp + offs_q).to(tl.float32)[None, :], 1)[:, None]
                else:
                    k0, k1 = _codes(kb, BITS, ASM, CDT)
                    ks0, ks1 = _phases(tl.load(kp + offs_d).to(tl.float32), PB, DB)
                    kz0, kz1 = _phases(tl.load(zp + offs_d), PB, DB)
                    qs = (q0 * ks0[None, :]).to(CDT)
                    s = tl.dot(qs, tl.trans(k0), input_precision=PRECISION)
                    if PB == 2:
                        qs = (q1 * ks1[None, :]).to(CDT)
                        s = tl.dot(qs, tl.trans(k1), acc=s, input_precision=PRECISION)
                    if BIAS_DOT:
                        zb = tl.broadcast_to(kz0[:, None], (DB, BLOCK_N)).to(VDT)
                        s = tl.dot(q0.to(VDT), zb, acc=s, input_precision=PRECISION)
                        if PB == 2:
                            zb = tl.broadcast_to(kz1[:, None], (DB, BLOCK_N)).to(VDT)
                            s = tl.dot(q1.to(VDT), zb, acc=s, input_precision=PRECISION)
                    else:
                        bias = tl.sum(q0 * kz0.to(tl.float32)[None, :], 1)
                        if PB == 2:
                            bias += tl.sum(q1 * kz1.to(tl.float32)[None, :], 1)
                        s += bias[:, None]
            else:  # per-token keys: dequantize the tile (scale/zero per token and channel group)
                ks = tl.load(KS + rows[:, None] * NG + offs_g[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
                kz = tl.load(KZ + rows[:, None] * NG + offs_g[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
                if KJ:
                    k = _codes_in_order(kb, BITS, ASM, CDT, BLOCK_N, DB).to(tl.float32)
                    k = k * _expand_groups(ks, BLOCK_N, NG, G) + _expand_groups(kz, BLOCK_N, NG, G)
                    s = tl.dot(q0.to(VDT), tl.trans(k.to(VDT)), input_precision=PRECISION)
                else:
                    k0, k1 = _codes(kb, BITS, ASM, CDT)
                    ksb = _expand_groups(ks, BLOCK_N, NG, DB // NG)
                    kzb = _expand_groups(kz, BLOCK_N, NG, DB // NG)
                    k = (k0.to(tl.float32) * ksb + kzb).to(VDT)
                    s = tl.dot(q0.to(VDT), tl.trans(k), input_precision=PRECISION)
                    if PB == 2:
                        k = (k1.to(tl.float32) * ksb + kzb).to(VDT)
                        s += tl.dot(q1.to(VDT), tl.trans(k), input_precision=PRECISION)
            vpos = _entry_pos(EPOS, pid_bh, NTOT, pos, n_ok, pos, HAS_POS)
            p, alpha, m_i, l_i, sl = _softmax_weights(s, pos, vpos, n_ok, qpos, start, m_i, l_i, scaling, softcap,
                                                      USE_SOFTCAP)
            if PROBS:
                _store_logits(LG, sl, pid_bh, offs_m, GQ * NQ, pos, n_ok, NTOT, False)
            zmask = n_ok[:, None] & (offs_z < NG)[None, :]
            vz = tl.load(VZ + rows[:, None] * NG + offs_z[None, :], mask=zmask, other=0).to(VDT)
            zacc = zacc * alpha[:, None] + tl.dot(p.to(VDT), vz, input_precision=PRECISION)
            vs0, vs1, vs2, vs3 = _columns(tl.load(VS + rows[:, None] * NG + offs_z[None, :], mask=zmask,
                                                  other=0).to(tl.float32), NZ, BLOCK_N)
            pcol = it * NP + offs_p
            pcol_ok = pcol < prow
            a0 = _value_group(a0, alpha, p, VC, vs0, vrow0, prow, pcol, pcol_ok, 0, G, BITS, NP, ASM, CDT, PRECISION)
            if NG >= 2:
                a1 = _value_group(a1, alpha, p, VC, vs1, vrow0, prow, pcol, pcol_ok, 1, G, BITS, NP, ASM, CDT,
                                  PRECISION)
            if NG >= 3:
                a2 = _value_group(a2, alpha, p, VC, vs2, vrow0, prow, pcol, pcol_ok, 2, G, BITS, NP, ASM, CDT,
                                  PRECISION)
                a3 = _value_group(a3, alpha, p, VC, vs3, vrow0, prow, pcol, pcol_ok, 3, G, BITS, NP, ASM, CDT,
                                  PRECISION)
    else:  # residual: full-precision keys and values in channel order
        lo = (pid_s - S_HIST) * span
        hi = tl.minimum(R, lo + span)
        lo = tl.maximum(lo, ((skip - T) // BLOCK_N) * BLOCK_N)
        bh_r = pid_bh.to(tl.int64) * R_CAP
        for r0 in tl.range(lo, hi, BLOCK_N, num_stages=1):
            rr = r0 + offs_n
            n_ok = rr < R
            base_r = (bh_r + rr)[:, None] * D
            if KJ:
                s = tl.dot(q0.to(VDT), tl.trans(tl.load(RK + base_r + offs_q[None, :], mask=n_ok[:, None],
                                                        other=0.0).to(VDT)), input_precision=PRECISION)
            else:
                ptr = base_r + offs_q[None, :] * PB
                s = tl.dot(q0.to(VDT), tl.trans(tl.load(RK + ptr, mask=n_ok[:, None], other=0.0).to(VDT)),
                           input_precision=PRECISION)
                if PB == 2:
                    s += tl.dot(q1.to(VDT), tl.trans(tl.load(RK + ptr + 1, mask=n_ok[:, None], other=0.0).to(VDT)),
                                input_precision=PRECISION)
            vpos = _entry_pos(EPOS, pid_bh, NTOT, T_CAP + rr, n_ok, T + rr, HAS_POS)
            p, alpha, m_i, l_i, sl = _softmax_weights(s, T + rr, vpos, n_ok, qpos, start, m_i, l_i, scaling, softcap,
                                                      USE_SOFTCAP)
            if PROBS:
                _store_logits(LG, sl, pid_bh, offs_m, GQ * NQ, T_CAP + rr, n_ok, NTOT, False)
            p = p.to(VDT)
            ptr = base_r + offs_gc[None, :]
            a0 = a0 * alpha[:, None] + tl.dot(p, tl.load(RV + ptr, mask=n_ok[:, None], other=0.0).to(VDT),
                                              input_precision=PRECISION)
            if NG >= 2:
                a1 = a1 * alpha[:, None] + tl.dot(p, tl.load(RV + ptr + G, mask=n_ok[:, None], other=0.0).to(VDT),
                                                  input_precision=PRECISION)
            if NG >= 3:
                a2 = a2 * alpha[:, None] + tl.dot(p, tl.load(RV + ptr + 2 * G, mask=n_ok[:, None],
                                                             other=0.0).to(VDT), input_precision=PRECISION)
                a3 = a3 * alpha[:, None] + tl.dot(p, tl.load(RV + ptr + 3 * G, mask=n_ok[:, None],
                                                             other=0.0).to(VDT), input_precision=PRECISION)
    base = (pid_bh * S_TOTAL + pid_s) * BLOCK_M + offs_m
    tl.store(PM + base, m_i)
    tl.store(PL + base, l_i)
    po = PO + base[:, None] * D + offs_gc[None, :]
    tl.store(po, a0 + tl.sum(tl.where(offs_z[None, :] == 0, zacc, 0.0), 1)[:, None])
    if NG >= 2:
        tl.store(po + G, a1 + tl.sum(tl.where(offs_z[None, :] == 1, zacc, 0.0), 1)[:, None])
    if NG >= 3:
        tl.store(po + 2 * G, a2 + tl.sum(tl.where(offs_z[None, :] == 2, zacc, 0.0), 1)[:, None])
        tl.store(po + 3 * G, a3 + tl.sum(tl.where(offs_z[None, :] == 3, zacc, 0.0), 1)[:, None])


@triton.jit
def _softmax_weights_t(sT, pos, vpos, n_ok, qpos, start, m_i, l_i, scaling, softcap, USE_SOFTCAP: tl.constexpr,
                       MASKED: tl.constexpr):
    """`_softmax_weights` on transposed scores `[N, BQ]` (tokens along axis 0); MASKED False: a tile with every token
    visible to every query (interior history tiles), no masks."""
    if USE_SOFTCAP:
        x = sT * (scaling / softcap)
        t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)  # tanh(x), saturating without NaN
        sT = t * (softcap * 1.4426950408889634)
    else:
        sT = sT * (scaling * 1.4426950408889634)
    if MASKED:
        ok = (pos[:, None] <= qpos[None, :]) & ((vpos >= start) & n_ok)[:, None]
        sT = tl.where(ok, sT, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sT, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(sT - m_safe[None, :])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 0), sT


@triton.jit
def _tile_t(q0T, q1T, m_i, l_i, a0, a1, a2, a3, zacc, it, T, start, qpos, KC, KS, KZ, VC, VS, VZ, bh_t, vrow0, prow,
            scaling, softcap, MASKED: tl.constexpr, BQ: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
            BITS: tl.constexpr, G: tl.constexpr, KEY_PER_CHANNEL: tl.constexpr, USE_SOFTCAP: tl.constexpr,
            ASM: tl.constexpr, VDT: tl.constexpr, PRECISION: tl.constexpr, CDT: tl.constexpr, KJ: tl.constexpr,
            RAW_KEYS: tl.constexpr, LG, EPOS, pid_bh, NTOT, M: tl.constexpr, PROBS: tl.constexpr,
            HAS_POS: tl.constexpr):
    """One history tile of v4t: transposed scores `[N, BQ]` = codes `[N, D]` @ (q * s)^T, values
    `o_g^T [G, BQ] += c_g [G, N] @ (p * s_g) [N, BQ]` (token-packed codes: the A operand with tokens along K)."""
    PB: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // PB
    NG: tl.constexpr = D // G
    NP: tl.constexpr = BLOCK_N // PB
    QW: tl.constexpr = D if KJ else DB
    offs_n = tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, DB)
    offs_q = tl.arange(0, QW)
    offs_p = tl.arange(0, NP)
    offs_gr = tl.arange(0, G)
    NZ: tl.constexpr = 2 if NG == 1 else NG
    offs_z = tl.arange(0, NZ)
    offs_d = tl.arange(0, D)
    offs_g = tl.arange(0, NG)
    t0 = it * BLOCK_N
    pos = t0 + offs_n
    rows = bh_t + pos
    if MASKED:
        n_ok = pos < T
        kb = tl.load(KC + rows[:, None] * DB + offs_j[None, :], mask=n_ok[:, None], other=0)
    else:
        n_ok = offs_n < BLOCK_N
        kb = tl.load(KC + rows[:, None] * DB + offs_j[None, :])
    if KEY_PER_CHANNEL:
        kp = KS + ((bh_t + t0) // G) * D
        zp = KZ + ((bh_t + t0) // G) * D
        if KJ:
            k = _codes_in_order(kb, BITS, ASM, CDT, BLOCK_N, DB)  # [N, D]
            qs = (q0T * tl.load(kp + offs_q).to(tl.float32)[:, None]).to(CDT)
            sT = tl.dot(k, qs, input_precision=PRECISION)
            zq = q0T * tl.load(zp + offs_q).to(tl.float32)[:, None]
        elif RAW_KEYS:  # codes as 1024 + c (high nibbles 1024 + 16 c): 1/16 into the query, offsets into the bias
            k0, k1 = _codes_raw(kb, BITS, ASM, CDT)
            ks0, ks1 = _phases(tl.load(kp + offs_d).to(tl.float32), PB, DB)
            kz0, kz1 = _phases(tl.load(zp + offs_d).to(tl.float32), PB, DB)
            qs = (q0T * ks0[:, None]).to(CDT)
            sT = tl.dot(k0, qs, input_precision=PRECISION)
            zq = q0T * kz0[:, None] - 1024.0 * qs.to(tl.float32)
            if PB == 2:
                qs = (q1T * (ks1 * 0.0625)[:, None]).to(CDT)
                sT = tl.dot(k1, qs, acc=sT, input_precision=PRECISION)
                zq += q1T * kz1[:, None] - 1024.0 * qs.to(tl.float32)
        else:
            k0, k1 = _codes(kb, BITS, ASM, CDT)
            ks0, ks1 = _phases(tl.load(kp + offs_d).to(tl.float32), PB, DB)
            kz0, kz1 = _phases(tl.load(zp + offs_d).to(tl.float32), PB, DB)
            qs = (q0T * ks0[:, None]).to(CDT)
            sT = tl.dot(k0, qs, input_precision=PRECISION)
            zq = q0T * kz0[:, None]
            if PB == 2:
                qs = (q1T * ks1[:, None]).to(CDT)
                sT = tl.dot(k1, qs, acc=sT, input_precision=PRECISION)
                zq += q1T * kz1[:, None]
        sT += tl.sum(zq, 0)[None, :]  # q . z (and the raw codes' offsets): one reduction over channels per tile
    else:  # per-token keys: dequantize the tile
        ks = tl.load(KS + rows[:, None] * NG + offs_g[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
        kz = tl.load(KZ + rows[:, None] * NG + offs_g[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
        if KJ:
            k = _codes_in_order(kb, BITS, ASM, CDT, BLOCK_N, DB).to(tl.float32)
            k = k * _expand_groups(ks, BLOCK_N, NG, G) + _expand_groups(kz, BLOCK_N, NG, G)
            sT = tl.dot(k.to(VDT), q0T.to(VDT), input_precision=PRECISION)
        else:
            k0, k1 = _codes(kb, BITS, ASM, CDT)
            ksb = _expand_groups(ks, BLOCK_N, NG, DB // NG)
            kzb = _expand_groups(kz, BLOCK_N, NG, DB // NG)
            sT = tl.dot((k0.to(tl.float32) * ksb + kzb).to(VDT), q0T.to(VDT), input_precision=PRECISION)
            if PB == 2:
                sT = tl.dot((k1.to(tl.float32) * ksb + kzb).to(VDT), q1T.to(VDT), acc=sT, input_precision=PRECISION)
    vpos = _entry_pos(EPOS, pid_bh, NTOT, pos, n_ok, pos, HAS_POS)
    p, alpha, m_i, l_i, sl = _softmax_weights_t(sT, pos, vpos, n_ok, qpos, start, m_i, l_i, scaling, softcap,
                                                USE_SOFTCAP, MASKED)
    if PROBS:
        _store_logits(LG, sl, pid_bh, tl.arange(0, BQ), M, pos, n_ok, NTOT, True)
    vzT = tl.load(VZ + rows[None, :] * NG + offs_z[:, None], mask=n_ok[None, :] & (offs_z < NG)[:, None],
                  other=0).to(VDT)
    zacc = zacc * alpha[None, :] + tl.dot(vzT, p.to(VDT), input_precision=PRECISION)
    vs0, vs1, vs2, vs3 = _columns(tl.load(VS + rows[:, None] * NG + offs_z[None, :],
                                          mask=n_ok[:, None] & (offs_z < NG)[None, :], other=0).to(tl.float32),
                                  NZ, BLOCK_N)
    pcol = it * NP + offs_p
    for g in tl.static_range(NG):
        if MASKED:
            vb = tl.load(VC + (vrow0 + g * G + offs_gr)[:, None] * prow + pcol[None, :],
                         mask=(pcol < prow)[None, :], other=0)
        else:
            vb = tl.load(VC + (vrow0 + g * G + offs_gr)[:, None] * prow + pcol[None, :])
        v = _codes_in_order(vb, BITS, ASM, CDT, G, NP)  # [G, N]: A operand, tokens along K
        if g == 0:
            a0 = a0 * alpha[None, :] + tl.dot(v, (p * vs0[:, None]).to(CDT), input_precision=PRECISION)
        elif g == 1:
            a1 = a1 * alpha[None, :] + tl.dot(v, (p * vs1[:, None]).to(CDT), input_precision=PRECISION)
        elif g == 2:
            a2 = a2 * alpha[None, :] + tl.dot(v, (p * vs2[:, None]).to(CDT), input_precision=PRECISION)
        else:
            a3 = a3 * alpha[None, :] + tl.dot(v, (p * vs3[:, None]).to(CDT), input_precision=PRECISION)
    return m_i, l_i, a0, a1, a2, a3, zacc


@triton.jit(do_not_specialize=["T_CAP", "R_CAP", "P16", "TILES_PER_SPLIT", "S_HIST", "S_TOTAL"])
def _decode_split_kernel_v4t(
    Q, KC, KS, KZ, VC, VS, VZ, RK, RV, KV_START, LENS, PM, PL, PO, LG, EPOS,
    scaling, softcap, T_CAP, R_CAP, P16, HKV, TILES_PER_SPLIT, S_HIST, S_TOTAL,
    GQ: tl.constexpr, NQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
    KEY_PER_CHANNEL: tl.constexpr, HAS_START: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    ASM: tl.constexpr, VDT: tl.constexpr, PRECISION: tl.constexpr, CDT: tl.constexpr, K_JOIN: tl.constexpr,
    BIAS_DOT: tl.constexpr = True, DYN_LEN: tl.constexpr = False, RAW_KEYS: tl.constexpr = False,
    PEEL: tl.constexpr = True, PROBS: tl.constexpr = False, HAS_POS: tl.constexpr = False,
):
    """v4, transposed: the `G_q * q` query rows are the N side of every dot (BLOCK_M = BQ columns, >= 8 instead of
    the 16 rows an MMA's M side needs), tokens and channels its M side: scores `[N, BQ]`, outputs `o^T [D, BQ]`.
    With G_q * q = 4 that halves the tensor-core work and the softmax's element count per tile. Interior history
    tiles (every token visible to every query) skip all masks. RAW_KEYS (per-channel 4/8-bit keys, fp16 codes): key
    codes enter the score dot as 1024 + c without the fma that removes the magic (offsets folded into the bias).
    BIAS_DOT is unused (the bias is one reduction per tile here). PEEL False: every tile masked (one loop body)."""
    BQ: tl.constexpr = BLOCK_M
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    PB: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // PB
    NG: tl.constexpr = D // G
    KJ: tl.constexpr = K_JOIN or PB == 4 or not KEY_PER_CHANNEL
    RAW: tl.constexpr = RAW_KEYS and not KJ
    QW: tl.constexpr = D if KJ else DB
    offs_m = tl.arange(0, BQ)
    offs_n = tl.arange(0, BLOCK_N)
    offs_q = tl.arange(0, QW)
    offs_gc = tl.arange(0, G)
    NZ: tl.constexpr = 2 if NG == 1 else NG
    offs_z = tl.arange(0, NZ)
    row_ok = offs_m < GQ * NQ
    head = pid_bh * GQ + offs_m // NQ
    qi = offs_m % NQ
    if KJ:
        q_col = Q + ((head * NQ + qi) * D)[None, :] + offs_q[:, None]
    else:
        q_col = Q + ((head * NQ + qi) * D)[None, :] + offs_q[:, None] * PB
    q0T = tl.load(q_col, mask=row_ok[None, :], other=0.0).to(tl.float32)  # [QW, BQ]
    q1T = q0T
    if not KJ and PB == 2:
        q1T = tl.load(q_col + 1, mask=row_ok[None, :], other=0.0).to(tl.float32)
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
    m_i = tl.full([BQ], float("-inf"), tl.float32)
    l_i = tl.zeros([BQ], tl.float32)
    a0 = tl.zeros([G, BQ], tl.float32)  # o^T of value group g (channels g*G ..)
    a1 = tl.zeros([G, BQ], tl.float32)
    a2 = tl.zeros([G, BQ], tl.float32)
    a3 = tl.zeros([G, BQ], tl.float32)
    zacc = tl.zeros([NZ, BQ], tl.float32)  # row g: sum_n p * value_zero[n, g]
    span = TILES_PER_SPLIT * BLOCK_N
    if pid_s < S_HIST:
        lo, hi = _history_range(pid_s, T, span, S_HIST, BLOCK_N, DYN_LEN)
        lo_t = tl.maximum(lo, skip) // BLOCK_N
        hi_t = tl.cdiv(hi, BLOCK_N)
        # tiles [in_lo, in_hi) need no mask: after left padding, before the end of the history, before every query
        in_lo = tl.cdiv(start, BLOCK_N)
        in_hi = tl.minimum(T, T + R - NQ + 1) // BLOCK_N
        bh_t = pid_bh.to(tl.int64) * T_CAP
        prow = P16 * 16
        vrow0 = pid_bh.to(tl.int64) * D
        for it in range(lo_t, hi_t):
            if PEEL and not HAS_POS and (it >= in_lo) & (it < in_hi):
                m_i, l_i, a0, a1, a2, a3, zacc = _tile_t(
                    q0T, q1T, m_i, l_i, a0, a1, a2, a3, zacc, it, T, start, qpos, KC, KS, KZ, VC, VS, VZ, bh_t, vrow0,
                    prow, scaling, softcap, False, BQ, BLOCK_N, D, BITS, G, KEY_PER_CHANNEL, USE_SOFTCAP, ASM, VDT,
                    PRECISION, CDT, KJ, RAW, LG, EPOS, pid_bh, NTOT, GQ * NQ, PROBS, HAS_POS)
            else:
                m_i, l_i, a0, a1, a2, a3, zacc = _tile_t(
                    q0T, q1T, m_i, l_i, a0, a1, a2, a3, zacc, it, T, start, qpos, KC, KS, KZ, VC, VS, VZ, bh_t, vrow0,
                    prow, scaling, softcap, True, BQ, BLOCK_N, D, BITS, G, KEY_PER_CHANNEL, USE_SOFTCAP, ASM, VDT,
                    PRECISION, CDT, KJ, RAW, LG, EPOS, pid_bh, NTOT, GQ * NQ, PROBS, HAS_POS)
    else:  # residual: full-precision keys and values in channel order
        lo = (pid_s - S_HIST) * span
        hi = tl.minimum(R, lo + span)
        lo = tl.maximum(lo, ((skip - T) // BLOCK_N) * BLOCK_N)
        bh_r = pid_bh.to(tl.int64) * R_CAP
        for r0 in tl.range(lo, hi, BLOCK_N, num_stages=1):
            rr = r0 + offs_n
            n_ok = rr < R
            base_r = (bh_r + rr)[:, None] * D
            if KJ:
                sT = tl.dot(tl.load(RK + base_r + offs_q[None, :], mask=n_ok[:, None], other=0.0).to(VDT),
                            q0T.to(VDT), input_precision=PRECISION)
            else:
                ptr = base_r + offs_q[None, :] * PB
                sT = tl.dot(tl.load(RK + ptr, mask=n_ok[:, None], other=0.0).to(VDT), q0T.to(VDT),
                            input_precision=PRECISION)
                if PB == 2:
                    sT = tl.dot(tl.load(RK + ptr + 1, mask=n_ok[:, None], other=0.0).to(VDT), q1T.to(VDT), acc=sT,
                                input_precision=PRECISION)
            vpos = _entry_pos(EPOS, pid_bh, NTOT, T_CAP + rr, n_ok, T + rr, HAS_POS)
            p, alpha, m_i, l_i, sl = _softmax_weights_t(sT, T + rr, vpos, n_ok, qpos, start, m_i, l_i, scaling,
                                                        softcap, USE_SOFTCAP, True)
            if PROBS:
                _store_logits(LG, sl, pid_bh, offs_m, GQ * NQ, T_CAP + rr, n_ok, NTOT, True)
            p = p.to(VDT)
            ptrT = (bh_r + rr)[None, :] * D + offs_gc[:, None]  # [G, N]: values transposed
            a0 = a0 * alpha[None, :] + tl.dot(tl.load(RV + ptrT, mask=n_ok[None, :], other=0.0).to(VDT), p,
                                              input_precision=PRECISION)
            if NG >= 2:
                a1 = a1 * alpha[None, :] + tl.dot(tl.load(RV + ptrT + G, mask=n_ok[None, :], other=0.0).to(VDT), p,
                                                  input_precision=PRECISION)
            if NG >= 3:
                a2 = a2 * alpha[None, :] + tl.dot(tl.load(RV + ptrT + 2 * G, mask=n_ok[None, :],
                                                          other=0.0).to(VDT), p, input_precision=PRECISION)
                a3 = a3 * alpha[None, :] + tl.dot(tl.load(RV + ptrT + 3 * G, mask=n_ok[None, :],
                                                          other=0.0).to(VDT), p, input_precision=PRECISION)
    base = (pid_bh * S_TOTAL + pid_s) * BQ + offs_m
    tl.store(PM + base, m_i)
    tl.store(PL + base, l_i)
    po = PO + base[None, :] * D + offs_gc[:, None]  # [G, BQ]
    tl.store(po, a0 + tl.sum(tl.where(offs_z[:, None] == 0, zacc, 0.0), 0)[None, :])
    if NG >= 2:
        tl.store(po + G, a1 + tl.sum(tl.where(offs_z[:, None] == 1, zacc, 0.0), 0)[None, :])
    if NG >= 3:
        tl.store(po + 2 * G, a2 + tl.sum(tl.where(offs_z[:, None] == 2, zacc, 0.0), 0)[None, :])
        tl.store(po + 3 * G, a3 + tl.sum(tl.where(offs_z[:, None] == 3, zacc, 0.0), 0)[None, :])
