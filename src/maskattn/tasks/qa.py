"""Extractive question answering (SQuAD v1.1) with :class:`~maskattn.models.EncoderModel` and a span head,
fine-tuned from a pretrained encoder such as all-MiniLM-L6-v2.

Contexts longer than a window are cut into overlapping windows (:func:`squad_windows`); a question's
answer is the best span over all its windows, scored start logit + end logit, at most
``max_answer`` tokens long, inside the context.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskattn import checkpoint, distributed, metrics
from maskattn.data import DataError, QAExample, bucket_batches, pad, random_batches, read_squad
from maskattn.errors import UsageError, check_settings
from maskattn.io import atomic_write_text, check_output_file
from maskattn.models import EncoderModel, from_pretrained
from maskattn.models.pretrained import pretrained_positions
from maskattn.tasks.base import Command, Option, Task, register
from maskattn.tasks.common import (
    Head,
    begin_run,
    fine_tunable,
    fit_and_export,
    load_task,
    log_stderr,
    not_empty,
    parameters,
    refuse_ignored_batch_size,
    require,
)
from maskattn.tokenization import Tokenizer
from maskattn.training import TrainConfig, to_device


@dataclass
class DataConfig:
    train: str = ""  # SQuAD v1.1 JSON
    valid: str = ""  # SQuAD v1.1 JSON evaluated during training (never the test set)
    pretrained: str = ""  # directory of the pretrained encoder to fine-tune (required)
    max_len: int = 256  # tokens per window
    stride: int = 128  # context tokens between window starts
    max_answer: int = 30  # longest answer, in tokens
    batch_size: int = 16  # windows per batch
    max_tokens: int = 0  # > 0: batches of up to this many padded tokens, windows of similar length (not batch_size)
    valid_limit: int = 0  # validation questions evaluated during training (0: all)

    def __post_init__(self) -> None:
        check_settings(self, {"max_len": ("int>=", 4), "stride": ("int>=", 1), "max_answer": ("int>=", 1),
                              "batch_size": ("int>=", 1), "max_tokens": ("int>=", 0),
                              "valid_limit": ("int>=", 0)})
        if 0 < self.max_tokens < self.max_len:
            raise UsageError(f"data.max_tokens={self.max_tokens}: less than one window of data.max_len="
                             f"{self.max_len} tokens; raise it, or 0 for data.batch_size windows a batch")
        refuse_ignored_batch_size(self)


@dataclass
class QAConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=1000, lr=5e-5, schedule="cosine", warmup=100, min_lr_ratio=0.0, metric="f1", higher_is_better=True,
        eval_every=250, checkpoint_every=250))
    out: str = "runs/qa"  # run directory


# --- windows ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QAWindow:
    """One model input for extractive QA: ``[CLS] question [SEP] context slice [SEP]``.

    ``start``/``end`` are the token positions of the answer, or 0/0 (the [CLS] token) when the
    answer is not wholly inside this window. ``offsets[i]`` is the (start, end) character span in the
    context of token i, or None for question and special tokens.
    """

    example: int  # index of the QAExample
    ids: list[int]
    token_types: list[int]
    offsets: list[tuple[int, int] | None]
    start: int
    end: int


def squad_windows(tokenizer: Tokenizer, examples: Sequence[QAExample], *, max_len: int = 384, stride: int = 128,
                  max_question: int = 64) -> list[QAWindow]:
    """Cut every example into windows of at most ``max_len`` tokens, ``stride`` context tokens apart.

    Long contexts give several overlapping windows, so every answer lies whole in at least one of
    them when it is shorter than the overlap.
    """
    windows = []
    for n, ex in enumerate(examples):
        question = tokenizer.encode(ex.question)[:max_question]
        encoded = tokenizer.backend.encode(ex.context, add_special_tokens=False)
        ctx_ids, ctx_offsets = encoded.ids, encoded.offsets
        room = max_len - len(question) - 3
        if room < 1:
            raise ValueError(f"max_len={max_len} leaves no room for context after question {ex.id!r} of "
                             f"{len(question)} tokens (a window holds the question, its context and 3 special "
                             f"tokens; questions are cut at {max_question} tokens)")
        over = None  # the first and last context tokens over the answer's characters: its outer whitespace, and
        if ex.answers:  # characters the tokenizer drops (an accent it strips, a zero-width space), lie under none
            text, at = ex.answers[0]
            a0, a1 = at + len(text) - len(text.lstrip()), at + len(text.rstrip())
            tokens = [i for i, (s, e) in enumerate(ctx_offsets) if s < a1 and e > a0]
            over = (tokens[0], tokens[-1]) if tokens else None
        step = min(stride, room)  # a stride longer than a window's context would skip tokens between windows
        for first in range(0, max(1, len(ctx_ids)), step):
            last = min(first + room, len(ctx_ids))  # context tokens [first, last)
            head = [tokenizer.bos_id, *question, tokenizer.eos_id]
            ids = head + ctx_ids[first:last] + [tokenizer.eos_id]
            types = [0] * len(head) + [1] * (last - first + 1)
            offsets = [None] * len(head) + list(ctx_offsets[first:last]) + [None]
            start = end = 0
            if over is not None and first <= over[0] and over[1] < last:  # the answer lies whole in this window
                start, end = len(head) + over[0] - first, len(head) + over[1] - first
            windows.append(QAWindow(n, ids, types, offsets, start, end))
            if last == len(ctx_ids):
                break
    return windows


# --- model and training ----------------------------------------------------------------------------
Spans = partial(Head, method="span_logits")  # deprecated: Head(model, "span_logits")


def batch_of(windows: Sequence[QAWindow], pad_id: int) -> dict[str, Tensor]:
    ids, lengths = pad([w.ids for w in windows], pad_id)
    types, _ = pad([w.token_types for w in windows], 0)
    return {"ids": ids, "types": types, "lengths": lengths,
            "start": torch.tensor([w.start for w in windows]), "end": torch.tensor([w.end for w in windows])}


def best_spans(model: EncoderModel, tok: Tokenizer, examples: Sequence[QAExample], windows: Sequence[QAWindow], *,
               max_answer: int, batch_size: int = 32) -> dict[str, str]:
    """The best answer text of every example: max start + end logit over windows, end >= start,
    span length <= max_answer tokens, both ends inside the context."""
    model.eval()
    device = next(model.parameters()).device
    best: dict[int, tuple[float, str]] = {}
    with torch.no_grad():
        for at in range(0, len(windows), batch_size):
            chunk = windows[at : at + batch_size]
            b = to_device(batch_of(chunk, tok.pad_id), device)
            start, end = model.span_logits(b["ids"], token_type_ids=b["types"], lengths=b["lengths"])
            start, end = start.cpu(), end.cpu()  # the span search below is on the CPU
            for row, w in enumerate(chunk):
                context = torch.tensor([o is not None for o in w.offsets])
                n = len(w.ids)
                s, e = start[row, :n].float(), end[row, :n].float()
                scores = s[:, None] + e[None, :]  # (n, n): start i, end j
                i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
                ok = (j >= i) & (j - i < max_answer) & context[:, None] & context[None, :]
                scores = scores.masked_fill(~ok, float("-inf"))
                flat = int(scores.argmax())
                value = float(scores.flatten()[flat])
                if value == float("-inf"):
                    continue
                a, z = divmod(flat, n)
                # without outer whitespace (a SentencePiece-style token's offsets include its word's space),
                text = examples[w.example].context[w.offsets[a][0] : w.offsets[z][1]].strip()  # as training reads
                if w.example not in best or value > best[w.example][0]:
                    best[w.example] = (value, text)
    return {ex.id: best.get(n, (0.0, ""))[1] for n, ex in enumerate(examples)}


def span_loss(start: Tensor, end: Tensor, start_at: Tensor, end_at: Tensor, lengths: Tensor) -> Tensor:
    """The summed cross-entropy of (B, L) start and end logits at the (B,) answer positions, each row's softmax over
    its own ``lengths`` tokens: a padded position is no candidate, so a window's loss is the same in any batch."""
    padded = torch.arange(start.shape[1], device=start.device) >= lengths[:, None]  # (B, L)

    def summed(logits: Tensor, at: Tensor) -> Tensor:
        return F.cross_entropy(logits.float().masked_fill(padded, float("-inf")), at, reduction="sum")

    return summed(start, start_at) + summed(end, end_at)


