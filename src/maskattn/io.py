"""Files, at the lowest layer: atomic writes, SHA-256, JSON objects, and the one format error.

Training checkpoints (:mod:`maskattn.checkpoint`) and saved models (:mod:`maskattn.models.persistence`)
both write and verify their files through here, so that

* a crash never leaves a half-written file or directory (write to a temporary name in the same
  directory, fsync, rename over the final name, fsync the directory);
* a missing, truncated or modified file is refused with a :class:`FormatError` naming the file:
  every file of a saved model or checkpoint is listed with its SHA-256 in one ``manifest.json``
  (:func:`write_manifest`, :func:`verify_manifest`). Directories written before the manifest existed
  have none and are loaded with the checks of their time (the weights' hash in config.json / state.json).

The manifest guards against damage and silent edits (a changed setting, a swapped tokenizer); it is
not a signature: whoever can rewrite the files can rewrite the manifest too.

Standard library only; imports nothing from maskattn.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

MANIFEST, MANIFEST_FORMAT = "manifest.json", "maskattn-manifest-1"


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
    path.parent.mkdir(parents=True, exist_ok=True)  # an output path's missing directories (check_output_file)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # what open() would give: some writers (safetensors) make it 0600
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        carried = carried_os_error(e, path)
        if carried is e:
            raise
        raise carried from e
    fsync(path.parent)
    return path


def carried_os_error(error: BaseException, path: str | os.PathLike) -> BaseException:
    """The OSError that a writer written in Rust (safetensors, tokenizers) reports in its own exception type, as
    '... No space left on device (os error 28)', naming ``path``; ``error`` itself when it carries none."""
    found = None if isinstance(error, OSError) else re.search(r"\(os error (\d+)\)", str(error))
    if not isinstance(error, Exception) or found is None:
        return error
    number = int(found[1])
    return OSError(number, os.strerror(number), str(path))


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
    # mkdtemp makes it 0700: give it the permissions mkdir would (keeping a setgid bit it inherited)
    os.chmod(tmp, (tmp.stat().st_mode & ~0o777) | (0o777 & ~_umask()))
    try:
        yield tmp
        for child in sorted(tmp.iterdir()):
            fsync(child)
        old = None
        if path.exists():  # re-writing the same directory (e.g. a final save after a periodic one)
            old = path.with_name(f"{tmp.name}.old")
            os.replace(path, old)  # aside first: a crash before the next line leaves it, not nothing, behind
        os.replace(tmp, path)
        fsync(path.parent)
        if old is not None:
            old.unlink() if old.is_symlink() else shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def set_aside(path: str | os.PathLike) -> Iterator[Path]:
    """Move the directory ``path`` to a fresh hidden sibling (yielded) while the ``with`` block builds a new
    one in its place. The old one is deleted when the block ends without an error; on an error, what the block
    wrote under ``path`` is removed and the old directory put back, unless the block deleted it already
    (then the new one stays)."""
    path = Path(path).resolve()
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.replaced.", dir=path.parent))
    os.replace(path, aside)  # a directory may replace an empty one
    try:
        yield aside
    except BaseException:
        if aside.exists():
            shutil.rmtree(path, ignore_errors=True)
            os.replace(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _umask() -> int:
    """This process's umask, read without setting it where Linux shows it (os.umask sets it process-wide,
    for an instant in which another thread's new files would get mode 0666)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def check_output_file(out: str | os.PathLike, flag: str, inputs: Iterable[str | os.PathLike] = (), *,
                      overwrite: bool = True) -> Path:
    """``out`` as a file the command may write, checked before any work: not empty, not a directory, not one of
    ``inputs`` (files or directories, e.g. a model directory) nor inside one, no file where a directory above it
    must be, and (``overwrite`` False) new. Missing directories above it are left to the writer to make (as
    :func:`atomic_write` does), after every other refusal: a refused command leaves no trace.

    Raises:
        ValueError: naming ``flag``, the path and what is wrong with it.
    """
    if not str(out).strip():
        raise ValueError(f"{flag}: an empty path; give the file to write")
    if str(out).endswith(("/", os.sep)):  # Path() drops the separator: the name would be written as a file
        raise ValueError(f"{flag} {out}: ends in '/', a directory; expected a file to write")
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"{flag} {out}: a directory, expected a file to write")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{flag} {out}: {parent} is a file, not a directory")
    try:
        target = path.resolve()
    except RuntimeError as e:  # Python < 3.13 raises RuntimeError("Symlink loop from ...")
        raise ValueError(f"{flag} {out}: a symbolic link loop ({e})") from None
    sources = []
    for given in inputs:
        try:
            sources.append((given, Path(given).resolve()))
        except RuntimeError as e:  # the input's loop, not the output's: name the input
            raise ValueError(f"{given}: a symbolic link loop ({e}); expected a file or directory to read") from None
    for given, source in sources:
        if target == source or source in target.parents:
            raise ValueError(f"{flag} {out}: that would write over the input {given}; write somewhere else")
    if not overwrite and path.exists():
        raise ValueError(f"{flag} {out} exists; give --overwrite to replace it")
    return path


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


