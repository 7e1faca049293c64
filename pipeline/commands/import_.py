"""`repq import`: a checkpoint of the official RepVGG code or of timm's repvgg_* / mobileone_* as a repq checkpoint
that every stage accepts; a shell over `repq.reparam.importers.import_checkpoint`.

    repq import RepVGG-A0-train.pth --out a0.pt                    # layout, variant and classes from the keys
    repq import repvgg_a0_timm.pth --out a0.pt --model repvgg_a0 --num-classes 1000   # checks, not conversions
    repq eval a0.pt --data DIR --preset imagenet                    # an import records no preprocessing
    repq run recipes/from_checkpoint.yaml model.checkpoint=a0.pt data.source=DIR
Loads with weights_only=True; wrong layouts, variants or class counts are one-line errors and nothing is written.
A network that is not a zoo model (a YOLOv6 detector) is adapted in Python instead: repq.adapt(model).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from repq.reparam.importers import FORMATS

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("src", metavar="SRC", help="the checkpoint file (.pth/.pt; containers and module. prefixes "
                        "are unwrapped)")
    parser.add_argument("--out", required=True, help="the repq checkpoint to write")
    parser.add_argument("--format", choices=FORMATS, default=None, help="force a layout (default: from the keys)")
    parser.add_argument("--model", default=None, help="check that the weights are this zoo model (e.g. repvgg_a0)")
    parser.add_argument("--num-classes", type=int, default=None, help="check the classifier's class count")
    parser.add_argument("--cifar", action="store_true", help="build the zoo's 32x32 stem (stride 1 in the stem and "
                        "first stage; the same weights)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from repq.errors import RepqError
    from repq.pipeline.runfolder import check_not_reading, written_by_repq
    from repq.reparam.importers import import_checkpoint

    out = Path(args.out)
    if out.is_dir():
        raise RepqError(f"--out {out} is a folder: pass a file path")
    check_not_reading(out, (args.src,))
    if out.exists() and not written_by_repq(out):
        raise RepqError(f"--out {out} exists and repq did not write it: repq overwrites only its own files; move it "
                        "away or pass another --out")
    ckpt = import_checkpoint(args.src, out, format=args.format, model=args.model, num_classes=args.num_classes,
                             cifar=args.cifar)
    record = ckpt.get("imported", {})
    where = f" under {record['container']}" if record.get("container") else ""
    form = "deploy" if record.get("deploy") else "train"
    kwargs = ckpt["arch"].get("kwargs", {})
    print(f"{args.src}: {record.get('format', 'repq')} layout{where}, {form} form -> {ckpt['arch']['name']} "
          f"({kwargs.get('num_classes', '?')} classes); wrote {out}")
    return 0
