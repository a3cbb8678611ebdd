"""Triton flash-decoding over packed KIVI storage (imported only when triton is installed).

Entry point: `triton_decode_attention(query, packed, kv_start, scaling, softcap, config=None)` over a
`kernels.packed.PackedKV`; every tuning knob (variant, warps, stages, splits, register cap, block size) is a field of
`DecodeConfig` (defaults per variant and bit width in `DEFAULTS`). One program per (batch row, KV head, split of the
sequence): all `G_q * q` query rows of the KV head (padded to >= 16) share each K/V tile, read as packed codes,
converted in registers and fed to tensor-core `tl.dot`s; per-channel key scales are folded into the query
(q . (s * c + z) = (q * s) . c + q . z); per-token value scales into the probabilities (o_g += (p * s_g) @ c_g); the
full-precision residual is read by extra splits; each split writes a partial (max, sum, unnormalized output) in fp32
and a second small kernel combines them (flash-decoding: https://pytorch.org/blog/flash-decoding/).

Variants (docs/kernels.md has the history and the measurements):
- v4 (value codes in the `TOKEN_PACKED` layout, any bits, D / G <= 4): value tiles are loaded channel-major with
  tokens packed along the bytes, which is the tensor cores' B-operand order for `p @ V` (the dot reduces over tokens);
- v3 (`CHANNEL_PACKED` values, 4 and 8 bits, D / G <= 2): phase-split codes, inline-PTX code conversion;
- v2 (`CHANNEL_PACKED`, everything else: int2, D / G > 2): phase-split, tiles dequantized in registers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .packed import CHANNEL_PACKED, TOKEN_PACKED, PackedKV

# Triton's own interpreter flag (read by triton itself at import): CPU tensors, fp32 dots, no inline PTX
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

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


@triton.jit(do_not_specialize=["S_TOTAL"])
def _decode_reduce_kernel(PM, PL, PO, O, LSE, S_TOTAL, GQ: tl.constexpr, NQ: tl.constexpr, BLOCK_M: tl.constexpr,
                          D: tl.constexpr, BLOCK_S: tl.constexpr, PROBS: tl.constexpr = False):
    """Merges the splits' partials of one query row; PROBS: also the row's log2-sum-exp2 of its masked log2 scores
    (`LSE[bh * GQ * NQ + r]`, +inf for a row that sees no key, so every probability of it is 0)."""
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
    if PROBS:
        lse = tl.where(denom > 0, mx + tl.log2(tl.where(denom > 0, denom, 1.0)), float("inf"))
        tl.store(LSE + pid_bh * (GQ * NQ) + r, lse)


@triton.jit(do_not_specialize=["T_CAP", "R_CAP"])
def _decode_probs_kernel(LG, LSE, PR, KV_START, LENS, T_CAP, R_CAP, HKV, M: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK: tl.constexpr, HAS_START: tl.constexpr, HAS_POS: tl.constexpr,
                         DYN_LEN: tl.constexpr):
    """`PR[bh, j] = sum_r exp2(LG[bh, r, j] - LSE[bh, r])` over the M = G_q * q query rows of KV head bh, for entries
    j of `[0, T_CAP + R_CAP)` (history, then residual). Entries the split kernel did not write (past the valid lengths,
    whole tiles of left padding) are read as -inf: the same masks as the split kernel, so they are exactly the
    entries no query sees."""
    pid_bh = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offs_r = tl.arange(0, BLOCK_R)
    ntot = T_CAP + R_CAP
    T, R = _valid_lengths(LENS, T_CAP, R_CAP, DYN_LEN)
    if HAS_START and not HAS_POS:
        start = tl.load(KV_START + pid_bh // HKV).to(tl.int32)
    else:
        start = 0
    is_hist = j < T_CAP
    logical = tl.where(is_hist, j, T + j - T_CAP)  # position of the entry among the valid keys
    ok = tl.where(is_hist, j < T, (j - T_CAP < R) & (j < ntot)) & (logical >= start)
    row_ok = offs_r < M
    rows = pid_bh.to(tl.int64) * M + offs_r
    lg = tl.load(LG + rows[:, None] * ntot + j[None, :], mask=row_ok[:, None] & ok[None, :], other=float("-inf"))
    lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
    p = tl.exp2(lg - lse[:, None])
    tl.store(PR + pid_bh.to(tl.int64) * ntot + j, tl.sum(p, 0), mask=j < ntot)


@triton.jit
def _entry_pos(EPOS, pid_bh, NTOT, idx, n_ok, pos, HAS_POS: tl.constexpr):
    """What the validity mask compares with kv_start: the entries' own positions `EPOS[bh, idx]` (HAS_POS: -1 for an
    empty entry, never valid), else the logical positions `pos`."""
    if HAS_POS:
        return tl.load(EPOS + pid_bh.to(tl.int64) * NTOT + idx, mask=n_ok, other=-1).to(tl.int32)
    else:
        return pos


@triton.jit
def _store_logits(LG, s, pid_bh, offs_m, M: tl.constexpr, idx, n_ok, NTOT, TRANSPOSED: tl.constexpr):
    """Masked log2 scores of one tile (`[BLOCK_M, N]`, or `[N, BQ]` TRANSPOSED) into `LG[bh, r, idx]` (fp32 `[B * H_kv,
    M, NTOT]`), query rows r < M only."""
    rows = pid_bh.to(tl.int64) * M + offs_m
    if TRANSPOSED:
        tl.store(LG + rows[None, :] * NTOT + idx[:, None], s, mask=n_ok[:, None] & (offs_m < M)[None, :])
    else:
        tl.store(LG + rows[:, None] * NTOT + idx[None, :], s, mask=(offs_m < M)[:, None] & n_ok[None, :])



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
def _softmax_weights(s, pos, vpos, n_ok, qpos, start, m_i, l_i, scaling, softcap, USE_SOFTCAP: tl.constexpr):
    """Scaled, capped, masked scores -> (p, alpha, m_new, l_new, masked log2 scores) of the online softmax (log2
    domain). `pos`: logical positions (causality among the queries), `vpos`: what is compared with `start` (the same
    positions, or each entry's own position in entry-position mode)."""
    if USE_SOFTCAP:
        x = s * (scaling / softcap)
        t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)  # tanh(x), saturating without NaN
        s = t * (softcap * 1.4426950408889634)
    else:
        s = s * (scaling * 1.4426950408889634)
    ok = (pos[None, :] <= qpos[:, None]) & (vpos[None, :] >= start) & n_ok[None, :]
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1), s


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


