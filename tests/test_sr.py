"""Super-resolution: aligned training patches, PSNR, training that improves on the untrained model, and the
whole `repq run` chain on the ECBSR x2 recipe with tiny settings (PSNR on every engine)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repq.calibration.loaders import build_loaders, calibration_set
from repq.calibration.sr import SRPatches, SRValidation, load_sr_data, psnr, sr_pair
from repq.errors import RepqError

ROOT = Path(__file__).resolve().parents[1]
SR = ROOT / ".." / "shared" / "datasets" / "sr"
needs_sr = pytest.mark.skipif(not (SR / "Set5").is_dir(), reason="../shared/datasets/sr is not present")


def _write_images(folder: Path, sizes, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_psnr_of_a_known_error_with_the_border_cropped():
    target = np.full((10, 12), 0.5, dtype=np.float32)
    prediction = target + 0.1
    prediction[:2] = 0.0  # inside the 2-pixel border: must not count
    assert psnr(prediction, target, border=2) == pytest.approx(20.0, abs=1e-5)  # mse 0.01
    assert psnr(target, target, border=0) == float("inf")


def test_patches_are_aligned_crops_of_the_bicubic_pair(tmp_path):
    folder = _write_images(tmp_path / "imgs", [(41, 50), (36, 36)])
    pairs = [sr_pair(p, 2) for p in sorted(folder.iterdir())]
    assert pairs[0][0].shape == (20, 25) and pairs[0][1].shape == (40, 50)  # cropped to a multiple of 2
    patches = SRPatches(pairs, scale=2, patch=8, per_image=3, seed=1, augment=False)
    for i in range(len(patches)):
        low_patch, high_patch = patches[i]
        low, high = pairs[i % 2]
        hits = [(y, x) for y in range(low.shape[0] - 7) for x in range(low.shape[1] - 7)
                if np.array_equal(low[y:y + 8, x:x + 8], low_patch[0].numpy())]
        assert hits, "the low-resolution patch is not a crop of the low-resolution image"
        y, x = hits[0]
        assert np.array_equal(high[2 * y:2 * y + 16, 2 * x:2 * x + 16], high_patch[0].numpy())


def test_patches_are_reproducible_per_epoch_and_differ_across_epochs(tmp_path):
    folder = _write_images(tmp_path / "imgs", [(64, 64)] * 2)
    data = load_sr_data(folder, folder, 2, patch=8, per_image=4)
    first = data.train.__getitems__([0, 1, 2])[0]
    assert torch.equal(first, data.train.__getitems__([0, 1, 2])[0])
    data.train.set_epoch(1)
    assert not torch.equal(first, data.train.__getitems__([0, 1, 2])[0])
    low, high = calibration_set(data, 5, seed=0)
    assert low.shape == (5, 1, 8, 8) and high.shape == (5, 1, 16, 16)


def test_bad_super_resolution_data_gets_one_line_errors(tmp_path):
    folder = _write_images(tmp_path / "small", [(20, 20)])
    with pytest.raises(RepqError, match="under the patch size"):
        load_sr_data(folder, folder, 2, patch=16)
    with pytest.raises(RepqError, match="does not exist"):
        load_sr_data(tmp_path / "missing", None, 2)
    with pytest.raises(RepqError, match="scale 5"):
        load_sr_data(folder, None, 5)


@needs_sr
def test_training_raises_psnr_above_the_untrained_model_and_the_deploy_form_agrees(tmp_path):
    from repq.reparam import create_model
    from repq.training.config import TrainConfig
    from repq.training.train import train

    data = load_sr_data(SR / "Set14", SR / "Set5", 2, patch=24, per_image=8)
    torch.manual_seed(0)
    untrained = create_model("ecbsr_m4c8", scale=2).eval()
    with torch.no_grad():
        before = data.val.score(lambda x: untrained(torch.from_numpy(x)).numpy())["psnr"]
    settings = TrainConfig(model="ecbsr_m4c8", epochs=2, batch_size=16, optimizer="adamw", lr=2e-3,
                             weight_decay=0.0, label_smoothing=0.0, warmup_epochs=0, progress=False)
    summary = train(settings, data, tmp_path / "run")
    best = summary["best"]
    assert best["val_psnr"] > before + 0.5
    assert best["deploy_agrees"] and best["deploy_val_psnr"] == pytest.approx(best["val_psnr"], abs=1e-3)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_val_set_rejects_a_model_of_the_wrong_scale(tmp_path):
    folder = _write_images(tmp_path / "imgs", [(32, 32)])
    val = SRValidation.from_folder(folder, 2)
    with pytest.raises(RepqError, match="right scale"):
        val.score(lambda x: np.repeat(np.repeat(x, 3, axis=2), 3, axis=3))


@needs_sr
def test_the_ecbsr_recipe_runs_every_stage_and_reports_psnr_on_the_engine(tmp_path):
    tiny = ["stages.train.epochs=2", "data.patches_per_image=4", "stages.repq.epochs=0.5",
            "stages.bench.batch_sizes=[1,2]", "stages.bench.warmup=1", "stages.bench.iters=3"]
    done = subprocess.run([sys.executable, "-m", "repq", "run", str(ROOT / "recipes" / "ecbsr_x2.yaml"),
                           "--out", str(tmp_path / "run"), *tiny], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    engine = {r["method"]: r["psnr"] for r in metrics["methods"] if r.get("engine") == "onnxruntime" and "psnr" in r}
    fp32 = engine["FP32 ecbsr_m4c8"]
    assert {"ecbsr_m4c8 PTQ max", "ecbsr_m4c8 RepQ W8A8"} <= set(engine)
    for method, value in engine.items():
        assert value == pytest.approx(fp32, abs=0.5), method  # INT8 costs a fraction of a dB
    # The ORT file scored by `repq eval` on Set5 (whole images, dynamic size) matches the engine stage.
    onnx_file = next((tmp_path / "run" / "export").glob("*repq_w8a8*.ort.onnx"))
    result = subprocess.run([sys.executable, "-m", "repq", "eval", str(onnx_file), "--data",
                             str(SR / "Set5"), "--scale", "2", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["psnr"] == pytest.approx(engine["ecbsr_m4c8 RepQ W8A8"], abs=1e-3)
    assert "PSNR (dB)" in (tmp_path / "run" / "report.md").read_text()


def test_build_loaders_gives_the_validation_set_itself_for_super_resolution(tmp_path):
    folder = _write_images(tmp_path / "imgs", [(48, 48)] * 2)
    data = load_sr_data(folder, folder, 2, patch=8, per_image=8)
    train, val = build_loaders(data, 4)
    low, high = next(iter(train))
    assert low.shape == (4, 1, 8, 8) and high.shape == (4, 1, 16, 16)
    assert val is data.val and len(val) == 2