class SpanEnsemble(nn.Module):
    """Span models that share one tokenizer, answering together: the mean of their start and end logits.

    Averaging logits of separately fine-tuned models (different seeds) lowers the run-to-run variance
    that a single fine-tune on a few thousand questions has.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("SpanEnsemble needs at least one model")
        self.members = nn.ModuleList(members)

    def span_logits(self, input_ids: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        pairs = [m.span_logits(input_ids, **kwargs) for m in self.members]  # each: (B, L), (B, L)
        start = torch.stack([s.float() for s, _ in pairs]).mean(0)
        end = torch.stack([e.float() for _, e in pairs]).mean(0)
        return start, end


def _ensemble(directory: str | Path, others: Sequence[str],
              overridden: Sequence[str] = ()) -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """The model of ``directory``, or with ``others`` the ensemble of all of them, which must share the
    tokenizer and the window settings not ``overridden`` (the windows are cut once, for all members)."""
    model, tok, task = load(directory)
    if not others:
        return model, tok, task
    members = [model]
    vocab = tok.backend.get_vocab()
    for other in others:
        m, t, settings = load(other)
        if t.backend.get_vocab() != vocab:
            raise UsageError(f"--ensemble {other}: its tokenizer differs from {directory}'s; "
                             "ensemble members must share one tokenizer")
        for key in (k for k in ("max_len", "stride", "max_answer") if k not in overridden):
            if settings.get(key) != task.get(key):
                raise UsageError(f"--ensemble {other}: {key}={settings.get(key)}, but {directory} has "
                                 f"{key}={task.get(key)}; ensemble members must cut the same windows")
        members.append(m)
    return SpanEnsemble(members), tok, task


def _max_positions(model: nn.Module) -> int:
    members = model.members if isinstance(model, SpanEnsemble) else [model]
    return min(m.config.max_len for m in members)


def score(predictions: dict[str, str], examples: Sequence[QAExample]) -> dict[str, float]:
    return metrics.squad(predictions, {ex.id: [a for a, _ in ex.answers] for ex in examples})


def _checkpoint_has_pooler(out: Path) -> bool:
    latest = checkpoint.latest(Path(out) / "checkpoints")
    return latest is not None and any(name.startswith("model.") and "pooler" in name.split(".")
                                      for name in checkpoint.tensor_names(latest))


def without_pooler(model: EncoderModel) -> EncoderModel:
    """``model`` without BERT's pooler: span logits read every token's state, never the pooled summary, and a
    parameter no loss reaches stops DistributedDataParallel at its second step."""
    if model.pooler is not None:
        model.pooler = None
        model.config = dataclasses.replace(model.config, pooler=False)
    return model


def train(cfg: QAConfig, *, resume: bool = False, log=log_stderr) -> dict[str, Any]:
    """Fine-tune ``cfg.data.pretrained`` (an encoder) with a span head on ``cfg.data.train`` (SQuAD JSON); return
    the last validation scores and the model dir."""
    require(cfg.data, "data", train="SQuAD JSON", pretrained="an encoder directory")
    examples = read_squad(cfg.data.train)
    valid = (not_empty(read_squad(cfg.data.valid, require_answers=True), "data.valid", cfg.data.valid, "questions")
             if cfg.data.valid else None)  # a question is scored by its best answer: one without is refused now
    valid = valid[: cfg.data.valid_limit or None] if valid else None
    positions = pretrained_positions(cfg.data.pretrained)
    if positions is not None and cfg.data.max_len > positions:
        raise UsageError(f"data.max_len={cfg.data.max_len}: windows longer than the {positions} positions of "
                         f"data.pretrained ({cfg.data.pretrained}); set data.max_len <= {positions}")
    out, tok = begin_run(cfg, resume=resume, task="qa", tokenizer=lambda: Tokenizer.load(cfg.data.pretrained))
    model = fine_tunable(from_pretrained(cfg.data.pretrained, span_head=True), cfg.data.pretrained)
    if not (resume and _checkpoint_has_pooler(out)):  # a run started before QA models dropped it keeps it
        model = without_pooler(model)
    try:
        windows = squad_windows(tok, examples, max_len=cfg.data.max_len, stride=cfg.data.stride)
        valid_windows = squad_windows(tok, valid, max_len=cfg.data.max_len, stride=cfg.data.stride) if valid else None
    except ValueError as e:  # a question that fills a window
        raise UsageError(f"data.{e}: raise data.max_len") from e
    located = {w.example for w in windows if w.start}
    lost = sum(1 for n, ex in enumerate(examples) if ex.answers and n not in located)
    log(f"qa: {len(examples)} questions in {len(windows)} windows, {parameters(model)}"
        + (f"; {lost} answer(s) lie whole in no window, so every window of theirs trains on 'no answer here' "
           "(raise data.max_len or lower data.stride)" if lost else ""))
    if not cfg.data.max_tokens and len(windows) < cfg.data.batch_size:  # whole batches: an epoch would hold none
        raise UsageError(f"data.batch_size={cfg.data.batch_size} windows per batch, but {cfg.data.train} gives only "
                         f"{len(windows)}; lower data.batch_size")

    lengths = [len(w.ids) for w in windows]
    world = distributed.current().world_size
    if cfg.data.max_tokens and cfg.data.max_tokens < world * cfg.data.max_len:
        # each process takes a share of every batch, and a batch with fewer windows than processes is dropped:
        # batches of full windows would be lost, and with them most long contexts
        raise UsageError(f"data.max_tokens={cfg.data.max_tokens}: under {world} processes a batch needs at least "
                         f"{world} windows of up to data.max_len={cfg.data.max_len} tokens; set it to at least "
                         f"{world * cfg.data.max_len}")

    def plan(epoch: int) -> list[list[int]]:
        if cfg.data.max_tokens:  # random windows pad to ~max_len; grouped by length, ~30% fewer padded tokens
            return bucket_batches(lengths, cfg.data.max_tokens, seed=cfg.train.seed, epoch=epoch)
        return random_batches(len(windows), cfg.data.batch_size, seed=cfg.train.seed, epoch=epoch, drop_last=True)

    def collate(idx: list[int]) -> dict[str, Any]:
        return {**batch_of([windows[i] for i in idx], tok.pad_id), "num_targets": 2 * len(idx)}

    def loss(m: nn.Module, b: dict[str, Any]) -> Tensor:
        start, end = m(b["ids"], token_type_ids=b["types"], lengths=b["lengths"])  # (B, L) each
        return span_loss(start, end, b["start"], b["end"], b["lengths"])

    def evaluate(m: nn.Module) -> dict[str, float]:
        return score(best_spans(model, tok, valid, valid_windows, max_answer=cfg.data.max_answer), valid)

    task = {"task": "qa", "max_len": cfg.data.max_len, "stride": cfg.data.stride, "max_answer": cfg.data.max_answer}
    return fit_and_export(Head(model, "span_logits"), tok, cfg.train, out, evaluate=evaluate if valid else None,
                          resume=resume, log=log, plan=plan, collate=collate, loss=loss, task=task, saved=model)


def load(directory: str | Path) -> tuple[EncoderModel, Tokenizer, dict[str, Any]]:
    """A trained QA model, its tokenizer and its task settings (``max_len``, ``stride``, ``max_answer``)."""
    return load_task(directory, "qa", EncoderModel)


def answer(directory_or_model, questions: Sequence[tuple[str, str]]) -> list[str]:
    """Answers to (context, question) pairs."""
    model, tok, task = load(directory_or_model) if isinstance(directory_or_model, (str, Path)) else directory_or_model
    examples = [QAExample(str(i), q, c, ()) for i, (c, q) in enumerate(questions)]
    windows = squad_windows(tok, examples, max_len=task["max_len"], stride=task["stride"])
    found = best_spans(model, tok, examples, windows, max_answer=task["max_answer"])
    return [found[ex.id] for ex in examples]


def evaluate_file(directory: str | Path, path: str, predictions: str | None = None,
                  ensemble: Sequence[str] = (), max_len: int | None = None,
                  stride: int | None = None, max_answer: int | None = None) -> dict[str, float]:
    """Exact match and F1 on a SQuAD v1.1 file; optionally write ``predictions.json`` (official format:
    ``{question id: answer text}``). ``ensemble``: more model directories whose span logits are averaged
    with ``directory``'s. ``max_len`` / ``stride``: cut the contexts into other windows than the model
    was trained on (at most its ``max_len`` positions). ``max_answer``: the longest answer, in tokens."""
    if predictions:
        check_output_file(predictions, "--predictions", [path, directory, *ensemble])
    overrides = {k: v for k, v in (("max_len", max_len), ("stride", stride), ("max_answer", max_answer))
                 if v is not None}
    model, tok, task = _ensemble(directory, ensemble or (), overrides)
    positions = _max_positions(model)
    for key, value in overrides.items():
        low = 4 if key == "max_len" else 1
        if not low <= value <= positions:  # an answer of more tokens than a window holds is never found either
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} must be in [{low}, {positions}] (the model's positions), got {value}")
    task = {**task, **overrides}
    examples = read_squad(path, require_answers=True)
    if not examples:
        raise DataError(f"{path}: no questions to score")
    try:
        windows = squad_windows(tok, examples, max_len=task["max_len"], stride=task["stride"])
    except ValueError as e:  # a question that fills a window
        flag = "--max-len" if "max_len" in overrides else "the model's max_len (--max-len)"
        raise UsageError(f"{path}: {e}: raise {flag}") from e
    found = best_spans(model, tok, examples, windows, max_answer=task["max_answer"])
    if predictions:
        atomic_write_text(predictions, json.dumps(found, indent=1, ensure_ascii=False) + "\n")
    return score(found, examples)


# --- command line ----------------------------------------------------------------------------------
def _answer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context", required=True, help="the text that holds the answer")
    parser.add_argument("--question", required=True, help="the question")


def _answer_command(args: argparse.Namespace) -> int:
    for flag, text in (("--context", args.context), ("--question", args.question)):
        if not text.strip():  # an empty context has no span to answer with
            raise UsageError(f"{flag}: empty; give the text")
    print(answer(args.model, [(args.context, args.question)])[0])
    return 0


TASK = register(Task(
    name="qa", config=QAConfig, train=train, load=load, evaluate_file=evaluate_file,
    predict=Command("answer", "answer a question about a context with a trained QA model",
                    _answer_arguments, _answer_command),
    data_help="SQuAD JSON", paths=("train", "valid", "pretrained"),
    evaluate_options=(Option("--predictions", "predictions", "also write the official predictions.json here"),
                      Option("--ensemble", "ensemble", "another model directory (repeat the flag for more): average "
                             "its span logits with MODEL's (same tokenizer)", repeat=True),
                      Option("--max-len", "max_len", "tokens per window (default: the model's training setting)",
                             int),
                      Option("--stride", "stride", "context tokens between window starts (default: the model's)",
                             int),
                      Option("--max-answer", "max_answer", "longest answer in tokens (default: the model's)", int)),
    metrics=("exact_match", "f1"),
))
