"""The run directory: the one directory a training run writes into, and the rules for using it.

A run's directory is checked before anything is written (:func:`prepare_run_directory`); one that
already holds a run is used only to continue it (resume, of the same run: :func:`check_same_run`) or
to replace it (:func:`replacing_run`, :func:`clear_run_directory`); while a run trains, it holds the
directory's lock (:func:`run_lock`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from maskattn.checkpoint import CheckpointError
from maskattn.errors import RunDirectoryError
from maskattn.io import set_aside

# What a run writes into its directory (the trainer, the tasks, the CLI and the demo): what
# clear_run_directory may delete without asking.
RUN_ENTRIES = ("checkpoints", "best", "model", "metrics.jsonl", "tokenizer.json", "curves.png",
               "cross_attention.png", "cross_attention_heads.png", "events")
RUN_FILE_PATTERN = "hypotheses.*.txt"  # `maskattn evaluate RUN` of a translation run writes its hypotheses here


def prepare_run_directory(out: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """The run directory ``out``, checked (and created) before a run writes anything into it.

    The rule for every run: a directory that already holds something is used only to continue the
    run in it (``resume``) or after :func:`clear_run_directory` (``overwrite``), so that a new run
    never mixes its checkpoints, log or exported model with an older run's.

    Raises:
        RunDirectoryError: ``out`` is a file or lies under one, or it is not empty and neither
            ``resume`` nor ``overwrite`` is given, or both are.
    """
    out = check_run_directory(out, resume=resume, overwrite=overwrite)
    if overwrite:
        clear_run_directory(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_run_directory(out: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """What :func:`prepare_run_directory` checks, without deleting or creating anything: the CLI calls it
    before a task reads its data, so that a bad directory fails at once and a failed ``--overwrite`` run
    (a mistyped data path) leaves the old run in place."""
    if not str(out).strip():  # Path("") is the working directory
        raise RunDirectoryError("out is empty: name the run directory (--out DIR or --set out=DIR)")
    out = Path(out)
    if resume and overwrite:
        raise RunDirectoryError("resume and overwrite exclude each other: continue the run in "
                                f"{out} or replace it, not both")
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise RunDirectoryError(f"run directory {out}: {parent} is a file, not a directory")
    if overwrite:
        _foreign_entries(out)
    elif not resume and out.is_dir() and {p.name for p in out.iterdir()} - {"tokenizer.json"}:
        # (a tokenizer alone is what a run that failed before training leaves: the new run writes its own)
        held = sorted(p.name for p in out.iterdir())
        raise RunDirectoryError(
            f"run directory {out} is not empty (it holds {', '.join(held[:6])}{' ...' if len(held) > 6 else ''}): "
            "resume the run in it (--resume), replace it (--overwrite), or choose another directory (--out)")
    return out


def _foreign_entries(out: Path) -> None:
    """Raise if ``out`` holds anything a run does not write (:data:`RUN_ENTRIES`, hypotheses files)."""
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not _run_entry(p.name))
    if foreign:
        raise RunDirectoryError(f"will not clear {out}: it holds {', '.join(foreign[:6])}, which no maskattn run "
                                "writes (is it really a run directory?); remove them or choose another --out")


def _run_entry(name: str) -> bool:
    if name.startswith("."):  # only what an atomic write of a run's own entry leaves (io.py: ".NAME.<suffix>")
        return any(name[1:].startswith(entry + ".") for entry in RUN_ENTRIES) or \
            fnmatch.fnmatch(name[1:], RUN_FILE_PATTERN + ".*")
    return name in RUN_ENTRIES or fnmatch.fnmatch(name, RUN_FILE_PATTERN)


@contextlib.contextmanager
def run_lock(out: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory ``out`` (created if missing, removed again if left empty) while
    a run trains in it, so that a second process (``--resume`` or ``--overwrite`` of a run still training) is
    refused instead of interleaving its checkpoints and log with the first's. ``flock`` on the directory itself:
    no lock file, and the lock ends with the process however it ends. Without ``fcntl`` (Windows), or on a file
    system that cannot lock a directory (some NFS, Lustre and FUSE mounts), the run goes on unlocked, with a warning.

    Raises:
        RunDirectoryError: another process holds the lock.
    """
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = _lock(out)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)
        if created and out.is_dir() and not any(out.iterdir()):  # a run that failed before writing anything
            out.rmdir()


