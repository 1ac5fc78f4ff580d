"""linear_cross_entropy against PyTorch's own F.linear + F.cross_entropy (the oracle)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from maskattn.layers.vocab_loss import linear_cross_entropy


def _case(n=13, e=8, v=11, seed=0, ignore=(2, 7)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, e, generator=g, dtype=torch.float64)
    weight = torch.randn(v, e, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[list(i for i in ignore if i < n)] = -100
    return hidden, weight, targets


def _both(hidden, weight, targets, **kwargs):
    """(loss, d hidden, d weight) of ours and of the oracle."""
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            loss = linear_cross_entropy(h, w, targets, **kwargs)
        else:
            red = kwargs.get("reduction", "sum")
            loss = F.cross_entropy(F.linear(h, w).float(), targets.flatten(), reduction=red)
        (loss * 3.0).backward()  # a non-unit incoming gradient
        results.append((loss.detach(), h.grad, w.grad))
    return results


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 20), v=st.integers(2, 17), chunk=st.integers(1, 25), reduction=st.sampled_from(["sum", "mean"]),
       seed=st.integers(0, 1000))
def test_equals_linear_then_cross_entropy(n, v, chunk, reduction, seed):
    hidden, weight, targets = _case(n=n, v=v, seed=seed, ignore=(0,) if n > 1 else ())
    ours, oracle = _both(hidden, weight, targets, reduction=reduction, chunk_rows=chunk)
    for a, b in zip(ours, oracle, strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=2e-5, atol=1e-6)  # the softmax is float32 in both


def test_batched_hidden_and_a_tied_weight():
    torch.manual_seed(0)
    table = torch.nn.Embedding(11, 8)
    ids = torch.randint(0, 11, (3, 5))
    targets = torch.randint(0, 11, (3, 5))
    grads = []
    for fused in (True, False):
        table.zero_grad()
        hidden = table(ids) * 2.0  # (B, L, E): the table is both the input and the projection
        if fused:
            loss = linear_cross_entropy(hidden, table.weight, targets)
        else:
            loss = F.cross_entropy(F.linear(hidden, table.weight).flatten(0, 1), targets.flatten(), reduction="sum")
        loss.backward()
        grads.append((loss.detach(), table.weight.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_autocast_linear():
    hidden, weight, targets = (x.float() if x.is_floating_point() else x for x in _case(n=40, e=16, v=300))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, targets, chunk_rows=7)
        oracle = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, oracle, rtol=1e-3, atol=0)  # the same bf16 products, summed in another order
    assert not torch.allclose(ours, F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum"), rtol=1e-5)


def test_without_gradients_and_with_nothing_to_predict():
    hidden, weight, targets = _case()
    with torch.no_grad():
        assert linear_cross_entropy(hidden.requires_grad_(), weight, targets, chunk_rows=4).grad_fn is None
    nothing = torch.full_like(targets, -100)
    assert linear_cross_entropy(hidden.detach(), weight, nothing).item() == 0.0
    assert torch.isnan(linear_cross_entropy(hidden.detach(), weight, nothing, reduction="mean"))
    assert torch.isnan(F.cross_entropy(F.linear(hidden.detach(), weight), nothing, reduction="mean"))  # PyTorch's too


def test_refusals_name_the_argument():
    hidden, weight, targets = _case()
    cases = [({"reduction": "none"}, "reduction must be 'sum' or 'mean'"),
             ({"chunk_rows": 0}, "chunk_rows must be a positive int, got 0")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            linear_cross_entropy(hidden, weight, targets, **kwargs)
    with pytest.raises(ValueError, match=r"must share E; got hidden \(13, 8\), weight \(11, 9\)"):
        linear_cross_entropy(hidden, torch.randn(11, 9, dtype=torch.float64), targets)
    with pytest.raises(ValueError, match=r"targets must be int64 of shape \(13,\).*torch.int32 \(13,\)"):
        linear_cross_entropy(hidden, weight, targets.int())
    with pytest.raises(ValueError, match=r"targets must be int64 of shape \(13,\).*\(1, 13\)"):
        linear_cross_entropy(hidden, weight, targets.view(1, -1))
