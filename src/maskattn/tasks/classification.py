"""Text classification and sentiment with :class:`~maskattn.models.EncoderModel`: from scratch, or
fine-tuned from a pretrained BERT-style encoder (``data.pretrained``, e.g. all-MiniLM-L6-v2).

Inputs are ``[CLS] text [SEP]`` (``<s> text </s>`` with a tokenizer trained here); the label set is
read from the training data and saved with the model.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from dataclasses import fields as fields_of
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskattn import metrics
from maskattn.data import DataError, bucket_batches, pad, random_batches, read_labelled
from maskattn.errors import SettingError, UsageError, check_settings
from maskattn.io import read_json_object
from maskattn.models import EncoderConfig, EncoderModel, from_pretrained
from maskattn.tasks.base import Command, Option, Task, TrainingBatches, input_lines, register
from maskattn.tasks.common import (
    TOKENIZERS,
    Head,
    begin_run,
    fine_tunable,
    fit_and_export,
    load_task,
    log_stderr,
    logger,
    not_empty,
    parameters,
    read_task,
    refuse_ignored_batch_size,
    require,
    train_tokenizer,
)
from maskattn.tokenization import SPECIALS, Tokenizer
from maskattn.training import TrainConfig


@dataclass
class DataConfig:
    train: str = ""  # training file: TSV/CSV with a header, or JSONL
    valid: str = ""  # validation file (evaluated during training; never the test set)
    text_field: str = "sentence"  # column (or key) of the text
    label_field: str = "label"  # column (or key) of the label
    pretrained: str = ""  # directory of a pretrained BERT-style encoder to fine-tune; empty = from scratch
    tokenizer: str = "bpe"  # from scratch: bpe | chars
    vocab_size: int = 8000  # from scratch: BPE vocabulary size
    max_len: int = 128  # longer texts are cut
    max_tokens: int = 4096  # padded tokens per batch, rows of similar length together; 0: data.batch_size rows
    batch_size: int = 32  # with data.max_tokens=0: rows per batch, drawn at random (the GLUE examples' batching)
    word_dropout: float = 0.0  # training only: each token (not [CLS]/[SEP]) is deleted with this probability
    embeddings: str = ""  # from scratch: a pretrained BERT directory whose tokenizer and word vectors start the model
    freeze_embeddings: bool = False  # with data.embeddings: keep those word vectors fixed (static vectors)

    def __post_init__(self) -> None:
        check_settings(self, {"tokenizer": ("one of", tuple(TOKENIZERS)), "vocab_size": ("int>=", len(SPECIALS)),
                              "max_len": ("int>=", 3), "max_tokens": ("int>=", 0), "batch_size": ("int>=", 1),
                              "word_dropout": ("in", (0, 1, "[)"))})
        refuse_ignored_batch_size(self)
        if self.text_field == self.label_field:  # the model would learn to read its own label
            raise SettingError(f"data.text_field and data.label_field must name different fields, both are "
                               f"{self.text_field!r}")


@dataclass
class ClassificationConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: EncoderConfig = field(default_factory=lambda: EncoderConfig.preset("small", dropout=0.1))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=5e-4, schedule="cosine", metric="accuracy", higher_is_better=True, warmup=200))
    out: str = "runs/classification"  # run directory


def encode(tok: Tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    # without outer whitespace, as read_labelled reads training and evaluation texts (SST-2's end in a space)
    return [[tok.bos_id, *ids[: max_len - 2], tok.eos_id] for ids in tok.encode_batch([t.strip() for t in texts])]


def build_tokenizer(cfg: ClassificationConfig, texts: Sequence[str]) -> Tokenizer:
    """The pretrained encoder's tokenizer, or one of kind ``data.tokenizer`` trained on ``texts``."""
    if cfg.data.pretrained or cfg.data.embeddings:
        return Tokenizer.load(cfg.data.pretrained or cfg.data.embeddings)
    return train_tokenizer(cfg.data.tokenizer, texts, vocab_size=cfg.data.vocab_size)


