"""`repq doctor`: why a model loses accuracy in INT8, layer by layer and engine by engine; a shell over
`repq.quant.doctor.diagnose_checkpoint`.

    repq doctor runs/a0/train/best.pt --data ../shared/datasets/cifar10 --calib 64
    repq doctor runs/a0/train/best.pt --data digits --json > doctor.json
    repq doctor runs/a0/train/best.pt --data digits --report runs/a0/doctor   # report.html with the plot

Per layer of the deploy form (each re-param block fused into one conv), on CALIB training images: the fused
kernel (max |w|, its ratio to the layer's median channel max, and the branch whose share makes that weight),
dead input channels, the share of input values the calibrated amax clips, the layer's SQNR with quantized
weights (W; Wch: its worst output channel), inputs (A) and both (WA), the fake-quant model's SQNR against FP32
at that layer (FQ), and the relative error there of each engine's QDQ file against the fake-quant model
(trt@ort: TensorRT's file in ONNX Runtime, as TensorRT needs a GPU; ort@ort: ORT's own file; trt@ov: TensorRT's
file in OpenVINO). Then one verdict line and the prescription it implies.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from repq.pipeline.flags import add_config_flags
    from repq.quant.config import DoctorConfig

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("ckpt", metavar="CKPT", help="training checkpoint (DIR/best.pt of `repq train`)")
    parser.add_argument("--data", required=True, metavar="DIR", help="an ImageFolder, or `digits`")
    add_config_flags(parser, DoctorConfig, title="doctor settings (DoctorConfig)",
                     aliases={"calib_size": ("--calib",), "engines": ("--engine",)})
    parser.add_argument("--no-engine", action="store_true", help="skip the engine divergence table (engines=[])")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--report", metavar="DIR", help="also write DIR/report.html, report.md and metrics.json "
                        "(the tables and a per-layer plot of max |w| and SQNR)")


REPORT_FILES = frozenset({"report.md", "report.html", "metrics.json", "plots"})


def run(args: argparse.Namespace) -> int:
    from repq.pipeline.flags import config_from_args
    from repq.quant.config import DoctorConfig
    from repq.quant.doctor import diagnose_checkpoint

    config = config_from_args(args, DoctorConfig, **({"engines": []} if args.no_engine else {}))
    if args.report is not None:
        from repq.pipeline.runfolder import claim_folder

        claim_folder(args.report, "repq doctor", known=REPORT_FILES, reads=(args.ckpt, args.data), flag="--report")
    diagnosis = diagnose_checkpoint(args.ckpt, args.data, config)
    if args.report is not None:
        from pathlib import Path

        from repq.engines.report import write_report

        run = {"name": "doctor", "model": args.ckpt, "data": args.data, "seed": config.seed}
        paths = write_report({"run": run, "doctor": {Path(args.ckpt).name: diagnosis.as_dict()}}, args.report,
                             title=f"repq doctor: {args.ckpt}")
        print(f"report: {paths['html']}", file=sys.stderr)
    if args.json:
        print(json.dumps(diagnosis.as_dict(), sort_keys=True))
        return 0
    print(diagnosis.table())
    for engine, layer in diagnosis.engine_divergence.items():
        print(f"{engine}: " + (f"parts ways with the fake-quant model at {layer}" if layer else
                               "follows the fake-quant model at every layer (within rounding)"))
    for engine, reason in diagnosis.engine_skipped.items():
        print(f"{engine}: not checked ({reason})")
    print(f"verdict: {diagnosis.verdict}")
    print(f"prescription: {diagnosis.prescription}")
    return 0
