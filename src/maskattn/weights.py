"""Cheap attention weights: recompute chosen heads and query rows from a saved log-sum-exp.

A fast backend never builds the (B, H, Lq, Lk) weights, but it knows each row's log-sum-exp
``lse = log(sum_k allowed(q, k) * exp(scale * q.k))``. With it, the weights of any row are one
small matmul away::

    weights[b, h, i, j] = exp(scale * q[b, h, i] . k[b, h // G, j] - lse[b, h, i])   where allowed, else 0

so looking at a few heads and rows costs ``rows x Lk`` per head instead of a dense forward of the
whole model. ``maskattn.attention(..., return_lse=True)`` gives the ``lse``; the attention layers' hooks
(:class:`maskattn.layers.mha.Attend`, which :func:`maskattn.viz.capture_attention` observes) use it.

Shape legend: B batch, H query heads, Hkv key/value heads (G = H // Hkv), Lq queries, Lk keys, D head dim.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from maskattn.masks import Mask, as_mask

__all__ = ["attention_weights"]


def attention_weights(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    mask: Mask | Tensor | None = None,
    *,
    scale: float | None = None,
    q_offset: int = 0,
    heads: Sequence[int] | None = None,
    rows: Sequence[int] | None = None,
) -> Tensor:
    """The attention weights of the chosen heads and query rows, from the log-sum-exp of a forward.

    Args:
        q: the queries of the forward, (B, H, Lq, D).
        k: its keys, (B, Hkv, Lk, D).
        lse: its (B, H, Lq) log-sum-exp, from ``maskattn.attention(..., return_lse=True)``.
        mask: the forward's mask (True = may attend), or None.
        scale: the forward's score multiplier; default ``1 / sqrt(D)``.
        q_offset: the forward's ``q_offset``.
        heads: query heads to recompute (default all).
        rows: query rows, as indices into ``q``'s Lq axis (default all).

    Returns:
        (B, len(heads), len(rows), Lk) weights in ``q``'s dtype, equal to the ``return_weights`` of
        the reference backend on those heads and rows; rows that may attend nothing are zeros.

    Raises:
        TypeError: if q, k or lse is not floating-point, or q and k differ in dtype.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q must be (B, H, Lq, D) and k (B, Hkv, Lk, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    for name, x in (("q", q), ("k", k), ("lse", lse)):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    b, h, lq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or k.shape[1] == 0 or h % k.shape[1]:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: expected (B={b}, Hkv | {h}, Lk, D={d})")
    if lse.shape != (b, h, lq):
        raise ValueError(f"lse must be (B, H, Lq) = {(b, h, lq)} like q, got shape {tuple(lse.shape)}")
    head_idx = index_tensor("heads", heads, h, q.device)
    row_idx = index_tensor("rows", rows, lq, q.device)
    mask = as_mask(mask)
    lk = k.shape[2]
    if mask is not None:
        mask.check(lq, lk, q_offset=q_offset, batch=b, heads=h)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    wide = torch.promote_types(lse.dtype, torch.float32)
    qs = q[:, head_idx][:, :, row_idx].to(wide)  # (B, h', r, D)
    ks = k[:, head_idx // (h // k.shape[1])].to(wide)  # (B, h', Lk, D): each query head's kv head
    scores = (qs @ ks.transpose(-1, -2)) * scale  # (B, h', r, Lk)
    row_lse = lse[:, head_idx][:, :, row_idx].to(wide).unsqueeze(-1)  # (B, h', r, 1)
    weights = torch.exp(scores - row_lse)
    if mask is not None:
        allowed = mask.allows(
            torch.arange(b, device=q.device).view(-1, 1, 1, 1).clamp(max=mask.batch - 1),
            head_idx.view(1, -1, 1, 1).clamp(max=mask.heads - 1),
            (row_idx + q_offset).view(1, 1, -1, 1),
            torch.arange(lk, device=q.device).view(1, 1, 1, -1),
        )
        weights = weights.masked_fill(~allowed, 0.0)  # also clears exp(-inf + inf) = NaN on empty rows
    return weights.to(q.dtype)


def integer_indices(chosen: Sequence[int] | Tensor) -> tuple[int, ...] | None:
    """``chosen`` read once as a tuple of ints, or None when it is not integer indices: a bool selection or a float
    would otherwise be read as the indices 0/1 (or taken as a mask) or rounded down."""
    if isinstance(chosen, Tensor):
        ok = chosen.dim() == 1 and not (chosen.dtype == torch.bool or chosen.is_floating_point() or chosen.is_complex())
        return tuple(chosen.tolist()) if ok else None
    if isinstance(chosen, str | bytes):
        return None
    values = tuple(chosen)
    ok = all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in values)
    return tuple(int(i) for i in values) if ok else None


def index_tensor(name: str, chosen: Sequence[int] | None, size: int, device: torch.device) -> Tensor:
    """``chosen`` (default all of ``range(size)``) as a long tensor of indices; ValueError naming ``name`` when they
    are not integer indices in ``[0, size)``."""
    if chosen is None:
        return torch.arange(size, device=device)
    values = integer_indices(chosen)
    if values is None or any(not 0 <= i < size for i in values):
        shown = chosen if values is None else list(values)
        raise ValueError(f"{name} must be indices in [0, {size}), got {shown!r}")
    return torch.tensor(values, dtype=torch.long, device=device)


def select(weights: Tensor, heads: Sequence[int] | None, rows: Sequence[int] | None) -> Tensor:
    """The chosen heads and query rows of dense (B, H, Lq, Lk) weights, checked as :func:`attention_weights`
    checks them (a negative or too large index is refused by name, not read from the end or an IndexError)."""
    head_idx = index_tensor("heads", heads, weights.shape[1], weights.device)
    return weights[:, head_idx][:, :, index_tensor("rows", rows, weights.shape[2], weights.device)]
