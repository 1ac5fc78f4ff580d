"""Sentence-level validation for SST-2: hold out whole sentences, and every phrase inside them.

GLUE's SST-2 training split is phrase-level (every node of every parse tree), while its dev split,
which is our test set, holds full sentences. Validation on held-out *phrases* then measures
memorisation: a validation phrase's sentence, and most of its sub-phrases, are in training. This
recipe merges ``train.tsv`` and ``dev.tsv``, finds the full sentences (phrases that occur inside no
other phrase), holds out ``--valid`` of them at random, and drops from training every phrase that occurs
inside a held-out sentence::

    python -m recipes.sst2_sentences ../shared/data/sst2 runs/sst2-split --valid 1000

writes ``runs/sst2-split/train.tsv`` and ``runs/sst2-split/valid.tsv`` (same header as the inputs).
``--valid 0`` holds nothing out: ``train.tsv`` gets every row once (results.md's SST-2 round nine) and no
``valid.tsv`` is written (one left from an earlier split in the directory is removed).
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from recipes import errors_in_one_line, refuse_overwriting_inputs

Row = tuple[str, str]  # (sentence, label)


def read_tsv(path: Path) -> tuple[str, list[Row]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not lines or "\t" not in lines[0]:
        raise ValueError(f"{path}: expected a TSV with a header 'sentence<TAB>label'")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 2 tab-separated fields, got {len(parts)}")
        rows.append((parts[0], parts[1]))
    return lines[0], rows


def _key(text: str) -> str:
    """Word-bounded form, so that 'art' is not found inside 'heart'."""
    return " " + " ".join(text.split()) + " "


def sentences(rows: Sequence[Row]) -> list[int]:
    """Indices of the rows whose text occurs inside no other (longer) row: the full sentences."""
    keys = [_key(t) for t, _ in rows]
    by_word: dict[str, list[int]] = defaultdict(list)
    order = sorted(range(len(rows)), key=lambda i: -len(keys[i]))
    maximal: list[int] = []
    for i in order:
        words = keys[i].split()
        if not words:
            continue
        rarest = min(words, key=lambda w: len(by_word[w]))
        if any(keys[i] in keys[j] for j in by_word[rarest]):
            continue
        maximal.append(i)
        for w in set(words):
            by_word[w].append(i)
    return sorted(maximal)


def split(rows: Sequence[Row], n_valid: int, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """(train, valid): ``n_valid`` random full sentences, and the rows not inside any of them.

    Duplicate rows (same text) are kept once."""
    unique = list(dict.fromkeys(rows))
    full = sentences(unique)
    if not 0 <= n_valid <= len(full):
        raise ValueError(f"--valid {n_valid}: expected 0 to {len(full)} full sentences (the data has {len(full)})")
    held = set(random.Random(seed).sample(full, n_valid))
    held_keys = [_key(unique[i][0]) for i in sorted(held)]
    by_word: dict[str, list[int]] = defaultdict(list)
    for j, key in enumerate(held_keys):
        for w in set(key.split()):
            by_word[w].append(j)
    train = []
    for i, row in enumerate(unique):
        if i in held:
            continue
        key = _key(row[0])
        words = key.split()
        candidates = min((by_word.get(w, []) for w in words), key=len) if words else []
        if not any(key in held_keys[j] for j in candidates):
            train.append(row)
    return train, [unique[i] for i in sorted(held)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="directory with SST-2's train.tsv and dev.tsv")
    parser.add_argument("out", type=Path, help="directory for the new train.tsv and valid.tsv")
    parser.add_argument("--valid", type=int, default=1000,
                        help="full sentences held out (default 1000; 0: every row trains, no valid.tsv)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    refuse_overwriting_inputs(parser, [args.data / "train.tsv", args.data / "dev.tsv"],
                              [args.out / "train.tsv", args.out / "valid.tsv"])
    with errors_in_one_line(parser):
        header, rows = read_tsv(args.data / "train.tsv")
        rows += read_tsv(args.data / "dev.tsv")[1]
        train, valid = split(rows, args.valid, args.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        parts = [("train.tsv", train), ("valid.tsv", valid)] if valid else [("train.tsv", train)]
        if not valid:  # a stale split's valid.tsv must not pass for this one's
            (args.out / "valid.tsv").unlink(missing_ok=True)
        for name, part in parts:
            text = "\n".join([header, *(f"{t}\t{label}" for t, label in part)]) + "\n"
            (args.out / name).write_text(text, encoding="utf-8")
        print(f"{len(rows)} rows in, {len(train)} training rows and {len(valid)} held-out sentences out "
              f"({len(rows) - len(train) - len(valid)} duplicates or phrases of held-out sentences dropped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
