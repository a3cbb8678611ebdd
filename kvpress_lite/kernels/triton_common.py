"""Triton pieces every decode kernel variant shares: code conversion through magic numbers, valid lengths, the
split ranges, the softmax weights of a tile, the logits/probabilities stores, and the two small kernels after the
splits (the flash-decoding reduce, the per-entry probabilities). The launcher is `triton_decode`."""

from __future__ import annotations

import triton
import triton.language as tl


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
