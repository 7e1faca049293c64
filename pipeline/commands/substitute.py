"""`repq substitute`: RepVGG blocks -> QARepVGG blocks (QARepVGG paper), then training with plain L2 (its M1);
a shell over `repq.training.train.substitute`.

    repq substitute --checkpoint runs/digits/best.pt --out runs/digits_qa --epochs 6
The 3x3 conv + BN and the 1x1 conv weights are carried over; the identity and the post-BN start fresh, so a few
epochs of training follow (the same loop, checkpoints and torchrun support as `repq train`).
"""

from __future__ import annotations

import argparse

from repq.pipeline.flags import add_config_flags, add_folder_command, config_from_args, epoch_resume_hint
from repq.training.config import SubstituteConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_folder_command(parser, __doc__, source=("--checkpoint", "RepVGG training checkpoint (DIR/best.pt of repq "
                                                "train)"), out="run folder: metrics.jsonl, last.pt, best.pt")
    add_config_flags(parser, SubstituteConfig, title="substitution settings (SubstituteConfig)")


resume_hint = epoch_resume_hint


def run(args: argparse.Namespace) -> int:
    from repq.pipeline.runfolder import TRAINING_OUTPUT, command_output
    from repq.training.train import substitute

    config = config_from_args(args, SubstituteConfig)
    with command_output(args.out, "repq substitute", known=TRAINING_OUTPUT, reads=(args.checkpoint, args.data)):
        summary = substitute(args.checkpoint, args.data, config, args.out, resume=args.resume)
    if summary.get("rank", 0) == 0:
        best = summary["best"]
        print(f"QARepVGG: best val top-1 {best['val_top1']:.2f}% (deploy form {best['deploy_val_top1']:.2f}%); "
              f"checkpoints in {args.out}")
    return 0
