"""Inputs every backend must treat alike, whatever its kernel: empty sequences, and non-finite numbers in
positions the mask hides.

A hidden key or value must not influence any output. Multiplying by a zero weight does not guarantee it:
0 x NaN is NaN, and kernels that add -inf to a NaN score (SDPA's bool masks, the CPU flash kernel's
additive mask) keep the NaN. So :func:`maskattn.attention` zeroes every key and value row that holds a
non-finite number before calling the backend (a ``where``, never a multiply), and afterwards sets to NaN
exactly the rows whose mask allows one of those keys: a non-finite input still reaches every row that may
attend it, and no other. Rows computed without any such key are bit-identical to what the backend gives on
the same inputs with the hidden rows zeroed; gradients through hidden positions are zero. A mask that hides
nothing (:func:`_hides_nothing`) skips all this: there, a non-finite key reaches every row through the
kernel's own arithmetic (NaN, or +-inf from an inf value), with no check that would cost a pass over k and v.

Shape legend: B batch, H query heads, Hkv key/value heads, Lq queries, Lk keys, D head dim, Dv value dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from maskattn.masks import Mask, structure

__all__ = ["empty_result", "hide_nonfinite", "poison", "rows_seeing"]

DENSE_CHUNK = 1 << 22  # mask entries per chunk where a mask has no row intervals and is evaluated densely


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


def hide_nonfinite(q: Tensor, k: Tensor, v: Tensor, mask: Mask | None,
                   q_offset: int = 0) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(k, v, seen)``: k and v with every key/value row that holds a NaN or inf set to zero, and the
    (B, H, Lq, 1) rows whose mask allows such a key (for :func:`poison`).

    ``seen`` is None, and k and v are returned as given, when the mask hides nothing (no mask, ``full()``,
    a decoding step under ``causal()``) or, on CPU outside ``torch.compile``, when k and v are all finite
    (one sum each). Elsewhere the zeroing runs on every call, without a device sync, as a few elementwise
    passes over k and v that a compiler fuses.
    """
    if _hides_nothing(mask, k.shape[2], q_offset):
        return k, v, None
    if k.device.type == "cpu" and not torch.compiler.is_compiling() and bool(torch.isfinite(k.sum() + v.sum())):
        # A non-finite entry makes the whole sum non-finite (a finite overflow only sends us down the exact
        # path): on CPU, where the check costs no device sync, clean inputs skip the copies below.
        return k, v, None
    bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, Hkv, Lk)
    keep = ~bad[..., None]  # (B, Hkv, Lk, 1)
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    k, v = torch.where(keep, k, zero), torch.where(keep, v, zero)
    return k, v, rows_seeing(mask, bad, heads=q.shape[1], q_len=q.shape[2], q_offset=q_offset)


def _hides_nothing(mask: Mask | None, k_len: int, q_offset: int) -> bool:
    """Whether every query may attend every key, from the mask's structure alone: no mask, ``full()``,
    or ``causal()`` whose first query comes after the last key (one decoding step on a KV cache)."""
    kinds = structure(mask).kinds
    return not kinds or (kinds == ("causal",) and q_offset + 1 >= k_len)


def rows_seeing(mask: Mask, keys: Tensor, *, heads: int, q_len: int, q_offset: int = 0) -> Tensor:
    """(B, H, Lq, 1) True where query row may attend at least one of ``keys`` (B, Hkv, Lk) bool.

    Masks whose rows are key intervals (:meth:`Mask.row_bounds`: causal, windows, lengths, ordered
    documents and their conjunctions) are counted with a prefix sum, O(Lk + Lq); the others are evaluated
    densely, ``DENSE_CHUNK`` entries at a time in eager, in one pass while compiling. A compiled graph
    reads no mask value on the host: where the intervals depend on the mask's tensors
    (:meth:`Mask.interval_condition`), ``torch.cond`` picks the path at run time.
    """
    keys = keys.repeat_interleave(heads // keys.shape[1], dim=1)  # (B, H, Lk)
    k_len = keys.shape[2]
    positions = torch.arange(q_offset, q_offset + q_len, device=keys.device)  # (Lq,)
    bounds = mask.row_bounds(positions, k_len)
    if bounds is None:
        return _dense_rows_seeing(mask, keys, q_len, q_offset)
    condition = mask.interval_condition() if torch.compiler.is_compiling() else None
    if condition is None:
        return _interval_rows_seeing(bounds, keys, q_len)

    # both branches return the rows flattened: cond wants one plain layout from both
    def by_intervals(keys: Tensor) -> Tensor:
        return _interval_rows_seeing(bounds, keys, q_len).flatten()

    def densely(keys: Tensor) -> Tensor:
        return _dense_rows_seeing(mask, keys, q_len, q_offset).flatten()

    seen = torch.cond(condition.to(keys.device), by_intervals, densely, (keys,))  # (B * H * Lq,)
    return seen.view(*keys.shape[:2], q_len, 1)  # (B, H, Lq, 1)


def _interval_rows_seeing(bounds: tuple[Tensor, Tensor], keys: Tensor, q_len: int) -> Tensor:
    batch, heads, k_len = keys.shape  # keys: (B, H, Lk) bool
    count = F.pad(keys.to(torch.int32).cumsum(-1), (1, 0))  # (B, H, Lk + 1): flagged keys before each index
    lo, hi = (x.to(keys.device).clamp(0, k_len).expand(batch, heads, q_len) for x in bounds)  # (B, H, Lq)
    seen = (count.gather(-1, hi) - count.gather(-1, lo.minimum(hi))) > 0
    return seen[..., None]  # (B, H, Lq, 1)


def _dense_rows_seeing(mask: Mask, keys: Tensor, q_len: int, q_offset: int) -> Tensor:
    k_len = keys.shape[2]
    if torch.compiler.is_compiling():  # one pass: a loop over a traced length would fix that length
        allowed = mask.to_dense(q_len, k_len, q_offset=q_offset, device=keys.device)  # (B|1, H|1, Lq, Lk)
        return (allowed & keys[:, :, None]).any(-1, keepdim=True)  # (B, H, Lq, 1)
    flags = keys.to(torch.float32)[..., None]  # (B, H, Lk, 1)
    step = max(1, DENSE_CHUNK // max(k_len, 1))
    parts = []
    for start in range(0, q_len, step):
        rows = min(step, q_len - start)
        allowed = mask.to_dense(rows, k_len, q_offset=q_offset + start, device=keys.device)  # (B|1, H|1, n, Lk)
        parts.append((allowed.to(torch.float32) @ flags) > 0)  # (B, H, n, 1)
    if not parts:
        return torch.zeros(*keys.shape[:2], 0, 1, dtype=torch.bool, device=keys.device)
    return torch.cat(parts, dim=2)


def poison(out: Tensor, second: Tensor | None, seen: Tensor) -> tuple[Tensor, Tensor | None]:
    """Set to NaN the rows ``seen`` (B, H, Lq, 1) of the (B, H, Lq, Dv) output and of the weights
    (B, H, Lq, Lk) or log-sum-exp (B, H, Lq) returned with it."""
    out = out.masked_fill(seen, torch.nan)
    if second is not None:
        second = second.masked_fill(seen if second.dim() == 4 else seen[..., 0], torch.nan)
    return out, second
