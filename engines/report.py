"""The run report: report.md, a self-contained report.html (plots embedded as PNG) and metrics.json.

What a stage contributes is data in its manifest's ``metrics`` (see pipeline/runfolder.py):

- ``ladder``: entries ``{"step", "top1" (or "psnr"), "top5"?, "method"?}``, ``step`` one of
  :data:`LADDER_STEPS`. Entries without a method (the train-form and fused FP32 models) apply to every
  method's row. The ladder shows where accuracy is lost on the way from the trained model to the INT8 engine.
- ``methods``: rows ``{"method", "bits"?, "engine"?, "top1"?, "top5"?, "latency_ms"?, "throughput"?,
  "size_mb"?, "latency_batch"?, "throughput_batch"?, "base"?}`` (``base``: the float model a quantized row
  comes from; ``latency_batch``/``throughput_batch``: the batch size each timing figure was measured at, shown
  with it in the table). Rows with the same (method, bits, engine) from several stages are merged, so the
  engine stage can give accuracy and the bench stage latency. The INT8 drop is computed here.
- Training curves: every ``*.jsonl`` file in a stage folder, one JSON object per line (``epoch``, numbers).
- Weight violins: every stage output named ``fused`` (a fused model's checkpoint) or else ``checkpoint`` (a
  train-form checkpoint with ``arch``, fused here).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from repq.engines.doctor_report import diagnoses, doctor_sections, fallback_sections, plot_doctor, plot_fallback
from repq.engines.timing import quality_key
from repq.reparam.io import atomic_write_bytes, atomic_write_json, atomic_write_text

LADDER_STEPS: dict[str, str] = {
    "train": "train-form FP32 (PyTorch)",
    "fused": "fused FP32 (PyTorch)",
    "fakequant": "fake-quant (PyTorch)",
    "qdq_onnx": "ONNX (ONNX Runtime)",
    "engine": "engine",
}
SHORT_STEPS = {"train": "train-form", "fused": "fused", "fakequant": "fake-quant", "qdq_onnx": "ONNX",
               "engine": "engine"}
FLOAT_STEPS = ("train", "fused")  # where the ladder starts: the trained model in full precision
METHOD_COLUMNS = (
    ("method", "Method"), ("bits", "Bits"), ("engine", "Engine"),
    ("top1", "Top-1 %"), ("top5", "Top-5 %"), ("psnr", "PSNR (dB)"),
    ("int8_drop", "Drop vs FP32 (pts)"), ("latency_ms", "Latency (ms)"), ("throughput", "Throughput (img/s)"),
    ("size_mb", "Size (MB)"),
)
# The batch size each timing figure was measured at: in the column header when every row shares it, else in
# each cell ("0.632 @ batch 1"), so a latency is never read against a throughput's batch.
TIMING_BATCH = {"latency_ms": "latency_batch", "throughput": "throughput_batch"}
MAX_VIOLIN_SAMPLES = 20_000
CURVE_SKIP = ("epoch", "step", "lr", "time_s", "images_per_s")


# ---------------------------------------------------------------- metrics


def _row_key(row: dict) -> tuple:
    return (row.get("method"), row.get("bits"), row.get("engine"))


def merge_methods(rows: list[dict]) -> list[dict]:
    """Merge rows of the same (method, bits, engine); later values fill or override earlier ones."""
    merged: dict[tuple, dict] = {}
    for row in rows:
        merged.setdefault(_row_key(row), {}).update({k: v for k, v in row.items() if v is not None})
    return list(merged.values())


def _is_fp32(row: dict) -> bool:
    return str(row.get("method", "")).upper().startswith("FP32") or row.get("bits") == 32


def add_drops(methods: list[dict], ladder: list[dict]) -> list[dict]:
    """``int8_drop`` = FP32 top-1 (or PSNR) minus the row's. The reference is the FP32 row of the same float
    model (``base``) on the same engine, else any FP32 row on that engine, else the fused FP32 model of the
    ladder."""
    key = quality_key(*methods, *ladder)
    fp32 = {(row.get("base"), row.get("engine")): row[key] for row in methods if _is_fp32(row) and key in row}
    per_engine = {engine: value for (_, engine), value in fp32.items()}
    fallback = next(iter(fp32.values()), None)
    if fallback is None:
        fused = [e[key] for e in ladder if e.get("step") in ("fused", "train") and key in e]
        fallback = fused[-1] if fused else None
    out = []
    for row in methods:
        row = dict(row)
        engine = row.get("engine")
        reference = fp32.get((row.get("base"), engine), per_engine.get(engine, fallback))
        if not _is_fp32(row) and key in row and reference is not None:
            row["int8_drop"] = round(reference - row[key], 4)
        out.append(row)
    return out


def ladder_table(ladder: list[dict]) -> tuple[list[str], list[dict]]:
    """(steps present, rows): a row per method, {"method", <step>: top1 (or psnr), ..., "drop": {"from",
    "to", "value"}, "changes": [(step, next step, change), ...]}.

    ``drop`` is what reaches the end of the ladder: the first step's figure (the FP32 model) minus the last's (the
    engine), positive for a loss. ``changes`` are the steps that moved the figure, signed (a loss is negative),
    so a fake-quant dip that the engine recovers reads as a dip and a recovery, not as the loss."""
    key = quality_key(*ladder)
    shared = {e["step"]: e[key] for e in ladder if not e.get("method") and key in e}
    methods = list(dict.fromkeys(e["method"] for e in ladder if e.get("method")))
    rows = []
    for method in methods or ["FP32"]:
        row = {"method": method, **shared}
        row.update({e["step"]: e[key] for e in ladder if e.get("method") == method and key in e})
        rows.append(row)
    steps = [s for s in LADDER_STEPS if any(s in r for r in rows)]
    for row in rows:
        present = [s for s in steps if s in row]
        if len(present) < 2:
            continue
        first, last = present[0], present[-1]
        row["drop"] = {"from": first, "to": last, "value": round(row[first] - row[last], 4)}
        pairs = zip(present, present[1:], strict=False)
        row["changes"] = [(a, b, round(row[b] - row[a], 4)) for a, b in pairs if round(row[b] - row[a], 2) != 0]
    return steps, rows


def _drop_cell(row: dict) -> str:
    """"0.56", or with its ends named when the ladder does not run from the FP32 model to the engine."""
    drop = row.get("drop")
    if drop is None:
        return "-"
    text = f"{drop['value']:.2f}".replace("-0.00", "0.00")
    if drop["from"] in FLOAT_STEPS and drop["to"] == "engine":
        return text
    return f"{text} ({SHORT_STEPS[drop['from']]} -> {SHORT_STEPS[drop['to']]})"


def _changes_cell(row: dict) -> str:
    if "changes" not in row:
        return "-"
    return "; ".join(f"{SHORT_STEPS[a]} -> {SHORT_STEPS[b]} {change:+.2f}"
                     for a, b, change in row["changes"]) or "none"


def collect_run_metrics(records: dict, recipe: Any = None) -> dict[str, Any]:
    """metrics.json from a run's stage records (``pipeline.runfolder.read_run``)."""
    ladder: list[dict] = []
    methods: list[dict] = []
    stages: dict[str, Any] = {}
    versions: dict[str, str] = {}
    found: dict[str, dict] = {"doctor": {}, "fallback": {}}  # stage entries the report shows as sections
    for name, record in records.items():
        metrics = dict(record.metrics)
        for key in found:
            found[key].update(metrics.pop(key, {}))
        ladder.extend(dict(e, stage=name) for e in metrics.pop("ladder", []))
        methods.extend(metrics.pop("methods", []))
        stages[name] = {"wall_s": record.manifest.get("wall_s"), "finished": record.manifest.get("finished"),
                        "key": record.key, "metrics": metrics}
        versions = record.manifest.get("versions", versions)
    run: dict[str, Any] = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "versions": versions}
    if recipe is not None:
        run.update(name=recipe.name, model=recipe.model.model_dump(mode="json"),
                   data=recipe.data.model_dump(mode="json"), seed=recipe.seed)
    methods = add_drops(merge_methods(methods), ladder)
    total = sum(s["wall_s"] or 0 for s in stages.values())
    return {"run": run, "ladder": ladder, "methods": methods, "stages": stages,
            "total_wall_s": round(total, 3), **{key: value for key, value in found.items() if value}}


