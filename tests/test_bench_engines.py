"""bench/engines.py end to end on digits with a checkpoint, tiny settings, CPU engines: every row's
top-1 is what the engine gives when its file is opened again and scored on the same images, the agreement
columns match an independent comparison with the PyTorch model, and engines that cannot run here are listed with
the library's own reason."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from repq.calibration.datasets import load_data
from repq.calibration.loaders import val_subset
from repq.engines.engine import open_engine
from repq.engines.targets import get_target
from repq.engines.torch_cuda import cuda_unavailable_reason
from repq.quant.finetune import recalibrate_bn
from repq.quant.toolkit import deploy_copy
from repq.reparam import create_model
from repq.reparam.io import atomic_save

SPEC = importlib.util.spec_from_file_location("bench_engines", Path(__file__).parents[1] / "bench" / "engines.py")
bench_engines = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_engines)

EVAL_IMAGES, SEED = 64, 0


def _checkpoint(path: Path, data) -> torch.nn.Module:
    """A narrow RepVGG-A0 with random weights, saved as `repq train` saves it. Its BN statistics are estimated on
    digits first, so it predicts many classes (default statistics give one or two): agreement between engines
    and top-1 then say something. Accuracy is near chance, which does not matter: each row is compared with the
    same file scored again."""
    torch.manual_seed(0)
    model = create_model("repvgg_a0", num_classes=10, width_mult=0.25)
    images, labels = data.train.__getitems__(np.arange(0, 640, 10))
    recalibrate_bn(model, [(images, labels)], 1)
    model.eval()
    atomic_save({"version": 2, "arch": model.repq_arch, "state_dict": model.state_dict(), "data": data.describe()},
                path)
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_engines")
    data = load_data("digits")
    model = _checkpoint(tmp / "best.pt", data)
    out = tmp / "out"
    threads = torch.get_num_threads()  # the script sets torch's thread count for the whole process
    code = bench_engines.main(["--checkpoint", str(tmp / "best.pt"), "--data", "digits", "--batch", "1", "2",
                               "--calib-images", "32", "--eval-images", str(EVAL_IMAGES), "--threads", "1",
                               "--rounds", "2", "--runs", "2", "--warmup", "1", "--seed", str(SEED),
                               "--out", str(out)])
    torch.set_num_threads(threads)
    assert code == 0
    return json.loads((out / "engines.json").read_text()), out, model, data


def test_rows_agree_with_an_independent_evaluation(run):
    report, out, model, data = run
    engines = report["engines"]
    assert {"ort-fp32", "ort-int8"} <= set(engines)
    assert report["eval_images"] == EVAL_IMAGES and report["image_size"] == 32
    evaluation = list(val_subset(data, EVAL_IMAGES, batch_size=16, seed=SEED))
    images = torch.cat([x for x, _ in evaluation]).numpy()
    with torch.no_grad():
        reference = deploy_copy(model).eval()(torch.from_numpy(images)).argmax(1).numpy()
    files = {"ort-fp32": ("onnxruntime", "fp32.onnx"), "ort-int8": ("onnxruntime", "model.ort.onnx"),
             "openvino-fp32": ("openvino", "fp32.onnx"), "openvino-int8": ("openvino", "model.trt.onnx")}
    checked = 0
    for name, (target, file) in files.items():
        if name not in engines:
            assert report["skipped"][name] == get_target(target).unavailable_reason(out / file)
            continue
        engine = open_engine(out / file, target, threads=1)
        own = engine.evaluate(val_subset(data, EVAL_IMAGES, batch_size=32, seed=SEED))
        row = engines[name]["accuracy"]
        assert own["images"] == EVAL_IMAGES
        assert row["top1"] == pytest.approx(own["top1"], abs=1e-9), (name, row, own)
        agree = 100.0 * float((engine(images).argmax(1) == reference).mean())
        assert row["agree_fp32_top1"] == pytest.approx(agree, abs=1e-9), name
        checked += 1
    assert checked >= 2
    assert engines["ort-fp32"]["accuracy"]["agree_fp32_top1"] == 100.0
    assert report["distinct_fp32_top1"] >= 3  # predictions differ from image to image: agreement means something
    assert "agree_fakequant_top1" in engines["ort-int8"]["accuracy"]


def test_latency_rows_pool_every_round_and_gpu_engines_are_skipped_with_the_library_reason(run):
    report, _, _, _ = run
    for name, entry in report["engines"].items():
        assert set(entry["latency"]) == {"1", "2"}, name
        for stats in entry["latency"].values():
            assert stats["runs"] == 2 * 2 and stats["median_ms"] > 0
            assert stats["speedup_vs_ort_fp32"] > 0
    assert report["engines"]["ort-fp32"]["latency"]["1"]["speedup_vs_ort_fp32"] == pytest.approx(1.0)
    reasons = {"torch-cuda-fp16": cuda_unavailable_reason(), "torch-cuda-fp32": cuda_unavailable_reason(),
               "tensorrt-fp16": get_target("tensorrt").unavailable_reason(),
               "tensorrt-int8": get_target("tensorrt").unavailable_reason()}
    for name, reason in reasons.items():
        if reason:
            assert report["skipped"][name] == reason
        else:
            assert name in report["engines"]
    table = bench_engines.render_table(report)
    assert all(name in table for name in list(report["engines"]) + list(report["skipped"]))


def test_a_size_without_a_preset_is_a_one_line_error():
    with pytest.raises(bench_engines.RepqError, match="pass --image-size 32"):
        bench_engines.model_and_data(bench_engines.parse_args(["--data", "digits", "--image-size", "64"]))


def test_top1_needs_labels_that_mean_something():
    logits = np.eye(3, dtype=np.float32)
    row = bench_engines.accuracy_row(logits, "fp32", logits, logits, None)
    assert "top1" not in row and row["agree_fp32_top1"] == 100.0
