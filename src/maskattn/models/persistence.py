"""Saving and loading models: weights in safetensors, configuration in JSON, the tokenizer as
``tokenizer.json`` when there is one. Nothing is ever unpickled.

A checkpoint directory holds::

    config.json        {"format": "maskattn-model", "version": 1, "model": "Transformer",
                        "config": {...}, "weights": {"file": "model.safetensors", "sha256": ...},
                        "aliases": {"tied.name": "stored.name"},
                        "compression": {...}}   # only for pruned / int8 models (models/compressed.py)
    model.safetensors  every distinct tensor once (tied weights are stored once, listed in aliases)
    tokenizer.json     optional, a ``tokenizers.Tokenizer``
    manifest.json      the SHA-256 of every file above (and of files added later by their writer, such
                       as a trained model's task.json, through ``maskattn.io.add_to_manifest``)

Files are written atomically and verified through :mod:`maskattn.io`. Loading checks every file
against the manifest, the format, the SHA-256 of the weights, the tensor shapes the config implies
(before allocating anything), the names, shapes and dtypes of all tensors, and raises
:class:`maskattn.io.FormatError` (a ValueError) naming the file and what is wrong. A directory written
before manifests existed (no manifest.json) loads with the other checks, as it did then.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from maskattn.io import (
    MANIFEST,
    FormatError,
    atomic_directory,
    atomic_write,
    atomic_write_text,
    read_json_object,
    sha256,
    verified_sha256,
    verify_manifest,
    write_manifest,
)
from maskattn.models import compressed

FORMAT, VERSION = "maskattn-model", 1


class ModelKindError(FormatError, TypeError):
    """A model directory holds another kind of model than the one asked for (a TypeError, as before)."""

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
_MODELS: dict[str, type] = {}


class Persistent:
    """Mixin of the model classes: ``model.save(dir)``, ``Model.load(dir)``, and registration by name."""

    config_class: ClassVar[type]
    tokenizer: Any = None  # a tokenizers.Tokenizer loaded or saved with the model, if any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__module__.partition(".")[0] == "torch":  # torch.export's tracer subclasses the module it traces
            return
        _MODELS[cls.__name__] = cls

    @classmethod
    def checked_config(cls, config: Any) -> Any:
        """``config`` if it is a ``cls.config_class``, else TypeError."""
        if not isinstance(config, cls.config_class):
            raise TypeError(f"config must be a {cls.config_class.__name__}, got {type(config).__name__}")
        return config

    def save(self, directory: str | os.PathLike, *, tokenizer: Any = None) -> Path:
        """Write this model (and ``tokenizer``, default ``self.tokenizer``) to ``directory``."""
        return save(self, directory, tokenizer=tokenizer)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> Any:
        """Load a model saved by :meth:`save`; TypeError if it is another kind of model."""
        model = load(directory, device=device)
        if not isinstance(model, cls):
            raise ModelKindError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}")
        return model


def save(model: nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None) -> Path:
    """Save ``model`` (a maskattn model) to ``directory``, created if needed; return its path."""
    if type(model).__name__ not in _MODELS:
        raise TypeError(f"save() takes a maskattn model ({', '.join(sorted(_MODELS))}), got {type(model).__name__}")
    check_tokenizer(model.config, tokenizer if tokenizer is not None else getattr(model, "tokenizer", None),
                    source="save(tokenizer=...)")  # load() would refuse the directory
    directory = Path(directory)
    for path in (directory, *directory.parents):  # mkdir would say "File exists" of it
        if path.exists() and not path.is_dir():
            raise ValueError(f"save: {path} is a file; expected a directory to save the model in (new, or a saved "
                             f"model's){'' if path == directory else f', not inside a file: {directory}'}")
    held = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    # a new directory, or an earlier save's, is replaced whole; never the working directory, a symlink or a
    # mount point (a rename cannot replace those)
    plain = not (directory.is_symlink() or os.path.ismount(directory) or directory.resolve() == Path.cwd().resolve())
    if not directory.exists() or (held and held <= {CONFIG, WEIGHTS, TOKENIZER, MANIFEST} and plain):
        directory.parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(directory) as tmp:  # whole: a crash leaves the old model or the new one
            _write(model, tmp, tokenizer)
        return directory
    directory.mkdir(parents=True, exist_ok=True)  # it holds other files (task.json) too: file by file, manifest last
    _write(model, directory, tokenizer)
    return directory


def _write(model: nn.Module, directory: Path, tokenizer: Any) -> None:
    tensors, aliases = _distinct_tensors(model)
    built = _config_aliases(model, tensors)
    if aliases != built:  # load() builds the model from its config and would refuse the file as written
        raise ValueError(f"save: the tied weights of this {type(model).__name__} {aliases} are not those its config "
                         f"builds {built} (tie_output / share_embeddings); tie or untie them as the config says, "
                         "or change the config, so that the saved model can be loaded")
    weights = directory / WEIGHTS
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    digest = sha256(weights)
    meta = {"format": FORMAT, "version": VERSION, "model": type(model).__name__, "config": model.config.to_dict(),
            "weights": {"file": WEIGHTS, "sha256": digest}, "aliases": aliases}
    if entry := compressed.describe(model):
        meta["compression"] = entry
    atomic_write_text(directory / CONFIG, json.dumps(meta, indent=2) + "\n")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is not None:
        atomic_write(directory / TOKENIZER, lambda tmp: tokenizer.save(str(tmp)))
    else:
        (directory / TOKENIZER).unlink(missing_ok=True)  # an older save's tokenizer is not this model's
    write_manifest(directory, [CONFIG, WEIGHTS, *([TOKENIZER] if tokenizer is not None else [])],
                   hashes={WEIGHTS: digest})  # the weights are read once


def load(directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Load the model saved in ``directory`` (with its tokenizer, as ``model.tokenizer``, if saved), in evaluation
    mode, as :func:`~maskattn.models.pretrained.from_pretrained` returns models (no dropout; a trainer turns
    training mode on for itself).

    Raises:
        FormatError: naming the file, when one is missing, corrupt, or does not fit the model it describes.
    """
    directory = Path(directory)
    check_model_directory(directory)
    refuse_run_directory(directory, CONFIG)
    listed = verify_manifest(directory, [CONFIG, WEIGHTS, TOKENIZER])  # none in directories written before manifests
    meta = read_json(directory / CONFIG)
    # type(...) is int: True and 1.0 equal 1 in Python, but no maskattn wrote them
    if meta.get("format") != FORMAT or type(meta.get("version")) is not int or meta.get("version") != VERSION:
        raise FormatError(f"{directory / CONFIG}: not a maskattn checkpoint (format {meta.get('format')!r} "
                         f"version {meta.get('version')!r}; expected {FORMAT!r} version {VERSION})")
    cls = _MODELS.get(meta.get("model")) if isinstance(meta.get("model"), str) else None
    if cls is None:
        raise FormatError(
            f"{directory / CONFIG}: unknown model {meta.get('model')!r}; expected one of {sorted(_MODELS)}"
        )
    for key, kind in (("config", dict), ("weights", dict), ("aliases", dict), ("compression", dict)):
        if not isinstance(meta.get(key, {}), kind):
            raise FormatError(f"{directory / CONFIG}: {key!r} must be a JSON object, got {type(meta[key]).__name__}")
    try:
        config = cls.config_class.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{directory / CONFIG}: bad config: {e}") from e
    weights = directory / WEIGHTS
    expected_hash = meta.get("weights", {}).get("sha256")
    if not weights.is_file():
        raise FormatError(f"{directory}: missing weights file {WEIGHTS}")
    if verified_sha256(directory, WEIGHTS, listed) != expected_hash:
        raise FormatError(f"{weights}: SHA-256 does not match config.json; the file is corrupt or was modified")
    compression = meta.get("compression")
    check_sizes(cls, config, weights, meta.get("aliases", {}), source=directory / CONFIG, compression=compression)
    model = compressed.apply(cls(config), compression, source=str(directory / CONFIG))
    tensors = read_safetensors(weights, device)
    model = in_saved_dtype(model, tensors)
    load_weights(model, tensors, meta.get("aliases", {}), source=str(weights))
    # lexists: a directory or a broken link in its place is named, not skipped
    model.tokenizer = load_tokenizer(directory / TOKENIZER) if os.path.lexists(directory / TOKENIZER) else None
    check_tokenizer(config, model.tokenizer, source=directory / TOKENIZER)
    return model.to(device).eval()