# Raw magic-number fp16 codes (no fma): 1024 + c for int8 and low nibbles, 1024 + 16 c for high nibbles; the caller
# folds the 1/16 into the other operand and the 1024 offset into a bias (v4t keys): 0.75 instructions per int4 code
ASM_INT4_FP16_RAW = tl.constexpr("""{
    .reg .b32 t0, t1;
    prmt.b32 t0, $4, 0, 0x4140;
    prmt.b32 t1, $4, 0, 0x4342;
    lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 $2, t0, 0x00F000F0, 0x64006400, 0xEA;
    lop3.b32 $3, t1, 0x00F000F0, 0x64006400, 0xEA;
    }""")
ASM_INT8_FP16_RAW = tl.constexpr("""{
    prmt.b32 $0, $2, 0, 0x4140;
    prmt.b32 $1, $2, 0, 0x4342;
    or.b32 $0, $0, 0x64006400;
    or.b32 $1, $1, 0x64006400;
    }""")


@triton.jit
def _codes_raw(b, BITS: tl.constexpr, ASM: tl.constexpr, DT: tl.constexpr):
    """uint8 bytes -> (1024 + low nibble, 1024 + 16 * high nibble) for 4 bits, (1024 + c, same) for 8 bits, in DT
    (fp16 on a GPU: the inline PTX above; any float type in plain Triton)."""
    if ASM:
        if BITS == 4:
            lo, hi = tl.inline_asm_elementwise(ASM_INT4_FP16_RAW, "=r,=r,=r,=r,r", [b], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)
            return lo, hi
        else:
            c = tl.inline_asm_elementwise(ASM_INT8_FP16_RAW, "=r,=r,r", [b], dtype=tl.float16, is_pure=True, pack=4)
            return c, c
    else:
        if BITS == 4:
            return (((b & 0xF).to(tl.float32) + 1024.0).to(DT), ((b >> 4).to(tl.float32) * 16.0 + 1024.0).to(DT))
        else:
            c = (b.to(tl.float32) + 1024.0).to(DT)
            return c, c


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




