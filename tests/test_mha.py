import re

import pytest
import torch
from torch import nn

import maskattn
from maskattn import MultiHeadAttention, masks
from maskattn.layers import Attend, RotaryEmbedding


def _copy_from_torch(theirs: nn.MultiheadAttention, ours: MultiHeadAttention) -> None:
    E = theirs.embed_dim
    with torch.no_grad():
        if theirs.in_proj_weight is not None:
            wq, wk, wv = theirs.in_proj_weight.split(E)
        else:
            wq, wk, wv = theirs.q_proj_weight, theirs.k_proj_weight, theirs.v_proj_weight
        bq, bk, bv = theirs.in_proj_bias.split(E)
        for proj, w, b in ((ours.q_proj, wq, bq), (ours.k_proj, wk, bk), (ours.v_proj, wv, bv)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        ours.out_proj.weight.copy_(theirs.out_proj.weight)
        ours.out_proj.bias.copy_(theirs.out_proj.bias)


def _pair(E=16, H=4, kdim=None, vdim=None):
    theirs = nn.MultiheadAttention(E, H, batch_first=True, kdim=kdim, vdim=vdim)
    ours = MultiHeadAttention(E, H, kdim=kdim, vdim=vdim)
    _copy_from_torch(theirs, ours)
    return theirs, ours


def _assert_grads_close(a: nn.Module, b: MultiHeadAttention, atol=1e-5):
    E = a.embed_dim
    if a.in_proj_weight is not None:
        torch.testing.assert_close(
            torch.cat([b.q_proj.weight.grad, b.k_proj.weight.grad, b.v_proj.weight.grad]),
            a.in_proj_weight.grad, atol=atol, rtol=1e-4)
    else:
        for name in "qkv":
            torch.testing.assert_close(getattr(b, f"{name}_proj").weight.grad,
                                       getattr(a, f"{name}_proj_weight").grad, atol=atol, rtol=1e-4)
    torch.testing.assert_close(
        torch.cat([b.q_proj.bias.grad, b.k_proj.bias.grad, b.v_proj.bias.grad]), a.in_proj_bias.grad,
        atol=atol, rtol=1e-4)
    torch.testing.assert_close(b.out_proj.weight.grad, a.out_proj.weight.grad, atol=atol, rtol=1e-4)
    assert b.d_model == E


def test_self_attention_with_causal_and_key_padding_matches_torch():
    theirs, ours = _pair()
    B, L = 3, 7
    lengths = torch.tensor([7, 4, 2])
    x = torch.randn(B, L, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    mask = masks.causal() & masks.padding(lengths)
    # torch's convention is the opposite: True = masked
    attn_mask = torch.ones(L, L, dtype=torch.bool).triu(1)
    pad = torch.arange(L)[None] >= lengths[:, None]
    expected, expected_w = theirs(x, x, x, attn_mask=attn_mask, key_padding_mask=pad,
                                  need_weights=True, average_attn_weights=True)
    out, weights = ours(x2, mask=mask, return_weights=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights.mean(1), expected_w, atol=1e-5, rtol=1e-4)

    grad = torch.randn_like(out)
    expected.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-5, rtol=1e-4)
    _assert_grads_close(theirs, ours)


@pytest.mark.parametrize("kdim,vdim", [(None, None), (12, 10)])
def test_cross_attention_with_key_padding_matches_torch(kdim, vdim):
    theirs, ours = _pair(kdim=kdim, vdim=vdim)
    B, Lq, Lk = 2, 5, 6
    query = torch.randn(B, Lq, 16)
    key = torch.randn(B, Lk, kdim or 16)
    value = torch.randn(B, Lk, vdim or 16)
    lengths = torch.tensor([6, 3])
    pad = torch.arange(Lk)[None] >= lengths[:, None]
    expected, expected_w = theirs(query, key, value, key_padding_mask=pad)
    out, weights = ours(query, key, value, mask=masks.padding(lengths), return_weights=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights.mean(1), expected_w, atol=1e-5, rtol=1e-4)
    expected.sum().backward()
    out.sum().backward()
    _assert_grads_close(theirs, ours)


def test_grouped_query_attention_equals_repeated_key_value_heads():
    gqa = MultiHeadAttention(24, 6, num_kv_heads=2)
    mha = MultiHeadAttention(24, 6)
    D = 4
    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(gqa, name), getattr(mha, name)
            # kv head j serves query heads 3j..3j+2: repeat each head's rows 3 times
            dst.weight.copy_(src.weight.view(2, D, 24).repeat_interleave(3, 0).reshape(24, 24))
            dst.bias.copy_(src.bias.view(2, D).repeat_interleave(3, 0).reshape(24))
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(gqa(x, mask=masks.causal()), mha(x, mask=masks.causal()))
    assert gqa.k_proj.out_features == 8


def test_dropout_only_in_training():
    layer = MultiHeadAttention(8, 2, dropout=0.5)
    x = torch.randn(1, 6, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_head_dropout_drops_whole_heads_per_sequence_and_scales_the_rest():
    # oracle: the eval-mode heads (the layer's own Attend output, observed by a hook) gated by hand;
    # every sequence of a training-mode call must equal one of the 2^H gatings, scaled by 1 / (1 - p)
    torch.manual_seed(0)
    p, H, B = 0.5, 2, 64
    layer = MultiHeadAttention(8, H, head_dropout=p)
    x = torch.randn(B, 5, 8)
    heads = []
    handle = layer.attend.register_forward_hook(lambda mod, args, out: heads.append(out))
    layer.eval()
    with torch.no_grad():
        evaluated = layer(x)
    handle.remove()
    per_head = heads[0]  # (B, H, L, D)
    # eval: all heads, unscaled
    torch.testing.assert_close(evaluated, layer.out_proj(per_head.transpose(1, 2).reshape(B, 5, 8)))
    candidates = []
    for gate in ([0, 0], [0, 1], [1, 0], [1, 1]):
        g = torch.tensor(gate, dtype=torch.float32).view(1, H, 1, 1) / (1 - p)
        candidates.append(layer.out_proj((per_head * g).transpose(1, 2).reshape(B, 5, 8)))
    layer.train()
    with torch.no_grad():
        out = layer(x)
    seen = set()
    for b in range(B):
        hits = [i for i, c in enumerate(candidates) if torch.allclose(out[b], c[b], atol=1e-6)]
        assert hits, f"sequence {b} is no gating of its heads"
        seen.add(hits[0])
    assert seen == {0, 1, 2, 3}  # 64 sequences at p = 0.5: every gating occurs


def test_head_dropout_under_grouped_query_attention_drops_whole_groups():
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 4, num_kv_heads=2, head_dropout=0.5).train()  # groups {0, 1} and {2, 3}
    kept = []
    layer.out_proj.register_forward_pre_hook(lambda mod, args: kept.append(args[0].view(64, 3, 4, 4).abs().sum(-1)))
    with torch.no_grad():
        layer(torch.randn(64, 3, 16))
    alive = kept[0][:, 0] > 0  # (B, H): which heads reached the output projection
    assert torch.equal(alive[:, 0], alive[:, 1]) and torch.equal(alive[:, 2], alive[:, 3])
    assert 0 < alive.float().mean() < 1


def test_head_dropout_reaches_every_attention_of_a_transformer_and_pruning_turns_it_off():
    from maskattn import compression

    model = maskattn.Transformer(maskattn.TransformerConfig.preset("tiny", head_dropout=0.3))
    attns = compression.attention_modules(model)
    assert attns and all(a.head_dropout == 0.3 for a in attns.values())
    compression.prune(model, {name: [0, 1] for name in attns})
    assert all(a.head_dropout == 0.0 for a in attns.values()) and model.config.head_dropout == 0.0

@pytest.mark.parametrize(
    "make,words",
    [
        (lambda: MultiHeadAttention(10, 4), r"d_model \(10\) must be divisible by num_heads \(4\)"),
        (lambda: MultiHeadAttention(12, 6, num_kv_heads=4), r"num_heads \(6\) must be divisible by num_kv_heads \(4\)"),
        (lambda: MultiHeadAttention(8, 0), "num_heads must be a positive int"),
        (lambda: MultiHeadAttention(8, 2, dropout=1.5), "dropout"),
        (lambda: MultiHeadAttention(8, 2, head_dropout=1.0), r"head_dropout must be a number in \[0, 1\), got 1.0"),
        (lambda: MultiHeadAttention(8, 2, dropout="0.1"), r"dropout must be a number in \[0, 1\), got '0.1'"),
        (lambda: MultiHeadAttention(True, 1), "d_model must be a positive int, got True"),
        (lambda: MultiHeadAttention(8, 2, backend="sdpaa"), r"backend must be 'auto' or one of \[.*got 'sdpaa'"),
    ],
)
def test_bad_config(make, words):
    with pytest.raises(ValueError, match=words):
        make()


@pytest.mark.parametrize("name", ["kdim", "vdim"])
@pytest.mark.parametrize("value", [0, True, 4.0, -1, "4"])
def test_key_and_value_widths_are_positive_ints(name, value):
    # kdim=0 was read as "not given" (a d_model-wide projection), kdim=True as a width of 1; -1 and 4.0 failed
    # inside nn.Linear without naming the argument
    with pytest.raises(ValueError, match=rf"{name} must be a positive int, got {re.escape(repr(value))}"):
        MultiHeadAttention(8, 2, **{name: value})
    assert MultiHeadAttention(8, 2, **{name: 3}).k_proj.in_features == (3 if name == "kdim" else 8)


@pytest.mark.parametrize("value", ["no", "false", 0, 1, None])
def test_bias_is_true_or_false(value):
    # bias="no" built the four biases (a non-empty string is truthy), as the model configs once did
    with pytest.raises(ValueError, match=rf"bias must be True or False, got {re.escape(repr(value))}"):
        MultiHeadAttention(8, 2, bias=value)


def test_bad_inputs():
    layer = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"query must be \(B, L, 8\) batch-first, got \(4, 8\)"):
        layer(torch.randn(4, 8))
    with pytest.raises(ValueError, match="batch sizes differ"):
        layer(torch.randn(2, 4, 8), torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match="key and value lengths differ"):
        layer(torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="B=2"):
        layer(torch.randn(2, 4, 8), mask=masks.padding([4, 4, 4]))


