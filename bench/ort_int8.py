"""ONNX Runtime INT8 benchmark: speed of the fused RepVGG-A0 and accuracy of trained CIFAR models, on the engine.

    python bench/ort_int8.py speed [--model repvgg_a0 --size 224 --batch 8]
    python bench/ort_int8.py accuracy --ckpt runs/repvgg/best.pt --ckpt runs/qarepvgg/best.pt [--qat-epochs 1]

`speed` times three ONNX Runtime engines of the same fused model in one process, interleaved round by round so
that load from other processes hits all of them alike: FP32, repq's INT8 (ModelOpt calibration, ORT placement)
and ORT's own `quantize_static` (QDQ, per-channel, symmetric int8) calibrated on the same images.
`accuracy` builds, per checkpoint, FP32 / PTQ with each calibrator / quantize_static (/ QAT) engines and reports
top-1 on the validation split (5,000 images, seed 0) measured on each engine. Results go to --out as JSON and a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from repq.calibration.datasets import load_data
from repq.calibration.loaders import build_loaders, calibration_loader, val_subset
from repq.engines.engine import open_engine
from repq.engines.export import INPUT_NAME, export_fp32, export_onnx
from repq.engines.onnxruntime import optimized_op_types
from repq.engines.timing import interleaved_latency, speedup
from repq.quant.qat import qat
from repq.quant.toolkit import deploy_copy, quantize
from repq.reparam import create_model
from repq.training.train import load_model_checkpoint

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"


def calibration_batches(data, num_images: int, size: int | None, batch: int = 64) -> list:
    """The fixed calibration set of repq.calibration (seed 0), resized to `size` when given (the speed run
    calibrates a 224-pixel model on CIFAR's 32-pixel images)."""
    batches = calibration_loader(str(data) if isinstance(data, Path) else data, num_images, batch, seed=0)
    if size is None:
        return list(batches)
    return [(torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
             if x.shape[-1] != size else x, y) for x, y in batches]


def ort_quantize_static(fp32_path: Path, out_path: Path, batches) -> Path:
    """ORT's own static quantization: QDQ, per-channel weights, symmetric int8 activations and weights."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{INPUT_NAME: x.numpy()} for x, _ in batches])

        def get_next(self):
            return next(self.items, None)

    prepared = out_path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return out_path


def build_files(model, batches, out: Path, shape, method: str = "max", percentile: float = 99.99) -> dict:
    """FP32, repq INT8 (ORT placement) and quantize_static files of the fused `model`."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"fp32": out / "fp32.onnx", "repq_int8": out / f"repq_{method}.ort.onnx",
             "ort_quantize_static": out / "quantize_static.onnx"}
    export_fp32(deploy_copy(model).eval(), files["fp32"], shape, dynamic_batch=True)
    start = time.perf_counter()
    q = quantize(model, batches, method, percentile)
    export_onnx(q, files["repq_int8"], "onnxruntime", shape, dynamic_batch=True)
    print(f"  repq PTQ ({method}) + export: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    start = time.perf_counter()
    ort_quantize_static(files["fp32"], files["ort_quantize_static"], batches)
    print(f"  ORT quantize_static: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return files


def run_speed(args) -> dict:
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=1000).eval()
    shape = (1, 3, args.size, args.size)
    batches = calibration_batches(args.data, args.calib_images, args.size, batch=16)
    files = build_files(model, batches, Path(args.out) / f"{args.model}_{args.size}", shape)
    engines = {name: open_engine(path, "onnxruntime", threads=args.threads) for name, path in files.items()}
    result = {"model": f"{args.model} fused, {args.size}x{args.size}",
              "threads": engines["fp32"].describe()["threads"],
              "ops": {name: dict(optimized_op_types(path)) for name, path in files.items()}, "batches": {}}
    per_round = -(-args.runs // args.rounds)  # `runs` timed runs per engine and batch, over interleaved rounds
    timers = {name: lambda batch, e=engine: e.times(shape[1:], batch, warmup=3, runs=per_round)
              for name, engine in engines.items()}
    stats = interleaved_latency(timers, args.batches, args.rounds)
    for batch in args.batches:
        fp32 = stats[("fp32", batch)]
        result["batches"][batch] = {name: {**stats[(name, batch)].as_dict(),
                                           "speedup_vs_fp32": speedup(fp32, stats[(name, batch)])}
                                    for name in engines}
        for name in engines:
            s = stats[(name, batch)]
            print(f"  batch {batch} {name:>20}: median {s.median_ms:8.2f} ms, p90 {s.p90_ms:8.2f} ms, "
                  f"{s.fps:7.1f} img/s, x{speedup(fp32, s):.2f} vs FP32", file=sys.stderr)
    return result


def evaluate(path: Path, val_loader, threads) -> float:
    return open_engine(path, "onnxruntime", threads=threads).evaluate(val_loader)["top1"]


def run_accuracy(args) -> dict:
    data = load_data(str(args.data), val_size=5000, seed=0)
    # decoded once, scored on every engine: the whole split, or a fixed random draw of --val-images
    if args.val_images:
        val = list(val_subset(data, args.val_images, 250))
    else:
        val = list(build_loaders(data, 64, eval_batch_size=250)[1])
    batches = calibration_batches(data, args.calib_images, None)
    rows = {}
    for ckpt in args.ckpt:
        model, _ = load_model_checkpoint(ckpt)
        model.eval()
        name = f"{model.repq_arch['name']} ({Path(ckpt).parent.name})"
        shape = data.input_shape
        out = Path(args.out) / Path(ckpt).parent.name
        print(f"{name}:", file=sys.stderr)
        files = build_files(model, batches, out, shape, "max")
        row = {"fp32": evaluate(files["fp32"], val, args.threads),
               "ort_quantize_static": evaluate(files["ort_quantize_static"], val, args.threads)}
        for method in args.calibrators:
            label = f"ptq_{method}" + (f"_{args.percentile}" if method == "percentile" else "")
            q = quantize(model, batches, method, args.percentile)
            path = export_onnx(q, out / f"{label}.ort.onnx", "onnxruntime", shape, dynamic_batch=True)
            row[label] = evaluate(path, val, args.threads)
            print(f"  {label}: {row[label]:.2f}", file=sys.stderr)
        if args.qat_epochs:
            q = quantize(model, batches, args.qat_calibrator, args.percentile)
            q = qat(q, data, out / "qat", epochs=args.qat_epochs, lr=args.qat_lr, batch_size=128,
                    max_steps_per_epoch=args.qat_steps)["model"]
            path = export_onnx(q, out / "qat.ort.onnx", "onnxruntime", shape, dynamic_batch=True)
            row[f"qat_{args.qat_epochs}ep"] = evaluate(path, val, args.threads)
        rows[name] = row
        print(f"  {json.dumps(row)}", file=sys.stderr)
    return {"val_images": sum(len(y) for _, y in val), "rows": rows}


def markdown(result: dict) -> str:
    lines = []
    if "speed" in result:
        speed = result["speed"]
        lines += [f"### Speed: {speed['model']}, ONNX Runtime CPU, {speed['threads']} threads", "",
                  "| batch | engine | median ms | p90 ms | img/s | x FP32 |", "|---|---|---|---|---|---|"]
        for batch, engines in speed["batches"].items():
            for name, s in engines.items():
                lines.append(f"| {batch} | {name} | {s['median_ms']:.2f} | {s['p90_ms']:.2f} | {s['fps']:.1f} | "
                             f"{s['speedup_vs_fp32']:.2f} |")
        lines.append("")
    if "accuracy" in result:
        rows = result["accuracy"]["rows"]
        columns = sorted({c for r in rows.values() for c in r}, key=lambda c: (c != "fp32", c))
        lines += [f"### Top-1 on the engine ({result['accuracy']['val_images']} validation images)", "",
                  "| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for name, row in rows.items():
            lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" if c in row else "-" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["speed", "accuracy", "all"])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default="runs/bench_ort_int8")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--calib-images", type=int, default=512)
    parser.add_argument("--model", default="repvgg_a0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ckpt", action="append", default=[])
    parser.add_argument("--calibrators", nargs="+", default=["max", "entropy", "percentile", "mse"])
    parser.add_argument("--percentile", type=float, default=99.99)
    parser.add_argument("--val-images", type=int, default=None, help="a fixed random draw of this many val images")
    parser.add_argument("--qat-epochs", type=int, default=0)
    parser.add_argument("--qat-lr", type=float, default=1e-3)
    parser.add_argument("--qat-steps", type=int, default=None)
    parser.add_argument("--qat-calibrator", default="max")
    args = parser.parse_args(argv)
    result = {}
    if args.what in ("speed", "all"):
        result["speed"] = run_speed(args)
    if args.what in ("accuracy", "all"):
        result["accuracy"] = run_accuracy(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.what}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{args.what}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
