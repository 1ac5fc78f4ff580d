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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from maskattn.masks.stats import MaskStats

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


class Mask:
    """Base class of all masks. Build masks with the constructors of this module, not directly.

    Attributes:
        batch: size of the batch axis the mask depends on (1 if it does not depend on the batch).
        heads: size of the head axis the mask depends on (1 if it does not depend on the head).
    """

    batch: int = 1
    heads: int = 1

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

    def _row_bounds(self, q: Tensor, k_len: int) -> tuple[Tensor, Tensor] | None:
        """``(lo, hi)``, each broadcastable to (B, H, Lq), when every query row's allowed keys are exactly
        the interval [lo, hi) (clipped to [0, k_len)); None for masks without that structure.

        ``q`` holds the absolute query positions, (Lq,). Lets :meth:`stats` count without tiles.
        """
        return None

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
        _check_sizes(q_len, k_len, q_offset)
        if batch is not None and self.batch not in (1, batch):
            raise ValueError(
                f"mask {self!r} has batch size {self.batch}, which does not match the batch "
                f"size B={batch} of the inputs (expected 1 or {batch})"
            )
        if heads is not None and self.heads not in (1, heads):
            raise ValueError(
                f"mask {self!r} has {self.heads} heads, which does not match the H={heads} query "
                f"heads of the inputs (expected 1 or {heads})"
            )
        for leaf in self._leaves():
            leaf._check(q_len, k_len, q_offset)

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
        for name, value in (("block_q", block_q), ("block_k", block_k)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
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
        from maskattn.masks.stats import mask_stats

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
        grid = self._grid(q_len, k_len, q_offset, batch, head, default_len=8)  # (Lq, Lk)
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

    def _grid(self, q_len: int | None, k_len: int | None, q_offset: int, batch: int, head: int, *,
              default_len: int) -> Tensor:
        """The (Lq, Lk) mask of one batch item and head, lengths defaulting to the mask's own."""
        q_len = q_len if q_len is not None else (self._natural_length() or default_len)
        k_len = k_len if k_len is not None else q_offset + q_len
        dense = self.to_dense(q_len, k_len, q_offset=q_offset)
        return dense[min(batch, dense.shape[0] - 1), min(head, dense.shape[1] - 1)]

    def show(self, q_len: int | None = None, k_len: int | None = None, **kwargs) -> None:
        """Print :meth:`render`."""
        print(self.render(q_len, k_len, **kwargs))

    def plot(
        self,
        q_len: int | None = None,
        k_len: int | None = None,
        *,
        q_offset: int = 0,
        batch: int = 0,
        head: int = 0,
        path: str | None = None,
        ax=None,
    ):
        """Draw the mask of one (batch, head) with matplotlib: dark = may attend.

        Returns the matplotlib Axes; writes a PNG when ``path`` is given.
        """
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        grid = self._grid(q_len, k_len, q_offset, batch, head, default_len=16)  # (Lq, Lk)
        q_len, k_len = grid.shape
        fig = None
        if ax is None:
            size = min(10.0, 2.0 + 0.25 * max(q_len, k_len))
            fig, ax = plt.subplots(figsize=(size, size * q_len / k_len + 0.5))
        ax.imshow(grid.float().cpu().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
                  extent=(-0.5, k_len - 0.5, q_offset + q_len - 0.5, q_offset - 0.5))
        ax.set(xlabel="key position", ylabel="query position", title=repr(self))
        if path is not None:
            (fig or ax.figure).savefig(path, dpi=100, bbox_inches="tight")
            if fig is not None:
                plt.close(fig)
        return ax

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
        return _And(self, _as_mask(other, "&"))

    def __or__(self, other: Mask) -> Mask:
        return _Or(self, _as_mask(other, "|"))

    def __invert__(self) -> Mask:
        return _Not(self)

    def __bool__(self) -> bool:
        raise TypeError("a Mask has no truth value; use &, |, ~ to combine masks, not and/or/not")


# --- structured masks ----------------------------------------------------------------------------
class _Full(Mask):
    relative = True  # a class attribute shadows the base property

    def _row_bounds(self, q, k_len):
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

    def _row_bounds(self, q, k_len):
        return torch.zeros_like(q), q + 1

    def allows(self, b, h, q, k):
        return k <= q

    def _tile_bounds(self, tiles):
        (q0, q1), (k0, k1) = tiles.q_bounds(), tiles.k_bounds()
        return k0 <= q1, k1 <= q0

    def __repr__(self) -> str:
        return "causal()"


class _SlidingWindow(Mask):
    relative = True  # a class attribute shadows the base property

    def __init__(self, size: int):
        self.size = size

    def _row_bounds(self, q, k_len):
        return q - self.size + 1, torch.full_like(q, k_len)

    def allows(self, b, h, q, k):
        return q - k < self.size

    def _tile_bounds(self, tiles):
        (q0, q1), (k0, k1) = tiles.q_bounds(), tiles.k_bounds()
        return q0 - k1 < self.size, q1 - k0 < self.size

    def __repr__(self) -> str:
        return f"sliding_window({self.size})"


# --- masks that carry a tensor -------------------------------------------------------------------
def _index(idx: Tensor, size: int) -> Tensor:
    """Index along an axis of a tensor mask: axes of size 1 broadcast, so they are always read at 0."""
    return idx if size > 1 else torch.zeros_like(idx)


def _tile_reduce(x: Tensor, dim: int, block: int, pad: bool | None, op: str) -> Tensor:
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
    x = x.reshape(*x.shape[:-1], -1, block)
    reduced = getattr(x, op)(dim=-1)
    return reduced.movedim(-1, dim)


class _Padding(Mask):
    """Keys at or beyond each item's length (or where ``valid`` is False) are hidden."""

    def __init__(self, lengths: Tensor | None = None, valid: Tensor | None = None):
        self.lengths, self.valid = lengths, valid
        self.tensor = lengths if lengths is not None else valid
        self.batch = self.tensor.shape[0]

    def _row_bounds(self, q, k_len):
        if self.lengths is None:
            return None
        return torch.zeros_like(q), self.lengths.to(q.device).view(-1, 1, 1).expand(-1, 1, q.shape[0])

    def allows(self, b, h, q, k):
        b = _index(b, self.batch)
        if self.lengths is not None:
            return k < self.lengths.to(k.device)[b]
        return self.valid.to(k.device)[b, k]

    def _tile_bounds(self, tiles):
        (k0, k1) = tiles.k_bounds()
        if self.lengths is not None:
            lengths = self.lengths.to(tiles.device).view(-1, 1, 1, 1)
            return k0 < lengths, k1 < lengths
        valid = self.valid.to(tiles.device)[:, : tiles.k_len]  # (B, Lk)
        any_ = _tile_reduce(valid, 1, tiles.block_k, False, "any")
        all_ = _tile_reduce(valid, 1, tiles.block_k, True, "all")
        return any_.view(self.batch, 1, 1, -1), all_.view(self.batch, 1, 1, -1)

    def _check(self, q_len, k_len, q_offset):
        if self.lengths is not None:
            longest = int(self.lengths.max()) if self.lengths.numel() else 0
            if longest > k_len:
                raise ValueError(
                    f"padding(lengths): the longest length is {longest}, more than the key length "
                    f"Lk={k_len}; expected lengths in [0, {k_len}]"
                )
        elif self.valid.shape[1] < k_len:
            raise ValueError(
                f"padding(valid): valid covers {self.valid.shape[1]} key positions but the call "
                f"has Lk={k_len} keys; expected a (B, Lk) tensor with at least {k_len} columns"
            )

    def _own_length(self):
        return int(self.lengths.max()) if self.lengths is not None else self.valid.shape[1]

    def __repr__(self) -> str:
        if self.lengths is not None:
            return f"padding(lengths={self.lengths.tolist()})"
        return f"padding(valid=<bool {tuple(self.valid.shape)}>)"


class _PrefixLM(Mask):
    """Causal, except that every query may also see the whole prefix."""

    def __init__(self, prefix: Tensor):
        self.prefix = self.tensor = prefix
        self.batch = prefix.shape[0]
        self._as_or = _Or(_Causal(), _Padding(lengths=prefix))

    def _row_bounds(self, q, k_len):
        return torch.zeros_like(q), torch.maximum(q + 1, self.prefix.to(q.device).view(-1, 1, 1))

    def allows(self, b, h, q, k):
        return self._as_or.allows(b, h, q, k)

    def _tile_bounds(self, tiles):
        return self._as_or._tile_bounds(tiles)

    def __repr__(self) -> str:
        values = self.prefix.tolist()
        return f"prefix_lm({values[0] if self.batch == 1 else values})"


class _Document(Mask):
    """Packed sequences: a query sees only keys of its own document."""

    def __init__(self, doc_ids: Tensor):
        self.doc_ids = self.tensor = doc_ids
        self.batch = doc_ids.shape[0]

    def _row_bounds(self, q, k_len):
        ids = self.doc_ids.to(q.device)
        if bool((ids[:, 1:] < ids[:, :-1]).any()):
            return None  # documents are intervals only when the ids are in order
        keys = ids[:, :k_len].contiguous()  # (B, Lk)
        own = ids[:, q].contiguous()  # (B, Lq): each query's document
        lo = torch.searchsorted(keys, own, right=False)
        hi = torch.searchsorted(keys, own, right=True)
        return lo[:, None], hi[:, None]  # (B, 1, Lq)

    def allows(self, b, h, q, k):
        ids = self.doc_ids.to(q.device)
        b = _index(b, self.batch)
        return ids[b, q] == ids[b, k]

    def _tile_bounds(self, tiles):
        ids = self.doc_ids.to(tiles.device)
        q_ids = ids[:, tiles.q_offset : tiles.q_offset + tiles.q_len]  # (B, Lq)
        k_ids = ids[:, : tiles.k_len]  # (B, Lk)
        q_lo = _tile_reduce(q_ids, 1, tiles.block_q, None, "amin").view(self.batch, 1, -1, 1)
        q_hi = _tile_reduce(q_ids, 1, tiles.block_q, None, "amax").view(self.batch, 1, -1, 1)
        k_lo = _tile_reduce(k_ids, 1, tiles.block_k, None, "amin").view(self.batch, 1, 1, -1)
        k_hi = _tile_reduce(k_ids, 1, tiles.block_k, None, "amax").view(self.batch, 1, 1, -1)
        any_ = (q_lo <= k_hi) & (k_lo <= q_hi)  # the id ranges overlap
        all_ = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)  # one id on both sides
        return any_, all_

    def _check(self, q_len, k_len, q_offset):
        needed = max(q_offset + q_len, k_len)
        if self.doc_ids.shape[1] < needed:
            raise ValueError(
                f"document(doc_ids): doc_ids covers {self.doc_ids.shape[1]} positions but the call "
                f"needs {needed} (queries up to {q_offset + q_len}, keys up to {k_len})"
            )

    def _own_length(self):
        return self.doc_ids.shape[1]

    def __repr__(self) -> str:
        return f"document(doc_ids=<{tuple(self.doc_ids.shape)}>)"


