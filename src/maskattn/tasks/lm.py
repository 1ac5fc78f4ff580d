"""Language modelling with :class:`~maskattn.models.DecoderLM`: character-level or BPE, perplexity,
and generation.

Training text is cut into rows of ``block + 1`` tokens (inputs and shifted targets). Validation and
``maskattn evaluate`` read the text in windows of ``block + 1`` tokens that overlap by one, the last one
shorter: every token but the text's first is scored exactly once, from the up to ``block`` tokens before
it in its window. With
``data.documents = "paragraphs"`` the text is split at blank lines into documents that are packed
into rows with ``document`` masks: a token never attends across a document boundary, and no loss is
taken on predicting a document's first token from the previous one.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from maskattn import decoding, metrics
from maskattn.data import read_text
from maskattn.errors import UsageError, check_seed, check_settings
from maskattn.models import DecoderLM, DecoderLMConfig
from maskattn.tasks.base import Command, Task, positive_int, probability_mass, register, seed_int, temperature_float
from maskattn.tasks.common import (
    TOKENIZERS,
    begin_run,
    fit_and_export,
    load_task,
    log_stderr,
    parameters,
    require,
    train_tokenizer,
)
from maskattn.tokenization import SPECIALS, Tokenizer, decode_continuation
from maskattn.training import TrainConfig


@dataclass
class DataConfig:
    train: str = ""  # a plain text file
    valid: str = ""  # validation text; empty = the last valid_fraction of the training file
    valid_fraction: float = 0.1  # share of the training file held out when valid is empty
    tokenizer: str = "chars"  # chars | bpe
    vocab_size: int = 4000  # BPE vocabulary size
    block: int = 64  # tokens of context per row
    batch_size: int = 12  # rows per batch
    documents: str = "none"  # none: one stream | paragraphs: blank-line documents, packed with document masks
    valid_rows: int = 0  # validation rows evaluated (0: all)

    def __post_init__(self) -> None:
        check_settings(self, {
            "valid_fraction": ("in", (0, 1, "()")), "tokenizer": ("one of", tuple(TOKENIZERS)),
            "vocab_size": ("int>=", len(SPECIALS)), "block": ("int>=", 1), "batch_size": ("int>=", 1),
            "documents": ("one of", ("none", "paragraphs")), "valid_rows": ("int>=", 0)})


@dataclass
class LMConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: DecoderLMConfig = field(default_factory=lambda: DecoderLMConfig.preset("small"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2000, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, schedule="cosine", warmup=100,
        min_lr_ratio=0.1, eval_every=250, checkpoint_every=250))
    out: str = "runs/lm"  # run directory


@dataclass
class Stream:
    ids: Tensor  # (N,) token ids
    docs: Tensor  # (N,) document id of every token


def to_stream(tok: Tokenizer, text: str, documents: str) -> Stream:
    if documents == "none":
        ids = torch.tensor(tok.encode(text), dtype=torch.long)
        return Stream(ids, torch.zeros_like(ids))
    if documents != "paragraphs":
        raise ValueError(f"data.documents must be 'none' or 'paragraphs', got {documents!r}")
    parts = [p + "\n\n" for p in text.split("\n\n") if p.strip()]
    encoded = tok.encode_batch(parts)
    ids = torch.tensor([t for e in encoded for t in e], dtype=torch.long)
    docs = torch.tensor([d for d, e in enumerate(encoded) for _ in e], dtype=torch.long)
    return Stream(ids, docs)


def rows(stream: Stream, block: int, shift: int = 0) -> tuple[Tensor, Tensor]:
    """Cut the stream, from ``shift`` on, into (R, block + 1) ids and document ids."""
    usable = (len(stream.ids) - shift) // (block + 1) * (block + 1)
    ids = stream.ids[shift : shift + usable].view(-1, block + 1)
    return ids, stream.docs[shift : shift + usable].view(-1, block + 1)


def windows(stream: Stream, block: int) -> list[tuple[Tensor, Tensor]]:
    """The stream as (R, block + 1) ids and document ids whose rows overlap by one token, then the (1, T) rest
    when 2 <= T <= block tokens are left: every token but the first is a target in exactly one row."""
    full = max(0, (len(stream.ids) - 1) // block)  # rows of block + 1; the targets of row r are r*block+1 ...
    found = [tuple(t.unfold(0, block + 1, block)[:full] if full else t.new_zeros(0, block + 1)
              for t in (stream.ids, stream.docs))]
    if len(stream.ids) - full * block >= 2:  # the tail, with the last token of the full rows as its first input
        found.append((stream.ids[full * block :][None], stream.docs[full * block :][None]))
    return found


def row_loss(model: nn.Module, ids: Tensor, docs: Tensor, packed: bool) -> tuple[Tensor, int]:
    """Summed next-token loss of (R, block + 1) rows, and the number of targets.

    Through ``model(inputs, targets=...)`` (so that DistributedDataParallel sees the call), i.e.
    ``DecoderLM.loss``, which at a large vocabulary never holds the whole (R, block, V) logits."""
    loss, targets = _row_loss(model, ids, docs, packed)
    return loss, int((targets != -100).sum())


def _row_loss(model: nn.Module, ids: Tensor, docs: Tensor, packed: bool) -> tuple[Tensor, Tensor]:
    """:func:`row_loss` and the (R, block) targets (-100: none), without counting them (a read from the device)."""
    device = next(model.parameters()).device
    ids, docs = ids.to(device), docs.to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    if packed:
        targets[docs[:, 1:] != docs[:, :-1]] = -100  # a document's first token is not predictable
    return model(inputs, targets=targets, doc_ids=docs[:, :-1] if packed else None), targets


def evaluate_stream(model: nn.Module, stream: Stream, cfg: DataConfig, *,
                    source: str = "the text") -> dict[str, float]:
    """Mean loss and perplexity of ``model`` on ``stream``, every token but the first scored once (see
    :func:`windows`; the first ``cfg.valid_rows`` rows only, when set).

    Raises:
        UsageError: when ``stream`` has no token to score (``source`` names it), rather than a
            meaningless loss of 0.0 (perplexity 1.0).
    """
    parts = windows(stream, cfg.block)
    if cfg.valid_rows:
        parts = [(parts[0][0][: cfg.valid_rows], parts[0][1][: cfg.valid_rows]),
                 *(parts[1:] if cfg.valid_rows > len(parts[0][0]) else [])]
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, docs in parts:
            for start in range(0, len(ids), 64):
                loss, n = row_loss(model, ids[start : start + 64], docs[start : start + 64], cfg.documents != "none")
                total, count = total + float(loss), count + n
    if count == 0:
        raise UsageError(f"{source} gives no token to score: {len(stream.ids)} tokens, and a target needs a "
                         "token before it")
    mean = total / count
    return {"loss": mean, "perplexity": metrics.perplexity(mean)}


def check_long_enough(stream: Stream, cfg: DataConfig, source: str, *, need: int, spare: int = 0) -> None:
    """Raise a UsageError naming ``source`` unless ``stream`` holds ``need`` rows of ``cfg.block + 1``
    tokens and ``spare`` tokens more."""
    span = cfg.block + 1
    if len(stream.ids) < need * span + spare:
        raise UsageError(f"{source} is too short: {len(stream.ids)} tokens, and {need} row(s) of data.block + 1 = "
                         f"{span} tokens{f' and {spare} more' if spare else ''} are needed")


def train(cfg: LMConfig, *, resume: bool = False, log=log_stderr) -> dict[str, Any]:
    """Train a decoder-only language model on ``cfg.data.train`` (plain text); return the last validation
    scores (loss, perplexity) and the model dir."""
    require(cfg.data, "data", train="a plain text file")
    text = read_text(cfg.data.train)
    if cfg.data.valid:
        train_text, valid_text = text, read_text(cfg.data.valid)
    else:
        cut = int(len(text) * (1 - cfg.data.valid_fraction))
        train_text, valid_text = text[:cut], text[cut:]
    out, tok = begin_run(cfg, resume=resume, task="lm", tokenizer=lambda: train_tokenizer(
        cfg.data.tokenizer, [train_text], vocab_size=cfg.data.vocab_size))
    train_stream = to_stream(tok, train_text, cfg.data.documents)
    valid_stream = to_stream(tok, valid_text, cfg.data.documents)
    valid_source = (f"data.valid ({cfg.data.valid})" if cfg.data.valid else
                    f"the last data.valid_fraction ({cfg.data.valid_fraction}) of data.train ({cfg.data.train})")
    check_long_enough(train_stream, cfg.data, f"data.train ({cfg.data.train})", need=cfg.data.batch_size, spare=1)
    check_long_enough(valid_stream, cfg.data, valid_source, need=1)
    packed = cfg.data.documents != "none"
    model = DecoderLM(replace(cfg.model, vocab_size=tok.vocab_size, max_len=max(cfg.model.max_len, cfg.data.block),
                              pad_id=None, eos_id=None))
    log(f"lm: {len(train_stream.ids):,} training tokens, {len(valid_stream.ids):,} validation tokens, "
        f"vocabulary {tok.vocab_size}, {parameters(model)}")
    span = cfg.data.block + 1
    per_epoch = len(train_stream.ids) // span

    def plan(epoch: int) -> list[list[int]]:
        """Random row starts (nanoGPT samples windows anywhere), a stream's worth per epoch."""
        rng = random.Random(cfg.train.seed * 1_000_003 + epoch)
        starts = [rng.randrange(len(train_stream.ids) - span) for _ in range(per_epoch)]
        size = cfg.data.batch_size
        return [starts[i : i + size] for i in range(0, per_epoch - size + 1, size)]

    def collate(starts: list[int]) -> dict[str, Any]:
        ids = torch.stack([train_stream.ids[s : s + span] for s in starts])  # (B, block + 1)
        docs = torch.stack([train_stream.docs[s : s + span] for s in starts])
        targets = int((docs[:, 1:] == docs[:, :-1]).sum()) if packed else ids.shape[0] * cfg.data.block
        return {"ids": ids, "docs": docs, "num_targets": targets}

    def loss(m: nn.Module, b: dict[str, Any]) -> Tensor:
        return _row_loss(m, b["ids"], b["docs"], packed)[0]  # (collate counted the targets, on the host)

    return fit_and_export(
        model, tok, cfg.train, out, evaluate=lambda m: evaluate_stream(m, valid_stream, cfg.data), resume=resume,
        log=log, plan=plan, collate=collate, loss=loss,
        task={"task": "lm", "documents": cfg.data.documents, "block": cfg.data.block},
    )


