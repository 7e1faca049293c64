"""RepQ paper's Table 2 layout, filled with our measurements on a CIFAR-10 model from the training stage.

For each method (Merged / RepQ-BN / RepQ-BNEst, corrected or as the paper writes it; Plain when
--plain-checkpoint is given) and bit width, it fine-tunes the same full-precision checkpoint with the same budget,
then measures val top-1 of the fake-quant PyTorch model and, for 8-bit, of the exported QDQ file in ONNX Runtime.
It also reports how well BNEst's variance estimate (equation 6) matches the exact batch variance on real
activations (not asserted anywhere).

    python bench/repq_table.py --checkpoint runs/cifar/best.pt --epochs 0.5 --out /tmp/repq_table
    python bench/repq_table.py --checkpoint runs/cifar/best.pt --methods bnest_corrected --bits 4 --epochs 0 \
        --start-from /tmp/repq_table/bnest_corrected_w4.pt --recalibrate-bn 100 --out /tmp/recal   # re-score a row
    python bench/repq_table.py --checkpoint runs/bench_cifar_cl/repvgg_a0/best.pt --methods bnest_corrected --bits 4 \
        --epochs 60 --act-unsigned-below-8 --distill 1.0 --weight-init minerror --recalibrate-bn 100 \
        --freeze-bn-at 0.8 --out DIR   # 4-bit: 84.88 against FP32 85.92 (30 epochs: 84.06); ~2.3 h on 2 cores
    python bench/repq_table.py ... --resume --out DIR   # continue the row a kill interrupted (DIR/*.state.pt)

--methods takes the fine-tuning methods of repq.quant.config.FINETUNE_METHODS (and plain); `bnest`, its name before
BNEst was split in two, still means bnest_corrected.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch

from repq.calibration.datasets import load_data
from repq.calibration.loaders import build_loaders, val_subset
from repq.engines.engine import open_engine
from repq.errors import RepqError
from repq.quant.config import FINETUNE_METHODS, INIT_METHODS, METHOD_LABELS, FinetuneConfig
from repq.quant.finetune import (
    distillation_teacher,
    export_quantized,
    finetune,
    finetune_config,
    quantized_model,
    recalibrate_bn,
)
from repq.quant.repq import RepQBlock, conv_batch_stats, estimated_stats, wrap_model
from repq.quant.toolkit import load_state_strict
from repq.reparam.io import atomic_save, atomic_write_json, atomic_write_text, load_checkpoint
from repq.training.distributed import init_distributed
from repq.training.evaluate import evaluate
from repq.training.train import load_model_checkpoint

ROOT = Path(__file__).resolve().parents[1]

LABELS = {"plain": "Plain", **METHOD_LABELS}
OLD_NAMES = {"bnest": "bnest_corrected"}  # --methods bnest: the BNEst of the runs before the split


@torch.no_grad()
def bnest_variance_report(model: torch.nn.Module, images: torch.Tensor) -> dict:
    """Ratio estimated / exact batch variance of every BN input, on real activations (eval-mode forward)."""
    wrapped = wrap_model(copy.deepcopy(model), "bn", quantize_plain=False).eval()
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(id(mod), args[0]))
             for m in wrapped.modules() if isinstance(m, RepQBlock)]
    for m in wrapped.modules():
        if isinstance(m, RepQBlock):
            m.input_quantizer.enabled = m.weight_quantizer.enabled = False
    wrapped(images)
    for h in hooks:
        h.remove()
    mean_ratio, var_ratio = [], []
    for m in wrapped.modules():
        if not isinstance(m, RepQBlock):
            continue
        x = inputs[id(m)]
        x_var, x_mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        for name, tap in m.block.bn_taps().items():
            weight, bias = tap.kernel(None)
            mean, var, _ = conv_batch_stats(x, [(name, tap, weight, bias)])[name]
            est_mean, est_var = estimated_stats(x_mean, x_var, weight, bias, tap.groups)
            var_ratio += (est_var / var.clamp_min(1e-12)).tolist()
            mean_ratio += ((est_mean - mean).abs() / var.sqrt().clamp_min(1e-6)).tolist()
    var_t, mean_t = torch.tensor(var_ratio), torch.tensor(mean_ratio)
    return {"bn_channels": len(var_ratio),
            "var_ratio_median": float(var_t.median()), "var_ratio_p10": float(var_t.quantile(0.1)),
            "var_ratio_p90": float(var_t.quantile(0.9)),
            "mean_error_in_std_median": float(mean_t.median()), "mean_error_in_std_p90": float(mean_t.quantile(0.9))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="FP32 re-param checkpoint (repq train)")
    parser.add_argument("--plain-checkpoint", help="FP32 checkpoint of a plain model, for the Plain row")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"))
    parser.add_argument("--methods", default="merged,bn,bnest_corrected",
                        help=f"comma-separated, of {', '.join(FINETUNE_METHODS)}; '' for the Plain row only")
    parser.add_argument("--bits", default="8,4")
    parser.add_argument("--epochs", type=float, default=0.5)
    parser.add_argument("--steps", type=int, help="fine-tuning steps (overrides --epochs)")
    parser.add_argument("--val-images", type=int, help="evaluate on a fixed random draw of N val images only")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--lr-merged", type=float, default=None,
                        help="lr of the BN-free fused models (Merged, Plain); default lr / 10: without BN the "
                             "fused VGG collapses to chance at RepQ's lr (CIFAR RepVGG-A0 at 0.01: loss 2.32 "
                             "after 50 steps)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="fine-tuning seed (batch order, steps' first batch); "
                        "the validation split stays fixed")
    parser.add_argument("--recalibrate-bn", type=int, default=0, metavar="BATCHES",
                        help="re-estimate BN running statistics over this many batches after fine-tuning")
    parser.add_argument("--freeze-bn-at", type=float, default=None, metavar="SHARE",
                        help="recalibrate (--recalibrate-bn) and freeze BN statistics after this share of the "
                             "steps: the last steps train the deploy kernel itself")
    parser.add_argument("--distill", type=float, default=0.0, help="weight of the loss against the FP model")
    parser.add_argument("--init", choices=INIT_METHODS, default="minerror",
                        help="activation step initialisation on the first batch")
    parser.add_argument("--weight-init", choices=INIT_METHODS, default=None,
                        help="weight step initialisation (default: max from 4 bits up, MinError below)")
    parser.add_argument("--act-unsigned-below-8", action="store_true",
                        help="unsigned activations for < 8 bits (simulation; not exportable for TensorRT)")
    parser.add_argument("--float-control", action="store_true",
                        help="also fine-tune the FP model itself with the same budget (lr, epochs, distillation, "
                             "BN recalibration): what the extra training alone does, apart from quantization")
    parser.add_argument("--start-from", metavar="STATE",
                        help="one row only: load this fine-tuned state (a previous run's METHOD_wBITS.pt, same method "
                             "and bits) before fine-tuning, to extend a run with a fresh schedule; with --epochs 0, "
                             "score it as saved (after --recalibrate-bn N if given)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the row a kill interrupted from its OUT/METHOD_wBITS.state.pt (rows already "
                             "in OUT/table.json are not kept: pass --methods/--bits of the rest)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda: where fine-tuning "
                        "and evaluation run (the export and ONNX Runtime stay on the CPU)")
    parser.add_argument("--out", default="/tmp/repq_table")
    args = parser.parse_args()
    methods = [OLD_NAMES.get(m, m) for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in FINETUNE_METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r} in --methods: use {', '.join(FINETUNE_METHODS)}")
    if args.start_from and (len(methods) != 1 or "," in args.bits):
        parser.error("--start-from continues one row: pass one method in --methods and one width in --bits")
    if (args.steps == 0 or args.epochs == 0) and not args.start_from:
        parser.error("no fine-tuning steps: that scores steps set on a val batch; pass --start-from a saved row")
    try:  # the settings every row shares; a row adds its method, widths, lr and length
        config = finetune_config(label_smoothing=args.label_smoothing, distill=args.distill,
                                 recalibrate_bn=args.recalibrate_bn, freeze_bn_at=args.freeze_bn_at, init=args.init,
                                 weight_init=args.weight_init, batch_size=args.batch_size, seed=args.seed,
                                 device=args.device)
    except RepqError as error:
        parser.error(str(error))
    out = Path(args.out)
    rows = [(m, int(b)) for m in ([*methods, "plain"] if args.plain_checkpoint else methods)
            for b in args.bits.split(",")]
    for method, bits in rows:
        if _state_path(out, method, bits).exists() and not args.resume:
            parser.error(f"{_state_path(out, method, bits)} holds an interrupted fine-tune: pass --resume to "
                         "continue it, or choose another --out")

    out.mkdir(parents=True, exist_ok=True)
    data = load_data(args.data, val_size=5000, seed=0)
    train_loader, val_loader = build_loaders(data, args.batch_size, seed=args.seed)
    if args.val_images:
        val_loader = val_subset(data, args.val_images, batch_size=128)
    # --steps N: the epochs whose ceil(epochs * batches) is N (N / batches can round up past N after the product)
    epochs = math.nextafter(args.steps / len(train_loader), 0) if args.steps is not None else args.epochs
    ctx = init_distributed(args.device)
    fp_model, _ = load_model_checkpoint(args.checkpoint)
    images = next(iter(val_loader))[0][:256]
    variance = bnest_variance_report(fp_model, images)  # on the CPU, before the model moves
    fp_model = fp_model.to(ctx.device)
    fp_top1 = evaluate(copy.deepcopy(fp_model), val_loader, ctx)["top1"]
    results = {"fp32_top1": fp_top1, "checkpoint": args.checkpoint, "epochs": epochs, "lr": args.lr,
               "label_smoothing": args.label_smoothing, "init": args.init, "weight_init": args.weight_init,
               "distill": args.distill, "seed": args.seed,
               "recalibrate_bn": args.recalibrate_bn, "freeze_bn_at": args.freeze_bn_at,
               "val_images": args.val_images or 5000,
               "device": str(ctx.device), "batch_size": args.batch_size, "bnest_variance": variance, "rows": []}
    print(f"FP32 {fp_top1:.2f}%  BNEst on real activations: {results['bnest_variance']}", flush=True)
    if args.float_control:
        results["fp32_finetuned_top1"] = float_control(fp_model, train_loader, val_loader, ctx, epochs, config,
                                                       args)
        print(f"FP32 fine-tuned with the same budget (no quantizers): {results['fp32_finetuned_top1']:.2f}%",
              flush=True)
        atomic_write_json(out / "table.json", results)
    sources = dict.fromkeys(methods, fp_model)
    if args.plain_checkpoint:
        sources["plain"] = load_model_checkpoint(args.plain_checkpoint)[0].to(ctx.device)
        results["plain_fp32_top1"] = evaluate(copy.deepcopy(sources["plain"]), val_loader, ctx)["top1"]
        print(f"Plain FP32 {results['plain_fp32_top1']:.2f}%", flush=True)
    for method, source in sources.items():
        teacher = distillation_teacher(source, args.distill)  # one fused FP copy per source, not per row
        for bits in (int(b) for b in args.bits.split(",")):
            torch.manual_seed(args.seed)
            signed = not (args.act_unsigned_below_8 and bits < 8)
            lr = (args.lr_merged or args.lr / 10) if method in ("merged", "plain") else args.lr
            row_config = finetune_config(config, method="merged" if method == "plain" else method, w_bits=bits,
                                         a_bits=bits, act_unsigned=not signed, lr=lr)
            model = quantized_model(copy.deepcopy(source), row_config).to(ctx.device)
            if args.start_from:
                load_state(model, args.start_from)
            state = _state_path(out, method, bits)
            steps, top1 = finetune_and_score(model, teacher, row_config, epochs, train_loader, val_loader, ctx,
                                             state_path=state)
            row = {"method": method, "bits": bits, "act_signed": signed, "steps": steps, "lr": lr,
                   "fake_quant_top1": top1, "started_from": args.start_from}
            atomic_save(model.state_dict(), out / f"{method}_w{bits}.pt")
            state.unlink(missing_ok=True)
            if bits == 8:  # the INT8 engine itself: ORT's placement, QLinearConv kernels
                path = export_quantized(model, out / f"{method}_w8a8.ort.onnx", "onnxruntime",
                                        (1, *images.shape[1:]), dynamic_batch=True)
                row["ort_top1"] = open_engine(path, "onnxruntime").evaluate(val_loader)["top1"]
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            atomic_write_json(out / "table.json", results)
    print(markdown(results))
    atomic_write_text(out / "table.md", markdown(results))


def finetune_and_score(model, teacher, config: FinetuneConfig, epochs: float, train_loader, val_loader, ctx,
                       tag: str = "", state_path: Path | None = None) -> tuple[int, float]:
    """One row's budget: fine-tune per ``config`` for ``epochs``, recalibrate BN, then (steps taken, val top-1).
    ``epochs`` 0 (with --start-from): score the loaded state as it is, after the BN recalibration if one is asked
    for. ``state_path``: the fine-tune's resumable state, continued when the file exists (finetune)."""
    if epochs == 0:
        recalibrate_bn(model, train_loader, config.recalibrate_bn)
        return 0, evaluate(model, val_loader, ctx)["top1"]
    losses = finetune(model, train_loader, config, epochs=epochs, teacher=teacher, state_path=state_path,
                      log=lambda s: print(f"  {tag}{s}", flush=True))
    return len(losses), evaluate(model, val_loader, ctx)["top1"]


