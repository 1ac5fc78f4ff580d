"""Validation for the SQuAD slice: hold out whole *articles* of the training file.

The given SQuAD slice is split by article (train: 9 articles, dev: 2), and dev is our test set. Questions
about one paragraph share words and facts, so held-out questions from a training article would
overstate the score; this recipe holds out the last ``--valid`` articles instead::

    python -m recipes.squad_articles ../shared/data/squad/train-v1.1.json runs/squad-split --valid 1

writes ``runs/squad-split/train.json`` and ``runs/squad-split/valid.json`` (SQuAD v1.1 JSON, same version
field as the input) and prints the article titles and question counts of each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from maskattn.data import read_squad
from recipes import errors_in_one_line, refuse_overwriting_inputs


def split(squad: dict[str, Any], valid: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train, valid) SQuAD documents: the last ``valid`` articles are held out."""
    articles = squad.get("data") if isinstance(squad, dict) else None
    if not isinstance(articles, list):
        raise ValueError("expected a SQuAD v1.1 document with a 'data' list of articles")
    if not 1 <= valid < len(articles):
        raise ValueError(f"--valid {valid}: expected 1 to {len(articles) - 1} articles (the file has {len(articles)})")
    version = squad.get("version", "1.1")
    cut = len(articles) - valid
    return {"version": version, "data": articles[:cut]}, {"version": version, "data": articles[cut:]}


def questions(document: dict[str, Any]) -> int:
    return sum(len(p["qas"]) for a in document["data"] for p in a.get("paragraphs", []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train", type=Path, help="the SQuAD v1.1 training JSON")
    parser.add_argument("out", type=Path, help="directory for train.json and valid.json")
    parser.add_argument("--valid", type=int, default=1, help="how many articles, from the end, to hold out")
    args = parser.parse_args(argv)
    refuse_overwriting_inputs(parser, [args.train], [args.out / "train.json", args.out / "valid.json"])
    with errors_in_one_line(parser, args.train):
        train, valid = split(json.loads(args.train.read_text(encoding="utf-8")), args.valid)
    with errors_in_one_line(parser):  # the articles as the qa task reads them, a fault named by line and record
        read_squad(args.train, check_spans=False)
    with errors_in_one_line(parser, args.train):
        args.out.mkdir(parents=True, exist_ok=True)
        for name, doc in (("train", train), ("valid", valid)):
            (args.out / f"{name}.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
            titles = ", ".join(a.get("title", "") for a in doc["data"])
            print(f"{name}: {len(doc['data'])} articles, {questions(doc)} questions ({titles})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
