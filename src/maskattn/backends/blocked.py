"""The blocked backend: exact attention that computes only the tiles the mask does not hide.

The (Lq, Lk) score matrix is cut into (block_q, block_k) tiles and classified by ``mask.block_map``:
EMPTY tiles are never computed, FULL tiles need no element mask, and an element mask (from
``mask.allows``) is built only for query blocks whose key range holds a PARTIAL or EMPTY tile. Each
query block attends to the contiguous range of key tiles between its first and last non-empty tile::

    key tiles ->    0 1 2 3 4 5          causal() & sliding_window(2 tiles)
    query block 0   P . . . . .          P partial, F full, . empty (skipped)
    query block 1   P P . . . .          block 3 attends key tiles 2..3,
    query block 2   . P P . . .          block 4 key tiles 3..4: both ranges are
    query block 3   . . P P . .          two tiles wide, so blocks 1..5 form one
    query block 4   . . . P P .          group, computed by one batched call
    query block 5   . . . . P P

Consecutive query blocks whose ranges have the same width form a *group*: their key ranges are
laid side by side (a strided view when they are evenly spaced, a gather otherwise) and the whole
group is one batched attention call. Blocks whose widths differ a little (a causal mask's ranges
grow by one tile per block) also join a group, each computing the group's widest range, as long as
that adds at most ``SLACK - 1`` (25%) to their tiles; the extra tiles are masked. Forward keeps only the
output and the per-row log-sum-exp; backward (a custom ``autograd.Function``) recomputes the
scores group by group (the FlashAttention scheme), so memory grows linearly with the sequence
length for structured masks.

Each group runs on one of two kernels with the same contract:

* ``fused``: PyTorch's CPU flash-attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``
  and its backward), which returns the log-sum-exp we need; used on CPU without dropout.
* ``math``: the same computation written with matmuls; used for dropout, other devices, or when
  the fused kernel is missing. Dropout masks are drawn per group from a seed taken once from the
  caller's generator, so backward regenerates exactly the masks forward used.

Shape legend: B batch, H query heads, Hkv key/value heads, Gh = H // Hkv query heads per kv head,
Lq queries, Lk keys, D head dim, Dv value head dim, nq / nk query / key blocks, g query blocks in a
group, R = Gh * block_q rows per block (all query heads of a kv head share its keys), W keys in a
block's range, B' = B * Hkv.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor

from maskattn.backends.guards import empty_result
from maskattn.backends.registry import Backend, Call
from maskattn.masks import EMPTY, FULL, Mask

__all__ = ["BACKEND", "BLOCK_K", "BLOCK_Q", "attention"]

BLOCK_Q = 128  # query rows per tile (chosen by benchmarks/attention.py on a 2-core CPU, fp32, D=64)
BLOCK_K = 128  # keys per tile
# Cap on B' * rows * keys of one group: the math kernel's scores, and GROUP_ELEMENTS * D / R elements for each of the
# fused kernel's (B', g, W, D) key and value gradients (16 MB at fp32, D = 64, R = 128), whatever B and Hkv are.
GROUP_ELEMENTS = 1 << 23
SLACK = 1.25  # a group may compute this many times the tiles its blocks' own ranges hold

_FUSED_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Group:
    """Query blocks ``first .. stop - 1``; block ``first + i`` attends keys ``starts[i] * block_k`` on,
    ``width`` key tiles of them; ``masked`` says whether an element mask is needed."""

    first: int
    stop: int
    starts: tuple[int, ...]
    width: int
    masked: bool


@dataclass(frozen=True)
class Plan:
    """Everything forward and backward need to know about the tiling of one call."""

    mask: Mask | None
    q_len: int
    k_len: int
    q_offset: int
    block_q: int
    block_k: int
    groups: tuple[Group, ...]

    @property
    def padded_q(self) -> int:
        return -(-self.q_len // self.block_q) * self.block_q

    @property
    def padded_k(self) -> int:
        return -(-self.k_len // self.block_k) * self.block_k


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
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    kernel: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Masked attention computed only on the tiles the mask does not hide.

    Takes the arguments of :func:`maskattn.backends.reference.attention` (``return_lse`` gives the
    log-sum-exp this backend keeps for backward anyway, at no extra cost), plus:

    Args:
        block_q: query rows per tile.
        block_k: keys per tile.
        kernel: ``"auto"``, ``"fused"`` (PyTorch's CPU flash kernel; no dropout) or ``"math"``.

    Raises:
        ValueError: if ``return_weights`` is True (the weights are the one thing this backend never
            builds: use ``backend="reference"``), or on a bad block size or kernel name.
    """
    if return_weights:
        raise ValueError(
            "backend 'blocked' does not return attention weights (return_weights=True); "
            "use backend='reference' (backend='auto' picks it when return_weights=True)"
        )
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if 0 in (q.shape[0], q.shape[1], q.shape[2], k.shape[2]):  # no tile to plan: what the reference returns
        return empty_result(q, k, v, return_lse)
    kernel = _pick_kernel(kernel, q, v, dropout_p)
    plan = make_plan(mask, q, k, q_offset=q_offset, block_q=block_q, block_k=block_k)
    seed = 0
    if dropout_p > 0.0:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device if generator else "cpu"))
    out, lse = _BlockedAttention.apply(q, k, v, plan, scale, dropout_p, seed, kernel, return_lse)
    return out, (lse if return_lse else None)


