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
import shutil
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
from repq.reparam.io import atomic_write_json, atomic_write_text

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
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
    """sha256 of every file under ``folder`` (relative POSIX paths), the manifest itself excluded."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            hashes[path.relative_to(folder).as_posix()] = sha256_file(path)
    return hashes


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
    if verify:
        recorded = manifest.get("files", {})
        for rel, digest in recorded.items():
            path = stage_dir / rel
            if not path.is_file():
                return None, f"{rel} is missing"
            if sha256_file(path) != digest:
                return None, f"{rel} changed or is corrupt (sha256 mismatch)"
    return StageRecord(stage_dir.name, stage_dir, manifest["key"], manifest), ""


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
def run_lock(run_dir: Path) -> Iterator[None]:
    """One runner per run folder; the OS drops the lock when its holder dies, even by SIGKILL."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RepqError(
                f"run folder {run_dir} is in use by another `repq run`: wait for it, or pass --out OTHER_DIR"
            ) from None
        yield
    finally:
        handle.close()


def clean_leftovers(run_dir: Path, log: Callable[[str], None], pattern: str = ".trash-*",
                    keep: Path | None = None) -> None:
    """Folders an interrupted run left behind that nothing will resume: removed, never trusted."""
    for path in sorted(run_dir.glob(pattern)):
        if path != keep:
            log(f"removing {path.name}: left by an interrupted run")
            shutil.rmtree(path, ignore_errors=True)


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
                 render_report: Callable[[Path, Recipe], Any] | None = None) -> RunSummary:
    """Run the recipe's enabled stages in order, skipping those whose key is unchanged.

    ``from_stage`` forces that stage and every later one to rerun. ``render_report(run_dir, recipe)`` is
    called after the last stage (the default renders report.md/.html and metrics.json, see engines/report.py).
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
