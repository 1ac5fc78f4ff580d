"""What every task's training shares: the prologue of ``train`` (required settings, seed, the run's
tokenizer), the trainer, a head wrapper, and the exported model.

A trained model is a directory written by ``model.save`` (``config.json``, ``model.safetensors``,
``tokenizer.json``) plus ``task.json``, which names the task and holds what prediction needs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from maskattn import checkpoint, distributed
from maskattn.data import DataError
from maskattn.errors import RunDirectoryError, SettingError, UsageError
from maskattn.io import FormatError, add_to_manifest, atomic_write_text, read_json_object, verify_manifest
from maskattn.models.persistence import check_model_directory, refuse_run_directory
from maskattn.run_directory import check_same_run, prepare_run_directory
from maskattn.tokenization import Tokenizer
from maskattn.training import TrainConfig, Trainer

TASK_FILE = "task.json"


logger = logging.getLogger("maskattn")  # the CLI sets its level from -v / -q


def log_stderr(message: str) -> None:
    """A task's progress message, through the ``maskattn`` logger (its name kept from when it printed)."""
    logger.info(message)


def run_tokenizer(out: Path, resume: bool, build: Callable[[], Tokenizer], *, rank: int | None = None) -> Tokenizer:
    """The run's tokenizer: reloaded when resuming a run that has a checkpoint, else built (the same on
    every rank) and saved by rank 0.

    A tokenizer.json without any checkpoint beside it (a run that failed before its first checkpoint)
    is rebuilt, not reused: it may come from other data or settings.

    ``rank``: this process (default: that of the process group joined by the entry point, see
    :func:`maskattn.distributed.current`).

    Raises:
        RunDirectoryError: resuming a run that has checkpoints but no tokenizer.json.
        FormatError: its tokenizer.json is not readable (naming the file).
    """
    path = out / "tokenizer.json"
    if resume and checkpoint.latest(out / "checkpoints") is not None:
        if not path.is_file():
            raise RunDirectoryError(f"cannot resume the run in {out}: it has checkpoints but no tokenizer.json")
        return Tokenizer.load(path)
    tok = build()
    if (distributed.current().rank if rank is None else rank) == 0:
        out.mkdir(parents=True, exist_ok=True)
        tok.save(path)
    return tok


def fit_and_export(model: nn.Module, tok: Tokenizer, cfg: TrainConfig, out: Path, *,
                   plan: Callable[[int], list[list[int]]], collate: Callable[[list[int]], dict[str, Any]],
                   loss: Callable[[nn.Module, dict[str, Any]], Tensor],
                   evaluate: Callable[[nn.Module], dict[str, float]] | None, resume: bool,
                   task: dict[str, Any], log: Callable[[str], None] = log_stderr,
                   saved: nn.Module | None = None, context: distributed.Context | None = None) -> dict[str, Any]:
    """Train, keep the best evaluated weights, and export the model to ``out/model``.

    ``model`` is what the trainer runs (a task may wrap the maskattn model so that its loss goes
    through ``forward``, as DistributedDataParallel needs); ``saved`` is the model exported
    (default ``model``). ``context``: this process's rank and world size (default: those of the
    process group joined by the entry point, see :func:`maskattn.distributed.current`).

    Returns the exported model's evaluation and its ``step`` (the best checkpoint's; without evaluations, the
    last training loss), the training wall time and the model directory; an empty dict on ranks other than 0.
    """
    context = context or distributed.current()
    settings = getattr(saved or model, "config", None)
    run = {"task": task["task"], "model": asdict(settings) if is_dataclass(settings) else None}
    trainer = Trainer(model, cfg, out_dir=out, evaluate=evaluate, plan=plan, collate=collate, loss=loss,
                      device=None if torch.cuda.is_available() else "cpu",
                      rank=context.rank, world_size=context.world_size, run=run)
    if resume:  # say which: a mistyped --out would otherwise train a new run from step 0 without a word
        log(f"resumed from step {trainer.step}" if trainer.resume()
            else f"--resume: no checkpoint in {out}; training from step 0")
    start = time.perf_counter()
    last = trainer.fit()
    seconds = time.perf_counter() - start
    if trainer.rank != 0:
        return {}
    best = checkpoint.latest(out / "best") if evaluate is not None else None
    scores = last
    if best is not None:  # export the best evaluated weights, not the last ones, and report their scores
        model.load_state_dict(checkpoint.load(best)["model"])
        step = checkpoint.step_of(best)
        logged = trainer.evaluation_at(step)
        if not logged:  # its log line is gone (an edited log): score the exported weights, never another step's scores
            model.eval()
            with torch.no_grad():
                logged = evaluate(model)
        scores = {**logged, "step": step}
    directory = out / "model"
    (saved or model).save(directory, tokenizer=tok.backend)
    write_task(directory, task)
    return {**scores, "train_seconds": seconds, "model": str(directory)}


def write_task(directory: str | Path, task: dict[str, Any]) -> None:
    """Write ``task.json`` into a saved model directory and add it to the directory's manifest."""
    atomic_write_text(Path(directory) / TASK_FILE, json.dumps(task, indent=2) + "\n")
    add_to_manifest(Path(directory), TASK_FILE)


def read_task(directory: str | Path, task: str | None = None) -> dict[str, Any]:
    """The settings in ``directory/task.json``, checked against the directory's manifest (and, given ``task``,
    that they are a model of that task).

    Raises:
        FormatError: naming the file, when it is missing, modified or not a JSON object.
        ValueError: the directory holds a model of another task than ``task``.
    """
    path = Path(directory) / TASK_FILE
    check_model_directory(Path(directory))
    if not path.is_file():
        refuse_run_directory(Path(directory), TASK_FILE)
        raise FormatError(f"{directory} has no {TASK_FILE}: not a model trained by `maskattn train`")
    verify_manifest(directory, [TASK_FILE], every_file=False)
    settings = read_json_object(path)
    if task is not None and settings.get("task") != task:
        raise ValueError(f"{directory} holds a {settings.get('task')!r} model, not a {task!r} one")
    return settings


