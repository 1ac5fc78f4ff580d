"""argparse types shared by the benchmark entry points: a bad value is one error naming its flag, given before
any work (a benchmark runs for minutes before it reads ``--repeats`` or writes ``--json``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from maskattn.cli import positive_int
from maskattn.tasks.common import read_task


def count(text: str) -> int:
    """An int >= 0 (warm-up rounds)."""
    try:
        return 0 if text.strip() == "0" else positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None


def positive_ints(text: str) -> str:
    """Comma-separated ints >= 1 (sizes, batch sizes), kept as the text the benchmark splits."""
    items = [x for x in text.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    for item in items:
        try:
            positive_int(item)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    return text


def output_path(text: str) -> str:
    """A file the benchmark writes at the end (``--json``, ``--plot``): not a directory, in a directory that exists."""
    path = Path(text)
    if not text.strip() or path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file to write, got {text!r}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the directory {path.parent} does not exist")
    return text



# Inputs that must exist are checked after parsing, not by argparse types: the docs' commands, which name runs and
# data this checkout may not have, are parsed by tests/test_docs_commands.py.
def require_file(parser: argparse.ArgumentParser, flag: str, path: str) -> None:
    """Stop with one argparse error naming ``flag`` unless ``path`` is a file to read (``--text``, test data)."""
    if not Path(path).is_file():
        what = "a directory" if Path(path).is_dir() else "no such file"
        parser.error(f"argument {flag}: expected a file to read, got {path!r} ({what})")


def require_model(parser: argparse.ArgumentParser, flag: str, directory: str, task: str) -> None:
    """Stop with one argparse error naming ``flag`` unless ``directory`` holds a saved ``task`` model (its
    ``task.json`` read and checked), before any work: not a traceback when its turn comes."""
    try:
        read_task(directory, task)
    except ValueError as err:  # io.FormatError too: missing, not a model directory, a modified task.json
        parser.error(f"argument {flag}: expected a model directory of task {task!r}: {err}")