def write_manifest(directory: str | os.PathLike, names: Iterable[str], *, hashes: dict[str, str] | None = None) -> Path:
    """Write ``directory/manifest.json``: the SHA-256 of each named file in ``directory``, atomically.

    ``hashes``: the SHA-256 of files among ``names`` that the caller has just written and hashed (a checkpoint's
    tensors, whose hash its state also records): not read a second time.
    """
    directory = Path(directory)
    known = hashes or {}
    files = {name: known[name] if name in known else sha256(directory / name) for name in sorted(set(names))}
    text = json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=2) + "\n"
    return atomic_write_text(directory / MANIFEST, text)


def manifest_files(directory: str | os.PathLike) -> dict[str, str] | None:
    """``{file name: SHA-256}`` of ``directory``'s manifest, or None when it has none (an older directory).

    Raises:
        FormatError: naming the manifest, when it is not a manifest.
    """
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    meta = read_json_object(path)
    files = meta.get("files")
    if meta.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not all(
            isinstance(k, str) and "/" not in k and "\\" not in k and k not in ("", ".", "..") and isinstance(v, str)
            for k, v in files.items()):
        raise FormatError(f"{path}: not a {MANIFEST_FORMAT} manifest ({{'format', 'files': {{name: sha256}}}})")
    return files


def verify_manifest(directory: str | os.PathLike, reads: Iterable[str], *, every_file: bool = True) -> bool:
    """Check ``directory`` against its manifest before anything in it is read; False when it has none.

    Args:
        directory: a saved model or checkpoint directory.
        reads: the files the caller is about to read: each that exists must be listed (a file added
            after the directory was written is refused, not read).
        every_file: check the hash of every listed file (loading the whole directory); else only of
            the files in ``reads``.

    Raises:
        FormatError: naming the first file that is missing, modified, or not listed.
    """
    directory = Path(directory)
    files = manifest_files(directory)
    if files is None:
        return False
    reads = list(reads)
    for name in reads:
        if (directory / name).is_file() and name not in files:
            raise FormatError(f"{directory / name}: not listed in {MANIFEST}: added or replaced after the directory "
                              "was written; refused")
    for name in (sorted(files) if every_file else [n for n in reads if n in files]):
        path = directory / name
        if not path.is_file():
            raise FormatError(f"{path}: listed in {MANIFEST} but missing")
        if sha256(path) != files[name]:
            raise FormatError(f"{path}: SHA-256 does not match {MANIFEST}: the file is corrupt or was modified")
    return True


def verified_sha256(directory: str | os.PathLike, name: str, verified: bool) -> str:
    """The SHA-256 of ``directory/name``: its manifest's when ``verified`` (what :func:`verify_manifest`, which has
    just hashed every listed file, returned: hashing it again would read the whole file twice), else the file's."""
    return manifest_files(directory)[name] if verified else sha256(Path(directory) / name)


def add_to_manifest(directory: str | os.PathLike, *names: str) -> Path:
    """List ``names`` (files just written into ``directory``) in its manifest beside those already listed,
    after checking those (so that adding a file never vouches for a modified one)."""
    verify_manifest(directory, ())
    return write_manifest(directory, [*(manifest_files(directory) or {}), *names])
