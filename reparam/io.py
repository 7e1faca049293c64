"""Atomic artifact writes and checked checkpoint loads: a crash never leaves a half-written file.

A checkpoint repq writes carries the sha256 of its serialized contents (an extra entry of torch's zip archive,
which torch.load ignores); `load_checkpoint` refuses a file whose contents no longer match it. A write that finds
the disk full raises `DiskFullError` (an OSError, errno ENOSPC) that names the file and the space it needed.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from repq.errors import RepqError

# The name of the checksum entry inside a checkpoint's zip archive (beside torch's archive/data.pkl).
CHECKSUM_ENTRY = ".repq-sha256"
# The temp files `_atomic_write` creates beside their target (mkstemp: 8 random characters): never an artifact.
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """The disk (or quota) filled while repq wrote ``path``: nothing half-written was left behind."""

    def __init__(self, path: str | os.PathLike, needed: int | None = None, free: int | None = None):
        self.path, self.needed, self.free = Path(path), needed, free
        sizes = []
        if needed is not None:
            sizes.append(f"{_size(needed)} needed")
        if free is not None:
            sizes.append(f"{_size(free)} free")
        detail = f" ({', '.join(sizes)})" if sizes else ""
        super().__init__(errno.ENOSPC, f"disk full while writing {self.path}{detail}", str(self.path))

    def __str__(self) -> str:
        return self.strerror


def _size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write, size: int | None = None) -> Path:
    """``write(handle)`` into a temp file beside ``path``, then rename it into place. ``size`` (bytes, when known
    in advance) is checked against the free space first; a full disk raises DiskFullError either way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if size is not None:
        free = _free_bytes(path.parent)
        if free is not None and free < size:
            raise DiskFullError(path, size, free)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            # mkstemp makes the file private (0600): give it what a plain open() would have (0666 less the umask)
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, DiskFullError) and err.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(path, size, _free_bytes(path.parent)) from err
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic_write(path, lambda h: h.write(data), size=len(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save through a temp file + rename, with the sha256 of the serialized contents inside the archive."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(buffer, "a") as archive:
        names = archive.namelist()
        digest = _archive_digest(archive, names)
        prefix = names[0].split("/")[0] if names and "/" in names[0] else "archive"
        entry = zipfile.ZipInfo(f"{prefix}/{CHECKSUM_ENTRY}", date_time=(1980, 1, 1, 0, 0, 0))
        archive.writestr(entry, digest)  # a fixed date: the same checkpoint is the same bytes
    return atomic_write_bytes(path, buffer.getvalue())


def _archive_digest(archive: zipfile.ZipFile, names: list[str]) -> str:
    """sha256 over every entry of a torch archive (name, size, bytes), the checksum entry itself excluded."""
    digest = hashlib.sha256()
    for name in names:
        if name.endswith("/" + CHECKSUM_ENTRY):
            continue
        data = archive.read(name)  # zipfile checks each entry's CRC-32 too
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def verify_checksum(path: str | os.PathLike) -> bool | None:
    """True when the checkpoint's contents match the checksum repq wrote into it, None when it has none (a file
    written before repq recorded one, or by another program); a mismatch or a damaged entry is a RepqError."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return None  # torch's legacy (non-zip) format, or not a checkpoint: torch.load decides
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            stored = [n for n in names if n.endswith("/" + CHECKSUM_ENTRY)]
            actual = _archive_digest(archive, names)  # reads every entry: a bad CRC-32 raises BadZipFile
            expected = archive.read(stored[0]).decode("ascii", "replace").strip() if stored else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise RepqError(f"checkpoint {path} is damaged ({str(err).strip() or type(err).__name__}): its contents "
                        "changed after they were written; re-create it or restore a good copy") from err
    if expected is None:
        return None
    if expected != actual:
        raise RepqError(f"checkpoint {path} fails its checksum (its contents changed after repq wrote it: a bad "
                        "disk, copy or edit): re-create it or restore a good copy")
    return True


def load_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True) with one-line errors for a missing, truncated, altered or foreign file."""
    path = Path(path)
    if path.is_dir():
        raise RepqError(f"checkpoint {path} is a folder: pass the file (a run writes DIR/last.pt and DIR/best.pt)")
    if not path.is_file():
        raise RepqError(f"checkpoint {path} does not exist: check the path (a run writes DIR/last.pt and DIR/best.pt)")
    verify_checksum(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/corrupt zips
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RepqError(f"checkpoint {path} is corrupt or truncated ({first}): re-create it or use another") from err
    if not isinstance(obj, dict):
        raise RepqError(f"checkpoint {path} holds a {type(obj).__name__}, not a repq checkpoint dict: re-save it")
    return obj
