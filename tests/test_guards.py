"""Inputs every backend must treat alike (maskattn.backends.guards): empty sequences, and non-finite values in
positions the mask hides. Each test iterates the registry, so a new backend is held to the same rules."""

import pytest
import torch

import maskattn
from maskattn import masks
from maskattn.backends import REGISTRY, Call

EMPTY_SHAPES = [(0, 5), (5, 0), (0, 0)]
OPTIONS = {
    "plain": {},
    "lse": {"return_lse": True},
    "dropout": {"dropout_p": 0.25, "generator": "seeded"},
}


def _options(name: str) -> dict:
    opts = dict(OPTIONS[name])
    if opts.get("generator") == "seeded":
        opts["generator"] = torch.Generator().manual_seed(0)
    return opts


def _refusal(backend: str, q, k, mask, opts, needs_grad: bool) -> str | None:
    call = Call(q, k, mask, dropout_p=opts.get("dropout_p", 0.0), return_lse=opts.get("return_lse", False),
                generator=opts.get("generator"), needs_grad=needs_grad)
    return REGISTRY[backend].refusal(call)


@pytest.mark.parametrize("backend", list(REGISTRY))
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: f"Lq{s[0]}-Lk{s[1]}")
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("mask", [None, masks.causal()], ids=["nomask", "causal"])
def test_empty_sequences_give_what_the_reference_gives(backend, shape, option, mask):
    q_len, k_len = shape
    q = torch.randn(2, 4, q_len, 8)
    k, v = torch.randn(2, 2, k_len, 8), torch.randn(2, 2, k_len, 6)
    opts = _options(option)
    needs_grad = _refusal(backend, q, k, mask, opts, needs_grad=True) is None
    if _refusal(backend, q, k, mask, opts, needs_grad=needs_grad) is not None:
        with pytest.raises((ValueError, RuntimeError)), torch.no_grad():  # a clear refusal, as on non-empty inputs
            maskattn.attention(q, k, v, mask, backend=backend, **opts)
        return
    q, k, v = (x.requires_grad_(needs_grad) for x in (q, k, v))
    result = maskattn.attention(q, k, v, mask, backend=backend, **opts)
    out = result[0] if isinstance(result, tuple) else result
    assert out.shape == (2, 4, q_len, 6)
    assert torch.equal(out, torch.zeros_like(out))  # a row with no key to attend is zero
    if opts.get("return_lse"):
        lse = result[1]
        assert lse.shape == (2, 4, q_len)
        assert bool((lse == -torch.inf).all())
    if needs_grad:
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        for g, x in zip(grads, (q, k, v), strict=True):
            assert g is None or (g.shape == x.shape and not g.any())


@pytest.mark.parametrize("backend", ["blocked", "reference", "sdpa"])
def test_multi_head_attention_on_an_empty_sequence(backend):
    from maskattn.layers import MultiHeadAttention

    layer = MultiHeadAttention(16, 4, num_kv_heads=2, backend=backend)
    x = torch.randn(2, 0, 16, requires_grad=True)
    out = layer(x, mask=masks.causal())
    assert out.shape == (2, 0, 16)
    out.sum().backward()
    memory = torch.zeros(2, 0, 16)
    cross = layer(torch.randn(2, 3, 16), memory, memory)  # nothing to attend: the output is out_proj's bias
    torch.testing.assert_close(cross, layer.out_proj.bias.expand(2, 3, 16))


def _interval_and_other_masks():
    lengths = torch.tensor([5, 9])
    valid = torch.arange(9)[None] < torch.tensor([[6], [9]])  # (B, Lk): padding by a valid-key tensor
    dense = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(1)) > 0.5
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1, 1]])
    return {
        "causal": masks.causal(),
        "padding": masks.padding(lengths),
        "valid": masks.padding(valid),
        "window": masks.causal() & masks.sliding_window(3),
        "documents": masks.causal() & masks.document(docs),
        "union": masks.sliding_window(2) | masks.padding(lengths),  # no row intervals: evaluated densely
        "tensor": masks.from_tensor(dense),
    }


NONFINITE_MASKS = _interval_and_other_masks()


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention's eager path: the same contract without compiling a kernel per shape."""
    from maskattn.backends import flex

    if flex._flex is not None:
        monkeypatch.setattr(flex, "_compiled", lambda: flex._flex.flex_attention)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", list(REGISTRY))
