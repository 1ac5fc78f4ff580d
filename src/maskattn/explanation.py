"""``maskattn.explain``: which backend ``auto`` runs for a call, why, and what each would cost.

Costs are counted, not timed: score entries computed (4 * D FLOPs each, forward) and the bytes of
Lq x Lk tensors built. docs/performance.md turns them into time on a machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from maskattn.backends import flex, sdpa
from maskattn.dispatch import _as_mask, _check_inputs, can_run, decide
from maskattn.masks import Mask, structure


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
    _check_inputs(q, k, v)
    mask = _as_mask(mask)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if mask is not None:
        mask.check(lq, lk, q_offset=q_offset, batch=b, heads=h)
    backend, why = decide(q, k, mask, dropout_p=dropout_p, return_weights=return_weights, q_offset=q_offset,
                          generator=generator, return_lse=return_lse)
    dense = b * h * lq * lk
    if mask is None:
        kept, described = dense, "none (full attention)"
    else:
        st = mask.stats(lq, lk, block_q=block, block_k=block, q_offset=q_offset, head_dim=d)
        kept = round(dense * (1 - st.skipped_fraction))
        described = (f"{mask!r}: density {100 * st.density:.2f}%, {st.empty_rows} fully masked row(s), "
                     f"{100 * st.skipped_fraction:.1f}% of the scores in empty {block}x{block} tiles")
    size = q.element_size()

    def work(entries: int, extra: str = "") -> str:
        return f"{4 * d * entries / 1e9:.3f} GFLOP forward ({entries:,} scores){extra}"

    costs: dict[str, str] = {}
    for name in ("reference", "sdpa", "blocked", "flex"):
        if not can_run(name, q, dropout_p=dropout_p, return_weights=return_weights, generator=generator,
                       return_lse=return_lse):
            costs[name] = "cannot run this call" + (" (return_weights)" if return_weights else "") + \
                (" (return_lse)" if return_lse else "") + \
                (" (dropout)" if dropout_p else "") + ("" if name != "flex" or flex.available(q.device, q.dtype, False)
                                                       else " (FlexAttention unavailable here)")
        elif name == "reference":
            costs[name] = work(dense, f", builds {dense * size / 1e6:.1f} MB of weights")
        elif name == "sdpa":
            split = sdpa.segments(mask, lq, lk, q_offset, b) is not None  # one call per document
            cheap = sdpa.cheap_mask(mask, lq, lk, q_offset) or split
            # pure causal: is_causal, the fused kernel skips the blocks above the diagonal
            causal = structure(mask).kinds == ("causal",)
            costs[name] = work(kept if causal or split else dense,
                               "" if cheap else f", needs a {b * lq * lk / 1e6:.1f} MB Lq x Lk mask tensor")
        else:
            costs[name] = work(kept, ", skips empty tiles")
    call = f"q {tuple(q.shape)}, k {tuple(k.shape)}, {q.dtype}, {q.device}, q_offset={q_offset}"
    return Explanation(backend, why, call, described, costs)
