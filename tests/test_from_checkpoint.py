"""`repq run recipes/from_checkpoint.yaml model.checkpoint=X`: a timm RepVGG-A0 checkpoint, imported, skips FP
training and runs to a report (tiny settings on the embedded digits); the train stage is keyed by the file's
sha256; a checkpoint whose classes are not the data's is one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "from_checkpoint.yaml"
TINY = ["data.source=digits", "data.val_size=0.1", "stages.substitute.epochs=1", "stages.train.max_steps_per_epoch=2",
        "stages.train.batch_size=32", "stages.ptq.sweep={method: [max]}", "stages.ptq.calib_size=32",
        "stages.repq.epochs=0.02", "stages.repq.batch_size=32", "stages.export.targets=[onnxruntime]",
        "stages.bench.batch_sizes=[1]", "stages.bench.warmup=1", "stages.bench.iters=2"]
OFF = ("substitute", "ptq", "doctor", "qat", "repq", "export", "engine", "bench")
ONLY_TRAIN = [f"stages.{s}.enabled=false" for s in OFF] + ["data.val_size=20"]


def repq(*args):
    return subprocess.run([sys.executable, "-m", "repq", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


def _timm_checkpoint(path: Path, seed: int, classes: int = 10) -> Path:
    torch.manual_seed(seed)
    torch.save({"state_dict": timm.create_model("repvgg_a0", num_classes=classes).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("from_checkpoint")
    imported = folder / "a0.pt"
    done = repq("import", _timm_checkpoint(folder / "timm_a0.pth", 0), "--out", imported)
    assert done.returncode == 0, done.stderr
    out = folder / "run"
    done = repq("run", RECIPE, "--out", out, f"model.checkpoint={imported}", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, out, done.stdout + done.stderr


def test_the_run_skips_fp_training_and_reaches_the_report(run):
    _, out, log = run
    for stage in ("train", "substitute", "ptq", "repq", "export", "engine"):
        assert (out / stage / "manifest.json").is_file(), stage
    assert (out / "report.md").is_file() and (out / "metrics.json").is_file()
    assert "repvgg_a0 from" in log and "no FP training" in log
    train = json.loads((out / "train" / "manifest.json").read_text())
    assert train["metrics"]["epochs"] == 0 and train["metrics"]["label"] == "repvgg_a0"
    assert train["metrics"]["deploy_agrees"]
    methods = {entry["method"] for entry in json.loads((out / "metrics.json").read_text())["ladder"]}
    assert {"FP32 repvgg_a0", "qarepvgg_a0 PTQ max", "qarepvgg_a0 RepQ-BNEst(corrected) W8A8"} <= methods


def test_the_train_stage_is_keyed_by_the_checkpoint_file(run):
    folder, _, _ = run
    out, checkpoint = folder / "keyed", folder / "keyed.pth"
    _timm_checkpoint(checkpoint, 1)  # a foreign file works too: imported by the stage itself
    args = ("run", RECIPE, "--out", out, f"model.checkpoint={checkpoint}", *TINY, *ONLY_TRAIN)
    assert repq(*args).returncode == 0
    again = repq(*args)
    assert "train: cached - skipping" in again.stdout + again.stderr
    _timm_checkpoint(checkpoint, 2)  # the same path, other weights
    changed = repq(*args)
    assert changed.returncode == 0 and "train: cached" not in changed.stdout + changed.stderr


def test_a_checkpoint_for_other_classes_is_one_line(run):
    folder, _, _ = run
    checkpoint = _timm_checkpoint(folder / "seven.pth", 0, classes=7)
    done = repq("run", RECIPE, "--out", folder / "seven", f"model.checkpoint={checkpoint}", *TINY, *ONLY_TRAIN)
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(lines) == 1 and "7-class head" in lines[0], done.stderr[-2000:]


def test_the_imported_model_is_the_users_model(run):
    """The run scores the timm model the user trained: its own strides (stem stride 2, even on 32x32 images), its
    weights, its outputs; the zoo's 32x32 stem is only built on request (model.kwargs.cifar=true)."""
    from repq.training.train import load_model_checkpoint

    folder, out, _ = run
    model, ckpt = load_model_checkpoint(out / "train" / "best.pt")
    assert not ckpt["arch"].get("kwargs", {}).get("cifar")
    source = timm.create_model("repvgg_a0", num_classes=10)
    source.load_state_dict(torch.load(folder / "timm_a0.pth", weights_only=True)["state_dict"])
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), source.eval()(images), rtol=1e-5, atol=1e-5)


def test_the_cifar_stem_is_built_on_request(run):
    from repq.training.train import load_model_checkpoint

    folder, _, _ = run
    out = folder / "cifar_stem"
    done = repq("run", RECIPE, "--out", out, f"model.checkpoint={folder / 'timm_a0.pth'}", "model.kwargs={cifar: true}",
                *TINY, *ONLY_TRAIN)
    assert done.returncode == 0, done.stderr[-2000:]
    model, ckpt = load_model_checkpoint(out / "train" / "best.pt")
    assert ckpt["arch"]["kwargs"]["cifar"] and model.stem[0].stride == 1
