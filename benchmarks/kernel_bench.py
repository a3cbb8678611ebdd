"""Microbenchmark of the fused decode-attention kernel over packed KIVI storage vs SDPA over bf16 K/V (GPU).

Default shape: 32k tokens x batch 8, 8 KV heads, 32 query heads, head_dim 128, bf16, one query per row (Llama-3.1-8B
decode, one layer). The quantized history holds T = L - R tokens (R = 128 in full precision, the residual window).
Prints the device's copy bandwidth (device-to-device copy, bytes read + written), SDPA's time (enable_gqa=True,
bf16 K/V), the kernel's time per bit width and config (triton.testing.do_bench median, and the same through CUDA
graph replay, which removes Python launch overhead), bytes read / s, and the speedup; checks the kernel against the
torch reference at the same shape first.

    python benchmarks/kernel_bench.py --rep 100 --json out.json    # v2 vs v3 sweep, then splits (~2 min on an H200)
    python benchmarks/kernel_bench.py --sweep occ --lean --rep 100 # v3 register caps x split counts (~1 min)
    python benchmarks/kernel_bench.py --quick --json out.json      # the defaults only

Every timed config is first checked against the torch reference at the same shape (left padding on).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvpress_lite.kernels import quantized_decode_attention  # noqa: E402


def make_storage(b, hkv, gq, nq, d, length, residual, bits, group_size, key_mode, dtype, device, seed=0):
    """Random packed storage of `length` tokens: history T = length - residual, then the residual."""
    g = torch.Generator(device=device).manual_seed(seed)
    t = length - residual
    qmax = (1 << bits) - 1
    db = d * bits // 8
    key_param = (b, hkv, t // group_size, d) if key_mode == "channel" else (b, hkv, t, d // group_size)
    token_param = (b, hkv, t, d // group_size)

    def rnd(shape, lo, hi):
        return (torch.rand(shape, generator=g, device=device) * (hi - lo) + lo).to(dtype)

    return dict(
        query=torch.randn((b, hkv * gq, nq, d), generator=g, device=device).to(dtype),
        key_codes=torch.randint(0, 256, (b, hkv, t, db), generator=g, device=device, dtype=torch.uint8),
        key_scale=rnd(key_param, 0.2 / qmax, 3.0 / qmax), key_zero=rnd(key_param, -2.0, 0.0),
        value_codes=torch.randint(0, 256, (b, hkv, t, db), generator=g, device=device, dtype=torch.uint8),
        value_scale=rnd(token_param, 0.2 / qmax, 3.0 / qmax), value_zero=rnd(token_param, -2.0, 0.0),
        residual_keys=torch.randn((b, hkv, residual, d), generator=g, device=device).to(dtype),
        residual_values=torch.randn((b, hkv, residual, d), generator=g, device=device).to(dtype),
        bits=bits, group_size=group_size, key_mode=key_mode, scaling=d ** -0.5,
    )


def storage_bytes(inp) -> int:
    """Bytes the kernel must read: codes, scales, zeros, residual, queries (each once)."""
    return sum(v.numel() * v.element_size() for v in inp.values() if isinstance(v, torch.Tensor))


def bench(fn, graph: bool, rep: int = 200):
    import triton.testing as tt

    if graph:
        return tt.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    return tt.do_bench(fn, warmup=50, rep=300, return_mode="median")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1)
    p.add_argument("--residual", type=int, default=128)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--key-mode", default="channel", choices=["channel", "token"])
    p.add_argument("--quick", action="store_true", help="default config only, no sweep")
    p.add_argument("--sweep", default="v3", choices=["v3", "occ", "v2"],
                   help="v3: v2 baseline + v3 warps/stages/bias_dot, then splits for the best; occ: v3 register caps "
                        "x splits (occupancy vs waves); v2: the old grid")
    p.add_argument("--rep", type=int, default=200, help="ms of graph replays per timed config")
    p.add_argument("--lean", action="store_true", help="skip the best config's extra timings (op, plain converts)")
    p.add_argument("--json", default=None, help="write every measurement here")
    p.add_argument("--profile", default=None, metavar="JSON",
                   help="run only this kernel config (a JSON dict) a few times, for ncu; no timing")
    args = p.parse_args(argv)
    if args.profile:
        from kvpress_lite.kernels import triton_decode

        cfg = json.loads(args.profile)
        for bits in args.bits:
            inp = make_storage(args.batch, args.kv_heads, args.q_heads // args.kv_heads, args.queries, args.head_dim,
                               args.length, args.residual, bits, args.group_size, args.key_mode, torch.bfloat16,
                               torch.device("cuda"))
            kw = {k_: v_ for k_, v_ in inp.items() if k_ != "key_mode"}
            for _ in range(3):
                triton_decode.triton_decode_attention(**kw, kv_start=None, key_per_channel=args.key_mode == "channel",
                                                      **cfg)
        torch.cuda.synchronize()
        return
    import triton

    from kvpress_lite.kernels import triton_decode

    dev = torch.device("cuda")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    b, hkv, hq, d, L = args.batch, args.kv_heads, args.q_heads, args.head_dim, args.length
    gq, nq = hq // hkv, args.queries
    props = torch.cuda.get_device_properties(dev)
    info = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "shape": dict(batch=b, length=L, kv_heads=hkv, q_heads=hq, head_dim=d,
                                                        queries=nq, residual=args.residual,
                                                        group_size=args.group_size, key_mode=args.key_mode)}
    print(json.dumps(info), flush=True)
    rows = []
    extra = {}

    def dump():  # after every row, so a run stopped at its time limit still leaves its numbers
        if args.json:
            Path(args.json).write_text(json.dumps(dict(info, **extra, rows=rows), indent=1))

    # copy bandwidth: 2 GiB device-to-device, bytes read + written
    src = torch.randn(2**29, device=dev)
    dst = torch.empty_like(src)
    t_copy = bench(lambda: dst.copy_(src), graph=False)
    copy_bw = 2 * src.numel() * 4 / (t_copy * 1e-3)
    src = dst = None  # free before the next allocations
    print(f"copy: {t_copy:.3f} ms for 2 x 2 GiB -> {copy_bw / 1e12:.2f} TB/s", flush=True)
    extra.update(copy_bw=copy_bw, copy_ms=t_copy)

    # SDPA over bf16 K/V of the same tokens
    q = torch.randn(b, hq, nq, d, device=dev, dtype=dtype)
    k = torch.randn(b, hkv, L, d, device=dev, dtype=dtype)
    v = torch.randn(b, hkv, L, d, device=dev, dtype=dtype)
    sdpa_bytes = 2 * k.numel() * 2 + q.numel() * 2
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    t_sdpa = bench(sdpa, graph=False)
    t_sdpa_g = bench(sdpa, graph=True)
    print(f"SDPA bf16: {t_sdpa:.4f} ms (graph {t_sdpa_g:.4f}), {sdpa_bytes / 1e6:.1f} MB -> "
          f"{sdpa_bytes / (t_sdpa * 1e-3) / 1e12:.2f} TB/s", flush=True)
    rows.append(dict(name="sdpa-bf16", ms=t_sdpa, ms_graph=t_sdpa_g, bytes=sdpa_bytes))
    k = v = None

    for bits in args.bits:
        inp = make_storage(b, hkv, gq, nq, d, L, args.residual, bits, args.group_size, args.key_mode, dtype, dev)
        nbytes = storage_bytes(inp)
        kv_start = torch.randint(0, 64, (b,), device=dev)
        args_k = {k_: v_ for k_, v_ in inp.items() if k_ != "key_mode"}
        args_k["key_per_channel"] = args.key_mode == "channel"
        # correctness of every timed config at the real shape (left padding on), softcap 0; the best also softcap 50
        refs = {cap: quantized_decode_attention(**inp, kv_start=kv_start, softcap=cap, impl="torch")
                for cap in (0.0, 50.0)}

        def check(cfg, cap=0.0, a=args_k, ks=kv_start, rf=refs):
            out = triton_decode.triton_decode_attention(**a, kv_start=ks, softcap=cap, **cfg)
            ref = rf[cap]
            err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            return err, bool(torch.isfinite(out).all())

        if args.quick:
            configs = [dict()]
        elif args.sweep == "v3":
            configs = [dict(variant=2, num_warps=2, num_stages=3)]
            configs += [dict(variant=3, num_warps=w, num_stages=st, bias_dot=bd)
                        for bd, w, st in ((True, 2, 3), (True, 2, 2), (True, 4, 3), (True, 4, 2), (False, 2, 3))]
            if bits == 4:
                configs += [dict(variant=3, num_warps=w, num_stages=3, v_join=True) for w in (2, 4)]
        elif args.sweep == "occ":
            base_cfg = dict(variant=3, num_warps=2, num_stages=2 if bits == 4 else 3, bias_dot=True)
            configs = [dict(variant=2, num_warps=2, num_stages=3)]
            configs += [dict(base_cfg, maxnreg=mr, num_splits=sp) for mr in (None, 200, 168)
                        for sp in (7, 8, 10, 12, 16)]
        else:
            configs = [dict(variant=v, num_warps=w, num_stages=s, num_splits=sp)
                       for v, w, s, sp in itertools.product((1, 2), (4, 2), (2, 3, 4), (16, 32)) if v == 2 or w == 4]
        best = None

        def measure(cfg, bits=bits, nbytes=nbytes, a=args_k, ks0=kv_start):
            nonlocal best
            # timed with the same left padding as the check (<= 1 tile skipped): one compile per config
            def fn(cfg=cfg, a=a, ks=ks0):
                return triton_decode.triton_decode_attention(**a, kv_start=ks, **cfg)
            try:
                t0 = time.time()
                err, finite = check(cfg)
                ms = bench(fn, graph=True, rep=args.rep)
            except Exception as exc:  # a config that does not compile or fit: report, go on
                print(f"int{bits} {cfg}: failed {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                return None
            ok = err < 1e-2 and finite
            row = dict(name=f"int{bits}", cfg=cfg, ms_graph=ms, bytes=nbytes, err=err, ok=ok, wall=time.time() - t0)
            rows.append(row)
            print(f"int{bits} {cfg}: {ms:.4f} ms graph, {nbytes / (ms * 1e-3) / 1e12:.2f} TB/s, err {err:.1e}"
                  f"{'' if ok else ' WRONG'}", flush=True)
            if ok and (best is None or ms < best["ms_graph"]):
                best = row
            dump()
            return row

        for cfg in configs:
            measure(cfg)
        if args.sweep == "v3" and not args.quick and best is not None:
            for sp in (8, 12, 24, 33, 48):
                measure(dict(best["cfg"], num_splits=sp))
        cfg = best["cfg"]
        best = dict(best)
        best["err_softcap50"], _ = check(cfg, cap=50.0)
        print(f"int{bits} best {cfg}: softcap 50 rel err {best['err_softcap50']:.1e}", flush=True)

        def kernel(magic=True, a=args_k, c=cfg, ks=kv_start):
            return triton_decode.triton_decode_attention(**a, kv_start=ks, magic=magic, **c)

        if not args.lean:  # --lean: the sweep only
            best["ms"] = bench(kernel, graph=False)
            best["ms_op"] = bench(lambda i=inp: quantized_decode_attention(**i, impl="triton"), graph=False)
            best["ms_plain_convert"] = bench(lambda: kernel(magic=False), graph=True, rep=args.rep)
            best["ms_torch_dequant"] = (bench(lambda i=inp: quantized_decode_attention(**i, impl="torch"),
                                              graph=False) if b * L <= 65536 else None)
        rows.append(dict(best, name=f"int{bits}-best"))
        base = next((r for r in rows if r["name"] == f"int{bits}" and r["cfg"].get("variant") == 2), None)
        if base is not None:
            rows.append(dict(base, name=f"int{bits}-v2"))
        inp = refs = None
        dump()

    print("\n| what | config | ms (graph) | ms (do_bench) | MB read | TB/s read | % copy bw | vs SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| copy | 2 x 2 GiB | | {t_copy:.4f} | | {copy_bw / 1e12:.2f} | 100 | |")
    for r in rows:
        if r["name"] == "sdpa-bf16" or r["name"].endswith("-best") or r["name"].endswith("-v2"):
            ms = r["ms_graph"]
            bw = r["bytes"] / (ms * 1e-3)
            print(f"| {r['name']} | {r.get('cfg', '')} | {ms:.4f} | {r.get('ms', 0):.4f} | {r['bytes'] / 1e6:.1f} | "
                  f"{bw / 1e12:.2f} | {100 * bw / copy_bw:.0f} | {t_sdpa_g / ms:.2f}x |")
    for r in rows:
        if r["name"].endswith("-best") and "ms_op" in r:
            print(f"{r['name']}: op incl. Python launch {r['ms_op']:.4f} ms; plain int->float converts "
                  f"{r['ms_plain_convert']:.4f} ms (graph)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(info, copy_bw=copy_bw, copy_ms=t_copy, rows=rows), indent=1))


if __name__ == "__main__":
    main()
