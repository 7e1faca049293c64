"""Every model file repq writes, read by one function and exported by one function.

Three kinds: a full-precision training checkpoint (`repq train`), a toolkit-quantized model (`repq ptq`,
`repq qat`) and a RepQ fine-tune (`repq finetune`). Each records its architecture (with its transforms) and
the data it was made with, so any of them can be rebuilt, scored and exported without more flags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from repq.errors import RepqError
from repq.quant.finetune import FORMAT as FINETUNE_FORMAT
from repq.quant.toolkit import FORMAT as TOOLKIT_FORMAT

KINDS = ("float", "toolkit", "finetune")


@dataclass
class Artifact:
    """A model file, loaded: its model (fake-quantized for the quantized kinds), its kind, the data record
    (`ImageData.describe()` / `SRData.describe()`) and its architecture record."""

    path: Path
    model: nn.Module
    kind: str
    data: dict = field(default_factory=dict)
    arch: dict = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return self.kind != "float"


def artifact_kind(checkpoint: dict) -> str:
    """Which kind of repq file a loaded checkpoint dict is; a one-line error for a foreign one."""
    fmt = checkpoint.get("format")
    if fmt == TOOLKIT_FORMAT:
        return "toolkit"
    if fmt == FINETUNE_FORMAT:
        return "finetune"
    if isinstance(checkpoint.get("arch"), dict) and "state_dict" in checkpoint:
        return "float"
    raise RepqError("the file is no repq model (no format, no arch/state_dict): pass a checkpoint repq wrote "
                    "(`repq train`, `repq ptq`, `repq qat` or `repq finetune`), or import a foreign one first")


def load_artifact(path: str | Path) -> Artifact:
    """Rebuild the model of any repq model file, with its weights (and quantizers), in eval mode."""
    from repq.quant.finetune import rebuild
    from repq.quant.toolkit import load_quantized
    from repq.reparam.io import load_checkpoint
    from repq.training.train import load_model_checkpoint

    path = Path(path)
    ckpt = load_checkpoint(path)
    try:
        kind = artifact_kind(ckpt)
    except RepqError as err:
        raise RepqError(f"{path}: {err}") from None
    if kind == "toolkit":
        model = load_quantized(path)
        data = ckpt.get("extra", {}).get("data", {})
    elif kind == "finetune":
        try:
            model = rebuild(ckpt)
        except RuntimeError as err:
            raise RepqError(f"{path} does not match the model its record describes ({str(err).splitlines()[0]}): "
                            "re-create it") from err
        data = ckpt.get("data", {})
    else:
        model, _ = load_model_checkpoint(path)
        data = ckpt.get("data") or {}
    return Artifact(path, model.eval(), kind, dict(data or {}), dict(ckpt.get("arch") or {}))


def input_shape(model: nn.Module, data: dict, image_size: int | None = None) -> tuple[int, int, int, int]:
    """(1, C, H, W) an exported graph takes: C from the model's first conv (a 1-channel SR model, a 4-channel
    input), H = W from ``image_size`` or the data record (a super-resolution record: its training patch)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    size = image_size or data.get("image_size") or data.get("patch")
    if not size:
        raise RepqError("the model's data record has no image size: pass --image-size")
    return (1, channels, int(size), int(size))


def export_artifact(artifact: Artifact, out: str | Path, target: str, *, opset: int = 17,
                    dynamic_batch: bool = True, image_size: int | None = None) -> Path:
    """The ONNX file of any artifact for ``target``: a QDQ file of a quantized model in the target's placement,
    the float graph of a full-precision one; the data record goes into the file (`repq.data`)."""
    from repq.engines.export import export_fp32, export_onnx
    from repq.quant.finetune import export_quantized
    from repq.quant.toolkit import deploy_copy

    shape = input_shape(artifact.model, artifact.data, image_size)
    dynamic_size = artifact.data.get("task") == "super_resolution"
    meta = {"repq.data": json.dumps(artifact.data)} if artifact.data else {}
    common = dict(opset=opset, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size, metadata=meta)
    if artifact.kind == "finetune":
        return export_quantized(artifact.model, out, target, shape, **common)
    if artifact.kind == "toolkit":
        return export_onnx(artifact.model, out, target, shape, **common)
    return export_fp32(deploy_copy(artifact.model.eval()), out, shape, **common)


# ------------------------------------------------------------------------------------------------ scoring


