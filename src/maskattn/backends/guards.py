"""Inputs every backend must treat alike, whatever its kernel: empty sequences.

Shape legend: B batch, H query heads, Hkv key/value heads, Lq queries, Lk keys, D head dim, Dv value dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["empty_result"]


def empty_result(q: Tensor, k: Tensor, v: Tensor, want_lse: bool) -> tuple[Tensor, Tensor | None]:
    """What the reference returns when Lq = 0 or Lk = 0, for backends whose kernels cannot tile nothing.

    Returns ``(output, lse)``: zero rows (B, H, Lq, Dv) (a sum over no key is 0), connected to q, k and v
    so that backward gives zero gradients, and the (B, H, Lq) log-sum-exp, -inf (no key allowed), if
    ``want_lse``, else None.
    """
    group = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(group, dim=1).transpose(-1, -2)  # (B, H, Lq, Lk): no element
    out = scores @ v.repeat_interleave(group, dim=1)  # (B, H, Lq, Dv)
    if not want_lse:
        return out, None
    lse = torch.full(q.shape[:3], -torch.inf, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    return out, lse  # (B, H, Lq)
