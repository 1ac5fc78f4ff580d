"""Cheap weights: the log-sum-exp every backend returns, and weights recomputed from it, against the
reference backend's own ``return_weights`` and a brute-force log-sum-exp."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import maskattn
from maskattn import masks
from maskattn.backends import REGISTRY, blocked, flex, reference
from maskattn.models import DecoderLM, DecoderLMConfig, Transformer, TransformerConfig
from maskattn.viz import capture_attention
from strategies import HEADS, attention_inputs, mask_cases

FLEX_ON_CPU = flex.available(torch.device("cpu"), torch.float32, needs_grad=False)
def _brute_lse(q, k, case, scale):
    """log sum_j exp(scale q.k_j) over the allowed keys, from the oracle's dense mask, in float64."""
    group = q.shape[1] // k.shape[1]
    scores = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) * scale
    allowed = case.brute_dense()  # (case.batch, case.heads, Lq, Lk); the mask may broadcast over either
    allowed = allowed[: 1 if case.mask.batch == 1 else None, : 1 if case.mask.heads == 1 else None]
    allowed = allowed.expand(q.shape[0], q.shape[1], -1, -1)
    return torch.logsumexp(scores.masked_fill(~allowed, -torch.inf), -1)  # -inf on empty rows


def _subset(data, size):
    return sorted(data.draw(st.sets(st.integers(0, size - 1), min_size=1, max_size=size)))


@given(mask_cases(max_len=20), st.sampled_from(HEADS), st.data())
def test_blocked_lse_and_recomputed_weights_equal_the_reference(case, heads, data):
    q, k, v = attention_inputs(case, heads, data, grad=False)
    block = data.draw(st.integers(1, 16))
    out, lse = blocked.attention(q, k, v, case.mask, scale=0.4, q_offset=case.q_offset, return_lse=True,
                                 block_q=block, block_k=data.draw(st.integers(1, 16)))
    expected = _brute_lse(q, k, case, 0.4)
    assert lse.shape == expected.shape
    assert torch.equal(torch.isneginf(lse), torch.isneginf(expected)), "empty rows must give -inf"
    torch.testing.assert_close(lse.double().nan_to_num(neginf=0.0), expected.nan_to_num(neginf=0.0),
                               atol=1e-5, rtol=1e-5)
    ref_out, ref_weights = reference.attention(q, k, v, case.mask, scale=0.4, q_offset=case.q_offset,
                                               return_weights=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    heads_chosen, rows = _subset(data, q.shape[1]), _subset(data, q.shape[2])
    weights = maskattn.attention_weights(q, k, lse, case.mask, scale=0.4, q_offset=case.q_offset,
                                         heads=heads_chosen, rows=rows)
    torch.testing.assert_close(weights, ref_weights[:, heads_chosen][:, :, rows], atol=1e-5, rtol=1e-5)


@given(mask_cases(max_len=20), st.sampled_from(HEADS), st.data())
def test_reference_lse_is_the_log_sum_exp_of_the_allowed_scores(case, heads, data):
    q, k, v = attention_inputs(case, heads, data, torch.float64, grad=False)
    _, lse = reference.attention(q, k, v, case.mask, scale=0.7, q_offset=case.q_offset, return_lse=True)
    expected = _brute_lse(q, k, case, 0.7)
    torch.testing.assert_close(lse, expected, atol=1e-12, rtol=1e-12)  # -inf == -inf counts as equal


@pytest.mark.skipif(not FLEX_ON_CPU, reason="FlexAttention does not run on this CPU")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_lse_equals_the_reference():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 70, 8, generator=gen) for _ in range(3))
    mask = masks.causal() & masks.sliding_window(9) & masks.padding(torch.tensor([70, 0]))
    _, ours = flex.attention(q, k, v, mask, scale=0.3, q_offset=5, return_lse=True, compiled=False)
    _, theirs = reference.attention(q, k, v, mask, scale=0.3, q_offset=5, return_lse=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_auto_returns_the_lse_from_a_fast_backend_and_the_same_output():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 700, 16, generator=gen) for _ in range(3))
    mask = masks.causal() & masks.sliding_window(64)
    plain = maskattn.attention(q, k, v, mask)
    out, lse = maskattn.attention(q, k, v, mask, return_lse=True)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)
    assert maskattn.choose_backend(q, k, mask, dropout_p=0.0, return_weights=False, return_lse=True) == "blocked"
    assert lse.shape == (1, 2, 700) and lse.dtype == torch.float32


def test_unsupported_or_contradictory_requests_are_refused_clearly():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="backend 'sdpa' does not return the log-sum-exp"):
        maskattn.attention(q, q, q, backend="sdpa", return_lse=True)
    with pytest.raises(ValueError, match="return_weights and return_lse cannot both be True"):
        maskattn.attention(q, q, q, return_lse=True, return_weights=True)
    lse = torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match=r"lse must be \(B, H, Lq\) = \(1, 2, 8\).*got shape \(2, 8\)"):
        maskattn.attention_weights(q, q, lse[0])
    with pytest.raises(ValueError, match=r"rows must be indices in \[0, 8\), got \[8\]"):
        maskattn.attention_weights(q, q, lse, rows=[8])
    with pytest.raises(ValueError, match=r"heads must be indices in \[0, 2\), got \[-1\]"):
        maskattn.attention_weights(q, q, lse, heads=[-1])


