"""RepVGG's INT8 collapse on CIFAR-10, its cause and its rescue, measured on ONNX Runtime engine files.

    python bench/collapse.py table --runs DIR [DIR ...] --out OUT      # every DIR/epoch_NNN.pt of each run
    python bench/collapse.py rescue --checkpoint CKPT --out OUT [--steps 300]

`table`, per saved checkpoint (`bench/train_cifar.py run ... --keep-every N` writes them): FP32 top-1 and INT8
PTQ top-1 (max and percentile calibrators) of ONNX Runtime engine files on the validation split, and the
doctor's ingredients of the collapse: the largest fused weight and its ratio to its layer's median channel
max, the dead channels (always zero after ReLU on the calibration images, counted at every layer's input), and
the largest identity-BN |gamma|/sqrt(var+eps). Writes OUT/table.json, OUT/table.md and OUT/<quantity>.png
(each quantity against the epoch, one line per run).

`rescue` takes one checkpoint through each rescue path with the same step budget and scores every result on its
ONNX Runtime INT8 file: (a) substitution to QARepVGG plus a short fine-tune, then PTQ; (b) RepQ 8-bit
fine-tune; (c) the doctor's fallback under a 1-point budget (how many layers stay in float); (d) toolkit QAT.
Writes OUT/rescue.json and OUT/rescue.md with each path's top-1 and cost (steps, wall seconds).

Data: ../shared/datasets/cifar10, the training runs' split (5,000 validation images, seed 0).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from repq.calibration.datasets import load_data
from repq.calibration.loaders import build_loaders, calibration_loader
from repq.quant.doctor import diagnose, identity_scales
from repq.quant.fallback import engine_score
from repq.quant.toolkit import deploy_copy, quantize
from repq.reparam.io import atomic_write_json, atomic_write_text
from repq.training.train import load_model_checkpoint

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"
QUANTITIES = {  # key -> (axis label, log scale)
    "fp32": ("FP32 top-1 (%), ORT", False),
    "ptq_max": ("INT8 PTQ max top-1 (%), ORT", False),
    "ptq_percentile": ("INT8 PTQ percentile top-1 (%), ORT", False),
    "drop_max": ("PTQ max drop (points)", False),
    "max_fused_weight": ("largest fused |w|", True),
    "max_ratio": ("largest fused |w| / layer median channel max", True),
    "dead_channels": ("dead channels (all layers' inputs)", False),
    "max_identity_scale": ("largest identity-BN |gamma|/sqrt(var+eps)", True),
}


def split(data_dir: str):
    data = load_data(data_dir, val_size=5000, seed=0)
    val = list(build_loaders(data, 128, eval_batch_size=250)[1])
    calib = list(calibration_loader(data, 512, 64, seed=0))
    return data, val, calib


def ingredients(model: torch.nn.Module, calib) -> dict:
    """The doctor's view of the collapse: fused outliers, dead channels, identity-BN scales."""
    diagnosis = diagnose(model, calib[:1], engines=(), sqnr_images=8, progress=False)
    worst = max(diagnosis.layers, key=lambda d: d.max_abs)
    ratio = max(diagnosis.layers, key=lambda d: d.outlier_ratio)
    scales = identity_scales(model)
    top = max(((name, float(s.max())) for name, s in scales.items()), key=lambda item: item[1], default=None)
    return {"max_fused_weight": worst.max_abs, "max_fused_weight_layer": worst.block or worst.layer,
            "max_fused_weight_branch": worst.outlier.branch, "ratio_at_max": worst.outlier_ratio,
            "max_ratio": ratio.outlier_ratio, "max_ratio_layer": ratio.block or ratio.layer,
            "dead_channels": sum(len(d.dead_inputs) for d in diagnosis.layers),
            "max_identity_scale": top[1] if top else None, "max_identity_scale_layer": top[0] if top else None,
            "verdict": diagnosis.verdict}


def checkpoint_row(path: Path, data, val, calib) -> dict:
    model, ckpt = load_model_checkpoint(path)
    model.eval()
    shape = (1, *data.input_shape[1:])
    row = {"run": path.parent.name, "model": model.repq_arch["name"], "epoch": ckpt["epoch"],
           "l2": ckpt["settings"]["l2"], "lr": ckpt["settings"]["lr"],
           "weight_decay": ckpt["settings"]["weight_decay"], "width": ckpt["settings"]["width_mult"]}
    row["fp32"] = engine_score(model, val, shape, "top1")
    for method in ("max", "percentile"):
        row[f"ptq_{method}"] = engine_score(quantize(model, calib, method), val, shape, "top1")
    row["drop_max"] = row["fp32"] - row["ptq_max"]
    row["drop_percentile"] = row["fp32"] - row["ptq_percentile"]
    row.update(ingredients(model, calib))
    return row


