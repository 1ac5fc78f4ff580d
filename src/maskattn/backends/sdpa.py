"""The sdpa backend: PyTorch's ``scaled_dot_product_attention``, with maskattn's semantics.

Exact for every mask, but cheap only for the masks SDPA can take without an Lq x Lk tensor:

* no mask (or ``full()``): plain SDPA;
* pure ``causal()`` with ``q_offset == 0`` and ``Lq == Lk``: ``is_causal=True`` (SDPA's causal
  mask is aligned top-left, which is ours only in that case);
* pure key padding: a (B, 1, 1, Lk) bool mask;
* ``document(ids)`` or ``causal() & document(ids)`` whose documents are contiguous runs of ids
  (packed sequences), ``q_offset == 0``, ``Lq == Lk``: one SDPA call per document, without a mask
  (with ``is_causal``), as FlashAttention's variable-length kernels do; at most
  ``MAX_SEGMENTS`` calls, beyond which the per-call overhead outweighs the skipped work (eager only: the
  runs are read from the ids, which a ``torch.compile`` graph cannot branch on);
* ``causal() & sliding_window(W)`` with ``q_offset == 0``, ``Lq == Lk > W``: the queries are cut
  into chunks of W; chunk c attends the keys of chunks c - 1 and c under one (W, 2W) band mask
  shared by every chunk, all chunks in one SDPA call (chunk 0: ``is_causal`` on its own keys); also
  only above ``MIN_SPLIT_SCORES``.

Any other mask is materialised with ``mask.to_dense`` and passed as an explicit bool tensor: exact,
but it costs Lq x Lk memory and computes every score (this is what ``backend="auto"`` avoids, and
the "SDPA with the mask tensor" baseline of the benchmark). Rows that may attend nothing come back
as zeros with zero gradients, not NaN.

Not supported (ValueError): ``return_weights`` (SDPA never builds the weights; use ``reference``),
``return_lse`` (SDPA's public function does not return it; use ``blocked``) and
dropout with a ``generator`` (SDPA draws its dropout from the global RNG; use ``blocked`` or
``reference``). Dropout without a generator is SDPA's own, from the global RNG (which the trainer
reseeds every step).

Shape legend: B batch, H query heads, Hkv key/value heads, Lq queries, Lk keys, D head dim.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor

from maskattn.backends.registry import Backend, Call
from maskattn.masks import Mask, structure

__all__ = ["BACKEND", "MAX_SEGMENTS", "attention", "band", "cheap_mask", "fast_path", "segments"]

MAX_SEGMENTS = 64  # per-document calls of one attention call (over the whole batch)
# Below this many scores per (batch, head) one call with the dense mask is cheaper than splitting it into
# documents or bands (the threshold of dispatch.SMALL_SCORES: packed training batches stay one call).
MIN_SPLIT_SCORES = 512 * 512

Segments = list[list[tuple[int, int]]]  # per batch row, the (start, stop) of each document


def cheap_mask(mask: Mask | None, q_len: int, k_len: int, q_offset: int) -> bool:
    """Whether SDPA takes this mask without an Lq x Lk tensor (see the module docstring)."""
    kinds = structure(mask).kinds
    if kinds in ((), ("lengths",), ("valid",)):
        return True
    return kinds == ("causal",) and q_offset == 0 and q_len == k_len


def segments(mask: Mask | None, q_len: int, k_len: int, q_offset: int, batch: int) -> tuple[Segments, bool] | None:
    """``(runs, causal)`` if ``mask`` is ``document(ids)``, optionally ``& causal()``, over contiguous
    documents that split a call of more than ``MIN_SPLIT_SCORES`` scores into at most
    ``MAX_SEGMENTS`` self-attention calls; else None."""
    if torch.compiler.is_compiling():  # the runs are read from the ids: a traced graph cannot depend on them
        return None
    if q_offset != 0 or q_len != k_len or q_len * k_len <= MIN_SPLIT_SCORES:
        return None
    parts = structure(mask)
    if parts.kinds not in (("doc_ids",), ("causal", "doc_ids")):
        return None
    ids = parts.doc_ids[:, :q_len]  # (B|1, L)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    count = int(starts.sum()) * (batch if ids.shape[0] == 1 else 1)
    if count > MAX_SEGMENTS:
        return None
    runs: Segments = []
    for row_ids, row_starts in zip(ids.tolist(), starts.tolist(), strict=True):
        bounds = [i for i, first in enumerate(row_starts) if first] + [q_len]
        if len({row_ids[i] for i in bounds[:-1]}) != len(bounds) - 1:
            return None  # an id occurs in two runs: its documents attend across the gap
        runs.append(list(pairwise(bounds)))
    return runs, parts.causal


def band(mask: Mask | None, q_len: int, k_len: int, q_offset: int) -> int | None:
    """The window W if ``mask`` is exactly ``causal() & sliding_window(W)`` on self-attention longer than W
    and of more than ``MIN_SPLIT_SCORES`` scores; else None."""
    parts = structure(mask)
    if torch.compiler.is_exporting():  # exported lengths are symbolic: no branch on their size
        return None
    if parts.kinds != ("causal", "window") or q_offset != 0 or q_len != k_len or q_len * k_len <= MIN_SPLIT_SCORES:
        return None
    return parts.window if q_len > parts.window else None


def _banded(q: Tensor, k: Tensor, v: Tensor, window: int, **kwargs) -> Tensor:
    """Causal sliding-window attention in chunks of ``window`` rows: (B, H, L, Dv)."""
    batch, heads, length, _ = q.shape
    size = window
    chunks = -(-length // size)
    padded = chunks * size
    if k.shape[1] != heads:  # the chunks are folded into the head axis, which SDPA's GQA cannot follow
        k, v = (x.repeat_interleave(heads // k.shape[1], dim=1) for x in (k, v))
    if padded != length:  # zero rows at the end: causal, so no real query ever sees them
        q, k, v = (F.pad(x, (0, 0, 0, padded - length)) for x in (q, k, v))
    first = F.scaled_dot_product_attention(q[:, :, :size], k[:, :, :size], v[:, :, :size], is_causal=True,
                                           **kwargs)  # (B, H, W, Dv)
    if chunks == 1:
        return first[:, :, :length]

    def windows(x: Tensor) -> Tensor:  # (B, H, L', D) -> (B, H * (n - 1), 2W, D): chunks c - 1 and c side by side
        prev = x[:, :, : padded - size].view(batch, heads, chunks - 1, size, -1)
        cur = x[:, :, size:].view(batch, heads, chunks - 1, size, -1)
        return torch.cat([prev, cur], dim=3).view(batch, heads * (chunks - 1), 2 * size, -1)

    i = torch.arange(size, device=q.device).view(-1, 1)
    j = torch.arange(2 * size, device=q.device).view(1, -1)
    allowed = (j <= i + size) & (j > i + size - window)  # key j of the pair is at chunk start - W + j
    rest = q[:, :, size:].reshape(batch, heads * (chunks - 1), size, -1)
    out = F.scaled_dot_product_attention(rest, windows(k), windows(v), attn_mask=allowed, **kwargs)
    out = out.reshape(batch, heads, padded - size, -1)  # CUDA kernels return (B, L, H, D)-strided outputs
    return torch.cat([first, out], dim=2)[:, :, :length]


def _per_segment(q: Tensor, k: Tensor, v: Tensor, runs: Segments, causal: bool, **kwargs) -> Tensor:
    """Self-attention within each document: (B, H, L, Dv), one SDPA call per (row, document)."""
    rows = []
    for b in range(q.shape[0]):
        spans = runs[b if len(runs) > 1 else 0]
        rows.append(torch.cat([F.scaled_dot_product_attention(
            q[b : b + 1, :, lo:hi], k[b : b + 1, :, lo:hi], v[b : b + 1, :, lo:hi], is_causal=causal, **kwargs)
            for lo, hi in spans], dim=2))  # (1, H, L, Dv)
    return torch.cat(rows, dim=0)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask | None,
    *,
    scale: float,
    dropout_p: float = 0.0,
    q_offset: int = 0,
    return_weights: bool = False,
    generator: torch.Generator | None = None,
    return_lse: bool = False,
) -> tuple[Tensor, None]:
    """Masked attention by ``torch.nn.functional.scaled_dot_product_attention``.

    Takes the arguments of :func:`maskattn.backends.reference.attention`.

    Raises:
        ValueError: if ``return_weights`` or ``return_lse`` is True, or ``dropout_p`` > 0 with a ``generator``.
    """
    if return_weights:
        raise ValueError(
            "backend 'sdpa' does not return attention weights (return_weights=True); use "
            "backend='reference' (backend='auto' picks it when return_weights=True)"
        )
    if return_lse:
        raise ValueError(
            "backend 'sdpa' does not return the log-sum-exp (return_lse=True): SDPA keeps it inside its kernel; "
            "use backend='blocked' (backend='auto' picks it when return_lse=True)"
        )
    if dropout_p > 0.0 and generator is not None:
        raise ValueError(
            f"backend 'sdpa' cannot draw dropout (dropout_p={dropout_p}) from a generator: SDPA draws from the "
            "global RNG; pass no generator, or use backend='blocked' or 'reference' (auto picks 'blocked')"
        )
    q_len, k_len = q.shape[2], k.shape[2]
    gqa = True if q.shape[1] != k.shape[1] else False  # noqa: SIM210 (a branch: SDPA takes no SymBool of symbolic heads)
    kinds = structure(mask).kinds
    # No mask, full(), or causal() whose queries all come after the last key (one decoding step on a KV cache).
    if not kinds or (kinds == ("causal",) and q_offset + 1 >= k_len):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale, enable_gqa=gqa), None
    # PyTorch's is_causal kernels scale the -inf of hidden scores too: NaN for a scale <= 0 (torch 2.13, CPU)
    causal_ok = scale is None or scale > 0
    if causal_ok and kinds == ("causal",) and q_offset == 0 and q_len == k_len:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, enable_gqa=gqa)
        return out, None
    window = band(mask, q_len, k_len, q_offset) if causal_ok else None
    if window is not None:
        return _banded(q, k, v, window, dropout_p=dropout_p, scale=scale), None
    split = segments(mask, q_len, k_len, q_offset, q.shape[0]) if causal_ok else None
    if split is not None:
        return _per_segment(q, k, v, *split, dropout_p=dropout_p, scale=scale, enable_gqa=gqa), None
    if kinds in (("lengths",), ("valid",)):  # key padding ignores the query
        b = torch.arange(mask.batch, device=q.device).view(-1, 1, 1, 1)
        zero = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=q.device)
        keys = torch.arange(k_len, device=q.device).view(1, 1, 1, -1)
        allowed = mask.allows(b, zero, zero, keys)  # (B, 1, 1, Lk): key padding ignores the query
    else:
        allowed = mask.to_dense(q_len, k_len, q_offset=q_offset, device=q.device)  # (B|1, H|1, Lq, Lk)
    empty = ~allowed.any(-1, keepdim=True)  # (B|1, H|1, Lq|1, 1)
    # Only on CPU, where the read costs no wait for a device (and the two passes below ~10% of a small call),
    # outside a compiled graph, does asking whether some row is empty pick the plain call; elsewhere the path
    # below runs always: without an empty row it is the plain call bit for bit.
    if q.device.type == "cpu" and not torch.compiler.is_compiling() and not empty.any():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa), None
    # SDPA's math kernel returns NaN on a row with nothing to attend: let such rows attend
    # everything, then zero them, which also zeroes every gradient that flows through them.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty, dropout_p=dropout_p, scale=scale,
                                         enable_gqa=gqa)
    return out.masked_fill(empty, 0.0), None


def _refuses(call: Call) -> str | None:
    if call.dropout_p > 0.0 and call.generator is not None:
        return f"backend 'sdpa' cannot draw dropout (dropout_p={call.dropout_p}) from a generator"
    return None


def fast_path(call: Call) -> str | None:
    """Why this backend runs ``call`` without an Lq x Lk mask tensor, as the ``auto`` rules prefer it:
    no mask, aligned causal, key padding (:func:`cheap_mask`), or a few contiguous documents
    (:func:`segments`); else None. The banded window is not offered: ``blocked`` beats it
    (docs/performance.md)."""
    q_len, k_len = call.q.shape[2], call.k.shape[2]
    if cheap_mask(call.mask, q_len, k_len, call.q_offset):
        kind = "no mask" if call.mask is None else repr(call.mask)
        return f"{kind}: PyTorch's fused kernel takes it without an Lq x Lk mask tensor"
    split = segments(call.mask, q_len, k_len, call.q_offset, call.q.shape[0])
    if split is None:
        return None
    count = sum(len(row) for row in split[0])
    return (f"{call.mask!r} over {count} contiguous document(s): one SDPA call per document, without a mask "
            "tensor (at most sdpa.MAX_SEGMENTS calls)")


def _cost(call: Call, kept: int) -> tuple[int, str]:
    batch, heads, q_len, _ = call.q.shape
    k_len = call.k.shape[2]
    window = band(call.mask, q_len, k_len, call.q_offset)
    if window is not None:  # _banded: a W x W causal call, then W queries x 2W keys for each later chunk
        return batch * heads * window * window * (2 * -(-q_len // window) - 1), "band calls, no Lq x Lk mask"
    split = segments(call.mask, q_len, k_len, call.q_offset, batch)  # one call per document
    cheap = split is not None or cheap_mask(call.mask, q_len, k_len, call.q_offset)
    causal = structure(call.mask).kinds == ("causal",)  # is_causal: the kernel skips blocks above the diagonal
    if split is not None and not split[1]:  # each document's call computes its n x n scores
        runs = split[0]
        entries = heads * (batch if len(runs) == 1 else 1) * sum((hi - lo) ** 2 for spans in runs for lo, hi in spans)
    else:
        entries = kept if causal or split is not None else call.scores
    if cheap:
        return entries, ""
    size = call.mask.batch * call.mask.heads * q_len * k_len  # bool (B|1, H|1, Lq, Lk), as to_dense builds it
    return entries, f"needs a {size / 1e6:.1f} MB Lq x Lk mask tensor"


BACKEND = Backend("sdpa", attention, refuses=_refuses, cost=_cost, fast_path=fast_path)
