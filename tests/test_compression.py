"""maskattn compress: int8 linear layers and pruned attention heads (issue 18, part 1).

Oracles: the float Linear (int8 is close to it and equal to its own float simulation), the unpruned
model with the pruned heads gated to zero (equal to the pruned model before fine-tuning), and the
model before saving (equal to the one `maskattn.load` reads back).
"""

import copy
import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import maskattn
from maskattn import compression, decoding
from maskattn.cli import main
from maskattn.io import MANIFEST, FormatError
from maskattn.layers import Int8Linear, MultiHeadAttention
from maskattn.models import compressed
from maskattn.tasks.common import write_task
from maskattn.tokenization import Tokenizer
from test_classification import _sentiment  # labelled sentences a tiny model learns


# --- int8 ------------------------------------------------------------------------------------------
def test_int8_linear_is_its_int8_product_and_close_to_float():
    torch.manual_seed(0)
    linear = nn.Linear(48, 40)
    q = Int8Linear.from_float(linear)
    x = torch.randn(3, 7, 48)
    with torch.no_grad():
        y, ref = q(x), linear(x)
    assert y.shape == (3, 7, 40) and q.weight.dtype == torch.int8 and q.weight_scale.shape == (40,)
    # by hand: one symmetric scale per token and per output channel, integer sums
    sx = x.abs().amax(-1, keepdim=True) / 127
    sw = linear.weight.detach().abs().amax(-1) / 127
    xq, wq = torch.round(x / sx), torch.round(linear.weight.detach() / sw[:, None])
    torch.testing.assert_close(y, (xq.double() @ wq.double().T * sx * sw + linear.bias.detach()).float(),
                               atol=1e-5, rtol=1e-5)
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()
    x.requires_grad_(True)
    with_grad = q(x)  # the float path, with the gradient straight through the rounding
    torch.testing.assert_close(with_grad, y, atol=1e-5, rtol=1e-5)
    with_grad.sum().backward()
    torch.testing.assert_close(x.grad, q.dequantized_weight().sum(0).expand(3, 7, 48), atol=1e-5, rtol=1e-5)
    empty = Int8Linear(48, 40)
    empty.load_state_dict(q.state_dict())
    with torch.no_grad():
        assert torch.equal(empty(x), y)


