"""Every backend against the reference, on random mask expressions, shapes, offsets and GQA.

Tolerances: float32 forward and gradients within atol = rtol = 1e-5 of the reference. bfloat16 runs
are compared with the float32 reference on the same (rounded) inputs and incoming gradient within
rtol = 3e-2 and atol = 3e-2 times the largest magnitude of the compared tensor: bf16 keeps 8 bits
of mantissa, so each rounding costs up to 2^-9 of the value, and a key's gradient sums the
contributions of every query that sees it, so its error grows with its size, not with each element's.
"""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import maskattn
from maskattn import masks
from maskattn.backends import REGISTRY, blocked, flex, reference, sdpa
from maskattn.dispatch import can_run, choose_backend  # the real rules, even when conftest forces a backend
from strategies import HEADS, mask_cases
from strategies import attention_inputs as _inputs

FLEX_ON_CPU = flex.available(torch.device("cpu"), torch.float32, needs_grad=False)
# the registered backends that can run a training call (with gradients) here, and those other than the oracle
TRAINABLE = [name for name in REGISTRY
             if can_run(name, torch.zeros(1, 1, 1, 1), dropout_p=0.0, return_weights=False, needs_grad=True)]
NOT_REFERENCE = [name for name in TRAINABLE if name != "reference"]


def _close(a, b, tol, **kwargs):
    atol = tol * max(1.0, b.abs().max().item()) if a.dtype == torch.bfloat16 else tol
    torch.testing.assert_close(a.float(), b, atol=atol, rtol=tol, **kwargs)


def _assert_agree(run, q, k, v, case, scale, tol):
    """``run`` and the float32 reference agree in output and in the gradients of q, k, v."""
    ours, _ = run(q, k, v, case.mask, scale=scale, q_offset=case.q_offset)
    wide = [x.detach().float().requires_grad_() for x in (q, k, v)]
    theirs, _ = reference.attention(*wide, case.mask, scale=scale, q_offset=case.q_offset)
    _close(ours, theirs, tol)
    grad = torch.randn_like(theirs).to(ours.dtype).float()  # the same (rounded) incoming gradient
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad.to(ours.dtype))
    theirs_grads = torch.autograd.grad(theirs, wide, grad)
    for name, a, b in zip("qkv", ours_grads, theirs_grads, strict=True):
        assert torch.isfinite(a).all(), name
        _close(a, b, tol, msg=lambda m, name=name: f"d{name}: {m}")


def _self_attention_inputs(heads, length, seed):
    """(2, H, L, 8) queries and (2, Hkv, L, 8) keys and values that require grad."""
    gen = torch.Generator().manual_seed(seed)
    H, Hkv = heads
    q = torch.randn(2, H, length, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, Hkv, length, 8, generator=gen, requires_grad=True) for _ in range(2))
    return q, k, v


def _same_output_and_grads(ours, theirs, inputs, tol=1e-5):
    """Two outputs computed from the same inputs agree, and so do their gradients for one random grad."""
    torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad), strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@given(mask_cases(max_len=20), st.sampled_from(HEADS), st.data())
def test_blocked_equals_reference(case, heads, data):
    q, k, v = _inputs(case, heads, data)
    block_q, block_k = data.draw(st.integers(1, 16)), data.draw(st.integers(1, 16))
    kernel = data.draw(st.sampled_from(["fused", "math"]))

    def run(*args, **kwargs):
        return blocked.attention(*args, **kwargs, block_q=block_q, block_k=block_k, kernel=kernel)

    _assert_agree(run, q, k, v, case, data.draw(st.sampled_from([1.0, 0.3])), 1e-5)


@pytest.mark.parametrize("name", NOT_REFERENCE)  # every registered backend that trains here, as registered
@given(case=mask_cases(max_len=20), heads=st.sampled_from(HEADS), data=st.data())
def test_backend_equals_reference(name, case, heads, data):
    q, k, v = _inputs(case, heads, data)
    _assert_agree(REGISTRY[name].fn, q, k, v, case, data.draw(st.sampled_from([1.0, 0.3])), 1e-5)


