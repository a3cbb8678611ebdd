"""Does a cache's decode step compile as one graph on this device? `generate` with `fullgraph=True`, per cache.

A compileable cache is fast on a GPU only when `generate` compiles its whole decode step as one graph (one CUDA-graph
replay per step). `generate` compiles with `fullgraph=False`, so a graph break there is silent: the step runs as
several compiled pieces with Python between them (the int4 fixed-slot step ran as 4 graphs per layer on an H100,
docs/fixed-slot-eviction.md). Here every cache generates a few tokens with `fullgraph=True` (and `dynamic=False`), so
the first break raises, and its reason is printed; "one graph" otherwise. Llama-3.1-8B's shape, `--layers` layers,
random bf16 weights (`gpu_decode.build_model`).

    python benchmarks/compile_check.py                                  # CUDA: inductor, the GPU's real compile
    python benchmarks/compile_check.py --device cpu --small --backend aot_eager    # the CPU's check of the same code
"""

from __future__ import annotations

import argparse
import json
import traceback

import torch
import transformers

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.compile_check
    from eviction_decode import KERNEL_ROWS, STORAGE_KINDS, fixed_slot
    from generate_steps import GENERATE_CACHES, _generate, reset_compiled_state
    from gpu_decode import build_model
except ImportError:  # pragma: no cover
    from benchmarks.eviction_decode import KERNEL_ROWS, STORAGE_KINDS, fixed_slot
    from benchmarks.generate_steps import GENERATE_CACHES, _generate, reset_compiled_state
    from benchmarks.gpu_decode import build_model


def candidates(policy: str) -> dict:
    """label -> cache factory `(model, max_cache_len) -> cache`: the compiled rows of `generate_steps` and the
    fixed-slot rows of `eviction_decode` (bf16, int4 and its kernel rows)."""
    found = {label: factory for label, (factory, compiled) in GENERATE_CACHES.items() if compiled}
    rows = {**{name: (bits, {}) for name, bits in STORAGE_KINDS.items()}, **KERNEL_ROWS}
    for name, (bits, options) in rows.items():
        found[f"fixed-slot {policy} {name}"] = fixed_slot(policy, bits, ratio=0.25, **options)[0]
    return found


def check(model, ids, label, factory, config, tokens: int) -> dict:
    """One `generate` of `tokens` tokens with `config` (fullgraph): {"cache", "one_graph", "error"?}."""
    reset_compiled_state()
    cache = factory(model, ids.shape[1] + tokens + 8)
    try:
        _generate(model, ids, cache, tokens, True, compile_config=config)
        return dict(cache=label, one_graph=True)
    except Exception as exc:  # noqa: BLE001 - the break's reason is the result
        lines = [line for line in traceback.format_exception_only(exc)[-1].splitlines() if line.strip()]
        return dict(cache=label, one_graph=False, error=" | ".join(lines[:12])[:2000])
    finally:
        if hasattr(cache, "detach"):
            cache.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="a 2-layer toy model (CPU runs)")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=6)
    parser.add_argument("--policy", default="h2o")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--only", nargs="*", default=None, help="labels to check (default: all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = build_model(args.layers, args.device, args.small)
    config = transformers.CompileConfig(backend=args.backend, fullgraph=True, dynamic=False,
                                        **({} if args.backend == "inductor" else {"mode": None}))
    config._compile_all_devices = True  # generate compiles on accelerators only: force it on a CPU
    print(f"device {args.device} torch {torch.__version__} transformers {transformers.__version__} "
          f"backend {args.backend}", flush=True)
    ids = torch.randint(10, model.config.vocab_size, (args.batch, args.length), device=args.device)
    rows = []
    for label, factory in candidates(args.policy).items():
        if args.only is None or label in args.only:
            rows.append(check(model, ids, label, factory, config, args.tokens))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