def build_model(cfg: ClassificationConfig, labels: list[str], tok: Tokenizer) -> EncoderModel:
    """The pretrained encoder with a new head of ``len(labels)`` classes, or a new model sized for ``tok``."""
    if cfg.data.pretrained:
        model = fine_tunable(from_pretrained(cfg.data.pretrained, num_labels=len(labels)), cfg.data.pretrained)
        if model.config.max_len < cfg.data.max_len:  # else found at the first batch holding a longer text
            raise UsageError(f"data.max_len={cfg.data.max_len} is longer than the {model.config.max_len} positions of "
                             f"data.pretrained ({cfg.data.pretrained}); set data.max_len <= {model.config.max_len}")
        model.config = replace(model.config, pooling=cfg.model.pooling)  # the one model setting that applies
        return model
    if cfg.model.max_len < cfg.data.max_len:  # was raised to data.max_len without a word
        raise UsageError(f"model.max_len={cfg.model.max_len} is shorter than data.max_len={cfg.data.max_len} (where "
                         f"texts are cut): set data.max_len <= {cfg.model.max_len} or a longer model.max_len")
    model_cfg = replace(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id, num_labels=len(labels))
    model = EncoderModel(model_cfg)
    if cfg.data.embeddings:
        copy_word_vectors(model, cfg.data.embeddings)
        model.embed.tokens.weight.requires_grad_(not cfg.data.freeze_embeddings)
    elif cfg.data.freeze_embeddings:
        raise ValueError("data.freeze_embeddings needs data.embeddings (word vectors to keep fixed)")
    return model


def copy_word_vectors(model: EncoderModel, directory: str) -> None:
    """Start ``model``'s token embedding table from the one of the pretrained encoder in ``directory``
    (the rest of ``model`` stays freshly initialised)."""
    source = from_pretrained(directory).embed.tokens.weight  # (V, E')
    target = model.embed.tokens.weight  # (V, E)
    if source.shape != target.shape:
        raise ValueError(f"data.embeddings ({directory}): word vectors of shape {tuple(source.shape)}, the model's "
                         f"table is {tuple(target.shape)}; set model.d_model={source.shape[1]}")
    with torch.no_grad():
        target.copy_(source)


def build(cfg: ClassificationConfig, labels: list[str], texts: Sequence[str]) -> tuple[EncoderModel, Tokenizer]:
    """The model and tokenizer of a new run."""
    tok = build_tokenizer(cfg, texts)
    return build_model(cfg, labels, tok), tok


def probabilities(model: EncoderModel, tok: Tokenizer, texts: Sequence[str], *, batch_size: int = 64,
                  max_len: int | None = None) -> Tensor:
    """(N, C) class probabilities of ``texts`` on the CPU, each cut to ``max_len`` tokens (the run's
    ``data.max_len``; default the model's positions)."""
    model.eval()
    device = next(model.parameters()).device
    ids = encode(tok, texts, min(max_len or model.config.max_len, model.config.max_len))
    out = [torch.zeros(0, model.config.num_labels)]
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            x, lengths = pad(ids[start : start + batch_size], tok.pad_id)
            logits = model.classify(x.to(device), lengths=lengths.to(device))  # (b, C)
            out.append(logits.float().softmax(-1).cpu())
    return torch.cat(out)


def predict(model: EncoderModel, tok: Tokenizer, labels: list[str], texts: Sequence[str], *,
            batch_size: int = 64, max_len: int | None = None) -> list[str]:
    """The label of each text, cut to ``max_len`` tokens (the run's ``data.max_len``; default the model's
    positions)."""
    found = probabilities(model, tok, texts, batch_size=batch_size, max_len=max_len)
    return [labels[i] for i in found.argmax(-1).tolist()]


def _members(directories: Sequence[str | Path] | str | Path | None, what: str) -> list[str | Path]:
    if isinstance(directories, (str, os.PathLike)):  # a lone path would be read as its characters
        raise TypeError(f"{what}: a list of model directories, got the single path {str(directories)!r}")
    return list(directories or ())


def ensemble_probabilities(directories: Sequence[str | Path], texts: Sequence[str]) -> tuple[list[str], Tensor]:
    """The models' labels and the mean of their (N, C) class probabilities.

    Each model reads the texts with its own tokenizer and ``data.max_len``, so members trained from scratch
    and fine-tuned ones mix; they must know the same labels. Probabilities, not logits, are averaged: the
    logits of separately trained classifiers need not share a scale. Every member's ``task.json`` is checked
    before any model runs; the models are then loaded and run one at a time.

    Raises:
        ValueError: ``directories`` is empty; the first is not a classification model.
        UsageError: a later member (``--ensemble``) is not a classification model or knows other labels.
    """
    directories = _members(directories, "directories")
    if not directories:
        raise ValueError("directories: empty; give at least one model directory")
    labels = list(read_task(directories[0], "classification")["labels"])
    for other in directories[1:]:
        try:
            theirs = list(read_task(other, "classification")["labels"])
        except ValueError as e:  # FormatError included: no task.json, a modified one
            raise UsageError(f"--ensemble {other}: {e}") from e
        if theirs != labels:  # sorted when a run reads its training data
            raise UsageError(f"--ensemble {other}: labels {theirs}, but {directories[0]} has {labels}; "
                             "ensemble members must know the same labels")
    total = torch.zeros(len(texts), len(labels))
    for directory in directories:
        model, tok, task = load(directory)
        total += probabilities(model, tok, texts, max_len=task.get("max_len"))  # (N, C)
    return labels, total / len(directories)