def check_tokenizer(config: Any, tokenizer: Any, *, source: Path | str) -> None:
    """FormatError when ``tokenizer`` (a ``tokenizers.Tokenizer`` or None) gives ids past the model's ``vocab_size``
    (or ``tgt_vocab_size``): they would fail at the first such token, far from the file that is wrong."""
    if not hasattr(tokenizer, "get_vocab"):
        return
    size = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    for key in ("vocab_size", "tgt_vocab_size"):
        limit = getattr(config, key, None)
        if isinstance(limit, int) and size > limit:
            raise FormatError(f"{source}: the tokenizer gives ids up to {size - 1}, past the model's {key}={limit}; "
                              "it is not this model's tokenizer")


def check_model_directory(directory: Path) -> None:
    """FormatError unless ``directory`` is a directory: saying "no such directory" where nothing is there (a
    mistyped or quoted ``~`` path), rather than that a file in it is missing."""
    if not directory.is_dir():
        found = "a file" if directory.exists() else "no such directory"
        raise FormatError(f"{directory}: {found}, expected a model directory")


def refuse_broken_link(path: Path) -> None:
    """FormatError when ``path`` is a symbolic link to nothing (an HF cache whose blob was removed, or a loop):
    a directory listing shows its name, so "no such file" would contradict it."""
    if path.is_symlink() and not path.exists():
        raise FormatError(f"{path}: a broken symbolic link (to {os.readlink(path)}, which is missing or links in a "
                          "loop); download the weights again")