@pytest.mark.parametrize("in_features", [1, 2, 5])
def test_int8_linear_equals_its_integer_product_for_narrow_inputs_and_under_autocast(in_features):
    # torch._int_mm gives wrong sums on the CPU for K = 1 (a captioner with 1-pixel patches has such a layer);
    # under bf16 autocast the float path's sums were taken in bf16
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 9)
    q = Int8Linear.from_float(linear)
    x = torch.randn(6, in_features)
    sx = x.abs().amax(-1, keepdim=True) / 127
    sw = linear.weight.detach().abs().amax(-1) / 127
    xq, wq = torch.round(x / sx), torch.round(linear.weight.detach() / sw[:, None])
    by_hand = (xq.double() @ wq.double().T * sx * sw + linear.bias.detach()).float()
    with torch.no_grad():
        torch.testing.assert_close(q(x), by_hand, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(q(x.requires_grad_(True)).float(), by_hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int8_weights_of_small_rows_use_the_whole_int8_range_in_every_float_dtype(dtype):
    # A float16 row whose largest |w| is below 127 * 6.1e-5 (float16's smallest normal) got that as its scale:
    # |w| <= 1e-3 used int8 values up to 20 of 127, an output 2.6% off where float32's is 0.7%
    from maskattn.layers.quantized import Int8TokenEmbedding, TokenEmbedding, quantize_weight

    torch.manual_seed(0)
    sizes = torch.tensor([1e-1, 1e-2, 1e-3, 3e-4, 0.0], dtype=torch.float64)[:, None]  # 0: a positive scale, zeros
    weight = (torch.randn(5, 40, dtype=torch.float64) * sizes).to(dtype)
    q, scale = quantize_weight(weight)
    # by hand, in float64: one scale per row, |w|max / 127 as stored in the weight's dtype, rounded against it
    exact = weight.double().abs().amax(1) / 127
    assert scale.dtype == dtype and (scale > 0).all()
    assert torch.equal(scale[:4], exact[:4].to(dtype))
    by_hand = torch.round(weight[:4].double() / scale[:4].double()[:, None]).clamp(-127, 127)
    assert torch.equal(q[:4].double(), by_hand) and not q[4].any()
    assert (q[:4].abs().amax(1) >= 123).all()  # the whole range, but for the rounding of a float16 subnormal scale
    table = TokenEmbedding(5, 40)
    table.weight.data = weight
    assert torch.equal(Int8TokenEmbedding.from_float(table).weight, q)


@pytest.mark.parametrize("shape", [(2, 66), (3, 22), (4, 5, 11), (33,)])
def test_int8_linear_refuses_an_input_of_another_width_naming_it(shape):
    # (2, 66) into 33 features was regrouped into 4 rows of 33 and failed at the end: "shape '[2, 17]' is
    # invalid for input of size 68"; nn.Linear (the oracle) refuses every such input too
    linear = nn.Linear(33, 17)
    q = Int8Linear.from_float(linear)
    x = torch.randn(shape)
    if shape[-1] != 33:
        with pytest.raises(RuntimeError):
            linear(x)
        with pytest.raises(ValueError, match=rf"x must be \(\.\.\., in_features=33\), got {re.escape(str(shape))}"):
            q(x)
    else:
        assert q(x).shape == linear(x).shape


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_int8_linear_refuses_an_input_that_is_not_floating_point(dtype):
    # an integer input was quantised and its output cast back to integers (truncated) without a word; the oracle,
    # nn.Linear, refuses it too
    linear = nn.Linear(4, 3)
    q = Int8Linear.from_float(linear)
    x = torch.ones(2, 4, dtype=dtype)
    with pytest.raises(RuntimeError):
        linear(x)
    with pytest.raises(TypeError, match=rf"Int8Linear: x must be floating point, got {dtype}"):
        q(x)


def test_an_int8_tokens_output_depends_on_that_token_alone():
    """Per-token activation scales: no coupling through the batch or padding, unlike a per-tensor scale."""
    torch.manual_seed(0)
    q = Int8Linear.from_float(nn.Linear(16, 8))
    x = torch.randn(4, 16)
    with torch.no_grad():
        alone = torch.cat([q(x[i : i + 1]) for i in range(4)])
        spoiled = x.clone()
        spoiled[3] = 1e4  # a huge "padding" row
        assert torch.equal(q(x), alone) and torch.equal(q(spoiled)[:3], alone[:3])


@pytest.mark.parametrize("tied", [False, True])
def test_an_int8_model_passes_the_mask_audit(tiny_transformer, tied):
    from maskattn.audit import audit_model

    compressed.quantize_linears(tiny_transformer, tied=tied)
    assert audit_model(tiny_transformer, length=6).ok


@pytest.fixture
def tiny_transformer():
    torch.manual_seed(0)
    return maskattn.Transformer(maskattn.TransformerConfig.preset("tiny")).eval()


def _io(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 64, (2, 7), generator=g), torch.randint(3, 64, (2, 5), generator=g)


def test_a_pruned_int8_transformer_saves_and_loads_equal(tmp_path, tiny_transformer):
    model = tiny_transformer
    compression.prune(model, {"encoder.layers.0.self_attn": [1, 3], "decoder.layers.1.cross_attn": [2]})
    names = compressed.quantize_linears(model)
    assert "out_proj" not in names and "encoder.layers.0.self_attn.q_proj" in names
    src, tgt = _io()
    with torch.no_grad():
        before = model(src, tgt)
    model.save(tmp_path / "m")
    entry = json.loads((tmp_path / "m" / "config.json").read_text())["compression"]
    assert entry["heads"] == {"encoder.layers.0.self_attn": 2, "decoder.layers.1.cross_attn": 1}
    assert set(entry["int8"]) == set(names)
    loaded = maskattn.load(tmp_path / "m").eval()
    assert isinstance(loaded.encoder.layers[0].self_attn.q_proj, Int8Linear)
    with torch.no_grad():
        assert torch.equal(loaded(src, tgt), before)
        cached = decoding.beam_search(loaded, src, beam_size=2, max_new_tokens=6)[0]
        assert torch.equal(cached, decoding.beam_search(model, src, beam_size=2, max_new_tokens=6)[0])


def test_an_int8_token_table_is_its_rows_times_their_scales():
    from maskattn.layers import Int8TokenEmbedding, TokenEmbedding

    torch.manual_seed(0)
    table = TokenEmbedding(10, 6, scale=True)
    q = Int8TokenEmbedding.from_float(table)
    ids = torch.tensor([[1, 9, 1], [0, 3, 4]])
    w = table.weight.detach()
    s = w.abs().amax(-1) / 127  # one scale per row, by hand
    expected = torch.round(w / s[:, None])[ids] * s[ids][..., None] * 6**0.5
    torch.testing.assert_close(q(ids), expected, atol=1e-6, rtol=1e-6)
    assert (q(ids) - table(ids)).abs().max() < 0.01 * table(ids).abs().max()
    with pytest.raises(ValueError, match=r"ids must be in \[0, 10\)"):
        q(torch.tensor([[10]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_int8_model_with_a_tied_table_runs_in_the_dtype_it_was_cast_to(tmp_path, dtype):
    # The int8 table returned float32 whatever the model's dtype: after .to(bfloat16) the first LayerNorm
    # failed, "mixed dtype (CPU): expect parameter to have scalar type of Float".
    from maskattn.layers import Int8TokenEmbedding

    torch.manual_seed(0)
    model = maskattn.DecoderLM(maskattn.DecoderLMConfig.preset("tiny")).eval()
    compressed.quantize_linears(model, tied=True)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        reference = model(ids)  # the float32 int8 model
    model = model.to(dtype)
    table = model.embed.tokens
    assert isinstance(table, Int8TokenEmbedding) and table.weight_scale.dtype == dtype
    # oracle: each int8 value times its row's scale, exactly (float64), then rounded once to the model's dtype
    by_hand = (table.weight[ids].double() * table.weight_scale[ids, None].double()).to(dtype)
    assert torch.equal(table(ids), by_hand)
    with torch.no_grad():
        out = model(ids)
    assert out.dtype == dtype
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()
    model.save(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(maskattn.load(tmp_path / "m").eval()(ids), out)


def test_a_tied_output_projection_shares_the_int8_table_and_saves_once(tmp_path, tiny_transformer):
    model = tiny_transformer
    src, tgt = _io()
    with torch.no_grad():
        float_out = model(src, tgt)
    float_bytes = compression.linear_weight_bytes(model)
    names = compressed.quantize_linears(model, tied=True)
    assert {"out_proj", "src_embed.tokens", "tgt_embed.tokens"} <= set(names)
    assert model.out_proj.weight is model.tgt_embed.tokens.weight is model.src_embed.tokens.weight
    assert model.out_proj.weight.dtype == torch.int8
    assert compression.linear_weight_bytes(model) < float_bytes / 3.5  # the shared table is not counted
    with torch.no_grad():
        out = model(src, tgt)
    assert (out - float_out).abs().max() < 0.05 * float_out.abs().max()
    model.save(tmp_path / "m")
    loaded = maskattn.load(tmp_path / "m").eval()
    assert loaded.out_proj.weight is loaded.tgt_embed.tokens.weight  # tied again after loading
    with torch.no_grad():
        assert torch.equal(loaded(src, tgt), out)
        cached = decoding.beam_search(loaded, src, beam_size=2, max_new_tokens=6)[0]
        assert torch.equal(cached, decoding.beam_search(model, src, beam_size=2, max_new_tokens=6)[0])


@pytest.mark.parametrize("tie", [False, True])
def test_an_int8_decoder_lm_generates_with_the_cache_as_without(tmp_path, tie):
    torch.manual_seed(0)
    model = maskattn.DecoderLM(maskattn.DecoderLMConfig.preset("tiny", tie_output=tie)).eval()
    compressed.quantize_linears(model, tied=tie)
    model.save(tmp_path / "lm")
    loaded = maskattn.load(tmp_path / "lm").eval()
    assert isinstance(loaded.lm_head, Int8Linear)
    prompt = torch.randint(0, 64, (2, 4))
    with torch.no_grad():
        out = decoding.greedy(loaded, prompt, max_new_tokens=5)
        ids = prompt
        for _ in range(5):  # no cache: the whole sequence at every step
            ids = torch.cat([ids, loaded(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids[:, 4:])


def test_a_compression_entry_that_does_not_fit_is_a_format_error(tmp_path, tiny_transformer):
    tiny_transformer.save(tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    meta = json.loads(config.read_text())
    (tmp_path / "m" / MANIFEST).unlink()  # as written before manifests: the entry's own checks answer
    for entry, expected in (({"heads": {"encoder.nope": 1}}, "not an attention module"),
                            ({"heads": {"encoder.layers.0.self_attn": 9}}, "does not fit"),
                            ({"int8": ["encoder.layers.0.self_attn"]}, "not a Linear or token embedding"),
                            ({"sparse": True}, "unknown compression entries")):
        config.write_text(json.dumps({**meta, "compression": entry}))
        with pytest.raises(FormatError, match=expected):
            maskattn.load(tmp_path / "m")


# --- pruning -----------------------------------------------------------------------------------------
def test_pruned_projections_have_the_expected_shapes():
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, bias=True)  # head dim 8
    x = torch.randn(2, 5, 32)
    attn.prune_heads([3, 1])
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (2, 2, 8)
    assert attn.q_proj.weight.shape == (16, 32) and attn.k_proj.weight.shape == (16, 32)
    assert attn.v_proj.weight.shape == (16, 32) and attn.out_proj.weight.shape == (32, 16)
    assert attn.q_proj.bias.shape == (16,) and attn.out_proj.bias.shape == (32,)
    assert attn(x).shape == (2, 5, 32)

    gqa = MultiHeadAttention(48, 6, num_kv_heads=3)  # groups {0,1} {2,3} {4,5}, head dim 8
    gqa.prune_heads([4, 5, 0, 1])
    assert (gqa.num_heads, gqa.num_kv_heads) == (4, 2)
    assert gqa.q_proj.weight.shape == (32, 48) and gqa.k_proj.weight.shape == (16, 48)
    assert gqa.out_proj.weight.shape == (48, 32)
    with pytest.raises(ValueError, match="whole groups of 2 heads"):
        MultiHeadAttention(48, 6, num_kv_heads=3).prune_heads([0, 2])
    with pytest.raises(ValueError, match="distinct heads in"):
        MultiHeadAttention(32, 4).prune_heads([])
    with pytest.raises(ValueError, match="prune first"):
        quantized = MultiHeadAttention(32, 4)
        quantized.q_proj = Int8Linear.from_float(quantized.q_proj)
        quantized.prune_heads([0])


@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa"])
def test_the_pruned_model_equals_the_unpruned_one_with_those_heads_masked(kv_heads):
    torch.manual_seed(0)
    model = maskattn.Transformer(maskattn.TransformerConfig.preset("tiny", num_kv_heads=kv_heads)).eval()
    model.double()  # float64: the two sums differ only in rounding, far below the 1e-6 asked
    keep = {"encoder.layers.0.self_attn": [0, 1], "encoder.layers.1.self_attn": [2, 3],
            "decoder.layers.0.self_attn": [0, 1, 2, 3], "decoder.layers.0.cross_attn": [2, 3],
            "decoder.layers.1.cross_attn": [0, 1]}
    if kv_heads is None:
        keep["decoder.layers.1.self_attn"] = [1, 2, 3]
    gates = {name: torch.zeros(4).index_fill_(0, torch.tensor(heads), 1.0) for name, heads in keep.items()}
    src, tgt = _io()
    with torch.no_grad(), compression.head_gates(model, gates):
        masked = model(src, tgt)
    compression.prune(model, keep)
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt), masked, atol=1e-6, rtol=0)
    assert model.encoder.layers[0].self_attn.k_proj.weight.shape == (2 * 8 if kv_heads is None else 8, 32)


def _batches(model, count=3, seed=0):
    """TrainingBatches of random copy pairs for a tiny Transformer (the loss of translation)."""
    from maskattn.tasks.base import TrainingBatches
    from maskattn.tasks.translation import sequence_loss

    g = torch.Generator().manual_seed(seed)
    data = [(torch.randint(3, 64, (4, 6), generator=g)) for _ in range(count)]

    def collate(idx):
        src = data[idx[0]]
        tgt_in = torch.cat([torch.full((4, 1), 1), src], dim=1)
        tgt_out = torch.cat([src, torch.full((4, 1), 2)], dim=1)
        return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out, "num_targets": tgt_out.numel()}

    def loss(m, b):
        return sequence_loss(m(b["src"], b["tgt_in"]), b["tgt_out"], 0, 0.0)

    def outputs(m, b):
        return m(b["src"], b["tgt_in"]).flatten(0, 1).float(), b["tgt_out"].flatten()

    return TrainingBatches(plan=lambda epoch: [[i] for i in range(count)], collate=collate, loss=loss,
                           outputs=outputs)


def test_head_importance_is_the_loss_change_when_the_head_is_masked(tiny_transformer):
    model, data = tiny_transformer, _batches(tiny_transformer)
    batches = compression.first_batches(data, 2)
    importance = compression.head_importance(model, data, batches)
    assert set(importance) == set(model.attention_sites()) and importance["encoder.layers.1.self_attn"].shape == (4,)
    base = compression.mean_loss(model, data, batches)
    with compression.head_gates(model, {"decoder.layers.1.cross_attn": torch.tensor([1.0, 1.0, 0.0, 1.0])}):
        by_hand = compression.mean_loss(model, data, batches) - base
    assert importance["decoder.layers.1.cross_attn"][2].item() == pytest.approx(by_hand, abs=1e-9)


def test_choose_heads_removes_the_least_important_and_keeps_one_per_module(tiny_transformer):
    model = tiny_transformer
    sites = list(model.attention_sites())  # 6 modules x 4 heads
    importance = {name: torch.arange(4.0) + 10 * i for i, name in enumerate(sites)}
    keep = compression.choose_heads(model, importance, 0.25)  # 6 of 24 heads: 3 of the first module, then 3 more
    assert keep[sites[0]] == [3] and keep[sites[1]] == [3] and keep[sites[2]] == [0, 1, 2, 3]
    assert sum(len(h) for h in keep.values()) == 18
    everything = compression.choose_heads(model, importance, 0.99)
    assert all(len(h) == 1 for h in everything.values())
    with pytest.raises(ValueError, match=r"prune fraction must be in \[0, 1\), got 1.5"):
        compression.choose_heads(model, importance, 1.5)


def test_choose_heads_per_module_removes_the_same_share_of_every_module(tiny_transformer):
    model = tiny_transformer
    sites = list(model.attention_sites())  # 6 modules x 4 heads
    # globally, the first module's heads are all less important than any other module's
    importance = {name: torch.tensor([3.0, 0.0, 2.0, 1.0]) + 10 * i for i, name in enumerate(sites)}
    assert compression.choose_heads(model, importance, 0.5)[sites[0]] == [0]
    keep = compression.choose_heads(model, importance, 0.5, per_module=True)
    assert keep == {name: [0, 2] for name in sites}  # the two most important of each
    assert all(len(h) == 1 for h in compression.choose_heads(model, importance, 0.99, per_module=True).values())


def test_head_importance_on_top_of_removed_heads(tiny_transformer):
    model, data = tiny_transformer, _batches(tiny_transformer)
    batches = compression.first_batches(data, 2)
    removed = {"encoder.layers.0.self_attn": {1}}
    importance = compression.head_importance(model, data, batches, removed=removed)
    assert importance["encoder.layers.0.self_attn"][1].item() == float("inf")
    gates = {"encoder.layers.0.self_attn": torch.tensor([1.0, 0.0, 1.0, 1.0])}
    with compression.head_gates(model, gates):
        base = compression.mean_loss(model, data, batches)
    gates["decoder.layers.0.cross_attn"] = torch.tensor([0.0, 1.0, 1.0, 1.0])
    with compression.head_gates(model, gates):
        by_hand = compression.mean_loss(model, data, batches) - base
    assert importance["decoder.layers.0.cross_attn"][0].item() == pytest.approx(by_hand, abs=1e-9)


def test_greedy_in_one_round_is_the_one_shot_ranking(tiny_transformer):
    model, data = tiny_transformer, _batches(tiny_transformer)
    batches = compression.first_batches(data, 2)
    one_shot = compression.choose_heads(model, compression.head_importance(model, data, batches), 0.5)
    greedy = compression.choose_heads_greedy(model, data, batches, 0.5, per_round=24, log=lambda _: None)
    assert greedy == one_shot


def test_greedy_measures_again_after_each_round(tiny_transformer):
    model, data = tiny_transformer, _batches(tiny_transformer)
    batches = compression.first_batches(data, 2)
    logged = []
    keep = compression.choose_heads_greedy(model, data, batches, 2 / 24, per_round=1, log=logged.append)
    assert len(logged) == 2 and sum(len(h) for h in keep.values()) == 22
    # by hand: the least important head, then the least important one with the first masked out
    first = compression.head_importance(model, data, batches)
    name, g = min(((n, i) for n, s in first.items() for i in range(len(s))), key=lambda u: first[u[0]][u[1]])
    second = compression.head_importance(model, data, batches, removed={name: {g}})
    name2, g2 = min(((n, i) for n, s in second.items() for i in range(len(s))), key=lambda u: second[u[0]][u[1]])
    assert g not in keep[name] and g2 not in keep[name2]
    with pytest.raises(ValueError, match="per_round must be a positive int, got 0"):
        compression.choose_heads_greedy(model, data, batches, 0.5, per_round=0)


def test_greedy_skips_modules_it_cannot_take_from_and_chooses_as_if_it_measured_all(tiny_transformer, monkeypatch):
    model, data = tiny_transformer, _batches(tiny_transformer)
    batches = compression.first_batches(data, 2)
    modules = compression.attention_modules(model)
    # by hand: measure every module each round, take the least important unit of a module keeping > 1
    removed, by_hand = {name: set() for name in modules}, []
    while len(by_hand) < 18:
        scores = compression.head_importance(model, data, batches, removed=removed)
        units = sorted((float(v), n, g) for n, s in scores.items() for g, v in enumerate(s)
                       if g not in removed[n] and 4 - len(removed[n]) > 1)
        _, name, g = units[0]
        removed[name].add(g)
        by_hand.append((name, g))
    measured = []
    original = compression.mean_loss
    monkeypatch.setattr(compression, "mean_loss", lambda *a: measured.append(1) or original(*a))
    keep = compression.choose_heads_greedy(model, data, batches, 18 / 24, per_round=1, log=lambda _: None)
    assert keep == {name: sorted(set(range(4)) - removed[name]) for name in modules}
    every = sum(1 + sum(4 - len({g for n, g in by_hand[:r] if n == m}) for m in modules) for r in range(18))
    assert len(measured) < every  # modules down to one unit were not measured again


def test_faded_gates_by_hand():
    fade = {"a": torch.tensor([1.0, 0.0, 0.0, 1.0])}
    assert torch.equal(compression.faded_gates(fade, 1, 4)["a"], torch.tensor([1.0, 0.75, 0.75, 1.0]))
    assert torch.equal(compression.faded_gates(fade, 3, 4)["a"], torch.tensor([1.0, 0.25, 0.25, 1.0]))
    assert torch.equal(compression.faded_gates(fade, 4, 4)["a"], fade["a"])
    assert torch.equal(compression.faded_gates(fade, 9, 4)["a"], fade["a"])


def test_finetune_fades_the_heads_out(tiny_transformer, monkeypatch):
    seen = []
    original = compression.head_gates

    def spy(model, gates):
        seen.append({name: gate.clone() for name, gate in gates.items()})
        return original(model, gates)

    monkeypatch.setattr(compression, "head_gates", spy)
    fade = {"decoder.layers.0.cross_attn": torch.tensor([0.0, 1.0, 1.0, 1.0])}
    compression.finetune(tiny_transformer, _batches(tiny_transformer), steps=4, lr=1e-3, fade=fade, fade_steps=2,
                         log=lambda _: None)
    firsts = [s["decoder.layers.0.cross_attn"][0].item() for s in seen]
    assert firsts == [0.5, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"fade_steps must be an int in \[0, steps = 1\], got -1"):
        compression.finetune(tiny_transformer, _batches(tiny_transformer), steps=1, fade=fade, fade_steps=-1)


def test_choose_heads_removes_whole_key_value_groups():
    torch.manual_seed(0)
    model = maskattn.EncoderModel(maskattn.EncoderConfig.preset("tiny", num_kv_heads=2))
    sites = list(model.attention_sites())
    importance = {name: torch.tensor([1.0 + i, 0.0]) for i, name in enumerate(sites)}
    keep = compression.choose_heads(model, importance, 0.5)
    assert keep == {name: [0, 1] for name in sites}  # group 1 (heads 2 and 3) of each module
    compression.prune(model, keep)
    assert all(model.get_submodule(n).num_kv_heads == 1 for n in sites)


def test_finetune_lowers_the_loss(tiny_transformer):
    model, data = tiny_transformer, _batches(tiny_transformer)
    batches = compression.first_batches(data, 3)
    before = compression.mean_loss(model, data, batches)
    compression.finetune(model, data, steps=20, lr=3e-3, log=lambda _: None)
    assert compression.mean_loss(model, data, batches) < before


def test_distillation_loss_by_hand():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 7), torch.randn(5, 7), torch.randint(0, 7, (5,))
    ce = -s.log_softmax(-1)[torch.arange(5), y].sum()
    p = (t / 2).softmax(-1)
    kl = (p * (p.log() - (s / 2).log_softmax(-1))).sum()
    torch.testing.assert_close(compression.distillation_loss(s, t, y, 0.0, 2.0), ce)
    torch.testing.assert_close(compression.distillation_loss(s, t, y, 0.25, 2.0), 0.75 * ce + 0.25 * 4 * kl)
    torch.testing.assert_close(compression.distillation_loss(s, s, y, 1.0), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_a_student_equal_to_its_teacher_gets_no_gradient_from_pure_distillation():
    """KL(teacher || student) is at its minimum; the mixed loss's gradient is (1 - weight) times the
    task loss's, and no gradient reaches the teacher."""
    torch.manual_seed(0)
    model = maskattn.Transformer(maskattn.TransformerConfig.preset("tiny", dropout=0.0))
    teacher = maskattn.Transformer(model.config)
    teacher.load_state_dict(model.state_dict())
    data = _batches(model)
    batch = data.collate([0])

    def grads(**kwargs):
        model.zero_grad()
        loss = compression.finetune_loss(model, data, batch, teacher=teacher, **kwargs)
        loss.backward()
        return loss, torch.cat([p.grad.flatten() for p in model.parameters()])

    loss, pure = grads(distill=1.0)
    assert abs(loss.item()) < 1e-6 and pure.abs().max() < 1e-6
    task_loss, task = grads()
    torch.testing.assert_close(task_loss, data.loss(model, batch) / batch["num_targets"])
    mixed_loss, mixed = grads(distill=0.25, temperature=2.0)
    torch.testing.assert_close(mixed_loss, 0.75 * task_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mixed, 0.75 * task, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="distill > 0 needs a teacher"):
        compression.finetune(model, data, steps=1, distill=0.5, log=lambda _: None)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        compression.finetune(model, data, steps=1, distill=0.5, teacher=teacher, temperature=0, log=lambda _: None)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_decaying_finetune_ends_at_zero_learning_rate(tiny_transformer, monkeypatch, schedule):
    seen = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    compression.finetune(tiny_transformer, _batches(tiny_transformer), steps=6, lr=1e-3, schedule=schedule,
                         warmup=2, log=lambda _: None)
    assert seen[:2] == [5e-4, 1e-3] and seen[-1] == 0.0 and seen == sorted(seen[:2]) + sorted(seen[2:], reverse=True)
    if schedule == "linear":  # a quarter of the decay per step after the warm-up
        assert seen[2:] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])


# --- the command ---------------------------------------------------------------------------------
def _pairs(path: Path, n: int, rng: random.Random) -> Path:
    words = ["".join(rng.choice("abcdef") for _ in range(rng.randint(2, 4))) for _ in range(n)]
    path.write_text("".join(f"{w}\t{w[::-1]}\n" for w in words))
    return path


def _train(task: str, data: Path, out: Path, *settings: str) -> Path:
    common = ['data.tokenizer="chars"', "data.max_tokens=512", "model.d_model=32", "model.d_ff=64",
              "model.num_heads=4", "train.warmup=5", "train.lr=3e-3", "train.progress=false", "train.steps=40"]
    sets = [arg for setting in (*common, *settings) for arg in ("--set", setting)]
    flag = "--train-src" if task == "translation" else "--train"
    assert main(["train", task, flag, str(data), "--out", str(out), *sets]) == 0
    return out / "model"


@pytest.mark.parametrize("task", ["translation", "classification"])
def test_compress_from_the_cli_then_predict(tmp_path, capsys, task):
    rng = random.Random(0)
    if task == "translation":
        data = _pairs(tmp_path / "train.tsv", 200, rng)
        model = _train(task, data, tmp_path / "run", "model.num_encoder_layers=1", "model.num_decoder_layers=1",
                       "decode.beam_size=2")
        predict, inputs = ["translate"], ["abc", "fed"]
    else:
        data = _sentiment(tmp_path / "train.tsv", 200, rng)
        model = _train(task, data, tmp_path / "run", "model.num_layers=2")
        predict, inputs = ["classify"], ["the film was great", "a plot was awful"]
    capsys.readouterr()
    out = tmp_path / "small"
    assert main(["compress", str(model), "--out", str(out), "--int8", "--prune-heads", "0.5", "--data", str(data),
                 "--finetune-steps", "3", "--importance-batches", "2", "--max-tokens", "256", "--schedule", "cosine",
                 "--distill", "0.5", "--bf16",
                 *(["--greedy", "4"] if task == "translation" else ["--fade-steps", "2"])]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["heads_after"] == result["heads_before"] // 2
    assert result["linear_weight_bytes_after"] < result["linear_weight_bytes_before"] / 3.5  # int8 goal
    assert result["file_bytes_after"] < result["file_bytes_before"]
    entry = json.loads((out / "config.json").read_text())["compression"]
    assert sum(entry["heads"].values()) + 4 * (len(result["kept_heads"]) - len(entry["heads"])) == result["heads_after"]
    loaded = maskattn.load(out)
    assert compression.heads(loaded) == result["heads_after"]
    assert any(isinstance(m, Int8Linear) for m in loaded.modules())

    assert main([*predict, str(out), *inputs]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["evaluate", str(out), "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr().out)


def test_compress_refusals(tmp_path, capsys, tiny_transformer):
    model = tmp_path / "m"
    tiny_transformer.save(model)
    write_task(model, {"task": "translation"})
    cases = ((["--out", str(tmp_path / "o")], "nothing to do"),
             (["--out", str(model), "--int8"], "it holds the input"),
             (["--out", str(tmp_path / "o"), "--prune-heads", "0.5"], "needs the task's training data"),
             (["--out", str(tmp_path / "o"), "--prune-heads", "0.5", "--data", "x", "--greedy", "2", "--per-module"],
              "cannot be combined with --per-module"),
             (["--out", str(tmp_path / "o"), "--prune-heads", "0.5", "--data", "x", "--fade-steps", "200"],
              "--fade-steps (200) must be at most --finetune-steps (100)"))
    for args, expected in cases:
        assert main(["compress", str(model), *args]) == 2
        assert expected in capsys.readouterr().err


# --- one choice of heads, fine-tuned again with another seed --------------------------------------
def test_a_seeded_finetune_permutes_each_epochs_batches_and_repeats_itself(tiny_transformer):
    def run(seed):
        model = copy.deepcopy(tiny_transformer)
        data = _batches(model, count=5)
        seen, collate = [], data.collate
        data = dataclasses.replace(data, collate=lambda idx: seen.append(idx[0]) or collate(idx))
        compression.finetune(model, data, steps=10, lr=1e-3, seed=seed, log=lambda _: None)
        return seen, torch.nn.utils.parameters_to_vector(model.parameters())

    unseeded, _ = run(None)
    assert unseeded == [0, 1, 2, 3, 4] * 2  # the data's own order, as before seeds existed
    (order, weights), (again, same) = run(1), run(1)
    assert order == again and torch.equal(weights, same)
    assert sorted(order[:5]) == sorted(order[5:]) == [0, 1, 2, 3, 4] and order != unseeded
    other, different = run(2)
    assert other != order and not torch.equal(weights, different)
    with pytest.raises(ValueError, match=r"finetune seed must be None or an int in \[0, 2\*\*63\), got -1"):
        compression.finetune(tiny_transformer, _batches(tiny_transformer), steps=1, seed=-1)


def test_keep_heads_prunes_the_chosen_heads_again_and_the_seeded_models_average(tmp_path, capsys):
    data = _pairs(tmp_path / "train.tsv", 120, random.Random(0))
    model = _train("translation", data, tmp_path / "run", "model.num_encoder_layers=1", "model.num_decoder_layers=1")
    common = ["--data", str(data), "--finetune-steps", "3", "--importance-batches", "2", "--max-tokens", "256"]
    capsys.readouterr()
    assert main(["compress", str(model), "--out", str(tmp_path / "chosen"), "--prune-heads", "0.5", *common]) == 0
    report = tmp_path / "chosen.json"
    report.write_text(capsys.readouterr().out)
    chosen = json.loads(report.read_text())["kept_heads"]
    members = []
    for seed in (1, 2):
        out = tmp_path / f"seed{seed}"
        assert main(["compress", str(model), "--out", str(out), "--keep-heads", str(report), "--seed", str(seed),
                     *common]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["kept_heads"] == chosen and result["heads_after"] == result["heads_before"] // 2
        members.append(maskattn.load(out).state_dict())
    assert any(not torch.equal(members[0][k], members[1][k]) for k in members[0])  # two different fine-tunes

    assert main(["average", "--models", str(tmp_path / "seed1"), str(tmp_path / "seed2"),
                 "--out", str(tmp_path / "soup")]) == 0
    soup = maskattn.load(tmp_path / "soup").state_dict()
    for name, value in soup.items():
        torch.testing.assert_close(value, (members[0][name] + members[1][name]) / 2)

    (tmp_path / "bad.json").write_text(json.dumps({"decoder.layers.0.cross_attn": [0, 9]}))
    (tmp_path / "unknown.json").write_text(json.dumps({"decoder.layers.7.cross_attn": [0]}))
    cases = ((["--keep-heads", str(tmp_path / "bad.json")], "keep_heads['decoder.layers.0.cross_attn'] must be a "
              "non-empty list of distinct heads in [0, 4), got [0, 9]"),
             (["--keep-heads", str(tmp_path / "unknown.json")], "not attention modules of this model"),
             (["--keep-heads", str(report), "--prune-heads", "0.5"], "cannot be combined with --prune-heads"))
    for args, expected in cases:
        assert main(["compress", str(model), "--out", str(tmp_path / "x"), *args, *common]) == 2
        assert expected in capsys.readouterr().err


def test_a_bad_gate_registers_no_hook(tiny_transformer):
    model, data = tiny_transformer, _batches(tiny_transformer)
    batch = compression.first_batches(data, 1)
    before = compression.mean_loss(model, data, batch)
    gates = {"decoder.layers.0.cross_attn": torch.zeros(4), "decoder.layers.1.cross_attn": torch.zeros(3)}
    match = r"gates\['decoder.layers.1.cross_attn'\] must be \(4,\), got \(3,\)"
    with pytest.raises(ValueError, match=match), compression.head_gates(model, gates):
        pass
    assert compression.mean_loss(model, data, batch) == before  # the first module is not left gated


def test_a_seeded_finetune_leaves_the_callers_random_state(tiny_transformer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    compression.finetune(tiny_transformer, _batches(tiny_transformer), steps=2, lr=1e-3, seed=5, log=lambda _: None)
    assert torch.equal(torch.rand(3), expected)


def test_compress_refuses_bad_pruning_settings_before_any_work(tmp_path, capsys, tiny_transformer, monkeypatch):
    model = tmp_path / "m"
    tiny_transformer.save(model)
    write_task(model, {"task": "translation"})
    (tmp_path / "nested.json").write_text(json.dumps({"decoder.layers.0.cross_attn": [[0, 1]]}))
    (tmp_path / "int8.json").write_text(json.dumps({"heads_before": 36, "heads_after": 36}))
    read = []
    monkeypatch.setattr(compression, "first_batches", lambda *a: read.append(a) or [])  # the work that must not run
    out = ["--out", str(tmp_path / "o"), "--data", "x"]
    for args, expected in ((["--prune-heads", "50"], "argument --prune-heads: expected a fraction in [0, 1), got 50"),
                           (["--prune-heads", "0.5", "--seed", "-1"],
                            "argument --seed: a seed must be an int in [0, 2**63), got -1")):
        with pytest.raises(SystemExit) as refused:  # the flags' argparse types refuse them, naming the flag
            main(["compress", str(model), *out, *args])
        assert refused.value.code == 2 and expected in capsys.readouterr().err
    cases = ((["--int8", "--seed", "3"], "--seed needs --prune-heads or --keep-heads"),
             (["--int8", "--greedy", "2"], "--greedy needs --prune-heads or --keep-heads"),
             (["--int8", "--per-module"], "--per-module needs --prune-heads or --keep-heads"),
             (["--keep-heads", str(tmp_path / "nested.json")], "must be a non-empty list of distinct heads"),
             (["--keep-heads", str(tmp_path / "int8.json")], "has no kept_heads (that run pruned no heads)"))
    for args, expected in cases:
        assert main(["compress", str(model), *out, *args]) == 2
        assert expected in capsys.readouterr().err
    assert not read


def test_compress_refuses_bad_finetune_settings_before_measuring_heads(tmp_path, capsys, tiny_transformer,
                                                                        monkeypatch):
    # --distill 2, --temperature 0 and --lr -1 were refused by finetune, after the heads' importance had been
    # measured (minutes with --greedy), in words naming finetune's arguments instead of the flags
    model = tmp_path / "m"
    tiny_transformer.save(model, tokenizer=Tokenizer.train_chars(["abcdef"]).backend)  # ids < its vocabulary
    write_task(model, {"task": "translation"})
    measured = []
    monkeypatch.setattr(compression, "head_importance", lambda *a, **k: measured.append(a) or {})
    monkeypatch.setattr(compression, "choose_heads_greedy", lambda *a, **k: measured.append(a) or {})
    data = _pairs(tmp_path / "pairs.tsv", 20, random.Random(0))
    out = ["--out", str(tmp_path / "o"), "--prune-heads", "0.5", "--data", str(data)]
    cases = ((["--distill", "2"], "compress: --distill must be in [0, 1], got 2.0"),
             (["--distill", "nan"], "compress: --distill must be in [0, 1], got nan"),
             (["--temperature", "0", "--distill", "0.5"], "compress: --temperature must be a number > 0, got 0.0"),
             (["--temperature", "inf", "--greedy", "2"], "compress: --temperature must be a number > 0, got inf"),
             (["--lr", "-1"], "compress: --lr must be a number > 0, got -1.0"),
             (["--lr", "nan", "--greedy", "1"], "compress: --lr must be a number > 0, got nan"))
    for args, expected in cases:
        assert main(["compress", str(model), *out, *args]) == 2
        assert expected in capsys.readouterr().err
    assert not measured


def test_a_fraction_that_removes_no_head_is_refused_before_any_work(tmp_path, capsys, tiny_transformer, monkeypatch):
    # --prune-heads 0.01 of 24 heads (0.24, rounded to 0) measured every head, removed none, fine-tuned for 100
    # steps and wrote the model as "compressed"; so did --per-module 0.1 (0.4 of each module's 4 heads)
    model = tmp_path / "m"
    tiny_transformer.save(model, tokenizer=Tokenizer.train_chars(["abcdef"]).backend)
    write_task(model, {"task": "translation"})
    measured = []
    monkeypatch.setattr(compression, "head_importance", lambda *a, **k: measured.append(a) or {})
    data = str(_pairs(tmp_path / "pairs.tsv", 20, random.Random(0)))
    for args in (["--prune-heads", "0.01"], ["--prune-heads", "0.1", "--per-module"]):
        assert main(["compress", str(model), "--out", str(tmp_path / "o"), "--data", data, *args]) == 2
        assert f"--prune-heads {args[1]} removes no head of the 24" in capsys.readouterr().err
    assert not measured
    # whatever the importance (random here), choose_heads removes a head exactly where the refusal says it will
    modules = compression.attention_modules(tiny_transformer)
    importance = {name: torch.rand(attn.num_kv_heads) for name, attn in modules.items()}
    for per_module in (False, True):
        for fraction in (0.01, 0.02, 0.0208, 0.021, 0.03, 0.1, 0.125, 0.126, 0.2, 0.5):
            kept = compression.choose_heads(tiny_transformer, importance, fraction, per_module=per_module)
            removes = sum(map(len, kept.values())) < 24
            assert compression.removes_any_head(tiny_transformer, fraction, per_module=per_module) == removes


def test_keep_heads_that_keep_every_head_are_refused_before_any_work(tmp_path, capsys, tiny_transformer,
                                                                    monkeypatch):
    # --keep-heads {} (or every module's every head) read the data, fine-tuned for 100 steps and wrote the model
    # as "compressed" ("pruned to 24 of 24 heads"), as --prune-heads 0.01 did before it was refused
    model = tmp_path / "m"
    tiny_transformer.save(model, tokenizer=Tokenizer.train_chars(["abcdef"]).backend)
    write_task(model, {"task": "translation"})
    read = []
    monkeypatch.setattr(compression, "first_batches", lambda *a: read.append(a) or [])
    modules = compression.attention_modules(tiny_transformer)
    every = {name: list(range(attn.num_heads)) for name, attn in modules.items()}
    (tmp_path / "none.json").write_text("{}")
    (tmp_path / "every.json").write_text(json.dumps(every))
    data = str(_pairs(tmp_path / "pairs.tsv", 20, random.Random(0)))
    for name in ("none.json", "every.json"):
        assert main(["compress", str(model), "--out", str(tmp_path / "o"), "--data", data,
                     "--keep-heads", str(tmp_path / name)]) == 2
        assert "--keep-heads keeps every one of the 24 heads" in capsys.readouterr().err
    assert not read and not (tmp_path / "o").exists()
    one_fewer = {**every, "decoder.layers.1.cross_attn": [0, 1, 3]}  # one head fewer is pruned
    result = compression.compress(model, tmp_path / "o", data=[data], keep_heads=one_fewer, finetune_steps=0,
                                  log=lambda _: None)
    assert result["heads_after"] == 23 and len(read) == 1


def test_data_without_a_batch_is_named_by_its_files(tmp_path, capsys):
    # a header-only --data file said "the task data has no batches", naming neither --data nor the file
    data = _sentiment(tmp_path / "train.tsv", 60, random.Random(0))
    model = _train("classification", data, tmp_path / "run", "model.num_layers=1", "train.steps=2")
    (tmp_path / "empty.tsv").write_text("sentence\tlabel\n")
    capsys.readouterr()
    assert main(["compress", str(model), "--out", str(tmp_path / "o"), "--prune-heads", "0.5",
                 "--data", str(tmp_path / "empty.tsv")]) == 2
    assert f"compress --data {tmp_path / 'empty.tsv'}: no batches of rows in it" in capsys.readouterr().err


def test_keep_heads_given_a_model_directory_or_its_config_says_what_to_give(tmp_path, capsys, tiny_transformer):
    # --keep-heads PRUNED_MODEL said "PRUNED_MODEL: file not found" (it is there: a directory), and its config.json
    # "keep_heads names ['aliases', 'compression', 'config', ...], which are not attention modules"
    model = tmp_path / "m"
    tiny_transformer.save(model)
    write_task(model, {"task": "translation"})
    for given in (model, model / "config.json"):
        assert main(["compress", str(model), "--out", str(tmp_path / "o"), "--keep-heads", str(given),
                     "--data", "x"]) == 2
        err = capsys.readouterr().err
        what = "directory" if given == model else "model config"
        assert f"--keep-heads {given} is a {what}; give the JSON that `maskattn compress` printed" in err, err


def test_an_int8_model_is_refused_for_pruning_before_any_work(tmp_path, capsys, tiny_transformer, monkeypatch):
    # pruning an int8 model measured every head's importance, then failed in MultiHeadAttention.prune_heads
    # ("prune_heads: the projections are no longer nn.Linear (quantized?)"); with --keep-heads after reading the data
    compressed.quantize_linears(tiny_transformer)
    model = tmp_path / "q"
    tiny_transformer.save(model, tokenizer=Tokenizer.train_chars(["abcdef"]).backend)
    write_task(model, {"task": "translation"})
    read = []
    monkeypatch.setattr(compression, "first_batches", lambda *a: read.append(a) or [])
    (tmp_path / "keep.json").write_text(json.dumps({"encoder.layers.0.self_attn": [0, 1]}))
    data = str(_pairs(tmp_path / "pairs.tsv", 20, random.Random(0)))
    for args in (["--prune-heads", "0.5"], ["--keep-heads", str(tmp_path / "keep.json")]):
        assert main(["compress", str(model), "--out", str(tmp_path / "o"), "--data", data, *args]) == 2
        assert f"{model} is int8; prune the float model it was made from" in capsys.readouterr().err
    assert not read


def test_an_averaged_finetune_is_the_mean_of_the_shorter_runs_weights(tiny_transformer):
    # Under a constant schedule and one seed, the first S - K steps of an S-step fine-tune are the
    # (S - K)-step fine-tune, so the shorter runs are the snapshots the average must be made of.
    def run(steps, **average):
        model = copy.deepcopy(tiny_transformer)
        compression.finetune(model, _batches(model, count=4), steps=steps, lr=3e-3, seed=1, log=lambda _: None,
                             **average)
        return model.state_dict()

    snapshots = [run(steps) for steps in (4, 7, 10)]
    averaged = run(10, average_last=3, average_every=3)
    for name, value in averaged.items():
        expected = torch.stack([s[name].float() for s in snapshots]).mean(0)
        torch.testing.assert_close(value, expected.to(value.dtype), rtol=1e-6, atol=1e-7)
    moved = [name for name, value in averaged.items() if value.is_floating_point()
             and not torch.equal(snapshots[0][name], snapshots[2][name])]
    assert moved  # the snapshots differ, so the mean is not any one of them
    last = run(10, average_last=1, average_every=5)
    assert all(torch.equal(value, snapshots[2][name]) for name, value in last.items())


def test_averaging_refusals(tiny_transformer, tmp_path, capsys):
    data = _batches(tiny_transformer)
    cases = (({"average_last": 0}, "finetune average_last must be an int >= 1, got 0"),
             ({"average_last": 2, "average_every": True}, "finetune average_every must be an int >= 1, got True"),
             ({"average_last": 4, "average_every": 3, "fade_steps": 1},
              "average_last = 4 weights, 3 steps apart, start at step 1, which must come after step 1 (the fade"),
             ({"average_last": 3, "average_every": 5}, "start at step 0, which must come after step 0"))
    for settings, expected in cases:
        with pytest.raises(ValueError, match=re.escape(expected)):
            compression.finetune(tiny_transformer, data, steps=10, **settings)
    model = tmp_path / "m"
    tiny_transformer.save(model)
    write_task(model, {"task": "translation"})
    out = ["--out", str(tmp_path / "o"), "--data", "x"]
    assert main(["compress", str(model), *out, "--int8", "--average-last", "3"]) == 2
    assert "--average-last needs --prune-heads or --keep-heads" in capsys.readouterr().err
    assert main(["compress", str(model), *out, "--prune-heads", "0.5", "--finetune-steps", "10",
                 "--average-last", "6", "--average-every", "2"]) == 2
    assert "compress: --average-last = 6 weights, 2 steps apart, start at step 0" in capsys.readouterr().err


def test_compress_refuses_pruning_settings_without_pruning_and_int8_twice(tmp_path, capsys, tiny_transformer):
    # without pruning, --lr/--distill/--data/... were ignored (only --fade-steps was refused); --max-tokens 0 ran;
    # --int8 of an int8 model wrote a copy
    model = tmp_path / "m"
    tiny_transformer.save(model)
    write_task(model, {"task": "translation"})
    out = ["--out", str(tmp_path / "o")]
    cases = ((["--int8", "--lr", "0.001"], "--lr needs --prune-heads or --keep-heads"),
             (["--int8", "--data", "x"], "--data needs --prune-heads or --keep-heads"),
             (["--int8", "--distill", "0.5"], "--distill needs --prune-heads"),
             (["--int8", "--bf16"], "--bf16 needs --prune-heads"),
             (["--int8", "--average-every", "5"], "--average-every needs --prune-heads"),
             (["--int8", "--max-tokens", "4096"], "--max-tokens needs --prune-heads"),
             (["--prune-heads", "0.5", "--average-every", "5"], "--average-every sets the steps between averaged"),
             (["--prune-heads", "0.5", "--max-tokens", "0"], "--max-tokens must be an int >= 1, got 0"),
             (["--prune-heads", "0.5", "--finetune-steps", "-1"], "--finetune-steps must be an int >= 0, got -1"),
             (["--prune-heads", "0.5", "--importance-batches", "0"], "--importance-batches must be an int >= 1"),
             # --float-embeddings without --int8 was dropped without a word
             (["--prune-heads", "0.5", "--data", "x", "--float-embeddings"], "--float-embeddings needs --int8"))
    for args, expected in cases:
        assert main(["compress", str(model), *out, *args]) == 2
        assert expected in capsys.readouterr().err
    assert main(["compress", str(model), "--out", str(tmp_path / "q"), "--int8"]) == 0
    capsys.readouterr()
    assert main(["compress", str(tmp_path / "q"), "--out", str(tmp_path / "qq"), "--int8"]) == 2
    assert "is already int8" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_compress_int8_of_a_model_saved_in_another_dtype_loads_and_runs_in_it(tmp_path, dtype):
    # Int8Linear.from_float / Int8TokenEmbedding.from_float made float32 scales and biases whatever the model's
    # dtype: `compress --int8` of a model saved in bfloat16 wrote a file of two float dtypes that load() refused
    # ("tensor 'decoder.layers.0.ffn_block.norm.bias' is (32,) torch.bfloat16, expected (32,) torch.float32"), and
    # the in-memory model's int8 token table gave float32 into bfloat16 layers ("mixed dtype (CPU)").
    from maskattn.layers import Int8TokenEmbedding

    torch.manual_seed(0)
    model = maskattn.DecoderLM(maskattn.DecoderLMConfig.preset("tiny")).to(dtype).eval()
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        float_out = model(ids)
    model.save(tmp_path / "m")
    write_task(tmp_path / "m", {"task": "lm"})
    compression.compress(tmp_path / "m", tmp_path / "int8", int8=True, log=lambda _: None)
    loaded = maskattn.load(tmp_path / "int8").eval()
    int8 = [m for m in loaded.modules() if isinstance(m, Int8Linear | Int8TokenEmbedding)]
    assert isinstance(loaded.embed.tokens, Int8TokenEmbedding) and len(int8) > 8
    for m in int8:  # oracle: each stored int8 value times its channel's scale is the float weight, to half a step
        bias = getattr(m, "bias", None)
        assert m.weight_scale.dtype == dtype and (bias is None or bias.dtype == dtype)
        name = next(n for n, x in loaded.named_modules() if x is m)
        weight = model.get_submodule(name).weight.detach().double()
        scale = m.weight_scale.double()[:, None]
        assert ((m.weight.double() * scale - weight).abs() <= scale * 0.51).all(), name
    with torch.no_grad():
        out = loaded(ids)
    assert out.dtype == dtype
    assert (out.double() - float_out.double()).abs().max() < 0.05 * float_out.double().abs().max()
    in_memory = copy.deepcopy(model)
    compressed.quantize_linears(in_memory, tied=True)
    with torch.no_grad():
        assert torch.equal(in_memory(ids), out)  # the save/load round trip: bit-identical
