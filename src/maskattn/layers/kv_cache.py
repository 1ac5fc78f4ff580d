"""Key/value cache for incremental decoding.

Shape legend: B batch, Hkv key/value heads, T cache capacity, Lk keys so far, L new keys, D head dim,
C window capacity.

Two caches with one interface (``update``, ``length``, ``first_key``, ``reorder``): :class:`KVCache`
keeps every position; :class:`SlidingWindowKVCache` keeps only the last C slots, for models whose
attention is ``causal() & sliding_window(W)`` (C >= W), so its memory stays O(C) however long the
generation runs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskattn.layers.arguments import check_layer_arguments


class KVCache(nn.Module):
    """Preallocated keys and values of one self-attention layer.

    ``update(k, v)`` writes the new keys/values at the current position and returns everything
    cached so far; ``length`` (also a tensor, ``pos``) is the number of cached positions, which is
    the ``q_offset`` of the next call.

    Args:
        batch: batch size B (beams included).
        num_kv_heads: key/value heads Hkv.
        head_dim: head dim D.
        max_len: capacity T.
        dtype, device: of the buffers.
        static: a one-key ``update`` writes its slot in place without reading ``pos`` on the host and
            returns all T slots, fixed shapes for a compiled decoding step; the slots not written yet
            hold zeros, which the caller's mask must hide. Longer updates return the slots so far.
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 static: bool = False) -> None:
        super().__init__()
        check_layer_arguments(type(self).__name__, sizes={"batch": batch, "num_kv_heads": num_kv_heads,
                                                          "head_dim": head_dim, "max_len": max_len},
                              switches={"static": static})
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("pos", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.max_len, self.static = max_len, static
        self._length = 0  # pos kept on the host too: reading the tensor waits for a GPU (per layer and step)

    def _check_update(self, k: Tensor, v: Tensor) -> None:
        """Raise unless ``k`` and ``v`` are two (B, Hkv, L, D) tensors of this cache's B, Hkv and D (shapes only)."""
        have = self.k.shape
        if isinstance(k, Tensor) and isinstance(v, Tensor) and k.dim() == 4 and k.shape == v.shape and \
                k.shape[0] == have[0] and k.shape[1] == have[1] and k.shape[3] == have[3]:
            return  # the usual case, decided without building the message's tuples (once per layer and token)
        shapes = [tuple(x.shape) if isinstance(x, Tensor) else None for x in (k, v)]
        want = (have[0], have[1], have[3])
        if shapes[0] is None or shapes[0] != shapes[1] or len(shapes[0]) != 4 or shapes[0][:2] + shapes[0][3:] != want:
            got = [s if s is not None else type(x).__name__ for s, x in zip(shapes, (k, v), strict=True)]
            raise ValueError(f"k and v must be (B, Hkv, L, D) = ({want[0]}, {want[1]}, L, {want[2]}), "
                             f"got {got[0]} and {got[1]}")

    def _set_length(self, n: int) -> None:
        # A plain int, past nn.Module.__setattr__ (its parameter, buffer and module checks cost more than the
        # update's copy of one token's keys); __init__ set it as an ordinary attribute, which this one stays.
        self.__dict__["_length"] = n

    @property
    def length(self) -> int:
        # one-key static updates move pos alone (compiled code keeps no Python int): a static cache reads it
        return int(self.pos) if self.static else self._length

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append (B, Hkv, L, D) keys and values; return all cached ones, each (B, Hkv, Lk, D)."""
        self._check_update(k, v)
        if self.static and k.shape[2] == 1:
            return self._write_one(k, v)
        start = self.length
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {start} cached + {k.shape[2]} new > capacity {self.max_len}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.pos.fill_(end)
        self._set_length(end)
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, Hkv, Lk, D)

    def _write_one(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write (B, Hkv, 1, D) at slot ``pos`` (a tensor index: no host read); return all (B, Hkv, T, D) slots."""
        slot = self.pos.view(1)  # (1,)
        # under autocast the keys come in the autocast dtype; index_copy_, unlike a slice assignment, does not convert
        self.k.index_copy_(2, slot, k.to(self.k.dtype))
        self.v.index_copy_(2, slot, v.to(self.v.dtype))
        self.pos.add_(1)
        return self.k, self.v  # (B, Hkv, T, D)

    def first_key(self, new: int) -> int:
        """The slot of the first key ``update`` returns when ``new`` keys arrive: always 0 here."""
        return 0

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B',), e.g. the surviving beams of beam search.

        With the batch size unchanged, only the slots written so far are gathered, in place (a beam
        step would otherwise copy every preallocated slot); a new batch size gets new buffers.
        """
        batch = self.k.shape[0]
        if index.shape[0] == batch:
            used = min(self.length, self.k.shape[2])
            self.k[:, :, :used] = self.k[:, :, :used].index_select(0, index)
            self.v[:, :, :used] = self.v[:, :, :used].index_select(0, index)
            return
        # rows of the flat (B, Hkv*T*D) view: a plain row gather, much faster on CPU than the 4-D one
        self.k = self.k.reshape(batch, -1).index_select(0, index).view(-1, *self.k.shape[1:])
        self.v = self.v.reshape(batch, -1).index_select(0, index).view(-1, *self.v.shape[1:])

    def extra_repr(self) -> str:
        return f"shape={tuple(self.k.shape)}, length={self.length}"


class SlidingWindowKVCache(KVCache):
    """Keys and values of the last ``capacity`` slots only (a roll: the oldest slot drops out).

    ``update(k, v)`` returns the keys a sliding-window query can still see: the last ``capacity - 1``
    cached slots followed by the L new ones (all of them while fewer are cached), so a one-token step
    attends to at most ``capacity`` keys; ``first_key(L)`` is the slot of the first returned key, and
    ``length`` counts every slot seen, as :class:`KVCache`'s does. With a window of W positions and
    prompts without padding, ``capacity = W`` suffices; right-padded prompts need W plus the longest
    padding run, which slots hold but positions skip.

    Args:
        batch, num_kv_heads, head_dim, dtype, device: as for :class:`KVCache`.
        capacity: slots kept, C.
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, capacity: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        super().__init__(batch, num_kv_heads, head_dim, capacity, dtype=dtype, device=device)

    def first_key(self, new: int) -> int:
        return max(0, self.length - self.max_len + 1)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append (B, Hkv, L, D) keys and values; return the visible ones, each (B, Hkv, <= C - 1 + L, D)."""
        self._check_update(k, v)
        seen, cap = self.length, self.max_len
        kept = min(seen, cap)
        visible = min(kept, cap - 1)
        keys = torch.cat([self.k[:, :, kept - visible : kept], k], dim=2)  # (B, Hkv, visible + L, D)
        values = torch.cat([self.v[:, :, kept - visible : kept], v], dim=2)
        store = min(cap, kept + k.shape[2])  # <= visible + L: the newest ``store`` keys are all in ``keys``
        self.k[:, :, :store] = keys[:, :, keys.shape[2] - store :]
        self.v[:, :, :store] = values[:, :, values.shape[2] - store :]
        self.pos.fill_(seen + k.shape[2])
        self._set_length(seen + k.shape[2])
        return keys, values  # (B, Hkv, Lk, D)