def _lock(directory: Path) -> int | None:
    """An open descriptor of ``directory`` holding its exclusive flock; None where locking is not available."""
    if fcntl is None:
        return None
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirectoryError(f"run directory {directory} is in use: another maskattn process is training in it; "
                                "wait for it to end (or stop it), or choose another --out") from None
    except OSError as err:
        os.close(fd)
        logging.getLogger("maskattn").warning("run directory %s: cannot be locked on this file system (%s); nothing "
                                              "keeps a second process from training in it", directory, err)
        return None
    return fd


@contextlib.contextmanager
def replacing_run(out: str | Path) -> Iterator[None]:
    """``--overwrite``: the run in ``out`` is moved aside while the new one starts in its place. It is deleted
    when the new run writes its first step checkpoint (:meth:`maskattn.training.Trainer.save`) or ends; if the new
    run fails before that (a mistyped data path, a setting refused once the data is read, SIGTERM), what it wrote is
    removed and the old run put back. (SIGKILL leaves it aside, as ``.<out>.replaced.*`` beside ``out``.)

    Raises:
        RunDirectoryError: naming what in ``out`` a run does not write (then nothing is moved).
    """
    if not _existing_run(out):
        yield
        return
    out = Path(out).resolve()
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced.", dir=out.parent))
    os.replace(out, aside)
    try:
        out.mkdir()  # the new run's directory, locked at once (run_lock holds the old one, now aside)
        fd = _lock(out)
    except (FileExistsError, RunDirectoryError):  # another process took it in that instant: delete neither
        raise RunDirectoryError(f"run directory {out} was taken by another process while this run set the old "
                                f"one aside; the old run is kept at {aside}") from None
    _REPLACED[out] = aside
    previous = _raise_on_sigterm()
    try:
        yield
    except BaseException:  # put the old run back, unless discard_replaced_run deleted it already
        if aside.exists():
            shutil.rmtree(out, ignore_errors=True)
            os.replace(aside, out)
        raise
    finally:
        _REPLACED.pop(out, None)
        if fd is not None:
            os.close(fd)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    shutil.rmtree(aside, ignore_errors=True)


_REPLACED: dict[Path, Path] = {}  # run directory -> the run it replaces, set aside until the first checkpoint


def discard_replaced_run(out: str | Path) -> None:
    """Delete the run that ``out``'s new run replaces (see :func:`replacing_run`), if one is still aside."""
    aside = _REPLACED.pop(Path(out).resolve(), None)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _raise_on_sigterm() -> Any:
    """Make SIGTERM (torchrun stopping its workers, a scheduler's time limit) raise SystemExit, so that
    ``finally`` and ``except`` blocks run; the previous handler, or None when not in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    return previous if previous is not None else signal.SIG_DFL


def clear_run_directory(out: str | Path) -> None:
    """Delete the run in ``out``: only a directory holding nothing but what runs write (:data:`RUN_ENTRIES`).

    The directory is first renamed aside and then deleted, so that a crash half-way leaves no half
    run behind under the name ``out``.

    Raises:
        RunDirectoryError: naming what in ``out`` a run does not write (then nothing is deleted).
    """
    if _existing_run(out):
        with set_aside(out):  # renamed aside, then deleted
            pass


def _existing_run(out: str | Path) -> bool:
    """Whether ``out`` holds a run (a directory of nothing but what runs write); False when it does not exist."""
    out = Path(out)
    if not out.exists():
        return False
    if not out.is_dir():
        raise RunDirectoryError(f"run directory {out} is a file, not a directory")
    _foreign_entries(out)
    return True


def check_same_run(path: str | Path, saved: dict[str, Any] | None, run: dict[str, Any] | None) -> None:
    """Refuse to resume the checkpoint ``path``, trained as the run ``saved``, as a different ``run``: another task,
    or other model settings (a resumed model with 4 heads instead of 2 loads 2-head weights whenever the shapes
    fit). Either None (checkpoints written before runs were kept): nothing to compare.

    Raises:
        CheckpointError: one line naming the first difference.
    """
    if not saved or not run:
        return
    if saved.get("task") != run.get("task"):
        raise CheckpointError(
            f"{path} is a checkpoint of a {saved.get('task')!r} run, not of a {run.get('task')!r} one: resume it "
            f"with `maskattn train {saved.get('task')}`, or train this task in another directory")
    old, new = saved.get("model"), run.get("model")
    if old is None or new is None:  # a model that keeps no settings, or only the task to compare
        return
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key) != new.get(key):
            raise CheckpointError(
                f"checkpoint {path} was trained with model.{key}={old.get(key)!r}, this run has {new.get(key)!r}: "
                "resume with the model settings the run was started with")