@pytest.mark.parametrize("kernel", ["fused", "math"])
@given(case=mask_cases(max_len=40), data=st.data())
def test_blocked_bfloat16_is_close_to_float32(kernel, case, data):
    q, k, v = _inputs(case, (4, 2), data, dtype=torch.bfloat16)

    def run(*args, **kwargs):
        return blocked.attention(*args, **kwargs, block_q=8, block_k=8, kernel=kernel)

    _assert_agree(run, q, k, v, case, 0.5, 3e-2)


@pytest.mark.skipif(not FLEX_ON_CPU, reason="no FlexAttention in this torch")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@given(mask_cases(max_len=20), st.sampled_from(HEADS), st.data())
def test_flex_forward_equals_reference(case, heads, data):
    q, k, v = (x.detach() for x in _inputs(case, heads, data))
    # FlexAttention's eager path: the compiled one recompiles per mask, too slow for 60 examples
    ours, _ = flex.attention(q, k, v, case.mask, scale=0.3, q_offset=case.q_offset, compiled=False)
    theirs, _ = reference.attention(q, k, v, case.mask, scale=0.3, q_offset=case.q_offset)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not FLEX_ON_CPU, reason="no FlexAttention in this torch")
def test_compiled_flex_equals_reference():
    q, k, v = torch.randn(2, 4, 200, 16), torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    mask = masks.causal() & masks.sliding_window(37) & masks.padding([300, 120])
    ours, _ = flex.attention(q, k, v, mask, scale=0.25, q_offset=100)
    theirs, _ = reference.attention(q, k, v, mask, scale=0.25, q_offset=100)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not FLEX_ON_CPU, reason="no FlexAttention in this torch")
@pytest.mark.slow
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_compiled_flex_takes_a_head_dim_of_stride_zero(which):
    # x[..., :1].expand(..., D): PyTorch's compiled CPU kernel read the stride-0 head dim as laid out (off by ~3, NaN)
    gen = torch.Generator().manual_seed(0)
    shapes = {"q": (1, 2, 9, 8), "k": (1, 1, 9, 8), "v": (1, 1, 9, 8)}
    x = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    x[which] = torch.randn(*shapes[which][:-1], 1, generator=gen).expand(shapes[which])
    allowed = torch.ones(9, 9, dtype=torch.bool).tril()  # causal(), written out
    wide = {name: t.double() for name, t in x.items()}
    scores = (wide["q"] @ wide["k"].transpose(-1, -2) * 0.25).masked_fill(~allowed, -torch.inf)
    expected = torch.softmax(scores, dim=-1) @ wide["v"]  # (1, 2, 9, 8): the one kv head serves both query heads
    ours = maskattn.attention(x["q"], x["k"], x["v"], masks.causal(), scale=0.25, backend="flex")
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not FLEX_ON_CPU, reason="no FlexAttention in this torch")
def test_flex_returns_the_log_sum_exp_on_cpu_too():
    # PyTorch's compiled CPU kernel cannot return it; the backend answers from the eager path instead
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    mask = masks.causal() & masks.sliding_window(7)
    out, lse = flex.attention(q, k, v, mask, scale=0.25, return_lse=True)
    ref_out, ref_lse = reference.attention(q, k, v, mask, scale=0.25, return_lse=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_flex_on_cpu_refuses_gradients_clearly():
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    with pytest.raises(ValueError, match=r"backend 'flex'.*use backend='blocked'"):
        flex.attention(q, q, q, masks.causal(), scale=1.0)


@pytest.mark.parametrize("name", [name for name, record in REGISTRY.items() if not record.returns_weights])
def test_weights_only_from_the_reference(name):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"return_weights.*backend='reference'"):
        maskattn.attention(q, q, q, masks.causal(), backend=name, return_weights=True)


