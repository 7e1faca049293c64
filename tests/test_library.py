"""One library under one name: the installed distribution is `repq` alone, the CLI is a shell over it, light
commands stay light, and a stage's key moves with the code."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("reparam", "quant", "calibration", "engines", "pipeline", "training")


def _python(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("folder", FOLDERS)
def test_a_folder_does_not_import_as_a_top_level_name_even_from_the_repository_root(folder):
    done = _python(f"import {folder}")
    assert done.returncode != 0
    assert f"import repq.{folder}, not {folder}" in done.stderr


def test_the_public_api_imports_lazily(tmp_path):
    done = _python("import sys, repq; assert 'torch' not in sys.modules; f = repq.fuse_model; "
                   "assert 'torch' in sys.modules; print(f.__module__, sorted(repq.__all__)[:3])", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("repq.reparam.convert")


@pytest.mark.parametrize("argv", [["--help"], ["recipe", "--show"], ["recipe", "--show", "stages.repq.w_bits=4"]])
def test_help_and_recipe_show_do_not_import_torch(argv, tmp_path):
    code = (f"import sys\nfrom repq.pipeline.cli import main\ntry:\n    code = main({argv!r})\n"
            "except SystemExit as done:\n    code = done.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\nsys.exit(code)")
    done = _python(code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("NO-TORCH")


def test_the_wheel_ships_one_top_level_package(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__",
                                                                ".pytest_cache", ".ruff_cache", "tests", "bench"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("repq-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        top_level = next(n for n in archive.namelist() if n.endswith("top_level.txt"))
        assert archive.read(top_level).decode().split() == ["repq"]
        packages = {n.split("/")[0] for n in archive.namelist() if not n.split("/")[0].endswith(".dist-info")}
        assert packages == {"repq"}
        assert {f"repq/{folder}/__init__.py" for folder in FOLDERS} <= set(archive.namelist())


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_stage_imports_a_command_and_no_command_imports_a_stage_or_another_command():
    commands = sorted((ROOT / "pipeline" / "commands").glob("*.py"))
    for path in commands:
        bad = {m for m in _imports(path) if m.startswith("repq.pipeline.commands") or m == "repq.pipeline.run_stages"}
        assert not bad, (path.name, bad)
    for path in (ROOT / "pipeline" / "run_stages.py", ROOT / "pipeline" / "runfolder.py"):
        assert not {m for m in _imports(path) if m.startswith("repq.pipeline.commands")}, path.name


def test_library_layers_point_one_way():
    """pipeline -> (engines, quant, calibration, training) -> reparam: nothing below pipeline imports it, and
    the block library imports none of the others."""
    for folder in ("reparam", "quant", "calibration", "engines", "training"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not {m for m in _imports(path) if m.startswith("repq.pipeline")}, path
    for path in (ROOT / "reparam").rglob("*.py"):
        others = {m for m in _imports(path) if m.split(".")[:2] in (["repq", f] for f in FOLDERS[1:])}
        assert not others, (path, others)


def test_a_changed_code_version_reruns_every_stage(monkeypatch, tmp_path):
    """The stage key holds the code version: after a bug fix (here: a new fingerprint), a cached stage reruns."""
    from repq.pipeline.recipe import load_recipe
    from repq.pipeline.runfolder import run_pipeline
    from repq.pipeline.stages import register
    from repq.reparam.io import atomic_write_text

    def toy(ctx):
        atomic_write_text(ctx.path("out.txt"), "x")
        return {"outputs": {"out": "out.txt"}}

    registry = {}
    register("train", toy, needs=(), registry=registry)
    offs = [f"stages.{s}.enabled=false" for s in ("substitute", "ptq", "doctor", "qat", "repq", "export", "engine",
                                                   "bench", "report")]
    recipe = load_recipe(None, offs)
    ran = run_pipeline(recipe, tmp_path / "run", registry=registry, log=lambda _: None).ran
    assert ran == ["train"]
    assert run_pipeline(recipe, tmp_path / "run", registry=registry, log=lambda _: None).cached == ["train"]
    import repq.version

    monkeypatch.setattr(repq.version, "code_version", lambda: "0.1.0+0123456789abcdef")
    assert run_pipeline(recipe, tmp_path / "run", registry=registry, log=lambda _: None).ran == ["train"]


def test_the_code_version_is_the_version_and_a_hash_of_the_sources():
    from repq.version import __version__, code_version

    version, _, digest = code_version().partition("+")
    assert version == __version__ and len(digest) == 16 and int(digest, 16) >= 0
