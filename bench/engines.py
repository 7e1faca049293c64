"""Every engine this machine can build for one model, checked against each other and timed in one table.

    python -m bench.engines --model repvgg_a0 --batch 1 8            (or: python bench/engines.py ...)

Builds ORT FP32, ORT INT8 (repq's ORT placement), OpenVINO FP32 and INT8 (the TensorRT-placement QDQ file,
unchanged), optionally ORT's own quantize_static (--baseline), and where present TensorRT FP16/INT8 and the
PyTorch CUDA reference. All INT8 files come from one ModelOpt calibration (max) on real images. An engine that
cannot run here is listed as skipped with the library's one-line reason.

Accuracy: every engine's top-1 agreement with PyTorch FP32 on the evaluation images (and with the fake-quant
PyTorch model for INT8 engines), plus top-1 against the labels when --checkpoint gives trained weights.
Speed: engines are timed in interleaved rounds (each round times every engine once), so load from other
processes falls on all of them alike; the statistics pool all rounds. Prints one table and writes JSON.

Images: --checkpoint's own data (its preset, its held-out split); without one, --data at --image-size 32 (the
cifar preset, or digits) or 224 (the imagenet preset, which resizes: CIFAR-10 upscaled for a speed run).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from repq.errors import RepqError
from repq.reparam.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "cifar10" / "train"
GOAL_SPEEDUP = 3.5  # best INT8 engine over ORT FP32, fused RepVGG-A0, 224x224, batch 8, this CPU
PRESET_OF_SIZE = {32: "cifar", 224: "imagenet"}  # the data presets' image sizes (calibration/transforms.py)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.engines", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="repvgg_a0", help="zoo name (reparam.list_models())")
    p.add_argument("--checkpoint", help="trained weights (a full-precision repq checkpoint); default: random init")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the image draws")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=None,
                   help="32 or 224 (default: the checkpoint's, else 224)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="ImageFolder (or `digits`) for calibration and evaluation")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--eval-images", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="CPU threads per engine (0: the CPU count)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--runs", type=int, default=20, help="timed runs per engine, batch and round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--baseline", action="store_true", help="also time ORT quantize_static (uint8 activations)")
    p.add_argument("--skip", nargs="*", default=[], help="engine names to leave out")
    p.add_argument("--out", default="runs/bench-engines", help="folder for the ONNX files, engines and JSON")
    return p.parse_args(argv)


# ---------------------------------------------------------------- model and images


def model_and_data(args):
    """(float model, ImageData, model name): the checkpoint's model with the data it was made with, or the zoo
    model with seeded random weights and --data at --image-size."""
    from repq.calibration.datasets import DIGITS, data_from_record, load_data

    if args.checkpoint:
        from repq.quant.artifacts import load_artifact

        artifact = load_artifact(args.checkpoint)
        if artifact.quantized:
            raise RepqError(f"{args.checkpoint} is a quantized model ({artifact.kind}): pass the full-precision "
                            "checkpoint (`repq train`); this benchmark calibrates it itself")
        data = data_from_record(args.data, artifact.data)
        classes = artifact.data.get("classes")
        if classes and list(classes) != list(data.classes):
            raise RepqError(f"{args.checkpoint} was trained on {artifact.data.get('name')}, whose classes differ "
                            f"from {args.data}'s: pass --data {artifact.data.get('name')}")
        if args.image_size not in (None, data.preset.image_size):
            raise RepqError(f"{args.checkpoint} was trained at {data.preset.image_size}x{data.preset.image_size}, "
                            f"not {args.image_size}: pass --image-size {data.preset.image_size} or leave it out")
        return artifact.model, data, artifact.arch.get("name", args.model)

    from repq.reparam import create_model

    size = args.image_size or 224
    if size not in PRESET_OF_SIZE or (str(args.data) == DIGITS and size != 32):
        sizes = "32" if str(args.data) == DIGITS else " or ".join(map(str, PRESET_OF_SIZE))
        raise RepqError(f"{args.data} has no data preset at {size}x{size}: pass --image-size {sizes}")
    data = load_data(args.data, preset="auto" if str(args.data) == DIGITS else PRESET_OF_SIZE[size])
    torch.manual_seed(args.seed)
    return create_model(args.model, num_classes=args.num_classes), data, args.model


def ort_quantize_static(fp32: Path, out: Path, calib) -> Path:
    """ORT's own static quantization (QDQ, per-channel int8 weights, uint8 activations): the baseline."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from repq.engines.export import INPUT_NAME

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{INPUT_NAME: images.numpy()} for images, _ in calib])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


