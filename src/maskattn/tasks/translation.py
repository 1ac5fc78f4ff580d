"""Machine translation with the encoder-decoder :class:`~maskattn.models.Transformer`.

Shape legend: B batch, Ls source length, Lt target length, V vocabulary.

A trained model is a directory written by ``model.save`` (``config.json``, ``model.safetensors``,
``tokenizer.json``) plus ``task.json`` naming the task and its decoding settings.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from maskattn import decoding, metrics
from maskattn.data import DataError, bucket_batches, pad, read_parallel
from maskattn.errors import UsageError, check_settings
from maskattn.io import atomic_write_text, check_output_file, read_json_object
from maskattn.models import Transformer, TransformerConfig
from maskattn.tasks.base import (
    Command,
    Option,
    Task,
    TrainingBatches,
    beam_width,
    input_lines,
    nonnegative_int,
    register,
)
from maskattn.tasks.common import (
    TOKENIZERS,
    begin_run,
    fit_and_export,
    load_task,
    log_stderr,
    logger,
    not_empty,
    parameters,
    require,
    train_tokenizer,
)
from maskattn.tokenization import SPECIALS, Tokenizer
from maskattn.training import Progress, TrainConfig

Pairs = list[tuple[str, str]]


@dataclass
class DataConfig:
    train_src: str = ""  # training source sentences, one per line (.gz ok), or a TSV of source<TAB>target
    train_tgt: str = ""  # training target sentences (empty when train_src is a TSV)
    valid_src: str = ""  # validation source (evaluated during training; never the test set)
    valid_tgt: str = ""  # validation target
    tokenizer: str = "bpe"  # bpe | chars: one joint vocabulary for both sides
    vocab_size: int = 8000  # BPE vocabulary size
    max_tokens: int = 4096  # padded tokens per batch (source or target, whichever is longer)
    max_len: int = 128  # training pairs longer than this many tokens are dropped
    valid_limit: int = 500  # validation pairs translated at each evaluation (0: all)

    def __post_init__(self) -> None:
        check_settings(self, {"tokenizer": ("one of", tuple(TOKENIZERS)), "vocab_size": ("int>=", len(SPECIALS)),
                              "max_tokens": ("int>=", 1), "max_len": ("int>=", 1), "valid_limit": ("int>=", 0)})


@dataclass
class DecodeConfig:
    beam_size: int = 4  # 1 = greedy
    length_penalty: float = 0.6  # Wu et al.'s alpha
    max_len_ratio: float = 1.5  # at most ratio * source length + extra target tokens
    max_len_extra: int = 10  # ... plus this many
    batch_size: int = 64  # sentences decoded together
    min_new_tokens: int = 1  # no EOS before this many tokens: 1 = never an empty translation (older models: 0)

    def __post_init__(self) -> None:
        check_settings(self, {"beam_size": ("int>=", 1), "length_penalty": ("float>=", 0),
                              "max_len_ratio": ("float>=", 0), "max_len_extra": ("int>=", 0),
                              "batch_size": ("int>=", 1), "min_new_tokens": ("int>=", 0)})


@dataclass
class TranslationConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: TransformerConfig = field(default_factory=lambda: TransformerConfig.preset("small"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(metric="bleu", higher_is_better=True))
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    label_smoothing: float = 0.1  # cross-entropy label smoothing (the paper's 0.1)
    out: str = "runs/translation"  # run directory: checkpoints, logs, curves, the final model

    def __post_init__(self) -> None:
        check_settings(self, {"label_smoothing": ("in", (0, 1, "[)"))})
        if self.decode.min_new_tokens > self.model.max_len:  # else found at the first validation, after training
            raise ValueError(f"decode.min_new_tokens ({self.decode.min_new_tokens}) must be <= model.max_len "
                             f"({self.model.max_len}): no translation may have more new tokens")


# --- data ------------------------------------------------------------------------------------------
def read_pairs(src: str, tgt: str = "") -> Pairs:
    return read_parallel(src, tgt or None)


def build_tokenizer(cfg: DataConfig, pairs: Pairs) -> Tokenizer:
    """One joint tokenizer of kind ``data.tokenizer`` for both sides of ``pairs``."""
    return train_tokenizer(cfg.tokenizer, [s for pair in pairs for s in pair], vocab_size=cfg.vocab_size)


@dataclass
class Encoded:
    src: list[list[int]]
    tgt: list[list[int]]  # without bos/eos


def encode_pairs(tok: Tokenizer, pairs: Pairs, max_len: int | None = None) -> Encoded:
    src = tok.encode_batch([s for s, _ in pairs])
    tgt = tok.encode_batch([t for _, t in pairs])
    if max_len:
        keep = [i for i in range(len(src)) if 0 < len(src[i]) <= max_len and len(tgt[i]) < max_len]
        src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
    return Encoded(src, tgt)


def collate(tok: Tokenizer, data: Encoded, indices: list[int]) -> dict[str, Any]:
    src, src_len = pad([data.src[i] for i in indices], tok.pad_id)
    tgt_in, tgt_len = pad([[tok.bos_id, *data.tgt[i]] for i in indices], tok.pad_id)  # (B, Lt)
    tgt_out, _ = pad([[*data.tgt[i], tok.eos_id] for i in indices], tok.pad_id)  # (B, Lt)
    return {"src": src, "src_lengths": src_len, "tgt_in": tgt_in, "tgt_lengths": tgt_len, "tgt_out": tgt_out,
            "num_targets": int(tgt_len.sum())}


def sequence_loss(logits: Tensor, targets: Tensor, pad_id: int, label_smoothing: float) -> Tensor:
    """Cross-entropy summed over the non-padding targets: (B, L, V), (B, L) -> scalar."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=pad_id,
                           label_smoothing=label_smoothing, reduction="sum")