def float_control(fp_model, train_loader, val_loader, ctx, epochs: float, config: FinetuneConfig, args) -> float:
    """Val top-1 of the FP model fine-tuned exactly as the RepQ rows are, without quantizers."""
    torch.manual_seed(args.seed)
    teacher = distillation_teacher(fp_model, args.distill)
    return finetune_and_score(copy.deepcopy(fp_model), teacher, finetune_config(config, lr=args.lr), epochs,
                              train_loader, val_loader, ctx, tag="fp32 ")[1]


def load_state(model: torch.nn.Module, path: str) -> None:
    """Load a previous row's fine-tuned state (its steps count as initialised, so none is re-measured)."""
    try:
        state = load_checkpoint(path)
    except RepqError as error:  # missing or truncated
        raise SystemExit(f"cannot start from {path}: {error}") from None
    try:
        load_state_strict(model, state, path)
    except RepqError as error:  # not a state dict, or another model, method or bit width
        raise SystemExit(f"cannot start from {path}: {error}; pass the METHOD_wBITS.pt that repq_table wrote for "
                         "this checkpoint, method and bit width") from None


def _state_path(out: Path, method: str, bits: int) -> Path:
    """Where a row's fine-tune keeps its resumable state until the row is written."""
    return out / f"{method}_w{bits}.state.pt"


def markdown(results: dict) -> str:
    lines = ["| Method | 32 (FP) | 8 (fake-quant) | 8 (ORT INT8 engine) | 4 (fake-quant) |", "|---|---|---|---|---|"]
    by = {(r["method"], r["bits"]): r for r in results["rows"]}
    for method in dict.fromkeys(r["method"] for r in results["rows"]):
        r8, r4 = by.get((method, 8), {}), by.get((method, 4), {})
        fp = f"{results['plain_fp32_top1' if method == 'plain' else 'fp32_top1']:.2f}"
        cells = [f"{r8['fake_quant_top1']:.2f}" if r8 else "-", f"{r8['ort_top1']:.2f}" if "ort_top1" in r8 else "-",
                 f"{r4['fake_quant_top1']:.2f}" if r4 else "-"]
        lines.append(f"| {LABELS[method]} | {fp} | " + " | ".join(cells) + " |")
    if "fp32_finetuned_top1" in results:
        lines.append(f"\nFP32 fine-tuned with the same budget, no quantizers: {results['fp32_finetuned_top1']:.2f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
