"""Where an uncompiled decode step's time goes: torch.profiler over a few decode forwards per cache.

Llama-3.1-8B's shape with random bf16 weights (`gpu_decode.build_model`), one cache at a time: prefill, `--warm`
untimed decode forwards, then `--steps` forwards under `torch.profiler`. Per cache it prints the step time (CUDA
events, or wall time on a CPU), the device-kernel time per step, kernel launches per step (CUDA kernels on a GPU, aten
ops on a CPU), host-to-device syncs per step (`cudaStreamSynchronize`, `cudaDeviceSynchronize`, device-to-host copies)
and the top ops by host (self CPU) time, so the largest host costs are named before anything is changed.

    python benchmarks/eviction_profile.py --grid 8192x8 --caches DynamicCache "h2o 0.25" "snapkv 0.25"
    python benchmarks/eviction_profile.py --device cpu --small --grid 256x2 --steps 3     # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.eviction_profile
    from gpu_decode import build_model, prefill, release
except ImportError:  # pragma: no cover
    from benchmarks.gpu_decode import build_model, prefill, release

from kvpress_lite import build_cache, cache_kwarg

CACHES = {
    "DynamicCache": ("dynamic", {}),
    "h2o 0.25": ("h2o", {"ratio": 0.25}),
    "snapkv 0.25": ("snapkv", {"ratio": 0.25}),
    "h2o 0.25 + int4": ("h2o", {"ratio": 0.25, "bits": 4}),
    "snapkv 0.25 + int4": ("snapkv", {"ratio": 0.25, "bits": 4}),
    "knorm 0.25 + int4": ("knorm", {"ratio": 0.25, "bits": 4}),
}
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _steps(model, cache, token, n: int) -> torch.Tensor:
    kwarg = cache_kwarg(model)
    for _ in range(n):
        out = model(input_ids=token, logits_to_keep=1, use_cache=True, **{kwarg: cache})
        token = out.logits[:, -1:].argmax(-1)
    return token


def summarize(prof, steps: int, device: str, top: int) -> dict:
    """Per-step figures from a profile of `steps` decode forwards."""
    events = prof.events()
    if device == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        kernel_ms = sum(e.device_time for e in kernels) / 1000 / steps
        launches = len(kernels) / steps
        syncs = sum(1 for e in events if e.name in SYNC_EVENTS) / steps
        d2h = sum(1 for e in events if e.name == "cudaMemcpyAsync" or "DtoH" in e.name) / steps
    else:
        ops = [e for e in events if e.name.startswith("aten::") and e.cpu_parent is None]
        kernel_ms, launches, syncs, d2h = None, len(ops) / steps, 0, 0
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)
    return dict(kernel_ms_per_step=kernel_ms, launches_per_step=launches, syncs_per_step=syncs,
                memcpy_per_step=d2h, table=table)


@torch.no_grad()
def profile_cache(model, ids, label, warm: int, steps: int, top: int) -> dict:
    name, params = CACHES[label]
    device = ids.device.type
    batch, length = ids.shape
    row = dict(cache=label, length=length, batch=batch)
    cache = build_cache(name, model, **params)
    try:
        token = prefill(model, cache, ids)
        token = _steps(model, cache, token, warm)
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        wall = time.perf_counter()
        token = _steps(model, cache, token, steps)
        if device == "cuda":
            end.record()
            torch.cuda.synchronize()
            row["ms_per_step"] = start.elapsed_time(end) / steps
        else:
            row["ms_per_step"] = (time.perf_counter() - wall) * 1000 / steps
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            wall = time.perf_counter()
            _steps(model, cache, token, steps)
            if device == "cuda":
                torch.cuda.synchronize()
            row["profiled_ms_per_step"] = (time.perf_counter() - wall) * 1000 / steps
        row.update(summarize(prof, steps, device, top))
    except Exception as err:  # report and go on
        row["error"] = repr(err)[:300]
    finally:
        release(cache)
        del cache
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--grid", nargs="+", default=["8192x8"], help="LENGTHxBATCH points")
    parser.add_argument("--caches", nargs="+", default=list(CACHES), choices=list(CACHES))
    parser.add_argument("--warm", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=18, help="rows of the host-time table")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a 2-layer toy model (smoke runs of this script)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --small for a smoke run)")
    model = build_model(args.layers, args.device, small=args.small)
    rows = []
    for point in args.grid:
        length, batch = (int(v) for v in point.split("x"))
        ids = torch.randint(10, model.config.vocab_size, (batch, length), device=args.device)
        for label in args.caches:
            row = profile_cache(model, ids, label, args.warm, args.steps, args.top)
            rows.append(row)
            table = row.pop("table", "")
            print(json.dumps(row), flush=True)
            print(table, flush=True)
    print("\n| length x batch | cache | ms/step | profiled ms/step | kernel ms/step | launches/step | syncs/step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        k = r.get("kernel_ms_per_step")
        print(f"| {r['length']} x {r['batch']} | {r['cache']} | {r.get('ms_per_step', float('nan')):.2f} | "
              f"{r.get('profiled_ms_per_step', float('nan')):.2f} | {'' if k is None else f'{k:.2f}'} | "
              f"{r.get('launches_per_step', float('nan')):.0f} | {r.get('syncs_per_step', 0):.1f} |"
              + (f" error: {r['error']}" if "error" in r else ""))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
