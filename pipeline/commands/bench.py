"""`repq bench`: latency (median, p90) and throughput of ONNX files on the CPU engines, one table.

    repq bench runs/default/export/*.onnx --engine onnxruntime openvino --batches 1 8
For every engine this machine can build at once (TensorRT and PyTorch CUDA too), see bench/engines.py.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("onnx", nargs="+", help="ONNX files (FP32 or QDQ)")
    parser.add_argument("--engine", nargs="+", default=["onnxruntime"], choices=["onnxruntime", "openvino"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--image-size", type=int, default=None, help="default: the file's input size, else 224")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    from repq.pipeline.run_stages import open_engine

    rows = []
    for path in args.onnx:
        for engine_name in args.engine:
            engine = open_engine(path, engine_name, args.threads)
            size = args.image_size or (engine.input_shape[-1] if engine.input_shape[-1] > 0 else 224)
            for stats in engine.benchmark((3, size, size), args.batches, warmup=args.warmup, runs=args.runs):
                rows.append({"file": str(path), "engine": engine_name, **stats.as_dict()})
    if args.json:
        print(json.dumps({"results": rows}, indent=2))
        return 0
    print(f"{'file':50s} {'engine':12s} {'batch':>5s} {'median ms':>10s} {'p90 ms':>8s} {'img/s':>8s}")
    for r in rows:
        print(f"{r['file'][-50:]:50s} {r['engine']:12s} {r['batch_size']:5d} {r['median_ms']:10.2f} "
              f"{r['p90_ms']:8.2f} {r['fps']:8.1f}")
    return 0
