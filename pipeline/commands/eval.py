"""`repq eval`: top-1/top-5 of any artifact of a run on any ImageFolder, e.g. on data the run never saw; a shell
over `repq.quant.artifacts.score_artifact`.

    repq eval runs/default/train/best.pt --data digits
    repq eval model.ort.onnx --data PATH/TO/imagefolder --json          # ONNX Runtime
    repq eval model.trt.onnx --data DIR --engine openvino               # the same QDQ file in OpenVINO
    repq eval model.engine --data DIR                                   # TensorRT (needs a GPU)

ARTIFACT is any model file repq writes (.pt: a training checkpoint, a PTQ/QAT model or a RepQ fine-tune, rebuilt
from its record and run in PyTorch; --fuse runs a checkpoint's deploy form), an ONNX file (.onnx) or a TensorRT
plan (.engine/.plan). --data is `digits` or an ImageFolder in any layout `repq run` reads (DIR/train/ with
DIR/val/ or DIR/test/, DIR/train/ alone, or DIR/<class>/). On the data the model was made with, the images
scored are the pipeline's val split (val/, test/, or the share of train/ held out with the recorded seed); on
another folder, its val/ or test/, else every image. The output says which. Class folders are matched to the
model's classes by name. Preprocessing comes from the artifact's record (a checkpoint's `data`, an ONNX file's
`repq.data` metadata) or from --preset. --json prints one JSON object; `top1` and `top5` are in percent.

A super-resolution model (ECBSR; or an artifact whose record says task super_resolution) is scored by PSNR
on a flat folder of images instead: each image is cropped to a multiple of the scale, downscaled bicubically
(PIL) to make the input, and the output is compared with it on the Y channel (BT.601, values in [0, 1]) with
`scale` border pixels cropped, as in the super-resolution literature. The model reads and writes Y in [0, 1].
"""

from __future__ import annotations

import argparse
import json

from repq.engines.targets import TARGETS

PRESET_CHOICES = ("cifar", "imagenet", "digits")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("artifact", metavar="ARTIFACT", help="a .pt checkpoint, an .onnx file or an engine")
    parser.add_argument("--data", required=True, metavar="DIR", help="an ImageFolder, or `digits`")
    parser.add_argument("--json", action="store_true", help="print one JSON object (top1/top5 in percent)")
    parser.add_argument("--preset", choices=PRESET_CHOICES,
                        help="preprocessing, when the artifact records none (an ONNX file from elsewhere)")
    parser.add_argument("--engine", choices=list(TARGETS), default="onnxruntime",
                        help="engine for an .onnx file: " + "; ".join(f"{t.name}: {t.description}"
                                                                   for t in TARGETS.values()))
    parser.add_argument("--fuse", action="store_true", help="evaluate a checkpoint's fused deploy form")
    parser.add_argument("--batch-size", type=int, default=128, help="evaluation batch (default: 128)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the runtime")
    parser.add_argument("--scale", type=int, choices=(2, 3, 4),
                        help="super-resolution factor when the artifact does not record it")


def run(args: argparse.Namespace) -> int:
    from repq.quant.artifacts import score_artifact

    result = score_artifact(args.artifact, args.data, preset=args.preset, engine=args.engine, fuse=args.fuse,
                            batch_size=args.batch_size, workers=args.workers, threads=args.threads,
                            scale=args.scale, progress=True)  # on stderr: --json's stdout stays one object
    if args.json:
        print(json.dumps(result, sort_keys=True))
    elif "psnr" in result:
        print(f"{result['artifact']} ({result['runtime']}) on {result['split']}: PSNR {result['psnr']:.2f} dB "
              f"(Y, x{result['scale']}) over {result['images']} images")
    else:
        top5 = f", top-5 {result['top5']:.2f}%" if "top5" in result else ""
        print(f"{result['artifact']} ({result['runtime']}) on {result['split']}: "
              f"top-1 {result['top1']:.2f}%{top5} over {result['images']} images")
    return 0
