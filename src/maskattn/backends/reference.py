"""The reference backend: masked scaled dot-product attention, written to be read.

It is the definition every other backend is tested against, and the source of attention pictures.

Shape legend: B batch, H query heads, Hkv key/value heads (H % Hkv == 0), Lq queries, Lk keys,
D head dim, Dv value head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskattn.backends.registry import Backend, Call
from maskattn.masks import Mask


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
) -> tuple[Tensor, Tensor | None]:
    """softmax(q k^T * scale, masked) @ v, with masked scores at -inf and empty rows at zero.

    The second result is the (B, H, Lq, Lk) weights if ``return_weights``, else the (B, H, Lq)
    log-sum-exp of the allowed scores (-inf on rows that may attend nothing) if ``return_lse``, else None.
    """
    if return_weights and return_lse:
        raise ValueError("return_weights and return_lse cannot both be True: ask for one")
    dtype = q.dtype
    # Low-precision inputs are computed in float32: this is the oracle, not the fast path.
    q, k, v = (x.to(torch.promote_types(dtype, torch.float32)) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, H, Lk, D): query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)  # (B, H, Lk, Dv)

    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if mask is not None:
        allowed = mask.to_dense(q.shape[2], k.shape[2], q_offset=q_offset, device=q.device)
        # Hide scores by setting them to -inf before the softmax. Multiplying scores by the mask
        # (the seed article's bug) leaves exp(0) = 1 on every hidden key, which masks nothing.
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # (B, H, Lq); -inf where nothing is allowed
        # A row with nothing to attend would be softmax(-inf, ..., -inf) = NaN. Give it finite
        # scores, then zero its weights: zero output, and no gradient flows into it.
        empty = ~allowed.any(dim=-1, keepdim=True)  # (B|1, H|1, Lq, 1)
        scores = scores.masked_fill(empty, 0.0)
        weights = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    else:
        lse = torch.logsumexp(scores, dim=-1)  # (B, H, Lq)
        weights = torch.softmax(scores, dim=-1)  # (B, H, Lq, Lk)

    attended = weights
    if dropout_p > 0.0:
        keep = torch.rand(weights.shape, generator=generator, device=q.device) >= dropout_p
        attended = weights * keep / (1.0 - dropout_p)
    out = attended @ v  # (B, H, Lq, Dv)
    if return_lse:
        return out.to(dtype), lse.detach()
    return out.to(dtype), (weights.to(dtype) if return_weights else None)


def _cost(call: Call, kept: int) -> tuple[int, str]:
    return call.scores, f"builds {call.scores * call.q.element_size() / 1e6:.1f} MB of weights"


BACKEND = Backend("reference", attention, refuses=lambda call: None, cost=_cost, returns_weights=True,
                  returns_lse=True)
