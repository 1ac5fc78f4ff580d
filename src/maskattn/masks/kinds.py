"""Masks that depend on positions only: ``full``, ``causal``, ``sliding_window``.

Each kind is a :class:`~maskattn.masks.Mask` subclass that knows its predicate (``allows``), its tile bounds
(for ``block_map``), its row intervals (for ``stats``) and its public ``structure``, plus the constructor
that validates its arguments. Masks that carry a per-item tensor are in :mod:`.tensor_kinds`.
"""

from __future__ import annotations

import torch

from maskattn.masks.base import Mask
from maskattn.masks.structure import MaskStructure
from maskattn.masks.tiles import MAX_POSITION

__all__ = ["causal", "full", "sliding_window"]


class _Full(Mask):
    relative = True  # a class attribute shadows the base property

    def structure(self):
        return MaskStructure()

    def row_bounds(self, q, k_len):
        return torch.zeros_like(q), torch.full_like(q, k_len)

    def allows(self, b, h, q, k):
        return torch.ones_like(q, dtype=torch.bool) | torch.ones_like(k, dtype=torch.bool)

    def _tile_bounds(self, tiles):
        true = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=tiles.device)
        return true, true

    def __repr__(self) -> str:
        return "full()"


class _Causal(Mask):
    relative = True  # a class attribute shadows the base property

    def structure(self):
        return MaskStructure(causal=True)

    def row_bounds(self, q, k_len):
        return torch.zeros_like(q), q + 1

    def allows(self, b, h, q, k):
        return k <= q

    def _tile_bounds(self, tiles):
        (q0, q1), (k0, k1) = tiles.q_bounds(), tiles.k_bounds()
        return k0 <= q1, k1 <= q0

    def __repr__(self) -> str:
        return "causal()"


class _SlidingWindow(Mask):
    _state = ("size",)
    relative = True  # a class attribute shadows the base property

    def __init__(self, size: int):
        self.size = size

    def structure(self):
        return MaskStructure(window=self.size)

    def row_bounds(self, q, k_len):
        return q - self.size + 1, torch.full_like(q, k_len)

    def allows(self, b, h, q, k):
        return q - k < self.size

    def _tile_bounds(self, tiles):
        (q0, q1), (k0, k1) = tiles.q_bounds(), tiles.k_bounds()
        return q0 - k1 < self.size, q1 - k0 < self.size

    def __repr__(self) -> str:
        return f"sliding_window({self.size})"


# --- constructors --------------------------------------------------------------------------------
def full() -> Mask:
    """Every query may attend to every key."""
    return _Full()


def causal() -> Mask:
    """Query at position i may attend to keys at positions j <= i.

    ::

        ■ · · ·
        ■ ■ · ·
        ■ ■ ■ ·
        ■ ■ ■ ■
    """
    return _Causal()


def sliding_window(size: int) -> Mask:
    """A key may be attended if it is at most ``size - 1`` positions behind the query (i - j < size).

    Keys ahead of the query are not restricted: combine with :func:`causal` for the usual causal
    window, ``causal() & sliding_window(3)``::

        ■ · · · ·
        ■ ■ · · ·
        ■ ■ ■ · ·
        · ■ ■ ■ ·
        · · ■ ■ ■
    """
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"sliding_window(size): size must be an int, got {type(size).__name__}")
    if not 1 <= size <= MAX_POSITION:
        raise ValueError(f"sliding_window(size): size must be in [1, 2**62] (positions are int64), got {size}")
    return _SlidingWindow(size)
