"""`repq ptq`: post-training quantization with NVIDIA's toolkit (ModelOpt), symmetric INT8 as TensorRT runs it.

    repq ptq --ckpt runs/a0/best.pt --data ../shared/datasets/cifar10 --method entropy --out runs/a0/ptq_entropy.pt
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="training checkpoint (DIR/best.pt of `repq train`)")
    parser.add_argument("--data", default="digits", help="ImageFolder tree or `digits` (calibration images)")
    parser.add_argument("--method", default="max", choices=["max", "entropy", "percentile", "mse"])
    parser.add_argument("--percentile", type=float, default=99.99, help="99.9, 99.99 or 99.999")
    parser.add_argument("--calib-images", type=int, default=512, help="size of the fixed calibration set")
    parser.add_argument("--no-fuse", action="store_true", help="quantize the unfused (training) form")
    parser.add_argument("--skip", action="append", default=[], metavar="LAYER", help="keep LAYER in float")
    parser.add_argument("--out", required=True, help="quantized model file (weights + amax)")


def run(args: argparse.Namespace) -> int:
    from repq.calibration.datasets import load_data
    from repq.calibration.loaders import calibration_loader
    from repq.pipeline.train import load_model_checkpoint, trained_split
    from repq.quant.toolkit import quantize, quantized_layers, save_quantized

    model, ckpt = load_model_checkpoint(args.ckpt)
    data = load_data(args.data, **trained_split(ckpt))
    loader = calibration_loader(data, args.calib_images)
    q = quantize(model.eval(), loader, args.method, args.percentile, fuse=not args.no_fuse, skip_layers=args.skip)
    save_quantized(q, args.out, {"data": data.describe(), "source": str(args.ckpt)})
    print(f"{len(quantized_layers(q))} layers quantized ({args.method}), saved to {args.out}")
    return 0
