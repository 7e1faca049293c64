"""The run folder and the resumable runner: each stage's outputs keyed by the hash of what produced them.

Layout of ``runs/<name>/``::

    recipe.yaml            the resolved recipe (all defaults filled in)
    <stage>/manifest.json  key, inputs and their sha256, settings, metrics, wall time, versions, file hashes
    <stage>/...            the stage's artifacts
    report.md, report.html, metrics.json, plots/   rendered after the last stage

The skip rule follows DVC: a stage's key is the hash of its name, its settings, the model/data/seed sections,
a fingerprint of the data, the keys and file hashes of the stages it reads, and the code version (package version
and a hash of its sources). A stage whose folder holds a
manifest with that key, and files whose hashes still match it, is skipped ("cached - skipping"). A folder with
no manifest, an unreadable one or a file that no longer matches is discarded and the stage reruns: nothing
half-written is ever trusted. A stage writes into ``.tmp-<stage>-<key>/``, which is renamed into place only
after its manifest is written, so ``kill -9`` at any moment leaves the old finished folder or the new one.
An interrupted attempt's folder is kept: the next attempt at the same key gets it back with ``ctx.resume``
set, so a long training stage can continue from its last checkpoint instead of starting over.

What repq may touch: a run folder holds a ``.repq-run`` marker from its creation, and repq writes only into a
new or empty folder, or one with its marker (a command's output folder gets one too, naming the command). It
removes only its own leftovers there (``.tmp-<stage>-<16 hex>`` and ``.trash-<stage>`` of known stages), never
writes inside a path it reads from (the recipe, the data), and holds a lock (``.lock``) while it writes. A
manifest carries the sha256 of its own contents, so an edited one (a forged metric) is not trusted.
"""

from __future__ import annotations

import contextlib
import datetime
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from repq.errors import RepqError
from repq.pipeline import stages as stage_registry
from repq.pipeline.recipe import Recipe, _suggest, settings_hash
from repq.pipeline.stages import STAGE_ORDER, Stage, StageContext, StageRecord, as_result
from repq.reparam.io import TEMP_NAME, atomic_write_json, atomic_write_text

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
MANIFEST_HASH = "manifest_sha256"  # the sha256 of the manifest's other keys (hash_json), written last
MARKER = ".repq-run"  # proves a folder is repq's: written when repq first writes into it
LOCK = ".lock"
VERSIONED_PACKAGES = ("repq", "torch", "torchvision", "numpy", "onnx", "onnxruntime", "nvidia-modelopt",
                      "tensorrt", "openvino")


# ---------------------------------------------------------------- hashing


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hash_folder_files(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative POSIX paths), the manifest itself and temp files of
    unfinished atomic writes excluded."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST and not TEMP_NAME.match(path.name):
            hashes[path.relative_to(folder).as_posix()] = sha256_file(path)
    return hashes


def remove_unfinished_writes(folder: Path, log: Callable[[str], None] | None = None) -> list[str]:
    """Delete the temp files of atomic writes a kill interrupted (``.NAME.XXXXXXXX.tmp``) under ``folder``, a
    folder repq made: they are never artifacts. Returns their relative paths."""
    removed = []
    for path in sorted(folder.rglob(".*.tmp")):
        if path.is_file() and not path.is_symlink() and TEMP_NAME.match(path.name):
            path.unlink()
            removed.append(path.relative_to(folder).as_posix())
    if removed and log is not None:
        log(f"removed {len(removed)} unfinished write(s) an interrupted attempt left: {', '.join(removed[:3])}")
    return removed


