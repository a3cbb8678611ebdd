"""SASS of the decode split kernels compiled for sm_90 on a machine without a GPU (triton's bundled ptxas/cuobjdump).

Prints, per config: registers, spills/stack, and the instructions of the history loop per tile per thread (the
largest backward-branch range of the SASS; the residual loop is smaller), with a histogram of the opcodes there.
The shape is the benchmark's (32k x 8: 8 KV heads, 32 query heads, head_dim 128, bf16, q = 1, channel keys, G = 64).

    PYTHONPATH=. python benchmarks/kernel_sass.py                  # v3 vs v4 at the defaults
    PYTHONPATH=. python benchmarks/kernel_sass.py --configs '[{"variant": 4, "num_warps": 4}]' --dump /tmp/sass

Triton here may differ from the GPU machine's (3.9 here, 3.6 there): counts compare versions, not promises.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvpress_lite.kernels import triton_decode as td
from kvpress_lite.kernels.packed import CHANNEL_PACKED, TOKEN_PACKED, PackedKV

PTR_NAMES = ("Q", "KC", "KS", "KZ", "VC", "VS", "VZ", "RK", "RV", "KV_START", "LENS", "PM", "PL", "PO", "LG", "EPOS")


def compile_split(cfg: td.DecodeConfig, bits: int, key_mode="channel", d=128, gq=4, nq=1, gs=64, dyn_len=False,
                  probs=False, has_pos=False):
    """Compile the split kernel `cfg` resolves to for sm_90; returns the compiled kernel (asm dict, n_regs...)."""
    layout = TOKEN_PACKED if cfg.variant == 4 else CHANNEL_PACKED
    fake = PackedKV(None, None, None, None, None, None, None, None, bits, gs, key_mode, value_layout=layout)
    c = td.resolve_config(fake, d, cfg)
    kern = {2: td._decode_split_kernel_v2, 3: td._decode_split_kernel_v3, 4: td._decode_split_kernel_v4}[c.variant]
    transposed = c.variant == 4 and c.transposed
    if transposed:
        kern = td._decode_split_kernel_v4t
    fn = kern
    names = fn.arg_names
    dt = {"Q": "*bf16", "KC": "*u8", "VC": "*u8", "KV_START": "*i64", "LENS": "*i64", "PM": "*fp32", "PL": "*fp32",
          "PO": "*fp32", "LG": "*fp32", "EPOS": "*i32"}
    asm = c.magic and bits in (4, 8)
    block_m = max(c.block_q if transposed else 16, triton.next_power_of_2(gq * nq))
    const = dict(GQ=gq, NQ=nq, BLOCK_M=block_m, BLOCK_N=min(c.block_n, gs), D=d,
                 BITS=bits, G=gs, KEY_PER_CHANNEL=key_mode == "channel", HAS_START=True, USE_SOFTCAP=False,
                 VDT=tl.bfloat16, PRECISION=None, DYN_LEN=dyn_len, PROBS=probs, HAS_POS=has_pos)
    if transposed:
        const.update(ASM=asm, CDT=tl.float16 if asm or c.raw_keys else tl.bfloat16, K_JOIN=bool(c.k_join),
                     BIAS_DOT=c.bias_dot, RAW_KEYS=bool(c.raw_keys), PEEL=bool(c.peel))
    elif c.variant == 4:
        const.update(ASM=asm, CDT=tl.float16 if asm and bits == 8 else tl.bfloat16, K_JOIN=bool(c.k_join),
                     BIAS_DOT=c.bias_dot)
    elif c.variant == 3:
        const.update(ASM=asm, CDT=tl.float16 if asm and bits == 8 else tl.bfloat16, BIAS_DOT=c.bias_dot,
                     V_JOIN=c.v_join)
    else:
        magic = 1 if bits <= 4 else 2
        const.update(MAGIC=magic, OFF=128.0 if magic == 1 else 1024.0, KDT=tl.bfloat16 if magic == 1 else tl.float16)
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in const:
            sig[n] = "constexpr"
        elif n in PTR_NAMES:
            sig[n] = dt.get(n, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in ("scaling", "softcap"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    src = ASTSource(fn, sig, {k: v for k, v in const.items()}, attrs)
    opts = dict(num_warps=c.num_warps, num_stages=c.num_stages)
    if c.maxnreg is not None:
        opts["maxnreg"] = int(c.maxnreg)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts), c


def sass_of(compiled) -> tuple[str, str]:
    """(SASS, resource usage line: REG, STACK, SHARED...) of a compiled kernel's cubin."""
    cubin = compiled.asm["cubin"]
    tool = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+", res)
    return sass, m.group(0) if m else res.strip()[-120:]


def loop_stats(sass: str):
    """(instructions in the largest backward-branch range, opcode histogram there, total instructions)."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    best = (0, 0, 0)
    for i, (addr, text) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?`?\(?\.L_x_\d+\)?|\bBRA\b\s+(0x[0-9a-f]+)", text)
        tgt = re.search(r"0x([0-9a-f]+)", text.split("BRA", 1)[1]) if "BRA" in text and m else None
        if tgt is None:
            continue
        t = int(tgt.group(1), 16)
        if t < addr:
            j = next(k for k, (a, _) in enumerate(ins) if a >= t)
            if i - j + 1 > best[0]:
                best = (i - j + 1, j, i)
    n, j, i = best
    hist = collections.Counter()
    for _, text in ins[j:i + 1]:
        op = text.split()[0]
        if op.startswith("@"):
            op = text.split()[1]
        hist[op.split(".")[0]] += 1
    return n, hist, len([x for x in ins if not x[1].startswith("NOP")])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=None, help="JSON list of DecodeConfig kwargs (default: v3 and v4 variants)")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--dump", default=None, help="folder to write each SASS into")
    p.add_argument("--key-mode", default="channel", choices=["channel", "token"])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--probs", action="store_true",
                   help="each config also compiled with PROBS (scores stored for the probabilities) and with "
                        "PROBS + HAS_POS (per-entry validity): the fixed-slot step's kernel")
    args = p.parse_args(argv)
    configs = json.loads(args.configs) if args.configs else [
        dict(variant=3), dict(variant=4), dict(variant=4, k_join=True), dict(variant=4, num_warps=4),
    ]
    for bits in args.bits:
        for kw in configs:
            if bits == 2 and kw.get("variant") == 3:
                continue
            flags = [(False, False)] + ([(True, False), (True, True)] if args.probs else [])
            for probs, has_pos in flags:
                label = "" if not probs else (" +probs+positions" if has_pos else " +probs")
                try:
                    compiled, c = compile_split(td.DecodeConfig(**kw), bits, key_mode=args.key_mode,
                                                gs=args.group_size, probs=probs, has_pos=has_pos)
                except Exception as exc:  # report and go on
                    print(f"int{bits} {kw}{label}: failed {type(exc).__name__}: {str(exc)[:400]}", flush=True)
                    continue
                sass, res = sass_of(compiled)
                n, hist, total = loop_stats(sass)
                top = ", ".join(f"{k} {v}" for k, v in hist.most_common(14))
                print(f"int{bits} {kw}{label}: {res} | loop {n} "
                      f"instr/tile/thread (x{c.num_warps * 32} threads) | {top}", flush=True)
                if args.dump:
                    Path(args.dump).mkdir(parents=True, exist_ok=True)
                    name = f"int{bits}-" + "-".join(f"{k}{v}" for k, v in kw.items()) + label.replace(" ", "")
                    (Path(args.dump) / f"{name}.sass").write_text(sass)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