# ---------------------------------------------------------------------------------------------- v4
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


# ---------------------------------------------------------------------------------------------- launcher
@dataclass(frozen=True)
class DecodeConfig:
    """Tuning knobs of the decode kernels (None: the default of `DEFAULTS[(variant, bits)]` or the rule named).

    variant: 4 (token-packed values), 3 or 2 (channel-packed values); None picks by the value layout and shape.
    num_warps, num_stages: Triton launch options of the split kernel. maxnreg: register cap per thread (more programs
    per SM; None: no cap). per_sm: resident history programs per SM assumed by the split rule. num_splits: history
    programs per (row, KV head); None: one wave, `per_sm * SMs // (B * H_kv)` (the kernel is latency-bound and a
    partly filled second wave costs up to 35%: docs/kernels.md). block_n: tokens per tile (<= G for channel keys).
    magic: exact code conversion through magic-number floats (False: plain int->float converts; v2 only).
    bias_dot: per-channel key zeros enter the score dot on the tensor cores (False: a row reduction).
    v_join (v3): join a value group's phases before the dot. k_join (v4): join key codes into channel order (one dot
    with the whole query) instead of two phase dots. transposed (v4): the query rows on the N side of the dots (at
    least `block_q` of them, padded) instead of the M side (at least 16). raw_keys (v4t): key codes enter the dot
    as magic-number floats (1024 + c), the offsets folded into the per-tile bias. peel (v4t): interior tiles skip
    the masks (False: every tile masked, one loop body).
    """

    variant: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    maxnreg: int | None | str = "default"
    per_sm: int | None = None
    num_splits: int | None = None
    block_n: int | None = None
    magic: bool = True
    bias_dot: bool = True
    v_join: bool = False
    k_join: bool | None = None
    transposed: bool | None = None
    block_q: int = 8
    raw_keys: bool = True
    peel: bool = False

    def __post_init__(self):
        if self.variant not in (None, 2, 3, 4):
            raise ValueError(f"DecodeConfig.variant={self.variant!r} is not supported; accepted: [None, 2, 3, 4]")
        for name in ("num_warps", "num_stages", "per_sm", "num_splits", "block_n"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"DecodeConfig.{name}={v!r} must be None or a positive int")
        if self.block_n is not None and self.block_n & (self.block_n - 1):
            raise ValueError(f"DecodeConfig.block_n={self.block_n} must be a power of two")


# launch defaults per (variant, bits): warps, stages, register cap, and the resident history programs per SM assumed
# by the split rule (one wave). v3: the H200 sweeps of round 3. v4: the fastest configs measured on an H100 (run 1 of
# round 4, docs/kernels.md): int4 transposed with 4 warps (0.238 ms at 32k x 8), int8 untransposed with 2 warps
# (0.238 ms); int2 (no GPU measurement) transposed with 2 warps. The loops' scale/zero loads were changed after that
# run (contiguous rows instead of strided 2-byte loads): not measured on a GPU yet.
DEFAULTS = {
    (2, 2): dict(num_warps=2, num_stages=3, maxnreg=None, per_sm=8),
    (2, 4): dict(num_warps=2, num_stages=3, maxnreg=None, per_sm=8),
    (2, 8): dict(num_warps=2, num_stages=3, maxnreg=None, per_sm=8),
    (3, 4): dict(num_warps=2, num_stages=2, maxnreg=168, per_sm=6),
    (3, 8): dict(num_warps=2, num_stages=3, maxnreg=None, per_sm=4),
    (4, 2): dict(num_warps=2, num_stages=2, maxnreg=168, per_sm=6, k_join=True, transposed=True),
    (4, 4): dict(num_warps=4, num_stages=2, maxnreg=None, per_sm=4, k_join=False, transposed=True),
    (4, 8): dict(num_warps=2, num_stages=3, maxnreg=None, per_sm=4, k_join=False, transposed=False),
}

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def v3_supported(bits: int, head_dim: int, group_size: int) -> bool:
    """v3 covers 4 and 8 bits with at most two value groups per head (D / G <= 2); v2 runs the rest."""
    return bits in (4, 8) and head_dim // group_size <= 2


