"""`repq export`: the ONNX file of any model repq wrote, for one engine target (`engines/targets.py`): a QDQ
file in the target's Q/DQ placement for a quantized model (PTQ, QAT or RepQ), the float graph otherwise; a shell
over `repq.quant.artifacts.export_artifact`.

    repq export --quantized runs/a0/ptq_max.pt --target onnxruntime --out runs/a0/model.ort.onnx
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from repq.engines.config import ExportConfig
    from repq.engines.targets import TARGETS
    from repq.pipeline.flags import add_config_flags

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--quantized", "--model", dest="quantized", required=True,
                        help="a model file: `repq ptq`/`repq qat` output, a fine-tune's repq.pt, or a checkpoint")
    parser.add_argument("--target", default="onnxruntime", choices=list(TARGETS),
                        help="; ".join(f"{t.name}: {t.description}" for t in TARGETS.values()))
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the model's data's)")
    parser.add_argument("--out", default=None, help="ONNX file (default: next to the model, target suffix)")
    add_config_flags(parser, ExportConfig, exclude=("targets",), title="export settings (ExportConfig)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from repq.engines.config import ExportConfig
    from repq.engines.targets import get_target
    from repq.pipeline.flags import config_from_args
    from repq.pipeline.runfolder import check_output_file
    from repq.quant.artifacts import export_artifact, input_shape, load_artifact

    config = config_from_args(args, ExportConfig)
    if args.out:
        check_output_file(args.out, reads=(args.quantized,))
    artifact = load_artifact(args.quantized)
    suffix = get_target(args.target).suffix if artifact.quantized else ".fp32.onnx"
    out = Path(args.out) if args.out else Path(args.quantized).with_suffix(suffix)
    check_output_file(out, reads=(args.quantized,))
    export_artifact(artifact, out, args.target, opset=config.opset, dynamic_batch=config.dynamic_batch,
                    image_size=args.image_size)
    shape = input_shape(artifact.model, artifact.data, args.image_size)
    batch = "N" if config.dynamic_batch else "1"
    print(f"wrote {out} ({args.target} placement, input {batch}x{'x'.join(map(str, shape[1:]))})")
    return 0