def score_artifact(artifact: str | Path, data: str, *, preset: str | None = None, engine: str = "onnxruntime",
                   fuse: bool = False, batch_size: int = 128, workers: int = 0, threads: int | None = None,
                   scale: int | None = None, progress: bool = True) -> dict:
    """Top-1/top-5 (or PSNR) of any artifact on ``data``: a model file in PyTorch (``fuse``: its deploy
    form), an ONNX file on ``engine``, or a TensorRT plan. The images scored are the ones the pipeline would
    score (see ``evaluation_images``), and the result says which (``split``)."""
    path = Path(artifact)
    if not path.is_file():
        raise RepqError(f"artifact {path} does not exist: pass a .pt model file, an .onnx file or a TensorRT plan")
    if batch_size < 1:
        raise RepqError(f"--batch-size {batch_size} is not a batch: use 1 or more (default 128)")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        predict, record, runtime = _torch_runner(path, fuse, threads)
    elif suffix == ".onnx":
        predict, record, runtime = _onnx_runner(path, engine, threads)
    elif suffix in (".engine", ".plan"):
        predict, record, runtime = _plan_runner(path)
    else:
        raise RepqError(f"{path} is not an artifact repq knows (.pt, .onnx, .engine, .plan): pass a model file, "
                        "an ONNX file or a TensorRT plan")
    if record.get("task") == "super_resolution":
        scale = scale or record.get("scale")
        if scale is None:
            raise RepqError(f"{path} records no super-resolution scale: pass --scale 2, 3 or 4")
        from repq.calibration.sr import SRValidation

        score = SRValidation.from_folder(data, int(scale)).score(predict)
        return {"artifact": str(path), "runtime": runtime, "data": str(data), "task": "super_resolution",
                "scale": int(scale), "images": score["images"], "psnr": round(score["psnr"], 4),
                "split": f"every image of {data}"}
    preset_name = preset or record.get("preset")
    if preset_name is None:
        raise RepqError(f"{path} records no preprocessing: pass --preset cifar|imagenet|digits (the preset the "
                        "model was trained with)")
    dataset, split = evaluation_images(data, {**record, "preset": preset_name})
    import torch

    from repq.calibration.datasets import collate_batch
    from repq.engines.timing import topk_accuracy
    from repq.progress import progress as with_progress

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_batch)
    num_classes = record.get("num_classes") or (len(record["classes"]) if record.get("classes") else None)
    topk = (1, 5) if num_classes is None or num_classes >= 5 else (1,)
    batches = with_progress(_numpy_batches(loader), len(loader), f"evaluate {path.name}", enabled=progress)
    scores = topk_accuracy(_checking_outputs(predict, path, dataset, record), batches, topk=topk)
    return {"artifact": str(path), "runtime": runtime, "data": str(data), "preset": preset_name, "split": split,
            "images": scores["images"], **{k: round(v, 4) for k, v in scores.items() if k != "images"}}


def evaluation_images(data: str, record: dict):
    """(dataset, which images) a model is scored on: for the data it was made with (``digits``, or the same
    folder), its own val split as the pipeline drew it (a tree's val/ or test/, or the share of train/ held out
    with the recorded seed); for any other folder, its val/ or test/ when it has one, else every image. Class
    folders are matched to the model's classes by name."""
    import numpy as np

    from repq.calibration.datasets import (
        DIGITS,
        ImageSet,
        ImageSource,
        data_from_record,
        scan_image_folder,
        split_folders,
    )
    from repq.calibration.transforms import PRESETS

    preset = record["preset"]
    if preset not in PRESETS:
        raise RepqError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    classes = record.get("classes")
    if str(data) == DIGITS:
        loaded = data_from_record(DIGITS, record)
        return loaded.val, loaded.val_split
    root = Path(data).expanduser()
    if not root.is_dir():
        raise RepqError(f"data folder {root} does not exist: pass an ImageFolder (DIR/<class>/<image>, or "
                        "DIR/train/ with DIR/val/ or DIR/test/)")
    train_root, val_root = split_folders(root)
    same_data = _same_folder(root, record.get("name"))
    if val_root is None and (same_data or train_root != root):  # the split the pipeline carved from train/
        loaded = data_from_record(str(root), record)
        _check_classes(root, loaded.classes, classes)
        return loaded.val, loaded.val_split
    folder = val_root or root
    files, labels, folder_classes = scan_image_folder(folder)
    labels = _check_classes(folder, folder_classes, classes, labels)
    source = ImageSource(str(folder), list(classes or folder_classes), labels, files=files)
    which = f"{folder.name}/ of {root}" if val_root is not None else f"every image of {root}"
    return ImageSet(source, np.arange(len(files)), PRESETS[preset], train=False), which


def _same_folder(root: Path, recorded: str | None) -> bool:
    try:
        return recorded is not None and Path(recorded).expanduser().resolve() == root.resolve()
    except OSError:
        return False


def _check_classes(folder: Path, folder_classes: list[str], classes: list[str] | None, labels=None):
    """Labels of the folder's images in the model's class order; a one-line error for classes it lacks."""
    import numpy as np

    if not classes or list(folder_classes) == list(classes):
        return labels
    index = {name: i for i, name in enumerate(classes)}
    unknown = [c for c in folder_classes if c not in index]
    if unknown:
        raise RepqError(f"{folder} has classes the model does not know ({', '.join(unknown[:5])}): evaluate on "
                        f"folders named after its {len(classes)} classes ({', '.join(classes[:5])}...)")
    if labels is None:
        return None
    return np.asarray([index[folder_classes[i]] for i in labels], dtype=np.int64)


def _checking_outputs(predict, path: Path, dataset, record: dict):
    """``predict``, checking on its first batch that the model has an output for every class of the data."""
    checked = False

    def run(images):
        nonlocal checked
        outputs = predict(images)
        if not checked:
            checked = True
            check_outputs(path, outputs, record, dataset)
        return outputs

    return run


