"""`python -m eval RECIPE [key.path=value ...]` (or `accelerate launch -m eval RECIPE`), from a checkout.

Examples:
    python -m eval recipes/quickstart.yaml
    python -m eval recipes/eviction.yaml model=gemma3-270m tasks.passkey.samples=5 output_dir=/tmp/runs
    python -m eval recipes/quickstart.yaml caches.int4.params.bits=3 --dry-run   # checks every cache, loads no weights
    accelerate launch --multi_gpu --num_processes 2 -m eval recipes/smoke.yaml   # also on CPU-only hosts (gloo)
    torchrun --nproc_per_node 2 -m eval recipes/smoke.yaml                       # same, without accelerate's launcher

Errors print one line (exit status 2); add --debug for the traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description="Run a kvpress_lite eval recipe.",
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides (values parsed as YAML)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, build every cache on each model's config (no weights), list the run folders")
    parser.add_argument("--no-report", action="store_true", help="skip report generation")
    parser.add_argument("--push-to-hub", metavar="REPO",
                        help="push the results dataset to this hub repo (needs network)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def dry_run(recipe) -> list[Path]:
    """Build every cache of the plan on a weightless (meta-device) model of its config; return the run folders."""
    import itertools

    from . import zoo
    from .runner import preflight
    from .runs import plan

    runs = plan(recipe)
    for (model_name, dtype), group in itertools.groupby(runs, key=lambda r: (r.model, r.dtype)):
        group = list(group)
        preflight(group, zoo.meta_model(model_name, dtype, recipe.attn_implementation))
        labels = sorted({r.cache.label for r in group})
        print(f"[eval] {model_name} ({dtype}): {len(labels)} caches build on its config: {', '.join(labels)}")
    return [run.path(recipe.output_dir) for run in runs]


def run(args) -> None:
    from .config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        for path in dry_run(recipe):
            print(path)
        return

    from .report import collect, summary_table, write_report
    from .runner import process_state, run_recipe

    start = time.perf_counter()
    result = run_recipe(recipe)
    if process_state(recipe).is_main_process:
        recipe_dir, run_dirs = Path(recipe.output_dir) / recipe.name, result["runs"]
        if not args.no_report:
            for path in write_report(recipe_dir, args.push_to_hub, run_dirs):
                print(f"[eval] report: {path}")
        print(f"\n{summary_table(collect(recipe_dir, run_dirs))}")
        print(f"[eval] {recipe.name} finished in {time.perf_counter() - start:.1f} s (results in {recipe_dir})")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if not argv:
        parser.print_help()
        raise SystemExit(2)
    args = parser.parse_intermixed_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        raise SystemExit("[eval] interrupted; finished runs are kept and skipped next time") from None
    except Exception as err:  # one line for the user; the traceback with --debug
        if args.debug:
            raise
        kind = "" if isinstance(err, ValueError) else f"{type(err).__name__}: "
        message = " ".join(str(err).split())
        if args.recipe not in message and not message.startswith("recipe "):
            message = f"{args.recipe}: {message}"
        print(f"error: {kind}{message} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