def data_fingerprint(recipe: Recipe) -> dict[str, str]:
    """Cheap identity of the data: for folders, the hash of every file's relative path, size and mtime."""
    prints = {}
    for label, source in (("source", recipe.data.source), ("val_source", recipe.data.val_source)):
        if source is None:
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            digest = hashlib.sha256()
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    stat = os.stat(os.path.join(root, name))
                    rel = os.path.relpath(os.path.join(root, name), path)
                    digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            prints[label] = f"folder:{digest.hexdigest()}"
        elif path.is_file():
            prints[label] = f"file:{sha256_file(path)}"
        elif source == "digits":  # scikit-learn's bundled copy: its version identifies the data
            prints[label] = f"digits:scikit-learn-{_version('scikit-learn')}"
        else:
            prints[label] = f"missing:{source}"  # the stage that reads it names the problem
    checkpoint = recipe.model.checkpoint  # a run that starts from a checkpoint depends on its contents
    if checkpoint and Path(checkpoint).expanduser().is_file():
        prints["checkpoint"] = f"file:{sha256_file(Path(checkpoint).expanduser())}"
    return prints


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def versions() -> dict[str, str]:
    from repq.version import code_version

    found = {"python": platform.python_version(), "repq-code": code_version()}
    for package in VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


def stage_key(name: str, recipe: Recipe, data_print: dict[str, str], upstream: dict[str, StageRecord]) -> str:
    """What a stage's result depends on: its name and settings, the recipe's model/data/seed, the data's
    fingerprint, its inputs' keys and files, and the code itself (so a fixed bug reruns the stages it touched)."""
    from repq.version import code_version

    return hash_json({
        "code": code_version(),
        "stage": name,
        "settings": settings_hash(recipe.stage(name)),
        "core": settings_hash({"model": recipe.model.model_dump(mode="json"),
                               "data": recipe.data.model_dump(mode="json"), "seed": recipe.seed}),
        "data": data_print,
        "upstream": {n: {"key": r.key, "files": r.files} for n, r in upstream.items()},
    })


# ---------------------------------------------------------------- reading finished stages


def read_record(stage_dir: Path, verify: bool = True) -> tuple[StageRecord | None, str]:
    """The stage folder's record, or (None, why it is not trusted)."""
    manifest_path = stage_dir / MANIFEST
    if not stage_dir.is_dir():
        return None, "not run yet"
    if not manifest_path.is_file():
        return None, "no manifest (an interrupted or foreign folder)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, f"unreadable manifest ({type(err).__name__})"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or "key" not in manifest:
        return None, "manifest of another format"
    if manifest.get(MANIFEST_HASH) != manifest_hash(manifest):
        return None, "manifest changed after it was written (its sha256 does not match)"
    if verify:
        recorded = manifest.get("files", {})
        for rel, digest in recorded.items():
            path = stage_dir / rel
            if not path.is_file():
                return None, f"{rel} is missing"
            if sha256_file(path) != digest:
                return None, f"{rel} changed or is corrupt (sha256 mismatch)"
    return StageRecord(stage_dir.name, stage_dir, manifest["key"], manifest), ""


def manifest_hash(manifest: dict) -> str:
    """The sha256 a manifest records of itself: every key but that one (metrics included)."""
    return hash_json({k: v for k, v in manifest.items() if k != MANIFEST_HASH})


def read_run(run_dir: Path, verify: bool = True) -> dict[str, StageRecord]:
    """Every trusted stage of a run folder, in pipeline order (stale ones whose inputs changed left out)."""
    run_dir = Path(run_dir)
    records: dict[str, StageRecord] = {}
    for name in STAGE_ORDER:
        record, _ = read_record(run_dir / name, verify)
        if record is None:
            continue
        inputs = record.manifest.get("inputs", {}).get("upstream", {})
        fresh = all(n in records and records[n].files == v.get("files") for n, v in inputs.items())
        if fresh:
            records[name] = record
    return records


# ---------------------------------------------------------------- the runner


@dataclass
class RunSummary:
    run_dir: Path
    ran: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)
    records: dict[str, StageRecord] = field(default_factory=dict)


