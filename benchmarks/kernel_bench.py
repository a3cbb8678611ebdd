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

`--probs`: each config is also timed returning the attention probabilities (`return_probs=True`: per-entry
probabilities summed over the query heads, what attention-ranked eviction scores from) and with per-entry validity
(`positions`, the fixed-slot cache's mode) plus probabilities, each checked against the reference first; and, per
shape and bit width, the fixed-slot layer's torch path over the same storage (slots dequantized, matmul, masked
softmax, matmul, probabilities summed; eager and torch.compile'd), the same over bf16 slots, and the kernel over
those bf16 slots as its full-precision residual (`FixedSlotEvictionCache(bf16_kernel=True)`). The fixed-slot
storage is per-token keys, channel-packed values, G = 32, a 16-token ring:

    python benchmarks/kernel_bench.py --probs --key-mode token --group-size 32 --residual 16 \
        --shapes 8x2048 1x2048 8x8192 --configs '[{}]' --json probs.json

`--device cpu` (with TRITON_INTERPRET=1, tiny shapes) only checks that the script runs (wall-clock times, no copy
bandwidth, no compile): `tests/test_benchmark_scripts.py`.
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
from kvpress_lite.kernels.reference import (  # noqa: E402
    reference_decode_attention,
    reference_decode_attention_probs,
)

DEFAULT_CONFIGS = [dict(variant=3), dict(variant=4)]
CPU_TIMING = False


def entry_positions(b, hkv, n, device, seed=0, empty=0.1):
    """int32 `[b, hkv, n]`: a random permutation of positions per (row, head) with a fraction `empty` of entries -1:
    validity is not a prefix (the fixed-slot cache after replacements)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    pos = torch.stack([torch.randperm(n, generator=g) for _ in range(b * hkv)]).view(b, hkv, n).to(torch.int32)
    return pos.masked_fill(torch.rand(b, hkv, n, generator=g) < empty, -1).to(device)


def torch_path(q, keys, values, positions, n_pad, scaling):
    """`FixedSlotLayer.attend`'s torch path over dense keys/values `[B, H, N, D]`: output and probabilities summed over
    each KV head's query heads (what the policy scores from)."""
    b, hq, nq, d = q.shape
    h = keys.shape[1]
    logits = torch.matmul(q.reshape(b, h, hq // h * nq, d), keys.transpose(-1, -2)).float() * scaling
    valid = positions >= n_pad[:, None, None].to(torch.int32)
    probs = logits.masked_fill(~valid[:, :, None, :], -float("inf")).softmax(dim=-1)
    out = torch.matmul(probs.to(values.dtype), values)  # (B, H, G * q, D)
    return out.reshape(b, hq, nq, d), probs.sum(dim=2)


def torch_path_quantized(q, packed, positions, n_pad, scaling):
    """The same over per-token quantized slots (the fixed-slot storage): dequantized in the model dtype first."""
    from kvpress_lite.kivi import dequantize_values

    p = packed
    keys = dequantize_values(p.key_codes, p.key_scale, p.key_zero, p.bits, p.group_size)
    values = dequantize_values(p.value_codes, p.value_scale, p.value_zero, p.bits, p.group_size)
    keys = torch.cat([keys, p.residual_keys], dim=2)
    values = torch.cat([values, p.residual_values], dim=2)
    return torch_path(q, keys, values, positions, n_pad, scaling)


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
    if not torch.cuda.is_available() or CPU_TIMING:  # `--device cpu`: a smoke test of the script, wall-clock ms
        fn()
        t0 = time.perf_counter()
        for _ in range(2):
            fn()
        return (time.perf_counter() - t0) / 2 * 1e3
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
    p.add_argument("--probs", action="store_true",
                   help="also time each config returning the attention probabilities (and with per-entry validity), "
                        "and the fixed-slot layer's torch path (see the module docstring)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: TRITON_INTERPRET=1 smoke test of the script (tiny shapes), not a measurement")
    args = p.parse_args(argv)
    import triton

    from kvpress_lite.kernels import triton_decode as td

    global CPU_TIMING
    dev = torch.device(args.device)
    CPU_TIMING = dev.type == "cpu"
    dtype = torch.bfloat16
    hkv, hq, d, nq = args.kv_heads, args.q_heads, args.head_dim, args.queries
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        name, sms = props.name, props.multi_processor_count
    else:
        name, sms = "cpu (interpreter)", 0
    info = {"device": name, "sms": sms, "torch": torch.__version__,
            "triton": triton.__version__, "kv_heads": hkv, "q_heads": hq, "head_dim": d, "queries": nq,
            "residual": args.residual, "group_size": args.group_size, "key_mode": args.key_mode, "probs": args.probs}
    print(json.dumps(info), flush=True)
    rows = []

    def dump():
        if args.json:
            Path(args.json).write_text(json.dumps(dict(info, rows=rows), indent=1))

    src = torch.randn(2**29 if dev.type == "cuda" else 2**10, device=dev)  # copy bandwidth: 2 GiB, read + written
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
            ref = reference_decode_attention(q, packed_c, kv_start, d ** -0.5)
            if args.probs:
                positions = entry_positions(b, hkv, packed_c.history_capacity + args.residual, dev, seed=bits)
                ref_p = reference_decode_attention_probs(q, packed_c, kv_start, d ** -0.5)
                ref_pos = reference_decode_attention_probs(q, packed_c, kv_start, d ** -0.5, positions=positions)
                if args.key_mode == "token":
                    def quantized_step(q=q, pc=packed_c, p=positions, ks=kv_start):
                        return torch_path_quantized(q, pc, p, ks, d ** -0.5)

                    rows.extend(time_torch_paths(args, shape, f"int{bits}", quantized_step, ref_pos))
                    dump()
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
                if args.probs:
                    for label, extra, (r_out, r_probs) in (("+probs", {}, ref_p),
                                                           ("+positions+probs", {"positions": positions}, ref_pos)):
                        def fp(pk=pk, cfg=cfg, q=q, ks=kv_start, extra=extra):
                            return td.triton_decode_attention(q, pk, ks, d ** -0.5, 0.0, cfg, return_probs=True,
                                                              **extra)

                        try:
                            o, pr = fp()
                            err_o, err_p = rel(o, r_out), rel(pr, r_probs)
                            ms_p = bench(fp, graph=True, rep=args.rep)
                        except Exception as exc:
                            print(f"[{shape}] int{bits}{label} {kw}: failed {type(exc).__name__}: {str(exc)[:300]}",
                                  flush=True)
                            continue
                        ok_p = err_o < 1e-2 and err_p < 1e-2 and bool(torch.isfinite(pr).all())
                        rows.append(dict(shape=shape, name=f"int{bits}{label}", cfg=kw, ms=ms_p, bytes=nbytes,
                                         tbs=nbytes / (ms_p * 1e-3) / 1e12, copy_pct=100 * nbytes / (ms_p * 1e-3)
                                         / copy_bw, vs_sdpa=t_sdpa / ms_p, err=max(err_o, err_p), ok=ok_p,
                                         vs_plain=ms_p / ms))
                        print(f"[{shape}] int{bits}{label} {kw}: {ms_p:.4f} ms ({ms_p / ms:.2f}x the kernel without), "
                              f"err out {err_o:.1e} probs {err_p:.1e}{'' if ok_p else ' WRONG'}", flush=True)
                        dump()
            packed_c = packed_t = vt = ref = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if args.probs:  # the fixed-slot torch path over bf16 slots (its bits=None storage), same entries
            n = length
            keys = torch.randn(b, hkv, n, d, device=dev, dtype=dtype)
            values = torch.randn(b, hkv, n, d, device=dev, dtype=dtype)
            positions = entry_positions(b, hkv, n, dev, seed=1)
            n_pad = torch.randint(0, 64, (b,), device=dev)
            ref_bf16 = torch_path(q.float(), keys.float(), values.float(), positions, n_pad, d ** -0.5)
            def bf16_step(q=q, k=keys, v=values, p=positions, n=n_pad):
                return torch_path(q, k, v, p, n, d ** -0.5)

            rows.extend(time_torch_paths(args, shape, "bf16", bf16_step, ref_bf16))
            # the kernel over the same bf16 entries as its full-precision residual (FixedSlotEvictionCache's
            # bf16_kernel=True): bits=8 and group_size=D only pick the residual-only launch's variant
            res_only = PackedKV(None, None, None, None, None, None, keys, values, bits=8, group_size=d,
                                key_mode="token")

            def fb(pk=res_only, q=q, p=positions, ks=n_pad):
                return td.triton_decode_attention(q, pk, ks, d ** -0.5, 0.0, positions=p, return_probs=True)

            try:
                o, pr = fb()
                err = max(rel(o, ref_bf16[0]), rel(pr, ref_bf16[1]))
                ms = bench(fb, graph=True, rep=args.rep)
                nbytes = packed_bytes(res_only)
                rows.append(dict(shape=shape, name="bf16 kernel (residual path)+positions+probs", ms=ms, bytes=nbytes,
                                 tbs=nbytes / (ms * 1e-3) / 1e12, copy_pct=100 * nbytes / (ms * 1e-3) / copy_bw,
                                 vs_sdpa=t_sdpa / ms, err=err, ok=err < 2e-2))
                print(f"[{shape}] bf16 kernel (residual path) + positions + probs: {ms:.4f} ms, err {err:.1e}",
                      flush=True)
            except Exception as exc:
                print(f"[{shape}] bf16 kernel: failed {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            keys = values = res_only = None
            dump()

    print("\n| shape | what | config | ms | MB read | TB/s | % copy bw | vs SDPA | rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['name']} | {r.get('cfg', '')} | {r['ms']:.4f} | {r.get('bytes', 0) / 1e6:.1f} | "
              f"{r.get('tbs', 0):.2f} | {r.get('copy_pct', 0):.0f} | {r.get('vs_sdpa', 1.0):.2f}x | "
              f"{r.get('err', 0):.1e} |")
    dump()


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def time_torch_paths(args, shape, what, fn, ref):
    """Rows for the fixed-slot torch path `fn() -> (out, probs)`: eager, and torch.compile'd (CUDA only), each checked
    against `ref` (the reference's (out, probs) over the same entries) and timed like the kernels (CUDA graphs)."""
    rows = []
    variants = [("eager", fn)]
    if not CPU_TIMING:
        variants.append(("compiled", torch.compile(fn, fullgraph=True, dynamic=False)))
    for mode, f in variants:
        name = f"torch path {what} {mode}"
        try:
            o, pr = f()
            err = max(rel(o, ref[0]), rel(pr, ref[1]))
            ms = bench(f, graph=True, rep=args.rep)
        except Exception as exc:
            print(f"[{shape}] {name}: failed {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        rows.append(dict(shape=shape, name=name, ms=ms, err=err, ok=err < 2e-2))
        print(f"[{shape}] {name} (output + probabilities): {ms:.4f} ms, err {err:.1e}", flush=True)
    return rows


if __name__ == "__main__":
    main()
