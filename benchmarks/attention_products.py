"""One eviction decode step's attention with probabilities over bf16 slots, computed several ways (GPU).

Why: on an H100 the fixed-slot bf16 step spent ~4.8 of its 12 GPU ms per step (Llama-3.1-8B shape, 8k x 8, budget
2049) in two batched products that cuBLAS runs with generic kernels (`magma_sgemmEx_kernel`, `gemmSN_NN_kernel`,
70-80 us per layer where reading the layer's slot keys takes ~10 us; docs/fixed-slot-eviction.md). This script times
the candidates for one layer at the step's shapes, each checked first against an fp32 eager reference (output and the
probabilities summed over each KV head's query heads, what h2o/tova/snapkv score from):

- `one-pass eager`: `observe.decode_attention` as `EvictionCache` runs it uncompiled (q . K with the scale in
  `baddbmm`'s epilogue, fp32 softmax, P . V);
- `q.K products, compiled`: matmul q . K^T, fp32 logits, masked softmax, matmul P . V under `torch.compile` (the
  compiled bf16 fixed-slot step until 2026-12-07);
- `slots-major, compiled`: the same math with the slots as the long dimension of both products (K . q^T
  `[B H_kv, N, G]`, then V^T . P^T), so the GEMMs are tall-skinny instead of 4-row batched ones: the fixed-slot
  step since (on an H100 at 8 x 2049 slots: 0.064 ms per layer against 0.126 ms);
- `broadcast-reduce, compiled`: each product as a broadcast multiply summed over one axis, so inductor writes it as
  a reduction kernel instead of calling cuBLAS;
- `sdpa + logits`: the output from SDPA (flash/cuDNN) and the probabilities from a separate q . K pass (two reads of
  the keys, efficient kernels);
- `triton residual`: the decode kernel over the bf16 slots as its full-precision residual with `return_probs`
  (`FixedSlotEvictionCache(bf16_kernel=True)`).

    python benchmarks/attention_products.py                        # 8 x 2049 and 4 x 8193 slots, 8 KV heads
    python benchmarks/attention_products.py --device cpu --shapes 2x64   # a CPU smoke run (correctness only)
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

from kvpress_lite.eviction.observe import decode_attention  # noqa: E402
from kvpress_lite.kernels import PackedKV, dispatch  # noqa: E402


def reference(q, k, v, valid, scaling):
    """fp32 eager attention over repeated KV heads: output `[B, H_q, 1, D]`, mass `[B, H_kv, N]`."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    logits = (q.float() @ kk.transpose(-1, -2) * scaling).masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = logits.softmax(-1)
    return probs @ vv, probs.view(q.shape[0], k.shape[1], g, -1).sum(2)


def one_pass(q, k, v, valid, scaling):
    out, probs = decode_attention(q, k, v, valid[:, None, None, :], scaling)
    return out.transpose(1, 2), probs.view(q.shape[0], k.shape[1], -1, k.shape[2]).sum(2)