def test_rows_and_heads_are_integer_indices_in_the_order_given():
    q, k = torch.randn(1, 2, 6, 4, dtype=torch.float64), torch.randn(1, 2, 6, 4, dtype=torch.float64)
    _, lse = maskattn.attention(q, k, k, masks.causal(), return_lse=True)
    dense = torch.softmax((q @ k.transpose(-1, -2) / 2).masked_fill(~torch.ones(6, 6).tril().bool(), -torch.inf), -1)
    for rows in ([4, 1], torch.tensor([4, 1]), (i for i in (4, 1))):
        got = maskattn.attention_weights(q, k, lse, masks.causal(), heads=[1], rows=rows)
        torch.testing.assert_close(got, dense[:, 1:2, [4, 1]])
    # a boolean selection would be read as the indices 0 and 1, a float rounded down: neither is an index
    for rows in ([True, False, True, False, False, True], torch.tensor([True] * 6), [1.7], "ab"):
        with pytest.raises(ValueError, match=r"rows must be indices in \[0, 6\), got"):
            maskattn.attention_weights(q, k, lse, rows=rows)
    with pytest.raises(ValueError, match=r"heads must be indices in \[0, 2\), got \[True\]"):
        maskattn.attention_weights(q, k, lse, heads=[True])


def test_cheap_capture_never_runs_the_dense_path_and_equals_it(monkeypatch):
    """At N = 2048 the model runs its fast backends; the chosen rows of one layer's heads equal the
    reference weights, which would be (1, 4, 2048, 2048) per layer."""
    torch.manual_seed(0)
    model = DecoderLM(DecoderLMConfig(vocab_size=50, d_model=32, num_heads=4, num_layers=2, d_ff=64,
                                      max_len=2048)).eval()
    x = torch.randint(0, 50, (1, 2048))
    rows = [0, 1, 1000, 2047]
    with torch.no_grad():
        plain = model(x)
        with capture_attention(model, method="rerun", layers=["*layers.1.*"], heads=[1, 3], rows=rows) as dense:
            model(x)

        def refuse(*args, **kwargs):
            raise AssertionError("the cheap path ran the reference backend")

        monkeypatch.setitem(REGISTRY, "reference", replace(REGISTRY["reference"], fn=refuse))
        with capture_attention(model, layers=["*layers.1.*"], heads=[1, 3], rows=rows) as cheap:
            hooked = model(x)
    assert torch.equal(plain, hooked), "recording must not change the model's outputs"
    (name,) = dense
    assert list(cheap) == [name] and cheap[name][0].shape == (1, 2, 4, 2048)
    torch.testing.assert_close(cheap[name][0], dense[name][0], atol=1e-5, rtol=1e-5)


def test_cheap_capture_works_through_a_kv_cache():
    """Recorded weights of cached decoding steps equal the rows of one full forward."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("tiny", positions="rope")).eval()
    src, tgt = torch.randint(3, 64, (1, 6)), torch.randint(3, 64, (1, 5))
    with torch.no_grad(), capture_attention(model, layers=["decoder.layers.0.self_attn"]) as full:
        model(src, tgt)
    state = model.start(src, max_len=5)
    with torch.no_grad(), capture_attention(model, layers=["decoder.layers.0.self_attn"]) as steps:
        for t in range(5):
            model.step(state, tgt[:, t : t + 1])
    (whole,) = full["decoder.layers.0.self_attn"]
    for t, step in enumerate(steps["decoder.layers.0.self_attn"]):
        torch.testing.assert_close(step[:, :, 0], whole[:, :, t, : t + 1], atol=1e-5, rtol=1e-5)


def test_capture_refuses_unknown_layers_and_methods():
    model = DecoderLM(DecoderLMConfig(vocab_size=20, d_model=16, num_heads=2, num_layers=1, d_ff=32, max_len=8))
    unknown = r"layers=\['nope'\] matches no attention module; the model has \['decoder.layers.0.self_attn'\]"
    with pytest.raises(ValueError, match=unknown), capture_attention(model, layers=["nope"]):
        pass
    with pytest.raises(ValueError, match="method must be 'lse' or 'rerun', got 'dense'"), \
            capture_attention(model, method="dense"):
        pass


def test_attention_weights_refuses_integer_or_mismatched_dtypes_by_name():
    """Integer queries gave integer weights (every weight below 1 truncated to 0) and a float16 q with bfloat16 keys
    was computed without a word, where ``attention`` refuses both."""
    q = torch.randn(1, 2, 3, 4, dtype=torch.float16)
    _, lse = maskattn.attention(q, q, q, return_lse=True)
    exact = maskattn.attention_weights(q.double(), q.double(), lse.double())  # the float64 oracle of the same call
    assert torch.allclose(maskattn.attention_weights(q, q, lse).double(), exact, atol=2e-3)
    with pytest.raises(TypeError, match=r"q and k must share a dtype, got torch.float16 and torch.bfloat16"):
        maskattn.attention_weights(q, q.bfloat16(), lse)
    with pytest.raises(TypeError, match=r"q must be a floating-point tensor, got dtype torch.int64"):
        maskattn.attention_weights(q.long(), q.long(), lse)
    with pytest.raises(TypeError, match=r"lse must be a floating-point tensor, got dtype torch.bool"):
        maskattn.attention_weights(q, q, lse > 0)
