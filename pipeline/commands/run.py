"""`repq run`: the whole recipe, from re-param training to INT8 engines and a report, resumable.

    repq run                                   # the embedded default (digits, minutes on a CPU)
    repq run recipes/cifar10_repq_8_4bit.yaml data.source=PATH/TO/cifar10
    repq run recipe.yaml stages.train.epochs=3 --out /tmp/try    # key=value overrides any recipe key
    repq run recipe.yaml --from ptq            # rerun ptq and every stage after it
    torchrun --nproc_per_node 8 --no-python repq run recipe.yaml    # data-parallel training on 8 GPUs

Each stage writes runs/<name>/<stage>/ with a manifest. Rerunning skips every stage whose settings and
inputs are unchanged ("cached - skipping"); a changed setting reruns that stage and the ones after it. A run
killed at any moment loses nothing finished: run the same command again.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from repq.pipeline.recipe import load_recipe, split_items
from repq.pipeline.stages import STAGE_ORDER


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("items", nargs="*", metavar="RECIPE|KEY=VALUE",
                        help="a recipe YAML (default: the embedded default), then overrides such as "
                             "stages.train.epochs=3 (see `repq recipe --show`)")
    parser.add_argument("--out", metavar="DIR", help="run folder (default: runs/<recipe name>/)")
    parser.add_argument("--from", dest="from_stage", metavar="STAGE", choices=STAGE_ORDER,
                        help=f"force this stage and all later ones to rerun ({', '.join(STAGE_ORDER)})")


def run(args: argparse.Namespace) -> int:
    from repq.pipeline.runfolder import default_run_dir, run_pipeline

    recipe_path, overrides = split_items(args.items)
    recipe = load_recipe(recipe_path, overrides)
    run_dir = default_run_dir(recipe, args.out)
    reads = (recipe_path,) if recipe_path else ()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks for the run
        run_pipeline(recipe, run_dir, from_stage=args.from_stage, log=lambda line: None, reads=reads)
        return 0
    print(f"repq run: recipe {recipe_path or '(embedded default)'} -> {run_dir}", file=sys.stderr)
    summary = run_pipeline(recipe, run_dir, from_stage=args.from_stage,
                           log=lambda line: print(line, file=sys.stderr, flush=True), reads=reads)
    parts = [f"ran {', '.join(summary.ran) or 'nothing'}"]
    if summary.cached:
        parts.append(f"cached {', '.join(summary.cached)}")
    if summary.disabled:
        parts.append(f"switched off {', '.join(summary.disabled)}")
    print(f"done: {'; '.join(parts)}")
    report = Path(run_dir) / "report.html"
    if report.is_file():
        print(f"report: {report} (and report.md, metrics.json)")
    return 0


def resume_hint(args: argparse.Namespace, argv: list[str]) -> tuple[str, list[str]]:
    """(what an interrupted or failed run kept, the command line that continues it) for pipeline/cli.py."""
    from repq.pipeline.runfolder import default_run_dir, read_run

    recipe_path, overrides = split_items(args.items)
    run_dir = default_run_dir(load_recipe(recipe_path, overrides), args.out)
    done = list(read_run(Path(run_dir), verify=False)) if Path(run_dir).is_dir() else []
    kept = (f"finished stages are kept in {run_dir} ({', '.join(done)})" if done
            else f"no stage had finished in {run_dir}")
    again, skip = [], False  # the same command without --from, which would redo the forced stages
    for item in argv:
        if skip:
            skip = False
        elif item == "--from":
            skip = True
        elif not item.startswith("--from="):
            again.append(item)
    return f"{kept}; an interrupted stage continues from its last save", again