@pytest.mark.parametrize("name", TRAINABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_rows_are_zero_with_zero_gradients(name, dtype):
    q, k, v = (torch.randn(2, 4, 9, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    k2, v2 = (x[:, :2].detach().requires_grad_() for x in (k, v))  # GQA
    mask = masks.padding([9, 0]) & ~masks.causal()  # item 1 sees nothing; item 0's last query neither
    out = maskattn.attention(q, k2, v2, mask, backend=name)
    assert (out[1] == 0).all() and (out[0, :, 8] == 0).all() and (out[0, :, :8] != 0).all()
    out.float().square().sum().backward()
    for x in (q, k2, v2):
        assert torch.isfinite(x.grad).all()
    assert (q.grad[1] == 0).all() and (q.grad[0, :, 8] == 0).all()
    assert (k2.grad[1] == 0).all() and (v2.grad[1] == 0).all()


@pytest.mark.parametrize("name", [*NOT_REFERENCE, "auto"])
@pytest.mark.parametrize("scale", [-0.5, 0.0])
@pytest.mark.parametrize("make", [masks.causal, lambda: masks.causal() & masks.sliding_window(4),
                                  lambda: masks.causal() & masks.document(torch.tensor([[0] * 5 + [1] * 7] * 2))],
                         ids=["causal", "band", "documents"])
def test_a_scale_of_zero_or_below_equals_the_reference(name, scale, make):
    # PyTorch's is_causal kernels return NaN there (the hidden scores' -inf times the scale): sdpa and auto did too
    q, k, v = _self_attention_inputs((4, 2), 12, seed=3)
    ours = maskattn.attention(q, k, v, make(), scale=scale, backend=name)
    _same_output_and_grads(ours, maskattn.attention(q, k, v, make(), scale=scale, backend="reference"), (q, k, v))


@pytest.mark.parametrize("name", NOT_REFERENCE)
def test_value_head_dim_may_differ(name):
    q, k, v = torch.randn(2, 4, 20, 8), torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 5)
    mask = masks.causal() & masks.padding([30, 17])
    ours = maskattn.attention(q, k, v, mask, q_offset=10, backend=name)
    torch.testing.assert_close(ours, maskattn.attention(q, k, v, mask, q_offset=10, backend="reference"),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NOT_REFERENCE)
def test_non_contiguous_inputs(name):
    # (B, L, H, D) projections transposed to (B, H, L, D), as a layer produces them
    q, k, v = (torch.randn(2, 19, h, 8, requires_grad=True) for h in (4, 2, 2))
    mask = masks.causal() & masks.sliding_window(5)
    ours = maskattn.attention(*(x.transpose(1, 2) for x in (q, k, v)), mask, backend=name)
    theirs = maskattn.attention(*(x.transpose(1, 2) for x in (q, k, v)), mask, backend="reference")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ours).transpose(2, 3).contiguous().transpose(2, 3)  # a non-contiguous gradient
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(theirs, (q, k, v), grad),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [*NOT_REFERENCE, "auto"])
@pytest.mark.parametrize("q_len", [128, 130])  # 128: whole query tiles, nothing to pad (blocked copies nothing)
def test_head_dim_with_a_stride_equals_a_dense_softmax(name, q_len):
    # every other column of wider tensors: the head dim's stride is 2, not 1
    q, k, v = (torch.randn(1, h, n, 16, dtype=torch.float64)[..., ::2].requires_grad_()
               for h, n in ((2, q_len), (1, 256), (1, 256)))
    allowed = torch.arange(256) < 200  # padding([200]), written out
    ours = maskattn.attention(q, k, v, masks.padding([200]), backend=name)
    scores = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~allowed, -torch.inf)
    theirs = torch.softmax(scores, dim=-1) @ v  # (1, 2, Lq, 8): the one kv head serves both query heads
    torch.testing.assert_close(ours, theirs)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(theirs, (q, k, v), grad),
                    strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kernel", ["fused", "math"])
