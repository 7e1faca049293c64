"""`repq engine`: run an ONNX file on ONNX Runtime (CPU): top-1/top-5 on the engine itself, latency and FPS.

    repq engine --onnx runs/a0/model.ort.onnx --data ../shared/datasets/cifar10 --batches 1 8
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx", required=True, help="FP32 or QDQ ONNX file")
    parser.add_argument("--data", default=None, help="ImageFolder tree or `digits`: accuracy on its val split")
    parser.add_argument("--val-size", type=float, default=5000, help="val split carved from train/ (count or fraction)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes to time")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per batch size (after warm-up)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: CPU count)")
    parser.add_argument("--json", default=None, help="also write the results to this file")


def run(args: argparse.Namespace) -> int:
    from repq.engines.onnxruntime import OrtEngine
    from repq.reparam.io import atomic_write_json

    engine = OrtEngine(args.onnx, threads=args.threads)
    result = {"engine": engine.describe()}
    size = engine.input_shape[-1] if engine.input_shape[-1] > 0 else 224
    if args.data:
        from repq.calibration.datasets import load_data
        from repq.calibration.loaders import build_loaders

        data = load_data(args.data, val_size=args.val_size, seed=0)
        size = data.preset.image_size
        _, val = build_loaders(data, 128, eval_batch_size=256)
        result["accuracy"] = engine.evaluate(val)
    result["latency"] = [s.as_dict() for s in engine.benchmark((3, size, size), args.batches, warmup=args.warmup,
                                                               runs=args.runs)]
    if args.json:
        atomic_write_json(args.json, result)
    print(json.dumps(result, indent=2))
    return 0
