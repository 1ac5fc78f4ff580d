"""Checkpoint averaging: the element-wise mean of the weights of a run's last N step checkpoints.

Averaging the last few checkpoints of a run (Vaswani et al. average the last 5 or 20) usually adds a
little BLEU for free: the mean sits nearer the centre of the region the optimizer wanders in at the
end of training. ``maskattn average RUN --last N --out DIR`` writes a model directory like
``RUN/model`` (same config, tokenizer and ``task.json``) with the averaged weights.

``maskattn average --models A B ... --out DIR`` averages finished models instead: a *uniform model soup*
(Wortsman et al., 2022), models fine-tuned from one pretrained start with different settings, whose
mean often scores better than each of them. They must share the config, tokenizer and task.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from maskattn import checkpoint
from maskattn.io import read_json_object
from maskattn.models import load, save
from maskattn.models.persistence import check_model_directory, refuse_run_directory
from maskattn.tasks.common import read_task, write_task
from maskattn.tokenization import Tokenizer

CHECKPOINTS = "checkpoints"  # where the Trainer writes a run's step checkpoints


def average_states(states: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The element-wise mean of state dicts with the same keys and shapes (accumulated in float64).

    Read one state at a time, into a running sum: given an iterator (checkpoints loaded as it is read), memory
    holds the sum and one state, not all of them. Integer tensors (step counters, buffers of ids) must agree
    across states and are kept as they are.
    """
    first: dict[str, tuple[torch.Size, torch.dtype]] = {}
    sums: dict[str, Tensor] = {}  # float64 running sums, and the integer tensors of state 0
    count = 0
    for i, state in enumerate(states):
        if i == 0:
            first = {key: (value.shape, value.dtype) for key, value in state.items()}
            sums = {key: value.to(torch.float64, copy=True) if value.is_floating_point() else value.clone()
                    for key, value in state.items()}
        elif set(state) != set(first):
            raise ValueError(f"state {i} has different keys from state 0: "
                             f"{sorted(set(first) ^ set(state))[:5]} differ")
        else:
            for key, (shape, dtype) in first.items():
                value = state[key]
                if value.shape != shape:
                    raise ValueError(f"{key}: state {i} has shape {tuple(value.shape)}, state 0 has {tuple(shape)}")
                if dtype.is_floating_point:
                    sums[key] += value.double()
                elif not torch.equal(value, sums[key]):
                    raise ValueError(f"{key}: integer tensor differs between checkpoints; it cannot be averaged")
        count = i + 1
    if not count:
        raise ValueError("average_states needs at least one state dict, got none")
    return {key: (sums[key] / count).to(dtype) if dtype.is_floating_point else sums[key]
            for key, (_, dtype) in first.items()}


def _match_keys(state: dict[str, Tensor], wanted: set[str], where: Path) -> dict[str, Tensor]:
    """Map a trainer's state dict onto the exported model's keys (a task may wrap the model, adding a prefix)."""
    if set(state) >= wanted:
        return {k: state[k] for k in wanted}
    for key in state:
        for name in wanted:
            if key.endswith("." + name):
                prefix = key[: -len(name)]
                renamed = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                if set(renamed) >= wanted:
                    return {k: renamed[k] for k in wanted}
                break
    missing = sorted(wanted - set(state))[:5]
    raise ValueError(f"checkpoint {where} does not hold the weights of the run's model (missing e.g. {missing})")


