"""`repq qat`: fine-tune a `repq ptq` model with its fake quantizers (the toolkit's QAT: Plain / Merged
baselines); a shell over `repq.quant.qat.qat_file`, with one flag per `QATConfig` setting.

    repq qat --quantized runs/a0/ptq_max.pt --data ../shared/datasets/cifar10 --epochs 3 --lr 1e-3 --out runs/a0/qat
    torchrun --nproc_per_node 2 -m repq qat ...          # DDP, as `repq train`
"""

from __future__ import annotations

import argparse

from repq.pipeline.flags import add_config_flags, add_folder_command, config_from_args, epoch_resume_hint
from repq.quant.config import QATConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_folder_command(parser, __doc__, source=("--quantized", "output of `repq ptq`"),
                       out="run folder: last.pt, best.pt, metrics.jsonl",
                       data="ImageFolder tree or `digits` (read with the split the quantized file records)")
    add_config_flags(parser, QATConfig, title="QAT settings (QATConfig)")


resume_hint = epoch_resume_hint


def run(args: argparse.Namespace) -> int:
    from repq.pipeline.runfolder import TRAINING_OUTPUT, command_output
    from repq.quant.qat import qat_file

    config = config_from_args(args, QATConfig)
    with command_output(args.out, "repq qat", known=TRAINING_OUTPUT, reads=(args.quantized, args.data)):
        result = qat_file(args.quantized, args.data, config, args.out, resume=args.resume)
    print(f"QAT done: best val {result['best']:.2f}, checkpoints in {args.out}")
    return 0
