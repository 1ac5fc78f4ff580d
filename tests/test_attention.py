import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import maskattn
from maskattn import masks
from strategies import mask_cases


def test_hand_computed_example():
    # One query, three keys, scale 1: scores are q.k = [1, 0, 1].
    q = torch.tensor([[[[1.0, 0.0]]]])
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]]])
    v = torch.tensor([[[[2.0, 0.0], [100.0, 100.0], [0.0, 4.0]]]])
    out = maskattn.attention(q, k, v, scale=1.0, backend="reference")
    e = math.e
    expected = torch.tensor([2 * e + 100, 100 + 4 * e]) / (2 * e + 1)
    torch.testing.assert_close(out[0, 0, 0], expected)
    # Hiding the middle key leaves weights [1/2, 0, 1/2]: out = [1, 2].
    hidden = masks.from_tensor(torch.tensor([True, False, True]))
    out, weights = maskattn.attention(q, k, v, hidden, scale=1.0, return_weights=True)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([1.0, 2.0]))
    assert weights[0, 0, 0].tolist() == [0.5, 0.0, 0.5]


def _sdpa_oracle(q, k, v, dense, scale):
    """PyTorch's attention, with the rows that have nothing to attend set to zero."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.masked_fill(~dense.any(-1, keepdim=True), 0.0)


@given(mask_cases(max_len=10), st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 1)]), st.data())
def test_reference_equals_sdpa(case, heads, data):
    H, Hkv = heads
    case_heads = case.mask.heads
    if case_heads not in (1, H):
        H, Hkv = case_heads, 1
    B = case.mask.batch if case.mask.batch > 1 else data.draw(st.integers(1, 2))
    D = data.draw(st.sampled_from([1, 4, 8]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q = torch.randn(B, H, case.q_len, D, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, case.k_len, D, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, case.k_len, D, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = data.draw(st.sampled_from([None, 0.3]))

    ours = maskattn.attention(q, k, v, case.mask, scale=scale, q_offset=case.q_offset, backend="reference")
    dense = case.brute_dense()
    dense = dense[:1] if case.mask.batch == 1 else dense
    dense = (dense[:, :1] if case.mask.heads == 1 else dense).expand(B, H, case.q_len, case.k_len)
    theirs = _sdpa_oracle(q, k, v, dense, scale)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)

    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    theirs_grads = torch.autograd.grad(theirs, (q, k, v), grad)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_weights_are_a_masked_softmax():
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    mask = masks.padding([7, 3]) & masks.sliding_window(4)
    _, weights = maskattn.attention(q, k, v, mask, return_weights=True, q_offset=2)
    dense = mask.to_dense(5, 7, q_offset=2).expand_as(weights)
    assert (weights[~dense] == 0).all()
    # item 1 (3 keys) has rows whose window holds no valid key: those rows are all zero
    torch.testing.assert_close(weights.sum(-1), dense.any(-1).float())
    scores = (q @ k.transpose(-1, -2) / 2).masked_fill(~dense, -math.inf)
    expected = torch.softmax(scores, -1).nan_to_num(0.0)  # torch gives NaN on empty rows
    torch.testing.assert_close(weights, expected)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_fully_masked_rows_give_zeros_and_finite_gradients(dropout_p):
    q = torch.randn(2, 2, 4, 8, requires_grad=True)
    k = torch.randn(2, 2, 4, 8, requires_grad=True)
    v = torch.randn(2, 2, 4, 8, requires_grad=True)
    # batch item 1 has no valid key at all; in item 0 the last query sees nothing under ~causal.
    mask = masks.padding([4, 0]) & ~masks.causal()
    out, weights = maskattn.attention(q, k, v, mask, dropout_p=dropout_p, return_weights=True,
                                      generator=torch.Generator().manual_seed(0))
    assert (out[1] == 0).all() and (weights[1] == 0).all()
    assert (out[0, :, 3] == 0).all()
    if dropout_p == 0.0:  # (dropout may drop a row's only key)
        assert (out[0, :, :3] != 0).all()
    out.sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert (q.grad[1] == 0).all() and (q.grad[0, :, 3] == 0).all()
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


def test_dropout_is_seeded_and_unbiased():
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    mask = masks.causal()

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return maskattn.attention(q, k, v, mask, dropout_p=0.5, generator=gen)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    # inverted dropout keeps the expectation: the mean over many draws approaches the clean output
    mean = torch.stack([run(s) for s in range(4000)]).mean(0)
    torch.testing.assert_close(mean, maskattn.attention(q, k, v, mask), atol=0.08, rtol=0)


def article_attention(q, k, v, keep):
    """The seed article's masking: scores multiplied by a 0/1 mask. Hidden keys keep exp(0) > 0."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores * keep, dim=-1) @ v