@contextlib.contextmanager
def run_lock(run_dir: Path, command: str = "repq run") -> Iterator[None]:
    """One writer per folder (`repq run`, or a command writing its output folder); the OS drops the lock when
    its holder dies, even by SIGKILL."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK, "a+")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RepqError(
                f"{'run ' if command == 'repq run' else ''}folder {run_dir} is in use by another `{command}`: wait "
                "for it, or pass --out OTHER_DIR"
            ) from None
        yield
    finally:
        handle.close()


_ATTEMPT = re.compile(r"^\.tmp-(?P<stage>[a-z_]+)-[0-9a-f]{16}$")
_TRASH = re.compile(r"^\.trash-(?P<stage>[a-z_]+)$")


def is_leftover(path: Path) -> bool:
    """Whether ``path`` is a folder repq itself makes in a run folder for a while: a stage's attempt
    (``.tmp-<stage>-<16 hex>``) or the finished folder it replaces (``.trash-<stage>``)."""
    match = _ATTEMPT.match(path.name) or _TRASH.match(path.name)
    return bool(match) and match["stage"] in STAGE_ORDER and path.is_dir() and not path.is_symlink()


def clean_leftovers(run_dir: Path, log: Callable[[str], None], pattern: str = ".trash-*",
                    keep: Path | None = None) -> None:
    """Folders an interrupted run left behind that nothing will resume: removed, never trusted. Only repq's own
    names (`is_leftover`) in a folder with repq's marker: anything else there is the user's and stays."""
    if read_marker(run_dir) is None:
        return
    for path in sorted(run_dir.glob(pattern)):
        if path != keep and is_leftover(path):
            log(f"removing {path.name}: left by an interrupted run")
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- which folders repq may write


# What the commands that write an output folder write there (how a folder from before markers is recognised).
TRAINING_OUTPUT = frozenset({"last.pt", "best.pt", "metrics.jsonl"})  # repq train, substitute, qat
FINETUNE_OUTPUT = frozenset({"repq.pt", "metrics.json", "model_int8.onnx", "finetune_state.pt"})
# What `repq run` writes at the top of a run folder besides the stage folders and its leftovers.
RUN_FILES = frozenset({MARKER, LOCK, "recipe.yaml", "report.md", "report.html", "metrics.json", "plots"})


def read_marker(folder: Path) -> str | None:
    """The command whose output ``folder`` is, from repq's marker; None when there is none."""
    path = Path(folder) / MARKER
    try:
        made_by = json.loads(path.read_text(encoding="utf-8")).get("made_by")
    except (OSError, ValueError, AttributeError):
        return None
    return made_by if isinstance(made_by, str) else None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def check_not_reading(out: str | os.PathLike, reads=(), flag: str = "--out") -> None:
    """Refuse to write ``out`` when it is, holds or lies inside a path the command reads (its recipe, its data,
    its input model): a write would change or delete what it reads."""
    target = _resolved(out)
    for item in reads:
        if item is None or str(item) == "digits":
            continue
        source = _resolved(item)
        if not source.exists():
            continue
        if _inside(source, target) or _inside(target, source):
            where = "is" if source == target else "holds" if _inside(source, target) else "lies inside"
            raise RepqError(f"{flag} {out} {where} {item}, which this command reads: repq never writes where it "
                            f"reads; pass {flag} somewhere else")


def check_writable(folder: Path, flag: str = "--out", shown: str | os.PathLike | None = None) -> None:
    """Create ``folder`` if needed and write (and remove) a file in it: a one-line error when it cannot be."""
    shown = folder if shown is None else shown
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".repq-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RepqError(f"{flag} {shown}: cannot write into {folder} ({err.strerror or type(err).__name__}): pass "
                        f"{flag} in a folder you can write") from None


