"""`repq export`: QDQ ONNX of a quantized model, one Q/DQ placement per engine target (`engines/targets.py`).

    repq export --quantized runs/a0/ptq_max.pt --target onnxruntime --out runs/a0/model.ort.onnx
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from repq.engines.targets import TARGETS

    parser.add_argument("--quantized", required=True, help="output of `repq ptq` or `repq qat` (last.pt/best.pt)")
    parser.add_argument("--target", default="onnxruntime", choices=sorted(TARGETS))
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the calibration data's)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--static-batch", type=int, default=None, help="fixed batch size (default: dynamic)")
    parser.add_argument("--out", default=None, help="ONNX file (default: next to --quantized, target suffix)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from repq.engines.export import export_onnx
    from repq.engines.targets import get_target
    from repq.quant.toolkit import load_quantized
    from repq.reparam.io import load_checkpoint

    extra = load_checkpoint(args.quantized).get("extra", {})
    size = args.image_size or extra.get("data", {}).get("image_size") or 224
    model = load_quantized(args.quantized)
    out = Path(args.out) if args.out else Path(args.quantized).with_suffix(get_target(args.target).suffix)
    shape = (args.static_batch or 1, 3, size, size)
    export_onnx(model, out, args.target, shape, opset=args.opset, dynamic_batch=args.static_batch is None)
    batch = "N" if args.static_batch is None else shape[0]
    print(f"wrote {out} ({args.target} placement, input {batch}x3x{size}x{size})")
    return 0