def refuse_run_directory(directory: Path, name: str) -> None:
    """FormatError when ``directory`` lacks the model file ``name`` but is a run whose ``model/`` has it: the
    usual slip of passing RUN where RUN/model is meant."""
    if not (directory / name).exists() and (directory / "model" / name).is_file():
        raise FormatError(f"{directory} is a run directory; its model is {directory / 'model'}")


def load_weights(model: nn.Module, tensors: dict[str, Tensor], aliases: dict[str, str], *, source: str) -> None:
    """Copy ``tensors`` into ``model``, after checking names, shapes and dtypes; FormatError on any mismatch."""
    expected, expected_aliases = _distinct_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FormatError(f"{source}: tensors do not match a {type(model).__name__} with this config: "
                         f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if aliases != expected_aliases:
        raise FormatError(f"{source}: tied weights {aliases} differ from the model's {expected_aliases}")
    for name, t in tensors.items():
        want = expected[name]
        if t.shape != want.shape or t.dtype != want.dtype:
            raise FormatError(f"{source}: tensor {name!r} is {tuple(t.shape)} {t.dtype}, "
                             f"expected {tuple(want.shape)} {want.dtype}")
    full = dict(tensors, **{alias: tensors[name] for alias, name in aliases.items()})
    model.load_state_dict(full, strict=True)


def check_sizes(cls: type, config: Any, weights: Path, aliases: dict[str, str], *, source: Path,
                compression: dict[str, Any] | None = None) -> None:
    """Refuse a config whose tensors differ in shape from those in ``weights``, before allocating the model.

    The model is built on PyTorch's "meta" device (shapes only, no memory) and its tensor shapes are
    compared with the safetensors header, so a config.json asking for e.g. ``vocab_size`` 10^12 is an
    error naming that setting, not an out-of-memory crash. ``compression``: config.json's entry of a
    pruned or int8 model (:mod:`maskattn.models.compressed`), applied to the skeleton too.
    """
    check_shapes(cls, config, stored_shapes(weights), aliases, source=source, weights=WEIGHTS, compression=compression)


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor of a safetensors file, read from its header (no tensor data); FormatError naming the
    file when it is not a readable safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{path}: not a readable safetensors file: {e}") from e


LAYER_COUNTS = ("num_layers", "num_hidden_layers", "num_encoder_layers", "num_decoder_layers", "encoder_layers",
                "decoder_layers")  # maskattn's and Hugging Face's names of a number of layers


def check_counts(values: dict[str, Any], attribute_map: dict[str, str], tensors: int, *, source: Path | str,
                 weights: str) -> None:
    """A FormatError naming ``source`` and the setting when a layer count of the config ``values`` is more than the
    ``tensors`` that the file named ``weights`` holds (each layer holds one at least: building 10^9 layers, even on
    the meta device, takes all memory), or a size is past int64. Layer counts go by :data:`LAYER_COUNTS` and the
    names ``attribute_map`` (a transformers config class's) gives them, GPT-2's n_layer; not every key ending in
    'layers' is one (Qwen2's max_window_layers, 28 in a model of one layer, bounds its sliding window)."""
    counts = set(LAYER_COUNTS) | {v for k, v in attribute_map.items() if k in LAYER_COUNTS}
    for key, value in values.items():
        if isinstance(value, int) and value >= 2**63:  # torch sizes are int64: a TypeError deep in torch.empty
            raise FormatError(f"{source}: {key}={value} does not fit the weights: sizes are 64-bit integers")
        if key in counts and isinstance(value, int) and value < 0:  # transformers builds no layer, loads no weight
            raise FormatError(f"{source}: {key}={value}: a number of layers cannot be negative")
        if key in counts and isinstance(value, int) and value > tensors:
            raise FormatError(f"{source}: {key}={value} does not fit the weights: {weights} holds {tensors} "
                              "tensors in all")


def check_shapes(cls: type, config: Any, stored: dict[str, tuple[int, ...]], aliases: dict[str, str], *,
                 source: Path | str, weights: str, compression: dict[str, Any] | None = None) -> None:
    """:func:`check_sizes` against ``stored`` (tensor name -> shape, read from the file named ``weights``): a
    FormatError naming ``source`` and the setting that does not fit, before anything is allocated."""
    values = config.to_dict()
    check_counts(values, getattr(config, "attribute_map", {}), len(stored), source=source, weights=weights)
    try:
        with torch.device("meta"):
            skeleton = compressed.apply(cls(config), compression, source=str(source))
    except (TypeError, OverflowError, RuntimeError, ZeroDivisionError) as e:  # a size past int64 (d_model=10**400):
        # torch's own words; or a Hugging Face config's zero head count, which its attention divides by
        raise FormatError(f"{source}: the config does not describe a model that can be built: {e}") from e
    for name, t in skeleton.state_dict().items():
        have = stored.get(aliases.get(name, name))
        if have is not None and tuple(t.shape) != have:
            suspects = [f"{k}={v}" for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool)
                        and v in t.shape and v not in have]
            raise FormatError(f"{source}: {', '.join(suspects) or 'the config'} does not fit the weights: tensor "
                              f"{name!r} would be {tuple(t.shape)}, {weights} holds {have}")