def ours(q, k, v, keep):
    return maskattn.attention(q, k, v, masks.causal())


@pytest.mark.parametrize("impl,leaks", [(ours, False), (article_attention, True)])
def test_causal_mask_hides_the_future(impl, leaks):
    L = 9
    keep = masks.causal().to_dense(L, L).double()
    q, k, v = (torch.randn(2, 3, L, 8, dtype=torch.float64) for _ in range(3))
    before = impl(q, k, v, keep)
    for t in range(L - 1):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:]) * 5
        after = impl(q2, k2, v2, keep)
        same = torch.equal(after[:, :, : t + 1], before[:, :, : t + 1])
        assert same != leaks, f"t={t}"


def test_q_offset_matches_the_rows_of_a_full_call():
    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    mask = masks.causal() & masks.sliding_window(4) & masks.padding([10, 7])
    whole = maskattn.attention(q, k, v, mask)
    tail = maskattn.attention(q[:, :, 6:], k, v, mask, q_offset=6)
    torch.testing.assert_close(tail, whole[:, :, 6:], rtol=0, atol=1e-6)


def test_grouped_query_heads_read_their_group():
    q, k, v = torch.randn(1, 6, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    out = maskattn.attention(q, k, v, masks.causal())
    for h in range(6):  # query heads 0-2 share kv head 0, heads 3-5 kv head 1
        single = maskattn.attention(q[:, h:h + 1], k[:, h // 3:h // 3 + 1], v[:, h // 3:h // 3 + 1],
                                    masks.causal())
        torch.testing.assert_close(out[:, h:h + 1], single)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_its_dtype(dtype):
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    out = maskattn.attention(q.to(dtype), k.to(dtype), v.to(dtype), masks.causal())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), maskattn.attention(q, k, v, masks.causal()), atol=2e-2, rtol=2e-2)


def test_bool_tensor_mask_is_accepted():
    q = k = v = torch.randn(1, 1, 3, 2)
    dense = torch.tensor([[True, False, False], [True, True, False], [True, True, True]])
    torch.testing.assert_close(maskattn.attention(q, k, v, dense), maskattn.attention(q, k, v, masks.causal()))


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize(
    "args,kwargs,error,words",
    [
        ((_t(2, 3, 4), _t(2, 1, 4, 4), _t(2, 1, 4, 4)), {}, ValueError, r"q must be 4-D .*got shape \(2, 3, 4"),
        ((_t(2, 2, 4, 8), _t(3, 2, 4, 8), _t(3, 2, 4, 8)), {}, ValueError, "batch sizes differ: q has B=2, k has B=3"),
        ((_t(1, 2, 4, 8), _t(1, 2, 4, 6), _t(1, 2, 4, 8)), {}, ValueError, "q has D=8, k has D=6"),
        ((_t(1, 3, 4, 8), _t(1, 2, 4, 8), _t(1, 2, 4, 8)), {}, ValueError, "H=3 must be a multiple of .* Hkv=2"),
        ((_t(1, 2, 4, 8), _t(1, 2, 5, 8), _t(1, 2, 4, 8)), {}, ValueError, "must agree on Hkv and Lk"),
        ((_t(1, 2, 4, 8), _t(1, 2, 4, 8), _t(1, 2, 4, 8, dtype=torch.float64)), {}, TypeError, "share a dtype"),
        ((_t(1, 2, 4, 8, dtype=torch.long),) * 3, {}, TypeError, "floating-point"),
        ((_t(1, 2, 4, 8),) * 3, {"mask": masks.padding([4, 4])}, ValueError, "batch size 2, .* B=1"),
        ((_t(1, 2, 4, 8),) * 3, {"mask": masks.from_tensor(_t(3, 4, 4, dtype=torch.bool))}, ValueError, "3 heads"),
        ((_t(1, 2, 4, 8),) * 3, {"mask": masks.padding(torch.ones(1, 3, dtype=torch.bool))}, ValueError, "Lk=4"),
        ((_t(1, 2, 4, 8),) * 3, {"mask": _t(4, 4)}, TypeError, "bool tensor"),
        ((_t(1, 2, 4, 8),) * 3, {"mask": "causal"}, TypeError, "got str"),
        ((_t(1, 2, 4, 8),) * 3, {"backend": "fast"}, ValueError, "got 'fast'"),
        ((_t(1, 2, 4, 8),) * 3, {"dropout_p": 1.0}, ValueError, "dropout_p"),
        ((_t(1, 2, 4, 8),) * 3, {"q_offset": -2}, ValueError, "q_offset"),
        ((_t(1, 2, 4, 8),) * 3, {"scale": "a"}, TypeError, "scale must be a number .* got str 'a'"),
        ((_t(1, 2, 4, 8),) * 3, {"scale": float("nan")}, ValueError, "scale must be finite, got nan"),
        ((_t(1, 2, 4, 8),) * 3, {"scale": float("inf"), "backend": "blocked"}, ValueError,
         "scale must be finite, got inf"),
        ((_t(1, 2, 4, 8),) * 3, {"dropout_p": 0.1, "generator": 3}, TypeError,
         "generator must be a torch.Generator or None, got int 3"),
        ((_t(1, 2, 4, 8),) * 3, {"dropout_p": 0.1, "generator": 3, "backend": "reference"}, TypeError,
         "generator must be a torch.Generator or None, got int 3"),
        ((_t(2, 4, 5, 0), _t(2, 2, 5, 0), _t(2, 2, 5, 8)), {}, ValueError, r"head dim D >= 1, got q \(2, 4, 5, 0\)"),
    ],
)
def test_bad_inputs_are_named(args, kwargs, error, words):
    with pytest.raises(error, match=words):
        maskattn.attention(*args, **kwargs)