def score(predicted: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    return {"accuracy": 100 * metrics.accuracy(predicted, gold), "macro_f1": 100 * metrics.macro_f1(predicted, gold)}


def unseen_labels(labels: Sequence[str], gold: Sequence[str], source: str) -> int:
    """How many of ``gold`` are not among the model's ``labels`` (always scored wrong); warns naming them."""
    known = set(labels)  # once (built per example, the check grew as examples x labels)
    unseen = [label for label in gold if label not in known]
    if unseen:
        logger.warning(f"{source}: {len(unseen)} of {len(gold)} examples have labels the model was not trained on "
                       f"({sorted(set(unseen))[:8]}; it knows {list(labels)[:8]}): they are scored as wrong")
    return len(unseen)


Classify = partial(Head, method="classify")  # deprecated: Head(model, "classify")


def train(cfg: ClassificationConfig, *, resume: bool = False, log=log_stderr) -> dict[str, Any]:
    """Train a text classifier on ``cfg.data.train`` (a labelled TSV/CSV or JSONL); return the last validation
    scores and the model dir."""
    require(cfg.data, "data", train="a TSV/CSV with a header, or JSONL")
    fields = {"text_field": cfg.data.text_field, "label_field": cfg.data.label_field}
    records = read_labelled(cfg.data.train, **fields)
    valid = (not_empty(read_labelled(cfg.data.valid, **fields), "data.valid", cfg.data.valid, "examples")
             if cfg.data.valid else None)
    labels = sorted({label for _, label in records})
    if len(labels) < 2:
        raise ValueError(f"{cfg.data.train}: found {len(labels)} label(s) {labels}; classification needs two or more")
    texts = [t for t, _ in records]
    if valid:
        unseen_labels(labels, [label for _, label in valid], f"data.valid ({cfg.data.valid})")
    out, tok = begin_run(cfg, resume=resume, task="classification", tokenizer=lambda: build_tokenizer(cfg, texts))
    model = build_model(cfg, labels, tok)
    ids = encode(tok, texts, cfg.data.max_len)
    targets = _label_ids(labels, records)
    lengths = [len(x) for x in ids]
    log(f"classification: {len(ids)} examples, labels {labels}, vocabulary {tok.vocab_size}, {parameters(model)}")

    collate = partial(_collate, tok, ids, targets)

    def plan(epoch: int) -> list[list[int]]:
        if cfg.data.max_tokens:
            return bucket_batches(lengths, cfg.data.max_tokens, seed=cfg.train.seed, epoch=epoch)
        return random_batches(len(ids), cfg.data.batch_size, seed=cfg.train.seed, epoch=epoch)

    def loss(m: nn.Module, b: dict[str, Any]) -> Tensor:
        x, n = b["ids"], b["lengths"]
        if m.training and cfg.data.word_dropout:  # here, not in collate: the trainer seeds each step's RNG
            device = x.device
            x, n = (t.to(device) for t in drop_tokens(x, n, cfg.data.word_dropout, tok.pad_id))
        return F.cross_entropy(m(x, lengths=n).float(), b["labels"], reduction="sum")

    def evaluate(m: nn.Module) -> dict[str, float]:
        return score(predict(model, tok, labels, [t for t, _ in valid], max_len=cfg.data.max_len),
                     [label for _, label in valid])

    return fit_and_export(
        Head(model, "classify"), tok, cfg.train, out, evaluate=evaluate if valid else None, resume=resume, log=log,
        saved=model,
        plan=plan, collate=collate, loss=loss,
        task={"task": "classification", "labels": labels, "max_len": cfg.data.max_len, **fields},
    )


def drop_tokens(ids: Tensor, lengths: Tensor, p: float, pad_id: int) -> tuple[Tensor, Tensor]:
    """Word dropout (Iyyer et al., 2015): each token between the first and the last of a row is deleted
    with probability ``p``, keeping at least one; rows are re-padded. ids (B, L), lengths (B,)."""
    rows = []
    for row, n in zip(ids.tolist(), lengths.tolist(), strict=True):
        inner = row[1 : n - 1]
        keep = (torch.rand(len(inner)) >= p).tolist()
        kept = [t for t, k in zip(inner, keep, strict=True) if k]
        if inner and not kept:
            kept = [inner[int(torch.randint(len(inner), ()))]]
        rows.append([row[0], *kept, row[n - 1]] if n >= 2 else row[:n])
    return pad(rows, pad_id)


def _label_ids(labels: Sequence[str], records: Sequence[tuple[str, str]]) -> Tensor:
    """The index in ``labels`` of each record's label, (N,): one dict lookup each (``labels.index`` per record
    made it labels x examples)."""
    index = {label: i for i, label in enumerate(labels)}
    return torch.tensor([index[label] for _, label in records])


def _collate(tok: Tokenizer, ids: list[list[int]], targets: Tensor, idx: list[int]) -> dict[str, Any]:
    x, n = pad([ids[i] for i in idx], tok.pad_id)
    return {"ids": x, "lengths": n, "labels": targets[idx], "num_targets": len(idx)}


def training_batches(directory: str | Path, paths: list[str], max_tokens: int) -> TrainingBatches:
    """Batches of the labelled file ``paths[0]`` for the model in ``directory`` (its tokenizer, fields and labels)."""
    if len(paths) != 1:
        raise ValueError(f"classification data: one labelled file, got {len(paths)} files")
    tok, task = Tokenizer.load(directory), read_task(directory)
    records = read_labelled(paths[0], text_field=task["text_field"], label_field=task["label_field"])
    unknown = sorted({label for _, label in records} - set(task["labels"]))
    if unknown:
        raise ValueError(f"{paths[0]}: labels {unknown} are not the model's {task['labels']}")
    positions = read_json_object(Path(directory) / "config.json")["config"]["max_len"]
    ids = encode(tok, [t for t, _ in records], min(task.get("max_len") or positions, positions))
    targets = _label_ids(task["labels"], records)

    def outputs(m: nn.Module, b: dict[str, Any]) -> tuple[Tensor, Tensor]:
        return m.classify(b["ids"], lengths=b["lengths"]).float(), b["labels"]

    def loss(m: nn.Module, b: dict[str, Any]) -> Tensor:
        return F.cross_entropy(*outputs(m, b), reduction="sum")

    return TrainingBatches(plan=lambda epoch: bucket_batches([len(x) for x in ids], max_tokens, seed=0, epoch=epoch),
                           collate=partial(_collate, tok, ids, targets), loss=loss, outputs=outputs)


def load(directory: str | Path) -> tuple[EncoderModel, Tokenizer, dict[str, Any]]:
    """A trained classifier, its tokenizer and its task settings (labels, fields, ``max_len``)."""
    return load_task(directory, "classification", EncoderModel)


def evaluate_file(directory: str | Path, path: str, ensemble: Sequence[str | Path] | None = ()) -> dict[str, float]:
    """Accuracy and macro-F1 of a trained model on any labelled file. ``ensemble``: more model directories
    whose class probabilities are averaged with ``directory``'s (:func:`ensemble_probabilities`)."""
    ensemble = _members(ensemble, "ensemble")
    task = read_task(directory, "classification")
    records = read_labelled(path, text_field=task["text_field"], label_field=task["label_field"])
    gold = [label for _, label in records]
    if not records:
        raise DataError(f"{path}: no examples to score")
    texts = [t for t, _ in records]
    labels, found = ensemble_probabilities([directory, *ensemble], texts)
    unseen = unseen_labels(labels, gold, str(path))
    return {**score([labels[i] for i in found.argmax(-1).tolist()], gold), "unseen_labels": unseen}


# --- command line ----------------------------------------------------------------------------------
def _classify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="*", help="texts; without any (or -), one text per line from stdin")