read_json = read_json_object  # the name pretrained.py and older callers import


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read a safetensors file; FormatError naming the file when it is truncated or malformed."""
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{path}: not a readable safetensors file: {e}") from e


def load_tokenizer(path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` from a tokenizer.json file."""
    from tokenizers import Tokenizer  # imported only when a checkpoint has a tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises its own exception type
        raise FormatError(f"{path}: not a readable tokenizer: {e}") from e


def in_saved_dtype(model: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    """``model`` in the one float dtype of ``tensors`` (a model saved after .to(torch.bfloat16) comes back so)."""
    floats = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return model.to(floats.pop()) if len(floats) == 1 and floats != {torch.float32} else model


def _config_aliases(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, str]:
    """``{alias: stored name}`` of the tensors that :func:`load` shares when it builds ``model`` again from its
    config (and compression entry) for ``tensors``, as :func:`_distinct_tensors` names them; built on the meta
    device (shapes only, no memory)."""
    with torch.device("meta"):
        skeleton = in_saved_dtype(compressed.apply(type(model)(model.config), compressed.describe(model)), tensors)
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, t in skeleton.state_dict(keep_vars=True).items():  # meta tensors share no data pointer: by identity
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


def _distinct_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict with each storage once, and ``{alias: stored name}`` for the tied ones."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.stride())
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = t.detach().cpu().contiguous()
    return tensors, aliases
