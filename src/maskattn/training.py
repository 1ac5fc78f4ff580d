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
import math
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from maskattn import checkpoint, distributed
from maskattn.data import shard


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in all
    lr: float = 5e-4  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.98)  # Adam betas (the paper's 0.98)
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    schedule: str = "inverse_sqrt"  # "inverse_sqrt" (Vaswani et al.), "cosine" or "constant"
    warmup: int = 100  # linear warm-up steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    clip_norm: float | None = 1.0  # gradient clipping by global norm (None: off)
    accumulate: int = 1  # micro-batches per optimizer step
    bf16: bool = False  # bfloat16 autocast for the forward pass
    eval_every: int = 0  # evaluate every N steps (0: only at the end)
    checkpoint_every: int = 100  # checkpoint every N steps (0: only at the end)
    keep: int = 2  # step checkpoints kept (the best one is kept apart)
    metric: str = "loss"  # evaluation metric that picks the best checkpoint
    higher_is_better: bool = False  # direction of that metric
    patience: int = 0  # stop after this many evaluations without improvement (0: never)
    seed: int = 0  # seeds data order and dropout
    log_every: int = 10  # steps between metric log lines
    progress: bool = True  # show a progress bar
    # torch.compile the model in place (nn.Module.compile) before training; maskattn's models compile to one graph
    compile: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in ("inverse_sqrt", "cosine", "constant"):
            raise ValueError(f"schedule must be 'inverse_sqrt', 'cosine' or 'constant', got {self.schedule!r}")
        for name in ("steps", "accumulate"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.betas = tuple(self.betas)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based)."""
    warm = min(1.0, step / cfg.warmup) if cfg.warmup else 1.0
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * min(warm, math.sqrt(cfg.warmup / step) if cfg.warmup else 1 / math.sqrt(step))
    if cfg.schedule == "cosine" and step > cfg.warmup:
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
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


# --- the trainer -----------------------------------------------------------------------------------
Batch = dict[str, Any]


class Trainer:
    """Train ``model`` with AdamW; see the module docstring for what a task provides.

    Args:
        model: the model (moved to ``device``; wrapped in DistributedDataParallel under torchrun).
        cfg: hyper-parameters.
        plan, collate, loss: the task's data and loss (module docstring).
        out_dir: where checkpoints and ``metrics.jsonl`` go.
        evaluate: optional ``evaluate(model) -> dict[str, float]``; must contain ``cfg.metric``.
        device: where to train (default: CUDA if available, else CPU).
        rank, world_size: this process and the number of processes, as :func:`maskattn.distributed.init`
            returns them (default: a single process).

    Raises:
        ValueError: when ``rank`` / ``world_size`` do not match the process group this process joined.
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
    ) -> None:
        self.cfg, self.plan, self.collate, self.loss_fn, self.evaluate = cfg, plan, collate, loss, evaluate
        self.out_dir = Path(out_dir)
        distributed.check(distributed.Context(rank, world_size))
        self.rank, self.world = rank, world_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device)
        if cfg.compile:
            self.model.compile()  # in place: state_dict keys and the model's other methods stay as they are
        self.ddp = nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else None
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas,
        )
        self.step, self.epoch, self.position = 0, 0, 0
        self._planned: tuple[int, list[list[int]]] | None = None
        self.best: float | None = None
        self.bad_evals = 0

    # --- state -------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "position": self.position,
            "best": self.best,
            "bad_evals": self.bad_evals,
            "config": asdict(self.cfg),
        }

    def resume(self, path: str | Path | None = None) -> bool:
        """Load the newest checkpoint under ``out_dir/checkpoints`` (or ``path``); False if none."""
        path = Path(path) if path else checkpoint.latest(self.out_dir / "checkpoints")
        if path is None:
            return False
        state = checkpoint.load(path)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise checkpoint.CheckpointError(f"checkpoint {path} does not fit this model: {e}") from e
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best, self.bad_evals = state["best"], state["bad_evals"]
        self._trim_log()
        return True

    def save(self) -> None:
        if self.rank == 0:
            checkpoint.save(self.out_dir / "checkpoints", self.step, self.state(), keep=self.cfg.keep)

    # --- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train to ``cfg.steps`` (or early stop); return the last evaluation (or the last loss)."""
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=self.rank != 0 or not cfg.progress,
                   desc="train", unit="step", dynamic_ncols=True)
        last: dict[str, float] = {}
        window_loss, window_targets, window_start = 0.0, 0.0, time.perf_counter()
        while self.step < cfg.steps:
            micro = self._next_micro_batches()
            loss_sum, targets = self._optimizer_step(micro)
            window_loss, window_targets = window_loss + loss_sum, window_targets + targets
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                last = {"loss": window_loss / max(window_targets, 1), "lr": learning_rate(cfg, self.step),
                        "targets_per_s": window_targets / max(elapsed, 1e-9)}
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['targets_per_s']:.0f}")
                self._log({"step": self.step, **last})
                window_loss, window_targets, window_start = 0.0, 0.0, time.perf_counter()
            stop = False
            if self.evaluate and cfg.eval_every and self.step % cfg.eval_every == 0:
                last, stop = self._evaluate()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save()
            if stop:
                break
        bar.close()
        if self.evaluate and not (cfg.eval_every and self.step % cfg.eval_every == 0):
            last, _ = self._evaluate()
        self.save()
        return last

    def _next_micro_batches(self) -> list[Batch]:
        micro = []
        while len(micro) < self.cfg.accumulate:
            if self._planned is None or self._planned[0] != self.epoch:
                self._planned = (self.epoch, shard(self.plan(self.epoch), self.rank, self.world))
            batches = self._planned[1]
            if not batches:
                raise ValueError("the data plan gave no batch (is the training set empty?)")
            if self.position >= len(batches):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            micro.append(self.collate(batches[self.position]))
            self.position += 1
        return micro

    def _optimizer_step(self, micro: list[Batch]) -> tuple[float, float]:
        cfg = self.cfg
        self.step += 1
        torch.manual_seed(cfg.seed * 1_000_003 + self.step * 7919 + self.rank)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, self.step)
        total_targets = distributed.all_sum(float(sum(b["num_targets"] for b in micro)))
        module = self.ddp or self.model
        self.model.train()
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            sync = self.ddp is None or i == len(micro) - 1
            with (nullcontext() if sync else self.ddp.no_sync()), self._autocast():
                loss = self.loss_fn(module, batch)
                # DDP averages gradients over ranks: scale by world size to get the global sum.
                (loss * self.world / max(total_targets, 1.0)).backward()
            loss_sum += float(loss.detach())
        if cfg.clip_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return distributed.all_sum(loss_sum), total_targets

    def _autocast(self):
        if not self.cfg.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _evaluate(self) -> tuple[dict[str, float], bool]:
        self.model.eval()
        with torch.no_grad():
            metrics = self.evaluate(self.model)
        if self.cfg.metric not in metrics:
            raise KeyError(f"evaluate() returned {sorted(metrics)}, without the metric {self.cfg.metric!r}")
        self._log({"step": self.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        value = metrics[self.cfg.metric]
        better = self.best is None or (value > self.best if self.cfg.higher_is_better else value < self.best)
        if better:
            self.best, self.bad_evals = value, 0
            if self.rank == 0:
                checkpoint.save(self.out_dir / "best", self.step, self.state(), keep=1)
        else:
            self.bad_evals += 1
        return metrics, bool(self.cfg.patience and self.bad_evals >= self.cfg.patience)

    # --- the metrics log ---------------------------------------------------------------------------
    def _log(self, record: dict[str, float]) -> None:
        if self.rank == 0:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _trim_log(self) -> None:
        """After a resume, drop log lines of steps that will be replayed."""
        log = self.out_dir / "metrics.jsonl"
        if self.rank == 0 and log.exists():
            lines = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            log.write_text("".join(ln + "\n" for ln in lines))

