"""Masks that carry a tensor per batch item: ``padding``, ``document``, ``prefix_lm``, ``from_tensor``.

See :mod:`.kinds` for what a mask kind implements. Shape legend: B batch, H heads, L positions, Lq queries,
Lk keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from maskattn.masks.base import Mask
from maskattn.masks.kinds import causal
from maskattn.masks.structure import MaskStructure
from maskattn.masks.tiles import MAX_POSITION, Tiles, broadcast_index, tile_reduce

__all__ = ["as_mask", "document", "from_tensor", "padding", "prefix_lm"]


class _Padding(Mask):
    """Keys at or beyond each item's length (or where ``valid`` is False) are hidden."""
    _state = ("lengths", "valid", "tensor", "batch")

    def __init__(self, lengths: Tensor | None = None, valid: Tensor | None = None):
        self.lengths, self.valid = lengths, valid
        self.tensor = lengths if lengths is not None else valid
        self.batch = self.tensor.shape[0]

    def structure(self):
        return MaskStructure(lengths=self.lengths, valid=self.valid, relative=False)

    def row_bounds(self, q, k_len):
        if self.lengths is None:
            return None
        return torch.zeros_like(q), self.lengths.to(q.device).view(-1, 1, 1).expand(-1, 1, q.shape[0])

    def allows(self, b, h, q, k):
        b = broadcast_index(b, self.batch)
        if self.lengths is not None:
            return k < self.lengths.to(k.device)[b]
        return self.valid.to(k.device)[b, k]

    def _tile_bounds(self, tiles):
        (k0, k1) = tiles.k_bounds()
        if self.lengths is not None:
            lengths = self.lengths.to(tiles.device).view(-1, 1, 1, 1)
            return k0 < lengths, k1 < lengths
        valid = self.valid.to(tiles.device)[:, : tiles.k_len]  # (B, Lk)
        any_ = tile_reduce(valid, 1, tiles.block_k, False, "any")
        all_ = tile_reduce(valid, 1, tiles.block_k, True, "all")
        return any_.view(self.batch, 1, 1, -1), all_.view(self.batch, 1, 1, -1)

    def _check(self, q_len, k_len, q_offset):
        # A length beyond Lk means every key of this call is real: the same mask serves a prefill chunk of
        # an incremental decode (Lk < the final length), as padding(valid) with more columns than Lk does.
        if self.lengths is not None:
            return
        if self.valid.shape[1] < k_len:
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
    _state = ("prefix", "tensor", "batch", "_as_or")

    def __init__(self, prefix: Tensor):
        self.prefix = self.tensor = prefix
        self.batch = prefix.shape[0]
        self._as_or = causal() | _Padding(lengths=prefix)

    def structure(self):
        return MaskStructure(prefix=self.prefix, relative=False)

    def row_bounds(self, q, k_len):
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
    _state = ("doc_ids", "tensor", "batch")

    def __init__(self, doc_ids: Tensor):
        self.doc_ids = self.tensor = doc_ids
        self.batch = doc_ids.shape[0]

    def structure(self):
        return MaskStructure(doc_ids=self.doc_ids, relative=False)

    def interval_condition(self):
        return (self.doc_ids[:, 1:] >= self.doc_ids[:, :-1]).all()  # documents are intervals when ids are in order

    def row_bounds(self, q, k_len):
        # a host read: eager only (a compiled caller tests interval_condition() in its graph)
        if not torch.compiler.is_compiling() and not bool(self.interval_condition()):
            return None
        ids = self.doc_ids.to(q.device)
        keys = ids[:, :k_len].contiguous()  # (B, Lk)
        own = ids[:, q].contiguous()  # (B, Lq): each query's document
        lo = torch.searchsorted(keys, own, right=False)
        hi = torch.searchsorted(keys, own, right=True)
        return lo[:, None], hi[:, None]  # (B, 1, Lq)

    def allows(self, b, h, q, k):
        ids = self.doc_ids.to(q.device)
        b = broadcast_index(b, self.batch)
        return ids[b, q] == ids[b, k]

    def _tile_bounds(self, tiles):
        ids = self.doc_ids.to(tiles.device)
        q_ids = ids[:, tiles.q_offset : tiles.q_offset + tiles.q_len]  # (B, Lq)
        k_ids = ids[:, : tiles.k_len]  # (B, Lk)
        q_lo = tile_reduce(q_ids, 1, tiles.block_q, None, "amin").view(self.batch, 1, -1, 1)
        q_hi = tile_reduce(q_ids, 1, tiles.block_q, None, "amax").view(self.batch, 1, -1, 1)
        k_lo = tile_reduce(k_ids, 1, tiles.block_k, None, "amin").view(self.batch, 1, 1, -1)
        k_hi = tile_reduce(k_ids, 1, tiles.block_k, None, "amax").view(self.batch, 1, 1, -1)
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
    _state = ("tensor", "batch", "heads")

    def __init__(self, tensor: Tensor):
        self.tensor = tensor.view((1,) * (4 - tensor.dim()) + tuple(tensor.shape))
        self.batch, self.heads = self.tensor.shape[:2]

    def allows(self, b, h, q, k):
        t = self.tensor.to(q.device)
        sizes = t.shape
        idx = (broadcast_index(x, size) for x, size in zip((b, h, q, k), sizes, strict=True))
        return t[tuple(idx)]

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
                x = tile_reduce(x, 2, tiles.block_q, pad, op)
            if x.shape[3] > 1:
                x = tile_reduce(x, 3, tiles.block_k, pad, op)
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


