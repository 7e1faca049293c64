"""`repq train`: full-precision training of a re-param model (stage 1), resumable, torchrun-ready; a shell over
`repq.training.train.train`, with one flag per `TrainConfig` setting.

    repq train --out runs/digits                                  # embedded digits, RepVGG-A0
    repq train --data ../shared/datasets/cifar10 --model repvgg_a0 --width-mult 0.25 --epochs 30 --out DIR
    repq train --model resnet18 --convert acb --out DIR           # a torchvision CNN, re-parametrized
    repq train --model ecbsr_m4c8 --data ../shared/datasets/sr/BSD68 --val-data ../shared/datasets/sr/Set5 \\
        --scale 2 --optimizer adamw --lr 5e-4 --weight-decay 0 --label-smoothing 0 --out DIR   # super-resolution
    torchrun --nproc_per_node 2 -m repq train ... --out DIR       # DDP: gloo on CPUs, NCCL on GPUs
"""

from __future__ import annotations

import argparse

from repq.errors import RepqError
from repq.pipeline.flags import add_config_flags, add_folder_command, config_from_args, epoch_resume_hint
from repq.training.config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_folder_command(parser, __doc__, out="run folder: metrics.jsonl, last.pt, best.pt")
    parser.add_argument("--config", help="YAML or JSON file of training settings (flags override it)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any training setting by its name, e.g. --set nesterov=false (repeatable)")
    parser.add_argument("--val-data", help="super-resolution models: folder of validation images (e.g. Set5); "
                        "default: a tenth of --data held out")
    parser.add_argument("--scale", type=int, default=2, choices=(2, 3, 4), help="super-resolution factor")
    add_config_flags(parser, TrainConfig, title="training settings (TrainConfig)")


def settings_from_args(args: argparse.Namespace) -> TrainConfig:
    from repq.pipeline.recipe import parse_value

    values: dict = _read_config(args.config) if args.config else {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise RepqError(f"--set {item!r} is not KEY=VALUE: write e.g. --set nesterov=false")
        values[key.strip()] = parse_value(raw.strip())
    return config_from_args(args, TrainConfig, base=values, what="training setting")


def _read_config(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as err:
        raise RepqError(f"cannot read training settings {path} ({err}): pass a YAML or JSON file") from err
    if not isinstance(values, dict):
        raise RepqError(f"{path} holds a {type(values).__name__}, not a mapping of training settings")
    return values.get("train", values)  # a whole recipe file works too


resume_hint = epoch_resume_hint


def run(args: argparse.Namespace) -> int:
    from repq.engines.timing import quality_key
    from repq.pipeline.runfolder import TRAINING_OUTPUT, command_output
    from repq.reparam import is_super_resolution
    from repq.training.train import train

    settings = settings_from_args(args)
    data = args.data
    if is_super_resolution(settings.model):
        from repq.calibration.sr import load_sr_data

        data = load_sr_data(args.data, args.val_data, args.scale, seed=settings.split_seed)
    with command_output(args.out, "repq train", known=TRAINING_OUTPUT, reads=(args.data, args.val_data, args.config)):
        summary = train(settings, data, args.out, resume=args.resume)
    best = summary["best"]
    if best and summary["rank"] == 0:
        key = quality_key(best)
        unit = " dB" if key == "psnr" else "%"
        print(f"best val {key} {best[f'val_{key}']:.2f}{unit} at epoch {best['epoch']} "
              f"(deploy form {best[f'deploy_val_{key}']:.2f}{unit}); checkpoints in {summary['out_dir']}")
    return 0
