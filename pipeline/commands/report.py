"""`repq report`: render a run folder's report again (report.md, report.html, metrics.json, plots/).

    repq report runs/default
    repq report runs/default --out /tmp/report      # somewhere else

It reads the run's verified stage manifests only: a stage folder that is partial, corrupt or stale (its inputs
changed since it ran) is left out. `repq run` renders the same report after its last stage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from repq.errors import RepqError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `repq run`")
    parser.add_argument("--out", metavar="DIR", help="where to write the report (default: RUN_DIR)")


REPORT_FILES = frozenset({"report.md", "report.html", "metrics.json", "plots"})


def run(args: argparse.Namespace) -> int:
    from repq.pipeline.recipe import load_recipe
    from repq.pipeline.run_report import render_run_report
    from repq.pipeline.runfolder import read_run

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise RepqError(f"run folder {run_dir} does not exist: pass a folder `repq run` wrote (runs/<name>)")
    if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
        from repq.pipeline.runfolder import claim_folder

        claim_folder(args.out, "repq report", known=REPORT_FILES, accept=("repq run",))
    else:
        from repq.pipeline.runfolder import check_writable

        check_writable(run_dir, "RUN_DIR")
    recipe_file = run_dir / "recipe.yaml"
    recipe = load_recipe(recipe_file) if recipe_file.is_file() else None
    if not read_run(run_dir):
        raise RepqError(f"{run_dir} holds no finished stage: run `repq run` first (or check the folder)")
    paths = render_run_report(run_dir, recipe, args.out)
    for name in ("markdown", "html", "metrics"):
        print(paths[name])
    return 0
