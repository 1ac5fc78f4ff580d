"""Reading datasets and cutting them into batches.

Readers load a whole file before anything else happens and stop at the first malformed record with
a :class:`DataError` naming the file and line, so a bad file never yields a half-trained model.

Batching: length-bucketed batches of padded token ids with their lengths (from which models build
key-padding masks), and sequence packing with document ids (for ``masks.document``).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import torch
from torch import Tensor


class DataError(ValueError):
    """A malformed input file; the message names the file and line."""


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a UTF-8 text file, gzip-compressed when its name ends in ``.gz``.

    The whole file is read and decoded here (every reader reads it whole anyway), so that a file
    that is not gzip or not UTF-8 is one :class:`DataError` naming it (and the line), not an error
    from deep inside a reader.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}" if not path.is_dir() else f"{path} is a directory, "
                                "expected a data file")
    raw = path.read_bytes()
    if path.suffix.lower() == ".gz":  # (.GZ too)
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a gzip file, though its name ends in .gz ({e})") from e
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Excel's CSV, Notepad) is not text
    except UnicodeDecodeError as e:
        if raw.startswith(b"\x1f\x8b"):  # gzip's magic number
            raise DataError(f"{path}: gzip-compressed, but its name does not end in .gz; rename it to "
                            f"{path.name}.gz") from e
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                        "convert the file to UTF-8") from e
    return io.StringIO(text, newline=None)


def _lines(path: str | Path) -> list[str]:
    """The lines of a text file, without the blank lines at its end."""
    with open_text(path) as f:
        lines = [line.rstrip("\r\n") for line in f]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


# --- readers ---------------------------------------------------------------------------------------
def read_parallel(src: str | Path, tgt: str | Path | None = None, *,
                  fields: tuple[str, str] = ("source", "target")) -> list[tuple[str, str]]:
    """Sentence pairs from two aligned files (one sentence per line) or from one TSV of ``src<TAB>tgt``
    (``fields`` names the two columns in its errors)."""
    if tgt is not None:
        left, right = _lines(src), _lines(tgt)
        counts = f"{src} has {len(left)} lines but {tgt} has {len(right)}"
        # a blank line inside either file is named first, counts equal or not: it shifts every later pair
        for n, (a, b) in enumerate(zip_longest(left, right, fillvalue="-"), 1):
            if not a.strip() or not b.strip():
                raise DataError(f"{src if not a.strip() else tgt}:{n}: empty sentence in a parallel file"
                                + (f" ({counts})" if len(left) != len(right) else ""))
        if len(left) != len(right):
            raise DataError(f"{counts}: the files are not aligned")
        return list(zip(left, right, strict=True))
    pairs = []
    for n, line in enumerate(_lines(src), 1):
        cells = line.split("\t")
        if len(cells) != 2 or not cells[0].strip() or not cells[1].strip():
            raise DataError(f"{src}:{n}: expected '{fields[0]}<TAB>{fields[1]}', got {len(cells)} field(s): "
                            f"{line[:60]!r}")
        pairs.append((cells[0], cells[1]))
    return pairs


def read_labelled(
    path: str | Path, *, text_field: str = "sentence", label_field: str = "label"
) -> list[tuple[str, str]]:
    """(text, label) records from a TSV or CSV with a header row, or from JSONL; labels kept as strings."""
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")  # (x.CSV, x.jsonl.GZ too, as open_text reads .GZ)
    if name.endswith(".jsonl"):
        return _read_jsonl_labelled(path, text_field, label_field)
    delimiter = "," if name.endswith(".csv") else "\t"
    with open_text(path) as f:
        quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE  # SST-2 has bare quotes
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        rows, line = [], 1  # (the line a row starts on, its fields): a quoted CSV field may hold line breaks
        try:
            for row in reader:
                rows.append((line, row))
                line = reader.line_num + 1
        except csv.Error as e:  # e.g. a field longer than csv.field_size_limit()
            raise DataError(f"{path}:{reader.line_num}: {e}") from e
    if not rows:
        raise DataError(f"{path}:1: empty file, expected a header row with '{text_field}' and '{label_field}'")
    header = [h.strip() for h in rows[0][1]]
    for field in (text_field, label_field):
        if field not in header:
            shown = repr(header) if len(repr(header)) <= 80 else repr(header)[:77] + "..."  # a text file: one long line
            raise DataError(f"{path}:1: no column '{field}' in the header {shown}")
        if header.count(field) > 1:
            first, second = [i + 1 for i, h in enumerate(header) if h == field][:2]
            raise DataError(f"{path}:1: the header names '{field}' twice (columns {first} and {second})")
    ti, li = header.index(text_field), header.index(label_field)
    records = []
    for n, row in rows[1:]:
        if len(row) <= 1 and not "".join(row).strip():  # a blank line, or spaces alone (JSONL skips them too)
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{n}: expected {len(header)} fields like the header, got {len(row)}")
        text, label = row[ti].strip(), row[li].strip()
        if not label:
            raise DataError(f"{path}:{n}: empty label")
        records.append((text, label))
    return records


def _read_jsonl_labelled(path: Path, text_field: str, label_field: str) -> list[tuple[str, str]]:
    records = []
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or text_field not in obj or label_field not in obj:
            raise DataError(f"{path}:{n}: expected an object with '{text_field}' and '{label_field}'")
        if not isinstance(obj[label_field], (str, int)) or isinstance(obj[label_field], bool):
            raise DataError(f"{path}:{n}: label must be a string or an integer, got {obj[label_field]!r}")
        if not isinstance(obj[text_field], str):
            raise DataError(f"{path}:{n}: '{text_field}' must be a string, got {obj[text_field]!r}")
        records.append((str(obj[text_field]), str(obj[label_field])))
    return records


@dataclass(frozen=True)
class QAExample:
    """One SQuAD question, as :func:`read_squad` reads it (``maskattn.tasks.qa`` cuts it into windows).

    ``answers`` are (text, character start) pairs; the first is the training target.
    """

    id: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]
    title: str = ""


def read_squad(path: str | Path, *, check_spans: bool = True, require_answers: bool = False) -> list[QAExample]:
    """SQuAD v1.1 JSON (data -> paragraphs -> qas -> answers with ``answer_start``).

    Args:
        path: the file (``.gz`` allowed).
        check_spans: require every answer's text at its ``answer_start`` in the context.
        require_answers: require at least one answer per question (scoring needs one).

    Raises:
        DataError: on the first malformed record, naming the file and line, the article / paragraph /
            question index and the field (missing, of the wrong type, an empty answer text, or a span outside
            the context).
    """
    with open_text(path) as f:
        raw = f.read()
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}:1: expected SQuAD JSON with a top-level 'data' list")

    def where(qid: object, at: str) -> Callable[[], str]:  # the line of a question id (if found) and the position
        def place() -> str:  # called for an error only: a search of the whole file per question was quadratic
            found = -1
            if isinstance(qid, str):  # written with or without \u escapes
                found = max(raw.find(json.dumps(qid)), raw.find(json.dumps(qid, ensure_ascii=False)))
            return f"{path}:{raw.count(chr(10), 0, found) + 1 if found >= 0 else 1}: {at}"
        return place

    examples = []
    for a, article in enumerate(doc["data"]):
        at = f"data[{a}]"
        article = _squad_field({"article": article}, "article", dict, where(None, at))
        title = _squad_field(article, "title", str, where(None, at), default="")
        for p, paragraph in enumerate(_squad_field(article, "paragraphs", list, where(None, at), default=[])):
            at = f"data[{a}].paragraphs[{p}]"
            paragraph = _squad_field({"paragraph": paragraph}, "paragraph", dict, where(None, at))
            context = _squad_field(paragraph, "context", str, where(None, at))
            for q, qa in enumerate(_squad_field(paragraph, "qas", list, where(None, at))):
                at = f"data[{a}].paragraphs[{p}].qas[{q}]"
                qa = _squad_field({"question": qa}, "question", dict, where(None, at))
                qid = _squad_field(qa, "id", str, where(None, at))
                here = where(qid, f"{at} (question {qid!r})")
                question = _squad_field(qa, "question", str, here)
                answers = []
                for n, ans in enumerate(_squad_field(qa, "answers", list, here, default=[])):
                    spot = where(qid, f"{at} (question {qid!r}), answers[{n}]")
                    ans = _squad_field({"answer": ans}, "answer", dict, spot)
                    text, start = _squad_field(ans, "text", str, spot), _squad_field(ans, "answer_start", int, spot)
                    if not text.strip():  # no token covers it: it would train on "no answer here"
                        raise DataError(f"{spot()}: field 'text': an empty answer {text!r}")
                    if check_spans and not (0 <= start <= len(context) - len(text)
                                            and context[start : start + len(text)] == text):
                        found = context[max(0, start) : max(0, start) + len(text)]
                        raise DataError(f"{spot()}: field 'answer_start': answer {text!r} is not at character {start} "
                                        f"of its context of {len(context)} characters (found {found!r})")
                    answers.append((text, start))
                if require_answers and not answers:
                    raise DataError(f"{here()}: field 'answers': no answer to score against (evaluation needs "
                                    "SQuAD v1.1 answers)")
                examples.append(QAExample(qid, question, context, tuple(answers), title))
    return examples


_MISSING = object()


def _squad_field(record: dict, name: str, kind: type, where: Callable[[], str], default: object = _MISSING):
    """``record[name]`` if it is a ``kind`` (bool is not an int); else DataError naming ``where()`` and the field."""
    if name not in record:
        if default is not _MISSING:
            return default
        raise DataError(f"{where()}: field {name!r} is missing")
    value = record[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"{where()}: field {name!r} must be a JSON {_JSON_TYPES[kind]}, got "
                        f"{type(value).__name__} {str(value)[:40]!r}")
    return value


_JSON_TYPES = {dict: "object", list: "list", str: "string", int: "integer"}


def read_text(path: str | Path) -> str:
    """A whole plain-text file (for language modelling)."""
    with open_text(path) as f:
        return f.read()


# --- batching --------------------------------------------------------------------------------------
def pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token id lists into (B, L) ids and (B,) lengths."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    ids = torch.full((len(sequences), int(lengths.max()) if len(sequences) else 0), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return ids, lengths


def bucket_batches(
    lengths: Sequence[int], max_tokens: int, *, seed: int, epoch: int, shuffle: bool = True, pool: int = 100
) -> list[list[int]]:
    """Group example indices into batches of similar length, each at most ``max_tokens`` padded tokens.

    Deterministic in (seed, epoch): the order of a resumed run is the order of the original run.
    Examples are shuffled, sorted by length within pools of ``pool`` batches' worth, cut into batches,
    and the batches shuffled again, so every batch has little padding but the order stays random.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    batches: list[list[int]] = []
    mean = max(1, sum(lengths) // max(1, len(lengths)))
    pool_size = max(1, pool * max_tokens // mean)
    for start in range(0, len(order), pool_size):
        chunk = sorted(order[start : start + pool_size], key=lambda i: lengths[i])
        batch: list[int] = []
        longest = 0
        for i in chunk:
            longest_if_added = max(longest, lengths[i])
            if batch and longest_if_added * (len(batch) + 1) > max_tokens:
                batches.append(batch)
                batch, longest_if_added = [], lengths[i]
            batch.append(i)
            longest = longest_if_added
        if batch:
            batches.append(batch)
    if shuffle:
        rng.shuffle(batches)
    return batches


def mixed_seed(value: int) -> int:
    """A seed made of several numbers (``seed * 7919 + epoch``), as torch's generators take it: below 2**64, where
    they overflow (a ``train.seed`` near 2**63 did); every value torch took before is returned as it is."""
    return value % 2**64


def random_batches(count: int, size: int, *, seed: int, epoch: int, drop_last: bool = False) -> list[list[int]]:
    """The indices 0..count-1 in a random order, cut into batches of ``size`` (the last one shorter, or dropped
    with ``drop_last``). Deterministic in (seed, epoch), like :func:`bucket_batches`."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(mixed_seed(seed * 7919 + epoch))).tolist()
    end = count - size + 1 if drop_last else count
    return [order[i : i + size] for i in range(0, max(end, 0), size)]


def shard(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """Split every batch between ranks (a distributed sampler over batches): rank r takes items r::world_size.

    Batches with fewer items than ranks are dropped so that every rank runs the same number of steps.
    """
    return [b[rank::world_size] for b in batches if len(b) >= world_size]


def pack(sequences: Sequence[Sequence[int]], block: int) -> tuple[Tensor, Tensor]:
    """Concatenate token sequences and cut them into rows of ``block`` tokens.

    Returns:
        (N, block) token ids and (N, block) document ids (the index of the sequence each token came
        from, for ``masks.document``). The tail that does not fill a row is dropped.
    """
    flat = [t for s in sequences for t in s]
    docs = [d for d, s in enumerate(sequences) for _ in s]
    rows = len(flat) // block
    ids = torch.tensor(flat[: rows * block], dtype=torch.long).view(rows, block)
    doc_ids = torch.tensor(docs[: rows * block], dtype=torch.long).view(rows, block)
    return ids, doc_ids
