"""Data recipes: scripts that prepare splits of the shared datasets (``python -m recipes.NAME``)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def errors_in_one_line(parser: argparse.ArgumentParser, source: object = None) -> Iterator[None]:
    """Bad input inside the block ends the script as argparse does (usage, one line naming the file, exit 2):
    a missing or unreadable file, or a ValueError (not UTF-8, not JSON, not the expected layout), whose
    message is prefixed with ``source`` where it does not name its file itself."""
    try:
        yield
    except OSError as e:
        parser.error(f"{e.filename}: {e.strerror}" if e.filename else str(e))
    except ValueError as e:
        parser.error(f"{source}: {e}" if source is not None else str(e))


def refuse_overwriting_inputs(parser: argparse.ArgumentParser, inputs: Iterable[Path], outputs: Iterable[Path]) -> None:
    """End the script as argparse does, before anything is written, when an output file is one of the inputs."""
    read = {path.resolve() for path in inputs}
    for path in outputs:
        if path.resolve() in read:
            parser.error(f"{path} is an input of this recipe; give another output directory")
