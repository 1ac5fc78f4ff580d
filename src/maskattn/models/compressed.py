"""What a compressed model changed in its architecture, as the ``"compression"`` entry of config.json.

A model built from its config has every attention module at ``num_heads`` heads and every
projection an ``nn.Linear``. Compression changes that in two ways, both visible in the modules'
public structure, so :func:`describe` reads them back from the model and :func:`apply` rebuilds
them on a freshly built model before its weights are loaded (``maskattn.load`` does)::

    "compression": {
      "heads": {"encoder.layers.0.self_attn": 2, ...},   # heads kept where some were pruned
      "origin": {"encoder.layers.0.self_attn": [0, 3]},  # which of the unpruned module's heads those are
      "int8": ["encoder.layers.0.self_attn.q_proj", ...]  # Linear modules stored as Int8Linear, token
    }                                                     # tables as Int8TokenEmbedding

("origin" is absent in models pruned before it was recorded: their heads' origin is unknown.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from maskattn.io import FormatError
from maskattn.layers import Int8Linear, MultiHeadAttention, TokenEmbedding
from maskattn.layers.quantized import Int8TokenEmbedding


def describe(model: nn.Module) -> dict[str, Any]:
    """The compression entry of ``model``: pruned attention modules and int8 modules; {} when none."""
    pruned = {name: m for name, m in model.named_modules()
              if isinstance(m, MultiHeadAttention) and m.num_heads * m.head_dim != m.d_model}
    heads = {name: m.num_heads for name, m in pruned.items()}
    origin = {name: list(m.origin_heads) for name, m in pruned.items() if m.origin_heads is not None}
    int8 = [name for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, (Int8Linear, Int8TokenEmbedding))]
    return {key: value for key, value in (("heads", heads), ("origin", origin), ("int8", int8)) if value}


def apply(model: nn.Module, entry: dict[str, Any] | None, *, source: str = "config.json") -> nn.Module:
    """Give a freshly built ``model`` the shapes that ``entry`` (from :func:`describe`) records.

    The weights are not meaningful afterwards: load them next. An int8 output projection that the
    model ties to an int8 token table shares that table, as :func:`quantize_linears` left it.

    Raises:
        FormatError: naming ``source`` when the entry names a module the model lacks or does not fit it.
    """
    if not entry:
        return model
    unknown = sorted(set(entry) - {"heads", "origin", "int8"})
    if unknown:
        raise FormatError(f"{source}: unknown compression entries {unknown}; expected heads, origin and int8")
    for key in ("heads", "origin"):
        if not isinstance(entry.get(key, {}), dict):
            raise FormatError(f"{source}: compression.{key} must be a JSON object, got {type(entry[key]).__name__}")
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, count in entry.get("heads", {}).items():
        attn = modules.get(name)
        if not isinstance(attn, MultiHeadAttention):
            raise FormatError(f"{source}: compression.heads names {name!r}, not an attention module of the model")
        try:
            attn.prune_heads(list(range(count)) if isinstance(count, int) else count)
        except (TypeError, ValueError) as e:
            raise FormatError(f"{source}: compression.heads[{name!r}] = {count!r} does not fit: {e}") from e
        origin = entry.get("origin", {}).get(name)
        ok = origin is None or (isinstance(origin, list) and len(origin) == count and all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in origin) and len(set(origin)) == count)
        if not ok:
            raise FormatError(f"{source}: compression.origin[{name!r}] = {origin!r}: expected {count} head indices")
        attn.origin_heads = origin
    modules = dict(model.named_modules(remove_duplicate=False))  # pruning made new projections
    new_tables: dict[int, Int8TokenEmbedding] = {}  # id of the float table's weight -> its int8 table
    names = entry.get("int8", [])
    for name in sorted(names, key=lambda n: not isinstance(modules.get(n), TokenEmbedding)):  # tables first
        old = modules.get(name)
        if isinstance(old, TokenEmbedding):
            key = id(old.weight)
            if key not in new_tables:
                new_tables[key] = Int8TokenEmbedding(old.vocab_size, old.d_model, scale=old.scale)
            _replace(model, name, new_tables[key])
        elif isinstance(old, nn.Linear):
            tied = new_tables.get(id(old.weight))  # the projection shared a float table now int8
            _replace(model, name, Int8Linear.tied_to(tied) if tied is not None else
                     Int8Linear(old.in_features, old.out_features, bias=old.bias is not None))
        else:
            raise FormatError(f"{source}: compression.int8 names {name!r}, not a Linear or token embedding of the "
                              "model")
    return model


def quantize_linears(model: nn.Module, *, tied: bool = False) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` whose weight it owns alone by an :class:`Int8Linear`.

    Linears that share their weight (an output projection tied to the embedding) stay float unless
    ``tied``: then each token table shared with output projections becomes an
    :class:`Int8TokenEmbedding` and the projections :class:`Int8Linear` on the same int8 table (the
    file shrinks further and the projection over the vocabulary runs in int8). Returns the names replaced.
    """
    owners: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    modules = dict(model.named_modules(remove_duplicate=False))
    names = [name for name, m in modules.items() if isinstance(m, nn.Linear) and owners.get(id(m.weight), 0) == 1]
    for name in names:
        _replace(model, name, Int8Linear.from_float(modules[name]))
    if not tied:
        return names
    projections = {id(m.weight): [] for m in modules.values() if isinstance(m, TokenEmbedding)}
    for name, m in modules.items():
        if isinstance(m, nn.Linear) and m.bias is None and id(m.weight) in projections:
            projections[id(m.weight)].append(name)
    tables: dict[int, Int8TokenEmbedding] = {}
    for name, m in modules.items():
        if isinstance(m, TokenEmbedding) and projections[id(m.weight)]:
            if id(m.weight) not in tables:
                tables[id(m.weight)] = Int8TokenEmbedding.from_float(m)
            _replace(model, name, tables[id(m.weight)])
            names.append(name)
    for key, linears in projections.items():
        for name in linears if key in tables else []:
            linear = Int8Linear.tied_to(tables[key])
            if linear.weight_scale.dtype != torch.float32:  # as load() builds it: float32, then .to(dtype), which
                linear.weight_scale = linear.weight_scale.clone()  # converts each module's buffers apart
            _replace(model, name, linear)
            names.append(name)
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
