"""The task protocol: one :class:`Task` record per task, registered by the task's own file.

Everything that names tasks iterates the registry: ``maskattn train TASK`` (its choices and its
``--PATH`` shortcuts), ``maskattn evaluate`` (dispatched on the ``task`` of a model's ``task.json``,
with each task's own flags) and the prediction subcommands (``maskattn translate``, ``classify`` ...).
Adding a task is one new file that ends in ``register(Task(...))`` plus its name in
:data:`maskattn.tasks.BUILTIN`; see CONTRIBUTING.md, "Adding a task".
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from maskattn.errors import UsageError, check_seed


@dataclass(frozen=True)
class Command:
    """A subcommand of the ``maskattn`` CLI that a task owns: its prediction command.

    Its first argument is always ``model``, a model directory trained for the task (the CLI adds it).
    """

    name: str  # the subcommand, e.g. "translate"
    help: str  # one line for `maskattn --help`
    arguments: Callable[[argparse.ArgumentParser], None]  # adds the arguments after `model` to its parser
    run: Callable[[argparse.Namespace], int]  # runs it on the parsed arguments; returns the exit status


@dataclass(frozen=True)
class Overlay:
    """A picture a task asks ``maskattn viz`` to draw (matplotlib lives in the viz layer): a heat map
    stretched over an image, e.g. one generated word's cross-attention over the image patches."""

    name: str  # file name stem, e.g. "word1_seven"
    title: str
    image: Any  # (H, W) numpy array of grey levels in [0, 1]
    heat: Any  # (rows, cols) numpy array, stretched over the image


@dataclass(frozen=True)
class Option:
    """A ``maskattn evaluate`` flag that one task reads, passed to its ``evaluate_file`` as a keyword."""

    flag: str  # e.g. "--beam"
    keyword: str  # the evaluate_file keyword it fills, e.g. "beam_size"; passed only when given (not None)
    help: str  # shown after the task's name in `maskattn evaluate --help`
    type: Callable[[str], Any] = str
    repeat: bool = False  # may be given several times; the keyword gets the list of values


@dataclass(frozen=True)
class TrainingBatches:
    """A trained model's task data as the trainer takes it, for work after training (``maskattn compress``:
    head importance and the fine-tune): batches of example indices, the batch of some indices, the loss."""

    plan: Callable[[int], list[list[int]]]  # plan(epoch) -> the batches of that epoch, lists of example indices
    collate: Callable[[list[int]], dict[str, Any]]  # a batch, with "num_targets" (what the loss is summed over)
    loss: Callable[[Any, dict[str, Any]], Any]  # loss(maskattn model, batch) -> the summed loss, a scalar Tensor
    # outputs(model, batch) -> ((N, C) float logits, (N,) class targets) of the N targets the loss counts
    # (what distillation compares with a teacher's); None: the task cannot be distilled
    outputs: Callable[[Any, dict[str, Any]], tuple[Any, Any]] | None = None


@dataclass(frozen=True)
class Task:
    """One trainable task: what the CLI and the library need to train, load, score and use it.

    ``train``, ``load`` and ``evaluate_file`` are the task module's public functions, so a task is
    used the same way from Python and from the command line.
    """

    name: str  # `maskattn train NAME`, and the "task" written to a trained model's task.json
    config: Callable[[], Any]  # the default configuration: a dataclass with data / train sections and out
    train: Callable[..., dict[str, Any]]  # train(cfg, *, resume=False, log=...) -> last scores and model dir
    load: Callable[[str | Path], Any]  # load(model dir) -> (model, tokenizer, settings); checks the task kind
    evaluate_file: Callable[..., dict[str, float]]  # evaluate_file(model dir, data file, **options) -> scores
    predict: Command  # the prediction subcommand
    data_help: str  # what `maskattn evaluate --data FILE` reads for this task
    paths: tuple[str, ...] = ()  # data settings given as `maskattn train --NAME PATH` (data.NAME)
    evaluate_options: tuple[Option, ...] = ()  # `maskattn evaluate` flags only this task reads
    # `maskattn viz` on this task's models: visualize(model dir, input, out dir) -> (overlays for the viz
    # layer to draw, files the task wrote itself); None = the attention heatmaps of a text input (maskattn.viz)
    visualize: Callable[[str | Path, str, str | Path], tuple[list[Overlay], list[Path]]] | None = None
    # `maskattn compress --data FILE ...` on this task's models: training_batches(model dir, data files,
    # max_tokens) -> TrainingBatches of the files (read as `maskattn train` reads its training data); None = the
    # task's models can be quantised but not pruned (pruning measures and fine-tunes on task data)
    training_batches: Callable[[str | Path, list[str], int], TrainingBatches] | None = None
    # model settings the task sets itself: derived(cfg) -> {"model.X": where its value comes from}; `maskattn
    # train` refuses a --set or --config of one (it would be ignored)
    derived: Callable[[Any], dict[str, str]] | None = None
    # the names the task's validation scores carry (what train.metric may name; () = not declared)
    metrics: tuple[str, ...] = ()


