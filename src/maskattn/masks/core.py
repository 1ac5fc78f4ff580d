"""Deprecated: the masks that lived here are split by concept (see :mod:`maskattn.masks`); import them
from ``maskattn.masks``. This module re-exports what it exported before."""

from maskattn.masks.base import Mask
from maskattn.masks.kinds import causal, full, sliding_window
from maskattn.masks.tensor_kinds import document, from_tensor, padding, prefix_lm
from maskattn.masks.tiles import EMPTY, FULL, PARTIAL, Tiles

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "Mask",
    "Tiles",
    "causal",
    "document",
    "from_tensor",
    "full",
    "padding",
    "prefix_lm",
    "sliding_window",
]
