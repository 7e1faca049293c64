"""Every engine this machine can build for one model, checked against each other and timed in one table.

    python -m bench.engines --model repvgg_a0 --batch 1 8            (or: python bench/engines.py ...)

Builds ORT FP32, ORT INT8 (repq's ORT placement), OpenVINO FP32 and INT8 (the TensorRT-placement QDQ file,
unchanged), optionally ORT's own quantize_static (--baseline), and where present TensorRT FP16/INT8 and the
PyTorch CUDA reference. All INT8 files come from one ModelOpt calibration (max) on real images.

Accuracy: every engine's top-1 agreement with PyTorch FP32 on the evaluation images (and with the fake-quant
PyTorch model for INT8 engines), plus top-1 against the labels when --checkpoint gives trained weights.
Speed: engines are timed in interleaved rounds (each round times every engine once), so load from other
processes falls on all of them alike; the statistics pool all rounds. Prints one table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from repq.engines.timing import latency_stats, speedup
from repq.errors import RepqError
from repq.reparam.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "cifar10" / "train"
GOAL_SPEEDUP = 3.5  # best INT8 engine over ORT FP32, fused RepVGG-A0, 224x224, batch 8, this CPU


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.engines", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="repvgg_a0", help="zoo name (reparam.list_models())")
    p.add_argument("--checkpoint", help="trained weights (a repq checkpoint); default: random init")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument(
        "--data",
        default=str(DEFAULT_DATA),
        help="ImageFolder (or `digits` with --checkpoint) for calibration and evaluation",
    )
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--eval-images", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="CPU threads per engine (0: the CPU count)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--runs", type=int, default=20, help="timed runs per engine, batch and round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--baseline", action="store_true", help="also time ORT quantize_static (uint8 activations)")
    p.add_argument("--skip", nargs="*", default=[], help="engine names to leave out")
    p.add_argument("--out", default="runs/bench-engines", help="folder for the ONNX files, engines and JSON")
    return p.parse_args(argv)


# ---------------------------------------------------------------- inputs


def image_batches(root: Path, count: int, size: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images spread over the class folders of an ImageFolder, resized and normalized with the data
    preset training uses at that size (cifar up to 64 pixels, imagenet above)."""
    from PIL import Image

    from repq.calibration.transforms import PRESETS

    if not root.is_dir():
        raise RepqError(f"data folder {root} does not exist: pass --data PATH (an ImageFolder)")
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    if not classes:
        raise RepqError(f"{root} has no class folders: pass an ImageFolder (ROOT/<class>/<image>)")
    per_class = -(-count // len(classes))
    files = []
    for label, folder in enumerate(classes):
        names = sorted(folder.iterdir())[offset : offset + per_class]
        files += [(path, label) for path in names]
    files = files[:count]
    preset = PRESETS["cifar" if size <= 64 else "imagenet"]
    mean = torch.tensor(preset.mean).view(3, 1, 1)
    std = torch.tensor(preset.std).view(3, 1, 1)
    images = []
    for path, _ in files:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
        images.append((torch.from_numpy(pixels).permute(2, 0, 1) / 255 - mean) / std)
    return torch.stack(images), torch.tensor([label for _, label in files])


def bench_images(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Calibration images, evaluation images and labels.

    With --checkpoint (labels mean something) the project's own split is used: calibration from the training
    split, evaluation on the held-out validation split. Without one (speed and agreement only) images are
    drawn straight from the folder at any size, e.g. CIFAR-10 upscaled to 224.
    """
    if not args.checkpoint:
        calib, _ = image_batches(Path(args.data), args.calib_images, args.image_size)
        images, labels = image_batches(Path(args.data), args.eval_images, args.image_size, offset=args.calib_images)
        return calib, images, labels
    from repq.calibration.datasets import load_data
    from repq.calibration.loaders import calibration_set

    data = load_data(args.data)
    if data.preset.image_size != args.image_size:
        raise RepqError(
            f"{args.data} trains at {data.preset.image_size}x{data.preset.image_size}, not "
            f"{args.image_size}: pass --image-size {data.preset.image_size}"
        )
    calib, _ = calibration_set(data, args.calib_images)
    count = min(args.eval_images, len(data.val))
    images, labels = data.val.__getitems__(np.arange(count))
    return calib, images, labels


def load_model(args, calib: torch.Tensor):
    """The zoo model with --checkpoint's weights, or seeded random weights whose BN statistics are estimated
    on the calibration images: without that a random RepVGG-A0 predicts one or two classes for every image
    (measured: 1-3 distinct top-1 classes over 16 images), and top-1 agreement between engines means little."""
    from repq.reparam import create_model

    torch.manual_seed(args.seed)
    if args.checkpoint:
        from repq.reparam.io import load_checkpoint

        checkpoint = load_checkpoint(args.checkpoint)
        arch = checkpoint.get("arch")  # a repq checkpoint says how to rebuild its model
        if arch:
            model = create_model(arch["name"], **arch.get("kwargs", {}))
        else:
            model = create_model(args.model, num_classes=args.num_classes)
        state = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise RepqError(
                f"{args.checkpoint} does not match {args.model} with {args.num_classes} classes "
                f"({str(err).splitlines()[0]}): pass the right --model/--num-classes"
            ) from err
        return model.eval()
    model = create_model(args.model, num_classes=args.num_classes)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for start in range(0, len(calib), 16):
            model(calib[start : start + 16])
    return model.eval()


def export_fp32(model: torch.nn.Module, path: Path, size: int) -> Path:
    """FP32 ONNX with a dynamic batch. The exporter shares equal parameters (e.g. the all-zero biases of a
    random-init fused model) through Identity nodes; each gets its own initializer back, since quantizers
    (ORT's quantize_static) expect a Conv's bias to be an initializer."""
    import io

    import onnx
    from onnx import numpy_helper

    from repq.reparam.io import atomic_write_bytes

    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        torch.zeros(1, 3, size, size),
        buffer,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    graph = onnx.load_from_string(buffer.getvalue())
    inits = {init.name: init for init in graph.graph.initializer}
    for node in [n for n in graph.graph.node if n.op_type == "Identity" and n.input[0] in inits]:
        graph.graph.initializer.append(
            numpy_helper.from_array(numpy_helper.to_array(inits[node.input[0]]), node.output[0])
        )
        graph.graph.node.remove(node)
    onnx.checker.check_model(graph)
    return atomic_write_bytes(path, graph.SerializeToString())


def ort_quantize_static(fp32: Path, out: Path, calib: torch.Tensor) -> Path:
    """ORT's own static quantization (QDQ, per-channel int8 weights, uint8 activations): the baseline."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i : i + 8].numpy()} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(fp32),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out


# ---------------------------------------------------------------- engines


class Bench:
    """One engine under test: how to predict, how to time one batch size, and what it is."""

    def __init__(self, name, predict, time_batch, precision, info=None):
        self.name, self.predict, self.time_batch, self.precision = name, predict, time_batch, precision
        self.info = info or {}


def cpu_engines(files: dict, threads: int, size: int, runs: int, warmup: int) -> list[Bench]:
    from repq.engines.onnxruntime import OrtEngine
    from repq.engines.openvino import OpenVinoEngine, openvino_available, openvino_int8_problem

    def ort(name, path, precision):
        engine = OrtEngine(path, threads=threads)
        return Bench(name, engine, lambda b: engine_times(engine, b), precision, engine.describe())

    def engine_times(engine, batch):
        stats_runs = []
        rng = np.random.default_rng(batch)
        feed = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        for _ in range(warmup):
            engine(feed)
        for _ in range(runs):
            start = time.perf_counter()
            engine(feed)
            stats_runs.append(time.perf_counter() - start)
        return stats_runs

    benches = [ort("ort-fp32", files["fp32"], "fp32"), ort("ort-int8", files["ort"], "int8")]
    if "ort-static" in files:  # --baseline: ORT's own quantizer, and ORT on the TensorRT-placement file
        benches.append(ort("ort-int8-quantize_static", files["ort-static"], "int8"))
        benches.append(ort("ort-int8-trt-placement", files["trt"], "int8"))
    if openvino_available() is None:
        for name, path, precision in (
            ("openvino-fp32", files["fp32"], "fp32"),
            ("openvino-int8", files["trt"], "int8"),
        ):
            if precision == "int8" and openvino_int8_problem():
                print(f"skip {name}: {openvino_int8_problem()}")
                continue
            engine = OpenVinoEngine(path, threads=threads, precision_hint="f32")
            info = engine.describe()
            benches.append(Bench(name, engine, lambda b, e=engine: engine_times(e, b), precision, info))
    else:
        print(f"skip openvino: {openvino_available()}")
    return benches


def gpu_engines(files: dict, fused: torch.nn.Module, out: Path, batches, runs: int, warmup: int) -> list[Bench]:
    from repq.engines import tensorrt as trt
    from repq.engines.torch_cuda import TorchCudaEngine, cuda_unavailable_reason

    benches = []
    reason = cuda_unavailable_reason()
    if reason:
        print(f"skip torch-cuda: {reason}")
    else:
        shape = (3, files["size"], files["size"])
        for dtype in ("fp16", "fp32"):
            engine = TorchCudaEngine(fused, dtype=dtype)
            benches.append(
                Bench(
                    f"torch-cuda-{dtype}",
                    engine,
                    lambda b, e=engine: e.times(shape, b, warmup=warmup, runs=runs, cuda_graph=True),
                    dtype,
                )
            )
    reason = trt.tensorrt_unavailable_reason()
    if reason:
        print(f"skip tensorrt: {reason}")
        return benches
    for precision, source in (("fp16", files["fp32"]), ("int8", files["trt"])):
        built = trt.build_engine(
            source,
            out / f"{precision}.engine",
            precision=precision,
            batch_sizes=batches,
            timing_cache=out / "timing.cache",
        )
        engine = trt.TensorRTEngine(built.engine_path)
        benches.append(
            Bench(
                f"tensorrt-{precision}",
                engine,
                lambda b, e=engine: e.times(b, warmup=warmup, runs=runs, cuda_graph=True),
                precision,
                built.as_dict(),
            )
        )
    return benches


# ---------------------------------------------------------------- accuracy and timing


def predictions(predict, images: torch.Tensor, batch: int = 16) -> np.ndarray:
    out = [np.asarray(predict(images[i : i + batch].numpy())) for i in range(0, len(images), batch)]
    return np.concatenate(out).astype(np.float32)


def accuracy_rows(benches, images, labels, fp32_logits, fq_logits, labelled: bool) -> dict:
    rows = {}
    for bench in benches:
        logits = predictions(bench.predict, images)
        row = {
            "agree_fp32_top1": 100.0 * float((logits.argmax(1) == fp32_logits.argmax(1)).mean()),
            "rel_l2_vs_fp32": float(np.linalg.norm(logits - fp32_logits) / np.linalg.norm(fp32_logits)),
        }
        if bench.precision == "int8":
            row["agree_fakequant_top1"] = 100.0 * float((logits.argmax(1) == fq_logits.argmax(1)).mean())
            row["rel_l2_vs_fakequant"] = float(np.linalg.norm(logits - fq_logits) / np.linalg.norm(fq_logits))
        if labelled:
            row["top1"] = 100.0 * float((logits.argmax(1) == labels.numpy()).mean())
        rows[bench.name] = row
    return rows


def timing_rows(benches, batches, rounds: int) -> dict:
    pooled = {(b.name, batch): [] for b in benches for batch in batches}
    for round_index in range(rounds):
        for bench in benches:
            for batch in batches:
                pooled[(bench.name, batch)] += bench.time_batch(batch)
        print(f"timing round {round_index + 1}/{rounds} done")
    return {key: latency_stats(times, key[1]) for key, times in pooled.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    from repq.engines.export import export_onnx
    from repq.quant.toolkit import quantize
    from repq.reparam import fuse_model

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size, batches = args.image_size, sorted(set(args.batch))
    calib, images, labels = bench_images(args)

    model = load_model(args, calib)
    fused = fuse_model(model).eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(calib, torch.zeros(len(calib))), batch_size=16)
    start = time.perf_counter()
    quantized = quantize(model, loader, method="max")
    files = {"size": size, "fp32": export_fp32(fused, out / "fp32.onnx", size)}
    for target in ("tensorrt", "onnxruntime"):
        key = "trt" if target == "tensorrt" else "ort"
        files[key] = export_onnx(
            quantized,
            out / f"model.{target}.onnx",
            target=target,
            input_shape=(1, 3, size, size),
            dynamic_batch=True,
        )
    if args.baseline:
        files["ort-static"] = ort_quantize_static(files["fp32"], out / "ort_quantize_static.onnx", calib)
    print(f"calibrated and exported in {time.perf_counter() - start:.1f}s to {out}")

    threads = args.threads or os.cpu_count() or 1
    benches = cpu_engines(files, threads, size, args.runs, args.warmup)
    benches += gpu_engines(files, fused, out, batches, args.runs, args.warmup)
    benches = [b for b in benches if b.name not in set(args.skip)]

    with torch.no_grad():
        fp32_logits = predictions(lambda x: fused(torch.from_numpy(x)).numpy(), images)
        fq_logits = predictions(lambda x: quantized(torch.from_numpy(x)).numpy(), images)
    accuracy = accuracy_rows(benches, images, labels, fp32_logits, fq_logits, labelled=bool(args.checkpoint))
    stats = timing_rows(benches, batches, args.rounds)

    report = {
        "model": args.model,
        "fused": True,
        "image_size": size,
        "batches": batches,
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        "runs": args.runs,
        "eval_images": len(images),
        "distinct_fp32_top1": int(np.unique(fp32_logits.argmax(1)).size),
        "checkpoint": args.checkpoint,
        "engines": {},
    }
    for bench in benches:
        entry = {
            "precision": bench.precision,
            "accuracy": accuracy[bench.name],
            "latency": {},
            "info": bench.info,
        }
        for batch in batches:
            s = stats[(bench.name, batch)]
            entry["latency"][str(batch)] = s.as_dict() | {"speedup_vs_ort_fp32": speedup(stats[("ort-fp32", batch)], s)}
        report["engines"][bench.name] = entry
    report["goal"] = goal_check(report)
    print(render_table(report))
    atomic_write_json(out / "engines.json", report)
    print(f"wrote {out / 'engines.json'}")
    return 0


def goal_check(report: dict) -> dict:
    """The best CPU INT8 engine's speed-up over ORT FP32 at batch 8 (the target for fused RepVGG-A0)."""
    candidates = {
        name: e["latency"]["8"]["speedup_vs_ort_fp32"]
        for name, e in report["engines"].items()
        if e["precision"] == "int8" and "8" in e["latency"] and not name.startswith("tensorrt")
    }
    if not candidates:
        return {"note": "no CPU INT8 engine timed at batch 8"}
    best = max(candidates, key=candidates.get)
    return {
        "best_int8_engine": best,
        "speedup_vs_ort_fp32_bs8": candidates[best],
        "target": GOAL_SPEEDUP,
        "met": candidates[best] >= GOAL_SPEEDUP,
    }


def render_table(report: dict) -> str:
    head = ("engine", "batch", "median ms", "p90 ms", "p99 ms", "FPS", "x ORT FP32", "agree FP32", "agree FQ", "top-1")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name, entry in report["engines"].items():
        acc = entry["accuracy"]
        for batch, s in entry["latency"].items():
            fq = acc.get("agree_fakequant_top1")
            lines.append(
                " | ".join(
                    [
                        name,
                        batch,
                        f"{s['median_ms']:.1f}",
                        f"{s['p90_ms']:.1f}",
                        f"{s['p99_ms']:.1f}",
                        f"{s['fps']:.1f}",
                        f"{s['speedup_vs_ort_fp32']:.2f}x",
                        f"{acc['agree_fp32_top1']:.1f}%",
                        "-" if fq is None else f"{fq:.1f}%",
                        f"{acc['top1']:.2f}%" if "top1" in acc else "-",
                    ]
                )
            )
    goal = report["goal"]
    if "best_int8_engine" in goal:
        verdict = "met" if goal["met"] else "NOT met"
        lines.append(
            f"\nbest CPU INT8 engine at batch 8: {goal['best_int8_engine']} "
            f"{goal['speedup_vs_ort_fp32_bs8']:.2f}x ORT FP32 (target {goal['target']}x: {verdict})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RepqError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