def check_outputs(path: Path, outputs, record: dict, dataset) -> None:
    """A one-line error when a classifier's outputs cannot be the data's classes: the classes its file records are
    not as many as its outputs, or (recording none) the data has more classes than it has outputs; a one-line
    warning on stderr when it records none, since then folders are matched to outputs by sorted name only."""
    import sys

    import numpy as np

    width = int(np.shape(outputs)[1]) if np.ndim(outputs) == 2 else None
    classes = record.get("classes")
    data_classes = list(getattr(getattr(dataset, "source", None), "classes", None) or [])
    if width is None:
        return
    if classes:
        if len(classes) != width:
            raise RepqError(f"{path} records {len(classes)} classes but has {width} outputs: the file does not match "
                            "its own record; export it again")
        return
    shown = ", ".join(data_classes[:4]) + (", ..." if len(data_classes) > 4 else "")
    if len(data_classes) > width:
        raise RepqError(f"the data has {len(data_classes)} classes ({shown}) but {path} has {width} outputs: score "
                        "it on data of the classes it was trained on")
    print(f"warning: {path} records no class names: the data's {len(data_classes)} class folders ({shown}) are "
          f"taken as its outputs 0-{len(data_classes) - 1} in sorted order; check that it was trained that way",
          file=sys.stderr)


def _numpy_batches(loader):
    import numpy as np

    for images, labels in loader:
        images = images.numpy()
        if not np.isfinite(images).all():
            raise RepqError("an evaluation batch holds NaN or inf values: check the images and the preset")
        yield images, labels.numpy()


def _torch_runner(path: Path, fuse: bool, threads: int | None):
    import torch

    from repq.reparam import fuse_model, is_super_resolution

    if threads:
        torch.set_num_threads(threads)
    loaded = load_artifact(path)
    model = fuse_model(loaded.model) if fuse and not loaded.quantized else loaded.model
    model.eval()

    def predict(images):
        with torch.inference_mode():
            return model(torch.from_numpy(images)).float().numpy()

    record = dict(loaded.data)
    if is_super_resolution(str(loaded.arch.get("name", ""))):
        record.setdefault("task", "super_resolution")
        record.setdefault("scale", loaded.arch.get("kwargs", {}).get("scale", 2))
    runtime = "pytorch (fused)" if fuse else "pytorch"
    return predict, record, runtime if loaded.kind == "float" else f"{runtime}, fake-quant ({loaded.kind})"


def onnx_record(path: Path) -> dict:
    """The data record repq wrote into an ONNX file (`repq.data` metadata); empty for a foreign file."""
    import onnx

    try:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as err:  # onnx raises DecodeError and others for a truncated file
        raise RepqError(f"{path} is not a readable ONNX file ({type(err).__name__}): re-export it") from err
    try:
        value = json.loads(meta.get("repq.data") or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _onnx_runner(path: Path, engine: str, threads: int | None):
    from repq.engines.engine import open_engine
    from repq.engines.targets import get_target

    record = onnx_record(path)
    return open_engine(path, engine, **get_target(engine).select(threads=threads)), record, engine


def _plan_runner(path: Path):
    from repq.engines.engine import open_engine
    from repq.engines.tensorrt import source_onnx

    runner = open_engine(path, "tensorrt")
    onnx_file = source_onnx(path)  # a plan carries no metadata: its record is the ONNX file it was built from
    return runner, onnx_record(onnx_file) if onnx_file is not None else {}, "tensorrt"


def measure_engine(path: str | Path, target: str, data: str | None = None, *, time_batches=(1, 8),
                   warmup: int = 10, runs: int = 50, **options) -> dict:
    """Build (or load) one engine of the table from an ONNX file or plan, score it on ``data`` (the images
    `repq eval` would score) and time it per batch size of ``time_batches``: `repq engine`. ``options`` go to
    the engine (its table row's options)."""
    import torch

    from repq.calibration.datasets import collate_batch
    from repq.engines.engine import input_image_shape, open_engine

    path = Path(path)
    engine = open_engine(path, target, **options)
    result: dict = {"target": target, "engine": engine.describe()}
    size = None
    if data is not None:
        record = onnx_record(path) if path.suffix.lower() == ".onnx" else _plan_runner(path)[1]
        if not record.get("preset"):
            raise RepqError(f"{path} records no preprocessing (not a file repq exported): score it with "
                            "`repq eval FILE --data DIR --preset cifar|imagenet|digits`")
        dataset, split = evaluation_images(data, record)
        first, _ = dataset[0]
        check_outputs(path, engine(first[None].numpy()), record, dataset)  # one image: the classes match
        from repq.progress import Tracked

        loader = torch.utils.data.DataLoader(dataset, batch_size=256, collate_fn=collate_batch)
        result["accuracy"] = {**engine.evaluate(Tracked(loader, f"evaluate {path.name}")), "split": split}
        size = record.get("image_size")
    stats = engine.benchmark(input_image_shape(engine, default_size=size or 224), list(time_batches),
                             warmup=warmup, runs=runs)
    result["latency"] = [s.as_dict() for s in stats]
    return result
