"""`repq ptq`: post-training quantization with NVIDIA's toolkit (ModelOpt), symmetric INT8 as TensorRT runs it;
a shell over `repq.quant.toolkit.ptq_checkpoint`, with one flag per `PTQConfig` setting.

    repq ptq --ckpt runs/a0/best.pt --data ../shared/datasets/cifar10 --method entropy --out runs/a0/ptq_entropy.pt
"""

from __future__ import annotations

import argparse

from repq.pipeline.flags import add_config_flags, config_from_args
from repq.quant.config import PTQConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--ckpt", "--checkpoint", dest="ckpt", required=True,
                        help="training checkpoint (DIR/best.pt of `repq train`)")
    parser.add_argument("--data", default="digits", help="ImageFolder tree or `digits` (calibration images)")
    parser.add_argument("--out", required=True, help="quantized model file (weights + amax)")
    add_config_flags(parser, PTQConfig, title="PTQ settings (PTQConfig)",
                     aliases={"calib_size": ("--calib-images",), "skip_layers": ("--skip",)})


def run(args: argparse.Namespace) -> int:
    from repq.pipeline.runfolder import check_output_file
    from repq.quant.toolkit import ptq_checkpoint

    check_output_file(args.out, reads=(args.ckpt, args.data))
    result = ptq_checkpoint(args.ckpt, args.data, config_from_args(args, PTQConfig), args.out)
    print(f"saved to {result['file']}")
    return 0