def v4_supported(bits: int, head_dim: int, group_size: int) -> bool:
    """v4 (token-packed values) covers every bit width with at most four value groups per head (D / G <= 4)."""
    return head_dim // group_size <= 4


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, to exercise the reduction


def resolve_config(packed: PackedKV, head_dim: int, config: DecodeConfig | None = None) -> DecodeConfig:
    """`config` with every None filled: the variant from the value layout and shape, then `DEFAULTS`."""
    cfg = config or DecodeConfig()
    bits, gs = packed.bits, packed.group_size
    variant = cfg.variant
    if packed.value_layout == TOKEN_PACKED:
        if variant not in (None, 4):
            raise ValueError(f"DecodeConfig.variant={variant} reads channel-packed values; the value layout is "
                             f"{TOKEN_PACKED!r} (variant 4)")
        variant = 4  # (D / G > 4 is converted to the channel layout by the launcher)
    elif variant == 4:
        raise ValueError(f"DecodeConfig.variant=4 needs value_layout={TOKEN_PACKED!r}, got {packed.value_layout!r}")
    elif variant is None or (variant == 3 and not v3_supported(bits, head_dim, gs)):
        variant = 3 if v3_supported(bits, head_dim, gs) else 2
    tuned = DEFAULTS[(variant, bits)]
    fill = {k: tuned.get(k) for k in ("num_warps", "num_stages", "per_sm") if getattr(cfg, k) is None}
    if cfg.maxnreg == "default":
        same = all((getattr(cfg, k) is None or getattr(cfg, k) == tuned[k]) for k in ("num_warps", "num_stages"))
        fill["maxnreg"] = tuned["maxnreg"] if same else None
        if not same and cfg.per_sm is None:
            fill["per_sm"] = None  # unknown occupancy: the generic rule below
    if cfg.k_join is None:
        fill["k_join"] = bool(tuned.get("k_join", False))
    if cfg.transposed is None:
        fill["transposed"] = bool(tuned.get("transposed", False))
    if cfg.block_n is None:
        fill["block_n"] = 64
    return replace(cfg, variant=variant, **fill)