class _FromTensor(Mask):
    """An arbitrary bool tensor, broadcast as (B, H, Lq, Lk) over absolute positions."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor.view((1,) * (4 - tensor.dim()) + tuple(tensor.shape))
        self.batch, self.heads = self.tensor.shape[:2]

    def allows(self, b, h, q, k):
        t = self.tensor.to(q.device)
        sizes = t.shape
        return t[_index(b, sizes[0]), _index(h, sizes[1]), _index(q, sizes[2]), _index(k, sizes[3])]

    def _window(self, tiles: Tiles) -> Tensor:
        t = self.tensor.to(tiles.device)
        if t.shape[2] > 1:
            t = t[:, :, tiles.q_offset : tiles.q_offset + tiles.q_len]
        if t.shape[3] > 1:
            t = t[:, :, :, : tiles.k_len]
        return t

    def _tile_bounds(self, tiles):
        t = self._window(tiles)
        bounds = []
        for pad, op in ((False, "any"), (True, "all")):
            x = t
            if x.shape[2] > 1:
                x = _tile_reduce(x, 2, tiles.block_q, pad, op)
            if x.shape[3] > 1:
                x = _tile_reduce(x, 3, tiles.block_k, pad, op)
            bounds.append(x)
        return bounds[0], bounds[1]

    def _check(self, q_len, k_len, q_offset):
        rows, cols = self.tensor.shape[2:]
        if rows != 1 and rows < q_offset + q_len:
            raise ValueError(
                f"from_tensor: the mask has {rows} query rows but the call needs rows "
                f"{q_offset}..{q_offset + q_len - 1} (Lq={q_len}, q_offset={q_offset}); expected "
                f"1 or at least {q_offset + q_len} rows"
            )
        if cols != 1 and cols < k_len:
            raise ValueError(
                f"from_tensor: the mask has {cols} key columns but the call has Lk={k_len} keys; "
                f"expected 1 or at least {k_len} columns"
            )

    def _own_length(self):
        rows, cols = self.tensor.shape[2:]
        return max(rows, cols) if max(rows, cols) > 1 else None

    def __repr__(self) -> str:
        return f"from_tensor(<bool {tuple(self.tensor.shape)}>)"


# --- composition ---------------------------------------------------------------------------------
def _broadcast_size(masks: Sequence[Mask], attr: str) -> int:
    sizes = {getattr(m, attr) for m in masks} - {1}
    if len(sizes) > 1:
        listing = ", ".join(f"{m!r}: {getattr(m, attr)}" for m in masks)
        raise ValueError(f"cannot combine masks with different {attr} sizes ({listing})")
    return sizes.pop() if sizes else 1


class _Combined(Mask):
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

    def _row_bounds(self, q, k_len):
        bounds = [p._row_bounds(q, k_len) for p in self.parts]
        if any(b is None for b in bounds):
            return None
        lo, hi = bounds[0]
        for a, b in bounds[1:]:
            lo, hi = torch.maximum(lo, a), torch.minimum(hi, b)
        return lo, hi

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


def _as_mask(other: object, op: str) -> Mask:
    if not isinstance(other, Mask):
        raise TypeError(
            f"cannot combine a Mask with {type(other).__name__} using {op}; wrap bool tensors "
            "with masks.from_tensor(...)"
        )
    return other


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
    if size < 1:
        raise ValueError(f"sliding_window(size): size must be >= 1, got {size}")
    return _SlidingWindow(size)


def padding(lengths_or_valid: Tensor | Sequence[int]) -> Mask:
    """Key padding: hide the keys that are padding.

    Args:
        lengths_or_valid: either a 1-D integer tensor (or list) of valid key lengths per batch item
            (keys at positions >= length are hidden), or a (B, Lk) bool tensor, True = a real key.
    """
    x = lengths_or_valid
    if not isinstance(x, Tensor):
        x = torch.as_tensor(list(x), dtype=torch.long)
    if x.dtype == torch.bool:
        if x.dim() != 2:
            raise ValueError(
                f"padding(lengths_or_valid): a bool tensor must be (B, Lk) valid keys, got shape "
                f"{tuple(x.shape)}"
            )
        return _Padding(valid=x)
    if x.is_floating_point() or x.is_complex():
        raise TypeError(
            f"padding(lengths_or_valid): expected an integer tensor of lengths or a bool tensor of "
            f"valid keys, got dtype {x.dtype}"
        )
    if x.dim() != 1:
        raise ValueError(
            f"padding(lengths_or_valid): lengths must be 1-D (B,), got shape {tuple(x.shape)}"
        )
    if x.numel() and int(x.min()) < 0:
        raise ValueError(f"padding(lengths_or_valid): lengths must be >= 0, got {x.tolist()}")
    return _Padding(lengths=x.long())


def document(doc_ids: Tensor) -> Mask:
    """Packed sequences: a query may attend only keys with the same document id.

    Args:
        doc_ids: (B, L) integer tensor, the document id of every position. Combine with
            :func:`causal` for packed causal language modelling. For ids ``[0, 0, 1, 1, 1]``::

                ■ ■ · · ·
                ■ ■ · · ·
                · · ■ ■ ■
                · · ■ ■ ■
                · · ■ ■ ■
    """
    if not isinstance(doc_ids, Tensor):
        raise TypeError(f"document(doc_ids): expected a (B, L) tensor, got {type(doc_ids).__name__}")
    if doc_ids.dtype == torch.bool or doc_ids.is_floating_point() or doc_ids.is_complex():
        raise TypeError(f"document(doc_ids): expected an integer tensor, got dtype {doc_ids.dtype}")
    if doc_ids.dim() != 2:
        raise ValueError(f"document(doc_ids): expected shape (B, L), got {tuple(doc_ids.shape)}")
    return _Document(doc_ids.long())


def prefix_lm(prefix_len: int | Tensor | Sequence[int]) -> Mask:
    """Prefix language model: bidirectional inside the prefix, causal after it.

    Query i may attend key j if j <= i or j < prefix_len. With ``prefix_len=2``::

        ■ ■ · · ·
        ■ ■ · · ·
        ■ ■ ■ · ·
        ■ ■ ■ ■ ·
        ■ ■ ■ ■ ■

    Args:
        prefix_len: an int, or a 1-D integer tensor (B,) of per-item prefix lengths.
    """
    if isinstance(prefix_len, bool):
        raise TypeError("prefix_lm(prefix_len): expected an int or a 1-D integer tensor, got bool")
    if isinstance(prefix_len, int):
        prefix_len = [prefix_len]
    p = prefix_len if isinstance(prefix_len, Tensor) else torch.as_tensor(list(prefix_len))
    if p.dtype == torch.bool or p.is_floating_point() or p.is_complex():
        raise TypeError(f"prefix_lm(prefix_len): expected integers, got dtype {p.dtype}")
    if p.dim() != 1:
        raise ValueError(f"prefix_lm(prefix_len): expected an int or shape (B,), got {tuple(p.shape)}")
    if p.numel() and int(p.min()) < 0:
        raise ValueError(f"prefix_lm(prefix_len): prefix lengths must be >= 0, got {p.tolist()}")
    return _PrefixLM(p.long())


def from_tensor(t: Tensor) -> Mask:
    """Wrap any bool tensor broadcastable to (B, H, Lq, Lk); True = may attend.

    Lower-rank tensors are broadcast like NumPy arrays (aligned on the right): (Lq, Lk) is shared by
    every batch item and head, and a 3-D tensor is read as (H, Lq, Lk), not (B, Lq, Lk). The query
    axis is indexed by absolute position, so a mask used with ``q_offset`` must cover the earlier
    positions too.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"from_tensor(t): expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.bool:
        raise TypeError(
            f"from_tensor(t): expected a bool tensor (True = may attend), got dtype {t.dtype}; "
            "convert additive or 0/1 masks explicitly"
        )
    if not 1 <= t.dim() <= 4:
        raise ValueError(
            f"from_tensor(t): expected 1 to 4 dims broadcastable to (B, H, Lq, Lk), got shape "
            f"{tuple(t.shape)}"
        )
    return _FromTensor(t)


def _check_sizes(q_len: int, k_len: int, q_offset: int) -> None:
    for name, value, low in (("q_len", q_len, 0), ("k_len", k_len, 0), ("q_offset", q_offset, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