def row_major(q, k, v, valid, scaling):
    b, hq, _, d = q.shape
    h = k.shape[1]
    logits = torch.matmul(q.reshape(b, h, hq // h, d), k.transpose(-1, -2)).float() * scaling
    probs = logits.masked_fill(~valid[:, None, None, :], -float("inf")).softmax(dim=-1)
    out = torch.matmul(probs.to(v.dtype), v)
    return out.reshape(b, hq, 1, d), probs.sum(dim=2)


def slots_major(q, k, v, valid, scaling):
    b, hq, _, d = q.shape
    h = k.shape[1]
    qt = (q * scaling).reshape(b, h, hq // h, d).transpose(-1, -2)  # (B, H, D, G)
    logits = torch.matmul(k, qt).float()  # (B, H, N, G): the slots are the GEMM's long dimension
    probs = logits.masked_fill(~valid[:, None, :, None], -float("inf")).softmax(dim=2)
    out = torch.matmul(v.transpose(-1, -2), probs.to(v.dtype))  # (B, H, D, G)
    return out.transpose(-1, -2).reshape(b, hq, 1, d), probs.sum(dim=-1)


def broadcast_reduce(q, k, v, valid, scaling):
    """Both products as broadcast multiplies summed over one axis: inductor writes each as one reduction kernel that
    reads K (V) once (no cuBLAS call; G = 4 query rows per KV head are too few for a GEMM tile)."""
    b, hq, _, d = q.shape
    h = k.shape[1]
    qg = (q.float() * scaling).reshape(b, h, hq // h, 1, d)  # (B, H, G, 1, D)
    logits = (qg * k[:, :, None].float()).sum(-1)  # (B, H, G, N)
    probs = logits.masked_fill(~valid[:, None, None, :], -float("inf")).softmax(dim=-1)
    out = (probs[..., None] * v[:, :, None].float()).sum(-2)  # (B, H, G, D)
    return out.to(q.dtype).reshape(b, hq, 1, d), probs.sum(dim=2)


def sdpa_and_logits(q, k, v, valid, scaling):
    b, hq, _, d = q.shape
    h = k.shape[1]
    mask = valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
    logits = torch.matmul((q * scaling).reshape(b, h, hq // h, d), k.transpose(-1, -2))
    probs = logits.masked_fill(~mask, -float("inf")).softmax(dim=-1, dtype=torch.float32)
    return out, probs.sum(dim=2)


def triton_residual(q, k, v, valid, scaling):
    packed = PackedKV.view(None, None, None, None, None, None, k, v, 8, k.shape[-1], key_mode="token")
    positions = torch.where(valid, 0, -1).to(torch.int32)[:, None, :].expand(-1, k.shape[1], -1).contiguous()
    kv_start = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return dispatch.decode_probs(q, packed, kv_start, scaling, None, positions, True, "triton")


def time_ms(fn, args, device, reps: int) -> float:
    for _ in range(3):
        fn(*args)
    if device == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(*args)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    t = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    return (time.perf_counter() - t) * 1000 / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["8x2049", "4x8193"], help="BATCHxSLOTS")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for a smoke run)")
    candidates = {"one-pass eager": one_pass, "q.K products, compiled": torch.compile(row_major),
                  "slots-major, compiled": torch.compile(slots_major),
                  "broadcast-reduce, compiled": torch.compile(broadcast_reduce), "sdpa + logits": sdpa_and_logits}
    if device == "cuda" and dispatch.triton_available():
        candidates["triton residual"] = triton_residual
    rows = []
    for shape in args.shapes:
        b, n = (int(x) for x in shape.split("x"))
        torch.manual_seed(0)
        h, d = args.kv_heads, args.head_dim
        q = torch.randn(b, h * args.group, 1, d, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16) for _ in range(2))
        valid = torch.ones(b, n, dtype=torch.bool, device=device)
        valid[0, :7] = False  # a few empty slots / pads in row 0
        scaling = d**-0.5
        ref_out, ref_mass = reference(q, k, v, valid, scaling)
        bytes_kv = 2 * k.numel() * k.element_size()
        for name, fn in candidates.items():
            row = dict(shape=shape, candidate=name)
            try:
                out, mass = fn(q, k, v, valid, scaling)
                row["max_err_out"] = (out.float() - ref_out).abs().max().item()
                row["max_err_mass"] = (mass.float() - ref_mass).abs().max().item()
                if row["max_err_out"] > 5e-2 or row["max_err_mass"] > 5e-2:
                    raise AssertionError(f"differs from the reference: {row}")
                row["ms"] = time_ms(fn, (q, k, v, valid, scaling), device, args.reps if device == "cuda" else 3)
                row["GB_per_s"] = bytes_kv / row["ms"] / 1e6
            except Exception as err:  # report and go on
                row["error"] = repr(err)[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| batch x slots | candidate | ms per layer | K+V GB/s | max error (out / mass) |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['candidate']} | error: {r['error'][:100]} | | |")
        else:
            print(f"| {r['shape']} | {r['candidate']} | {r['ms']:.4f} | {r['GB_per_s']:.0f} | "
                  f"{r['max_err_out']:.1e} / {r['max_err_mass']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