# --- constructors ---------------------------------------------------------------------------------
def padding(lengths_or_valid: Tensor | Sequence[int]) -> Mask:
    """Key padding: hide the keys that are padding.

    Args:
        lengths_or_valid: either a 1-D integer tensor (or list) of valid key lengths per batch item
            (keys at positions >= length are hidden), or a (B, Lk) bool tensor, True = a real key.
    """
    x = lengths_or_valid
    if isinstance(x, str | bytes) or not (isinstance(x, Tensor | Iterable) or hasattr(x, "__array__")):
        raise TypeError(f"padding(lengths_or_valid): expected a 1-D integer tensor or list of lengths (one per batch "
                        f"item, e.g. [5]) or a (B, Lk) bool tensor of valid keys, got {type(x).__name__} {x!r}")
    if not isinstance(x, Tensor):  # a list (of ints, or rows of bools) or an array: its own dtype, checked below
        x = torch.as_tensor(x if hasattr(x, "__array__") else list(x))
        if x.numel() == 0 or x.dtype in (torch.uint16, torch.uint32, torch.uint64):  # (no min() for these)
            x = x.long()
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
        hint = ("; a (B, Lk) tensor of valid keys must be bool (.bool(); masks.from_hf reads a Hugging Face "
                "attention_mask)" if x.dim() == 2 else "")
        raise ValueError(
            f"padding(lengths_or_valid): lengths must be 1-D (B,), got shape {tuple(x.shape)}{hint}"
        )
    if x.numel() and not torch.compiler.is_compiling() and int(x.min()) < 0:  # a host read: eager only
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
    if isinstance(prefix_len, bool | str | float) or not isinstance(prefix_len, int | Tensor | Sequence):
        raise TypeError(f"prefix_lm(prefix_len): expected an int, a sequence of ints or a 1-D integer tensor, got "
                        f"{type(prefix_len).__name__} {prefix_len!r}")
    if isinstance(prefix_len, int):
        if prefix_len > MAX_POSITION:  # int64 positions (negative ones: below)
            raise ValueError(f"prefix_lm(prefix_len): expected a length in [0, 2**62], got {prefix_len}")
        prefix_len = [prefix_len]
    p = prefix_len if isinstance(prefix_len, Tensor) else torch.as_tensor(list(prefix_len))
    if p.dtype == torch.bool or p.is_floating_point() or p.is_complex():
        raise TypeError(f"prefix_lm(prefix_len): expected integers, got dtype {p.dtype}")
    if p.dim() != 1:
        raise ValueError(f"prefix_lm(prefix_len): expected an int or shape (B,), got {tuple(p.shape)}")
    if p.numel() and not torch.compiler.is_compiling() and int(p.min()) < 0:  # a host read: eager only
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


def as_mask(mask: Mask | Tensor | None) -> Mask | None:
    """``mask`` as a :class:`Mask`: a bool tensor is wrapped with :func:`from_tensor`; a Mask or None is
    returned as it is.

    Raises:
        TypeError: for anything else.
    """
    if mask is None or isinstance(mask, Mask):
        return mask
    if isinstance(mask, Tensor):
        return from_tensor(mask)
    raise TypeError(f"mask must be a maskattn Mask, a bool tensor or None, got {type(mask).__name__}")
