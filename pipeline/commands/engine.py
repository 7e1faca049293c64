"""`repq engine`: build one engine of the table from an ONNX file, score it on the engine itself, time it; a shell
over `repq.quant.artifacts.measure_engine`.

    repq engine runs/a0/export/model.ort.onnx --data ../shared/datasets/cifar10 --batches 1 8
    repq engine --target openvino runs/a0/export/model.trt.onnx --data digits
    repq engine --target tensorrt runs/a0/export/model.trt.onnx --data digits --batches 1 32   # writes
        model.trt.int8.plan beside the ONNX file, with its build log and per-layer precisions
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from repq.engines.targets import TARGETS, targets_help

    parser.add_argument("file", nargs="?", metavar="FILE", help="FP32 or QDQ ONNX file (a .plan for tensorrt)")
    parser.add_argument("--onnx", default=None, help=argparse.SUPPRESS)  # the older spelling of FILE
    parser.add_argument("--target", default="onnxruntime", choices=list(TARGETS), help=targets_help())
    parser.add_argument("--data", default=None, help="ImageFolder tree or `digits`: accuracy on the images "
                        "`repq eval` scores (the file's own val split on the data it was made with)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8],
                        help="batch sizes to time (tensorrt: also its optimization profile)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per batch size (after warm-up)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="CPU engines: threads (default: CPU count)")
    parser.add_argument("--precision", default=None,
                        help="tensorrt: int8 or fp16 (default: int8 for a QDQ file, fp16 for a float file)")
    parser.add_argument("--workspace-gb", type=float, default=None, help="tensorrt: builder workspace (GiB)")
    parser.add_argument("--json", default=None, help="also write the results to this file")


def run(args: argparse.Namespace) -> int:
    from repq.engines.targets import get_target
    from repq.errors import RepqError
    from repq.quant.artifacts import measure_engine
    from repq.reparam.io import atomic_write_json

    path = args.file or args.onnx
    if path is None:
        raise RepqError("repq engine needs the file to run: repq engine FILE.onnx [--target NAME] [--data DIR]")
    if args.json:
        from repq.pipeline.runfolder import check_output_file

        check_output_file(args.json, "--json", reads=(path, args.data))
    row = get_target(args.target)
    options = row.select(threads=args.threads, precision=args.precision, workspace_gb=args.workspace_gb,
                         batch_sizes=tuple(sorted(set(args.batches))))
    result = measure_engine(path, row.name, args.data, time_batches=args.batches, warmup=args.warmup,
                            runs=args.runs, **options)
    if args.json:
        atomic_write_json(args.json, result)
    print(json.dumps(result, indent=2))
    return 0
