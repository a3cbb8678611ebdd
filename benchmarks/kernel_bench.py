"""Microbenchmark of the fused decode-attention kernels over packed KIVI storage vs SDPA over bf16 K/V (GPU).

Shapes (Llama-3.1-8B decode, one layer: 8 KV heads, 32 query heads, head_dim 128, bf16, one query per row):
32k x batch 8, 32k x 1 and 128k x 1 by default. The quantized history holds T = L - R tokens (R = 128 in full
precision, the residual window). In one run: the device's copy bandwidth (device-to-device copy, bytes read +
written), SDPA over bf16 K/V (enable_gqa=True, CUDA graph), then each kernel config (a `DecodeConfig` as JSON, plus
the value layout it reads: variant 4 reads token-packed values, 2/3 channel-packed), first checked against the torch
reference at the same shape (left padding on), then timed by CUDA-graph replay (`triton.testing.do_bench_cudagraph`,
median): ms, bytes read, TB/s, % of copy bandwidth, speedup over SDPA. Rows print as they finish; `--json` keeps all.

    python benchmarks/kernel_bench.py --json out.json                      # default configs, all shapes
    python benchmarks/kernel_bench.py --configs '[{"variant": 4, "num_warps": 4}]' --shapes 8x32768
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvpress_lite.kernels.layouts import from_channel_packed  # noqa: E402
from kvpress_lite.kernels.packed import TOKEN_PACKED, PackedKV  # noqa: E402
from kvpress_lite.kernels.reference import reference_decode_attention  # noqa: E402

DEFAULT_CONFIGS = [dict(variant=3), dict(variant=4)]


def make_packed(b, hkv, d, length, residual, bits, group_size, key_mode, dtype, device, seed=0):
    """Random packed storage of `length` tokens (history T = length - residual, then the residual), channel-packed
    values; returns (PackedKV, token-packed value codes of the same values)."""
    g = torch.Generator(device=device).manual_seed(seed)
    t = length - residual
    qmax = (1 << bits) - 1
    db = d * bits // 8
    key_param = (b, hkv, t // group_size, d) if key_mode == "channel" else (b, hkv, t, d // group_size)
    token_param = (b, hkv, t, d // group_size)

    def rnd(shape, lo, hi):
        return (torch.rand(shape, generator=g, device=device) * (hi - lo) + lo).to(dtype)

    vc = torch.randint(0, 256, (b, hkv, t, db), generator=g, device=device, dtype=torch.uint8)
    packed = PackedKV(
        key_codes=torch.randint(0, 256, (b, hkv, t, db), generator=g, device=device, dtype=torch.uint8),
        key_scale=rnd(key_param, 0.2 / qmax, 3.0 / qmax), key_zero=rnd(key_param, -2.0, 0.0),
        value_codes=vc, value_scale=rnd(token_param, 0.2 / qmax, 3.0 / qmax), value_zero=rnd(token_param, -2.0, 0.0),
        residual_keys=torch.randn((b, hkv, residual, d), generator=g, device=device).to(dtype),
        residual_values=torch.randn((b, hkv, residual, d), generator=g, device=device).to(dtype),
        bits=bits, group_size=group_size, key_mode=key_mode)
    return packed, from_channel_packed(vc, bits)


def packed_bytes(packed: PackedKV) -> int:
    """Bytes a kernel must read: codes, scales, zeros, residual (each once; token-layout padding included)."""
    return sum(x.numel() * x.element_size() for x in (packed.key_codes, packed.key_scale, packed.key_zero,
                                                      packed.value_codes, packed.value_scale, packed.value_zero,
                                                      packed.residual_keys, packed.residual_values) if x is not None)


def bench(fn, graph: bool, rep: int = 200):
    import triton.testing as tt

    if graph:
        return tt.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    return tt.do_bench(fn, warmup=50, rep=300, return_mode="median")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["8x32768", "1x32768", "1x131072"], help="BATCHxLENGTH")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1)
    p.add_argument("--residual", type=int, default=128)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--key-mode", default="channel", choices=["channel", "token"])
    p.add_argument("--configs", default=None, help="JSON list of DecodeConfig kwargs, timed at every shape")
    p.add_argument("--sweep", default=None, help="JSON list of DecodeConfig kwargs timed at the first shape only")
    p.add_argument("--rep", type=int, default=100, help="ms of graph replays per timed config")
    p.add_argument("--quick", action="store_true", help="the --configs only, no --sweep (gpu_session.sh)")
    p.add_argument("--json", default=None, help="write every measurement here (after every row)")
    args = p.parse_args(argv)
    import triton

    from kvpress_lite.kernels import triton_decode as td

    dev = torch.device("cuda")
    dtype = torch.bfloat16
    hkv, hq, d, nq = args.kv_heads, args.q_heads, args.head_dim, args.queries
    props = torch.cuda.get_device_properties(dev)
    info = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "kv_heads": hkv, "q_heads": hq, "head_dim": d, "queries": nq,
            "residual": args.residual, "group_size": args.group_size, "key_mode": args.key_mode}
    print(json.dumps(info), flush=True)
    rows = []

    def dump():
        if args.json:
            Path(args.json).write_text(json.dumps(dict(info, rows=rows), indent=1))

    src = torch.randn(2**29, device=dev)  # copy bandwidth: 2 GiB device-to-device, bytes read + written
    dst = torch.empty_like(src)
    t_copy = bench(lambda: dst.copy_(src), graph=False)
    copy_bw = 2 * src.numel() * 4 / (t_copy * 1e-3)
    src = dst = None
    info.update(copy_bw=copy_bw, copy_ms=t_copy)
    print(f"copy: {t_copy:.3f} ms for 2 x 2 GiB -> {copy_bw / 1e12:.2f} TB/s", flush=True)
    configs = json.loads(args.configs) if args.configs else DEFAULT_CONFIGS
    sweep = json.loads(args.sweep) if args.sweep and not args.quick else []

    for si, shape in enumerate(args.shapes):
        b, length = (int(x) for x in shape.split("x"))
        q = torch.randn(b, hq, nq, d, device=dev, dtype=dtype)
        k = torch.randn(b, hkv, length, d, device=dev, dtype=dtype)
        v = torch.randn(b, hkv, length, d, device=dev, dtype=dtype)
        sdpa_bytes = 2 * k.numel() * 2 + q.numel() * 2
        t_sdpa = bench(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), graph=True,
                       rep=args.rep)
        k = v = None
        bw = sdpa_bytes / (t_sdpa * 1e-3)
        rows.append(dict(shape=shape, name="sdpa-bf16", ms=t_sdpa, bytes=sdpa_bytes, tbs=bw / 1e12,
                         copy_pct=100 * bw / copy_bw))
        print(f"[{shape}] SDPA bf16: {t_sdpa:.4f} ms, {sdpa_bytes / 1e6:.1f} MB, {bw / 1e12:.2f} TB/s "
              f"({100 * bw / copy_bw:.0f}% copy)", flush=True)
        dump()
        for bits in args.bits:
            packed_c, vt = make_packed(b, hkv, d, length, args.residual, bits, args.group_size, args.key_mode,
                                       dtype, dev, seed=si * 10 + bits)
            packed_t = PackedKV(**{**packed_c.__dict__, "value_codes": vt, "value_layout": TOKEN_PACKED})
            kv_start = torch.randint(0, 64, (b,), device=dev)
            ref = reference_decode_attention(q, *(getattr(packed_c, n) for n in (
                "key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero", "residual_keys",
                "residual_values")), kv_start, bits, args.group_size, args.key_mode == "channel", d ** -0.5)
            for kw in configs + (sweep if si == 0 else []):
                cfg = td.DecodeConfig(**kw)
                pk = packed_t if cfg.variant == 4 else packed_c
                if cfg.variant == 3 and not td.v3_supported(bits, d, args.group_size):
                    continue
                t0 = time.time()
                try:
                    def fn(pk=pk, cfg=cfg, q=q, ks=kv_start):
                        return td.triton_decode_attention(q, pk, ks, d ** -0.5, 0.0, cfg)

                    out = fn()
                    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
                    finite = bool(torch.isfinite(out).all())
                    ms = bench(fn, graph=True, rep=args.rep)
                except Exception as exc:  # a config that does not compile or fit: report, go on
                    print(f"[{shape}] int{bits} {kw}: failed {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    continue
                nbytes = packed_bytes(pk)
                bw = nbytes / (ms * 1e-3)
                ok = err < 1e-2 and finite
                res = td.resolve_config(pk, d, cfg)
                rows.append(dict(shape=shape, name=f"int{bits}", cfg=kw, resolved=repr(res), ms=ms, bytes=nbytes,
                                 tbs=bw / 1e12, copy_pct=100 * bw / copy_bw, vs_sdpa=t_sdpa / ms, err=err, ok=ok,
                                 wall=time.time() - t0))
                print(f"[{shape}] int{bits} {kw}: {ms:.4f} ms, {nbytes / 1e6:.1f} MB, {bw / 1e12:.2f} TB/s "
                      f"({100 * bw / copy_bw:.0f}% copy), {t_sdpa / ms:.2f}x SDPA, err {err:.1e}"
                      f"{'' if ok else ' WRONG'}", flush=True)
                dump()
            packed_c = packed_t = vt = ref = None
            torch.cuda.empty_cache()

    print("\n| shape | what | config | ms | MB read | TB/s | % copy bw | vs SDPA | rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['name']} | {r.get('cfg', '')} | {r['ms']:.4f} | {r['bytes'] / 1e6:.1f} | "
              f"{r['tbs']:.2f} | {r['copy_pct']:.0f} | {r.get('vs_sdpa', 1.0):.2f}x | {r.get('err', 0):.1e} |")
    dump()


if __name__ == "__main__":
    main()
