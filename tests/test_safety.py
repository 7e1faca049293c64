"""Nothing lost, nothing silent: each numbered case of the safety issue, through the CLI where it is a CLI case.

Every refusal is one line on stderr (`error: ...`, no traceback) and leaves what the test made beforehand exactly
as it was. Case 12 (a kill during export) is in test_runfolder.py, with the other kill tests.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from repq.errors import RepqError
from repq.pipeline.cli import main
from repq.pipeline.stages import register

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "repvgg_a0", "--width-mult", "0.125", "--device", "cpu", "--no-progress", "--no-channels-last",
        "--batch-size", "8"]
TOY = ["stages.substitute.enabled=false", "stages.doctor.enabled=false", "stages.qat.enabled=false",
       "stages.repq.enabled=false",
       "stages.export.enabled=false", "stages.engine.enabled=false", "stages.bench.enabled=false",
       "stages.report.enabled=false", "stages.report.violins=false", "name=toy"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPQ_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster, and far faster on a busy machine (no spinning threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ helpers


def cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except KeyboardInterrupt:  # it would stop the whole test session
        pytest.fail("KeyboardInterrupt escaped the command line")
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> str:
    """The command failed with exit code 2 and one line on stderr (the last one, after any progress it logged)."""
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def only_line_error(code: int, err: str, *needles: str) -> str:
    """Refused before any work: the error is the only line on stderr."""
    line = one_line_error(code, err, *needles)
    rest = [x for x in err.strip().splitlines() if not x.startswith("repq run: recipe ")]  # `repq run`'s banner
    assert rest == [line], err
    return line


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``: content hashes, so a change or a removal shows."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        found[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


def kept(before: dict[str, str], folder: Path) -> None:
    after = snapshot(folder)
    changed = {k for k in before if after.get(k) != before[k]}
    assert not changed, f"changed or removed: {sorted(changed)}"


def make_images(root: Path, classes: list[str], per_class: int, size: int = 32, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def read_only(folder: Path, monkeypatch) -> None:
    """``folder`` made read-only: by its mode, and (as root, whom modes do not stop) by refusing the calls that
    create files and folders under it."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return
    real_open, real_mkdir = os.open, os.mkdir
    inside = str(folder.resolve()) + os.sep

    def denied(path) -> bool:
        return str(Path(path).resolve()).startswith(inside) or str(Path(path).resolve()) + os.sep == inside

    def fake_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and denied(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if denied(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


# Toy stages for `repq run` through the CLI: each writes a small file, as the real ones do, atomically.
def _toy_train(ctx):
    ctx.path("model.txt").write_text("weights")
    return {"outputs": {"checkpoint": "model.txt"}, "metrics": {"top1": 90.0}}


def _toy_ptq(ctx):
    from repq.reparam.io import atomic_write_text

    atomic_write_text(ctx.path("q.txt"), ctx.latest("checkpoint").read_text() + " quantized")
    return {"outputs": {"quantized": "q.txt"}, "metrics": {"top1": 90.0}}


@pytest.fixture
def toy(monkeypatch):
    """The stage table with toy train and ptq stages (the rest switched off by TOY); returns it to change."""
    from repq.pipeline import stages

    registry = {}
    register("train", _toy_train, needs=(), registry=registry)
    register("ptq", _toy_ptq, needs=("train",), registry=registry)
    monkeypatch.setattr(stages, "REGISTRY", registry)
    return registry


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 3-class and a 2-class classifier as repq writes them (data record with classes), the 3-class one's ONNX
    files (32 px, 64 px, and one without repq's record), and image folders of 3 (120 images), 5 and 2 classes."""
    from repq.calibration.datasets import load_data
    from repq.quant.artifacts import export_artifact, load_artifact
    from repq.reparam import create_model
    from repq.reparam.io import atomic_save

    root = tmp_path_factory.mktemp("safety_models")
    found = {"data3": make_images(root / "data3", ["c0", "c1", "c2"], 40),
             "data5": make_images(root / "data5", [f"c{i}" for i in range(5)], 4, seed=1),
             "data2": make_images(root / "data2", ["c0", "c1"], 10, seed=2)}
    for name, folder in (("ckpt3", found["data3"]), ("ckpt2", found["data2"])):
        data = load_data(folder)
        torch.manual_seed(0)
        model = create_model("repvgg_a0", num_classes=data.num_classes, cifar=True, width_mult=0.125).eval()
        found[name] = root / f"{name}.pt"
        atomic_save({"version": 2, "arch": model.repq_arch, "state_dict": model.state_dict(),
                     "data": data.describe(), "settings": {"val_size": 0.1, "split_seed": 0}}, found[name])
    artifact = load_artifact(found["ckpt3"])
    found["onnx3"] = export_artifact(artifact, root / "m3.onnx", "onnxruntime")
    found["onnx64"] = export_artifact(artifact, root / "m3_64.onnx", "onnxruntime", image_size=64)
    import onnx

    graph = onnx.load(str(found["onnx3"]))
    del graph.metadata_props[:]
    found["bare"] = root / "bare.onnx"
    onnx.save(graph, str(found["bare"]))
    return found


# ------------------------------------------------------------------------------------------------ data lost


def test_case01_user_dot_folders_in_out_are_never_deleted(tmp_path, toy, capsys):
    """A non-empty folder repq did not make is refused whole; in a run folder repq made, only its own leftovers
    (`.tmp-<stage>-<16 hex>`, `.trash-<stage>`) are cleaned, never a user's `.trash-photos`."""
    out = tmp_path / "mine"
    (out / ".trash-photos").mkdir(parents=True)
    (out / ".trash-photos" / "holiday.jpg").write_bytes(b"jpeg")
    (out / ".tmp-train-0123456789abcdef").mkdir()
    (out / ".tmp-train-0123456789abcdef" / "notes.txt").write_text("mine")
    before = snapshot(out)
    code, _, err = cli(capsys, "run", "--out", out, *TOY)
    only_line_error(code, err, "is not empty and repq did not make it", "--out")
    kept(before, out)
    assert snapshot(out) == before

    run = tmp_path / "run"
    assert cli(capsys, "run", "--out", run, *TOY)[0] == 0
    (run / ".trash-photos").mkdir()
    (run / ".trash-photos" / "holiday.jpg").write_bytes(b"jpeg")
    (run / ".tmp-photos-0123456789abcdef").mkdir()
    before = snapshot(run)
    assert cli(capsys, "run", "--out", run, *TOY, "stages.ptq.calib_size=8")[0] == 0
    assert (run / ".trash-photos" / "holiday.jpg").read_bytes() == b"jpeg"
    assert (run / ".tmp-photos-0123456789abcdef").is_dir()
    assert before["train/model.txt"] == snapshot(run)["train/model.txt"]


def test_case02_a_dataset_root_as_out_is_refused_and_untouched(tmp_path, toy, capsys):
    data = make_images(tmp_path / "dataset" / "train", ["cat", "dog"], 3).parent
    before = snapshot(data)
    code, _, err = cli(capsys, "run", "--out", data, *TOY)
    only_line_error(code, err, "not empty and repq did not make it")
    # the data the run reads, as --out or around it: refused, whatever is there
    code, _, err = cli(capsys, "run", "--out", data / "train" / "runs", f"data.source={data}", *TOY)
    only_line_error(code, err, "lies inside", "never writes where it reads")
    code, _, err = cli(capsys, "train", "--data", data, "--out", data / "out", *TINY)
    only_line_error(code, err, "lies inside")
    kept(before, data)
    assert snapshot(data) == before


def test_case03_a_recipe_inside_out_is_never_overwritten(tmp_path, toy, capsys):
    out = tmp_path / "exp"
    out.mkdir()
    recipe = out / "recipe.yaml"
    recipe.write_text("# my notes\nname: toy\nstages:\n  train:\n    epochs: 2\n")
    before = snapshot(out)
    code, _, err = cli(capsys, "run", recipe, "--out", out, "stages.train.epochs=5", *TOY[:-1])
    only_line_error(code, err)
    kept(before, out)
    # even in a run folder repq made, the recipe it reads is not the recipe.yaml it writes
    run = tmp_path / "run"
    assert cli(capsys, "run", "--out", run, *TOY)[0] == 0
    before = snapshot(run)
    code, _, err = cli(capsys, "run", run / "recipe.yaml", "--out", run, "stages.train.epochs=5")
    only_line_error(code, err, "holds", "recipe.yaml", "never writes where it reads")
    kept(before, run)


@pytest.mark.parametrize("command", ["train", "substitute", "qat", "finetune"])
def test_case04_a_second_writer_of_the_same_out_is_refused(command, tmp_path, capsys, models):
    from repq.pipeline.runfolder import run_lock

    out = tmp_path / "out"
    inputs = {"train": [*TINY, "--max-steps-per-epoch", "1", "--epochs", "1"], "qat": ["--quantized", models["ckpt3"]],
              "substitute": ["--checkpoint", models["ckpt3"], "--epochs", "1"],
              "finetune": ["--checkpoint", models["ckpt3"], "--epochs", "0.01"]}[command]
    with run_lock(out):  # the first `repq COMMAND --out OUT`, still running
        before = snapshot(out)
        code, _, err = cli(capsys, command, *inputs, "--out", out)
    only_line_error(code, err, "is in use by another", "--out OTHER_DIR")
    kept(before, out)


def test_case05_disk_full_in_training_then_resume_keeps_best(tmp_path, capsys, monkeypatch, models):
    """The disk fills while `repq train` writes best.pt; after space is freed, --resume ends with a best.pt."""
    from repq.reparam import io

    real = io._atomic_write

    def full_on_best(path, write, *rest, **options):
        if Path(path).name == "best.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write, *rest, **options)

    out = tmp_path / "run"
    args = ["train", "--data", models["data2"], "--out", out, *TINY, "--epochs", "1"]
    monkeypatch.setattr(io, "_atomic_write", full_on_best)
    code, _, err = cli(capsys, *args)
    line = one_line_error(code, err, "disk full while writing", "best.pt", "free space, then run repq train")
    assert "--resume" not in line  # nothing resumable was saved: the same command starts over
    monkeypatch.setattr(io, "_atomic_write", real)
    code, _, err = cli(capsys, *args, "--resume")
    assert code == 0, err
    best = io.load_checkpoint(out / "best.pt")
    assert best["epoch"] == 1 and (out / "last.pt").is_file()


# ---------------------------------------------------------------------------------------- silent wrong results


def test_case06_the_preset_is_decided_by_the_whole_set_and_said(tmp_path, capsys):
    from PIL import Image

    data = make_images(tmp_path / "small", ["a", "b"], 10)
    Image.new("RGB", (4000, 4000), (90, 120, 30)).save(data / "a" / "000.png")  # first in sorted order
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--data", data, "--out", out, *TINY, "--epochs", "1")
    assert code == 0, err
    assert "preset cifar (32 px)" in err and "1 is larger and will be resized to 32 px" in err, err
    from repq.reparam.io import load_checkpoint

    record = load_checkpoint(out / "best.pt")["data"]
    assert record["preset"] == "cifar" and record["image_size"] == 32


def test_case07_a_nan_image_in_validation_is_refused(models):
    import repq
    from repq.reparam import create_model

    images = torch.zeros(6, 3, 32, 32)
    images[3, 0, 5, 5] = float("nan")
    loader = [(images, torch.tensor([0, 1, 2, 0, 1, 2]))]
    model = create_model("repvgg_a0", num_classes=3, cifar=True, width_mult=0.125).eval()
    with pytest.raises(RepqError, match="NaN"):
        repq.evaluate(model, loader)
    with pytest.raises(RepqError, match="NaN"):
        repq.open_engine(models["onnx3"], "onnxruntime").evaluate(loader)


def _zero_bytes_in_weights(source: Path, target: Path) -> None:
    """Copy a checkpoint with 64 bytes of its largest tensor zeroed (zip entries are stored uncompressed)."""
    raw = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len = int.from_bytes(raw[entry.header_offset + 26:entry.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[entry.header_offset + 28:entry.header_offset + 30], "little")
    start = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2
    raw[start:start + 64] = bytes(64)
    target.write_bytes(bytes(raw))


def test_case08_altered_checkpoints_are_refused(tmp_path, capsys, models):
    bad = tmp_path / "bad.pt"
    _zero_bytes_in_weights(models["ckpt3"], bad)
    code, _, err = cli(capsys, "ptq", "--ckpt", bad, "--out", tmp_path / "q.pt")
    only_line_error(code, err, str(bad), "re-create it")
    assert not (tmp_path / "q.pt").exists()
    from repq.reparam.io import CHECKSUM_ENTRY, load_checkpoint

    # the same change with the zip's CRC-32 made to match: the sha256 repq wrote into the file still catches it
    forged = tmp_path / "forged.pt"
    with zipfile.ZipFile(models["ckpt3"]) as source, zipfile.ZipFile(forged, "w") as target:
        assert any(n.endswith(CHECKSUM_ENTRY) for n in source.namelist())
        for info in source.infolist():
            data = bytearray(source.read(info))
            if info.filename.endswith("/data/0"):
                data[:8] = bytes(8)
            target.writestr(info, bytes(data))
    with pytest.raises(RepqError, match="fails its checksum"):
        load_checkpoint(forged)
    legacy = tmp_path / "legacy.pt"  # written before checksums (or by torch.save): still loads
    torch.save({"arch": {"name": "x"}, "state_dict": {"w": torch.ones(2)}}, legacy)
    assert load_checkpoint(legacy)["state_dict"]["w"].sum() == 2


def test_case09_a_model_is_scored_only_on_data_of_its_classes(tmp_path, capsys, models):
    code, _, err = cli(capsys, "eval", models["ckpt3"], "--data", "digits", "--json")
    only_line_error(code, err, "10 classes", "made for 3")
    code, _, err = cli(capsys, "ptq", "--ckpt", models["ckpt3"], "--data", "digits", "--out", tmp_path / "q.pt")
    one_line_error(code, err, "made for 3")
    code, _, err = cli(capsys, "eval", models["onnx3"], "--data", models["data5"], "--json")
    only_line_error(code, err, "classes the model does not know")
    code, _, err = cli(capsys, "eval", models["ckpt2"], "--data", models["data3"], "--json")
    only_line_error(code, err, "classes the model does not know (c2)")
    # a file that records no classes: more data classes than outputs is refused, otherwise a one-line warning
    code, _, err = cli(capsys, "eval", models["bare"], "--data", models["data5"], "--preset", "cifar", "--json")
    only_line_error(code, err, "5 classes", "3 outputs")
    code, out, err = cli(capsys, "eval", models["bare"], "--data", models["data3"], "--preset", "cifar", "--json")
    assert code == 0 and json.loads(out)["images"] == 120
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "records no class names" in warnings[0] and "Traceback" not in err


def test_case10_an_unknown_device_is_refused(tmp_path, capsys, models):
    code, _, err = cli(capsys, "train", "--out", tmp_path / "t", "--device", "gpu")
    only_line_error(code, err, "gpu")
    code, _, err = cli(capsys, "finetune", "--checkpoint", models["ckpt3"], "--out", tmp_path / "f", "--device", "gpu")
    only_line_error(code, err, "gpu")
    assert not (tmp_path / "t").exists() and not (tmp_path / "f").exists()


def test_case11_a_forged_metric_is_not_reported(tmp_path, toy, capsys):
    from repq.pipeline.runfolder import read_record

    run = tmp_path / "run"
    assert cli(capsys, "run", "--out", run, *TOY)[0] == 0
    path = run / "ptq" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["metrics"]["top1"] = 12.34
    path.write_text(json.dumps(manifest, indent=2))
    record, why = read_record(run / "ptq")
    assert record is None and "sha256 does not match" in why
    code, _, err = cli(capsys, "report", run, "--out", tmp_path / "report")
    assert code == 0, err
    assert "12.34" not in (tmp_path / "report" / "report.md").read_text()
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert "12.34" not in json.dumps(metrics) and list(metrics["stages"]) == ["train"]
    for _ in range(2):  # into the run folder itself, whose report files are repq's own
        code, _, err = cli(capsys, "report", run)
        assert code == 0, err
    assert "12.34" not in (run / "metrics.json").read_text()


# ---------------------------------------------------------------------------------------- one line, no traceback


def test_case13_ctrl_c_in_run_is_one_line_with_the_command_that_continues(tmp_path, toy, capsys):
    def interrupted(ctx):
        ctx.path("half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    register("ptq", interrupted, needs=("train",), registry=toy)
    run = tmp_path / "run"
    code, _, err = cli(capsys, "run", "--out", run, *TOY, "--from", "train")
    assert code == 130 and "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == (
        f"interrupted: finished stages are kept in {run} (train); an interrupted stage continues from its last save; "
        f"continue with: repq run --out {run} {' '.join(TOY)}")
    assert list(run.glob(".tmp-ptq-*/half.bin"))  # the attempt is kept for the resume


def test_case13_ctrl_c_in_train_says_what_was_saved(tmp_path, models):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "repq", "train", "--data", str(models["data2"]), "--out", str(out), *TINY,
               "--epochs", "200"]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while not (out / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "training never saved an epoch"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert err.rstrip().splitlines()[-1] == (f"interrupted: the last finished epoch is saved in {out / 'last.pt'}; "
                                             f"continue with: repq {shlex.join([*command[3:], '--resume'])}")


def _heavy_work_fails(monkeypatch, toy) -> None:
    """Every operation the commands call: a check that comes after any of them comes too late."""
    def must_not_run(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    for target in ("repq.training.train.train", "repq.training.train.substitute", "repq.quant.qat.qat_file",
                   "repq.quant.finetune.finetune_checkpoint", "repq.quant.toolkit.ptq_checkpoint",
                   "repq.quant.artifacts.load_artifact", "repq.pipeline.run_report.render_run_report"):
        monkeypatch.setattr(target, must_not_run)
    register("train", must_not_run, needs=(), registry=toy)


def _commands(models, run_dir: Path, out: Path) -> dict[str, list]:
    folder_out = {"run": ["run", "--out", out, *TOY], "train": ["train", "--out", out, *TINY],
                  "substitute": ["substitute", "--checkpoint", models["ckpt3"], "--out", out],
                  "qat": ["qat", "--quantized", models["ckpt3"], "--out", out],
                  "finetune": ["finetune", "--checkpoint", models["ckpt3"], "--out", out],
                  "report": ["report", run_dir, "--out", out]}
    file_out = {"ptq": ["ptq", "--ckpt", models["ckpt3"], "--out", out / "q.pt"],
                "export": ["export", "--quantized", models["ckpt3"], "--out", out / "m.onnx"]}
    return {**folder_out, **file_out}


@pytest.mark.parametrize("command", ["run", "train", "substitute", "qat", "finetune", "report", "ptq", "export"])
def test_case14_an_out_that_cannot_be_written_is_refused_before_any_work(command, tmp_path, capsys, models, toy,
                                                                          monkeypatch):
    _heavy_work_fails(monkeypatch, toy)
    run_dir = tmp_path / "some_run"
    run_dir.mkdir()
    # an existing file where the folder goes (for ptq/export: a folder where their file goes)
    taken = tmp_path / "taken"
    taken.write_text("mine")
    argv = _commands(models, run_dir, taken)[command]
    if command in ("ptq", "export"):
        (tmp_path / "taken.d").mkdir()
        argv = [*argv[:-1], tmp_path / "taken.d"]
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, *argv)
    only_line_error(code, err)
    # a read-only folder
    locked = tmp_path / "locked"
    read_only(locked, monkeypatch)
    try:
        code, _, err = cli(capsys, *_commands(models, run_dir, locked / "out")[command])
        only_line_error(code, err, "cannot write into", "Permission denied")
    finally:
        monkeypatch.undo()
        locked.chmod(0o755)
    kept(before, tmp_path)


def test_case14_a_file_out_is_overwritten_only_when_repq_wrote_it(tmp_path, capsys, models, monkeypatch):
    out = tmp_path / "m.onnx"
    for _ in range(2):  # its own file: written, then written again
        code, _, err = cli(capsys, "export", "--quantized", models["ckpt3"], "--out", out)
        assert code == 0, err
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"the user's own file")
    code, _, err = cli(capsys, "export", "--quantized", models["ckpt3"], "--out", mine)
    only_line_error(code, err, "exists and repq did not write it")
    assert mine.read_bytes() == b"the user's own file"
    monkeypatch.setattr("repq.quant.toolkit.ptq_checkpoint", lambda *a, **k: pytest.fail("work before the check"))
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"the user's own file")
    code, _, err = cli(capsys, "ptq", "--ckpt", models["ckpt3"], "--out", mine)
    only_line_error(code, err, "exists and repq did not write it")
    assert mine.read_bytes() == b"the user's own file"


def test_case15_disk_full_is_one_line_and_finished_stages_are_kept(tmp_path, toy, capsys, monkeypatch):
    run = tmp_path / "run"
    assert cli(capsys, "run", "--out", run, *TOY)[0] == 0
    before = snapshot(run / "train")
    real_usage = shutil.disk_usage

    def nearly_full(path):  # the disk fills up while ptq writes
        usage = real_usage(path)
        return usage._replace(free=5) if Path(path).name.startswith(".tmp-ptq") else usage

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    code, _, err = cli(capsys, "run", "--out", run, *TOY, "--from", "ptq")
    one_line_error(code, err, "disk full while writing", "q.txt", "(17 bytes needed, 5 bytes free)",
                   f"finished stages are kept in {run} (train", f"free space, then run repq run --out {run}")
    kept(before, run / "train")
    monkeypatch.setattr(shutil, "disk_usage", real_usage)

    def buried(ctx):  # torch's writers wrap ENOSPC in a RuntimeError ("unexpected pos ...")
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(ctx.dir / "q.onnx"))
        except OSError as err:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0") from err

    register("ptq", buried, needs=("train",), registry=toy)
    code, _, err = cli(capsys, "run", "--out", run, *TOY, "--from", "ptq")
    one_line_error(code, err, "disk full while writing", "q.onnx")
    kept(before, run / "train")


def test_case16_a_decompression_bomb_is_named(tmp_path, capsys, models, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every 32x32 image is then more than twice the limit
    code, _, err = cli(capsys, "eval", models["ckpt3"], "--data", models["data3"], "--json")
    only_line_error(code, err, "too large to decode safely", str(models["data3"]), ".png")
    code, _, err = cli(capsys, "train", "--data", models["data3"], "--out", tmp_path / "t", *TINY)
    only_line_error(code, err, "too large to decode safely", ".png")


def test_case17_an_onnx_file_of_another_size_is_one_line(capsys, models):
    code, _, err = cli(capsys, "eval", models["onnx64"], "--data", models["data3"], "--json")
    only_line_error(code, err, "takes 3x64x64 images, these are 3x32x32", "--image-size 32")


def test_case18_eval_batch_size_zero(capsys, models):
    code, _, err = cli(capsys, "eval", models["ckpt3"], "--data", models["data3"], "--batch-size", "0")
    only_line_error(code, err, "--batch-size 0")


def test_case19_messages_say_what_is_wrong(tmp_path, capsys, models):
    from repq.reparam.io import atomic_save, load_checkpoint

    ptq_file = tmp_path / "ptq_max.pt"  # what `repq ptq` writes, as far as these commands look
    ckpt = load_checkpoint(models["ckpt3"])
    atomic_save({"format": "repq-toolkit-quant/1", "modelopt_state": {}, "state_dict": ckpt["state_dict"],
                 "arch": ckpt["arch"], "quant": {}, "extra": {"data": ckpt["data"]}}, ptq_file)
    code, _, err = cli(capsys, "finetune", "--checkpoint", ptq_file, "--out", tmp_path / "ft", "--device", "cpu")
    only_line_error(code, err, "is a quantized model")
    code, _, err = cli(capsys, "ptq", "--ckpt", ptq_file, "--out", tmp_path / "q.pt")
    only_line_error(code, err, "is a quantized model")
    # `repq engine` on a 120-image folder works (and no message names a flag a command lacks)
    code, out, err = cli(capsys, "engine", models["onnx3"], "--data", models["data3"], "--batches", "1", "--runs",
                         "2", "--warmup", "0")
    assert code == 0, err
    assert json.loads(out)["accuracy"]["images"] == 12  # its own val split of the 120
    from repq.calibration.datasets import load_data
    from repq.calibration.loaders import build_loaders

    with pytest.raises(RepqError) as caught:
        build_loaders(load_data(models["data3"]), 512)
    assert "--batch-size" not in str(caught.value) and "at most 108" in str(caught.value)
    capsys.readouterr()
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    code, _, err = cli(capsys, "run", recipes)
    only_line_error(code, err, "is a folder, not a recipe file")
    code, _, err = cli(capsys, "recipe", "model.name=repvgg_a9")
    only_line_error(code, err, "'repvgg_a9' is no model repq knows", "repvgg_a0")
