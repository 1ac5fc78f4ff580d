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