@pytest.mark.parametrize("mask_name", list(NONFINITE_MASKS))
@pytest.mark.parametrize("where", ["key", "value"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_hidden_inputs_reach_no_output(backend, mask_name, where, bad, eager_flex):
    """A NaN or inf in a key or value row changes exactly the rows that may attend it (to NaN); every other
    row is bit-identical to the clean call, with gradients unchanged and finite (issue 16 item 10)."""
    mask = NONFINITE_MASKS[mask_name]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=gen)
    k, v = torch.randn(2, 2, 9, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)
    needs_grad = _refusal(backend, q, k, mask, {}, needs_grad=True) is None
    if _refusal(backend, q, k, mask, {}, needs_grad=needs_grad) is not None:
        pytest.skip(f"backend {backend!r} cannot run here")
    spoiled = (k if where == "key" else v).clone()
    spoiled[0, 1, 6, 3] = bad  # batch 0, kv head 1 (query heads 2, 3), key 6
    spoiled[1, 0, 8, 0] = bad  # batch 1, kv head 0 (query heads 0, 1), key 8
    inputs = (k, spoiled) if where == "value" else (spoiled, v)

    def run(k_in, v_in):
        leaves = [x.clone().requires_grad_(needs_grad) for x in (q, k_in, v_in)]
        with torch.set_grad_enabled(needs_grad):
            return maskattn.attention(*leaves, mask, backend=backend), leaves

    clean, clean_leaves = run(k, v)
    out, leaves = run(*inputs)
    allowed = mask.to_dense(9, 9).expand(2, 4, 9, 9)
    seen = torch.zeros(2, 4, 9, dtype=torch.bool)
    seen[0, 2:] = allowed[0, 2:, :, 6]
    seen[1, :2] = allowed[1, :2, :, 8]
    assert bool(out[seen].isnan().all())  # a visible non-finite input still shows
    assert torch.equal(out[~seen], clean[~seen])  # and nothing else moved, bit for bit
    if needs_grad:
        weight = torch.randn(out.shape, generator=gen) * ~seen[..., None]
        grads = torch.autograd.grad((out.nan_to_num() * weight).sum(), leaves)
        clean_grads = torch.autograd.grad((clean * weight).sum(), clean_leaves)
        other = torch.ones(2, 2, 9, 1)  # keys and values other than the spoiled rows
        other[0, 1, 6] = other[1, 0, 8] = 0
        for g, expected, scale in zip(grads, clean_grads, (1, other, other), strict=True):
            assert bool(g.isfinite().all())
            torch.testing.assert_close(g * scale, expected * scale)
        for b, h, j, rows in ((0, 1, 6, seen[0, 2:]), (1, 0, 8, seen[1, :2])):
            if not rows.any():  # no row may attend the spoiled key: its gradients are zero
                assert not grads[1][b, h, j].any() and not grads[2][b, h, j].any()


UNORDERED_DOCS = torch.tensor([[1, 1, 0, 0, 0, 2, 2, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1, 1]])  # row 0: not intervals


@pytest.mark.parametrize(("mask", "dynamics"), [
    (NONFINITE_MASKS["documents"], (False, True)), (masks.causal() & masks.document(UNORDERED_DOCS), (False, True)),
    (NONFINITE_MASKS["valid"], (False,)), (NONFINITE_MASKS["window"], (False,))],
    ids=["ordered-documents", "unordered-documents", "valid", "window"])
def test_the_guard_applies_in_one_compiled_graph(mask, dynamics):
    """Under torch.compile the guard reads no value on the host (one graph, dynamic lengths too) and poisons
    exactly the rows eager does: ordered documents by intervals, unordered ones densely (torch.cond).
    Dynamic shapes (10-20 s of tracing each) for the two document strategies; the others share their paths."""
    import torch._dynamo as dynamo

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=gen)
    k, v = torch.randn(2, 2, 9, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)
    k[0, 1, 6, 3] = float("nan")
    v[1, 0, 4, 0] = float("inf")

    def run(q, k, v):
        return maskattn.attention(q, k, v, mask, backend="reference")

    dynamo.reset()
    explained = dynamo.explain(run)(q, k, v)
    assert (explained.graph_count, explained.break_reasons) == (1, [])
    for dynamic in dynamics:
        dynamo.reset()
        compiled = torch.compile(run, fullgraph=True, backend="aot_eager", dynamic=dynamic)
        torch.testing.assert_close(compiled(q, k, v), run(q, k, v), equal_nan=True, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["blocked", "sdpa"])
def test_an_empty_batch_gives_what_the_reference_gives(backend):
    q, k, v = (torch.randn(0, 2, 300, 8, requires_grad=True) for _ in range(3))
    out = maskattn.attention(q, k, v, masks.causal() & masks.sliding_window(64), backend=backend)
    ref = maskattn.attention(q, k, v, masks.causal() & masks.sliding_window(64), backend="reference")
    assert out.shape == ref.shape == (0, 2, 300, 8)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or g.shape == (0, 2, 300, 8) for g in grads)