def test_projected_kv_must_have_this_layers_heads():
    # kv projected by a layer of 2 key/value heads, handed to one of 1: attention would pair query head h with
    # key/value head h, not with the layer's single one
    x = torch.randn(2, 4, 8)
    layer, other = MultiHeadAttention(8, 2, num_kv_heads=1), MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"kv must be .*\(B, Hkv, Lk, D\) = \(2, 1, Lk, 4\).*got \(2, 2, 4, 4\)"):
        layer(x, kv=other.project_kv(x))
    with pytest.raises(ValueError, match=r"kv must be a \(k, v\) pair .* got Tensor"):
        layer(x, kv=layer.project_kv(x)[0])


def test_rope_must_cover_every_query():
    # the angles of one position, broadcast over four queries, would rotate them all alike
    layer, rope = MultiHeadAttention(8, 2), RotaryEmbedding(4, 16)
    x = torch.randn(2, 4, 8)
    for positions in (torch.zeros(2, 1, dtype=torch.long), torch.arange(5).expand(2, 5)):
        with pytest.raises(ValueError, match=r"rope must be \(cos, sin\), each \(B, 1, Lq, D/2\) = \(2, 1, 4, 2\)"):
            layer(x, rope=rope(positions))
    with pytest.raises(ValueError, match=r"rope must be \(cos, sin\).* got Tensor"):
        layer(x, rope=rope(torch.arange(4)[None])[0])
    with pytest.raises(ValueError, match=r"rope rotates the keys too: key must be as long as query \(4\), got 3"):
        layer(x, torch.randn(2, 3, 8), rope=rope(torch.arange(4)[None]))
    shared = layer(x, rope=rope(torch.arange(4)[None]))  # (1, 1, 4, 2): one set of positions for the batch
    torch.testing.assert_close(shared, layer(x, rope=rope(torch.arange(4).expand(2, 4))))


