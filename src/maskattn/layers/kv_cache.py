"""Key/value cache for incremental decoding.

Shape legend: B batch, Hkv key/value heads, T cache capacity, Lk keys so far, L new keys, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("pos", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.max_len = max_len

    @property
    def length(self) -> int:
        return int(self.pos)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append (B, Hkv, L, D) keys and values; return all cached ones, each (B, Hkv, Lk, D)."""
        if k.shape != v.shape or k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3]:
            raise ValueError(
                f"k and v must be (B, Hkv, L, D) = ({self.k.shape[0]}, {self.k.shape[1]}, L, {self.k.shape[3]}), "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        start = self.length
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {start} cached + {k.shape[2]} new > capacity {self.max_len}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.pos.fill_(end)
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, Hkv, Lk, D)

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B',), e.g. the surviving beams of beam search."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.k.shape)}, length={self.length}"
