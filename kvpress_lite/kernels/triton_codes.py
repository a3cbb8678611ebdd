"""Exact int4/int8 codes as 16-bit floats straight from packed bytes: inline PTX on a GPU (prmt + lop3 + one packed
fma per pair of codes), plain Triton under the interpreter (`_codes`); the raw magic-number form v4t folds into its
bias (`_codes_raw`). Used by kernels v3 and v4."""

from __future__ import annotations

import triton
import triton.language as tl


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
