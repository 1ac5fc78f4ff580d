"""Training checkpoints: atomic, verified, and free of pickle.

A checkpoint is a directory ``<root>/step-000000123/`` holding

* ``tensors.safetensors``: every tensor of the training state (model, optimizer, RNG), flat;
* ``state.json``: everything else (step, schedule, data order, hyper-parameters), with tensors
  replaced by references into the safetensors file, and the SHA-256 of that file;
* ``manifest.json``: the SHA-256 of both (:func:`maskattn.io.write_manifest`), so that an edited
  ``state.json`` (a step, a learning rate) is refused too. Checkpoints written before the manifest
  have none and are loaded with the tensor file's hash alone, as then.

It is written into a temporary directory, fsynced and renamed into place, so a crash leaves either
the whole checkpoint or none of it; older checkpoints are pruned only after the new one is in place.
Loading verifies the hash first, so a truncated or modified checkpoint is refused with a clear error
instead of failing deep inside PyTorch; nothing is ever unpickled.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from maskattn.errors import TrainingError
from maskattn.io import (
    FormatError,
    atomic_directory,
    read_json_object,
    sha256,
    verified_sha256,
    verify_manifest,
    write_manifest,
)

TENSORS, STATE = "tensors.safetensors", "state.json"
FORMAT = "maskattn-checkpoint-1"


class CheckpointError(FormatError, RuntimeError):
    """A checkpoint is missing, truncated, modified or does not fit what loads it.

    The :class:`maskattn.io.FormatError` of checkpoints; still a ``RuntimeError``, as it was before.
    """


# --- nested state <-> (flat tensors, JSON) ---------------------------------------------------------
def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Turn nested dicts/lists of tensors and plain values into JSON, moving tensors to ``tensors``.

    Dict keys keep their type (optimizer states are keyed by int), so dicts become tagged pair lists.
    """
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        if key in tensors:  # "a.b" beside {"a": {"b"}}, or keys 0 and "0", flatten to one name: each keeps its own
            key = next(f"{key}#{n}" for n in itertools.count(1) if f"{key}#{n}" not in tensors)
        tensors[key] = obj.detach().cpu().clone(memory_format=torch.contiguous_format)  # a dense copy: safetensors
        # refuses shared storage (tied weights) and non-contiguous strides (a transposed tensor)
        return {"__tensor__": key}
    if isinstance(obj, dict):
        for k in obj:  # a JSON scalar comes back as itself; a tuple key would come back a list, which no dict takes
            if k is not None and not isinstance(k, (str, int, float)):
                raise TypeError(f"cannot store a dict key of type {type(k).__name__} ({k!r}) at '{prefix}' in a "
                                "checkpoint (keys: str, int, float, bool or None)")
        return {"__dict__": [[k, flatten(v, tensors, f"{prefix}.{k}" if prefix else str(k))] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at '{prefix}' in a checkpoint (tensors and plain values only)")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


# --- files -----------------------------------------------------------------------------------------
def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:09d}"


def save(root: str | Path, step: int, state: dict[str, Any], *, keep: int | None = 3) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step`` under ``root``; return its directory.

    Args:
        root: the run's checkpoint directory (created if needed).
        step: the optimizer step the state belongs to.
        state: nested dicts/lists of tensors and plain values (state_dicts, RNG states, counters).
        keep: keep this many newest step checkpoints, by step, among the steps up to ``step``;
            None keeps all. Checkpoints of steps after ``step`` belong to a run that this one
            replaced (one resumed from an earlier checkpoint), and are removed whatever ``keep``, so
            that :func:`latest` is always this run's newest.

    Raises:
        ValueError: ``keep`` below 1, or ``step`` below 0.
        TrainingError: the checkpoint could not be written (disk full, read-only): its path, the reason,
            and the newest complete checkpoint, which is left as it was.
    """
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be None or an int >= 1 (checkpoints kept), got {keep!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    root = Path(root)
    final = step_dir(root, step)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for left in root.glob(".step-*"):  # what a save killed half-way left behind (never read)
            shutil.rmtree(left, ignore_errors=True)
        with atomic_directory(final) as tmp:  # re-saving a step (a final save after a periodic one) replaces it
            tensors: dict[str, torch.Tensor] = {}
            skeleton = flatten(state, tensors)
            save_file(tensors, tmp / TENSORS)
            digest = sha256(tmp / TENSORS)
            meta = {"format": FORMAT, "step": step, "sha256": digest, "state": skeleton}
            (tmp / STATE).write_text(json.dumps(meta))
            write_manifest(tmp, [TENSORS, STATE], hashes={TENSORS: digest})  # the tensors are read once
    except (OSError, SafetensorError) as e:
        newest = latest(root)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise TrainingError(f"could not write the checkpoint {final}: {reason}; the newest complete checkpoint is "
                            f"{newest if newest else 'none'}, left as it was") from e
    found = list_checkpoints(root)
    later = [p for p in found if step_of(p) > step]
    mine = [p for p in found if step_of(p) <= step]
    for old in later + (mine[:-keep] if keep is not None else []):
        shutil.rmtree(old, ignore_errors=True)
    return final


def step_of(path: str | Path) -> int:
    """The step of a checkpoint directory ``step-000000123`` (-1 for a name that holds no step: ``123``, or ``step-``
    and digits :meth:`str.isdigit` takes that are not ASCII, ``step-²``, are not names :func:`save` gives)."""
    name = Path(path).name
    digits = name.removeprefix("step-")
    return int(digits) if name.startswith("step-") and digits.isascii() and digits.isdigit() else -1


def list_checkpoints(root: str | Path) -> list[Path]:
    """Step checkpoint directories under ``root``, oldest first (temporary ones excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and step_of(p) >= 0),
                  key=step_of)


