"""Files, at the lowest layer: atomic writes, SHA-256, JSON objects, and the one format error.

Training checkpoints (:mod:`maskattn.checkpoint`) and saved models (:mod:`maskattn.models.persistence`)
both write and verify their files through here, so that

* a crash never leaves a half-written file or directory (write to a temporary name in the same
  directory, fsync, rename over the final name, fsync the directory);
* a missing, truncated or modified file is refused with a :class:`FormatError` naming the file.

Standard library only; imports nothing from maskattn.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class FormatError(ValueError):
    """A file or directory is missing, corrupt, or not in the format that reads it.

    A ``ValueError``, so ``except ValueError`` clauses written before this type existed still catch it.
    """


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of the file at ``path``, as 64 hex digits (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync(path: str | os.PathLike) -> None:
    """Flush the file or directory at ``path`` to disk (a directory: the names it holds)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write the file ``path`` through ``write(tmp)``: a crash leaves the old file or the new one, never half.

    ``write`` receives a temporary path in the same directory (so the rename stays on one file
    system) and must create the file there; it is then fsynced and renamed over ``path``, and the
    directory is fsynced. On any error the temporary file is removed and the error propagates.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of ``text`` (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build the directory ``path`` inside the ``with`` block; it appears whole or not at all.

    Yields a temporary directory beside ``path`` to fill. When the block ends without an error, every
    file in it is fsynced, an existing ``path`` is replaced, and the parent directory is fsynced; on
    an error the temporary directory is removed and the error propagates.
    """
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        for child in sorted(tmp.iterdir()):
            fsync(child)
        if path.exists():  # re-writing the same directory (e.g. a final save after a periodic one)
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in the file ``path``.

    Raises:
        FormatError: naming the file, when it is missing, not valid JSON (or not UTF-8), or holds
            something other than an object.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: file not found")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
