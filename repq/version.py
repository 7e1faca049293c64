"""repq's version, and a fingerprint of the code itself: a run's stage keys include it, so a changed stage reruns."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

__version__ = "0.1.0"
SUBPACKAGES = ("repq", "repq.reparam", "repq.quant", "repq.calibration", "repq.engines", "repq.training",
               "repq.pipeline")


@functools.cache
def code_version() -> str:
    """``<version>+<sha256 of every .py file of the package, first 16 hex digits>``: any edit of the code
    (a bug fix, a changed default) changes it, an edit elsewhere (tests, docs) does not."""
    digest = hashlib.sha256()
    for name in SUBPACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{name}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:16]}"