def claim_folder(folder: str | os.PathLike, command: str, *, known: frozenset[str] | set[str] = frozenset(),
                 required: tuple[str, ...] = (), accept: tuple[str, ...] = (), reads=(), flag: str = "--out") -> Path:
    """Make sure ``command`` (e.g. ``repq train``) may write into ``folder``, before any work, and mark it.

    Allowed: a new or empty folder; one whose marker names ``command`` (or one of ``accept``); one written before
    repq had markers, recognised by holding only ``known`` names (its own files), all of ``required`` among them.
    Refused in one line: a file, a folder it cannot write, a path it reads from (``reads``), any other non-empty
    folder (its contents are the user's: repq neither overwrites nor deletes them).
    """
    folder, known = Path(folder), set(known) | {MARKER, LOCK}
    if folder.exists() and not folder.is_dir():
        raise RepqError(f"{flag} {folder} is a file, not a folder: pass a folder path (a new one is made)")
    check_not_reading(folder, reads, flag)
    made_by = read_marker(folder) if folder.is_dir() else None
    if folder.is_dir() and made_by is None:
        entries = sorted(p.name for p in folder.iterdir() if p.name != LOCK)  # a lock alone: as good as empty
        legacy = bool(entries) and all(n in known or TEMP_NAME.match(n) for n in entries) and \
            all(n in entries for n in required)
        if entries and not legacy:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise RepqError(f"{flag} {folder} is not empty and repq did not make it (it holds {shown}): repq writes "
                            f"only into a new or empty folder or one it made; pass {flag} NEW_DIR")
    elif made_by is not None and made_by != command and made_by not in accept:
        raise RepqError(f"{flag} {folder} holds the output of `{made_by}`, not of `{command}`: pass {flag} "
                        "another folder")
    check_writable(folder, flag)
    if made_by is None:
        atomic_write_json(folder / MARKER, {"made_by": command, "format": 1})
    return folder


def check_output_file(path: str | os.PathLike, flag: str = "--out", reads=()) -> Path:
    """Make sure a command may write the file ``path``, before any work: not a folder, not a path it reads, not
    a file repq did not write (`written_by_repq`), in a folder it can write."""
    path = Path(path)
    if path.is_dir():
        raise RepqError(f"{flag} {path} is a folder: pass a file path")
    check_not_reading(path, reads, flag)
    if path.exists() and not written_by_repq(path):
        raise RepqError(f"{flag} {path} exists and repq did not write it: repq overwrites only its own files; move "
                        f"it away or pass another {flag}")
    parent = path.parent
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RepqError(f"{flag} {path}: {probe} is a file, not a folder: pass a path in a folder")
    check_writable(parent, flag, path)
    return path


