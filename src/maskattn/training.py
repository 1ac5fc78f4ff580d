"""The training engine shared by every task.

A task hands the :class:`Trainer` three things:

* ``plan(epoch) -> list[list[int]]``: the batches of an epoch as lists of example indices,
  deterministic in the epoch (so a resumed run replays the same order);
* ``collate(indices) -> dict``: a batch; it must hold ``"num_targets"``, the number of predictions
  the loss is summed over (tokens, labels, spans), known before the forward pass;
* ``loss(model, batch) -> Tensor``: the *summed* loss of the batch.

The trainer divides by the number of targets of the whole optimizer step (all micro-batches, all
ranks), so gradient accumulation and ``torchrun`` give the same update as one big batch. The trainer
does not join a process group: its caller does, once, with :func:`maskattn.distributed.init`, and
passes ``rank`` and ``world_size``.

Reproducibility: the random generator is reseeded from (seed, step, rank) before every step, so
dropout does not depend on where a run was resumed; with the checkpointed model, optimizer, step
and data position, a run killed at any point and resumed ends with the same weights.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from maskattn import checkpoint, distributed
from maskattn.allocator import memory_kept, release_freed_memory
from maskattn.data import mixed_seed, shard
from maskattn.errors import (
    RunDirectoryError,
    SettingError,
    TrainingError,
    UnknownSettingError,
    UsageError,
    check_settings,
)
from maskattn.io import atomic_write_text

# The run directory's functions lived in this module before run_directory.py: still importable from here.
from maskattn.run_directory import (
    RUN_ENTRIES,  # noqa: F401
    RUN_FILE_PATTERN,  # noqa: F401
    check_run_directory,  # noqa: F401
    check_same_run,
    clear_run_directory,  # noqa: F401
    discard_replaced_run,
    prepare_run_directory,  # noqa: F401
    replacing_run,  # noqa: F401
    run_lock,  # noqa: F401
)


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in all
    lr: float = 5e-4  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.98)  # Adam betas (the paper's 0.98)
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    schedule: str = "inverse_sqrt"  # "inverse_sqrt" (Vaswani et al.), "cosine", "linear" (BERT) or "constant"
    warmup: int = 100  # linear warm-up steps
    min_lr_ratio: float = 0.1  # cosine and linear decay to lr * min_lr_ratio (0: to zero, as BERT's recipe)
    clip_norm: float | None = 1.0  # gradient clipping by global norm (None: off)
    accumulate: int = 1  # micro-batches per optimizer step
    bf16: bool = False  # bfloat16 autocast for the forward pass
    eval_every: int = 0  # evaluate every N steps (0: only at the end)
    checkpoint_every: int = 100  # checkpoint every N steps (0: only at the end)
    keep: int = 2  # step checkpoints kept, newest by step (the best one is kept apart); >= 1
    metric: str = "loss"  # evaluation metric that picks the best checkpoint
    higher_is_better: bool = False  # direction of that metric
    patience: int = 0  # stop after this many evaluations without improvement (0: never)
    seed: int = 0  # seeds data order and dropout
    log_every: int = 10  # steps between metric log lines
    progress: bool = True  # show a progress bar
    report_to: list[str] = field(default_factory=list)  # also report metrics to: "tensorboard" (OUT/events)
    compile: bool = False  # torch.compile the model in place before training (maskattn's models: one graph)
    # layer i of L ("layers.i." in a parameter's name) at lr * layer_decay ** (L - i), embeddings at ** (L + 1)
    layer_decay: float = 1.0  # layer-wise learning-rate decay for fine-tuning (1: off; heads keep lr)

    def __post_init__(self) -> None:
        check_settings(self, {
            "steps": ("int>=", 1), "lr": ("float>", 0), "weight_decay": ("float>=", 0),
            "schedule": ("one of", ("inverse_sqrt", "cosine", "linear", "constant")), "warmup": ("int>=", 0),
            "min_lr_ratio": ("in", (0, 1, "[]")), "layer_decay": ("in", (0, 1, "(]")),
            "accumulate": ("int>=", 1), "eval_every": ("int>=", 0),
            "checkpoint_every": ("int>=", 0), "keep": ("int>=", 1), "patience": ("int>=", 0),
            "seed": ("seed", None), "log_every": ("int>=", 1)})
        if self.clip_norm is not None:
            check_settings(self, {"clip_norm": ("float>", 0)})
        if not isinstance(self.metric, str) or not self.metric:
            raise SettingError(f"metric must be the name of an evaluation metric, got {self.metric!r}")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if betas is None or len(betas) != 2 or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
            raise SettingError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = betas
        if not isinstance(self.report_to, (list, tuple)) or any(name not in REPORTERS for name in self.report_to):
            raise SettingError(f"report_to must be a list of {', '.join(map(repr, REPORTERS))}, got {self.report_to!r}")
        self.report_to = list(self.report_to)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based)."""
    warm = min(1.0, step / cfg.warmup) if cfg.warmup else 1.0
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * min(warm, math.sqrt(cfg.warmup / step) if cfg.warmup else 1 / math.sqrt(step))
    if cfg.schedule in ("cosine", "linear") and step > cfg.warmup:
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        left = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * left)
    return cfg.lr * warm


