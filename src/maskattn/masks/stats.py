"""What a mask costs, computed from its structure: density, fully masked rows, tiles, skipped work.

Masks whose rows each allow one interval of keys (causal, windows, prefix-LM, length padding, ordered
documents, and their intersections) are counted from the interval bounds, in time linear in Lq; any
other mask from its block map, evaluating only the PARTIAL tiles element by element.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from maskattn.masks.tiles import EMPTY, FULL, PARTIAL, MaskLike


@dataclass(frozen=True)
class MaskStats:
    """What a mask costs on an (Lq, Lk) problem; see :meth:`maskattn.masks.Mask.stats`."""

    q_len: int
    k_len: int
    block_q: int
    block_k: int
    allowed: int  # allowed (batch, head, query, key) entries, over the mask's own B|1 x H|1
    total: int  # all entries
    density: float  # allowed / total
    empty_rows: int  # query rows that may attend nothing (they output zeros)
    tiles_empty: int  # tiles with no allowed entry, from row intervals where the mask has them, else its block map
    tiles_partial: int  # tiles that need an element mask
    tiles_full: int  # tiles computed without a mask
    skipped_fraction: float  # share of all score entries inside EMPTY tiles
    flops_skipped: int  # 4 * head_dim * skipped entries (over the mask's B|1 x H|1): forward FLOPs saved
    head_dim: int = 64  # D that flops_skipped assumes: 2D FLOPs for a score q.k, 2D for adding its weight times v

    def __str__(self) -> str:
        items = max(1, self.total // max(1, self.q_len * self.k_len))  # the mask's (batch, head) entries
        return (f"Lq={self.q_len} Lk={self.k_len}: density {100 * self.density:.2f}% "
                f"({self.allowed:,} of {self.total:,} scores), {self.empty_rows} fully masked row(s)\n"
                f"tiles {self.block_q}x{self.block_k}: {self.tiles_empty:,} empty, {self.tiles_partial:,} partial, "
                f"{self.tiles_full:,} full; a block-sparse backend skips {100 * self.skipped_fraction:.2f}% of the "
                f"scores ({self.flops_skipped / items / 1e9:.3f} GFLOP forward per batch item and head at head dim "
                f"{self.head_dim}: 4 x {self.head_dim} FLOPs a score)")


def mask_stats(mask: MaskLike, q_len: int, k_len: int, *, block_q: int = 128, block_k: int = 128, q_offset: int = 0,
               head_dim: int = 64) -> MaskStats:
    """See :meth:`Mask.stats`."""
    given = block_q, block_k  # reported as given; a tile larger than the call is the whole call (as in block_map)
    block_q, block_k = min(block_q, max(q_len, 1)), min(block_k, max(k_len, 1))
    rows = _rows_from_bounds(mask, q_len, k_len, q_offset)  # (B, H, Lq) allowed keys per row, or None
    exact = k_len + block_k <= 2**53  # key positions and their tile numbers are exact in _tiles_from_bounds' float64
    tiles = _tiles_from_bounds(mask, q_len, k_len, q_offset, block_q, block_k) if rows is not None and exact else None
    if tiles is None:  # FULL tiles count whole, PARTIAL tiles are evaluated element by element
        kinds = mask.block_map(q_len, k_len, block_q, block_k, q_offset=q_offset).cpu()  # (B, H, nq, nk)
        nq, nk = kinds.shape[2:]
        k_sizes = torch.clamp(k_len - torch.arange(nk) * block_k, max=block_k)  # keys per key tile
        q_sizes = torch.clamp(q_len - torch.arange(nq) * block_q, max=block_q)  # rows per query tile
        if rows is None:
            rows = ((kinds == FULL) * k_sizes).sum(-1).repeat_interleave(block_q, dim=-1)[..., :q_len].clone()
            index, counts = _partial_row_counts(mask, kinds, q_len, k_len, block_q, block_k, q_offset)
            rows.view(-1).index_add_(0, index, counts)
        skipped = int(((kinds == EMPTY) * (q_sizes[:, None] * k_sizes[None, :])).sum())
        tiles = (int((kinds == EMPTY).sum()), int((kinds == PARTIAL).sum()), int((kinds == FULL).sum()), skipped)
    n_empty, n_partial, n_full, skipped = tiles
    allowed = int(rows.sum())
    total = mask.batch * mask.heads * q_len * k_len
    return MaskStats(
        q_len=q_len, k_len=k_len, block_q=given[0], block_k=given[1], allowed=allowed, total=total,
        density=allowed / total if total else 0.0, empty_rows=int((rows == 0).sum()),
        tiles_empty=n_empty, tiles_partial=n_partial, tiles_full=n_full,
        skipped_fraction=skipped / total if total else 0.0,
        flops_skipped=4 * head_dim * skipped, head_dim=head_dim,
    )

def _rows_from_bounds(mask: MaskLike, q_len: int, k_len: int, q_offset: int) -> Tensor | None:
    q = torch.arange(q_offset, q_offset + q_len)
    bounds = mask.row_bounds(q, k_len)
    if bounds is None:
        return None
    lo, hi = (torch.as_tensor(x).clamp(0, k_len) for x in bounds)
    counts = (hi - lo).clamp(min=0)
    counts = counts.view((1,) * (3 - counts.dim()) + tuple(counts.shape))
    return counts.expand(mask.batch, mask.heads, q_len)

def _tiles_from_bounds(mask: MaskLike, q_len: int, k_len: int, q_offset: int, block_q: int, block_k: int):
    """(empty, partial, full, skipped entries) from row intervals, or None when a query tile's rows
    do not form one gap-free band (then the block map decides)."""
    q = torch.arange(q_offset, q_offset + q_len)
    lo, hi = (torch.as_tensor(x).clamp(0, k_len) for x in mask.row_bounds(q, k_len))
    lo, hi = torch.broadcast_tensors(lo.view((1,) * (3 - lo.dim()) + tuple(lo.shape)),
                                     hi.view((1,) * (3 - hi.dim()) + tuple(hi.shape)))
    lo = lo.expand(mask.batch, mask.heads, q_len).double()
    hi = hi.expand(mask.batch, mask.heads, q_len).double()
    live = hi > lo
    pad = -q_len % block_q
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    live_lo = torch.nn.functional.pad(torch.where(live, lo, inf), (0, pad), value=float("inf"))
    live_hi = torch.nn.functional.pad(torch.where(live, hi, -inf), (0, pad), value=float("-inf"))
    all_lo = torch.nn.functional.pad(lo, (0, pad), value=float("-inf")).unflatten(-1, (-1, block_q))
    all_hi = torch.nn.functional.pad(torch.where(live, hi, lo), (0, pad), value=float("inf"))
    all_hi = all_hi.unflatten(-1, (-1, block_q))
    live_lo, live_hi = live_lo.unflatten(-1, (-1, block_q)), live_hi.unflatten(-1, (-1, block_q))  # (B, H, nq, bq)
    # gap-free: with lo non-decreasing over the live rows, each row starts before the band so far ends
    seen_lo = torch.cummax(torch.where(live_lo.isinf(), -inf, live_lo), dim=-1).values
    reach = torch.cummax(live_hi, dim=-1).values
    ordered = (live_lo.isinf() | (live_lo >= seen_lo)).all()
    gapless = (live_lo[..., 1:].isinf() | (live_lo[..., 1:] <= reach[..., :-1])).all()
    if not (ordered and gapless):
        return None
    band_lo, band_hi = live_lo.amin(-1), live_hi.amax(-1)  # (B, H, nq): the union of the rows
    nk = -(-k_len // block_k)
    touched = torch.where(band_hi > band_lo, torch.ceil(band_hi / block_k) - torch.floor(band_lo / block_k), 0)
    core_lo, core_hi = all_lo.amax(-1), all_hi.amin(-1)  # the keys every row of the tile sees
    ends = torch.where(core_hi >= k_len, float(nk), torch.floor(core_hi / block_k))  # tiles ending <= core_hi
    full = (ends - torch.ceil(core_lo / block_k)).clamp(min=0)
    full = torch.where(core_hi > core_lo, full, 0)
    q_sizes = torch.clamp(q_len - torch.arange(touched.shape[-1]) * block_q, max=block_q).double()
    k_sizes = torch.clamp(k_len - torch.arange(nk) * block_k, max=block_k).double()
    # skipped entries: rows x (all keys - keys of the touched tiles)
    first = torch.floor(band_lo / block_k).clamp(0, nk).long()
    last = torch.ceil(band_hi / block_k).clamp(0, nk).long()
    k_cum = torch.cat([torch.zeros(1, dtype=torch.long), k_sizes.long().cumsum(0)])  # int64: a float64 sum rounds
    covered = torch.where(band_hi > band_lo, k_cum[last] - k_cum[first], 0)
    skipped = int(((k_len - covered) * q_sizes.long()).sum())
    n_touched, n_full = int(touched.sum()), int(full.sum())
    n_tiles = mask.batch * mask.heads * touched.shape[-1] * nk
    return n_tiles - n_touched, n_touched - n_full, n_full, skipped

def _partial_row_counts(mask: MaskLike, kinds, q_len, k_len, block_q, block_k, q_offset, chunk: int = 256):
    """Flat (B*H*Lq) row indices and allowed-key counts contributed by the PARTIAL tiles."""
    tiles = (kinds == PARTIAL).nonzero()  # (n, 4): b, h, i, j
    dq, dk = torch.arange(block_q), torch.arange(block_k)
    heads = kinds.shape[1]
    indices, counts = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    for start in range(0, tiles.shape[0], chunk):
        b, h, i, j = (tiles[start : start + chunk, n].view(-1, 1, 1) for n in range(4))
        q = i * block_q + dq.view(1, -1, 1)  # (n, bq, 1), call-relative
        k = j * block_k + dk.view(1, 1, -1)  # (n, 1, bk)
        inside = (q < q_len) & (k < k_len)
        allowed = mask.allows(b, h, q.clamp(max=q_len - 1) + q_offset, k.clamp(max=k_len - 1)) & inside
        row = q[..., 0].clamp(max=q_len - 1)  # (n, bq)
        flat = (b[..., 0] * heads + h[..., 0]) * q_len + row
        indices.append(flat[(q[..., 0] < q_len)])
        counts.append(allowed.sum(-1)[(q[..., 0] < q_len)])
    return torch.cat(indices), torch.cat(counts)