def test_dropout_without_generator_follows_the_global_seed():
    # auto sends it to SDPA's own dropout: reproducible under torch.manual_seed, as the trainer reseeds
    q, k, v = torch.randn(2, 2, 8, 4), torch.randn(2, 2, 8, 4), torch.randn(2, 2, 8, 4)
    mask = masks.causal() & masks.padding([8, 5])
    torch.manual_seed(3)
    a = maskattn.attention(q, k, v, mask, dropout_p=0.5)
    torch.manual_seed(3)
    b = maskattn.attention(q, k, v, mask, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, maskattn.attention(q, k, v, mask))
    assert torch.isfinite(a).all()


def test_a_float_dropout_and_scale_are_checked_without_the_numbers_abc(monkeypatch):
    # the hot path: dropout_p and scale were checked against numbers.Real (an ABC: a Python-level isinstance,
    # twice per call whatever they were, None included); floats now pass without it, other numbers as before
    import numbers
    import types

    import numpy as np

    from maskattn import dispatch

    asked = []

    class Counting(type):
        def __instancecheck__(cls, value):
            asked.append(value)
            return isinstance(value, numbers.Real)

    monkeypatch.setattr(dispatch, "numbers", types.SimpleNamespace(Real=Counting("Real", (), {})))
    q = torch.randn(1, 2, 3, 4)
    with torch.no_grad():
        plain = maskattn.attention(q, q, q, masks.causal())
        scaled = maskattn.attention(q, q, q, masks.causal(), scale=0.5, dropout_p=0.0)
    assert asked == []
    with torch.no_grad():  # the oracle: softmax by hand
        scores = q @ q.transpose(-1, -2)  # (B, H, L, L)
        hidden = torch.ones(3, 3, dtype=torch.bool).triu(1)
        for out, scale in ((plain, 0.5), (scaled, 0.5)):  # D = 4: 1 / sqrt(D) is 0.5 too
            want = torch.softmax((scores * scale).masked_fill(hidden, float("-inf")), -1) @ q
            torch.testing.assert_close(out, want)
        other = maskattn.attention(q, q, q, scale=np.float32(0.5), dropout_p=np.float32(0.0))  # Real, not float
    assert asked == [np.float32(0.0), np.float32(0.5), np.float32(0.5)]
    torch.testing.assert_close(other, torch.softmax(scores * 0.5, -1) @ q)
    for kwargs, error, words in (({"dropout_p": 1.5}, ValueError, r"dropout_p must be a number in \[0, 1\), got 1.5"),
                                 ({"dropout_p": True}, ValueError, "got True"),
                                 ({"scale": True}, TypeError, "scale must be a number .* got bool True"),
                                 ({"scale": float("-inf")}, ValueError, "scale must be finite, got -inf"),
                                 ({"scale": np.float32(0.5), "dropout_p": "0"}, ValueError, "got '0'"),
                                 ({"scale": np.float32("nan")}, ValueError, "scale must be finite, got .*nan")):
        with pytest.raises(error, match=words):
            maskattn.attention(q, q, q, **kwargs)
