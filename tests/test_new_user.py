"""What a new user trips on: long steps that say nothing, third-party noise, checks that come too late, data
layouts one command reads and another does not, files others cannot read, and a report that contradicts itself.

One small real `repq run` (umask 022, output captured as in a CI log) feeds the run-level checks."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from repq.errors import RepqError

CAP = 4  # stages.train.max_steps_per_epoch: every training-like stage takes at most this many steps an epoch
RUN = ["model.width_mult=0.125", "stages.train.epochs=1", f"stages.train.max_steps_per_epoch={CAP}",
       "stages.train.warmup_epochs=0", "stages.train.batch_size=32", "stages.substitute.epochs=1",
       "stages.ptq.sweep={method: [max]}", "stages.ptq.calib_size=32", "stages.ptq.batch_size=16",
       "stages.repq.epochs=1", "stages.repq.batch_size=32", "stages.qat.enabled=true", "stages.qat.epochs=1",
       "stages.qat.batch_size=32", "stages.qat.calibrator=max", "stages.bench.batch_sizes=[1,2]",
       "stages.bench.warmup=0", "stages.bench.iters=2"]
# What ModelOpt and the libraries it imports print that says nothing to a repq user (the list).
NOISE = ("Could not identify the device for TensorQuantizer", "No CUDA runtime is found", "torch.jit.script",
         "Cannot find transformers package")
NOISE_PRINTS = re.compile(r"Inserted \d+ quantizers")


def _umask_022():
    os.umask(0o022)


def repq(*argv: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m repq ...` as a user runs it in CI: umask 022, output to pipes (not a terminal), Python's
    default warning filters (whatever the test process has)."""
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-m", "repq", *argv], capture_output=True, text=True, timeout=timeout,
                          env=env, preexec_fn=_umask_022)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("newuser") / "run"
    done = repq("run", "--out", str(out), *RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout + done.stderr


# ---------------------------------------------------------------- long steps say something


def test_every_long_step_of_a_run_prints_progress_lines_in_a_log(run):
    _, log = run
    assert "\r" not in log  # lines, not a terminal's bar
    steps = rf"\d+/{CAP} steps \(\d+%\)"
    for pattern in (rf"^train repvgg_a0: {steps}, loss [\d.]+, .*ETA", rf"^train qarepvgg_a0: {steps}",
                    r"^calibrate \(max\): 1/2 batches \(50%\), .*ETA", r"^calibrate \(max\): 2/2 batches \(100%\)",
                    rf"^finetune \w+: {steps}", rf"^qat: {steps}", r"^export: \d+/\d+ files \(\d+%\)",
                    r"^engine: evaluate: \d+/\d+ files", r"^bench: \d+/\d+ files"):
        assert re.search(pattern, log, re.M), (pattern, log[-3000:])


def test_the_repq_stage_takes_the_train_stages_step_cap(run):
    """stages.repq.epochs=1 of 1617 training images at batch 32 is 51 steps; train's cap makes it CAP."""
    from repq.reparam.io import load_checkpoint

    out, _ = run
    (finetuned,) = (out / "repq").glob("*/repq.pt")
    assert load_checkpoint(finetuned)["metrics"]["steps"] == CAP


def test_finetune_honours_its_step_cap():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from repq.quant.finetune import finetune, quantized_model
    from repq.reparam import create_model

    images, labels = torch.randn(40, 3, 32, 32), torch.randint(0, 3, (40,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)  # 10 batches an epoch
    model = quantized_model(create_model("repvgg_a0", num_classes=3, cifar=True, width_mult=0.125), method="repq")
    losses = finetune(model, loader, epochs=1.5, max_steps_per_epoch=3, lr=0.001, progress=False, log=lambda _: None)
    assert len(losses) == math.ceil(1.5 * 3)
    with pytest.raises(RepqError, match="max_steps_per_epoch"):
        finetune(model, loader, epochs=1, max_steps_per_epoch=0, progress=False)


# ---------------------------------------------------------------- third-party noise


def _noise(text: str) -> list[str]:
    return [n for n in NOISE if n in text] + NOISE_PRINTS.findall(text)


def test_a_run_export_and_ptq_print_none_of_modelopts_noise(run, tmp_path):
    out, log = run
    assert not _noise(log), _noise(log)
    ptq_file = out / "ptq" / "qarepvgg_a0_ptq_max.pt"
    for target in ("tensorrt", "onnxruntime"):
        onnx = tmp_path / f"{target}.onnx"
        done = repq("export", "--quantized", str(ptq_file), "--target", target, "--out", str(onnx))
        assert done.returncode == 0 and onnx.is_file(), done.stderr[-2000:]
        assert not _noise(done.stdout + done.stderr), done.stdout + done.stderr
    done = repq("ptq", "--ckpt", str(out / "train" / "best.pt"), "--data", "digits", "--calib-size", "16",
                "--out", str(tmp_path / "ptq.pt"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert not _noise(done.stdout + done.stderr), done.stdout + done.stderr
    # Control: the same file restored by ModelOpt itself, unfiltered, does say these things on this machine, so
    # the checks above would catch them.
    raw = subprocess.run([sys.executable, "-W", "default", "-c", (
        "import modelopt.torch.opt as mto\n"
        "from repq.quant.toolkit import deploy_copy\n"
        "from repq.reparam import model_from_arch\n"
        "from repq.reparam.io import load_checkpoint\n"
        f"ckpt = load_checkpoint({str(ptq_file)!r})\n"
        "model = deploy_copy(model_from_arch({**ckpt['arch'], 'deploy': False}))\n"
        "mto.restore_from_modelopt_state(model.eval(), ckpt['modelopt_state'])\n")],
        capture_output=True, text=True, timeout=300)
    assert raw.returncode == 0, raw.stderr[-2000:]
    assert NOISE[0] in raw.stderr and NOISE_PRINTS.search(raw.stdout), raw.stdout + raw.stderr


# ---------------------------------------------------------------- checks that come too late


def test_repq_recipe_refuses_qat_epochs_0_in_one_line():
    done = repq("recipe", "stages.qat.epochs=0", timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "stages.qat.epochs" in done.stderr, done.stderr


def _candidates():
    """Override texts a user might type for any setting, each parsed as the recipe parses it."""
    return ("0", "-1", "0.5", "1.5", "100000", "none", "bogus", "[]", "[0]", "true")


def test_every_value_an_operation_refuses_alone_the_recipe_refuses_in_one_line():
    """The truth is each operation's own settings model (what the stage builds and would refuse at its start):
    every value it refuses for one of its settings, the recipe refuses before anything runs."""
    from pydantic import ValidationError

    from repq.pipeline.recipe import load_recipe, parse_value
    from repq.pipeline.sections import FROM_RECIPE
    from repq.pipeline.stages import STAGES

    checked = 0
    for stage in STAGES:
        operation = getattr(stage.settings, "operation", None)
        if operation is None:
            continue
        for field in operation.model_fields:
            if field in FROM_RECIPE.get(operation, {}):
                continue
            for text in _candidates():
                try:
                    operation(**{field: parse_value(text)})
                    continue
                except ValidationError:
                    pass
                override = f"stages.{stage.name}.{field}={text}"
                with pytest.raises(RepqError) as info:
                    load_recipe(None, [override])
                assert "\n" not in str(info.value) and field in str(info.value), (override, str(info.value))
                checked += 1
    assert checked > 50


def test_checks_across_settings_are_the_recipes_too():
    from repq.pipeline.recipe import load_recipe

    for overrides, words in (
            (["stages.train.low_res_epochs=3"], "low_res_epochs needs low_res"),
            (["stages.train.low_res=24", "stages.train.low_res_epochs=10"], "must leave full-size epochs"),
            (["stages.qat.enabled=true", "stages.qat.calibrator=entropy", "stages.ptq.sweep={method: [max]}"],
             "stages.qat.calibrator=entropy has no PTQ model"),
            (["stages.qat.enabled=true", "stages.ptq.enabled=false"], "stages.ptq is switched off")):
        with pytest.raises(RepqError, match=re.escape(words)) as info:
            load_recipe(None, overrides)
        assert "\n" not in str(info.value)
    load_recipe(None, ["stages.train.low_res=24", "stages.train.low_res_epochs=2", "stages.qat.enabled=true"])


# ---------------------------------------------------------------- data layouts


def _png(path: Path, rng) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from repq.calibration.transforms import PRESETS
    from repq.reparam import create_model
    from repq.reparam.io import atomic_save

    torch.manual_seed(0)
    model = create_model("repvgg_a0", num_classes=3, cifar=True, width_mult=0.125).eval()
    preset = PRESETS["cifar"]
    data = {"preset": "cifar", "classes": ["ant", "bee", "cat"], "image_size": 32, "mean": list(preset.mean),
            "std": list(preset.std)}
    path = tmp_path_factory.mktemp("eval") / "model.pt"
    atomic_save({"arch": model.repq_arch, "state_dict": model.state_dict(), "data": data}, path)
    return path


def _tree(root: Path, splits: dict[str, int]) -> Path:
    """splits: folder ("" for bare class folders) -> images per class."""
    rng = np.random.default_rng(len(splits))
    for split, per_class in splits.items():
        for name in ("ant", "bee", "cat"):
            for i in range(per_class):
                _png(root / split / name / f"{i}.png", rng)
    return root


@pytest.mark.parametrize("layout, splits, split, images", [
    ("train_only", {"train": 10}, "10% of train/ held out (split seed 0)", 3),  # the split `repq run` carves
    ("train_test", {"train": 4, "test": 2}, "test/ of {root}", 6),
    ("train_val_test", {"train": 4, "val": 3, "test": 2}, "val/ of {root}", 9),
    ("bare", {"": 4}, "every image of {root}", 12),
])
def test_eval_reads_every_layout_repq_run_reads_and_names_the_split(checkpoint, tmp_path, capsys, layout, splits,
                                                                    split, images):
    from repq.calibration.datasets import load_data
    from repq.pipeline.cli import main

    root = _tree(tmp_path / layout, splits)
    assert main(["eval", str(checkpoint), "--data", str(root), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["split"] == split.format(root=root) and result["images"] == images
    if layout != "bare":  # the images `repq run` scores on this tree
        assert result["images"] == len(load_data(root, preset="cifar").val)
    assert re.search(r"^evaluate model\.pt: \d+/\d+ batches \(100%\)", captured.err, re.M)  # --json: progress too
    assert main(["eval", str(checkpoint), "--data", str(root)]) == 0
    assert f"on {result['split']}: top-1" in capsys.readouterr().out


# ---------------------------------------------------------------- files others can read


def test_atomic_writes_end_with_the_permissions_open_gives(tmp_path):
    from repq.reparam.io import atomic_write_text

    for mask in (0o022, 0o077, 0o002):
        old = os.umask(mask)
        try:
            plain = tmp_path / f"plain-{mask:o}"
            plain.write_text("x")
            written = atomic_write_text(tmp_path / f"atomic-{mask:o}", "x")
        finally:
            os.umask(old)
        assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode), oct(mask)


def test_every_file_of_a_run_is_readable_by_others_under_umask_022(run):
    out, _ = run
    paths = [out, *out.rglob("*")]
    assert len(paths) > 20 and (out / "report.html").is_file()
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        wanted = 0o755 if path.is_dir() else 0o644
        assert mode & wanted == wanted, (str(path.relative_to(out)), oct(mode))


# ---------------------------------------------------------------- the report agrees with itself


def test_the_fp32_rows_of_the_ladder_hold_the_fp32_files_own_score(run):
    """Truth: `repq eval` of the exported FP32 ONNX file on the run's data (the same val split)."""
    from repq.quant.artifacts import score_artifact

    out, _ = run
    metrics = json.loads((out / "metrics.json").read_text())
    markdown = (out / "report.md").read_text()
    for label in ("repvgg_a0", "qarepvgg_a0"):
        truth = score_artifact(out / "export" / f"{label}_fp32.onnx", "digits", progress=False)
        scored = truth["top1"]
        entries = {e["step"]: e for e in metrics["ladder"] if e.get("method") == f"FP32 {label}"}
        for step in ("qdq_onnx", "engine"):  # top-5 too: a barely trained model's top-1 may be at chance
            assert (entries[step]["top1"], entries[step]["top5"]) == pytest.approx((scored, truth["top5"]))
        steps = {step: entry["top1"] for step, entry in entries.items()}
        row = next(line for line in markdown.splitlines() if line.startswith(f"| FP32 {label} | {steps['train']:.2f}"))
        assert row.split(" | ")[4:6] == [f"{scored:.2f}"] * 2, row  # ONNX and engine columns


def test_the_substituted_models_panel_and_log_name_it_as_its_stage_does(run, monkeypatch):
    from repq.engines import report
    from repq.pipeline.run_report import render_run_report

    out, log = run
    label = json.loads((out / "substitute" / "manifest.json").read_text())["metrics"]["label"]
    assert label == "qarepvgg_a0"
    assert f"training {label} " in log
    seen = {}
    monkeypatch.setattr(report, "write_report", lambda metrics, out_dir, weights=None, **_: seen.update(weights))
    render_run_report(out)
    assert set(seen) == {"train: repvgg_a0", f"substitute: {label}"}
