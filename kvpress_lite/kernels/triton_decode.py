"""Triton flash-decoding over packed KIVI storage (imported only when triton is installed).

Entry point: `triton_decode_attention(query, packed, kv_start, scaling, softcap, config=None)` over a
`kernels.packed.PackedKV`; every tuning knob (variant, warps, stages, splits, register cap, block size) is a field of
`DecodeConfig` (defaults per variant and bit width in `DEFAULTS`). One program per (batch row, KV head, split of the
sequence): all `G_q * q` query rows of the KV head (padded to >= 16) share each K/V tile, read as packed codes,
converted in registers and fed to tensor-core `tl.dot`s; per-channel key scales are folded into the query
(q . (s * c + z) = (q * s) . c + q . z); per-token value scales into the probabilities (o_g += (p * s_g) @ c_g); the
full-precision residual is read by extra splits; each split writes a partial (max, sum, unnormalized output) in fp32
and a second small kernel combines them (flash-decoding: https://pytorch.org/blog/flash-decoding/).

Variants, one module each beside this launcher (`triton_v2`, `triton_v3`, `triton_v4`; their shared pieces
in `triton_common`, the inline-PTX code conversion in `triton_codes`; docs/kernels.md has the history and the
measurements):
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
from .triton_common import _decode_probs_kernel, _decode_reduce_kernel
from .triton_v2 import _decode_split_kernel_v2
from .triton_v3 import _decode_split_kernel_v3
from .triton_v4 import _decode_split_kernel_v4, _decode_split_kernel_v4t

# Triton's own interpreter flag (read by triton itself at import): CPU tensors, fp32 dots, no inline PTX
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