def _classify_command(args: argparse.Namespace) -> int:
    model, tok, task = load(args.model)
    for label in predict(model, tok, task["labels"], input_lines(args.text), max_len=task.get("max_len")):
        print(label)
    return 0


def derived(cfg: ClassificationConfig) -> dict[str, str]:
    """The model settings train() sets itself: all but the pooling of a pretrained encoder."""
    found = {"model.vocab_size": "the tokenizer", "model.pad_id": "the tokenizer",
             "model.num_labels": "the labels of data.train"}
    if cfg.data.pretrained:
        found |= {f"model.{f.name}": "the pretrained encoder (data.pretrained)" for f in fields_of(cfg.model)
                  if f.name != "pooling"}
    return found


TASK = register(Task(
    name="classification", config=ClassificationConfig, train=train, load=load, evaluate_file=evaluate_file,
    predict=Command("classify", "label texts with a trained classifier (arguments or stdin)",
                    _classify_arguments, _classify_command),
    data_help="a labelled TSV/CSV/JSONL", paths=("train", "valid", "pretrained", "embeddings"),
    evaluate_options=(Option("--ensemble", "ensemble", "another model directory (repeat the flag for more): average "
                             "its class probabilities with MODEL's (same labels; each reads with its own tokenizer)",
                             repeat=True),),
    training_batches=training_batches, derived=derived,
    metrics=("accuracy", "macro_f1"),
))