def load_task(directory: str | Path, task: str, model_class: type) -> tuple[Any, Tokenizer, dict[str, Any]]:
    """``(model, tokenizer, task settings)`` of a model directory trained for ``task``."""
    settings = read_task(directory, task)
    return model_class.load(directory), Tokenizer.load(directory), settings


# --- the prologue of every task's train() ------------------------------------------------------------
TOKENIZERS: dict[str, Callable[[Sequence[str], int], Tokenizer]] = {  # data.tokenizer -> trainer(texts, vocab)
    "bpe": lambda texts, vocab_size: Tokenizer.train_bpe(texts, vocab_size=vocab_size),
    "chars": lambda texts, vocab_size: Tokenizer.train_chars(texts),
}


def train_tokenizer(kind: str, texts: Sequence[str], *, vocab_size: int) -> Tokenizer:
    """A tokenizer of kind ``kind`` (the setting ``data.tokenizer``) trained on ``texts``.

    Raises:
        ValueError: for an unknown kind, naming ``data.tokenizer``, its value and the choices.
    """
    if kind not in TOKENIZERS:
        raise ValueError(f"data.tokenizer must be one of {', '.join(map(repr, TOKENIZERS))}, got {kind!r}")
    return TOKENIZERS[kind](texts, vocab_size)


def require(settings: Any, section: str, **what: str) -> None:
    """Raise unless every named setting of ``settings`` is set, naming each with what it should be:
    ``require(cfg.data, "data", train="a plain text file")``."""
    if all(getattr(settings, name) for name in what):
        return
    if len(what) == 1:
        (name, description), = what.items()
        raise ValueError(f"{section}.{name} is required ({description})")
    raise ValueError(" and ".join(f"{section}.{name} ({description})" for name, description in what.items())
                     + " are required")


def refuse_ignored_batch_size(data: Any) -> None:
    """A ``data.batch_size`` other than its default beside ``data.max_tokens`` > 0 would do nothing (batches are
    then cut by padded tokens): refused, naming both, rather than silently ignored."""
    if data.max_tokens and data.batch_size != type(data).batch_size:
        raise UsageError(f"data.batch_size={data.batch_size} is not used when data.max_tokens={data.max_tokens} "
                         "(batches are cut by padded tokens); set data.max_tokens=0 to batch by data.batch_size")


def not_empty(records: Sequence[Any], setting: str, path: str, what: str) -> Sequence[Any]:
    """``records`` read from the file a setting names; a file with none (a header alone, say) is an error,
    not a run that quietly trains without validation."""
    if not records:
        raise DataError(f"{setting} ({path}): the file holds no {what}")
    return records


def refuse_derived(derived: dict[str, str], changed: Iterable[str]) -> None:
    """Refuse the ``changed`` settings (dotted keys set away from the task's defaults) that the task sets itself
    (``derived``: ``{"model.X": where its value comes from}``): they would be ignored without a word.

    Raises:
        SettingError: naming the settings and where their values come from.
    """
    changed = set(changed)
    refused = [key for key in derived if key in changed]
    if refused:
        sources = "; ".join(f"{key} from {derived[key]}" for key in refused)
        raise SettingError(f"set by the task, not by a setting: {sources}; remove "
                           f"{'it' if len(refused) == 1 else 'them'} from --set / --config")


def begin_run(cfg: Any, *, resume: bool, tokenizer: Callable[[], Tokenizer],
              overwrite: bool = False, task: str | None = None) -> tuple[Path, Tokenizer]:
    """The run directory ``cfg.out`` and its tokenizer (built by ``tokenizer``, or reloaded on resume),
    with torch seeded from ``cfg.train.seed`` so that the model built next is the same on every rank.

    The run directory is checked first (:func:`maskattn.run_directory.prepare_run_directory`): a directory
    that is not empty is used only with ``resume`` (or cleared first with ``overwrite``), and a resume of
    a run of another ``task`` is refused before its tokenizer is read.
    """
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.out)
    if distributed.current().is_main:
        prepare_run_directory(out, resume=resume, overwrite=overwrite)
    latest = checkpoint.latest(out / "checkpoints") if resume and task else None
    if latest is not None:
        check_same_run(latest, checkpoint.read_entry(latest, "run"), {"task": task})
    return out, run_tokenizer(out, resume, tokenizer)


def fine_tunable(model: nn.Module, source: str | Path) -> nn.Module:
    """``model`` in float32 if its pretrained weights are stored in half precision (most released checkpoints are
    bfloat16): AdamW's small updates vanish when added to bfloat16 weights. ``train.bf16`` gives bfloat16 speed by
    autocast, over float32 weights."""
    half = sorted({str(p.dtype) for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)})
    if not half:
        return model
    logger.info("%s: weights stored in %s, fine-tuned in float32 (train.bf16=true computes in bfloat16)", source,
                " and ".join(d.removeprefix("torch.") for d in half))
    return model.float()


def parameters(model: nn.Module) -> str:
    """``"1.23M parameters"``, for a task's opening log line."""
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"


class Head(nn.Module):
    """One of a model's output methods as ``forward``, e.g. ``Head(model, "classify")``, so that the
    trainer and DistributedDataParallel (which run ``forward``) run it. Its weights are the model's,
    under ``model.``."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        if not callable(getattr(model, method, None)):
            raise ValueError(f"Head(model, method): {type(model).__name__} has no method {method!r}")
        self.model = model
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, self.method)(*args, **kwargs)