def load(directory: str | Path) -> tuple[DecoderLM, Tokenizer, dict[str, Any]]:
    """A trained language model, its tokenizer and its task settings (``block``, ``documents``)."""
    return load_task(directory, "lm", DecoderLM)


def evaluate_file(directory: str | Path, path: str) -> dict[str, float]:
    """Mean loss (nats per token) and perplexity of a trained model on any text file."""
    model, tok, task = load(directory)
    data = DataConfig(block=task["block"], documents=task["documents"])
    model.eval()
    return evaluate_stream(model, to_stream(tok, read_text(path), data.documents), data, source=str(path))


def generate(model: DecoderLM, tok: Tokenizer, prompt: str, *, max_new_tokens: int = 200, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> str:
    """The prompt followed by sampled text (greedy when temperature is 0). Beyond the model's context,
    generation continues from the last half-context of text, as nanoGPT crops its context."""
    decoding.check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    ids = tok.encode(prompt) or [tok.unk_id]
    limit, device = model.config.max_len, next(model.parameters()).device
    check_seed(seed, "seed")
    generator = torch.Generator().manual_seed(seed)
    produced: list[int] = []
    while len(produced) < max_new_tokens:
        context = (ids + produced)[-(limit // 2):] if len(ids) + len(produced) >= limit else ids + produced
        steps = min(max_new_tokens - len(produced), limit - len(context))
        x = torch.tensor([context], device=device)
        if temperature == 0:
            new = decoding.greedy(model, x, max_new_tokens=steps)
        else:
            new = decoding.sample(model, x, max_new_tokens=steps, temperature=temperature, top_k=top_k, top_p=top_p,
                                  generator=generator)
        produced += new[0].tolist()
    decode = partial(tok.backend.decode, skip_special_tokens=True)  # no eos here: text goes on
    return prompt + decode_continuation(decode, ids, produced)


# --- command line ----------------------------------------------------------------------------------
def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens to generate (default: 200)")
    parser.add_argument("--temperature", type=temperature_float, default=0.8,
                        help="sampling temperature; 0 = greedy (default: 0.8)")
    parser.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=probability_mass, default=None, help="sample within the top-p probability mass")
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed of the sampling (default: 0)")


def _generate_command(args: argparse.Namespace) -> int:
    model, tok, _ = load(args.model)
    print(generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed))
    return 0


TASK = register(Task(
    name="lm", config=LMConfig, train=train, load=load, evaluate_file=evaluate_file,
    predict=Command("generate", "continue a prompt with a trained language model",
                    _generate_arguments, _generate_command),
    data_help="a text file", paths=("train", "valid"),
    derived=lambda cfg: {"model.vocab_size": "the tokenizer"},
    metrics=("loss", "perplexity"),
))
