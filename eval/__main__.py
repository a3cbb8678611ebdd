"""`python -m eval RECIPE [key.path=value ...]` (or `kvpress-eval`, or `accelerate launch -m eval RECIPE`).

Examples:
    python -m eval recipes/quickstart.yaml
    python -m eval recipes/eviction.yaml model=gemma3-270m tasks.passkey.samples=5 output_dir=/tmp/runs
    accelerate launch --multi_gpu --num_processes 2 -m eval recipes/smoke.yaml   # also on CPU-only hosts (gloo)
    torchrun --nproc_per_node 2 -m eval recipes/smoke.yaml                       # same, without accelerate's launcher
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval", description="Run a kvpress_lite eval recipe.",
                                     epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides (values parsed as YAML)")
    parser.add_argument("--dry-run", action="store_true", help="validate, list the run folders and exit")
    parser.add_argument("--no-report", action="store_true", help="skip report generation")
    parser.add_argument("--push-to-hub", metavar="REPO", help="push the results dataset to this hub repo (needs network)")
    args = parser.parse_intermixed_args(argv)

    from .config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        from .runs import plan

        for run in plan(recipe):
            print(run.path(recipe.output_dir))
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


if __name__ == "__main__":
    main()
