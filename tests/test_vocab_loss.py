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
@given(n=st.integers(2, 20), v=st.integers(2, 17), data=st.data(), reduction=st.sampled_from(["sum", "mean"]),
       seed=st.integers(0, 1000))
def test_chunks_equal_linear_then_cross_entropy(n, v, data, reduction, seed):
    chunk = data.draw(st.integers(1, n - 1))  # fewer rows per chunk than rows: the chunked path
    hidden, weight, targets = _case(n=n, v=v, seed=seed, ignore=(0,))
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
            loss = linear_cross_entropy(hidden, table.weight, targets, chunk_rows=4)
        else:
            loss = F.cross_entropy(F.linear(hidden, table.weight).flatten(0, 1), targets.flatten(), reduction="sum")
        loss.backward()
        grads.append((loss.detach(), table.weight.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


# chunk_rows: 7 = five full chunks and a short one (a group of HALF_GROUP = 4 and a short group); 3 = many
# groups; 16 = fewer rows than one group
@pytest.mark.parametrize("chunk_rows", [7, 3, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_autocast_matches_autocast_linear(dtype, chunk_rows):
    hidden, weight, targets = (x.float() if x.is_floating_point() else x for x in _case(n=40, e=16, v=300))
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            if fused:
                loss = linear_cross_entropy(h, w, targets, chunk_rows=chunk_rows)
            else:
                loss = F.cross_entropy(F.linear(h, w).float(), targets, reduction="sum")
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    assert results[0][0].dtype == torch.float32
    for a, b in zip(*results, strict=True):  # the same half-precision products, summed in another order
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
    if dtype == torch.bfloat16:  # autocast did apply: bfloat16 products move the loss from float32's
        full = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
        assert not torch.allclose(results[0][0], full, rtol=1e-5)


def test_float16_gradients_stay_finite_at_a_large_vocabulary():
    # exp(logit - max) summed over 20,000 tokens would overflow float16 if multiplied in unnormalised
    hidden, weight = torch.ones(6, 4), torch.full((20_000, 4), 1.5)
    targets = torch.arange(6)
    h = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        linear_cross_entropy(h, weight, targets, chunk_rows=2).backward()
    assert torch.isfinite(h.grad).all()
    torch.testing.assert_close(h.grad, torch.zeros_like(h.grad), atol=1e-3, rtol=0)  # every logit equal: uniform


def test_without_gradients_and_with_nothing_to_predict():
    hidden, weight, targets = _case()
    with torch.no_grad():
        assert linear_cross_entropy(hidden.requires_grad_(), weight, targets, chunk_rows=4).grad_fn is None
    nothing = torch.full_like(targets, -100)
    for reduction in ("sum", "mean"):
        ours, oracle = _both(hidden.detach(), weight, nothing, reduction=reduction, chunk_rows=4)
        assert ours[0].isnan().item() == oracle[0].isnan().item() == (reduction == "mean")  # PyTorch's NaN too
        for a, b in zip(ours[1:], oracle[1:], strict=True):
            assert torch.equal(a, b) and not a.any()  # zero gradients, not NaN


def test_the_loss_cannot_be_differentiated_twice():
    hidden, weight, targets = _case()
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, targets, chunk_rows=4)
    (grad,) = torch.autograd.grad(loss, h, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|does not require grad"):
        grad.sum().backward()


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
    with pytest.raises(ValueError, match=r"one dtype outside autocast, got torch\.float32 and torch\.float64"):
        linear_cross_entropy(hidden.float(), weight, targets)


@pytest.mark.parametrize("chunk_rows", [None, 2], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_float64_is_computed_in_float64(chunk_rows, reduction):
    """A float64 model's loss was taken in float32 (``.float()`` of its logits): a float32 result 1e-7 off and
    gradients that fail ``gradcheck``. Oracle: ``F.cross_entropy`` of the float64 logits."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=gen)
    targets[3] = -100
    loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_rows=chunk_rows)
    expected = F.cross_entropy(F.linear(hidden, weight), targets, reduction=reduction)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)
    got = torch.autograd.grad(loss, (hidden, weight))
    for g, e in zip(got, torch.autograd.grad(expected, (hidden, weight)), strict=True):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        plain = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_rows=chunk_rows)
    torch.testing.assert_close(plain, expected.detach(), rtol=1e-13, atol=0)
