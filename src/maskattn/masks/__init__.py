"""Attention masks as values: True = may attend (see :mod:`maskattn.masks.base`).

Constructors (``causal``, ``padding``, ``sliding_window``, ``document``, ``prefix_lm``,
``from_tensor``, ``full``) compose with ``&``, ``|``, ``~``; ``parse`` reads the same from text;
``structure`` says what a mask is made of (for consumers that take fast paths); the converters of
:mod:`maskattn.masks.convert` translate to and from other libraries' conventions.

Modules, lowest first: ``tiles`` (tile kinds, ``Tiles``), ``stats`` (what a mask costs), ``structure``
(``MaskStructure``), ``base`` (``Mask``, ``&``/``|``/``~``, ``structure()``), ``kinds`` (position masks),
``tensor_kinds`` (masks that carry a tensor), ``convert``, ``expr``.
"""

import warnings

from maskattn.masks.base import Mask, structure
from maskattn.masks.convert import (
    InvertedMaskWarning,
    from_cu_seqlens,
    from_hf,
    from_keras,
    from_torch_mha,
    to_additive,
    to_flex,
    to_torch_mha,
)
from maskattn.masks.expr import MaskSyntaxError, parse
from maskattn.masks.kinds import causal, full, sliding_window
from maskattn.masks.stats import MaskStats
from maskattn.masks.structure import MaskStructure
from maskattn.masks.tensor_kinds import as_mask, document, from_tensor, padding, prefix_lm
from maskattn.masks.tiles import EMPTY, FULL, PARTIAL, Tiles

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "InvertedMaskWarning",
    "Mask",
    "MaskStats",
    "MaskStructure",
    "MaskSyntaxError",
    "Tiles",
    "as_mask",
    "causal",
    "document",
    "from_cu_seqlens",
    "from_hf",
    "from_keras",
    "from_tensor",
    "from_torch_mha",
    "full",
    "padding",
    "parse",
    "prefix_lm",
    "sliding_window",
    "structure",
    "to_additive",
    "to_flex",
    "to_torch_mha",
]

# Private classes that maskattn.masks exported before it had a public structure view (issue 13).
_DEPRECATED = {"_And": "base", "_Causal": "kinds", "_Document": "tensor_kinds", "_Full": "kinds",
               "_Padding": "tensor_kinds", "_SlidingWindow": "kinds"}


def __getattr__(name: str):
    if name in _DEPRECATED:
        warnings.warn(f"maskattn.masks.{name} is private and deprecated: read masks.structure(mask) instead",
                      DeprecationWarning, stacklevel=2)
        from importlib import import_module

        return getattr(import_module(f"maskattn.masks.{_DEPRECATED[name]}"), name)
    raise AttributeError(f"module 'maskattn.masks' has no attribute {name!r}")
