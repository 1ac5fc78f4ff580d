"""Hypothesis strategies: random mask expressions paired with a brute-force Python oracle.

The oracle evaluates each constructor's *documented definition* one (b, h, i, j) at a time on plain
Python lists, independently of the library's vectorised code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from maskattn import masks

Oracle = Callable[[int, int, int, int], bool]


@dataclass
class MaskCase:
    mask: masks.Mask
    oracle: Oracle  # (b, h, absolute query position i, key position j) -> may attend
    batch: int
    heads: int
    q_len: int
    k_len: int
    q_offset: int

    def brute_dense(self) -> torch.Tensor:
        return torch.tensor(
            [[[[self.oracle(b, h, self.q_offset + i, j) for j in range(self.k_len)]
               for i in range(self.q_len)] for h in range(self.heads)] for b in range(self.batch)]
        )


def _leaf(draw, batch: int, heads: int, span: int, k_len: int):
    kind = draw(st.sampled_from(
        ["full", "causal", "window", "lengths", "valid", "document", "prefix", "prefix_b", "tensor"]
    ))
    if kind == "full":
        return masks.full(), lambda b, h, i, j: True
    if kind == "causal":
        return masks.causal(), lambda b, h, i, j: j <= i
    if kind == "window":
        size = draw(st.integers(1, span + 1))
        return masks.sliding_window(size), lambda b, h, i, j: i - j <= size - 1
    if kind == "lengths":
        lengths = draw(st.lists(st.integers(0, k_len), min_size=batch, max_size=batch))
        return masks.padding(torch.tensor(lengths)), lambda b, h, i, j: j < lengths[b]
    if kind == "valid":
        cols = draw(st.integers(k_len, span + 2))
        valid = draw(st.lists(st.lists(st.booleans(), min_size=cols, max_size=cols),
                              min_size=batch, max_size=batch))
        return masks.padding(torch.tensor(valid)), lambda b, h, i, j: valid[b][j]
    if kind == "document":
        ids = draw(st.lists(st.lists(st.integers(0, 3), min_size=span, max_size=span),
                            min_size=batch, max_size=batch))
        if draw(st.booleans()):
            ids = [sorted(row) for row in ids]  # packed sequences are usually in order
        return masks.document(torch.tensor(ids)), lambda b, h, i, j: ids[b][i] == ids[b][j]
    if kind == "prefix":
        p = draw(st.integers(0, span))
        return masks.prefix_lm(p), lambda b, h, i, j: j <= i or j < p
    if kind == "prefix_b":
        ps = draw(st.lists(st.integers(0, span), min_size=batch, max_size=batch))
        return masks.prefix_lm(torch.tensor(ps)), lambda b, h, i, j: j <= i or j < ps[b]
    # an arbitrary tensor, of random rank, with random broadcast (size-1) axes
    rank = draw(st.integers(1, 4))
    full_shape = [batch, heads, span + draw(st.integers(0, 2)), k_len + draw(st.integers(0, 2))]
    shape = [n if draw(st.booleans()) else 1 for n in full_shape][4 - rank:]
    numel = 1
    for n in shape:
        numel *= n
    flat = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
    t = torch.tensor(flat, dtype=torch.bool).view(shape)
    t4 = t.view([1] * (4 - rank) + shape).tolist()

    def oracle(b, h, i, j, t4=t4):
        row = t4[b if len(t4) > 1 else 0]
        row = row[h if len(row) > 1 else 0]
        row = row[i if len(row) > 1 else 0]
        return row[j if len(row) > 1 else 0]

    return masks.from_tensor(t), oracle


@st.composite
def mask_cases(draw, max_len: int = 12, max_leaves: int = 4) -> MaskCase:
    q_len = draw(st.integers(1, max_len))
    k_len = draw(st.integers(1, max_len))
    q_offset = draw(st.integers(0, 5))
    batch, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    span = max(q_offset + q_len, k_len)

    def build(budget: int):
        if budget <= 1 or draw(st.integers(0, 2)) == 0:
            return _leaf(draw, batch, heads, span, k_len)
        op = draw(st.sampled_from(["and", "or", "not"]))
        if op == "not":
            m, f = build(budget - 1)
            return ~m, lambda b, h, i, j: not f(b, h, i, j)
        (m1, f1), (m2, f2) = build(budget // 2), build(budget - budget // 2)
        if op == "and":
            return m1 & m2, lambda b, h, i, j: f1(b, h, i, j) and f2(b, h, i, j)
        return m1 | m2, lambda b, h, i, j: f1(b, h, i, j) or f2(b, h, i, j)

    mask, oracle = build(max_leaves)
    return MaskCase(mask, oracle, batch, heads, q_len, k_len, q_offset)


HEADS = [(1, 1), (2, 2), (4, 2), (3, 1)]  # (H, Hkv) pairs for attention_inputs


def attention_inputs(case: MaskCase, heads: tuple[int, int], data, dtype=torch.float32, *, grad: bool = True):
    """Random q, k, v for ``case``: (H, Hkv) from ``heads`` unless the mask fixes H; batch and D drawn."""
    H, Hkv = heads
    if case.mask.heads not in (1, H):
        H, Hkv = case.mask.heads, 1
    B = case.mask.batch if case.mask.batch > 1 else data.draw(st.integers(1, 2))
    D = data.draw(st.sampled_from([1, 4, 8]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    shapes = ((B, H, case.q_len, D), (B, Hkv, case.k_len, D), (B, Hkv, case.k_len, D))
    return [torch.randn(shape, generator=gen).to(dtype).requires_grad_(grad) for shape in shapes]
