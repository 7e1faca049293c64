"""Render a run folder's report (engines/report.py does the rendering; this reads the run folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def render_run_report(run_dir: str | Path, recipe: Any = None,
                      out_dir: str | Path | None = None) -> dict[str, Path]:
    """Collect a run folder's trusted stages; write the report into ``out_dir`` (default: the run folder)."""
    from repq.engines.report import collect_run_metrics, fused_conv_weights, read_curve, write_report
    from repq.pipeline.runfolder import read_run
    from repq.reparam.io import load_checkpoint

    run_dir = Path(run_dir)
    records = read_run(run_dir)
    metrics = collect_run_metrics(records, recipe)
    curves, weights = {}, {}
    want_violins = recipe is None or recipe.stages.report.violins
    for name, record in records.items():
        for path in sorted(record.dir.rglob("*.jsonl")):
            label = name if path.stem in ("metrics", name) else f"{name}/{path.stem}"
            curves[label] = read_curve(path)
        model_file = record.outputs.get("fused") or record.outputs.get("checkpoint")
        if want_violins and model_file is not None and model_file.is_file():
            label, layers = fused_conv_weights(load_checkpoint(model_file))
            weights[f"{name}: {label}"] = layers
    return write_report(metrics, out_dir or run_dir, weights=weights, curves=curves)
