"""`repq train`: full-precision training of a re-param model (stage 1), resumable, torchrun-ready.

    repq train --out runs/digits                                  # embedded digits, default model
    repq train --data ../shared/datasets/cifar10 --model repvgg_a0 --width-mult 0.25 --epochs 30 --out DIR
    repq train --model ecbsr_m4c8 --data ../shared/datasets/sr/BSD68 --val-data ../shared/datasets/sr/Set5 \
        --scale 2 --optimizer adamw --lr 5e-4 --weight-decay 0 --label-smoothing 0 --out DIR   # super-resolution
    torchrun --nproc_per_node 2 -m pipeline.cli train ... --out DIR        # DDP: gloo on CPUs, NCCL on GPUs
"""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from repq.errors import RepqError

# With neither --model nor --width-mult, train this quick CPU-friendly model (RepVGG-A0 at a quarter width).
DEFAULT_MODEL, DEFAULT_WIDTH = "repvgg_a0", 0.25

# CLI flag -> TrainSettings field, for the settings a user changes most; --set KEY=VALUE reaches the rest.
FLAGS = {
    "model": str, "width_mult": float, "epochs": int, "batch_size": int, "optimizer": str, "lr": float,
    "weight_decay": float, "l2": str, "label_smoothing": float, "warmup_epochs": float, "precision": str,
    "device": str, "seed": int, "preset": str, "val_size": float, "num_workers": int,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="digits", help="ImageFolder tree (train/ [val/]) or `digits`")
    parser.add_argument("--out", required=True, help="run folder: metrics.jsonl, last.pt, best.pt")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--config", help="YAML or JSON file of training settings (flags override it)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any training setting, e.g. --set nesterov=false (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no per-step progress bar")
    parser.add_argument("--val-data", help="super-resolution models: folder of validation images (e.g. Set5); "
                        "default: a tenth of --data held out")
    parser.add_argument("--scale", type=int, default=2, choices=(2, 3, 4), help="super-resolution factor")
    helps = {"model": f"zoo model (`repq models`); default {DEFAULT_MODEL} at width {DEFAULT_WIDTH}",
             "width_mult": "channel width multiplier (default: the model's own)"}
    for name, kind in FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                            help=helps.get(name, f"training setting {name} (see TrainSettings)"))


def settings_from_args(args: argparse.Namespace):
    from repq.pipeline.recipe import parse_value
    from repq.pipeline.train import TrainSettings

    values: dict = _read_config(args.config) if args.config else {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise RepqError(f"--set {item!r} is not KEY=VALUE: write e.g. --set nesterov=false")
        values[key.strip()] = parse_value(raw.strip())
    values.update({k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None})
    if "model" not in values and "width_mult" not in values:
        values.update(model=DEFAULT_MODEL, width_mult=DEFAULT_WIDTH)
    if args.no_progress:
        values["progress"] = False
    try:
        return TrainSettings(**values)
    except ValidationError as err:
        raise RepqError(_one_line(err, TrainSettings)) from None


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


def _one_line(err: ValidationError, model) -> str:
    import difflib

    from repq.pipeline.recipe import error_detail

    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, model.model_fields, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(model.model_fields)}"
        return f"unknown training setting {key!r}: {hint}"
    where = f"training setting {key}" if key else "training settings"
    return f"{where}: {error_detail(first)}"


def run(args: argparse.Namespace) -> int:
    from repq.engines.timing import quality_key
    from repq.pipeline.train import train
    from repq.reparam import is_super_resolution

    settings = settings_from_args(args)
    data = args.data
    if is_super_resolution(settings.model):
        from repq.calibration.sr import load_sr_data

        data = load_sr_data(args.data, args.val_data, args.scale, seed=settings.split_seed)
    summary = train(settings, data, args.out, resume=args.resume)
    best = summary["best"]
    if best and summary["rank"] == 0:
        key = quality_key(best)
        unit = " dB" if key == "psnr" else "%"
        print(f"best val {key} {best[f'val_{key}']:.2f}{unit} at epoch {best['epoch']} "
              f"(deploy form {best[f'deploy_val_{key}']:.2f}{unit}); checkpoints in {summary['out_dir']}")
    return 0