def average_run(run: str | Path, last: int, out: str | Path) -> Path:
    """Average the last ``last`` step checkpoints of training run ``run`` into model directory ``out``.

    ``run`` is a ``maskattn train --out`` directory: its exported ``model/`` gives the architecture,
    tokenizer and task settings, its ``checkpoints/step-*`` the weights.
    """
    run, out = Path(run), Path(out)
    if isinstance(last, bool) or not isinstance(last, int) or last < 1:
        raise ValueError(f"last must be an int >= 1, got {last!r}")
    model_dir = run / "model"
    if not run.is_dir():  # else "has no exported model; train it to the end first", as if it were a run
        raise ValueError(f"run {run}: {'a file' if run.exists() else 'no such directory'}, expected the run directory "
                         "of `maskattn train` whose checkpoints to average")
    if (run / "config.json").is_file() and not (model_dir / "config.json").is_file():
        raise ValueError(f"{run} is a model directory, not a training run: give the run directory whose checkpoints "
                         f"to average ({run.parent}, if this is its exported model), or average finished models "
                         "with --models")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"run {run} has no exported model ({model_dir}/config.json); train it to the end first")
    found = checkpoint.list_checkpoints(run / CHECKPOINTS)
    if len(found) < last:
        raise ValueError(f"run {run} keeps {len(found)} step checkpoints, fewer than last={last} "
                         f"(train with a larger train.keep to keep more)")
    if out.resolve() == model_dir.resolve() or out.resolve() == run.resolve():
        raise ValueError(f"out must be a new directory, not the run or its model ({out})")
    model = load(model_dir)
    wanted = set(model.state_dict())
    chosen = found[-last:]
    states = (_match_keys(checkpoint.load(p)["model"], wanted, p) for p in chosen)  # loaded one at a time
    model.load_state_dict(average_states(states))
    save(model, out, tokenizer=Tokenizer.load(model_dir).backend)
    write_task(out, read_task(model_dir))
    return out


def average_models(directories: Sequence[str | Path], out: str | Path) -> Path:
    """Average the weights of finished model directories (one config, tokenizer and task) into ``out``.

    The configs may differ in their dropout rates only; ``out`` takes the first model's config.
    """
    dirs, out = [Path(d) for d in directories], Path(out)
    if len(dirs) < 2:
        raise ValueError(f"models: give at least two model directories to average, got {len(dirs)}")
    if any(out.resolve() == d.resolve() for d in dirs):
        raise ValueError(f"out must be a new directory, not one of the models ({out})")
    seen: dict[Path, Path] = {}
    for d in dirs:
        check_model_directory(d)
        refuse_run_directory(d, "config.json")
        if d.resolve() in seen:  # a uniform soup takes each model once
            raise ValueError(f"models: {seen[d.resolve()]} is given twice (as {seen[d.resolve()]} and {d}); "
                             "each model is averaged once")
        seen[d.resolve()] = d
    first = dirs[0]

    def identity(d: Path) -> dict[str, Any]:
        """What must agree: all but the weights' own hash and the dropout rates (training-only settings)."""
        meta = read_json_object(d / "config.json")
        config = {k: v for k, v in meta.get("config", {}).items() if not k.endswith("dropout")}
        tokenizer = d / "tokenizer.json"
        return {"config.json": {**{k: v for k, v in meta.items() if k != "weights"}, "config": config},
                "task.json": read_task(d), "tokenizer.json": tokenizer.read_bytes() if tokenizer.is_file() else None}

    for d in dirs:
        compression = read_json_object(d / "config.json").get("compression", {})
        if set(compression.get("heads", {})) - set(compression.get("origin", {})):
            raise ValueError(f"models: {d} was pruned before maskattn recorded which heads a pruned model keeps, "
                             "so it cannot be told whether the models kept the same heads; prune it again "
                             "(maskattn compress --keep-heads)")
        if compression.get("int8"):  # int8 weights, each on its own scales, have no mean
            raise ValueError(f"models: {d} is int8 (maskattn compress --int8); average the float models it was made "
                             "from, then quantise the soup with maskattn compress --int8")
    expected = identity(first)  # pruned models must have kept the same heads: config.json's compression.origin
    for d in dirs[1:]:
        for name, value in identity(d).items():
            if value != expected[name]:
                raise ValueError(f"models: {d / name} differs from {first / name}; only models of one architecture, "
                                 "tokenizer and task can be averaged")
    model = load(first)
    model.load_state_dict(average_states(chain([model.state_dict()], (load(d).state_dict() for d in dirs[1:]))))
    save(model, out, tokenizer=Tokenizer.load(first).backend)
    write_task(out, read_task(first))
    return out
