"""Attention masks as values: True = may attend (see :mod:`maskattn.masks.core`).

Constructors (``causal``, ``padding``, ``sliding_window``, ``document``, ``prefix_lm``,
``from_tensor``, ``full``) compose with ``&``, ``|``, ``~``; ``parse`` reads the same from text;
the converters of :mod:`maskattn.masks.convert` translate to and from other libraries' conventions.
"""

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
from maskattn.masks.core import (
    EMPTY,
    FULL,
    PARTIAL,
    Mask,
    Tiles,
    _And,
    _Causal,
    _Document,
    _Full,
    _Padding,
    _SlidingWindow,
    causal,
    document,
    from_tensor,
    full,
    padding,
    prefix_lm,
    sliding_window,
)
from maskattn.masks.expr import MaskSyntaxError, parse
from maskattn.masks.stats import MaskStats

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "InvertedMaskWarning",
    "Mask",
    "MaskStats",
    "MaskSyntaxError",
    "Tiles",
    "_And",
    "_Causal",
    "_Document",
    "_Full",
    "_Padding",
    "_SlidingWindow",
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
    "to_additive",
    "to_flex",
    "to_torch_mha",
]
