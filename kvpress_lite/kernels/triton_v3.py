"""Decode kernel v3 (`CHANNEL_PACKED` values, 4 and 8 bits, D / G <= 2): phase-split codes through the inline-PTX
conversion of `triton_codes`. The launcher is `triton_decode`; docs/kernels.md has the measurements."""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_codes import _codes
from .triton_common import _entry_pos, _expand_groups, _history_range, _softmax_weights, _store_logits, _valid_lengths


@triton.jit(do_not_specialize=["T_CAP", "R_CAP", "TILES_PER_SPLIT", "S_HIST", "S_TOTAL"])  # no recompiles as T, R grow
def _decode_split_kernel_v3(
    Q, KC, KS, KZ, VC, VS, VZ, RK, RV, KV_START, LENS, PM, PL, PO, LG, EPOS,
    scaling, softcap, T_CAP, R_CAP, HKV, TILES_PER_SPLIT, S_HIST, S_TOTAL,
    GQ: tl.constexpr, NQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
    KEY_PER_CHANNEL: tl.constexpr, HAS_START: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    ASM: tl.constexpr, VDT: tl.constexpr, PRECISION: tl.constexpr, BIAS_DOT: tl.constexpr = False,
    CDT: tl.constexpr = None, V_JOIN: tl.constexpr = False, DYN_LEN: tl.constexpr = False,
    PROBS: tl.constexpr = False, HAS_POS: tl.constexpr = False,
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
    skip = start  # left padding skipped by whole tiles; not with entry positions (validity is per entry there)
    if HAS_POS:
        skip = 0
    NTOT = T_CAP + R_CAP  # entries of the logits / positions rows: history capacity, then residual capacity
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
        lo = tl.maximum(lo, (skip // BLOCK_N) * BLOCK_N)
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
            vpos = _entry_pos(EPOS, pid_bh, NTOT, pos, n_ok, pos, HAS_POS)
            p, alpha, m_i, l_i, sl = _softmax_weights(s, pos, vpos, n_ok, qpos, start, m_i, l_i, scaling, softcap,
                                                      USE_SOFTCAP)
            if PROBS:
                _store_logits(LG, sl, pid_bh, offs_m, GQ * NQ, pos, n_ok, NTOT, False)
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
        lo = tl.maximum(lo, ((skip - T) // BLOCK_N) * BLOCK_N)
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
            vpos = _entry_pos(EPOS, pid_bh, NTOT, T_CAP + rr, n_ok, T + rr, HAS_POS)
            p, alpha, m_i, l_i, sl = _softmax_weights(s, T + rr, vpos, n_ok, qpos, start, m_i, l_i, scaling, softcap,
                                                      USE_SOFTCAP)
            if PROBS:
                _store_logits(LG, sl, pid_bh, offs_m, GQ * NQ, T_CAP + rr, n_ok, NTOT, False)
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
