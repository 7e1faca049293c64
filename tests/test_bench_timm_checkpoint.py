"""bench/timm_checkpoint.py, the user's side of `recipes/from_checkpoint.yaml`: a timm repvgg_a0 trained by a plain
loop and saved in timm's training container imports into repq as the same model, scored the same on the same
held-out images, and a rerun resumes instead of starting over."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

SPEC = importlib.util.spec_from_file_location("bench_timm", Path(__file__).parents[1] / "bench" / "timm_checkpoint.py")
bench_timm = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_timm)

ARGS = ["train", "--data", "digits", "--val-size", "0.1", "--epochs", "1", "--max-steps", "3", "--batch-size", "32"]


def test_the_users_checkpoint_imports_as_the_same_model(tmp_path):
    from repq.calibration.datasets import load_data
    from repq.calibration.loaders import build_loaders
    from repq.reparam.importers import import_checkpoint
    from repq.reparam.models import model_from_arch
    from repq.training.evaluate import evaluate

    bench_timm.main([*ARGS, "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    ckpt = import_checkpoint(tmp_path / "timm_a0.pth.tar")
    assert ckpt["arch"]["name"] == "repvgg_a0" and ckpt["imported"]["container"] == "state_dict"
    model = model_from_arch(ckpt["arch"])
    model.load_state_dict(ckpt["state_dict"])
    _, val = build_loaders(load_data("digits", preset="cifar", val_size=0.1, seed=0), 32)
    # repq's own evaluation of the imported model gives the figure the user's loop printed for the timm model
    assert evaluate(model, val)["top1"] == pytest.approx(summary["val_top1"], abs=1e-9)
    # done: a rerun finds last.pth.tar at the last epoch and trains nothing more
    before = torch.load(tmp_path / "last.pth.tar", weights_only=True)["state_dict"]
    bench_timm.main([*ARGS, "--out", str(tmp_path)])
    after = torch.load(tmp_path / "last.pth.tar", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)
