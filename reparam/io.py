"""Atomic artifact writes and checked checkpoint loads: a crash never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from repq.errors import RepqError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            # mkstemp makes the file private (0600): give it what a plain open() would have (0666 less the umask)
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic_write(path, lambda h: h.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save through a temp file + rename."""
    return _atomic_write(path, lambda h: torch.save(obj, h))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True) with one-line errors for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise RepqError(f"checkpoint {path} does not exist: check the path (a run writes DIR/last.pt and DIR/best.pt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/corrupt zips
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RepqError(f"checkpoint {path} is corrupt or truncated ({first}): re-create it or use another") from err
    if not isinstance(obj, dict):
        raise RepqError(f"checkpoint {path} holds a {type(obj).__name__}, not a repq checkpoint dict: re-save it")
    return obj