def _pick_kernel(kernel: str, q: Tensor, v: Tensor, dropout_p: float) -> str:
    fused_ok = (
        _FUSED_FORWARD is not None
        and q.device.type == "cpu"
        and q.dtype in _FUSED_DTYPES
        and v.shape[-1] == q.shape[-1]
    )
    if kernel == "auto":
        return "fused" if fused_ok and dropout_p == 0.0 else "math"
    if kernel == "fused" and not (fused_ok and dropout_p == 0.0):
        raise ValueError(
            f"kernel='fused' needs CPU tensors of dtype float32/float64/bfloat16/float16, Dv == D, "
            f"dropout_p=0 and a torch with aten._scaled_dot_product_flash_attention_for_cpu; got device "
            f"{q.device}, dtype {q.dtype}, D={q.shape[-1]}, Dv={v.shape[-1]}, dropout_p={dropout_p}"
        )
    if kernel not in ("fused", "math"):
        raise ValueError(f"kernel must be 'auto', 'fused' or 'math', got {kernel!r}")
    return kernel


# --- planning ------------------------------------------------------------------------------------
def make_plan(
    mask: Mask | None,
    q: Tensor,
    k: Tensor,
    *,
    q_offset: int,
    block_q: int,
    block_k: int,
    budget: int | None = None,
) -> Plan:
    """Group the query blocks by the range of key tiles they must attend.

    Consecutive blocks join one group, all with the group's widest range, as long as that computes
    at most ``SLACK`` times their own ranges' tiles and the group's rows x keys stay within ``budget``:
    fewer, larger calls, at the price of a few extra (masked) tiles when the ranges grow (causal). The
    default ``budget`` is ``GROUP_ELEMENTS // (B * Hkv)``, so that a group's temporaries do not grow with
    the batch or the heads, whichever kernel runs it.
    """
    if budget is None:
        budget = GROUP_ELEMENTS // max(1, q.shape[0] * k.shape[1])  # max: B = 0 divides nothing
    q_len, k_len = q.shape[2], k.shape[2]
    nq, nk = -(-q_len // block_q), -(-k_len // block_k)
    if mask is None:
        live = torch.ones(nq, nk, dtype=torch.bool)
        full = live.clone()
    else:
        kinds = mask.block_map(q_len, k_len, block_q, block_k, q_offset=q_offset, device="cpu")
        live = (kinds != EMPTY).flatten(0, 1).any(0)  # (nq, nk): some (b, h) may attend here
        full = (kinds == FULL).flatten(0, 1).all(0)  # (nq, nk): every (b, h) attends all of it
    if k_len % block_k:
        full[:, -1] = False  # the padded keys of a short last tile must be hidden
    cols = torch.arange(nk)
    first = torch.where(live, cols, nk).amin(1).tolist()
    last = torch.where(live, cols, -1).amax(1).tolist()
    full_rows = full.tolist()  # one host copy: a slice and a read per query block cost ~4 calls each
    rows = q.shape[1] // k.shape[1] * block_q
    groups: list[Group] = []
    i = 0
    while i < nq:
        if last[i] < 0:  # nothing to attend: the rows stay zero
            i += 1
            continue
        width, own, stop = last[i] - first[i] + 1, last[i] - first[i] + 1, i + 1
        while stop < nq and last[stop] >= 0:
            grown = max(width, last[stop] - first[stop] + 1)
            tiles = (stop + 1 - i) * grown
            if tiles > SLACK * (own + last[stop] - first[stop] + 1) or tiles * rows * block_k > budget:
                break
            if not _evenly_spaced([min(first[j], nk - grown) for j in range(i, stop + 1)]) and _evenly_spaced(
                [min(first[j], nk - width) for j in range(i, stop)]
            ):
                break  # keep the key windows a strided view rather than a gathered copy
            width, own, stop = grown, own + last[stop] - first[stop] + 1, stop + 1
        starts = tuple(min(first[j], nk - width) for j in range(i, stop))
        masked = any(not all(full_rows[j][s : s + width]) for j, s in zip(range(i, stop), starts, strict=True))
        groups.append(Group(i, stop, starts, width, masked))
        i = stop
    return Plan(mask, q_len, k_len, q_offset, block_q, block_k, tuple(groups))


# --- layouts -------------------------------------------------------------------------------------
def _rows_layout(x: Tensor, kv_heads: int, block: int, padded: int) -> Tensor:
    """(B, H, Lq, D) -> (B', nq, R, D): each kv head's query heads side by side per query block."""
    batch, heads, length, dim = x.shape
    if padded != length:
        x = torch.nn.functional.pad(x, (0, 0, 0, padded - length))  # (B, H, padded, D)
    x = x.view(batch, kv_heads, heads // kv_heads, padded // block, block, dim)
    # contiguous: reshape may return a view whose head dim has a stride other than 1 (x[..., ::2]), which the
    # fused kernel reads as if it were 1
    return x.transpose(2, 3).reshape(batch * kv_heads, padded // block, -1, dim).contiguous()  # (B', nq, R, D)


def _unrows_layout(x: Tensor, batch: int, heads: int, block: int, length: int) -> Tensor:
    """Inverse of :func:`_rows_layout`: (B', nq, R, D) -> (B, H, Lq, D)."""
    kv_heads = x.shape[0] // batch
    nq, dim = x.shape[1], x.shape[-1]
    x = x.view(batch, kv_heads, nq, heads // kv_heads, block, dim).transpose(2, 3)
    return x.reshape(batch, heads, nq * block, dim)[:, :, :length]  # (B, H, Lq, D)


def _pad_keys(x: Tensor, padded: int) -> Tensor:
    """(B, Hkv, Lk, D) -> contiguous (B, Hkv, Lk', D), zero keys appended up to a whole tile."""
    length = x.shape[2]
    return x.contiguous() if padded == length else torch.nn.functional.pad(x, (0, 0, 0, padded - length))


def _key_index(plan: Plan, group: Group, device: torch.device) -> Tensor:
    """(g, W) key positions of each block of the group."""
    starts = torch.tensor(group.starts, device=device).view(-1, 1) * plan.block_k
    return starts + torch.arange(group.width * plan.block_k, device=device)  # (g, W)


def _evenly_spaced(starts: list[int] | tuple[int, ...]) -> bool:
    """Non-decreasing by a constant step (as_strided takes no negative strides)."""
    if len(starts) < 2:
        return True
    step = starts[1] - starts[0]
    return step >= 0 and all(b - a == step for a, b in pairwise(starts))


def _step(group: Group) -> int | None:
    """The distance, in key tiles, between consecutive blocks' ranges if it is constant, else None."""
    starts = group.starts
    if not _evenly_spaced(starts):
        return None
    return starts[1] - starts[0] if len(starts) > 1 else 0


def _gather_keys(x: Tensor, plan: Plan, group: Group, index: Tensor) -> Tensor:
    """(B, Hkv, Lk', D) contiguous -> (B', g, W, D); a strided view (no copy) of overlapping windows
    when the ranges are evenly spaced, as they are for band masks."""
    batch, kv_heads, length, dim = x.shape
    step = _step(group)
    if step is None:
        return x[:, :, index].reshape(batch * kv_heads, *index.shape, dim)  # (B', g, W, D)
    size = (batch * kv_heads, len(group.starts), index.shape[1], dim)
    stride = (length * dim, step * plan.block_k * dim, dim, 1)
    return x.as_strided(size, stride, x.storage_offset() + group.starts[0] * plan.block_k * dim)


def _scatter_keys(grad: Tensor, part: Tensor, plan: Plan, group: Group, index: Tensor) -> None:
    """Add a group's (B', g, W, D) key gradient into the (B, Hkv, Lk', D) gradient."""
    batch, kv_heads, length, dim = grad.shape
    step = _step(group)
    if step == 0:  # every block of the group read the same keys
        lo = group.starts[0] * plan.block_k
        grad[:, :, lo : lo + part.shape[2]] += part.sum(1).view(batch, kv_heads, -1, dim)
    elif step is not None:  # evenly spaced windows: one strided add per key tile of the window
        tiles = grad.view(batch, kv_heads, length // plan.block_k, plan.block_k, dim)
        part = part.view(batch, kv_heads, len(group.starts), group.width, plan.block_k, dim)
        span = (len(group.starts) - 1) * step + 1
        for t in range(group.width):
            first = group.starts[0] + t
            tiles[:, :, first : first + span : step] += part[:, :, :, t]
    else:
        grad.index_add_(2, index.flatten(), part.reshape(batch, kv_heads, -1, dim))


def _allowed(plan: Plan, group: Group, index: Tensor, batch: int, heads: int, kv_heads: int) -> Tensor | None:
    """The element mask of a group in the kernel layout, (B' or 1, g, R, W) bool; None if all allowed."""
    if not group.masked:
        return None
    if _shared_mask(plan, group):  # every block sees the same pattern: build the first block's only
        first = Group(group.first, group.first + 1, group.starts[:1], group.width, True)
        return _allowed(plan, first, index[:1], batch, heads, kv_heads)  # (1, 1, R, W)
    device = index.device
    rows = torch.arange(group.first * plan.block_q, group.stop * plan.block_q, device=device)
    qpos = (plan.q_offset + rows.clamp(max=plan.q_len - 1)).view(1, 1, -1, plan.block_q, 1)  # (1, 1, g, bq, 1)
    kpos = index.clamp(max=plan.k_len - 1).view(1, 1, *index.shape[:1], 1, -1)  # (1, 1, g, 1, W)
    ok = (index < plan.k_len).view_as(kpos)
    if plan.mask is not None:
        b = torch.arange(plan.mask.batch, device=device).view(-1, 1, 1, 1, 1)
        h = torch.arange(plan.mask.heads, device=device).view(1, -1, 1, 1, 1)
        allows = plan.mask.allows(b, h, qpos, kpos)
        ok = allows & ok if plan.padded_k != plan.k_len else allows
    mb = plan.mask.batch if plan.mask is not None else 1
    mh = plan.mask.heads if plan.mask is not None else 1
    g, bq, width = group.stop - group.first, plan.block_q, index.shape[1]
    ok = torch.broadcast_to(ok, (mb, mh, g, bq, width))
    if mh > 1:  # per-head mask: put each kv head's query heads side by side, like the rows of q
        ok = ok.view(mb, kv_heads, heads // kv_heads, g, bq, width).transpose(2, 3)
    else:
        ok = ok.unsqueeze(3).expand(mb, 1, g, heads // kv_heads, bq, width)
    ok = ok.reshape(mb, ok.shape[1], g, -1, width)  # (mb, Hkv or 1, g, R, W)
    if mb == 1 and ok.shape[1] == 1:
        return ok[0]  # (1, g, R, W): broadcast over B'
    return ok.expand(batch, kv_heads, *ok.shape[2:]).reshape(batch * kv_heads, g, -1, width)


def _shared_mask(plan: Plan, group: Group) -> bool:
    """Whether all blocks of the group have the same element mask: a mask of ``q - k`` only, blocks at
    the same distance from their key windows, and no padded key inside any window."""
    step = _step(group)
    if len(group.starts) < 2 or step is None or step * plan.block_k != plan.block_q:
        return False
    if (group.starts[-1] + group.width) * plan.block_k > plan.k_len:
        return False
    return plan.mask is None or plan.mask.relative


# --- kernels: one group, laid out as (B', g, R, D) queries against (B', g, W, D) keys -------------
def _bias(allowed: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The additive mask the fused kernel takes: 0 where allowed, -inf elsewhere."""
    if allowed is None:
        return None
    return torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), -torch.inf, dtype=dtype))


def _fused_forward(q, k, v, allowed, scale, dropout_p, seed):
    return _FUSED_FORWARD(q, k, v, attn_mask=_bias(allowed, q.dtype), scale=scale)


def _fused_backward(grad, q, k, v, out, lse, allowed, scale, dropout_p, seed):
    return _FUSED_BACKWARD(grad, q, k, v, out, lse, 0.0, False, attn_mask=_bias(allowed, q.dtype), scale=scale)


def _keep(shape, dropout_p: float, seed: int, device: torch.device) -> Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= dropout_p


def _math_probs(q, k, allowed, scale, lse=None):
    """exp(scores - lse) in float32 or wider; computes lse (+inf on rows with nothing allowed) if not given."""
    wide = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(wide) @ k.to(wide).transpose(-1, -2)) * scale  # (B', g, R, W)
    if allowed is not None:
        scores.masked_fill_(~allowed, -torch.inf)
    if lse is None:
        top = scores.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, 0.0)
        total = torch.exp(scores - top).sum(-1, keepdim=True)
        lse = torch.where(total > 0, top + torch.log(total), torch.inf).squeeze(-1)  # (B', g, R)
    return torch.exp(scores - lse.unsqueeze(-1)), lse


def _math_forward(q, k, v, allowed, scale, dropout_p, seed):
    probs, lse = _math_probs(q, k, allowed, scale)
    if dropout_p > 0.0:
        probs = probs * _keep(probs.shape, dropout_p, seed, q.device) / (1.0 - dropout_p)
    return (probs @ v.to(probs.dtype)).to(q.dtype), lse


def _math_backward(grad, q, k, v, out, lse, allowed, scale, dropout_p, seed):
    wide = torch.promote_types(q.dtype, torch.float32)
    grad, q, k, v, out = (x.to(wide) for x in (grad, q, k, v, out))
    probs, _ = _math_probs(q, k, allowed, scale, lse)  # (B', g, R, W)
    dprobs = grad @ v.transpose(-1, -2)
    if dropout_p > 0.0:
        keep = _keep(probs.shape, dropout_p, seed, q.device) / (1.0 - dropout_p)
        dv = (probs * keep).transpose(-1, -2) @ grad
        dprobs = dprobs * keep
    else:
        dv = probs.transpose(-1, -2) @ grad
    delta = (grad * out).sum(-1, keepdim=True)  # sum_j p_ij dp_ij, including dropout
    dscores = probs * (dprobs - delta) * scale
    return dscores @ k, dscores.transpose(-1, -2) @ q, dv


def _idle_blocks(plan: Plan) -> list[slice]:
    """The runs of query blocks that belong to no group."""
    idle, start = [], 0
    for group in (*plan.groups, Group(plan.padded_q // plan.block_q, 0, (), 0, False)):
        if group.first > start:
            idle.append(slice(start, group.first))
        start = group.stop
    return idle


def _group_keys(plan: Plan, group: Group, k_pad: Tensor, v_pad: Tensor,
                heads: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """One group's key index, element mask (None when every pair is allowed) and gathered keys and values."""
    batch, kv_heads = k_pad.shape[:2]
    index = _key_index(plan, group, k_pad.device)
    allowed = _allowed(plan, group, index, batch, heads, kv_heads)
    return index, allowed, _gather_keys(k_pad, plan, group, index), _gather_keys(v_pad, plan, group, index)


def _forward_group(plan: Plan, group: Group, kernel, q_rows: Tensor, k_pad: Tensor, v_pad: Tensor,
                   results: tuple[Tensor, Tensor, Tensor | None], heads: int, scale: float, dropout_p: float,
                   seed: int) -> None:
    """Write one group's rows of ``results`` = (out (B', nq, R, Dv), lse (B', nq, R), empty rows or None).

    A function of its own so that the group's temporaries (the kernel's output, the element mask) are
    freed before the next group allocates its own, not held across the loop."""
    out, lse, empty = results
    _, allowed, keys, values = _group_keys(plan, group, k_pad, v_pad, heads)
    rows = slice(group.first, group.stop)
    out[:, rows], lse[:, rows] = kernel(q_rows[:, rows], keys, values, allowed, scale, dropout_p, seed)
    if empty is not None and allowed is not None:
        empty[:, rows] = ~allowed.any(-1)


def _backward_group(plan: Plan, group: Group, kernel, saved: tuple[Tensor, ...], grads: tuple[Tensor, Tensor, Tensor],
                    heads: int, scale: float, dropout_p: float, seed: int) -> None:
    """Add one group's part of ``grads`` = (dq (B', nq, R, D), dk, dv (B, Hkv, Lk', D)).

    ``saved`` is (grad, q, out) in the rows layout with k, v padded, and the rows' lse:
    (grad_rows, q_rows, k_pad, v_pad, out, lse). The kernel's (B', g, W, D) key gradients, three times
    the size of the keys they cover for a band mask, are freed on return, before the next group's."""
    grad_rows, q_rows, k_pad, v_pad, out, lse = saved
    dq, dk, dv = grads
    index, allowed, keys, values = _group_keys(plan, group, k_pad, v_pad, heads)
    rows = slice(group.first, group.stop)
    dq[:, rows], dk_part, dv_part = kernel(grad_rows[:, rows], q_rows[:, rows], keys, values, out[:, rows],
                                           lse[:, rows], allowed, scale, dropout_p, seed)
    _scatter_keys(dk, dk_part.to(dk.dtype), plan, group, index)
    _scatter_keys(dv, dv_part.to(dv.dtype), plan, group, index)


_KERNELS = {"fused": (_fused_forward, _fused_backward), "math": (_math_forward, _math_backward)}


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, scale: float, dropout_p: float, seed: int, kernel: str, want_lse: bool):
        batch, heads = q.shape[:2]
        kv_heads = k.shape[1]
        forward_kernel = _KERNELS[kernel][0]
        q_rows = _rows_layout(q, kv_heads, plan.block_q, plan.padded_q)  # (B', nq, R, D)
        k_pad, v_pad = _pad_keys(k, plan.padded_k), _pad_keys(v, plan.padded_k)  # (B, Hkv, Lk', D)
        out = q_rows.new_empty(*q_rows.shape[:3], v.shape[-1])  # (B', nq, R, Dv)
        lse = q_rows.new_empty(q_rows.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32))
        # Rows that may attend nothing: the kernels leave 0 or +inf in their lse; the caller gets -inf.
        empty = torch.zeros(lse.shape, dtype=torch.bool, device=q.device) if want_lse else None
        for rows in _idle_blocks(plan):  # blocks that may attend nothing: zero output
            out[:, rows], lse[:, rows] = 0.0, 0.0
            if empty is not None:
                empty[:, rows] = True
        for n, group in enumerate(plan.groups):  # one call per group, its temporaries freed on return
            _forward_group(plan, group, forward_kernel, q_rows, k_pad, v_pad, (out, lse, empty), heads,
                           scale, dropout_p, seed + n)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.dropout_p, ctx.seed, ctx.kernel = plan, scale, dropout_p, seed, kernel
        exposed = q.new_empty(0)
        if empty is not None:
            exposed = lse.masked_fill(empty, -torch.inf).unsqueeze(-1)  # (B', nq, R, 1)
            exposed = _unrows_layout(exposed, batch, heads, plan.block_q, plan.q_len).squeeze(-1)  # (B, H, Lq)
        ctx.mark_non_differentiable(exposed)
        return _unrows_layout(out, batch, heads, plan.block_q, plan.q_len), exposed

    @staticmethod
    def backward(ctx, grad, _grad_lse):
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():  # recorded, the math kernel's in-place tile writes gave wrong second derivatives
            dq, dk, dv = _gradients(ctx, grad)
        if create_graph:  # a gradient of these gradients reaches a node that refuses it, as aten's fused kernel does
            dq, dk, dv = _NoSecondDerivative.apply(dq, dk, dv, grad, *ctx.saved_tensors[:3])
        return dq, dk, dv, None, None, None, None, None, None


class _NoSecondDerivative(torch.autograd.Function):
    """``(dq, dk, dv)`` unchanged, tied to the tensors they were computed from; differentiating them raises."""

    @staticmethod
    def forward(ctx, dq, dk, dv, *sources):
        return dq.view_as(dq), dk.view_as(dk), dv.view_as(dv)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("backend 'blocked' has no second derivative (a gradient of its gradients, "
                           "create_graph=True); backend='reference' has one")


def _gradients(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :class:`_BlockedAttention`, recomputed group by group."""
    q, k, v, out, lse = ctx.saved_tensors
    plan: Plan = ctx.plan
    batch, heads = q.shape[:2]
    kv_heads = k.shape[1]
    backward_kernel = _KERNELS[ctx.kernel][1]
    q_rows = _rows_layout(q, kv_heads, plan.block_q, plan.padded_q)
    grad_rows = _rows_layout(grad.contiguous(), kv_heads, plan.block_q, plan.padded_q)  # (B', nq, R, Dv)
    k_pad, v_pad = _pad_keys(k, plan.padded_k), _pad_keys(v, plan.padded_k)
    dq = torch.empty_like(q_rows)
    for rows in _idle_blocks(plan):
        dq[:, rows] = 0.0
    dk, dv = torch.zeros_like(k_pad), torch.zeros_like(v_pad)
    for n, group in enumerate(plan.groups):  # one call per group, its temporaries freed on return
        _backward_group(plan, group, backward_kernel, (grad_rows, q_rows, k_pad, v_pad, out, lse), (dq, dk, dv),
                        heads, ctx.scale, ctx.dropout_p, ctx.seed + n)
    dq = _unrows_layout(dq, batch, heads, plan.block_q, plan.q_len)
    return dq, dk[:, :, : plan.k_len], dv[:, :, : plan.k_len]


def _cost(call: Call, kept: int) -> tuple[int, str]:
    # what the kernels are handed, not ``kept``: each query block computes the whole range of key tiles between its
    # first and last live one (a group its widest range), padded rows and keys included
    batch, heads, q_len, _ = call.q.shape
    if 0 in (batch, heads, q_len, call.k.shape[2]):
        return 0, "skips empty tiles"
    plan = make_plan(call.mask, call.q, call.k, q_offset=call.q_offset, block_q=BLOCK_Q, block_k=BLOCK_K)
    tiles = sum((group.stop - group.first) * group.width for group in plan.groups)
    return batch * heads * tiles * BLOCK_Q * BLOCK_K, "skips empty tiles"


BACKEND = Backend("blocked", attention, refuses=lambda call: None, cost=_cost, returns_lse=True)
