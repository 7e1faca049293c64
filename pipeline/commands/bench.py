"""`repq bench`: latency (median, p90) and throughput of ONNX files on the engines of the table, one table; a
shell over `repq.engines.engine.bench_files`.

    repq bench runs/default/export/*.onnx --engine onnxruntime openvino --batches 1 8
    repq bench runs/default/export/*_fp32.onnx runs/default/export/*.trt.onnx --engine tensorrt --batches 1 32

An engine that cannot run a file here (not installed, no GPU, OpenVINO's INT8 kernels inexact on this CPU) is
listed as skipped with the reason. For every engine this machine can build from one model, checked against
each other, see bench/engines.py.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from repq.engines.targets import TARGETS, targets_help

    parser.add_argument("onnx", nargs="+", help="ONNX files (FP32 or QDQ; .plan files for tensorrt)")
    parser.add_argument("--engine", nargs="+", default=["onnxruntime"], choices=list(TARGETS), help=targets_help())
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--image-size", type=int, default=None, help="for a file without a fixed size (default 224)")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="CPU engines: threads (default: CPU count)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    from repq.engines.engine import bench_files
    from repq.errors import RepqError

    rows, skipped = bench_files(args.onnx, args.engine, args.batches, image_size=args.image_size,
                                warmup=args.warmup, runs=args.runs, threads=args.threads)
    for skip in skipped:
        print(f"skip {skip['engine']} on {skip['file']}: {skip['reason']}", file=sys.stderr)
    if not rows:
        raise RepqError(f"no engine could run here: {skipped[0]['engine']} on {skipped[0]['file']}: "
                        f"{skipped[0]['reason']}")
    if args.json:
        print(json.dumps({"results": rows, "skipped": skipped}, indent=2))
        return 0
    print(f"{'file':50s} {'engine':12s} {'batch':>5s} {'median ms':>10s} {'p90 ms':>8s} {'img/s':>8s}")
    for r in rows:
        print(f"{r['file'][-50:]:50s} {r['engine']:12s} {r['batch_size']:5d} {r['median_ms']:10.2f} "
              f"{r['p90_ms']:8.2f} {r['fps']:8.1f}")
    return 0