# ---------------------------------------------------------------- inputs for the plots


def read_curve(path: str | Path) -> list[dict]:
    """A metrics.jsonl: one JSON object a line; an unreadable line (a killed writer's last) is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def conv_weights(source: Any) -> dict[str, np.ndarray]:
    """Conv kernels (4-D ``*.weight`` tensors) of a fused model: a module, state dict or checkpoint dict."""
    if hasattr(source, "state_dict"):
        source = source.state_dict()
    for key in ("state_dict", "model"):
        if isinstance(source, dict) and isinstance(source.get(key), dict):
            source = source[key]
    weights = {}
    for name, tensor in source.items():
        if name.endswith("weight") and getattr(tensor, "ndim", 0) == 4:
            weights[name.removesuffix(".weight")] = tensor.detach().float().cpu().numpy().ravel()
    return weights


def fused_conv_weights(checkpoint: dict) -> tuple[str, dict[str, np.ndarray]]:
    """(model label, conv weights of its deploy form) from a repq checkpoint; a train-form one is fused. The label
    is the model's with its transforms (`model_label`: a substituted repvgg_a0 is qarepvgg_a0), as the stages
    and the training log name it."""
    from repq.reparam.models import model_label

    arch = checkpoint.get("arch")
    name = model_label(arch) if isinstance(arch, dict) else "model"
    if isinstance(arch, dict) and "state_dict" in checkpoint and not arch.get("deploy"):
        from repq.reparam import fuse_model, model_from_arch

        model = model_from_arch(arch)
        model.load_state_dict(checkpoint["state_dict"])
        return name, conv_weights(fuse_model(model.eval()))
    return name, conv_weights(checkpoint)


# ---------------------------------------------------------------- plots (PNG bytes)


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _doctor_plots(doctor: dict | None) -> dict[str, tuple[str, bytes | None]]:
    found = diagnoses(doctor)
    plots = {}
    for label, one in found.items():
        name = "doctor" if len(found) == 1 else "doctor_" + re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
        suffix = f" ({label})" if len(found) > 1 else ""
        plots[name] = (f"Doctor: fused max |w| and SQNR per layer{suffix}", _figure_png(plot_doctor(one, _pyplot())))
    return plots


def _fallback_plot(fallback: dict | None) -> bytes | None:
    fig = plot_fallback(fallback, _pyplot()) if fallback else None
    return None if fig is None else _figure_png(fig)


def plot_accuracy_latency(methods: list[dict]) -> bytes | None:
    key = quality_key(*methods)
    points = [r for r in methods if _number(r.get(key)) and _number(r.get("latency_ms"))]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    # A legend, not annotations: methods of similar speed and accuracy would print their names over each other.
    markers = "osD^vP*Xh<>"
    for i, row in enumerate(points):
        ax.scatter(row["latency_ms"], row[key], s=60, marker="s" if _is_fp32(row) else markers[i % len(markers)],
                   label=_method_label(row), zorder=3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    ax.set_xlabel("latency per batch (ms, lower is better)")
    ax.set_ylabel("PSNR on the engine (dB)" if key == "psnr" else "top-1 accuracy on the engine (%)")
    ax.set_title("Accuracy vs latency per method")
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.15)
    return _figure_png(fig)


def plot_weight_violins(models: dict[str, dict[str, np.ndarray]], seed: int = 0) -> bytes | None:
    """One violin per conv layer of each fused model (as the QARepVGG paper's Figure 2)."""
    models = {label: w for label, w in models.items() if w}
    if not models:
        return None
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    width = max(7.0, 0.35 * max(len(w) for w in models.values()) + 2)
    fig, axes = plt.subplots(len(models), 1, figsize=(width, 3.8 * len(models)), squeeze=False)
    for ax, (label, weights) in zip(axes[:, 0], models.items(), strict=True):
        data = []
        for values in weights.values():
            if values.size > MAX_VIOLIN_SAMPLES:
                values = rng.choice(values, MAX_VIOLIN_SAMPLES, replace=False)
            data.append(values)
        positions = np.arange(1, len(data) + 1)
        parts = ax.violinplot(data, positions=positions, widths=0.8, showextrema=True, showmedians=False)
        for body in parts["bodies"]:
            body.set_alpha(0.6)
        ax.set_xticks(positions)
        ax.set_xticklabels([str(i) for i in range(len(data))], fontsize=7)
        ax.set_xlabel("conv layer of the deploy form (input to output)")
        ax.set_ylabel("weight value")
        ranges = [float(np.max(np.abs(v))) for v in weights.values()]
        ax.set_title(f"{label}: per-layer weights of the fused model (largest |w| = {max(ranges):.3g})",
                     fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)


def _curve_panel(key: str) -> str | None:
    """'loss' or 'quality' for the series worth a line; None for the rest (rates, deploy-form copies)."""
    if key.startswith("deploy_") or not isinstance(key, str):
        return None
    if "loss" in key:
        return "loss"
    if "top1" in key or "acc" in key or "psnr" in key:
        return "quality"
    return None


def plot_curves(curves: dict[str, list[dict]]) -> bytes | None:
    """Loss series and top-1/PSNR series against epoch, one line per (curve, key)."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    axes = {"loss": ax_loss, "quality": ax_acc}
    drawn = {ax_loss: 0, ax_acc: 0}
    for name, rows in curves.items():
        keys = {k for r in rows for k, v in r.items() if _number(v) and _curve_panel(k)}
        for key in sorted(keys):
            points = [(r.get("epoch", i), r[key]) for i, r in enumerate(rows) if _number(r.get(key))]
            ax = axes[_curve_panel(key)]
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{name}: {key}")
            drawn[ax] += 1
    from matplotlib.ticker import MaxNLocator

    for ax, title, ylabel in ((ax_loss, "Training loss", "loss"),
                              (ax_acc, "Accuracy", "top-1 (%) or PSNR (dB)")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn[ax]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    return _figure_png(fig)


# ---------------------------------------------------------------- writing


def write_report(metrics: dict[str, Any], out_dir: str | Path, *, weights: dict | None = None,
                 curves: dict | None = None, title: str | None = None) -> dict[str, Path]:
    """report.md, report.html, metrics.json and plots/*.png into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    plots = {
        "accuracy_latency": ("Accuracy vs latency", plot_accuracy_latency(metrics.get("methods", []))),
        "weight_violins": ("Per-layer weights of the fused model", plot_weight_violins(weights or {})),
        "training_curves": ("Training curves", plot_curves(curves or {})),
        **_doctor_plots(metrics.get("doctor")),
        "fallback": ("Fallback: engine accuracy and latency against layers kept in float",
                     _fallback_plot(metrics.get("fallback"))),
    }
    plots = {k: v for k, v in plots.items() if v[1] is not None}
    paths = {}
    for name, (_, png) in plots.items():
        paths[name] = atomic_write_bytes(out_dir / "plots" / f"{name}.png", png)
    title = title or f"repq report: {metrics.get('run', {}).get('name', 'run')}"
    paths["metrics"] = atomic_write_json(out_dir / "metrics.json", metrics)
    paths["markdown"] = atomic_write_text(out_dir / "report.md", render_markdown(metrics, plots, title))
    paths["html"] = atomic_write_text(out_dir / "report.html", render_html(metrics, plots, title))
    return paths


def _sections(metrics: dict[str, Any]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(heading, intro, header, rows) of every table, shared by the Markdown and the HTML."""
    sections = []
    steps, ladder_rows = ladder_table(metrics.get("ladder", []))
    if steps:
        psnr = quality_key(*metrics.get("ladder", [])) == "psnr"
        unit = "dB" if psnr else "pts"
        header = (["Method"] + [LADDER_STEPS[s] for s in steps]
                  + [f"Drop FP32 -> engine ({unit})", f"Step changes ({unit})"])
        rows = [[str(r["method"])] + [_fmt(r.get(s)) for s in steps] + [_drop_cell(r), _changes_cell(r)]
                for r in ladder_rows]
        figure = "PSNR (dB)" if psnr else "Top-1 (%)"
        sections.append(("Parity ladder", f"{figure} of the same model at each step from training to the engine "
                         "(ONNX: the TensorRT-placement QDQ file in ONNX Runtime; for FP32 rows, the float ONNX "
                         "file and its engine). The drop is what reaches the engine; the step changes (signed, "
                         "a loss is negative) say where the figure moved on the way, including dips a later "
                         "step recovers.", header, rows))
    methods = [_timing_batches(r) for r in metrics.get("methods", [])]
    if methods:
        columns = [(k, h) for k, h in METHOD_COLUMNS if any(k in r for r in methods)]
        shared = {}  # timing column -> the one batch size of all its rows, or None
        for key, batch_key in TIMING_BATCH.items():
            batches = {r.get(batch_key) for r in methods if key in r}
            shared[key] = batches.pop() if len(batches) == 1 else None
        columns = [(k, _batch_header(h, shared[k]) if shared.get(k) is not None else h) for k, h in columns]
        rows = [[_method_cell(r, k, shared.get(k) is None) for k, _ in columns] for r in methods]
        figure = ("PSNR (dB) measured on the engine; drop in dB" if quality_key(*methods) == "psnr" else
                  "Accuracy measured on the engine; drop in points")
        sections.append(("Methods", f"{figure} against FP32 on the "
                         "same engine; latency and throughput measured on the engine itself.",
                         [h for _, h in columns], rows))
    stages = metrics.get("stages", {})
    if stages:
        rows = []
        for name, stage in stages.items():
            scalars = {k: v for k, v in stage.get("metrics", {}).items() if _number(v) or isinstance(v, str)}
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in list(scalars.items())[:8])
            rows.append([name, _fmt(stage.get("wall_s"), 1), shown])
        header = ["Stage", "Wall (s)", "Metrics"]
        if not any(row[2] for row in rows):
            header, rows = header[:2], [row[:2] for row in rows]
        total = metrics.get("total_wall_s")
        sections.append(("Stages", f"Wall time of each stage when it ran (total {_fmt(total, 1)} s).",
                         header, rows))
    return sections + doctor_sections(metrics.get("doctor")) + fallback_sections(metrics.get("fallback"))


def render_markdown(metrics: dict[str, Any], plots: dict, title: str) -> str:
    lines = [f"# {title}", "", _run_line(metrics), ""]
    for heading, intro, header, rows in _sections(metrics):
        lines += [f"## {heading}", "", intro, "", "| " + " | ".join(header) + " |",
                  "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        lines.append("")
    for name, (caption, _) in plots.items():
        lines += [f"## {caption}", "", f"![{caption}](plots/{name}.png)", ""]
    lines += ["All figures: `metrics.json`.", ""]
    return "\n".join(lines)


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1150px; padding: 0 1.5em; color: #1f2328; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
p.intro, p.meta { color: #57606a; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 5px 10px; text-align: right; white-space: nowrap; }
th { background: #f6f8fa; }
th.text, td.text { text-align: left; }
td.text { white-space: normal; }
td:first-child { white-space: nowrap; }
tr:nth-child(even) td { background: #fbfcfd; }
img { max-width: 100%; border: 1px solid #d0d7de; border-radius: 4px; }
"""


def render_html(metrics: dict[str, Any], plots: dict, title: str) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1>", f'<p class="meta">{esc(_run_line(metrics))}</p>']
    for heading, intro, header, rows in _sections(metrics):
        parts += [f"<h2>{esc(heading)}</h2>", f'<p class="intro">{esc(intro)}</p>', "<table><thead><tr>"]
        # A column is right-aligned (header too) when every cell in it is a number.
        numeric = [i > 0 and all(_looks_numeric(r[i]) for r in rows) for i in range(len(header))]
        parts += [f"<th{'' if num else ' class=text'}>{esc(h)}</th>"
                  for h, num in zip(header, numeric, strict=True)]
        parts.append("</tr></thead><tbody>")
        for row in rows:
            cells = "".join(f"<td{'' if num else ' class=text'}>{esc(c)}</td>"
                            for c, num in zip(row, numeric, strict=True))
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</tbody></table>")
    for _name, (caption, png) in plots.items():
        data = base64.b64encode(png).decode("ascii")
        parts += [f"<h2>{esc(caption)}</h2>",
                  f'<img alt="{esc(caption)}" src="data:image/png;base64,{data}">']
    parts += ['<p class="meta">All figures are in metrics.json next to this file.</p>', "</body></html>"]
    return "\n".join(parts) + "\n"


def _run_line(metrics: dict[str, Any]) -> str:
    run = metrics.get("run", {})
    model, data = run.get("model", "?"), run.get("data", "?")
    model = model.get("name", "?") if isinstance(model, dict) else model
    data = data.get("source", "?") if isinstance(data, dict) else data
    versions = run.get("versions", {})
    shown = ", ".join(f"{k} {versions[k]}" for k in ("torch", "onnxruntime", "nvidia-modelopt")
                      if k in versions)
    return f"model {model} on {data}, seed {run.get('seed', '?')}; created {run.get('created', '?')}" + (
        f"; {shown}" if shown else "")


def _method_label(row: dict) -> str:
    bits = f" {row['bits']}-bit" if row.get("bits") and not _is_fp32(row) else ""
    engine = f" ({row['engine']})" if row.get("engine") else ""
    return f"{row.get('method', '?')}{bits}{engine}"


def _timing_batches(row: dict) -> dict:
    """The row with ``latency_batch``/``throughput_batch``; a run from before they existed wrote one
    ``batch_size`` string "latency/throughput" ("1/32"), read here."""
    legacy = row.get("batch_size")
    if "latency_batch" in row or not isinstance(legacy, str) or "/" not in legacy:
        return row
    row = {k: v for k, v in row.items() if k != "batch_size"}
    small, _, large = legacy.partition("/")
    if small.strip().isdigit() and large.strip().isdigit():
        row.update(latency_batch=int(small), throughput_batch=int(large))
    return row


def _batch_header(header: str, batch) -> str:
    """"Latency (ms)" -> "Latency (ms, batch 1)"."""
    return f"{header[:-1]}, batch {batch})" if header.endswith(")") else f"{header} (batch {batch})"


def _method_cell(row: dict, key: str, with_batch: bool = False) -> str:
    value = row.get(key)
    if key == "int8_drop" and value is not None:
        return f"{value:+.2f}".replace("+", "") if value >= 0 else f"{value:.2f}"
    if key in ("latency_ms", "size_mb"):
        text = _fmt(value, 3 if key == "latency_ms" and _number(value) and value < 1 else 2)
    elif key == "throughput":
        text = _fmt(value, 0)
    else:
        return _fmt(value)
    batch = row.get(TIMING_BATCH.get(key, ""))
    return f"{text} @ batch {batch}" if with_batch and value is not None and batch is not None else text


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _looks_numeric(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return cell == "-"