def cmd_table(args) -> dict:
    data, val, calib = split(args.data)
    rows = []
    for run in args.runs:
        for path in sorted(Path(run).glob("epoch_*.pt")):
            start = time.perf_counter()
            rows.append(checkpoint_row(path, data, val, calib))
            r = rows[-1]
            print(f"{r['run']} epoch {r['epoch']}: FP32 {r['fp32']:.2f}, PTQ max {r['ptq_max']:.2f}, percentile "
                  f"{r['ptq_percentile']:.2f}; max |w| {r['max_fused_weight']:.3g} ({r['ratio_at_max']:.0f}x "
                  f"median), dead {r['dead_channels']}, identity scale {r['max_identity_scale']} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    out = Path(args.out)
    result = {"val_images": sum(len(y) for _, y in val), "calib_images": 512, "rows": rows}
    atomic_write_json(out / "table.json", result)
    atomic_write_text(out / "table.md", table_markdown(rows, result["val_images"]))
    plot(rows, out)
    return result


def _fmt(value, digits=2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table_markdown(rows: list[dict], val_images: int) -> str:
    lines = [f"Top-1 (%) of ONNX Runtime engine files on {val_images} CIFAR-10 validation images; PTQ: ModelOpt "
             "calibration on 512 training images, symmetric INT8, per-channel weights.", "",
             "| run | epoch | FP32 | PTQ max | PTQ pct | drop max | drop pct | max fused |w| (layer, branch) | "
             "x median | max ratio | dead ch | max id-BN scale |", "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['run']} | {r['epoch']} | {_fmt(r['fp32'])} | {_fmt(r['ptq_max'])} | "
                     f"{_fmt(r['ptq_percentile'])} | {_fmt(r['drop_max'])} | {_fmt(r['drop_percentile'])} | "
                     f"{r['max_fused_weight']:.3g} ({r['max_fused_weight_layer']}, {r['max_fused_weight_branch']}) | "
                     f"{r['ratio_at_max']:.0f} | {r['max_ratio']:.0f} | {r['dead_channels']} | "
                     f"{_fmt(r['max_identity_scale'], 1)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in rows))
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    for ax, (key, (label, log)) in zip(axes.flat, QUANTITIES.items(), strict=True):
        for i, run in enumerate(runs):  # one colour per run in every panel, drawn or not
            points = [(r["epoch"], r[key]) for r in rows if r["run"] == run and r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), "o-", color=f"C{i}", label=run)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch")
        if log:
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "collapse.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ rescue


def cmd_rescue(args) -> dict:
    from repq.quant.config import FinetuneConfig, QATConfig
    from repq.quant.fallback import fallback_search
    from repq.quant.finetune import finetune, quantized_model
    from repq.quant.qat import qat
    from repq.training.config import SubstituteConfig, TrainConfig
    from repq.training.train import substitute

    data, val, calib = split(args.data)
    model, ckpt = load_model_checkpoint(args.checkpoint)
    model.eval()
    shape = (1, *data.input_shape[1:])
    out = Path(args.out)
    steps, rows = args.steps, {}
    if args.only and (out / "rescue.json").is_file():  # rerun some paths: keep the others' rows
        rows = json.loads((out / "rescue.json").read_text())["rows"]
    train_loader, _ = build_loaders(data, args.batch_size, seed=0)

    def timed(name, fn):
        if args.only and name.split()[0].strip("()") not in args.only:
            return
        start = time.perf_counter()
        row = fn()
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows[name] = row
        print(f"{name}: {json.dumps(row)}", file=sys.stderr, flush=True)
        atomic_write_json(out / "rescue.json", {"checkpoint": str(args.checkpoint), "steps": steps, "rows": rows})

    args.only = args.only and [*args.only, "FP32", "PTQ"]
    timed("FP32", lambda: {"top1": engine_score(model, val, shape, "top1"), "steps": 0})
    for method in ("max", "percentile"):
        timed(f"PTQ {method}", lambda m=method: {
            "top1": engine_score(quantize(model, calib, m), val, shape, "top1"), "steps": 0})

    def substituted():
        saved = {k: v for k, v in ckpt["settings"].items() if k in TrainConfig.model_fields}
        base = TrainConfig(**{**saved, "max_steps_per_epoch": steps, "progress": False, "keep_every": None})
        summary = substitute(args.checkpoint, data, SubstituteConfig(epochs=1, lr=args.substitute_lr),
                             out / "a_substitute", base=base)
        qa, _ = load_model_checkpoint(summary["best_checkpoint"])
        qa.eval()
        return {"fp32": engine_score(qa, val, shape, "top1"),
                "top1": engine_score(quantize(qa, calib, "max"), val, shape, "top1"),
                "top1_percentile": engine_score(quantize(qa, calib, "percentile"), val, shape, "top1"),
                "steps": steps}

    def repq_8bit():
        config = FinetuneConfig(method=args.repq_method, w_bits=8, a_bits=8, epochs=1, max_steps_per_epoch=steps,
                                lr=args.finetune_lr, progress=False)
        q = quantized_model(copy.deepcopy(model), config)
        finetune(q, train_loader, config, log=lambda line: print(f"  {line}", file=sys.stderr))
        q.eval()
        return {"top1": engine_score(q, val, shape, "top1"), "steps": steps, "method": config.method}

    def fallback():
        quantized = quantize(model, calib, "max")
        kept, record = fallback_search(quantized, deploy_copy(model).eval(), calib, val, args.budget, shape,
                                       max_evaluations=40, log=lambda line: print(f"  {line}", file=sys.stderr))
        return {"top1": record["int8"], "float_layers": record["float_layers"],
                "evaluations": record["evaluations"], "steps": 0, "budget": args.budget,
                "latency_ms": record["history"][-1]["latency_ms"], "fp32_latency_ms": record["fp32_latency_ms"]}

    def toolkit_qat():
        quantized = quantize(model, calib, "max")
        config = QATConfig(epochs=1, max_steps_per_epoch=steps, lr=args.qat_lr, batch_size=args.batch_size,
                           progress=False)
        result = qat(quantized, data, out / "d_qat", config)
        q = result["model"].eval()
        return {"top1": engine_score(q, val, shape, "top1"), "steps": steps}

    timed("(a) QARepVGG substitution + fine-tune, PTQ max", substituted)
    timed(f"(b) RepQ ({args.repq_method}) W8A8 fine-tune", repq_8bit)
    timed(f"(c) fallback, budget {args.budget} point", fallback)
    timed("(d) toolkit QAT (from PTQ max)", toolkit_qat)
    result = {"checkpoint": str(args.checkpoint), "steps": steps, "val_images": sum(len(y) for _, y in val),
              "rows": rows}
    atomic_write_json(out / "rescue.json", result)
    atomic_write_text(out / "rescue.md", rescue_markdown(result))
    return result


def rescue_markdown(result: dict) -> str:
    lines = [f"Rescue of {result['checkpoint']}: top-1 (%) of each ONNX Runtime INT8 file on {result['val_images']}"
             f" validation images; fine-tunes get {result['steps']} steps each.", "",
             "| path | top-1 (ORT) | steps | wall s | notes |", "|---|---|---|---|---|"]
    baselines = [n for n in result["rows"] if not n.startswith("(")]
    for name in baselines + sorted(n for n in result["rows"] if n.startswith("(")):
        row = result["rows"][name]
        notes = []
        if "float_layers" in row:
            notes.append(f"{len(row['float_layers'])} layer(s) in float: {', '.join(row['float_layers']) or '-'};"
                         f" {row['evaluations']} evaluations")
        if "fp32" in row:
            notes.append(f"substituted FP32 {row['fp32']:.2f}, PTQ percentile {row['top1_percentile']:.2f}")
        lines.append(f"| {name} | {row['top1']:.2f} | {row['steps']} | {row['seconds']} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["table", "rescue"])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--runs", nargs="+", default=[], help="table: training run folders with epoch_NNN.pt")
    parser.add_argument("--checkpoint", help="rescue: the checkpoint to rescue")
    parser.add_argument("--steps", type=int, default=300, help="rescue: steps of each fine-tune (batch 128)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--budget", type=float, default=1.0, help="rescue: the fallback's top-1 budget (points)")
    parser.add_argument("--repq-method", default="repq")
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--substitute-lr", type=float, default=0.05)
    parser.add_argument("--qat-lr", type=float, default=1e-3)
    parser.add_argument("--only", nargs="+", choices=list("abcd"), help="rescue: run only these paths (and the "
                        "baselines), keeping the other rows of OUT/rescue.json")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "table" and not args.runs:
        parser.error("table needs --runs")
    if args.command == "rescue" and not args.checkpoint:
        parser.error("rescue needs --checkpoint")
    {"table": cmd_table, "rescue": cmd_rescue}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