# argparse types of the commands' flags: a bad value is refused naming the flag as typed (`argument --top-k:
# expected a positive integer, got 0`), where the library's own check would name its Python parameter
def seed_int(text: str) -> int:
    """argparse type: a seed torch accepts, 0 <= seed < 2**63."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    try:
        check_seed(value, "a seed")
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (a length, a tile size), else an error naming the value."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """An argparse type: an int >= 0 (a count that may be none: steps, tokens), else an error naming the value."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


MAX_BEAMS = 2**40  # beams a search may keep: more would need terabytes, and from ~2**62 torch cannot size the tensors


def beam_width(text: str) -> int:
    """An argparse type: a number of beams (or of best hypotheses), 1 <= n <= :data:`MAX_BEAMS`."""
    value = positive_int(text)
    if value > MAX_BEAMS:  # torch's TypeError or "Storage size calculation overflowed", not an out-of-memory error
        raise argparse.ArgumentTypeError(f"expected at most 2**40 beams (their scores alone would fill terabytes), "
                                         f"got {value}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a fraction of a whole that keeps something, a number in [0, 1)."""
    value = _float(text)
    if not 0 <= value < 1:  # (NaN too)
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text}")
    return value


def temperature_float(text: str) -> float:
    """An argparse type: a sampling temperature, a finite number >= 0 (0: greedy)."""
    value = _float(text)
    if not 0 <= value < math.inf:  # (NaN too)
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0: greedy), got {value}")
    return value


def probability_mass(text: str) -> float:
    """An argparse type: a top-p nucleus, a number in (0, 1]."""
    value = _float(text)
    if not 0 < value <= 1:  # (NaN too)
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def input_lines(texts: list[str]) -> list[str]:
    """The texts given on the command line, or else (none, or ``-`` alone) one per line from stdin."""
    if texts and texts != ["-"]:
        return texts
    lines = []
    for n, line in enumerate(sys.stdin, 1):
        line = line.rstrip("\r\n")  # a CRLF line is the same text as an LF one
        if n == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark is not text, as data.open_text reads files
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as e:  # undecodable bytes reach Python as lone surrogates
            raise UsageError(f"stdin line {n}: not UTF-8 text at character {e.start}; give text in UTF-8") from None
        lines.append(line)
    return lines


_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add ``task`` to the registry (once per name); returns it, so a task file can keep it as ``TASK``."""
    if task.name in _REGISTRY and _REGISTRY[task.name] is not task:
        raise ValueError(f"task {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def tasks() -> dict[str, Task]:
    """Every registered task by name: the built-in ones in the order of :data:`maskattn.tasks.BUILTIN`
    (importing a built-in task's module registers it), then any other, in the order registered."""
    from maskattn.tasks import BUILTIN

    for name in BUILTIN:
        import_module(f"maskattn.tasks.{name}")
    ordered = [name for name in BUILTIN if name in _REGISTRY]
    return {name: _REGISTRY[name] for name in [*ordered, *(n for n in _REGISTRY if n not in ordered)]}


def get(name: str) -> Task:
    """The registered task called ``name``.

    Raises:
        ValueError: naming the unknown task and the registered ones.
    """
    known = tasks()
    if name not in known:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(known)}")
    return known[name]
