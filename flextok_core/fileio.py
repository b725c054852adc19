"""Atomic file and folder writes: a reader (or a run killed mid-write) never sees a half-written output."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it) ...
os.umask(_UMASK)  # ... and put back at once


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path`` (same suffix), then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; the output gets a normal file's permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a folder so that a partial deletion never looks like the original: rename first, then delete."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.time_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a finished folder into place; an old one is swapped out first and deleted afterwards."""
    tmp, final = Path(tmp), Path(final)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{final} is an existing file, not a folder; refusing to replace it")
    old = None
    if final.exists():
        old = final.with_name(f".trash-{final.name}-{os.getpid()}-{time.time_ns()}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json_object(path: str | os.PathLike, what: str = "") -> dict:
    """A JSON file that must hold an object (a config); ValueError naming the file (and ``what`` it is) otherwise."""
    import json

    name = f"{what} {path}".strip()
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{name} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", int: "an integer", float: "a number", bool: "a boolean"}.get(
            type(data), "null" if data is None else type(data).__name__)
        raise ValueError(f"{name} must be a JSON object, got {kind}")
    return data