def load(path: str | Path) -> dict[str, Any]:
    """Read and verify one checkpoint directory; return its state (``step`` included).

    Raises:
        CheckpointError: when a file is missing, the hash does not match (truncated or modified
            file), or the format is unknown.
    """
    path = Path(path)
    meta_path, tensor_path = path / STATE, path / TENSORS
    for p in (meta_path, tensor_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {p.name} is missing")
    try:
        listed = verify_manifest(path, [STATE, TENSORS])  # none in checkpoints written before manifests
        meta = read_json_object(meta_path)
        actual = verified_sha256(path, TENSORS, listed)
    except FormatError as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {e}. {_earlier(path)}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    if actual != meta.get("sha256"):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: {TENSORS} has SHA-256 {actual[:12]}..., expected "
            f"{str(meta.get('sha256'))[:12]}... (truncated or modified). {_earlier(path)}"
        )
    try:
        state = unflatten(meta.get("state"), load_file(tensor_path))
    except SafetensorError as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {TENSORS}: {e}. {_earlier(path)}") from e
    except (KeyError, TypeError, ValueError) as e:  # a state.json written by hand (its manifest made to match)
        raise CheckpointError(f"checkpoint {path}: {STATE} does not describe a training state ({type(e).__name__}: "
                              f"{e}). {_earlier(path)}") from e
    step = meta.get("step")
    if not isinstance(state, dict) or isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint {path}: {STATE} must hold a 'state' object and a 'step' int >= 0, got "
                              f"state of type {type(state).__name__} and step {step!r}. {_earlier(path)}")
    if step_of(path) >= 0 and step_of(path) != step:  # save() names the directory by the step it holds
        raise CheckpointError(f"checkpoint {path}: {STATE} says step {step}, its directory step {step_of(path)}: "
                              f"edited or renamed. {_earlier(path)}")
    state["step"] = step
    return state


def read_entry(path: str | Path, key: str) -> Any:
    """One tensor-free entry of a checkpoint's state (e.g. ``"run"``) from its ``state.json`` alone, unverified
    (a quick look before :func:`load` verifies everything); None when it has none or cannot be read."""
    try:
        meta = read_json_object(Path(path) / STATE)
        entries = dict(meta["state"]["__dict__"])
        return unflatten(entries[key], {}) if key in entries else None
    except (FormatError, KeyError, TypeError, ValueError):
        return None


def tensor_names(path: str | Path) -> list[str]:
    """The flat names of a checkpoint's tensors (``model.<parameter>``, ``optimizer.state.0.exp_avg``, ...),
    read from the safetensors header alone: no tensor is loaded and nothing is verified (:func:`load` does that).

    Raises:
        CheckpointError: the tensor file is missing or its header cannot be read.
    """
    tensor_path = Path(path) / TENSORS
    try:
        with safe_open(tensor_path, framework="pt") as f:
            return list(f.keys())
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read the tensor names of {TENSORS}: {e}") from e


def _earlier(path: Path) -> str:
    """The other checkpoints beside ``path``, for an error message: where a resume can go back to."""
    return f"Earlier checkpoints: {[p.name for p in list_checkpoints(path.parent) if p != path] or 'none'}"


def latest(root: str | Path) -> Path | None:
    """The newest checkpoint directory under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None
