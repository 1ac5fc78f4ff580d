"""Attention masks as values.

A mask is a predicate over (batch, head, query position, key position) that says whether a query
*may attend* to a key: **True = may attend**, everywhere in maskattn. Positions are absolute: when
a call processes queries starting at ``q_offset`` (decoding with a KV cache), query ``i`` of that
call is position ``q_offset + i``; key ``j`` is always position ``j``.

Shape legend: B batch, H heads, Lq queries, Lk keys, nq / nk query / key tiles.

Each mask knows its structure (a causal mask its diagonal, a window its width, a padding mask its
lengths), so it can

* evaluate itself on index tensors (``allows(b, h, q, k)``, the same contract as FlexAttention's
  ``mask_mod``), from which ``to_dense`` builds the bool tensor with ``arange`` comparisons;
* bound itself on tiles (``block_map``) without materialising Lq x Lk, so a backend can skip
  tiles where nothing may be attended.

Masks compose with ``&``, ``|`` and ``~``::

    >>> from maskattn.masks import causal, sliding_window
    >>> print((causal() & sliding_window(3)).render(6))
    causal() & sliding_window(3)  [Lq=6, Lk=6]
         k 0 1 2 3 4 5
      q 0  ■ · · · · ·
      q 1  ■ ■ · · · ·
      q 2  ■ ■ ■ · · ·
      q 3  · ■ ■ ■ · ·
      q 4  · · ■ ■ ■ ·
      q 5  · · · ■ ■ ■
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from maskattn.masks.stats import MaskStats, mask_stats
from maskattn.masks.structure import MaskStructure
from maskattn.masks.tiles import EMPTY, FULL, PARTIAL, Tiles, check_positive, check_sizes

__all__ = ["Mask", "structure"]


class Mask:
    """Base class of all masks. Build masks with the constructors of this module, not directly.

    Attributes:
        batch: size of the batch axis the mask depends on (1 if it does not depend on the batch).
        heads: size of the head axis the mask depends on (1 if it does not depend on the head).
    """

    batch: int = 1
    heads: int = 1
    # The attributes __init__ sets, named: the blocked operator's spec walks them (torch < 2.13's compiler cannot
    # iterate an object's __dict__); tests/test_masks.py checks them against vars() for every kind.
    _state: tuple[str, ...] = ()

    # --- the predicate -------------------------------------------------------------------------
    def allows(self, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """Evaluate the mask on broadcastable integer index tensors (absolute positions).

        This is FlexAttention's ``mask_mod`` contract: it works on broadcast ``arange`` tensors for
        dense masks and on scalar tensors under ``vmap``.
        """
        raise NotImplementedError

    def _tile_bounds(self, tiles: Tiles) -> tuple[Tensor, Tensor]:
        """Return ``(any, all)``, each broadcastable to (B, H, nq, nk).

        ``any`` is False only where the tile certainly holds no allowed position; ``all`` is True
        only where every position of the tile is certainly allowed. Both may be conservative.
        """
        raise NotImplementedError

    def _leaves(self) -> list[Mask]:
        return [self]

    @property
    def relative(self) -> bool:
        """True if the mask depends only on ``q - k`` (not on b, h or absolute positions), so that
        every tile at the same distance from the diagonal has the same element mask."""
        return False

    def row_bounds(self, q: Tensor, k_len: int) -> tuple[Tensor, Tensor] | None:
        """``(lo, hi)``, each broadcastable to (B, H, Lq), when every query row's allowed keys are exactly
        the interval [lo, hi) (clipped to [0, k_len)); None for masks without that structure.

        ``q`` holds the absolute query positions, (Lq,). Lets :meth:`stats` count without tiles.
        While compiling, a mask whose intervals depend on its tensors' values (documents: only when the ids
        are in order) returns them without reading those values; :meth:`interval_condition` says in the
        graph whether they hold.
        """
        return None

    def interval_condition(self) -> Tensor | None:
        """A 0-d bool tensor, True when the intervals of :meth:`row_bounds` hold, for masks where that
        depends on their tensors' values; None when it does not (the intervals hold, or there are none).
        Lets a compiled graph choose the interval path without a host read (``torch.cond``)."""
        return None

    def structure(self) -> MaskStructure:
        """The public structure of this mask (see :func:`maskattn.masks.structure`); a mask kind that
        the fields of :class:`MaskStructure` cannot express is all ``rest``."""
        return MaskStructure(rest=(self,), relative=self.relative)

    def _check(self, q_len: int, k_len: int, q_offset: int) -> None:
        """Raise ValueError if this mask cannot describe an (Lq, Lk) problem at q_offset."""

    # --- derived views -------------------------------------------------------------------------
    def check(
        self,
        q_len: int,
        k_len: int,
        *,
        q_offset: int = 0,
        batch: int | None = None,
        heads: int | None = None,
    ) -> None:
        """Check that the mask fits an attention call; raise ValueError saying what does not.

        Args:
            q_len: number of queries Lq in the call.
            k_len: number of keys Lk in the call.
            q_offset: absolute position of the first query.
            batch: batch size B of the call, if known.
            heads: number of query heads H of the call, if known.
        """
        check_sizes(q_len, k_len, q_offset)
        if torch.compiler.is_compiling():  # sizes may be symbolic: checked in the graph (a constant message)
            if batch is not None:
                torch._check(self.batch == 1 or self.batch == batch,
                             lambda: "a mask's batch size does not match the batch size B of the inputs (1 or B)")
            if heads is not None:
                torch._check(self.heads == 1 or self.heads == heads,
                             lambda: "a mask's head count does not match the H query heads of the inputs (1 or H)")
        elif batch is not None and self.batch != 1 and self.batch != batch:  # not `in`: dynamo misreads it
            raise ValueError(
                f"mask {self!r} has batch size {self.batch}, which does not match the batch "
                f"size B={batch} of the inputs (expected 1 or {batch})"
            )
        elif heads is not None and self.heads != 1 and self.heads != heads:
            raise ValueError(
                f"mask {self!r} has {self.heads} heads, which does not match the H={heads} query "
                f"heads of the inputs (expected 1 or {heads})"
            )
        for leaf in self._leaves():
            leaf._check(q_len, k_len, q_offset)

    def to(self, device: torch.device | str) -> Mask:
        """This mask with its tensors (lengths, ids, prefixes, bool tensors) on ``device``; the mask itself when
        they are all there already. The flex backend calls it before compiling (a copy inside FlexAttention's
        ``mask_mod`` cannot be lowered); the other paths move what they read, as they read it."""
        return self._moved(torch.device(device), {})

    def _moved(self, device: torch.device, copies: dict[int, Tensor]) -> Mask:
        """:meth:`to`, sharing ``copies`` (by the original tensor's id) so aliased tensors stay one tensor."""
        changes: dict[str, Any] = {}
        for name, value in vars(self).items():
            new = value
            if isinstance(value, Tensor) and value.device != device:
                if id(value) not in copies:
                    copies[id(value)] = value.to(device)
                new = copies[id(value)]
            elif isinstance(value, Mask):
                new = value._moved(device, copies)
            elif isinstance(value, tuple) and value and all(isinstance(v, Mask) for v in value):
                parts = tuple(v._moved(device, copies) for v in value)
                if any(a is not b for a, b in zip(parts, value, strict=True)):
                    new = parts
            if new is not value:
                changes[name] = new
        if not changes:
            return self
        clone = copy.copy(self)
        vars(clone).update(changes)
        return clone

    def to_dense(
        self,
        q_len: int,
        k_len: int,
        *,
        q_offset: int = 0,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Materialise the mask as a bool tensor of shape (B or 1, H or 1, Lq, Lk).

        Args:
            q_len: number of queries.
            k_len: number of keys.
            q_offset: absolute position of the first query (e.g. the KV-cache length).
            device: where to build it (default: the device of the mask's tensors, else CPU).
        """
        self.check(q_len, k_len, q_offset=q_offset)
        dev = self._device(device)
        b = torch.arange(self.batch, device=dev).view(-1, 1, 1, 1)
        h = torch.arange(self.heads, device=dev).view(1, -1, 1, 1)
        q = torch.arange(q_offset, q_offset + q_len, device=dev).view(1, 1, -1, 1)
        k = torch.arange(k_len, device=dev).view(1, 1, 1, -1)
        dense = self.allows(b, h, q, k)
        return dense.expand(self.batch, self.heads, q_len, k_len)

    def block_map(
        self,
        q_len: int,
        k_len: int,
        block_q: int,
        block_k: int,
        *,
        q_offset: int = 0,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Classify every (block_q, block_k) tile as EMPTY, PARTIAL or FULL.

        Computed from the structure of the mask: structured masks never build an Lq x Lk tensor.
        The map is conservative: a tile marked EMPTY holds no allowed position and a tile marked
        FULL holds no forbidden one; PARTIAL tiles may be either.

        Returns:
            int8 tensor of shape (B or 1, H or 1, nq, nk) with values EMPTY=0, PARTIAL=1, FULL=2.
        """
        self.check(q_len, k_len, q_offset=q_offset)
        check_positive(block_q=block_q, block_k=block_k)
        # a tile larger than the call is the whole call: the same map, without padding to (or overflowing at) its size
        block_q, block_k = min(block_q, max(q_len, 1)), min(block_k, max(k_len, 1))
        tiles = Tiles(q_len, k_len, q_offset, block_q, block_k, self._device(device))
        any_, all_ = self._tile_bounds(tiles)
        kinds = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)
        return kinds.expand(self.batch, self.heads, tiles.num_q, tiles.num_k)

    def stats(
        self,
        q_len: int,
        k_len: int,
        *,
        block_q: int = 128,
        block_k: int = 128,
        q_offset: int = 0,
        head_dim: int = 64,
    ) -> MaskStats:
        """What the mask costs, from its structure: density, fully masked rows, tile counts and the
        work a block-sparse backend skips.

        Only PARTIAL tiles are evaluated element by element; EMPTY and FULL ones are counted whole, so
        structured masks never build Lq x Lk. Counts cover the mask's own batch and head axes
        (B|1, H|1).
        """
        self.check(q_len, k_len, q_offset=q_offset)
        check_positive(block_q=block_q, block_k=block_k, head_dim=head_dim)
        return mask_stats(self, q_len, k_len, block_q=block_q, block_k=block_k, q_offset=q_offset,
                          head_dim=head_dim)

    def render(
        self,
        q_len: int | None = None,
        k_len: int | None = None,
        *,
        q_offset: int = 0,
        batch: int = 0,
        head: int = 0,
    ) -> str:
        """Render the mask of one (batch, head) as text: ■ may attend, · may not."""
        grid = self.grid(q_len, k_len, q_offset=q_offset, batch=batch, head=head)  # (Lq, Lk)
        q_len, k_len = grid.shape
        width = len(str(k_len - 1))
        qwidth = len(str(q_offset + q_len - 1))
        title = f"{self!r}  [Lq={q_len}, Lk={k_len}" + (f", q_offset={q_offset}" if q_offset else "")
        title += (f", batch {batch}" if self.batch > 1 else "") + (f", head {head}" if self.heads > 1 else "")
        lines = [title + "]", " " * (qwidth + 4) + "k " + " ".join(f"{j:>{width}}" for j in range(k_len))]
        for i, row in enumerate(grid.tolist()):
            cells = " ".join(("■" if x else "·").rjust(width) for x in row)
            lines.append(f"  q {q_offset + i:>{qwidth}}  {cells}")
        return "\n".join(lines)

    def grid(self, q_len: int | None = None, k_len: int | None = None, *, q_offset: int = 0, batch: int = 0,
             head: int = 0, default_len: int = 8) -> Tensor:
        """The bool (Lq, Lk) mask of one batch item and head, what :meth:`render` and
        :func:`maskattn.plotting.plot_mask` draw. ``q_len`` defaults to the mask's own length (the longest
        tensor it carries) or ``default_len``, ``k_len`` to ``q_offset + q_len``."""
        for name, index, size in (("batch", batch, self.batch), ("head", head, self.heads)):
            if index < 0 or (size > 1 and index >= size):  # size 1: the same for every item / head
                raise ValueError(f"{name}={index}: the mask has {size} {name} entries, so {name} must be in "
                                 f"[0, {size})")
        q_len = q_len if q_len is not None else (self._natural_length() or default_len)
        k_len = k_len if k_len is not None else q_offset + q_len
        dense = self.to_dense(q_len, k_len, q_offset=q_offset)
        return dense[min(batch, dense.shape[0] - 1), min(head, dense.shape[1] - 1)]

    def show(self, q_len: int | None = None, k_len: int | None = None, **kwargs) -> None:
        """Print :meth:`render`."""
        print(self.render(q_len, k_len, **kwargs))

    def _natural_length(self) -> int | None:
        lengths = [leaf._own_length() for leaf in self._leaves()]
        known = [n for n in lengths if n is not None]
        return max(known) if known else None

    def _own_length(self) -> int | None:
        return None

    def _device(self, device: torch.device | str | None) -> torch.device:
        if device is not None:
            return torch.device(device)
        for leaf in self._leaves():
            tensor = getattr(leaf, "tensor", None)
            if tensor is not None:
                return tensor.device
        return torch.device("cpu")

    # --- algebra -------------------------------------------------------------------------------
    def __and__(self, other: Mask) -> Mask:
        return _And(self, _operand(other, "&"))

    def __or__(self, other: Mask) -> Mask:
        return _Or(self, _operand(other, "|"))

    def __invert__(self) -> Mask:
        return _Not(self)

    def __bool__(self) -> bool:
        raise TypeError("a Mask has no truth value; use &, |, ~ to combine masks, not and/or/not")


# --- composition ---------------------------------------------------------------------------------
def _broadcast_size(masks: Sequence[Mask], attr: str) -> int:
    """The one size other than 1 that the masks' ``attr`` (batch or heads) has. A list, not a set: under
    ``torch.export`` a size can be symbolic (a SymInt), which is not hashable; its agreement is checked there."""
    size = 1
    for m in masks:
        s = getattr(m, attr)
        if (isinstance(s, int) and s == 1) or s is size:
            continue
        if isinstance(size, int) and size == 1:
            size = s
        elif isinstance(s, int) and isinstance(size, int):
            if s != size:
                listing = ", ".join(f"{m!r}: {getattr(m, attr)}" for m in masks)
                raise ValueError(f"cannot combine masks with different {attr} sizes ({listing})")
        else:
            torch._check(s == size, lambda: f"cannot combine masks with different {attr} sizes")
    return size


class _Combined(Mask):
    _state = ("parts", "batch", "heads")
    symbol = ""

    def __init__(self, *parts: Mask):
        flat: list[Mask] = []
        for part in parts:  # a & (b & c) is stored as one flat &
            flat.extend(part.parts if type(part) is type(self) else [part])
        self.parts = tuple(flat)
        self.batch = _broadcast_size(self.parts, "batch")
        self.heads = _broadcast_size(self.parts, "heads")

    def _leaves(self):
        return [leaf for part in self.parts for leaf in part._leaves()]

    @property
    def relative(self) -> bool:
        return all(part.relative for part in self.parts)

    def __repr__(self) -> str:
        shown = [f"({p!r})" if isinstance(p, _Combined) else repr(p) for p in self.parts]
        return f" {self.symbol} ".join(shown)


class _And(_Combined):
    symbol = "&"

    def row_bounds(self, q, k_len):
        bounds = [p.row_bounds(q, k_len) for p in self.parts]
        if any(b is None for b in bounds):
            return None
        lo, hi = bounds[0]
        for a, b in bounds[1:]:
            lo, hi = torch.maximum(lo, a), torch.minimum(hi, b)
        return lo, hi

    def interval_condition(self):
        conditions = [c for c in (p.interval_condition() for p in self.parts) if c is not None]
        return functools.reduce(torch.logical_and, conditions) if conditions else None

    def structure(self):
        result = MaskStructure()
        for part in self.parts:
            result = result.conjoin(part.structure(), part)
        return result

    def allows(self, b, h, q, k):
        result = self.parts[0].allows(b, h, q, k)
        for part in self.parts[1:]:
            result = result & part.allows(b, h, q, k)
        return result

    def _tile_bounds(self, tiles):
        bounds = [p._tile_bounds(tiles) for p in self.parts]
        any_, all_ = bounds[0]
        for a, b in bounds[1:]:
            any_, all_ = any_ & a, all_ & b
        return any_, all_


class _Or(_Combined):
    symbol = "|"

    def allows(self, b, h, q, k):
        result = self.parts[0].allows(b, h, q, k)
        for part in self.parts[1:]:
            result = result | part.allows(b, h, q, k)
        return result

    def _tile_bounds(self, tiles):
        bounds = [p._tile_bounds(tiles) for p in self.parts]
        any_, all_ = bounds[0]
        for a, b in bounds[1:]:
            any_, all_ = any_ | a, all_ | b
        return any_, all_


class _Not(Mask):
    _state = ("part", "batch", "heads")

    def __init__(self, part: Mask):
        self.part = part
        self.batch, self.heads = part.batch, part.heads

    @property
    def relative(self) -> bool:
        return self.part.relative

    def allows(self, b, h, q, k):
        return ~self.part.allows(b, h, q, k)

    def _tile_bounds(self, tiles):
        any_, all_ = self.part._tile_bounds(tiles)
        return ~all_, ~any_

    def _leaves(self):
        return self.part._leaves()

    def __repr__(self) -> str:
        inner = repr(self.part)
        return f"~({inner})" if isinstance(self.part, _Combined) else f"~{inner}"


def _operand(other: object, op: str) -> Mask:
    if not isinstance(other, Mask):
        raise TypeError(
            f"cannot combine a Mask with {type(other).__name__} using {op}; wrap bool tensors "
            "with masks.from_tensor(...)"
        )
    return other


def structure(mask: Mask | None) -> MaskStructure:
    """The public structure of ``mask`` (None = full attention): the fields of :class:`MaskStructure`
    whose ``&`` is the mask.

    >>> from maskattn import masks
    >>> masks.structure(masks.causal() & masks.sliding_window(4)).kinds
    ('causal', 'window')
    >>> masks.structure(masks.causal() | masks.padding([2])).kinds
    ('rest',)
    """
    global _kept_structures
    if mask is None:
        return _NO_MASK
    if torch.compiler.is_compiling():
        return mask.structure()
    kept = _kept_structures  # one read: another thread may replace it
    for i, (ref, result) in enumerate(kept):
        if ref() is mask:
            if i:  # the most recently read first: a decoder step's new self-attention mask evicts the older one
                _kept_structures = (kept[i], *kept[:i], *kept[i + 1 :])
            return result
    result = mask.structure()
    if not result.rest:  # rest holds the mask itself (or its parts): kept, the mask could never go
        # read again: the build may have collected a kept mask, whose callback dropped its entry (and its tensors)
        kept = _kept_structures
        _kept_structures = ((weakref.ref(mask, _forget_structure), result), *kept[: KEPT_STRUCTURES - 1])
    return result


def _forget_structure(gone: weakref.ref) -> None:
    """A kept mask went: let its tensors (lengths, valid, doc ids) go with it, not when it is evicted."""
    global _kept_structures
    _kept_structures = tuple(entry for entry in _kept_structures if entry[0] is not gone)


# One attention call reads its mask's structure four times (dispatch, the guard, sdpa's fast path and the call
# itself), and a model's layers share one mask: the structures of the masks read last are kept (a mask is a value,
# its structure a function of its kind and the objects it holds; weakly, so that the mask can go, and a new one at
# its address is not taken for it; dropped when the mask goes). Two: a decoder's layers alternate between its
# self-attention and its cross-attention mask. Eager only: a compiled graph does not read them.
KEPT_STRUCTURES = 2
_kept_structures: tuple[tuple[weakref.ref[Mask], MaskStructure], ...] = ()
_NO_MASK = MaskStructure()  # frozen: one instance serves every call without a mask
