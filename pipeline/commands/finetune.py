"""`repq finetune`: RepQ fine-tuning of a trained re-param model (stage 4), a shell over
`repq.quant.finetune.finetune_checkpoint`; every fine-tuning flag comes from `FinetuneConfig`.

    repq finetune --checkpoint runs/cifar/best.pt --data ../shared/datasets/cifar10 --out DIR
    repq finetune ... --method merged          # the paper's Merged baseline: fuse first, then LSQ QAT
    repq finetune ... --start-from DIR/repq.pt --out DIR2   # extend a fine-tune with a fresh schedule
    repq finetune ... --resume                 # continue one a kill interrupted (DIR/finetune_state.pt)
"""

from __future__ import annotations

import argparse

from repq.pipeline.flags import add_config_flags, add_folder_command, config_from_args
from repq.quant.config import FinetuneConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_folder_command(parser, __doc__, source=("--checkpoint", "full-precision checkpoint from `repq train`"),
                       out="output folder: repq.pt, metrics.json, model_int8.onnx",
                       resume="continue the fine-tune a kill interrupted, from OUT/finetune_state.pt")
    parser.add_argument("--val-size", type=float, default=None,
                        help="val split carved from train (count or fraction; default: the checkpoint's training "
                             "split, so the model is scored on images it never trained on)")
    parser.add_argument("--split-seed", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--start-from", metavar="REPQ_PT",
                        help="continue a previous fine-tune of this checkpoint (its DIR/repq.pt, same --method, "
                             "bit widths and --act-unsigned) with a fresh schedule: learned steps are kept")
    parser.add_argument("--no-export", action="store_true", help="skip the ONNX export and ORT evaluation")
    add_config_flags(parser, FinetuneConfig, title="fine-tuning settings (FinetuneConfig)")


def resume_hint(args: argparse.Namespace, argv: list[str]) -> tuple[str, list[str]]:
    from repq.pipeline.runfolder import resume_hint as hint
    from repq.quant.finetune import STATE_NAME

    return hint(args.out, STATE_NAME, "the fine-tune's state at its last save", argv)


def run(args: argparse.Namespace) -> int:
    from repq.pipeline.runfolder import FINETUNE_OUTPUT, command_output
    from repq.quant.finetune import finetune_checkpoint

    config = config_from_args(args, FinetuneConfig)
    with command_output(args.out, "repq finetune", known=FINETUNE_OUTPUT,
                        reads=(args.checkpoint, args.data, args.start_from)):
        data = args.data
        if args.val_size is not None or args.split_seed is not None:
            data = _data_with_split(args)
        finetune_checkpoint(args.checkpoint, data, config, args.out, resume=args.resume,
                            start_from=args.start_from, export=not args.no_export)
    return 0


def _data_with_split(args: argparse.Namespace):
    from repq.calibration.datasets import load_data
    from repq.reparam.io import load_checkpoint
    from repq.training.train import trained_split

    split = trained_split(load_checkpoint(args.checkpoint))
    return load_data(args.data, val_size=split["val_size"] if args.val_size is None else args.val_size,
                     seed=split["seed"] if args.split_seed is None else args.split_seed)