def written_by_repq(path: Path) -> bool:
    """Whether the file ``path`` is one repq wrote, as far as its contents prove it: a checkpoint with repq's
    checksum or record, an ONNX file with repq's metadata, `repq engine --json`'s results."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".pt":
            from repq.reparam.io import load_checkpoint, verify_checksum

            if verify_checksum(path):
                return True
            checkpoint = load_checkpoint(path)
            return "format" in checkpoint or {"arch", "state_dict"} <= set(checkpoint)
        if suffix == ".onnx":
            import onnx

            graph = onnx.load(str(path), load_external_data=False)
            return any(prop.key.startswith("repq.") for prop in graph.metadata_props)
        if suffix == ".json":
            results = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(results, dict) and {"target", "engine", "latency"} <= set(results)
    except Exception:  # noqa: BLE001 -- unreadable, damaged or foreign: not provably repq's
        return False
    return False


@contextlib.contextmanager
def command_output(out: str | os.PathLike, command: str, *, known: frozenset[str] | set[str],
                   required: tuple[str, ...] = (), reads=()) -> Iterator[Path]:
    """`claim_folder` and `run_lock` for a command that writes an output folder (`repq train`, `substitute`,
    `qat`, `finetune`). Under torchrun only rank 0 writes, so only rank 0 claims and locks."""
    out = Path(out)
    if int(os.environ.get("RANK", "0")) != 0:
        yield out
        return
    created = not out.exists()
    try:
        claim_folder(out, command, known=known, required=required, reads=reads)
        with run_lock(out, command):
            yield out
    except BaseException:
        if created:  # refused before it wrote anything: the folder this call made goes again
            _remove_if_only_ours(out)
        raise


def _remove_if_only_ours(folder: Path) -> None:
    try:
        if folder.is_dir() and {p.name for p in folder.iterdir()} <= {MARKER, LOCK}:
            for name in (MARKER, LOCK):
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()
    except OSError:
        pass


def resume_hint(out: str | os.PathLike, state: str, saved: str, argv: list[str]) -> tuple[str, list[str]]:
    """For a command that saves a resumable ``state`` file in ``out`` (pipeline/cli.py's Ctrl-C and disk-full
    lines): (what it kept, the command line that continues it: the same with --resume when there is a state)."""
    path = Path(out) / state
    if not path.is_file():
        return f"nothing resumable was saved yet in {out}", argv
    return f"{saved} is saved in {path}", argv if "--resume" in argv else [*argv, "--resume"]


def attempt_dir(run_dir: Path, stage: str, key: str) -> Path:
    return run_dir / f".tmp-{stage}-{key[:16]}"


def pipeline_stages(recipe: Recipe, registry: dict[str, Stage]) -> tuple[list[Stage], list[str]]:
    """The enabled stages in order (the report is rendered after them), and the names of disabled ones."""
    enabled, disabled = [], []
    missing = []
    for name in STAGE_ORDER:
        if name == "report":
            continue
        if not recipe.stage(name).enabled:
            disabled.append(name)
        elif name not in registry:
            missing.append(name)
        else:
            enabled.append(registry[name])
    if missing:
        offs = " ".join(f"stages.{n}.enabled=false" for n in missing)
        raise RepqError(f"stage(s) {', '.join(missing)} are enabled but not available in this install: "
                        f"install the full repq, or switch them off with {offs}")
    return enabled, disabled


def run_pipeline(recipe: Recipe, run_dir: str | Path, from_stage: str | None = None,
                 registry: dict[str, Stage] | None = None, log: Callable[[str], None] = print,
                 render_report: Callable[[Path, Recipe], Any] | None = None,
                 reads: tuple[str | Path, ...] = ()) -> RunSummary:
    """Run the recipe's enabled stages in order, skipping those whose key is unchanged.

    ``from_stage`` forces that stage and every later one to rerun. ``render_report(run_dir, recipe)`` is
    called after the last stage (the default renders report.md/.html and metrics.json, see engines/report.py).
    ``reads``: more paths the run reads (the recipe file), which the run folder must not touch; the data's are
    taken from the recipe. A non-empty folder without repq's marker is refused before anything is written.
    """
    registry = stage_registry.REGISTRY if registry is None else registry
    run_dir = Path(run_dir)
    if from_stage is not None and from_stage not in STAGE_ORDER:
        raise RepqError(f"--from {from_stage}: unknown stage{_suggest(from_stage, STAGE_ORDER)}; "
                        f"stages are {', '.join(STAGE_ORDER)}")
    stages, disabled = pipeline_stages(recipe, registry)
    enabled_names = [s.name for s in stages] + (["report"] if recipe.stages.report.enabled else [])
    if from_stage is not None and from_stage not in enabled_names:
        raise RepqError(f"--from {from_stage}: that stage is switched off in this recipe; enable it with "
                        f"stages.{from_stage}.enabled=true or pick one of {', '.join(enabled_names)}")
    summary = RunSummary(run_dir, disabled=disabled)
    world = World.join()
    try:
        if world.rank == 0:
            claim_run_dir(run_dir, recipe, reads)
            with run_lock(run_dir):
                _lead(recipe, run_dir, stages, from_stage, summary, world, log)
                if recipe.stages.report.enabled:
                    if render_report is None:
                        from repq.pipeline.run_report import render_run_report as render_report
                    render_report(run_dir, recipe)
        else:
            _follow(recipe, run_dir, stages, summary, world)
        world.barrier()
    finally:
        world.close()
    return summary


def claim_run_dir(run_dir: Path, recipe: Recipe, reads: tuple[str | Path, ...] = ()) -> None:
    """`claim_folder` for `repq run`: a folder written before run folders had a marker is recognised by its
    recipe.yaml and by holding nothing but repq's names."""
    known = set(RUN_FILES) | set(STAGE_ORDER)
    if run_dir.is_dir():
        known |= {p.name for p in run_dir.iterdir() if is_leftover(p)}
    claim_folder(run_dir, "repq run", known=known, required=("recipe.yaml",),
                 reads=(*reads, recipe.data.source, recipe.data.val_source, recipe.model.checkpoint))


