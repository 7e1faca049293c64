"""`repq eval`: top-1/top-5 of any artifact of a run on any ImageFolder, e.g. on data the run never saw.

    repq eval runs/default/train/best.pt --data digits
    repq eval model.ort.onnx --data PATH/TO/imagefolder --json          # ONNX Runtime
    repq eval model.trt.onnx --data DIR --engine openvino               # the same QDQ file in OpenVINO
    repq eval model.engine --data DIR                                   # TensorRT (needs a GPU)

ARTIFACT is a repq checkpoint (.pt: rebuilt from its recorded architecture, evaluated in PyTorch; --fuse
evaluates its deploy form), an ONNX file (.onnx) or a TensorRT engine (.engine/.plan). --data is `digits`
(its held-out split) or an ImageFolder: DIR/<class>/<image>, or DIR/val/<class>/<image> when DIR has val/.
Class folders are matched to the model's classes by name when the artifact records them. Preprocessing
(input size, mean, std) comes from the artifact's record (a checkpoint's `data`, an ONNX file's `repq.data`
metadata) or from --preset. --json prints one JSON object; `top1` and `top5` are in percent.

A super-resolution model (ECBSR; or an artifact whose record says task super_resolution) is scored by PSNR
on a flat folder of images instead: each image is cropped to a multiple of the scale, downscaled bicubically
(PIL) to make the input, and the output is compared with it on the Y channel (BT.601, values in [0, 1]) with
`scale` border pixels cropped, as in the super-resolution literature. The model reads and writes Y in [0, 1].
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from repq.errors import RepqError
from repq.reparam import is_super_resolution

PRESET_CHOICES = ("cifar", "imagenet", "digits")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("artifact", metavar="ARTIFACT", help="a .pt checkpoint, an .onnx file or an engine")
    parser.add_argument("--data", required=True, metavar="DIR", help="an ImageFolder, or `digits`")
    parser.add_argument("--json", action="store_true", help="print one JSON object (top1/top5 in percent)")
    parser.add_argument("--preset", choices=PRESET_CHOICES,
                        help="preprocessing, when the artifact records none (an ONNX file from elsewhere)")
    parser.add_argument("--engine", choices=("onnxruntime", "openvino"), default="onnxruntime",
                        help="runtime for an .onnx file (default: onnxruntime)")
    parser.add_argument("--fuse", action="store_true", help="evaluate a checkpoint's fused deploy form")
    parser.add_argument("--batch-size", type=int, default=128, help="evaluation batch (default: 128)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the runtime")
    parser.add_argument("--scale", type=int, choices=(2, 3, 4),
                        help="super-resolution factor when the artifact does not record it")


def run(args: argparse.Namespace) -> int:
    result = evaluate_artifact(args.artifact, args.data, preset=args.preset, engine=args.engine,
                               fuse=args.fuse, batch_size=args.batch_size, workers=args.workers,
                               threads=args.threads, scale=args.scale)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    elif "psnr" in result:
        print(f"{result['artifact']} ({result['runtime']}) on {result['data']}: PSNR {result['psnr']:.2f} dB "
              f"(Y, x{result['scale']}) over {result['images']} images")
    else:
        top5 = f", top-5 {result['top5']:.2f}%" if "top5" in result else ""
        print(f"{result['artifact']} ({result['runtime']}) on {result['data']}: "
              f"top-1 {result['top1']:.2f}%{top5} over {result['images']} images")
    return 0


def evaluate_artifact(artifact: str | Path, data: str, *, preset: str | None = None,
                      engine: str = "onnxruntime", fuse: bool = False, batch_size: int = 128,
                      workers: int = 0, threads: int | None = None, scale: int | None = None) -> dict[str, Any]:
    path = Path(artifact)
    if not path.is_file():
        raise RepqError(f"artifact {path} does not exist: pass a .pt checkpoint, an .onnx file or an engine")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        predict, record, runtime = _torch_model(path, fuse, threads)
    elif suffix == ".onnx":
        predict, record, runtime = _onnx_model(path, engine, threads)
    elif suffix in (".engine", ".plan"):
        predict, record, runtime = _tensorrt_model(path)
    else:
        raise RepqError(f"{path} is not an artifact repq eval knows (.pt, .onnx, .engine, .plan): "
                        "pass a checkpoint, an ONNX file or a TensorRT engine")
    if record.get("task") == "super_resolution":
        scale = scale or record.get("scale")
        if scale is None:
            raise RepqError(f"{path} records no super-resolution scale: pass --scale 2, 3 or 4")
        from repq.calibration.sr import SRValidation

        score = SRValidation.from_folder(data, int(scale)).score(predict)
        return {"artifact": str(path), "runtime": runtime, "data": str(data), "task": "super_resolution",
                "scale": int(scale), "images": score["images"], "psnr": round(score["psnr"], 4)}
    preset_name = preset or record.get("preset")
    if preset_name is None:
        raise RepqError(f"{path} records no preprocessing: pass --preset {'|'.join(PRESET_CHOICES)} "
                        "(the preset the model was trained with)")
    loader, images_seen = evaluation_loader(data, preset_name, record.get("classes"), batch_size, workers)
    from repq.engines.timing import topk_accuracy

    num_classes = record.get("num_classes") or (len(record["classes"]) if record.get("classes") else None)
    topk = (1, 5) if num_classes is None or num_classes >= 5 else (1,)
    scores = topk_accuracy(predict, loader, topk=topk)
    return {"artifact": str(path), "runtime": runtime, "data": str(data), "preset": preset_name,
            "images": scores["images"], **{k: round(v, 4) for k, v in scores.items() if k != "images"}}


def _torch_model(path: Path, fuse: bool, threads: int | None):
    import torch

    from repq.pipeline.train import load_model_checkpoint

    if threads:
        torch.set_num_threads(threads)
    model, checkpoint = load_model_checkpoint(path)
    if fuse:
        from repq.reparam import fuse_model

        model = fuse_model(model)
    model.eval()

    def predict(images):
        with torch.inference_mode():
            return model(torch.from_numpy(images)).float().numpy()

    record = dict(checkpoint.get("data") or {})
    arch = checkpoint.get("arch") or {}
    if is_super_resolution(str(arch.get("name", ""))):
        record.setdefault("task", "super_resolution")
        record.setdefault("scale", arch.get("kwargs", {}).get("scale", 2))
    return predict, record, "pytorch (fused)" if fuse else "pytorch"


def _onnx_model(path: Path, engine: str, threads: int | None):
    import onnx

    try:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as err:  # onnx raises DecodeError and others for a truncated file
        raise RepqError(f"{path} is not a readable ONNX file ({type(err).__name__}): re-export it") from err
    record = _json_or_empty(meta.get("repq.data"))
    if engine == "openvino":
        from repq.engines.openvino import OpenVinoEngine

        runner = OpenVinoEngine(path, threads=threads)
    else:
        from repq.engines.onnxruntime import OrtEngine

        runner = OrtEngine(path, threads=threads)
    return runner, record, engine


def _tensorrt_model(path: Path):
    from repq.engines.tensorrt import TensorRTEngine, tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason:
        raise RepqError(f"cannot run TensorRT engine {path}: {reason}; evaluate its .onnx file instead")
    runner = TensorRTEngine(path)
    # An engine carries no metadata: its record is the QDQ ONNX file it was built from, beside it.
    beside = (path.with_suffix(".onnx"), path.with_suffix(".trt.onnx"))
    onnx_file = next((p for p in beside if p.is_file()), None)
    record = {}
    if onnx_file is not None:
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
        record = _json_or_empty(meta.get("repq.data"))
    return runner, record, "tensorrt"


def _json_or_empty(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def evaluation_loader(data: str, preset_name: str, classes: list[str] | None, batch_size: int, workers: int):
    """(loader of (images, labels) numpy batches, image count): every image of the folder, labels by name."""
    import numpy as np
    import torch

    from repq.calibration.datasets import (
        DIGITS,
        ImageSet,
        ImageSource,
        collate_batch,
        load_data,
        scan_image_folder,
    )
    from repq.calibration.transforms import PRESETS

    if preset_name not in PRESETS:
        raise RepqError(f"unknown preset {preset_name!r}: use one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    if str(data) == DIGITS:
        dataset = load_data(DIGITS, preset=preset_name).val
        print("note: `digits` evaluates its held-out split (val_size 0.1, split seed 0)", file=sys.stderr)
    else:
        root = Path(data).expanduser()
        if not root.is_dir():
            raise RepqError(f"data folder {root} does not exist: pass an ImageFolder (DIR/<class>/<image>)")
        if (root / "val").is_dir():
            root = root / "val"
        files, labels, folder_classes = scan_image_folder(root)
        if classes and folder_classes != list(classes):
            index = {name: i for i, name in enumerate(classes)}
            unknown = [c for c in folder_classes if c not in index]
            if unknown:
                raise RepqError(f"{root} has classes the model does not know ({', '.join(unknown[:5])}): "
                                f"evaluate on folders named after its classes ({', '.join(classes[:5])}...)")
            labels = np.asarray([index[folder_classes[i]] for i in labels], dtype=np.int64)
        source = ImageSource(str(root), list(classes or folder_classes), labels, files=files)
        dataset = ImageSet(source, np.arange(len(files)), preset, train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_batch)
    return _numpy(loader), len(dataset)


def _numpy(loader):
    import numpy as np

    for images, labels in loader:
        images = images.numpy()
        if not np.isfinite(images).all():
            raise RepqError("an evaluation batch holds NaN or inf values: check the images and the preset")
        yield images, labels.numpy()