# ---------------------------------------------------------------- engines


def open_engines(files: dict, fused, batches, threads: int, out: Path, skip) -> tuple[dict, dict]:
    """({name: (engine, precision)}, {name: why skipped}) for every engine of the table that runs here."""
    from repq.engines.engine import open_engine
    from repq.engines.targets import get_target
    from repq.engines.torch_cuda import TorchCudaEngine, cuda_unavailable_reason

    cpu = {"threads": threads}
    gpu = {"batch_sizes": tuple(batches), "plan_dir": out}
    rows = [("ort-fp32", "fp32", "onnxruntime", files["fp32"], cpu),
            ("ort-int8", "int8", "onnxruntime", files["onnxruntime"], cpu)]
    if "quantize_static" in files:  # --baseline: ORT's own quantizer, and ORT on the TensorRT-placement file
        rows += [("ort-int8-quantize_static", "int8", "onnxruntime", files["quantize_static"], cpu),
                 ("ort-int8-trt-placement", "int8", "onnxruntime", files["tensorrt"], cpu)]
    rows += [("openvino-fp32", "fp32", "openvino", files["fp32"], cpu),
             ("openvino-int8", "int8", "openvino", files["tensorrt"], cpu),
             ("torch-cuda-fp16", "fp16", None, None, {"dtype": "fp16"}),
             ("torch-cuda-fp32", "fp32", None, None, {"dtype": "fp32"}),
             ("tensorrt-fp16", "fp16", "tensorrt", files["fp32"], gpu | {"precision": "fp16"}),
             ("tensorrt-int8", "int8", "tensorrt", files["tensorrt"], gpu | {"precision": "int8"})]
    engines, skipped = {}, {}
    for name, precision, target, path, options in rows:
        if name in skip:
            skipped[name] = "left out (--skip)"
            continue
        reason = cuda_unavailable_reason() if target is None else get_target(target).unavailable_reason(path)
        if reason:
            skipped[name] = reason
            print(f"skip {name}: {reason}")
            continue
        engine = TorchCudaEngine(fused, **options) if target is None else open_engine(path, target, **options)
        engines[name] = (engine, precision)
    return engines, skipped


# ---------------------------------------------------------------- accuracy


def logits_of(predict, evaluation) -> np.ndarray:
    """`predict` (float32 NCHW numpy -> logits) over the evaluation batches, concatenated."""
    return np.concatenate([np.asarray(predict(images.numpy()), dtype=np.float32) for images, _ in evaluation])


