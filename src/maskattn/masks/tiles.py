"""What every mask module builds on: tile kinds, the tiling of a score matrix, and the surface of a mask
that the counting and structure modules read (:class:`MaskLike`, which :class:`~maskattn.masks.Mask`
implements).

Shape legend: B batch, H heads, Lq queries, Lk keys, nq / nk query / key tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["EMPTY", "FULL", "PARTIAL", "MaskLike", "Tiles", "broadcast_index", "check_sizes", "tile_reduce"]

# Tile kinds in a block map.
EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class Tiles:
    """The tiling of a (Lq, Lk) score matrix into (block_q, block_k) tiles, in absolute positions."""

    q_len: int
    k_len: int
    q_offset: int
    block_q: int
    block_k: int
    device: torch.device

    @property
    def num_q(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_k(self) -> int:
        return -(-self.k_len // self.block_k)

    def q_bounds(self) -> tuple[Tensor, Tensor]:
        """First and last absolute query position of each query tile, each (1, 1, nq, 1)."""
        first = self.q_offset + torch.arange(self.num_q, device=self.device) * self.block_q
        last = torch.clamp(first + self.block_q - 1, max=self.q_offset + self.q_len - 1)
        return first.view(1, 1, -1, 1), last.view(1, 1, -1, 1)

    def k_bounds(self) -> tuple[Tensor, Tensor]:
        """First and last key position of each key tile, each (1, 1, 1, nk)."""
        first = torch.arange(self.num_k, device=self.device) * self.block_k
        last = torch.clamp(first + self.block_k - 1, max=self.k_len - 1)
        return first.view(1, 1, 1, -1), last.view(1, 1, 1, -1)


class MaskLike(Protocol):
    """The part of a :class:`~maskattn.masks.Mask` that :mod:`.stats` and :mod:`.structure` use."""

    batch: int
    heads: int

    def allows(self, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor: ...

    def row_bounds(self, q: Tensor, k_len: int) -> tuple[Tensor, Tensor] | None: ...

    def block_map(self, q_len: int, k_len: int, block_q: int, block_k: int, *, q_offset: int = 0,
                  device: torch.device | str | None = None) -> Tensor: ...


def broadcast_index(idx: Tensor, size: int) -> Tensor:
    """Index along an axis of a tensor mask: axes of size 1 broadcast, so they are always read at 0."""
    return idx if size > 1 else torch.zeros_like(idx)


def tile_reduce(x: Tensor, dim: int, block: int, pad: bool | None, op: str) -> Tensor:
    """Reduce ``x`` over consecutive blocks of ``block`` along ``dim``.

    The last, short block is padded with ``pad`` (or with its own last value when ``pad`` is None,
    which leaves a min/max unchanged).
    """
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    extra = -n % block
    if extra:
        fill = x[..., -1:].expand(*x.shape[:-1], extra) if pad is None else x.new_full(
            (*x.shape[:-1], extra), pad
        )
        x = torch.cat([x, fill], dim=-1)
    x = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)  # not -1: ambiguous when another size is 0
    reduced = getattr(x, op)(dim=-1)
    return reduced.movedim(-1, dim)


MAX_POSITION = 2**62  # positions are int64 tensors: larger ones would overflow in arange and index arithmetic


def check_sizes(q_len: int, k_len: int, q_offset: int) -> None:
    """Raise ValueError unless the call sizes are ints >= 0 whose positions fit below :data:`MAX_POSITION`."""
    for name, value, low in (("q_len", q_len, 0), ("k_len", k_len, 0), ("q_offset", q_offset, 0)):
        if isinstance(value, bool) or not isinstance(value, int | torch.SymInt) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if q_offset + q_len > MAX_POSITION or k_len > MAX_POSITION:
        raise ValueError(f"positions must stay below 2**62: q_offset ({q_offset}) + q_len ({q_len}) and k_len "
                         f"({k_len}) must be <= {MAX_POSITION}")


def check_positive(**values: int) -> None:
    """Raise ValueError naming the first value that is not an int >= 1 (tile sizes, head dims)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
