"""``maskattn.explain``: which backend ``auto`` runs for a call, why, and what each would cost.

Costs are counted, not timed: score entries computed (2 * (D + Dv) FLOPs each, forward: q.k and adding the
weight times v) and the bytes of Lq x Lk tensors built. docs/performance.md turns them into time on a machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from maskattn.backends import REGISTRY, Call
from maskattn.dispatch import check_arguments, check_inputs, decide
from maskattn.masks import Mask, as_mask


@dataclass
class Explanation:
    backend: str  # what backend="auto" runs
    why: str  # the rule that chose it
    call: str  # shapes, dtype, device
    mask: str  # the mask and what it hides
    costs: dict[str, str]  # backend -> its work on this call, or why it cannot run it

    def __str__(self) -> str:
        lines = [f"auto -> {self.backend}: {self.why}", f"call: {self.call}", f"mask: {self.mask}", "alternatives:"]
        lines += [f"  {'*' if name == self.backend else ' '} {name:9} {cost}" for name, cost in self.costs.items()]
        return "\n".join(lines)


def explain(q: Tensor, k: Tensor, v: Tensor, mask: Mask | Tensor | None = None, *, dropout_p: float = 0.0,
            return_weights: bool = False, q_offset: int = 0, block: int = 128,
            generator: torch.Generator | None = None, return_lse: bool = False) -> Explanation:
    """Explain the backend choice of ``maskattn.attention`` for these arguments, without running it."""
    check_inputs(q, k, v)
    mask = as_mask(mask)
    check_arguments(q, k, mask, q_offset=q_offset, dropout_p=dropout_p, return_weights=return_weights,
                    return_lse=return_lse, generator=generator, scale=None)  # what attention would refuse
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int (the tile side), got {block!r}")
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    backend, why = decide(q, k, mask, dropout_p=dropout_p, return_weights=return_weights, q_offset=q_offset,
                          generator=generator, return_lse=return_lse)
    dense = b * h * lq * lk
    if mask is None:
        kept, described = dense, "none (full attention)"
    else:
        st = mask.stats(lq, lk, block_q=block, block_k=block, q_offset=q_offset, head_dim=d)
        kept = round(dense * (1 - st.skipped_fraction))
        empty = st.empty_rows * (b // mask.batch) * (h // mask.heads)  # stats counts the mask's own B|1 x H|1
        described = (f"{mask!r}: density {100 * st.density:.2f}%, {empty} fully masked row(s), "
                     f"{100 * st.skipped_fraction:.1f}% of the scores in empty {block}x{block} tiles")
    costs: dict[str, str] = {}
    request = Call(q, k, mask, q_offset=q_offset, dropout_p=dropout_p, return_weights=return_weights,
                   return_lse=return_lse, generator=generator)
    for name, record in REGISTRY.items():
        refusal = record.refusal(request)
        if refusal is not None:
            costs[name] = f"cannot run this call: {refusal}"
            continue
        entries, note = record.cost(request, kept)
        flops = 2 * (d + dv) * entries  # a score q.k: 2D; adding its weight times v: 2Dv
        costs[name] = f"{flops / 1e9:.3f} GFLOP forward ({entries:,} scores)" + (f", {note}" if note else "")
    call = (f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, {q.dtype}, {q.device}, q_offset={q_offset}; "
            f"{2 * (d + dv)} FLOPs a score (2 x (D={d} + Dv={dv}))")
    return Explanation(backend, why, call, described, costs)