def _lead(recipe: Recipe, run_dir: Path, stages: list[Stage], from_stage: str | None, summary: RunSummary,
          world: World, log: Callable[[str], None]) -> None:
    """Rank 0 (or the only process): decides, runs, commits; other ranks hear each decision."""
    clean_leftovers(run_dir, log, ".trash-*")
    atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())
    data_print = data_fingerprint(recipe)
    forced = False
    for stage in stages:
        forced = forced or stage.name == from_stage
        upstream = {n: summary.records[n] for n in stage.upstream_names() if n in summary.records}
        key = stage_key(stage.name, recipe, data_print, upstream)
        existing, why = read_record(run_dir / stage.name)
        cached = existing is not None and existing.key == key and not forced
        if cached:
            world.broadcast({"stage": stage.name, "run": False})
            log(f"{stage.name}: cached - skipping (key {key[:12]})")
            summary.records[stage.name] = existing
            summary.cached.append(stage.name)
            continue
        if forced:
            reason = f"forced by --from {from_stage}"
        elif existing is not None:
            reason = "settings or inputs changed"
        else:
            reason = why
        log(f"{stage.name}: running ({reason})")
        tmp, resume = _prepare_attempt(run_dir, stage.name, key, fresh=forced, log=log)
        world.broadcast({"stage": stage.name, "run": True, "dir": str(tmp), "resume": resume})
        summary.records[stage.name] = _run_stage(stage, recipe, run_dir, key, data_print, upstream, log,
                                                 tmp=tmp, resume=resume, world=world)
        world.barrier()  # the stage folder is in place: the other ranks may read it
        summary.ran.append(stage.name)
    clean_leftovers(run_dir, log, ".tmp-*")  # attempts at keys this recipe no longer asks for


def _follow(recipe: Recipe, run_dir: Path, stages: list[Stage], summary: RunSummary, world: World) -> None:
    """Ranks > 0 under torchrun: join the distributed stages (training), write nothing into the run folder."""
    for stage in stages:
        decision = world.broadcast(None)
        if decision["stage"] != stage.name:
            raise RepqError(f"rank {world.rank} expected stage {stage.name}, rank 0 is at {decision['stage']}: "
                            "start every rank with the same recipe and overrides")
        if decision["run"]:
            if stage.distributed:
                # Rank 0's attempt folder, to read from (a resume's last.pt); only rank 0 writes into it.
                upstream = {n: summary.records[n] for n in stage.upstream_names() if n in summary.records}
                ctx = StageContext(stage.name, recipe, recipe.stage(stage.name), Path(decision["dir"]), run_dir,
                                   upstream, lambda _line: None, resume=decision["resume"], rank=world.rank,
                                   world_size=world.size)
                stage.function()(ctx)
            world.barrier()
        record, why = read_record(run_dir / stage.name, verify=False)
        if record is None:
            raise RepqError(f"rank {world.rank} cannot read stage {stage.name} ({why}): under torchrun on several "
                            "nodes the run folder must be on a file system every node shares")
        summary.records[stage.name] = record
        (summary.ran if decision["run"] else summary.cached).append(stage.name)


