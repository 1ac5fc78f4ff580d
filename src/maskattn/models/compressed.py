"""What a compressed model changed in its architecture, as the ``"compression"`` entry of config.json.

A model built from its config has every attention module at ``num_heads`` heads and every
projection an ``nn.Linear``. Compression changes that in two ways, both visible in the modules'
public structure, so :func:`describe` reads them back from the model and :func:`apply` rebuilds
them on a freshly built model before its weights are loaded (``maskattn.load`` does)::

    "compression": {
      "heads": {"encoder.layers.0.self_attn": 2, ...},   # heads kept where some were pruned
      "int8": ["encoder.layers.0.self_attn.q_proj", ...]  # Linear modules stored as Int8Linear
    }
"""

from __future__ import annotations

from typing import Any

from torch import nn

from maskattn.io import FormatError
from maskattn.layers import Int8Linear, MultiHeadAttention


def describe(model: nn.Module) -> dict[str, Any]:
    """The compression entry of ``model``: pruned attention modules and int8 linears; {} when none."""
    heads = {name: m.num_heads for name, m in model.named_modules()
             if isinstance(m, MultiHeadAttention) and m.num_heads * m.head_dim != m.d_model}
    int8 = [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]
    return {key: value for key, value in (("heads", heads), ("int8", int8)) if value}


def apply(model: nn.Module, entry: dict[str, Any] | None, *, source: str = "config.json") -> nn.Module:
    """Give a freshly built ``model`` the shapes that ``entry`` (from :func:`describe`) records.

    The weights are not meaningful afterwards: load them next.

    Raises:
        FormatError: naming ``source`` when the entry names a module the model lacks or does not fit it.
    """
    if not entry:
        return model
    unknown = sorted(set(entry) - {"heads", "int8"})
    if unknown:
        raise FormatError(f"{source}: unknown compression entries {unknown}; expected heads and int8")
    modules = dict(model.named_modules())
    for name, count in entry.get("heads", {}).items():
        attn = modules.get(name)
        if not isinstance(attn, MultiHeadAttention):
            raise FormatError(f"{source}: compression.heads names {name!r}, not an attention module of the model")
        try:
            attn.prune_heads(range(count))
        except (TypeError, ValueError) as e:
            raise FormatError(f"{source}: compression.heads[{name!r}] = {count!r} does not fit: {e}") from e
    for name in entry.get("int8", []):
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise FormatError(f"{source}: compression.int8 names {name!r}, not a Linear module of the model")
        _replace(model, name, Int8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None))
    return model


def quantize_linears(model: nn.Module) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` whose weight it owns alone by an :class:`Int8Linear`.

    Linears that share their weight (an output projection tied to the embedding) stay float: an int8
    copy would add to the file, not shrink it. Returns the names replaced.
    """
    owners: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and owners.get(id(m.weight), 0) == 1]
    for name in names:
        _replace(model, name, Int8Linear.from_float(model.get_submodule(name)))
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