def test_blocked_second_derivatives_are_right_or_refused(kernel):
    # a Hessian-vector product (create_graph=True, as a gradient penalty takes it) against a dense softmax
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()  # causal(), written out

    def hessian_vector(out):
        grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v), create_graph=True)
        return torch.autograd.grad(sum(g.sum() for g in grads), (q, k, v))

    dense = torch.softmax((q @ k.transpose(-1, -2) / 2).masked_fill(~allowed, -torch.inf), dim=-1) @ v
    expected = hessian_vector(dense)
    out, _ = blocked.attention(q, k, v, masks.causal(), scale=0.5, kernel=kernel)
    try:
        got = hessian_vector(out)
    except RuntimeError as e:  # refused, in words: fine
        assert "backend 'blocked' has no second derivative" in str(e)
    else:
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b)


def test_blocked_dropout_is_reproducible_and_backward_matches_it():
    q, k, v = (torch.randn(1, 4, 11, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = masks.causal() & masks.sliding_window(5)

    def run(q, k, v, seed=3):
        gen = torch.Generator().manual_seed(seed)
        return blocked.attention(q, k, v, mask, scale=0.5, dropout_p=0.4, generator=gen, block_q=4, block_k=3)[0]

    assert torch.equal(run(q, k, v), run(q, k, v))
    assert not torch.equal(run(q, k, v), run(q, k, v, seed=4))
    # with the identity as values, the output is the dropped-out weights themselves: (1, 4, 11, 11)
    eye = torch.eye(11, dtype=torch.float64).expand(1, 4, 11, 11)
    dropped = run(q, k, eye).detach()
    _, clean = reference.attention(q.detach(), k.detach(), v.detach(), mask, scale=0.5, return_weights=True)
    allowed = clean > 0
    kept = allowed & (dropped != 0)
    assert not (dropped[~allowed] != 0).any()  # nothing appears where the mask hides the key
    torch.testing.assert_close(dropped[kept], clean[kept] / 0.6, rtol=1e-12, atol=0)  # inverted dropout
    rate = 1 - kept.sum() / allowed.sum()
    assert 0.25 < rate < 0.55, f"dropped {rate:.2f} of the weights with dropout_p=0.4"
    # the same seed drops the same weights whatever the values: dropout acts on the weights, before @ v
    torch.testing.assert_close(run(q, k, v), dropped @ v, rtol=1e-12, atol=1e-12)
    # the gradient is that of the function with this seed's dropout masks, checked numerically
    assert torch.autograd.gradcheck(run, (q, k, v))


def test_blocked_dropout_is_unbiased():
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    mask = masks.causal()
    clean, _ = blocked.attention(q, k, v, mask, scale=0.5, block_q=2, block_k=2)
    runs = [blocked.attention(q, k, v, mask, scale=0.5, dropout_p=0.5, block_q=2, block_k=2,
                              generator=torch.Generator().manual_seed(s))[0] for s in range(3000)]
    torch.testing.assert_close(torch.stack(runs).mean(0), clean, atol=0.08, rtol=0)


def _computed_tiles(plan):
    return sum((g.stop - g.first) * g.width for g in plan.groups)


def test_blocked_computes_only_the_tiles_the_mask_may_reach():
    q = k = torch.zeros(1, 1, 1024, 8)
    window = blocked.make_plan(masks.causal() & masks.sliding_window(256), q, k, q_offset=0, block_q=128, block_k=128)
    live = 3 * 8 - 3  # the diagonal tile and the two before it
    assert live <= _computed_tiles(window) <= blocked.SLACK * live
    docs = torch.tensor([[0] * 256 + [1] * 768])
    plan = blocked.make_plan(masks.document(docs), q, k, q_offset=0, block_q=128, block_k=128)
    assert _computed_tiles(plan) == 2 * 2 + 6 * 6
    assert not any(g.masked for g in plan.groups)  # whole tiles: no element mask at all
    causal = blocked.make_plan(masks.causal(), q, k, q_offset=0, block_q=64, block_k=64)
    assert 136 <= _computed_tiles(causal) <= blocked.SLACK * 136 and len(causal.groups) < 16  # merged calls
    nothing = blocked.make_plan(masks.padding([0]), q, k, q_offset=0, block_q=128, block_k=128)
    assert nothing.groups == ()


@pytest.mark.parametrize("make", [lambda ids: None, lambda ids: masks.padding([ids.shape[1]]),
                                  lambda ids: masks.causal() & masks.sliding_window(256),
                                  lambda ids: masks.document(ids), lambda ids: masks.causal() & masks.document(ids)],
                         ids=["none", "padding", "causal-window", "document", "causal-document"])
def test_blocked_plans_read_the_block_map_once_whatever_the_query_blocks(host_reads, make):
    # make_plan read each query block's "masked" flag with a slice, .all() and bool() (up to one host read per
    # block, 32 at L=4096 without a mask); now one .tolist() of the map. Oracle for the flags: every tile a
    # group computes FULL in the block map (a short last key tile never), by hand from the map's own rows.
    counts = []
    for length in (512, 4096):
        q = torch.zeros(1, 2, length, 4)
        ids = (torch.arange(length) // 300)[None]  # documents that straddle the 128-wide tiles
        mask = make(ids)
        with host_reads() as reads:
            plan = blocked.make_plan(mask, q, q, q_offset=0, block_q=128, block_k=128)
        counts.append(reads.count)
        nq = length // 128
        full = torch.ones(nq, nq, dtype=torch.bool) if mask is None else \
            (mask.block_map(length, length, 128, 128) == 2).flatten(0, 1).all(0)  # (nq, nk) FULL for every (b, h)
        for g in plan.groups:
            rows = zip(range(g.first, g.stop), g.starts, strict=True)
            assert g.masked == any(not full[j, s : s + g.width].all() for j, s in rows), (length, g)
    assert counts == [3, 3], counts  # the first and last live tile of every query block, and the FULL tiles
    q, k, v = torch.randn(3, 1, 2, 1024, 8).unbind(0)
    ids = (torch.arange(1024) // 300)[None]
    if make(ids) is not None:  # the numbers, against the reference backend
        ours, _ = blocked.attention(q, k, v, make(ids), scale=0.5)
        theirs, _ = reference.attention(q, k, v, make(ids), scale=0.5)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_blocked_key_ranges_that_move_backwards():
    # later query blocks attend earlier keys: the group's key windows cannot be a strided view
    t = torch.zeros(13, 4, dtype=torch.bool)
    t[5:9, 3], t[9:13, 0] = True, True
    mask = masks.from_tensor(t)
    q, k, v = (torch.randn(1, 1, n, 4, requires_grad=True) for n in (8, 4, 4))
    ours, _ = blocked.attention(q, k, v, mask, scale=1.0, q_offset=5, block_q=1, block_k=1)
    theirs, _ = reference.attention(q, k, v, mask, scale=1.0, q_offset=5)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours.sum(), (q, k, v)), torch.autograd.grad(theirs.sum(), (q, k, v)),
                    strict=True):
        torch.testing.assert_close(a, b)


def test_blocked_rejects_bad_arguments():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="block_q must be a positive int, got 0"):
        blocked.attention(q, q, q, None, scale=1.0, block_q=0)
    with pytest.raises(ValueError, match="kernel must be 'auto', 'fused' or 'math', got 'x'"):
        blocked.attention(q, q, q, None, scale=1.0, kernel="x")
    with pytest.raises(ValueError, match=r"kernel='fused' needs .*dropout_p=0"):
        blocked.attention(q, q, q, None, scale=1.0, kernel="fused", dropout_p=0.1)


def test_sdpa_reads_no_mask_value_off_the_cpu():
    # the dense-mask path read empty.any() back to pick its SDPA call: a wait for a GPU per attention call (per layer
    # and decoded token). A meta tensor stands in for a GPU's: reading any of its values raises.
    q, k = torch.randn(2, 4, 3, 8, device="meta"), torch.randn(2, 2, 5, 8, device="meta")
    for allowed in (torch.ones(2, 1, 5, 5, dtype=torch.bool), torch.ones(1, 4, 5, 5, dtype=torch.bool)):
        mask = masks.from_tensor(allowed.to("meta"))
        assert sdpa.attention(q, k, k, mask, scale=0.3, q_offset=2)[0].shape == (2, 4, 3, 8)


@given(mask_cases(), st.sampled_from(HEADS), st.data())
def test_sdpa_path_off_the_cpu_equals_the_plain_call_bit_for_bit(case, heads, data):
    """What a GPU runs for a dense mask (the path taken when a row may be empty: every row let attend, the empty
    ones zeroed after) against the plain call CPU makes where no row is empty: the same bits, forward and backward."""
    q, k, v = _inputs(case, heads, data)
    # (a compiled graph takes that path too, but calls no per-document SDPA either: cases without documents to split)
    assume(sdpa.segments(case.mask, case.q_len, case.k_len, case.q_offset, q.shape[0]) is None)
    args = {"scale": 0.3, "q_offset": case.q_offset}
    plain, _ = sdpa.attention(q, k, v, case.mask, **args)
    plain_grads = torch.autograd.grad(plain.sum(), (q, k, v))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.compiler, "is_compiling", lambda: True)  # the same path as a compiled graph's
        off_cpu, _ = sdpa.attention(q, k, v, case.mask, **args)
    assert torch.equal(off_cpu, plain)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(off_cpu.sum(), (q, k, v)), plain_grads,
                                                 strict=True))


