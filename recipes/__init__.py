"""Data recipes: scripts that prepare splits of the shared datasets (``python -m recipes.NAME``)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager


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
