"""Atomic file writes, content hashes and the user cache directory.

Every finished artefact (trial result, cache entry, model) is written to a temporary file in the same
directory and renamed into place, so a crash never leaves a partial file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from locaudit.errors import LocauditError


def cache_dir() -> Path:
    """Root of locaudit's caches: `$LOCAUDIT_CACHE`, else `$XDG_CACHE_HOME/locaudit`, else ~/.cache/locaudit."""
    root = os.environ.get("LOCAUDIT_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "locaudit")
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LocauditError(f"cannot use cache directory {path} ({e.strerror or type(e).__name__}); "
                            f"set LOCAUDIT_CACHE to a writable directory") from None
    return path


def stable_hash(obj: Any, n: int = 16) -> str:
    """Short SHA-256 of a JSON-serialisable object (keys sorted), used to name cache entries."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path`, fsync it and rename it over `path`.

    The temporary file is named `.<name>.<random>.tmp`, so no reader that looks for `<name>` (or globs
    `*.json`, `*.npy`, ...) ever sees it; it is removed on any exception, Ctrl-C included. Only a hard kill
    (SIGKILL, power loss) can leave one behind, and it is then ignored."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: Path) -> Any:
    """Read a JSON file written by `atomic_write_json`; a corrupt file raises LocauditError."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LocauditError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); delete it and rerun") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise LocauditError(f"{path} is not valid JSON; delete it and rerun") from None
    except OSError as e:
        raise LocauditError(f"cannot read {path} ({e.strerror or type(e).__name__}); check it exists and is readable") from None


def prepare_out_dir(out: Path) -> Path:
    """Create an output directory, refusing a path that exists as a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LocauditError(f"--out {out} is an existing file; give a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LocauditError(f"cannot create --out directory {out} ({e.strerror or type(e).__name__}); "
                            f"give a writable directory path") from None
    return out