@pytest.mark.parametrize("backend", ["auto", "reference", "blocked", "sdpa"])
@pytest.mark.parametrize("mask", [None, masks.causal(), masks.causal() & masks.padding([6, 4])])
def test_attend_returns_the_same_output_with_its_log_sum_exp(backend, mask):
    """The ``attend`` submodule is the layer's attention call; asking it for the log-sum-exp (what an
    observer's hook does) leaves the output bit-identical and gives the reference's log-sum-exp."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=gen) for _ in range(3))
    attend = Attend()
    plain = attend(q, k, v, mask, backend=backend)
    out, lse = attend(q, k, v, mask, backend=backend, return_lse=True)
    assert torch.equal(out, plain)
    _, expected = maskattn.attention(q, k, v, mask, backend="reference", return_lse=True)
    torch.testing.assert_close(lse, expected)
    assert not list(attend.parameters()) and not list(attend.buffers())


def test_inputs_of_another_dtype_than_the_layer_are_refused_by_name():
    """A float16 query, an int64 query or a float32 key into a bfloat16 layer failed inside ``nn.Linear`` ("mat1
    and mat2 must have the same dtype") without naming the argument; under autocast they still run."""
    mha = MultiHeadAttention(8, 2).to(torch.bfloat16)
    x = torch.randn(1, 3, 8)
    with pytest.raises(TypeError, match=r"query must be torch.bfloat16 \(the layer's dtype\).*got torch.float16"):
        mha(x.half())
    with pytest.raises(TypeError, match=r"query must be torch.bfloat16 \(the layer's dtype\).*got torch.int64"):
        mha(x.long())
    with pytest.raises(TypeError, match=r"key must be torch.bfloat16 \(the layer's dtype\).*got torch.float32"):
        mha(x.bfloat16(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mha(x)  # autocast casts the float32 query for the bfloat16 projections
    expected = mha(x.bfloat16())  # oracle: the same layer on the query cast by hand
    torch.testing.assert_close(out.to(torch.bfloat16), expected, rtol=0, atol=0)


def test_int8_projections_take_the_activations_of_a_half_model():
    """An int8-quantised bfloat16 layer (float32 scales, bfloat16 activations) was refused: "query must be
    torch.float32 (the layer's dtype)", though ``Int8Linear`` takes any float input and returns its dtype."""
    from maskattn.layers import Int8Linear

    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2).to(torch.bfloat16)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        setattr(mha, name, Int8Linear.from_float(getattr(mha, name)))
    x = torch.randn(1, 3, 8, dtype=torch.bfloat16)
    out = mha(x)
    expected = mha.float()(x.float())  # oracle: the same int8 layer on the float32 activations
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    with pytest.raises(TypeError, match=r"query must be a floating-point tensor, got torch.int64"):
        mha(x.long())


def test_inputs_on_another_device_than_the_layer_are_refused_by_name():
    # the meta device stands in for a second device: a CPU layer given meta inputs said "unknown device type for
    # autocast", and a layer moved to the meta device (shapes only) could not run at all for the same reason
    layer, x = MultiHeadAttention(8, 2), torch.randn(2, 3, 8)
    meta = x.to("meta")
    for args, name in (((meta,), "query"), ((x, meta), "key"), ((x, x, meta), "value")):
        with pytest.raises(ValueError, match=rf"{name} is on meta, the layer on cpu; move it with \.to\("):
            layer(*args)
    on_meta = MultiHeadAttention(8, 2).to("meta")
    out = on_meta(meta, mask=masks.causal())
    assert (out.device.type, tuple(out.shape)) == ("meta", (2, 3, 8))


def test_a_forward_checks_rope_once_and_finds_the_layers_device_without_walking_its_parameters(monkeypatch):
    # the hot path: the device check walked q_proj's parameters and buffers for query, key and value, and apply_rope
    # checked again the angles forward had just checked, twice (a small layer's call ~20% slower on the CPU)
    from maskattn.layers import positions

    torch.manual_seed(0)
    layer, rope = MultiHeadAttention(8, 2, num_kv_heads=1).eval(), RotaryEmbedding(4, 16)
    x, angles = torch.randn(2, 4, 8), rope(torch.arange(4)[None])
    walks, checks = [], []
    buffers, parameters, check = nn.Module.buffers, nn.Module.parameters, positions._check_rope_fits
    monkeypatch.setattr(nn.Module, "buffers", lambda self, *a, **k: walks.append(self) or buffers(self, *a, **k))
    # the dtype too is read from q_proj's weight, not from a walk of its parameters per input (session 27)
    monkeypatch.setattr(nn.Module, "parameters", lambda self, *a, **k: walks.append(self) or parameters(self, *a, **k))
    monkeypatch.setattr(positions, "_check_rope_fits", lambda *a: checks.append(a) or check(*a))
    with torch.no_grad():
        out = layer(x, rope=angles)
    assert walks == [] and checks == []
    with torch.no_grad():  # the oracle: the layer written out by hand, each rotation checked
        q = positions.apply_rope(layer.q_proj(x).view(2, 4, 2, 4).transpose(1, 2), angles)  # (B, H, L, D)
        k = positions.apply_rope(layer.k_proj(x).view(2, 4, 1, 4).transpose(1, 2), angles)  # (B, Hkv, L, D)
        v = layer.v_proj(x).view(2, 4, 1, 4).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v  # (B, H, L, D), Hkv broadcast
        want = layer.out_proj(a.transpose(1, 2).reshape(2, 4, 8))
    assert len(checks) == 2
    torch.testing.assert_close(out, want)


def test_the_kv_and_rope_checks_format_the_shapes_they_expect_only_for_an_error(monkeypatch):
    # the hot path: both checks formatted their message's expected shape on every call, error or not (a
    # Transformer's decoding step checks kv in each decoder layer), session 27
    layer, rope = MultiHeadAttention(8, 2).eval(), RotaryEmbedding(4, 16)
    x, angles = torch.randn(2, 4, 8), rope(torch.arange(4)[None])
    formatted = []
    for name in ("_kv_shape", "_rope_shape"):
        real = getattr(MultiHeadAttention, name)
        monkeypatch.setattr(MultiHeadAttention, name,
                            lambda self, *a, real=real: formatted.append(a) or real(self, *a))
    with torch.no_grad():
        layer(x, rope=angles)
        layer(x, kv=layer.project_kv(x))
    assert formatted == []
    with pytest.raises(ValueError, match=r"kv must be two \(B, Hkv, Lk, D\) = \(2, 2, Lk, 4\) .* got \(2, 2, 4, 3\)"):
        layer(x, kv=(torch.randn(2, 2, 4, 3),) * 2)
    with pytest.raises(ValueError, match=r"rope must be \(cos, sin\), each \(B, 1, Lq, D/2\) = \(2, 1, 4, 2\)"):
        layer(x, rope=rope(torch.arange(3)[None]))
    assert formatted == [(2,), (2, 4)]