@given(st.lists(st.integers(1, 9), min_size=1, max_size=5), st.booleans(), st.booleans(), st.sampled_from(HEADS),
       st.integers(0, 2**16))
def test_sdpa_per_document_calls_equal_reference(sizes, causal, per_row, heads, seed):
    """Packed documents: the per-document SDPA path (forced on small sizes) against the reference,
    forward and gradients."""
    n = sum(sizes)
    ids = torch.cat([torch.full((size,), i) for i, size in enumerate(sizes)]).view(1, n)
    if per_row:  # a second row with its own documents: one document for the whole row
        ids = torch.cat([ids, torch.zeros(1, n, dtype=torch.long)])
    mask = masks.document(ids) & masks.causal() if causal else masks.document(ids)
    q, k, v = _self_attention_inputs(heads, n, seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sdpa, "MIN_SPLIT_SCORES", 0)
        assert sdpa.segments(mask, n, n, 0, 2) is not None
        ours, _ = sdpa.attention(q, k, v, mask, scale=0.3)
    theirs, _ = reference.attention(q, k, v, mask, scale=0.3)
    _same_output_and_grads(ours, theirs, (q, k, v))


@given(st.integers(1, 40), st.integers(1, 12), st.sampled_from(HEADS), st.integers(0, 2**16))
def test_sdpa_banded_window_equals_reference(length, window, heads, seed):
    """causal() & sliding_window(W) as chunks of W queries against 2W keys (forced on small sizes)."""
    mask = masks.causal() & masks.sliding_window(window)
    q, k, v = _self_attention_inputs(heads, length, seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sdpa, "MIN_SPLIT_SCORES", 0)
        assert (sdpa.band(mask, length, length, 0) is not None) == (length > window)
        ours, _ = sdpa.attention(q, k, v, mask, scale=0.3)
    theirs, _ = reference.attention(q, k, v, mask, scale=0.3)
    _same_output_and_grads(ours, theirs, (q, k, v))