def triton_decode_attention(query: torch.Tensor, packed: PackedKV, kv_start: torch.Tensor | None, scaling: float,
                            softcap: float = 0.0, config: DecodeConfig | None = None,
                            positions: torch.Tensor | None = None, return_probs: bool = False):
    """Attention of `query` `[B, H_q, q, D]` over `packed` (history + residual, see `PackedKV`); `[B, H_q, q, D]`.

    kv_start: int `[B]` first valid key per row (left padding) or None. scaling multiplies q . k; softcap: Gemma-2
    score cap (0: none). Arguments are validated by the caller (the op); the layouts here: key codes
    `CHANNEL_PACKED`, value codes either layout (`TOKEN_PACKED` runs v4).
    Valid-length mode (`packed.lengths`, an int `(2,)` device tensor): the history/residual tensors are capacity
    buffers; the kernels load the valid lengths themselves, and every host-side value (grid, split counts, block
    sizes, launch arguments) depends only on shapes, so one launch can be replayed by a CUDA graph as they change.

    positions: None, or int `[B, H_kv, T_cap + R_cap]` (history entries, then residual entries): each entry's own
    position; an entry is then attended iff `positions >= kv_start[b]` (0 without kv_start; -1 marks an empty entry),
    per entry instead of a prefix of left padding (eviction's slots: validity is not a prefix once slots are
    replaced). Causality among q > 1 queries still follows the logical order (history, then residual).
    return_probs: also return fp32 `[B, H_kv, T_cap + R_cap]`, each entry's attention probability summed over the
    G_q query heads of its KV head and the q queries, from the same pass: the split kernels store their masked
    scores (fp32 `[B * H_kv, G_q * q, T_cap + R_cap]`), the reduce writes each query row's log-sum-exp, and a third
    small kernel sums `exp(score - lse)` over the rows. Entries no query sees are 0. Off (the default) the extra code
    is compiled out (constexpr).
    """
    b, hq, nq, d = query.shape
    bits, gs = packed.bits, packed.group_size
    key_per_channel = packed.key_per_channel
    if packed.key_layout != CHANNEL_PACKED:
        raise ValueError(f"key_layout={packed.key_layout!r} is not supported by the kernel; accepted: "
                         f"[{CHANNEL_PACKED!r}]")
    has_hist = packed.key_codes is not None and packed.history_capacity > 0
    if has_hist and packed.value_layout == TOKEN_PACKED and not v4_supported(bits, d, gs):
        from .layouts import to_channel_packed  # rare shapes (D / G > 4): convert, then v2 (slow, O(T) per call)

        packed = replace(packed, value_layout=CHANNEL_PACKED, value_codes=to_channel_packed(
            packed.value_codes, TOKEN_PACKED, bits, packed.history_capacity))
    cfg = resolve_config(packed, d, config)
    variant = cfg.variant
    has_res = packed.residual_keys is not None and packed.residual_capacity > 0
    any_kv = packed.key_codes if has_hist else packed.residual_keys
    hkv = any_kv.shape[1]
    gq = hq // hkv
    t = packed.history_capacity if has_hist else 0
    r = packed.residual_capacity if has_res else 0
    dtype = query.dtype
    block_n = cfg.block_n
    if has_hist and key_per_channel:
        block_n = min(block_n, gs)  # a tile lies inside one key group (power-of-two G, checked by caller)
    transposed = variant == 4 and cfg.transposed
    block_m = max(cfg.block_q if transposed else 16, triton.next_power_of_2(gq * nq))

    n_tiles_h = triton.cdiv(t, block_n)
    n_tiles_r = triton.cdiv(r, block_n)
    num_splits = cfg.num_splits
    if num_splits is None and cfg.per_sm is not None:  # one wave of history programs (docs/kernels.md)
        num_splits = max(1, cfg.per_sm * _num_sms(query.device) // (b * hkv))
    elif num_splits is None:  # ~8 programs per SM
        num_splits = max(1, triton.cdiv(8 * _num_sms(query.device), b * hkv))
    tiles_per_split = max(1, triton.cdiv(n_tiles_h + n_tiles_r, num_splits))
    s_hist = triton.cdiv(n_tiles_h, tiles_per_split)
    s_total = s_hist + triton.cdiv(n_tiles_r, tiles_per_split)

    # magic-number code conversion (v2): bf16 holds 128 + c exactly for c < 128, fp16 holds 1024 + c for c < 1024
    magic = 0 if not cfg.magic or dtype == torch.float32 else (1 if bits <= 4 and dtype == torch.bfloat16 else 2)
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
    n_tot = t + r  # entries of the logits / positions / probabilities rows
    if return_probs:
        lg = torch.empty((b * hkv, gq * nq, n_tot), device=dev, dtype=f32)
        lse = torch.empty((b * hkv * gq * nq,), device=dev, dtype=f32)
        probs = torch.empty((b, hkv, n_tot), device=dev, dtype=f32)
    else:
        lg = lse = probs = pm
    po = torch.empty((b * hkv, s_total, block_m, d), device=dev, dtype=f32)
    out = torch.empty((b, hq, nq, d), device=dev, dtype=dtype)
    q = query.contiguous()
    dummy = pm  # never dereferenced when its segment is empty
    kc, ks, kz, vc, vs, vz = (x.contiguous() if has_hist else dummy
                              for x in (packed.key_codes, packed.key_scale, packed.key_zero, packed.value_codes,
                                        packed.value_scale, packed.value_zero))
    rk, rv = (x.contiguous() if has_res else dummy for x in (packed.residual_keys, packed.residual_values))
    start = kv_start.contiguous() if kv_start is not None else dummy
    if positions is not None and tuple(positions.shape) != (b, hkv, n_tot):
        raise ValueError(f"positions must be [B, H_kv, T_cap + R_cap] = {(b, hkv, n_tot)}, got "
                         f"{tuple(positions.shape)}")
    epos = positions.contiguous() if positions is not None else dummy
    common = dict(GQ=gq, NQ=nq, BLOCK_M=block_m, BLOCK_N=block_n, D=d, BITS=bits, G=gs,
                  KEY_PER_CHANNEL=bool(key_per_channel), HAS_START=kv_start is not None, USE_SOFTCAP=bool(softcap),
                  VDT=vdt, PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                  PROBS=bool(return_probs), HAS_POS=positions is not None)
    if cfg.maxnreg is not None and not INTERPRET:  # register cap per thread: more programs per SM
        common["maxnreg"] = int(cfg.maxnreg)
    # valid-length mode: t, r above (and all that derives from them) are the capacities; the kernels bound their loops
    # and masks by the lengths they load themselves
    lens = packed.lengths.contiguous() if packed.lengths is not None else dummy
    common["DYN_LEN"] = packed.lengths is not None
    head = (q, kc, ks, kz, vc, vs, vz, rk, rv, start, lens, pm, pl, po, lg, epos, float(scaling),
            float(softcap or 1.0), t, r)
    tail = (hkv, tiles_per_split, s_hist, s_total)
    grid = (b * hkv, s_total)
    if variant >= 3:  # exact codes; inline PTX needs a GPU and 16-bit floats
        # no history (a residual-only launch: bf16 fixed slots) has no codes to convert: no inline PTX (on an H100 with
        # triton 3.6 that launch failed to compile with it: "number of input constraints does not match")
        asm = has_hist and bool(magic) and not INTERPRET and dtype in (torch.bfloat16, torch.float16) and bits in (4, 8)
        cdt = tl.float16 if asm and bits == 8 else vdt
        if variant == 4:
            prow = vc.shape[-1] if has_hist else 16
            if has_hist and (prow % 16 or prow * (8 // bits) < t or tuple(vc.shape) != (b, hkv, d, prow)):
                raise ValueError(f"token-packed value_codes must be [B, H, D, P] = [{b}, {hkv}, {d}, P] with P a "
                                 f"multiple of 16 holding >= {t} tokens; got {tuple(vc.shape)}")
            if transposed:  # fp16 codes for 4 and 8 bits with 16-bit queries (raw key codes, no shift for nibbles)
                raw = bool(cfg.raw_keys) and bits in (4, 8) and dtype != torch.float32
                if raw or asm:
                    cdt = tl.float16 if not INTERPRET else (tl.float32 if dtype == torch.bfloat16 else cdt)
                _decode_split_kernel_v4t[grid](*head, prow // 16, *tail, ASM=asm, CDT=cdt, K_JOIN=bool(cfg.k_join),
                                               RAW_KEYS=raw, PEEL=bool(cfg.peel), **common)
            else:
                _decode_split_kernel_v4[grid](*head, prow // 16, *tail, ASM=asm, CDT=cdt, K_JOIN=bool(cfg.k_join),
                                              BIAS_DOT=bool(cfg.bias_dot), **common)
        else:
            _decode_split_kernel_v3[grid](*head, *tail, ASM=asm, BIAS_DOT=bool(cfg.bias_dot), CDT=cdt,
                                          V_JOIN=bool(cfg.v_join), **common)
    else:
        _decode_split_kernel_v2[grid](*head, *tail, MAGIC=magic, OFF=off, KDT=kdt, **common)
    _decode_reduce_kernel[(b * hkv, gq * nq)](
        pm, pl, po, out, lse, s_total, GQ=gq, NQ=nq, BLOCK_M=block_m, D=d,
        BLOCK_S=triton.next_power_of_2(s_total), num_warps=4, PROBS=bool(return_probs),
    )
    if not return_probs:
        return out
    block_r = triton.next_power_of_2(gq * nq)
    block = min(256, triton.next_power_of_2(n_tot), max(16, 4096 // block_r))  # <= 4096 fp32 scores per program
    _decode_probs_kernel[(b * hkv, triton.cdiv(n_tot, block))](
        lg, lse, probs, start, lens, t, r, hkv, M=gq * nq, BLOCK_R=block_r, BLOCK=block,
        HAS_START=kv_start is not None, HAS_POS=positions is not None, DYN_LEN=packed.lengths is not None,
        num_warps=4,
    )
    return out, probs


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


__all__ = ["DEFAULTS", "INTERPRET", "DecodeConfig", "resolve_config", "supported_shape", "triton_decode_attention",
           "v3_supported", "v4_supported"]
