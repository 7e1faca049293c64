"""`repq models`: list the zoo, or check that a model fuses exactly and time both forms."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--check", metavar="NAME", help="build NAME, move its BN statistics, and compare the "
                        "train form with the fused deploy form (output error, parameters, CPU latency)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--width-mult", type=float, default=None, help="width multiplier (RepVGG/QARepVGG only)")
    parser.add_argument("--runs", type=int, default=20, help="timed forwards per form (median reported)")


def run(args: argparse.Namespace) -> int:
    from repq.engines.fuse_check import check_fuse
    from repq.reparam import list_models, model_doc

    if not args.check:
        for name in list_models():
            print(f"{name:18s} {model_doc(name)}")
        return 0
    report = check_fuse(args.check, args.num_classes, args.image_size, args.width_mult, args.runs)
    for key, value in report.items():
        print(f"{key:24s} {value}")
    return 0