# --- model -----------------------------------------------------------------------------------------
def build_model(cfg: TranslationConfig, tok: Tokenizer) -> Transformer:
    model_cfg = replace(cfg.model, vocab_size=tok.vocab_size, tgt_vocab_size=None, share_embeddings=True,
                        pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    return Transformer(model_cfg)


def _decode_batches(model: Transformer, tok: Tokenizer, sentences: Sequence[str], decode: DecodeConfig,
                    truncate: bool) -> Iterator[tuple[list[int], Tensor, Tensor, list[int]]]:
    """Length-sorted batches: (indices into ``sentences``, (B, Ls) source ids, (B,) lengths, (B,) new-token
    limits).

    Raises:
        UsageError: naming the first sentence longer than the model's ``max_len`` tokens, unless
            ``truncate`` (then it is cut to ``max_len`` tokens, with a warning), or a ``min_new_tokens`` above
            ``max_len`` (no sentence may have that many new tokens).
    """
    device = next(model.parameters()).device
    limit = model.config.max_len
    if decode.min_new_tokens > limit:
        raise UsageError(f"--min-new-tokens (decode.min_new_tokens) {decode.min_new_tokens}: more new tokens than the "
                         f"model's max_len ({limit}) allows")
    encoded = [tok.encode(s) or [tok.unk_id] for s in sentences]
    too_long = [i for i, ids in enumerate(encoded) if len(ids) > limit]
    if too_long and not truncate:
        i = too_long[0]
        raise UsageError(f"sentence {i + 1} has {len(encoded[i])} tokens, more than the model's max_len ({limit}); "
                         f"{len(too_long)} sentence(s) are too long: split them")
    if too_long:
        logger.warning(f"{len(too_long)} sentence(s) longer than max_len ({limit}) tokens were cut to {limit}")
        encoded = [ids[:limit] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    model.eval()
    for start in range(0, len(order), decode.batch_size):
        chunk = order[start : start + decode.batch_size]
        src, lengths = pad([encoded[i] for i in chunk], tok.pad_id)
        # Each row's own limit: a sentence decodes as it would alone, whatever shares its batch. At most
        # max_len new tokens: the decoder reads BOS and all but the last of them (training's longest target
        # is max_len - 1 tokens and EOS).
        max_new = [max(1, min(model.config.max_len, int(n * decode.max_len_ratio) + decode.max_len_extra))
                   for n in lengths.tolist()]
        yield chunk, src.to(device), lengths.to(device), max_new


def translate(model: Transformer, tok: Tokenizer, sentences: Sequence[str], decode: DecodeConfig, *,
              truncate: bool = False, progress: bool = False) -> list[str]:
    """Translate sentences in length-sorted batches; one output line per input line (``truncate``: cut
    sentences longer than the model's ``max_len`` tokens, with a warning, instead of refusing them;
    ``progress``: a progress bar of sentences on stderr, plain lines where it is a file)."""
    out: list[str] = [""] * len(sentences)
    bar = Progress(len(sentences), desc="translate", unit="sent", show=progress, leave=False)
    for chunk, src, lengths, max_new in _decode_batches(model, tok, sentences, decode, truncate):
        if decode.beam_size > 1:
            ids, _ = decoding.beam_search(model, src, lengths, beam_size=decode.beam_size, max_new_tokens=max_new,
                                          min_new_tokens=decode.min_new_tokens,
                                          length_penalty=decode.length_penalty)
        else:
            ids = decoding.greedy(model, src, lengths, max_new_tokens=max_new, min_new_tokens=decode.min_new_tokens)
        for row, i in enumerate(chunk):
            out[i] = tok.decode(ids[row].tolist())
        bar.update(len(chunk))
    bar.close()
    return out


def translate_nbest(model: Transformer, tok: Tokenizer, sentences: Sequence[str], decode: DecodeConfig,
                    n: int, *, truncate: bool = False) -> list[list[tuple[float, str]]]:
    """The ``n`` best translations of each sentence, best first, with their length-normalised
    log-probabilities (beam search with ``max(n, decode.beam_size)`` beams)."""
    out: list[list[tuple[float, str]]] = [[] for _ in sentences]
    beams = max(n, decode.beam_size)
    for chunk, src, lengths, max_new in _decode_batches(model, tok, sentences, decode, truncate):
        found = decoding.beam_search_nbest(model, src, lengths, n=n, beam_size=beams, max_new_tokens=max_new,
                                           min_new_tokens=decode.min_new_tokens,
                                           length_penalty=decode.length_penalty)
        for row, i in enumerate(chunk):
            out[i] = [(score, tok.decode(ids)) for score, ids in found[row]]
    return out


def score(hypotheses: Sequence[str], references: Sequence[str], *, signatures: bool = False) -> dict[str, Any]:
    """BLEU, chrF and exact match (0-100); with ``signatures``, sacreBLEU's signatures of the two scores too."""
    found = metrics.sacrebleu_scores(hypotheses, references)  # each score computed once, signatures or not
    scores = {"bleu": found["bleu"], "chrf": found["chrf"],
              "exact_match": 100 * metrics.accuracy([h.strip() for h in hypotheses], [r.strip() for r in references])}
    if signatures:
        scores.update(bleu_signature=found["bleu_signature"], chrf_signature=found["chrf_signature"])
    return scores


# --- training --------------------------------------------------------------------------------------
def train(cfg: TranslationConfig, train_pairs: Pairs | None = None, valid_pairs: Pairs | None = None, *,
          resume: bool = False, log=log_stderr) -> dict[str, Any]:
    """Train a translation model; return the final validation metrics and where the model was saved.

    Pairs may be passed directly (the demo does); otherwise they are read from ``cfg.data``.
    """
    if train_pairs is None:
        require(cfg.data, "data", train_src="a source file, or a TSV of source<TAB>target")
        train_pairs = read_pairs(cfg.data.train_src, cfg.data.train_tgt)
    if valid_pairs is None and cfg.data.valid_src:
        valid_pairs = not_empty(read_pairs(cfg.data.valid_src, cfg.data.valid_tgt), "data.valid_src",
                                cfg.data.valid_src, "sentence pairs")
    out, tok = begin_run(cfg, resume=resume, task="translation",
                         tokenizer=lambda: build_tokenizer(cfg.data, train_pairs))
    longest = min(cfg.data.max_len, cfg.model.max_len)  # a kept pair must fit the model's positions too
    data = encode_pairs(tok, train_pairs, longest)
    setting = "data.max_len" if longest == cfg.data.max_len else "model.max_len"
    if not data.src:  # else "the data plan gave no batch (is the training set empty?)"
        raise UsageError(f"none of the {len(train_pairs)} training pairs fits {setting}={longest} tokens (a source "
                         f"of at most {longest} tokens, a target of fewer, in the run's tokenizer): raise {setting}")
    lengths = [max(len(s), len(t) + 1) for s, t in zip(data.src, data.tgt, strict=True)]
    model = build_model(cfg, tok)
    dropped = len(train_pairs) - len(data.src)
    log(f"translation: {len(data.src)} training pairs, vocabulary {tok.vocab_size}, {parameters(model)}"
        + (f"; {dropped} pairs longer than {setting}={longest} tokens dropped" if dropped else ""))

    valid = valid_pairs[: cfg.data.valid_limit or None] if valid_pairs else None

    def evaluate(m: nn.Module) -> dict[str, float]:
        hyps = translate(m, tok, [s for s, _ in valid], replace(cfg.decode, beam_size=1), truncate=True)
        return score(hyps, [t for _, t in valid])

    return fit_and_export(
        model, tok, cfg.train, out, evaluate=evaluate if valid else None, resume=resume, log=log,
        plan=lambda epoch: bucket_batches(lengths, cfg.data.max_tokens, seed=cfg.train.seed, epoch=epoch),
        collate=lambda idx: collate(tok, data, idx), loss=batch_loss(tok, cfg.label_smoothing),
        task={"task": "translation", "decode": asdict(cfg.decode)},
    )


def batch_loss(tok: Tokenizer, label_smoothing: float) -> Callable[[nn.Module, dict[str, Any]], Tensor]:
    """The summed loss of a batch of :func:`collate` under a model (a Transformer, or one that runs like it)."""
    def loss(m: nn.Module, b: dict[str, Any]) -> Tensor:
        return sequence_loss(_logits(m, b), b["tgt_out"], tok.pad_id, label_smoothing)

    return loss


def _logits(m: nn.Module, b: dict[str, Any]) -> Tensor:
    return m(b["src"], b["tgt_in"], src_lengths=b["src_lengths"], tgt_lengths=b["tgt_lengths"])  # (B, L, V)


def batch_outputs(tok: Tokenizer) -> Callable[[nn.Module, dict[str, Any]], tuple[Tensor, Tensor]]:
    """The (N, V) logits and (N,) targets of a batch's non-padding target tokens under a model."""
    def outputs(m: nn.Module, b: dict[str, Any]) -> tuple[Tensor, Tensor]:
        keep = b["tgt_out"] != tok.pad_id  # (B, L)
        return _logits(m, b)[keep].float(), b["tgt_out"][keep]

    return outputs


def training_batches(directory: str | Path, paths: list[str], max_tokens: int) -> TrainingBatches:
    """Batches of the pairs in ``paths`` (a TSV of pairs, or source and target files) for the model in
    ``directory``: its tokenizer, pairs longer than the model's positions dropped, no label smoothing."""
    if len(paths) not in (1, 2):
        raise ValueError(f"translation data: a TSV of pairs or a source and a target file, got {len(paths)} files")
    tok = Tokenizer.load(directory)
    max_len = read_json_object(Path(directory) / "config.json")["config"]["max_len"]  # the positions it covers
    data = encode_pairs(tok, read_pairs(*paths), max_len)
    if not data.src:
        raise ValueError(f"translation data {paths}: no pair fits the model")
    lengths = [max(len(s), len(t) + 1) for s, t in zip(data.src, data.tgt, strict=True)]
    return TrainingBatches(plan=lambda epoch: bucket_batches(lengths, max_tokens, seed=0, epoch=epoch),
                           collate=lambda idx: collate(tok, data, idx), loss=batch_loss(tok, 0.0),
                           outputs=batch_outputs(tok))


def load(directory: str | Path) -> tuple[Transformer, Tokenizer, DecodeConfig]:
    """A trained translation model, its tokenizer and its decoding settings."""
    model, tok, settings = load_task(directory, "translation", Transformer)
    # Models saved before min_new_tokens existed decoded without it: they keep doing so (their recorded scores).
    return model, tok, DecodeConfig(**{"min_new_tokens": 0, **settings.get("decode", {})})


def evaluate_file(directory: str | Path, path: str, ref: str = "", hypotheses: str | None = None,
                  **decode_overrides: Any) -> dict[str, Any]:
    """BLEU, chrF and exact match of a trained model on a source file (``path``) and its reference
    translations (``ref``; empty when ``path`` is a TSV of pairs), with sacreBLEU's signatures.

    The translations are written one per line to ``hypotheses`` (default: ``hypotheses.<data name>.txt``
    in the run directory, beside the model directory; for a model directory outside a run,
    ``<model dir>.hypotheses.<data name>.txt`` beside it); the result names the file.
    """
    model, tok, decode = load(directory)
    try:
        pairs = read_pairs(path, ref)
    except DataError as e:
        if ref:
            raise
        raise DataError(f"{e}; for a file of source sentences, give their references with --ref") from e
    if not pairs:
        raise DataError(f"{path}: no sentences to score")
    name = Path(path).name.removesuffix(".gz").removesuffix(".txt")
    model_dir = Path(directory).resolve()
    in_run = (model_dir.parent / "checkpoints").is_dir() or (model_dir.parent / "metrics.jsonl").is_file()
    default = f"hypotheses.{name}.txt" if in_run else f"{model_dir.name}.hypotheses.{name}.txt"
    out = check_output_file(hypotheses or model_dir.parent / default, "--hypotheses", [path, ref or path, directory])
    progress = logging.getLogger("maskattn").isEnabledFor(logging.INFO)  # not under `maskattn -q`
    try:
        hyps = translate(model, tok, [s for s, _ in pairs], replace(decode, **decode_overrides), progress=progress)
    except UsageError as e:  # "sentence 3 has 401 tokens, ...": sentence n is line n of the file
        raise UsageError(f"{path}: {e}") from e
    refs = [t for _, t in pairs]
    unreachable_references(tok, refs, ref or path)
    atomic_write_text(out, "".join(h + "\n" for h in hyps))
    return {**score(hyps, refs, signatures=True), "hypotheses": str(out)}


def unreachable_references(tok: Tokenizer, references: Sequence[str], source: str) -> int:
    """How many ``references`` hold words the tokenizer's normaliser rewrites (NFKC: decomposed accents, '…',
    full-width letters), which no translation contains as written; warns naming ``source`` and the first line.
    The scores read the references as written, as sacreBLEU does."""
    normalizer = tok.backend.normalizer
    if normalizer is None:
        return 0
    lines = [n for n, r in enumerate(references, 1) if normalizer.normalize_str(r).split() != r.split()]
    if lines:
        logger.warning(f"{source}: {len(lines)} of {len(references)} references (first: line {lines[0]}) hold "
                       f"characters the model's tokenizer rewrites ({type(normalizer).__name__}), so no translation "
                       "contains them as written and BLEU/chrF count them as misses; to score the words, normalise "
                       "the references as the tokenizer does")
    return len(lines)


def evaluate_files(directory: str | Path, src: str, ref: str = "", **decode_overrides: Any) -> dict[str, float]:
    """Deprecated name of :func:`evaluate_file`."""
    return evaluate_file(directory, src, ref, **decode_overrides)


# --- command line ----------------------------------------------------------------------------------
def _translate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="*", help="sentences; without any (or -), one sentence per line from stdin")
    parser.add_argument("--beam", type=beam_width, help="beam size (1 = greedy; default: the model's setting)")
    parser.add_argument("--min-new-tokens", type=nonnegative_int,
                        help="no EOS before this many tokens (default: the model's setting; 1 = never empty)")
    parser.add_argument("--nbest", type=beam_width, default=1,
                        help="print the N best translations of each sentence, each as 'score<TAB>text', "
                             "with a blank line between sentences (beam search with at least N beams; default: 1)")


def _translate_command(args: argparse.Namespace) -> int:
    model, tok, decode = load(args.model)
    if args.beam is not None:
        decode = replace(decode, beam_size=args.beam)
    if args.min_new_tokens is not None:
        decode = replace(decode, min_new_tokens=args.min_new_tokens)
    sentences = input_lines(args.text)
    if args.nbest == 1:
        for out in translate(model, tok, sentences, decode):
            print(out)
        return 0
    for i, found in enumerate(translate_nbest(model, tok, sentences, decode, args.nbest)):
        if i:
            print()
        for score_, text in found:
            print(f"{score_:.4f}\t{text}")
    return 0


TASK = register(Task(
    name="translation", config=TranslationConfig, train=train, load=load, evaluate_file=evaluate_file,
    predict=Command("translate", "translate text with a trained model (arguments or stdin)",
                    _translate_arguments, _translate_command),
    data_help="source sentences (one per line, .gz ok) or a TSV of pairs",
    paths=("train_src", "train_tgt", "valid_src", "valid_tgt"), training_batches=training_batches,
    derived=lambda cfg: dict.fromkeys(
        ("model.vocab_size", "model.tgt_vocab_size", "model.share_embeddings", "model.pad_id", "model.bos_id",
         "model.eos_id"), "the tokenizer (source and target share one vocabulary)"),
    evaluate_options=(Option("--ref", "ref", "reference translations, aligned with --data"),
                      Option("--beam", "beam_size", "beam size (default: the model's setting)", beam_width),
                      Option("--min-new-tokens", "min_new_tokens", "no EOS before this many tokens (default: the "
                             "model's setting; 1 = never an empty translation)", nonnegative_int),
                      Option("--hypotheses", "hypotheses", "file for the translations (default: "
                             "hypotheses.<data name>.txt in the run directory; MODEL.hypotheses.<data name>.txt "
                             "beside a model directory outside a run)")),
    metrics=("bleu", "chrf", "exact_match"),
))