def __getattr__(name: str) -> Any:
    """Deprecated names: ``plot_curves`` moved to the viz layer, :func:`maskattn.plotting.plot_curves`."""
    if name == "plot_curves":
        warnings.warn("maskattn.training.plot_curves moved to maskattn.plotting.plot_curves", DeprecationWarning,
                      stacklevel=2)
        # imported by name at call time: a compatibility shim, not a dependency of training on the viz layer
        return importlib.import_module("maskattn.plotting").plot_curves
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def setup_distributed() -> tuple[int, int]:
    """Deprecated: call :func:`maskattn.distributed.init` at the entry point; returns (rank, world_size)."""
    warnings.warn("maskattn.training.setup_distributed is deprecated; call maskattn.distributed.init() at the "
                  "entry point and pass its rank and world_size to the Trainer", DeprecationWarning, stacklevel=2)
    context = distributed.init()
    return context.rank, context.world_size


# --- callbacks -------------------------------------------------------------------------------------
class Callback:
    """What a run reports, as it happens: subclass and override any method, pass ``Trainer(callbacks=[...])``.

    Called on rank 0 only (the process that writes the run directory), in the order given.
    ``metrics`` are plain floats; the trainer is passed for its ``step``, ``out_dir`` and ``model``.
    """

    def on_step(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        """After every optimizer step: ``loss`` (mean over the step's targets) and ``lr``."""

    def on_evaluate(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        """After every evaluation: what ``evaluate`` returned."""

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None:
        """After a step checkpoint was written to ``path``."""

    def on_end(self, trainer: Trainer) -> None:
        """When ``fit`` returns or raises: release what the callback holds (files, writers)."""


class TensorBoard(Callback):
    """Metrics as TensorBoard scalars (``train/loss``, ``train/lr``, ``eval/<metric>``) in ``log_dir``,
    written by TensorBoard's own ``SummaryWriter`` (``pip install maskattn[tensorboard]``). ``purge_step``: a
    resumed run's first step; TensorBoard drops what ``log_dir`` holds of that step and later (steps it replays)."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UsageError("train.report_to = ['tensorboard'] needs the tensorboard package: "
                             "pip install 'maskattn[tensorboard]'") from e
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def on_step(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def on_evaluate(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"eval/{name}", value, step)

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None:
        self.writer.flush()

    def on_end(self, trainer: Trainer) -> None:
        self.writer.close()


# train.report_to names -> the callback, built with the run directory and, for a resumed run, its first step (what
# was reported of that step and later belongs to steps the run replays)
REPORTERS: dict[str, Callable[[Path, int | None], Callback]] = {
    "tensorboard": lambda out, resumed_at: TensorBoard(out / "events", purge_step=resumed_at)}

# seconds between progress lines when stderr is not a terminal (a log file): there, a bar would be rewritten up to 10
# times a second, each time after a carriage return, into one line that grows by megabytes in a long run
PLAIN_PROGRESS_EVERY = 30.0

RELEASE_EVERY = 50  # steps between handing freed heap pages back to the kernel (allocator.release_freed_memory)


def to_device(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor in it (also in dicts, lists and tuples) on ``device``; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(to_device(item, device) for item in value))
    if isinstance(value, list | tuple):
        return type(value)(to_device(item, device) for item in value)
    return value


def _on_terminal(stream: Any) -> bool:
    """Whether ``stream`` (stderr) is a terminal; False for a file, a pipe, or a closed or missing stream."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress on stderr, one rule for every long loop: a tqdm bar on a terminal; where stderr is a file (no
    terminal), plain lines through the ``maskattn`` logger instead: the first at once, then at most one per
    :data:`PLAIN_PROGRESS_EVERY` seconds, and one at the end. Nothing when ``show`` is False.

    Args:
        total: the count at the end. desc, unit: the bar's label and unit, which the plain lines use too.
        show: whether to report at all (False under ``maskattn -q``). initial: the count already done (a resume).
        lines: ``update`` writes the plain lines ("desc: n/total unit, T elapsed"); False: the caller writes
            its own where :meth:`due` says so. leave: keep the bar on the terminal when it closes.
    """

    def __init__(self, total: int, *, desc: str, unit: str, show: bool, initial: int = 0, lines: bool = True,
                 leave: bool = True) -> None:
        self.total, self.done, self.desc, self.unit, self.lines = total, initial, desc, unit, lines
        self.plain = show and not _on_terminal(sys.stderr)
        self.began, self._said = time.perf_counter(), -math.inf
        self.bar = tqdm(total=total, initial=initial, disable=not show or self.plain, desc=desc, unit=unit,
                        dynamic_ncols=True, leave=leave)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        if self.lines and self.due():
            logging.getLogger("maskattn").info("%s: %d/%d %s, %s elapsed", self.desc, self.done, self.total,
                                               self.unit, tqdm.format_interval(time.perf_counter() - self.began))

    def due(self, now: float | None = None) -> bool:
        """Whether a plain line is due at ``now`` (default: now); True marks it said."""
        now = time.perf_counter() if now is None else now
        if not self.plain or (now - self._said < PLAIN_PROGRESS_EVERY and self.done < self.total):
            return False
        self._said = now
        return True

    def close(self) -> None:
        self.bar.close()


# --- the trainer -----------------------------------------------------------------------------------
Batch = dict[str, Any]


def parameter_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on matrices only; with ``layer_decay`` < 1, one group per
    depth whose ``lr_scale`` is ``layer_decay ** (L + 1 - depth)``: depth 0 for embeddings (``embed`` in the
    name), i + 1 for ``layers.i.``, L + 1 (scale 1) for everything else, L the number of layers."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    found = [re.findall(r"layers\.(\d+)\.", name) for name, _ in named]
    top = 1 + max((int(f[-1]) for f in found if f), default=-1)  # L

    def depth(name: str, layer: list[str]) -> int:
        return int(layer[-1]) + 1 if layer else 0 if "embed" in name else top + 1

    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    for (name, p), layer in zip(named, found, strict=True):
        level = depth(name, layer) if layer_decay < 1.0 else top + 1
        key = (p.dim() >= 2, level)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if key[0] else 0.0,
                           "lr_scale": layer_decay ** (top + 1 - level)}
        groups[key]["params"].append(p)
    # matrices first, shallow first: without layer decay, the [decay, no decay] order older checkpoints hold
    return [groups[key] for key in sorted(groups, key=lambda key: (not key[0], key[1]))]


class Trainer:
    """Train ``model`` with AdamW; see the module docstring for what a task provides.

    Args:
        model: the model (moved to ``device``; wrapped in DistributedDataParallel under torchrun).
        cfg: hyper-parameters.
        plan, collate, loss: the task's data and loss (module docstring).
        out_dir: where checkpoints and ``metrics.jsonl`` go.
        evaluate: optional ``evaluate(model) -> dict[str, float]``; must contain ``cfg.metric``. Under torchrun
            every process runs it, and rank 0's scores (sent to the others) are the ones logged, returned and
            counted towards the best checkpoint and early stopping on every process.
        device: where to train (default: this process's GPU, ``cuda:LOCAL_RANK`` under torchrun, if CUDA is
            available, else CPU).
        rank, world_size: this process and the number of processes, as :func:`maskattn.distributed.init`
            returns them (default: a single process).
        callbacks: :class:`Callback` objects told of every step, evaluation and checkpoint (rank 0),
            after those named by ``cfg.report_to``.
        run: what the run is (``{"task": ..., "model": the model's settings}``): kept in every checkpoint, and a
            resume whose run differs is refused, naming the first difference (:func:`check_same_run`).

    Raises:
        ValueError: when ``rank`` / ``world_size`` do not match the process group this process joined.
        SettingError: ``cfg.patience`` without ``evaluate``.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        *,
        plan: Callable[[int], list[list[int]]],
        collate: Callable[[list[int]], Batch],
        loss: Callable[[nn.Module, Batch], Tensor],
        out_dir: str | Path,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        device: str | torch.device | None = None,
        rank: int = 0,
        world_size: int = 1,
        callbacks: list[Callback] | tuple[Callback, ...] = (),
        run: dict[str, Any] | None = None,
    ) -> None:
        if cfg.patience and evaluate is None:  # else ignored: early stopping counts evaluations
            raise SettingError(f"train.patience={cfg.patience} stops a run after evaluations without improvement, but "
                               "this run evaluates nothing (no validation data): give it validation data (e.g. "
                               "--valid), or set train.patience=0")
        if cfg.eval_every and evaluate is None and rank == 0:  # (a task's default, e.g. QA's 250: not refused)
            logging.getLogger("maskattn").warning(
                "training: train.eval_every=%d, but this run has no validation data: nothing is evaluated, and the "
                "model of its last step is exported", cfg.eval_every)
        self.run = run
        self.cfg, self.plan, self.collate, self.loss_fn, self.evaluate = cfg, plan, collate, loss, evaluate
        self.out_dir = Path(out_dir)
        distributed.check(distributed.Context(rank, world_size))
        self.rank, self.world = rank, world_size
        self._said_left_out = False
        self.device = torch.device(device) if device is not None else distributed.local_device()
        self.model = model.to(self.device)
        if cfg.compile:
            self.model.compile()  # in place: state_dict keys and the model's other methods stay as they are
        self.ddp = None
        if self.world > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, cfg.weight_decay, cfg.layer_decay),
                                           lr=cfg.lr, betas=cfg.betas)
        self.step, self.epoch, self.position = 0, 0, 0
        self._planned: tuple[int, list[list[int]]] | None = None
        self.best: float | None = None
        self.bad_evals = 0
        self.evaluated: int | None = None  # the step of the newest evaluation that best and bad_evals count
        self.window = (0.0, 0.0)  # summed loss and targets of the steps since the last log line
        self.resumed = False  # set by resume(): fit() then continues the run in out_dir
        self.callbacks = list(callbacks)

    # --- state -------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world,  # position counts the batches of a split between this many processes
            "best": self.best,
            "bad_evals": self.bad_evals,
            "evaluated": self.evaluated,
            "window": list(self.window),
            "config": asdict(self.cfg),
            **({"run": self.run} if self.run is not None else {}),
        }

    def resume(self, path: str | Path | None = None) -> bool:
        """Load the newest checkpoint under ``out_dir/checkpoints`` (or ``path``); False if none.

        With no step checkpoint, the run in ``out_dir`` died before its first one: it starts again from
        step 0, and the best-so-far checkpoint that run may have left (``best/``) is removed with it.
        """
        path = Path(path) if path else checkpoint.latest(self.out_dir / "checkpoints")
        if path is None:
            if self.rank == 0 and (self.out_dir / "best").is_dir():
                shutil.rmtree(self.out_dir / "best")
            self.resumed = True  # continuing this directory's run, from its start
            self._check_same_step(path)
            return False
        state = checkpoint.load(path)
        check_same_run(path, state.get("run"), self.run)
        if isinstance(state.get("step"), int) and state["step"] > self.cfg.steps:  # else exported as if it were done
            raise checkpoint.CheckpointError(
                f"checkpoint {path} is at step {state['step']}, past train.steps={self.cfg.steps}: resume with "
                f"train.steps >= {state['step']}, or start a new run")
        # The settings of each parameter group are this run's (a resume may change train.weight_decay or
        # train.betas); the optimizer state would bring back the checkpoint's.
        settings = [{key: group[key] for key in ("weight_decay", "betas", "lr_scale") if key in group}
                    for group in self.optimizer.param_groups]
        groups = len(state["optimizer"].get("param_groups", [])) if isinstance(state.get("optimizer"), dict) else 0
        if groups and groups != len(settings):
            raise checkpoint.CheckpointError(
                f"checkpoint {path} has {groups} optimizer parameter groups, this run {len(settings)}: resume with "
                "the train.layer_decay (and model settings) the run was started with")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
            more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
            raise checkpoint.CheckpointError(
                f"checkpoint {path} does not fit this model: {details[0]}{more}; resume with the model settings "
                "the run was started with") from e
        for group, own in zip(self.optimizer.param_groups, settings, strict=True):
            group.update(own)
        self.step, self.epoch = state["step"], state["epoch"]
        # (checkpoints written before it was kept: taken to be of as many processes as this run)
        self.position = self._position_of(state["position"], state.get("world_size", self.world))
        self.best, self.bad_evals = state["best"], state["bad_evals"]
        # (checkpoints written before it was kept: taken to count an evaluation logged at their step, as then)
        self.evaluated = state.get("evaluated", self.step)
        self.window = tuple(state.get("window", (0.0, 0.0)))  # (checkpoints before it was kept: a shorter window)
        self.resumed = True
        self._check_same_step(path)
        self._trim_log()
        self._drop_later_best()
        return True

    def _position_of(self, position: int, world: int) -> int:
        """This run's data position for a checkpoint's ``position`` among the batches ``world`` processes split: a
        batch smaller than the number of processes is left out of their split (:func:`maskattn.data.shard`), so with
        another number of processes the batch after the last one trained sits at another index."""
        if world == self.world:
            return position
        if self.rank == 0:
            logging.getLogger("maskattn").warning(
                "training: resumed with %d process(es) a run checkpointed by %d: training goes on from the batch "
                "after the last one trained, but dropout and other random draws differ from the run's", self.world,
                world)
        batches = self.plan(self.epoch)
        kept = [i for i, batch in enumerate(batches) if len(batch) >= world]
        following = kept[min(position, len(kept)) - 1] + 1 if position and kept else 0  # index in the plan
        return sum(len(batch) >= self.world for batch in batches[:following])

    def _drop_later_best(self) -> None:
        """Remove a best checkpoint from after the resumed step (a run killed between its best evaluation and its
        next step checkpoint): it belongs to steps this run replays, and would be exported with scores the log no
        longer holds. The best that step-checkpoint state remembers lost its weights to it (``best/`` keeps one),
        so the best is chosen again from the evaluations that follow."""
        later = 0.0
        if self.rank == 0:
            for path in checkpoint.list_checkpoints(self.out_dir / "best"):
                if checkpoint.step_of(path) > self.step:
                    aside = path.with_name(f".{path.name}.later")  # renamed first: a kill leaves no half checkpoint
                    shutil.rmtree(aside, ignore_errors=True)  # what an earlier kill left there
                    path.rename(aside)
                    shutil.rmtree(aside, ignore_errors=True)
                    later = 1.0
        if (distributed.all_sum(later) if self.world > 1 else later) > 0:
            self.best = None

    def _check_same_step(self, path: Path | None) -> None:
        """Refuse a resume in which processes found different checkpoints (run directories not shared)."""
        if self.world == 1:
            return
        total, squares = distributed.all_sum(float(self.step)), distributed.all_sum(float(self.step) ** 2)
        if self.world * squares != total * total:  # every rank computes the same sums: all refuse together
            raise checkpoint.CheckpointError(
                f"rank {self.rank} resumed at step {self.step} ({path or 'no checkpoint'}) and another rank at "
                f"another step: every process must read the same run directory ({self.out_dir} on a file system "
                "all nodes share)")

    def save(self) -> None:
        if self.rank == 0:
            path = checkpoint.save(self.out_dir / "checkpoints", self.step, self.state(), keep=self.cfg.keep)
            discard_replaced_run(self.out_dir)  # under --overwrite: the replaced run cannot come back now
            for callback in self._listeners():
                callback.on_checkpoint(self, self.step, path)

    # --- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train to ``cfg.steps`` (or early stop); return the last evaluation (or the last loss)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._check_fresh_run()
        self._trim_log()  # a new run starts a new log; a resumed one drops the lines of steps it replays
        resumed_at = self.step + 1 if self.resumed else None
        reporters = [REPORTERS[name](self.out_dir, resumed_at) for name in self.cfg.report_to] if self.rank == 0 else []
        callbacks, self.callbacks = self.callbacks, reporters + self.callbacks
        try:
            return self._fit()
        finally:
            for callback in self._listeners():
                callback.on_end(self)
            self.callbacks = callbacks

    def _listeners(self) -> list[Callback]:
        return self.callbacks if self.rank == 0 else []

    def _fit(self) -> dict[str, float]:
        cfg = self.cfg
        quiet = not logging.getLogger("maskattn").isEnabledFor(logging.INFO)  # `maskattn -q`
        show = self.rank == 0 and cfg.progress and not quiet
        bar = Progress(cfg.steps, initial=self.step, desc="train", unit="step", show=show, lines=False)
        last: dict[str, float] = {}
        window_loss, window_targets = self.window  # a resumed run's log window began before its checkpoint
        timed, window_start = 0.0, time.perf_counter()  # the targets trained since window_start, for the throughput
        if cfg.patience and self.bad_evals >= cfg.patience:  # a resumed run that had already stopped early
            bar.close()
            return self._last_evaluation()
        start, stop = self.step, False
        while self.step < cfg.steps:
            micro = self._next_micro_batches()
            loss_sum, targets = self._optimizer_step(micro)
            window_loss, window_targets, timed = window_loss + loss_sum, window_targets + targets, timed + targets
            self.window = (window_loss, window_targets)
            for callback in self._listeners():
                callback.on_step(self, self.step, {"loss": loss_sum / max(targets, 1),
                                                   "lr": learning_rate(cfg, self.step)})
            bar.update(1)
            logged = self.step % cfg.log_every == 0 or self.step == cfg.steps
            if logged:
                last = self._log_window(window_loss, window_targets, timed, window_start, bar)
                window_loss, window_targets, timed, window_start = 0.0, 0.0, 0.0, time.perf_counter()
                self.window = (0.0, 0.0)
            stop, trained = False, time.perf_counter()
            if self.evaluate and cfg.eval_every and self.step % cfg.eval_every == 0:
                last, stop = self._evaluate()
            if stop and not logged:  # the steps since the last log line are the run's last ones
                self._log_window(window_loss, window_targets, timed, window_start, bar, until=trained)
                self.window = (0.0, 0.0)  # (logged: a resume to more steps must not count them again)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save()
            if self.step % RELEASE_EVERY == 0 and memory_kept():  # kept memory otherwise only grows (allocator.py)
                release_freed_memory()
            if stop:
                break
        bar.close()
        if stop and self.rank == 0:  # else the bar (or the log) ends part-way without a word of why
            than = f"a better {cfg.metric} than {self.best:.4g}" if self.best is not None else f"a finite {cfg.metric}"
            logging.getLogger("maskattn").info("train: stopped early at step %d of %d: %d evaluations without %s "
                                               "(train.patience=%d)", self.step, cfg.steps, self.bad_evals, than,
                                               cfg.patience)
        if self.step == start and self._evaluated_at(self.step):  # a finished run resumed: nothing new to score
            last = self._last_evaluation()  # (evaluating again would log it twice and count it against patience)
            if self.evaluated != self.step:  # killed after logging the final evaluation, before saving what it changed
                if self.rank == 0:  # (best/ and the checkpoint are rank 0's)
                    self._count(last)
                self.save()
            return last
        final_evaluation = bool(self.evaluate) and not (cfg.eval_every and self.step % cfg.eval_every == 0)
        if final_evaluation:
            last, _ = self._evaluate()
        # The loop saved this step already unless its checkpoints fall elsewhere or the evaluation just now
        # changed what a checkpoint holds (the best score).
        if final_evaluation or not (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
            self.save()
        return last

    def _log_window(self, loss: float, targets: float, timed: float, since: float, bar: Progress,
                    until: float | None = None) -> dict[str, float]:
        """Log the mean training loss of the steps since the last log line (summed ``loss`` over ``targets``) and the
        throughput of the ``timed`` targets trained from ``since`` (a resume starts the clock again) to ``until``
        (default: now; an early stop's line is written after the evaluation, which is not training time)."""
        until = time.perf_counter() if until is None else until
        record = {"loss": loss / max(targets, 1), "lr": learning_rate(self.cfg, self.step),
                  "targets_per_s": timed / max(until - since, 1e-9)}
        bar.bar.set_postfix({"loss": f"{record['loss']:.4f}", "targets/s": f"{record['targets_per_s']:.0f}"})
        self._log({"step": self.step, **record})
        if bar.due(until):  # stderr is a file (no bar): the first log line, then one per interval, and the last
            logging.getLogger("maskattn").info(
                "train: step %d/%d, loss %.4f, lr %.3g, %.0f targets/s, %s elapsed", self.step, self.cfg.steps,
                record["loss"], record["lr"], record["targets_per_s"], tqdm.format_interval(until - bar.began))
        return record

    def _evaluated_at(self, step: int) -> bool:
        """Whether the log holds an evaluation at ``step``; the same answer on every rank (rank 0 reads the log)."""
        found = float(bool(self._last_evaluation(step)))
        return (distributed.all_sum(found) if self.world > 1 else found) > 0

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's share of the epoch's batches; says once (rank 0) if batches smaller than the number of
        processes leave examples out, which the split must do for every process to run the same steps."""
        batches = self.plan(epoch)
        left_out = sum(len(b) for b in batches if len(b) < self.world)
        if left_out and self.rank == 0 and not self._said_left_out:
            self._said_left_out = True
            logging.getLogger("maskattn").warning(
                "training: %d of %d examples of epoch %d are left out: their batches hold fewer examples than the "
                "%d processes (raise the batch size or data.max_tokens)", left_out, sum(map(len, batches)), epoch,
                self.world)
        return shard(batches, self.rank, self.world)

    def _next_micro_batches(self) -> list[Batch]:
        micro = []
        while len(micro) < self.cfg.accumulate:
            if self._planned is None or self._planned[0] != self.epoch:
                self._planned = (self.epoch, self._epoch_batches(self.epoch))
            batches = self._planned[1]
            if not batches:
                planned = self.plan(self.epoch) if self.world > 1 else []
                if any(planned):  # every batch smaller than the number of processes (shard drops those)
                    raise ValueError(f"every batch of the data plan holds fewer examples than the {self.world} "
                                     f"processes (the largest: {max(map(len, planned))}): raise the batch size or "
                                     "data.max_tokens, or run fewer processes")
                raise ValueError("the data plan gave no batch (is the training set empty?)")
            if self.position >= len(batches):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            micro.append(to_device(self.collate(batches[self.position]), self.device))  # tasks collate on the CPU
            self.position += 1
        return micro

    def _optimizer_step(self, micro: list[Batch]) -> tuple[float, float]:
        cfg = self.cfg
        self.step += 1
        torch.manual_seed(mixed_seed(cfg.seed * 1_000_003 + self.step * 7919 + self.rank))
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, self.step) * group.get("lr_scale", 1.0)
        total_targets = distributed.all_sum(float(sum(b["num_targets"] for b in micro)))
        module = self.ddp or self.model
        self.model.train()
        losses = []
        for i, batch in enumerate(micro):
            sync = self.ddp is None or i == len(micro) - 1
            with (nullcontext() if sync else self.ddp.no_sync()), self._autocast():
                loss = self.loss_fn(module, batch)
                # DDP averages gradients over ranks: scale by world size to get the global sum.
                (loss * self.world / max(total_targets, 1.0)).backward()
            losses.append(loss.detach())
        # Clipping scales the gradients only, which _stop discards: the losses and the norm come back to the host
        # together, one wait for the device per step (not one per micro-batch). Without clipping the norm is still
        # taken (max_norm inf scales by 1), else a non-finite gradient would reach the weights with a finite loss.
        # (without gradients, clip_grad_norm_ gives a CPU 0)
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm or math.inf)
        *values, norm = torch.stack([*losses, norm.to(losses[0].device)]).tolist()  # dtypes promoted: exact
        loss_sum = 0.0
        for value in values:  # added in order, as logged before (sum() of floats compensates since Python 3.12)
            loss_sum += value
        # Summed over the processes in the one call a step makes anyway, so that every rank stops in the same step:
        # the norm too (each rank takes it of its own copy of the gradients), as 0 where finite, so that the sum
        # is not finite when it is not on some rank.
        loss_sum, bad_norm = distributed.all_sums([loss_sum, 0.0 if math.isfinite(norm) else norm])
        if not math.isfinite(loss_sum):
            self._stop(f"the training loss is {loss_sum}")
        if not math.isfinite(bad_norm):
            self._stop(f"the gradient norm is {bad_norm}")
        try:
            self.optimizer.step()
        except RuntimeError as e:  # AdamW's step lr / (1 - beta1 ** step) past the weights' dtype (train.lr=1e38)
            if "overflow" not in str(e):
                raise
            lr = self.optimizer.param_groups[0]["lr"]
            self._stop(f"the optimizer's update overflows the weights at learning rate {lr:g} (train.lr={cfg.lr:g}; "
                       f"torch: {e})", updated=True)
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, total_targets

    def _stop(self, what: str, *, updated: bool = False) -> None:
        """Stop training before a non-finite update reaches the weights (or, ``updated``, when the update itself
        failed part-way: nothing of it is saved); checkpoints on disk stay as they are."""
        self.optimizer.zero_grad(set_to_none=True)
        good = checkpoint.latest(self.out_dir / "checkpoints")
        stopped = "and this step is not saved" if updated else "before updating the weights"
        raise TrainingError(
            f"step {self.step}: {what}; training stopped {stopped}. The last good checkpoint is "
            f"{good if good else 'none (no checkpoint was written yet)'}. Lower train.lr, or check the model settings "
            "(e.g. model.norm_eps) and the data")

    def _autocast(self):
        if not self.cfg.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _evaluate(self) -> tuple[dict[str, float], bool]:
        self.model.eval()
        with torch.no_grad():
            metrics = self.evaluate(self.model)
        # Every process evaluates, but on a GPU two may score differently in the last bit: rank 0's scores decide
        # the best checkpoint and early stopping everywhere, else one rank could stop while another trains on.
        metrics = distributed.from_main(metrics)  # (itself in a single process)
        if self.cfg.metric not in metrics:
            raise UnknownSettingError(f"train.metric {self.cfg.metric!r} is not one of the evaluation's metrics: "
                                      f"{sorted(metrics)}")
        self._log({"step": self.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        if self.rank == 0:  # else a long run shows no score until it ends; INFO: not under `maskattn -q`
            with tqdm.external_write_mode(file=sys.stderr):  # on a terminal, a line of its own, not on after the bar
                logging.getLogger("maskattn").info("eval step %d: %s", self.step,
                                                   ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        for callback in self._listeners():
            callback.on_evaluate(self, self.step, dict(metrics))
        return metrics, self._count(metrics)

    def _count(self, metrics: dict[str, float]) -> bool:
        """Count this step's evaluation ``metrics`` towards the best checkpoint (saved to ``best/`` when better) and
        early stopping; whether the run stops (``train.patience``)."""
        value = metrics[self.cfg.metric]
        better = math.isfinite(value) and (  # a NaN metric never picks the best checkpoint
            self.best is None or (value > self.best if self.cfg.higher_is_better else value < self.best))
        if better:
            self.best, self.bad_evals = value, 0
            if self.rank == 0:
                checkpoint.save(self.out_dir / "best", self.step, self.state(), keep=1)
        else:
            self.bad_evals += 1
        self.evaluated = self.step
        return bool(self.cfg.patience and self.bad_evals >= self.cfg.patience)

    # --- the metrics log ---------------------------------------------------------------------------
    def _last_evaluation(self, step: int | None = None) -> dict[str, float]:
        """The newest evaluation in the log (at ``step``, if given), without its ``eval_`` prefixes; empty if there
        is none."""
        log = self.out_dir / "metrics.jsonl"
        lines = log.read_text(encoding="utf-8").splitlines() if self.rank == 0 and log.exists() else []
        for line in reversed(lines):
            record = json.loads(line)
            if any(key.startswith("eval_") for key in record) and step in (None, record.get("step")):
                return {key[5:]: value for key, value in record.items() if key.startswith("eval_")}
        return {}

    def evaluation_at(self, step: int) -> dict[str, float]:
        """The evaluation logged at ``step`` (e.g. that of the best checkpoint); empty if none was (rank 0 only)."""
        return self._last_evaluation(step)

    def _log(self, record: dict[str, float]) -> None:
        """Append ``record`` to ``metrics.jsonl`` with ``time``, when it was written (Unix seconds)."""
        if self.rank == 0:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({**record, "time": time.time()}) + "\n")

    def _check_fresh_run(self) -> None:
        """A run that was not resumed must not write into the checkpoints of another run."""
        if self.resumed:
            return
        found = [p for sub in ("checkpoints", "best") for p in checkpoint.list_checkpoints(self.out_dir / sub)]
        if found:
            names = ", ".join(str(p.relative_to(self.out_dir)) for p in found[:4])
            raise RunDirectoryError(
                f"{self.out_dir} holds checkpoints of another run ({names}): "
                "call resume() to continue it, or train into an empty directory "
                "(maskattn.run_directory.clear_run_directory clears a run directory)")

    def _trim_log(self) -> None:
        """Keep the log lines of steps up to the current one (none for a new run).

        A last line cut short by a crash (kill -9 mid-write) is dropped; a bad line before the last
        is an error naming the file and line.
        """
        log = self.out_dir / "metrics.jsonl"
        if self.rank != 0 or not log.exists():
            return
        text = log.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        kept = []
        for n, line in enumerate(lines, 1):
            try:
                record = json.loads(line) if line.strip() else None
                step = record["step"] if isinstance(record, dict) else None
            except (json.JSONDecodeError, KeyError):
                step = None
            if isinstance(step, bool) or not isinstance(step, int):  # the trainer writes int steps; "2" is an edit
                if n == len(lines) or not line.strip():
                    continue  # a half-written last line, or a blank one
                raise UsageError(f"{log}:{n}: not a metrics record (JSON with an int step): {line[:60]!r}")
            if step <= self.step:
                kept.append(line)
        cut = not text.endswith("\n") and bool(text)  # a last line without its newline: the next record would join it
        if len(kept) != len(lines) or cut:  # replaced whole: a kill while writing leaves the old log, not half of it
            atomic_write_text(log, "".join(ln + "\n" for ln in kept))