def test_sdpa_banded_window_takes_outputs_in_the_cuda_layout(monkeypatch):
    """CUDA's fused kernels return (B, L, H, D)-strided outputs; the band path must not assume contiguous ones."""
    fused = torch.nn.functional.scaled_dot_product_attention

    def strided(*args, **kwargs):  # the same values, laid out as the flash kernel lays them out
        out = fused(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", strided)
    monkeypatch.setattr(sdpa, "MIN_SPLIT_SCORES", 0)
    mask = masks.causal() & masks.sliding_window(4)
    q, k, v = _self_attention_inputs((4, 2), 11, 0)  # grouped-query heads, as on the GPU
    assert sdpa.band(mask, 11, 11, 0) is not None
    ours, _ = sdpa.attention(q, k, v, mask, scale=0.3)
    theirs, _ = reference.attention(q, k, v, mask, scale=0.3)
    _same_output_and_grads(ours, theirs, (q, k, v))


def test_sdpa_segments_refuses_what_it_cannot_split(monkeypatch):
    ids = torch.tensor([[0, 0, 1, 1, 0, 0]])
    assert sdpa.segments(masks.document(ids.sort().values), 6, 6, 0, 1) is None  # small: one dense call
    monkeypatch.setattr(sdpa, "MIN_SPLIT_SCORES", 0)  # document 0 occurs twice: its halves attend each other
    assert sdpa.segments(masks.document(ids), 6, 6, 0, 1) is None
    assert sdpa.segments(masks.document(ids.sort().values), 6, 6, 0, 1) is not None
    assert sdpa.segments(masks.document(ids.sort().values), 3, 6, 3, 1) is None  # q_offset: not self-attention
    many = torch.arange(sdpa.MAX_SEGMENTS + 1).view(1, -1)
    assert sdpa.segments(masks.document(many), many.shape[1], many.shape[1], 0, 1) is None


@pytest.mark.parametrize(
    "make,q_len,q_offset,kwargs,expected",
    [
        (lambda n: None, 1024, 0, {}, "sdpa"),
        (lambda n: masks.full(), 1024, 0, {}, "sdpa"),
        (lambda n: masks.causal(), 1024, 0, {}, "sdpa"),
        (lambda n: masks.causal(), 512, 512, {}, "blocked"),  # SDPA's is_causal is top-left aligned
        (lambda n: masks.padding([n, 9]), 1024, 0, {}, "sdpa"),
        (lambda n: masks.causal() & masks.sliding_window(4), 1024, 0, {}, "blocked"),
        # a few contiguous documents: one SDPA call each; many, interleaved, or with another mask: blocked
        (lambda n: masks.document(torch.zeros(2, n, dtype=torch.long)), 1024, 0, {}, "sdpa"),
        (lambda n: masks.causal() & masks.document(torch.arange(n).view(1, n) * 4 // n), 1024, 0, {}, "sdpa"),
        (lambda n: masks.document(torch.arange(n).view(1, n) // 8), 1024, 0, {}, "blocked"),
        (lambda n: masks.document(torch.arange(n).view(1, n) % 2), 1024, 0, {}, "blocked"),
        (lambda n: masks.sliding_window(9) & masks.document(torch.zeros(1, n, dtype=torch.long)), 1024, 0, {},
         "blocked"),
        (lambda n: masks.causal() & masks.document(torch.zeros(1, n, dtype=torch.long)), 512, 512, {}, "blocked"),
        (lambda n: masks.prefix_lm(3), 1024, 0, {}, "blocked"),
        (lambda n: masks.causal() & masks.padding([n, 9]), 1024, 0, {}, "blocked"),
        (lambda n: masks.from_tensor(torch.ones(n, n, dtype=torch.bool)), 1024, 0, {}, "blocked"),
        # small problems: too few tiles to skip, SDPA with the dense mask wins (docs/performance.md)
        (lambda n: masks.causal() & masks.sliding_window(4), 16, 0, {}, "sdpa"),
        (lambda n: masks.causal() & masks.padding([n, 9]), 16, 0, {}, "sdpa"),
        (lambda n: masks.causal(), 4, 12, {}, "sdpa"),
        (lambda n: masks.causal(), 16, 0, {"dropout_p": 0.1, "generator": torch.Generator()}, "blocked"),
        (lambda n: None, 16, 0, {"dropout_p": 0.1, "generator": torch.Generator()}, "blocked"),
        # dropout without a generator: SDPA's own dropout wherever SDPA is the choice
        (lambda n: masks.causal(), 16, 0, {"dropout_p": 0.1}, "sdpa"),
        (lambda n: masks.causal() & masks.padding([n, 9]), 16, 0, {"dropout_p": 0.1}, "sdpa"),
        (lambda n: masks.causal() & masks.sliding_window(4), 1024, 0, {"dropout_p": 0.1}, "blocked"),
        (lambda n: masks.causal(), 16, 0, {"return_weights": True}, "reference"),
    ],
)
def test_auto_choice(make, q_len, q_offset, kwargs, expected):
    n = q_len + q_offset
    q, k = torch.randn(2, 2, q_len, 8), torch.randn(2, 2, n, 8)
    mask = make(n)
    options = {"dropout_p": 0.0, "return_weights": False} | kwargs
    assert choose_backend(q, k, mask, q_offset=q_offset, **options) == expected


@pytest.mark.parametrize("q_len,q_offset", [(40, 0), (37, 3)])  # 37: the last query block is padded
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)])
def test_blocked_shares_one_element_mask_along_a_band(monkeypatch, q_len, q_offset, heads):
    """A window's blocks sit at the same distance from their keys: one element mask serves the whole
    group and key gradients are added tile by tile; both must still equal the reference."""
    shared = []
    original = blocked._shared_mask
    monkeypatch.setattr(blocked, "_shared_mask", lambda plan, group: shared.append(original(plan, group))
                        or shared[-1])
    gen = torch.Generator().manual_seed(q_len)
    H, Hkv = heads
    q = torch.randn(2, H, q_len, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, Hkv, 40, 8, generator=gen, requires_grad=True) for _ in range(2))
    mask = masks.causal() & masks.sliding_window(7)
    ours, _ = blocked.attention(q, k, v, mask, scale=0.3, q_offset=q_offset, block_q=4, block_k=4)
    theirs, _ = reference.attention(q, k, v, mask, scale=0.3, q_offset=q_offset)
    assert any(shared)
    _same_output_and_grads(ours, theirs, (q, k, v))


def test_the_contributing_backend_example_runs_as_written(tmp_path):
    # CONTRIBUTING.md's worked `naive` backend, pasted into backends/naive.py as it says, used torch without
    # importing it: its first masked call was a NameError
    import importlib.util
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"```python\n# src/maskattn/backends/naive\.py\n(.*?)```", text, re.S)
    (tmp_path / "naive.py").write_text(code, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("naive_example", tmp_path / "naive.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.BACKEND.name == "naive"
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    for mask in (None, masks.causal() & masks.padding(torch.tensor([6, 0]))):  # the second: empty rows
        got, _ = module.BACKEND.fn(q, k, v, mask, scale=0.5)
        want, _ = reference.attention(q, k, v, mask, scale=0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["auto", *TRAINABLE])
@pytest.mark.parametrize("q_len,k_len,q_offset", [(4, 4, 1), (6, 6, 3), (1, 5, 3), (2, 5, 2), (4, 4, 0), (1, 5, 4)])
def test_causal_with_an_offset_equals_written_out_softmax(name, q_len, k_len, q_offset):
    # causal() alone with keys ahead of some queries: the shortcuts (is_causal, no mask) hold only when aligned.
    # Random masks rarely draw a lone causal() at these sizes, so the shapes are listed here.
    gen = torch.Generator().manual_seed(q_len * 100 + k_len * 10 + q_offset)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen) for n in (q_len, k_len, k_len))
    hidden = torch.ones(q_len, k_len, dtype=torch.bool).tril(q_offset).logical_not()  # key j > query q_offset + i
    expected = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(hidden, -torch.inf), -1) @ v
    ours = maskattn.attention(q, k, v, masks.causal(), q_offset=q_offset, scale=0.5, backend=name)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
