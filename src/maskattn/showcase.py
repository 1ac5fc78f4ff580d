"""The showcase: every kind of mask, drawn, then masked attention checked against PyTorch's own."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maskattn import masks
from maskattn.dispatch import attention


def showcase_masks(length: int = 8) -> list[tuple[str, masks.Mask]]:
    """The embedded default: one example of each mask kind and of each operator."""
    positions = torch.arange(length)
    doc_ids = ((positions >= length * 3 // 8).long() + (positions >= length * 5 // 8).long())[None]  # 3 documents
    kept = max(1, length * 5 // 8)
    return [
        ("causal", masks.causal()),
        (f"key padding (length {kept})", masks.padding([kept])),
        ("causal sliding window of 3", masks.causal() & masks.sliding_window(3)),
        ("packed documents, causal", masks.document(doc_ids) & masks.causal()),
        ("prefix LM (prefix 3)", masks.prefix_lm(3)),
        ("arbitrary tensor (checkerboard)", masks.from_tensor(
            (torch.arange(length)[:, None] + torch.arange(length)) % 2 == 0)),
        ("causal window of 3 or the first key (attention sink)",
         masks.causal() & (masks.sliding_window(3) | masks.from_tensor(torch.arange(length) == 0))),
        ("negation: ~causal", ~masks.causal()),
    ]


def run(length: int = 8, seed: int = 0) -> float:
    """Print each mask and how reference attention under it agrees with SDPA. Returns the worst error."""
    gen = torch.Generator().manual_seed(seed)
    b, h, d = 1, 2, 16
    q, k, v = (torch.randn(b, h, length, d, generator=gen, dtype=torch.float64) for _ in range(3))
    worst = 0.0
    for title, mask in showcase_masks(length):
        print(f"\n== {title}")
        print(mask.render(length))
        ours = attention(q, k, v, mask, backend="reference")
        dense = mask.to_dense(length, length)
        rows = dense.any(-1, keepdim=True)  # SDPA returns NaN on rows with nothing to attend
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=dense).masked_fill(~rows, 0.0)
        err = (ours - theirs).abs().max().item()
        empty = int((~rows).sum())
        worst = max(worst, err)
        note = f"; {empty} fully masked row(s) give zeros" if empty else ""
        print(f"max |maskattn - torch SDPA| = {err:.2e} (float64){note}")
    print(f"\nall masks: worst disagreement with torch.nn.functional.scaled_dot_product_attention "
          f"= {worst:.2e}")
    return worst