@dataclass
class World:
    """The ranks torchrun started (WORLD_SIZE/RANK), or a world of one; rank 0 owns the run folder."""

    rank: int = 0
    size: int = 1
    owns_group: bool = False

    @classmethod
    def join(cls) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        import torch
        import torch.distributed as dist

        owns = False
        if not dist.is_initialized():
            # gloo for the runner's own messages; NCCL for CUDA tensors, which training all-reduces.
            # A day's timeout: ranks > 0 wait in a barrier while rank 0 alone runs a long stage (PTQ, export).
            dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                                    timeout=datetime.timedelta(hours=24))
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), owns)

    def broadcast(self, obj: Any) -> Any:
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _prepare_attempt(run_dir: Path, stage: str, key: str, fresh: bool,
                     log: Callable[[str], None]) -> tuple[Path, bool]:
    """The stage's temp folder for this key, and whether it holds an interrupted attempt to resume."""
    tmp = attempt_dir(run_dir, stage, key)
    clean_leftovers(run_dir, log, f".tmp-{stage}-*", keep=None if fresh else tmp)
    resume = tmp.is_dir()
    if resume:
        log(f"{stage}: resuming the attempt an interrupted run left in {tmp.name}")
        remove_unfinished_writes(tmp, lambda line: log(f"{stage}: {line}"))
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp, resume


def _run_stage(stage: Stage, recipe: Recipe, run_dir: Path, key: str, data_print: dict[str, str],
               upstream: dict[str, StageRecord], log: Callable[[str], None], tmp: Path, resume: bool,
               world: World) -> StageRecord:
    function = stage.function()
    settings = recipe.stage(stage.name)
    started = time.time()
    ctx = StageContext(stage.name, recipe, settings, tmp, run_dir, upstream, log, resume=resume,
                       rank=world.rank, world_size=world.size)
    result = as_result(function(ctx))
    for name, rel in result.outputs.items():
        if not (tmp / rel).exists():
            raise RepqError(f"stage {stage.name} declared output {name}={rel} but did not write it: "
                            "this is a bug in the stage, please report it")
    wall = time.time() - started
    remove_unfinished_writes(tmp, lambda line: log(f"{stage.name}: {line}"))  # only finished files are listed
    manifest = {
        "format": MANIFEST_FORMAT,
        "stage": stage.name,
        "key": key,
        "settings": settings.model_dump(mode="json"),
        "inputs": {
            "model": recipe.model.model_dump(mode="json"),
            "data": {**recipe.data.model_dump(mode="json"), "fingerprint": data_print},
            "seed": recipe.seed,
            "upstream": {n: {"key": r.key, "files": r.files} for n, r in upstream.items()},
        },
        "outputs": result.outputs,
        "files": hash_folder_files(tmp),
        "metrics": result.metrics,
        "wall_s": round(wall, 3),
        "started": _iso(started),
        "finished": _iso(time.time()),
        "versions": versions(),
    }
    manifest[MANIFEST_HASH] = manifest_hash(manifest)
    atomic_write_json(tmp / MANIFEST, manifest)
    _commit(tmp, run_dir / stage.name)
    log(f"{stage.name}: done in {wall:.1f} s")
    record, why = read_record(run_dir / stage.name, verify=False)
    assert record is not None, why
    return record


def _commit(tmp: Path, final: Path) -> None:
    """Swap the finished temp folder into place; a crash in between leaves no folder, never half of one."""
    trash = None
    if final.exists():
        trash = final.with_name(f".trash-{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
    os.rename(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _iso(stamp: float) -> str:
    return _dt.datetime.fromtimestamp(stamp, _dt.timezone.utc).isoformat(timespec="seconds")


def default_run_dir(recipe: Recipe, out: str | Path | None = None) -> Path:
    return Path(out) if out is not None else Path("runs") / recipe.name
