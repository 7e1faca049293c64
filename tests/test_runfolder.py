"""Run folder mechanics with toy stages: skip rule, reruns on change, --from, corrupt folders, SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from repq.errors import RepqError
from repq.pipeline.recipe import load_recipe
from repq.pipeline.runfolder import MANIFEST, read_record, read_run, run_pipeline, sha256_file
from repq.pipeline.stages import register

ROOT = Path(__file__).resolve().parents[1]

# Toy stages: each appends its name to a journal outside the run folder (so the test sees what really ran) and
# derives its output from its upstream's output and its own settings, so reruns are observable in the files.
TOY = textwrap.dedent('''
    import os, time
    from pathlib import Path

    JOURNAL = Path(os.environ["TOY_JOURNAL"])

    def _note(name):
        with open(JOURNAL, "a") as handle:
            handle.write(name + "\\n")

    def train(ctx):
        _note("train")
        ctx.path("model.txt").write_text(f"model epochs={ctx.settings.epochs}")
        with open(ctx.path("curve.jsonl"), "w") as handle:
            for epoch in range(ctx.settings.epochs):
                handle.write(f'{{"epoch": {epoch}, "loss": {1.0 / (epoch + 1)}}}\\n')
        return {"outputs": {"checkpoint": "model.txt"}, "metrics": {"epochs": ctx.settings.epochs}}

    def ptq(ctx):
        _note("ptq-resumed" if ctx.resume else "ptq")
        if ctx.resume:  # what the interrupted attempt left is handed back, unverified
            assert (ctx.dir / "half.bin").read_bytes() == b"x" * 1000
        marker = os.environ.get("TOY_SLOW_MARKER")
        if marker:  # the kill test: say "I am mid-stage", half-write an output, then hang
            ctx.path("half.bin").write_bytes(b"x" * 1000)
            Path(marker).write_text("started")
            time.sleep(60)
        model = ctx.latest("checkpoint").read_text()
        ctx.path("q.txt").write_text(f"{model} | calib={ctx.settings.calib_size}")
        return {"outputs": {"quantized": "q.txt"}, "metrics": {"top1": 90.0}}

    def export(ctx):
        from repq.reparam.io import _atomic_write, atomic_write_text

        _note("export")
        text = ctx.input("ptq", "quantized").read_text() + " | onnx"
        marker = os.environ.get("TOY_SLOW_EXPORT")
        if marker:  # the kill-during-export test: half of the file written through repq's atomic writer, then hang
            def half_then_hang(handle):
                handle.write(text[: len(text) // 2].encode())
                handle.flush()
                Path(marker).write_text("started")
                time.sleep(60)

            _atomic_write(ctx.path("model.onnx.txt"), half_then_hang)
        atomic_write_text(ctx.path("model.onnx.txt"), text)
        return {"outputs": {"onnx": "model.onnx.txt"}}
''')

OFF = ["stages.substitute.enabled=false", "stages.doctor.enabled=false", "stages.qat.enabled=false",
       "stages.repq.enabled=false", "stages.engine.enabled=false", "stages.bench.enabled=false",
       "stages.report.enabled=false",
       "stages.train.epochs=2", "stages.ptq.calib_size=512", "name=toy"]


def toy_run_script(tmp_path: Path, run_dir: Path) -> str:
    """A `python -c` script running the toy pipeline into ``run_dir``: argv `force` reruns ptq with --from,
    other argv items are overrides."""
    return textwrap.dedent(f'''
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {str(ROOT)!r}]
        from repq.pipeline.recipe import load_recipe
        from repq.pipeline.runfolder import run_pipeline
        from repq.pipeline.stages import register
        registry = {{}}
        register("train", "toy_stages:train", needs=(), registry=registry)
        register("ptq", "toy_stages:ptq", needs=("train",), registry=registry)
        register("export", "toy_stages:export", needs=("ptq",), registry=registry)
        force = sys.argv[1:] == ["force"]
        overrides = ["stages.ptq.calib_size=32"] if force else sys.argv[1:]
        run_pipeline(load_recipe(None, {OFF!r} + overrides), {str(run_dir)!r},
                     registry=registry, from_stage="ptq" if force else None)
    ''')


def kill_when(marker: Path, argv: list[str], env: dict, cwd: Path) -> None:
    """Start ``argv`` and SIGKILL it as soon as it writes ``marker`` (it must, within 2 minutes)."""
    proc = subprocess.Popen(argv, env=env, cwd=cwd)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, "the subprocess ended before reaching the point to kill it at"
        assert time.time() < deadline, "the subprocess never reached the point to kill it at"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_stages.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TOY_JOURNAL", str(tmp_path / "journal.txt"))
    import importlib

    import toy_stages
    importlib.reload(toy_stages)
    registry = {}
    register("train", "toy_stages:train", needs=(), registry=registry)
    register("ptq", "toy_stages:ptq", needs=("train",), registry=registry)
    register("export", "toy_stages:export", needs=("ptq",), registry=registry)

    def journal():
        path = tmp_path / "journal.txt"
        lines = path.read_text().split() if path.exists() else []
        path.unlink(missing_ok=True)
        return lines

    def run(*overrides, from_stage=None):
        recipe = load_recipe(None, OFF + list(overrides))
        run_pipeline(recipe, tmp_path / "run", from_stage=from_stage, registry=registry, log=lambda _: None)
        return journal()

    return run, tmp_path / "run"


def test_second_run_skips_everything_and_manifest_records_inputs(toy):
    run, run_dir = toy
    assert run() == ["train", "ptq", "export"]
    assert run() == []
    manifest = json.loads((run_dir / "ptq" / MANIFEST).read_text())
    train_files = json.loads((run_dir / "train" / MANIFEST).read_text())["files"]
    assert manifest["inputs"]["upstream"]["train"]["files"] == train_files
    assert train_files["model.txt"] == sha256_file(run_dir / "train" / "model.txt")
    assert manifest["settings"]["calib_size"] == 512 and manifest["metrics"] == {"top1": 90.0}
    assert manifest["wall_s"] >= 0 and "torch" in manifest["versions"] and "python" in manifest["versions"]
    assert (run_dir / "export" / "model.onnx.txt").read_text() == "model epochs=2 | calib=512 | onnx"
    assert "epochs: 2" in (run_dir / "recipe.yaml").read_text()


def test_changed_setting_reruns_that_stage_and_later_ones(toy):
    run, run_dir = toy
    run()
    assert run("stages.ptq.calib_size=64") == ["ptq", "export"]
    assert (run_dir / "export" / "model.onnx.txt").read_text() == "model epochs=2 | calib=64 | onnx"
    assert run("stages.ptq.calib_size=64", "stages.train.epochs=3") == ["train", "ptq", "export"]
    assert run("stages.ptq.calib_size=64", "stages.train.epochs=3", "stages.bench.iters=7") == []


def test_from_forces_stage_and_later(toy):
    run, _ = toy
    run()
    assert run(from_stage="ptq") == ["ptq", "export"]
    with pytest.raises(RepqError, match="did you mean 'ptq'"):
        run(from_stage="ptqq")
    with pytest.raises(RepqError, match="switched off"):
        run(from_stage="repq")


def test_corrupt_or_partial_stage_folder_is_discarded(toy):
    run, run_dir = toy
    run()
    (run_dir / "train" / "model.txt").write_text("model epochs=2 TAMPERED")
    record, why = read_record(run_dir / "train")
    assert record is None and "sha256 mismatch" in why
    # Train reruns; its output is byte-identical to before, so (as in DVC) the stages after it stay cached.
    assert run() == ["train"]
    assert (run_dir / "train" / "model.txt").read_text() == "model epochs=2"
    (run_dir / "ptq" / MANIFEST).unlink()  # a folder without manifest looks like an interrupted stage
    assert run() == ["ptq"]
    (run_dir / "ptq" / "q.txt").unlink()
    assert run("stages.ptq.calib_size=8") == ["ptq", "export"]
    (run_dir / "export" / MANIFEST).write_text("{not json")
    assert run("stages.ptq.calib_size=8") == ["export"]


def test_failing_stage_keeps_earlier_stages_and_leaves_no_folder(toy, monkeypatch):
    run, run_dir = toy
    run()
    import toy_stages

    def broken(ctx):
        ctx.path("partial.bin").write_bytes(b"123")
        raise RuntimeError("boom")

    monkeypatch.setattr(toy_stages, "ptq", broken)
    with pytest.raises(RuntimeError, match="boom"):
        run("stages.ptq.calib_size=1")
    assert read_record(run_dir / "train")[0] is not None
    # The old ptq folder (calib 512) is kept intact until a new one is finished; the failed attempt is kept
    # aside for a resume and never taken for a finished stage.
    assert read_record(run_dir / "ptq")[0] is not None
    assert [p.name.split("-")[1] for p in run_dir.glob(".tmp-*")] == ["ptq"]
    assert run() == []
    assert not list(run_dir.glob(".tmp-*"))  # a run that no longer asks for that attempt removes it


def test_sigkill_mid_stage_then_rerun_loses_nothing(toy, tmp_path):
    run, run_dir = toy
    assert run() == ["train", "ptq", "export"]

    def finished_files():
        return {p.relative_to(run_dir): sha256_file(p) for p in run_dir.rglob("*")
                if p.is_file() and not p.relative_to(run_dir).parts[0].startswith(".")}

    before = finished_files()
    marker = tmp_path / "started"
    env = {**os.environ, "TOY_SLOW_MARKER": str(marker)}

    def start_and_kill(*args):
        kill_when(marker, [sys.executable, "-c", toy_run_script(tmp_path, run_dir), *args], env, tmp_path)
        marker.unlink()
        (tmp_path / "journal.txt").unlink()  # what the killed run noted
        assert list(run_dir.glob(".tmp-ptq-*")), "the killed stage should be writing into a temp folder"
        after = finished_files()
        changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        assert changed <= {Path("recipe.yaml")}, f"finished files changed by a killed run: {changed}"
        assert sorted(read_run(run_dir)) == ["export", "ptq", "train"]

    # Killed while rerunning ptq for a changed setting: the rerun resumes that attempt.
    start_and_kill("stages.ptq.calib_size=32")
    assert run("stages.ptq.calib_size=32") == ["ptq-resumed", "export"]
    assert (run_dir / "export" / "model.onnx.txt").read_text() == "model epochs=2 | calib=32 | onnx"
    before = finished_files()
    # Killed while forcing ptq again with --from: the finished ptq folder is untouched, so a plain rerun is
    # entirely cached, and the attempt nobody asks for any more is removed.
    start_and_kill("force")
    assert run("stages.ptq.calib_size=32") == []
    assert not list(run_dir.glob(".tmp-*")) and not list(run_dir.glob(".trash-*"))
    assert before == finished_files()


def test_sigkill_during_export_commits_only_complete_files(toy, tmp_path):
    """`kill -9` while export writes a file: the rerun resumes the attempt, and what enters the export manifest
    (and so the run) is only files written to the end, never the temp file of the interrupted write."""
    temp_name = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # repq.reparam.io's atomic writes in progress
    run, run_dir = toy
    assert run() == ["train", "ptq", "export"]
    finished = {p.relative_to(run_dir): sha256_file(p) for p in run_dir.glob("[!.]*/*") if p.is_file()}
    marker = tmp_path / "exporting"
    kill_when(marker, [sys.executable, "-c", toy_run_script(tmp_path, run_dir), "stages.export.opset=16"],
              {**os.environ, "TOY_SLOW_EXPORT": str(marker)}, tmp_path)
    (tmp_path / "journal.txt").unlink()
    halves = [p for p in run_dir.glob(".tmp-export-*/*") if temp_name.match(p.name)]
    assert len(halves) == 1, "the killed write should have left its temp file in the attempt folder"
    assert {p.relative_to(run_dir): sha256_file(p) for p in run_dir.glob("[!.]*/*") if p.is_file()} == finished

    assert run("stages.export.opset=16") == ["export"]  # resumes the attempt with the half-written temp file
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.glob(".tmp-*"))
    records = read_run(run_dir)
    assert sorted(records) == ["export", "ptq", "train"]
    assert list(records["export"].files) == ["model.onnx.txt"]
    for record in records.values():  # every file a manifest lists is there, whole
        for rel, digest in record.files.items():
            assert not temp_name.match(Path(rel).name) and sha256_file(record.dir / rel) == digest
    assert (run_dir / "export" / "model.onnx.txt").read_text() == "model epochs=2 | calib=512 | onnx"


def test_concurrent_run_on_same_folder_is_refused(toy):
    run, run_dir = toy
    from repq.pipeline.runfolder import run_lock

    with run_lock(run_dir), pytest.raises(RepqError, match="in use"):
        run()


def test_changed_data_folder_reruns_everything(toy, tmp_path):
    run, _ = toy
    data = tmp_path / "images"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        (data / name / "0.png").write_bytes(b"png")
    assert run(f"data.source={data}") == ["train", "ptq", "export"]
    assert run(f"data.source={data}") == []
    (data / "b" / "1.png").write_bytes(b"another image")
    assert run(f"data.source={data}") == ["train", "ptq", "export"]


DIST_TOY = textwrap.dedent('''
    import os, sys
    from pathlib import Path

    def _note(ctx, name):
        with open(Path(os.environ["TOY_JOURNAL"] + f".rank{ctx.rank}"), "a") as handle:
            handle.write(f"{name}\\n")

    def train(ctx):  # data-parallel: every rank takes part in an all-reduce, rank 0 writes
        import torch
        import torch.distributed as dist
        _note(ctx, "train:" + ctx.dir.name)  # every rank sees rank 0's attempt folder
        total = torch.tensor([float(ctx.rank + 1)])
        dist.all_reduce(total)
        if ctx.rank == 0:
            ctx.path("model.txt").write_text(f"sum of ranks+1 = {int(total.item())} over {ctx.world_size}")
        return {"outputs": {"checkpoint": "model.txt"}}

    def ptq(ctx):  # rank 0 only
        _note(ctx, "ptq")
        ctx.path("q.txt").write_text(ctx.input("train", "checkpoint").read_text() + " | quantized")
        return {"outputs": {"quantized": "q.txt"}}
''')


def test_torchrun_ranks_share_one_run_folder(tmp_path):
    """Two ranks as torchrun starts them: the training stage runs on both, the rest on rank 0 only."""
    import socket

    (tmp_path / "dist_toy.py").write_text(DIST_TOY)
    script = textwrap.dedent(f'''
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {str(ROOT)!r}]
        from repq.pipeline.recipe import load_recipe
        from repq.pipeline.runfolder import run_pipeline
        from repq.pipeline.stages import register
        registry = {{}}
        register("train", "dist_toy:train", needs=(), registry=registry, distributed=True)
        register("ptq", "dist_toy:ptq", needs=("train",), registry=registry)
        off = ["stages.{{}}.enabled=false".format(s) for s in ("substitute", "doctor", "qat", "repq", "export",
                                                             "engine", "bench", "report")]
        summary = run_pipeline(load_recipe(None, off), {str(tmp_path / "run")!r}, registry=registry,
                               log=lambda line: None)
        print("ran", summary.ran, "cached", summary.cached)
    ''')

    def launch():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        procs = []
        for rank in (0, 1):
            env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TOY_JOURNAL": str(tmp_path / "j")}
            procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=240) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
        journals = {}
        for rank in (0, 1):
            path = tmp_path / f"j.rank{rank}"
            journals[rank] = path.read_text().split() if path.exists() else []
            path.unlink(missing_ok=True)
        return [o[0].strip() for o in outs], journals

    outs, journals = launch()
    assert journals[0][1:] == ["ptq"] and journals[1] == journals[0][:1]
    assert journals[0][0].startswith("train:.tmp-train-")
    assert outs[0] == outs[1] == "ran ['train', 'ptq'] cached []"
    assert (tmp_path / "run" / "ptq" / "q.txt").read_text() == "sum of ranks+1 = 3 over 2 | quantized"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", ".repq-run", "ptq", "recipe.yaml",
                                                                    "train"]
    outs, journals = launch()
    assert journals == {0: [], 1: []} and outs[0] == outs[1] == "ran [] cached ['train', 'ptq']"