def accuracy_row(logits, precision: str, fp32, fakequant, labels) -> dict:
    """Top-1 agreement and relative L2 distance against PyTorch FP32 (and fake-quant for INT8), top-1 with
    labels when they mean something (labels None: random weights)."""
    def compare(reference, name):
        return {f"agree_{name}_top1": 100.0 * float((logits.argmax(1) == reference.argmax(1)).mean()),
                f"rel_l2_vs_{name}": float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))}

    row = compare(fp32, "fp32") | (compare(fakequant, "fakequant") if precision == "int8" else {})
    if labels is not None:
        row["top1"] = 100.0 * float((logits.argmax(1) == labels).mean())
    return row


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    from repq.calibration.loaders import calibration_loader, val_subset
    from repq.engines.export import export_fp32, export_onnx
    from repq.engines.targets import TARGETS
    from repq.engines.timing import interleaved_latency, speedup
    from repq.quant.finetune import recalibrate_bn
    from repq.quant.toolkit import deploy_copy, quantize

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = sorted(set(args.batch))

    model, data, name = model_and_data(args)
    size = data.preset.image_size
    calib = calibration_loader(data, args.calib_images, batch_size=16, seed=args.seed)
    evaluation = list(val_subset(data, args.eval_images, batch_size=16, seed=args.seed))
    if not args.checkpoint:
        # Random weights with default BN statistics predict one or two classes for every image (measured: 1-3
        # distinct top-1 classes over 16 images), so agreement between engines would mean little: the BN
        # statistics are estimated on the calibration images first.
        recalibrate_bn(model, calib, len(calib))
    model.eval()

    start = time.perf_counter()
    fused = deploy_copy(model).eval()
    quantized = quantize(model, calib, method="max")
    shape = (1, 3, size, size)
    files = {"fp32": export_fp32(fused, out / "fp32.onnx", shape, dynamic_batch=True)}
    for target in ("tensorrt", "onnxruntime"):
        path = out / f"model{TARGETS[target].suffix}"
        files[target] = export_onnx(quantized, path, target, shape, dynamic_batch=True)
    if args.baseline:
        files["quantize_static"] = ort_quantize_static(files["fp32"], out / "ort_quantize_static.onnx", calib)
    print(f"calibrated and exported in {time.perf_counter() - start:.1f}s to {out}")

    engines, skipped = open_engines(files, fused, batches, threads, out, set(args.skip))
    if not engines:
        raise RepqError("no engine could run here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))

    labels = np.concatenate([y.numpy() for _, y in evaluation]) if args.checkpoint else None
    with torch.no_grad():
        fp32_logits = logits_of(lambda x: fused(torch.from_numpy(x)).numpy(), evaluation)
        fq_logits = logits_of(lambda x: quantized(torch.from_numpy(x)).numpy(), evaluation)
    accuracy = {n: accuracy_row(logits_of(e, evaluation), p, fp32_logits, fq_logits, labels)
                for n, (e, p) in engines.items()}

    image_shape = (3, size, size)
    timers = {n: (lambda b, e=e: e.times(image_shape, b, warmup=args.warmup, runs=args.runs))
              for n, (e, _) in engines.items()}
    stats = interleaved_latency(timers, batches, args.rounds,
                                on_round=lambda i: print(f"timing round {i}/{args.rounds} done"))

    report = {
        "model": name,
        "fused": True,
        "image_size": size,
        "batches": batches,
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        "runs": args.runs,
        "eval_images": len(fp32_logits),
        "distinct_fp32_top1": int(np.unique(fp32_logits.argmax(1)).size),
        "checkpoint": args.checkpoint,
        "engines": {},
        "skipped": skipped,
    }
    for engine_name, (engine, precision) in engines.items():
        latency = {}
        for batch in batches:
            s = stats[(engine_name, batch)]
            reference = stats.get(("ort-fp32", batch))
            latency[str(batch)] = s.as_dict() | {"speedup_vs_ort_fp32": speedup(reference, s) if reference else None}
        report["engines"][engine_name] = {"precision": precision, "accuracy": accuracy[engine_name],
                                          "latency": latency, "info": engine.describe()}
    report["goal"] = goal_check(report)
    print(render_table(report))
    atomic_write_json(out / "engines.json", report)
    print(f"wrote {out / 'engines.json'}")
    return 0


def goal_check(report: dict) -> dict:
    """The best CPU INT8 engine's speed-up over ORT FP32 at batch 8 (the target for fused RepVGG-A0)."""
    candidates = {
        name: e["latency"]["8"]["speedup_vs_ort_fp32"]
        for name, e in report["engines"].items()
        if e["precision"] == "int8" and "8" in e["latency"] and not name.startswith("tensorrt")
        and e["latency"]["8"]["speedup_vs_ort_fp32"] is not None
    }
    if not candidates:
        return {"note": "no CPU INT8 engine timed at batch 8"}
    best = max(candidates, key=candidates.get)
    return {
        "best_int8_engine": best,
        "speedup_vs_ort_fp32_bs8": candidates[best],
        "target": GOAL_SPEEDUP,
        "met": candidates[best] >= GOAL_SPEEDUP,
    }


def render_table(report: dict) -> str:
    head = ("engine", "batch", "median ms", "p90 ms", "p99 ms", "FPS", "x ORT FP32", "agree FP32", "agree FQ", "top-1")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name, entry in report["engines"].items():
        acc = entry["accuracy"]
        fq = acc.get("agree_fakequant_top1")
        for batch, s in entry["latency"].items():
            ratio = s["speedup_vs_ort_fp32"]
            lines.append(" | ".join([
                name, batch, f"{s['median_ms']:.1f}", f"{s['p90_ms']:.1f}", f"{s['p99_ms']:.1f}", f"{s['fps']:.1f}",
                "-" if ratio is None else f"{ratio:.2f}x",
                f"{acc['agree_fp32_top1']:.1f}%",
                "-" if fq is None else f"{fq:.1f}%",
                f"{acc['top1']:.2f}%" if "top1" in acc else "-",
            ]))
    for name, reason in report.get("skipped", {}).items():
        lines.append(f"{name} | skipped: {reason}")
    goal = report["goal"]
    if "best_int8_engine" in goal:
        verdict = "met" if goal["met"] else "NOT met"
        lines.append(
            f"\nbest CPU INT8 engine at batch 8: {goal['best_int8_engine']} "
            f"{goal['speedup_vs_ort_fp32_bs8']:.2f}x ORT FP32 (target {goal['target']}x: {verdict})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RepqError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
