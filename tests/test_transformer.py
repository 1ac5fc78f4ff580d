"""Transformer against torch.nn.Transformer with copied weights, and the base preset's size."""

import copy
import re

import pytest
import torch
from torch import nn

from maskattn import decoding
from maskattn.models import Transformer, TransformerConfig
from maskattn.models.common import key_valid


def _copy_attention(theirs: nn.MultiheadAttention, ours) -> None:
    wq, wk, wv = theirs.in_proj_weight.split(theirs.embed_dim)
    bq, bk, bv = theirs.in_proj_bias.split(theirs.embed_dim)
    for proj, w, b in ((ours.q_proj, wq, bq), (ours.k_proj, wk, bk), (ours.v_proj, wv, bv),
                       (ours.out_proj, theirs.out_proj.weight, theirs.out_proj.bias)):
        proj.weight.copy_(w)
        proj.bias.copy_(b)


def _copy_linear_norm(pairs) -> None:
    for theirs, ours in pairs:
        ours.weight.copy_(theirs.weight)
        ours.bias.copy_(theirs.bias)


@torch.no_grad()
def _copy_into(ref: nn.Transformer, model: Transformer) -> None:
    for theirs, ours in zip(ref.encoder.layers, model.encoder.layers, strict=True):
        _copy_attention(theirs.self_attn, ours.self_attn)
        _copy_linear_norm([(theirs.linear1, ours.ffn.up), (theirs.linear2, ours.ffn.down),
                           (theirs.norm1, ours.self_attn_block.norm), (theirs.norm2, ours.ffn_block.norm)])
    for theirs, ours in zip(ref.decoder.layers, model.decoder.layers, strict=True):
        _copy_attention(theirs.self_attn, ours.self_attn)
        _copy_attention(theirs.multihead_attn, ours.cross_attn)
        _copy_linear_norm([(theirs.linear1, ours.ffn.up), (theirs.linear2, ours.ffn.down),
                           (theirs.norm1, ours.self_attn_block.norm), (theirs.norm2, ours.cross_attn_block.norm),
                           (theirs.norm3, ours.ffn_block.norm)])
    if model.config.use_final_norm:
        _copy_linear_norm([(ref.encoder.norm, model.encoder.norm), (ref.decoder.norm, model.decoder.norm)])


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
def test_matches_torch_transformer_forward_and_gradients(norm_first):
    config = TransformerConfig.preset("tiny", norm_first=norm_first, dropout=0.0)
    model = Transformer(config)
    c = config
    ref = nn.Transformer(c.d_model, c.num_heads, c.num_encoder_layers, c.num_decoder_layers, c.d_ff,
                         dropout=0.0, batch_first=True, norm_first=norm_first)
    if not norm_first:  # the paper's post-LN model has no final LayerNorm; nn.Transformer always adds one
        ref.encoder.norm, ref.decoder.norm = nn.Identity(), nn.Identity()
    _copy_into(ref, model)
    outer = copy.deepcopy(model)  # supplies embeddings and output projection around the reference
    ref.train(), model.train(), outer.train()  # train mode: nn.Transformer's fast path is eval-only

    src = torch.randint(3, c.vocab_size, (3, 9))
    tgt = torch.randint(3, c.vocab_size, (3, 6))
    src_lengths, tgt_lengths = torch.tensor([9, 5, 2]), torch.tensor([6, 6, 3])
    src_pad = torch.arange(9) >= src_lengths[:, None]  # torch's convention: True = masked
    tgt_pad = torch.arange(6) >= tgt_lengths[:, None]
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)

    logits = model(src, tgt, src_lengths=src_lengths, tgt_lengths=tgt_lengths)
    src_x, _ = outer.src_embed(src, torch.arange(9).expand(3, -1))
    tgt_x, _ = outer.tgt_embed(tgt, torch.arange(6).expand(3, -1))
    hidden = ref(src_x, tgt_x, tgt_mask=causal, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
                 memory_key_padding_mask=src_pad)
    expected = outer.out_proj(hidden)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)

    weights = torch.randn_like(logits)
    (logits * weights).sum().backward()
    (expected * weights).sum().backward()
    for theirs, ours in zip(ref.encoder.layers, model.encoder.layers, strict=True):
        torch.testing.assert_close(ours.ffn.up.weight.grad, theirs.linear1.weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.self_attn_block.norm.weight.grad, theirs.norm1.weight.grad,
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.cat([ours.self_attn.q_proj.weight.grad, ours.self_attn.k_proj.weight.grad,
                                              ours.self_attn.v_proj.weight.grad]),
                                   theirs.self_attn.in_proj_weight.grad, atol=1e-5, rtol=1e-4)
    for theirs, ours in zip(ref.decoder.layers, model.decoder.layers, strict=True):
        torch.testing.assert_close(ours.cross_attn.out_proj.weight.grad, theirs.multihead_attn.out_proj.weight.grad,
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.ffn.down.weight.grad, theirs.linear2.weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.cross_attn_block.norm.bias.grad, theirs.norm2.bias.grad, atol=1e-5, rtol=1e-4)
    # The shared embedding / output matrix collects gradients from all three uses in both models.
    torch.testing.assert_close(model.src_embed.tokens.weight.grad, outer.src_embed.tokens.weight.grad,
                               atol=1e-5, rtol=1e-4)


def test_padding_ids_give_the_same_masks_as_lengths():
    model = Transformer(TransformerConfig.preset("tiny")).eval()
    src = torch.randint(3, 64, (2, 7))
    tgt = torch.randint(3, 64, (2, 5))
    src[1, 4:] = 0
    tgt[1, 3:] = 0
    by_ids = model(src, tgt)
    by_lengths = model(src, tgt, src_lengths=[7, 4], tgt_lengths=[5, 3])
    torch.testing.assert_close(by_ids, by_lengths, atol=0, rtol=0)
    # The real positions do not depend on how much padding follows them.
    alone = model(src[1:, :4], tgt[1:, :3])
    torch.testing.assert_close(by_ids[1:, :3], alone, atol=1e-5, rtol=1e-5)


def test_base_preset_has_the_papers_size():
    # Vaswani et al. (2017), Table 3: the base model has 65M parameters with a shared source-target
    # BPE vocabulary of about 37000 tokens (WMT 2014 en-de). With exactly 37000:
    #   embeddings (shared with the output projection): 37000 * 512            = 18,944,000
    #   encoder layer: attention 4 * (512*512 + 512) + FFN 2*512*2048 + 2048 + 512 + 2 LayerNorms = 3,152,384
    #   decoder layer: two attentions + FFN + 3 LayerNorms                        = 4,204,032
    #   total: 18,944,000 + 6 * 3,152,384 + 6 * 4,204,032                        = 63,082,496
    config = TransformerConfig.preset("base")
    assert (config.vocab_size, config.d_model, config.num_heads, config.d_ff) == (37000, 512, 8, 2048)
    assert (config.num_encoder_layers, config.num_decoder_layers, config.dropout) == (6, 6, 0.1)
    model = Transformer(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == 63_082_496
    assert abs(count - 65e6) / 65e6 < 0.05
    assert model.out_proj.weight is model.tgt_embed.tokens.weight is model.src_embed.tokens.weight


def test_the_lengths_check_reads_the_device_once(host_reads):
    # key_valid read the lengths' min and max apiece: two waits for a GPU per forward and per lengths argument
    model, src = Transformer(TransformerConfig.preset("tiny")).eval(), torch.randint(3, 64, (2, 7))
    for given in ([7, 2], [1, 7]):
        with host_reads() as reads:
            valid = key_valid(src, torch.tensor(given), None, "src")
        assert reads.count == 1, (given, reads.count)
        assert valid.tolist() == [[j < n for j in range(7)] for n in given]
    for given in ([0, 3], [3, 8]):
        message = rf"^src_lengths must be in \[1, 7\], got \{given}$"
        with host_reads() as reads, pytest.raises(ValueError, match=message):
            model(src, src, src_lengths=given)
        assert reads.count == 0, (given, reads.count)  # lengths given as a list are checked on the host


@pytest.mark.parametrize("lengths", [None, [7, 3], torch.tensor([7, 3])])
def test_the_start_of_a_generation_reads_the_source_but_never_the_bos_it_builds(host_reads, lengths):
    # begin_decoding checked the BOS ids it fills itself (the config holds bos_id < V): one more wait for a GPU per
    # generation. Oracle: the source's ids check, and its lengths' when a tensor; the first logits are the full
    # forward's of [BOS]; a token fed by the caller is still checked.
    model = Transformer(TransformerConfig.preset("tiny", vocab_size=11)).eval()
    host_reads.uncounted(model.encoder)  # the attention layers' own reads are not counted here
    host_reads.uncounted(model.decoder)
    src = torch.randint(3, 11, (2, 7))
    with torch.no_grad(), host_reads() as reads:
        state, first = model.begin_decoding(src, lengths, max_new_tokens=4)
    assert reads.count == 1 + isinstance(lengths, torch.Tensor), reads.count
    bos = torch.full((2, 1), model.config.bos_id)
    with torch.no_grad():
        torch.testing.assert_close(first, model(src, bos, src_lengths=lengths)[:, -1], atol=1e-5, rtol=1e-5)
    with torch.no_grad(), pytest.raises(ValueError, match=r"^ids must be in \[0, 11\), got values in \[4, 11\]$"):
        model.step(state, torch.tensor([[4], [11]]))


def test_bad_inputs_name_the_argument():
    model = Transformer(TransformerConfig.preset("tiny"))
    src = torch.randint(3, 64, (2, 7))
    with pytest.raises(ValueError, match="src_lengths must be in"):
        model(src, src, src_lengths=[8, 2])
    with pytest.raises(ValueError, match="ids must be in"):
        model(src + 100, src)
    with pytest.raises(ValueError, match=r"tgt and the source \(memory\) must share the batch size: tgt \(1, 3\)"):
        model(src, src[:1, :3])  # was "batch sizes differ: q has B=1, k has B=2": arguments the user never passed
    with pytest.raises(TypeError, match="TransformerConfig"):
        Transformer({"d_model": 8})
    # a source or target longer than the positions: "positions must be in [0, max_len=64), got values in [0, 69]",
    # naming neither (also from decoding.greedy / beam_search, whose argument is the source)
    long = torch.randint(3, 64, (1, 70))
    with pytest.raises(ValueError, match=re.escape("src has 70 tokens, more than the model's max_len (64)")):
        model(long, src[:1])
    with pytest.raises(ValueError, match=re.escape("src has 70 tokens, more than the model's max_len (64)")):
        decoding.greedy(model, long, max_new_tokens=3)
    with pytest.raises(ValueError, match=re.escape("tgt has 70 tokens, more than the model's max_len (64)")):
        model(src[:1], long)
    assert model(long[:, :64], long[:, :64]).shape == (1, 64, 64)  # max_len tokens fit


def test_decode_takes_the_memory_and_valid_mask_that_encode_gives():
    # a (1, Ls) memory_valid was broadcast over a batch of 2 (row 0's padding hid row 1's real tokens), a (B,)
    # int tensor was read as source lengths, and a 2-D memory was "must share the batch size"
    model = Transformer(TransformerConfig.preset("tiny")).eval()
    src, tgt = torch.randint(3, 64, (2, 6)), torch.randint(3, 64, (2, 4))
    memory, valid = model.encode(src, [3, 6])
    for bad in (valid[:1], valid[:, :5], torch.tensor([3, 6]), valid.long(), valid[:, None], valid.numpy()):
        got = tuple(bad.shape) if isinstance(bad, torch.Tensor) else "ndarray"
        with pytest.raises(ValueError, match=rf"memory_valid must be None or a \(B, Ls\) = \(2, 6\) bool tensor.*"
                                             rf"got {re.escape(str(got))}"):
            model.decode(tgt, memory, bad)
    with pytest.raises(ValueError, match=r"memory must be a \(B, Ls, E\) = \(2, Ls, 32\) tensor.*got \(6, 32\)"):
        model.decode(tgt, memory[0], None)
    # the oracle of a valid call: each row decoded alone, from its own source
    both = model.decode(tgt, memory, valid)
    alone = model.decode(tgt[1:], *model.encode(src[1:], [6]))
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)
    assert model.decode(tgt, memory, None).shape == (2, 4, 64)


def test_attention_weights_come_back_on_request_only():
    model = Transformer(TransformerConfig.preset("tiny")).eval()
    src = torch.randint(3, 64, (2, 7))
    tgt = torch.randint(3, 64, (2, 5))
    with torch.no_grad():
        logits, weights = model(src, tgt, src_lengths=[7, 3], return_weights=True)
        # weights come from the reference backend, the plain call may run a fused one: equal to rounding
        torch.testing.assert_close(logits, model(src, tgt, src_lengths=[7, 3]), atol=1e-5, rtol=0)
    assert len(weights["encoder"]) == 2 and len(weights["decoder"]) == 2
    cross = weights["decoder"][-1]["cross"]
    assert cross.shape == (2, 4, 5, 7)
    torch.testing.assert_close(cross.sum(-1), torch.ones(2, 4, 5))
    assert (cross[1, :, :, 3:] == 0).all()  # source padding gets no weight
    assert (weights["decoder"][0]["self"][0].triu(1) == 0).all()  # causal
    assert not any(isinstance(v, torch.Tensor) and v.dim() == 4 for v in vars(model.decoder.layers[0]).values())


def test_summary_lists_layers_shapes_and_counts():
    model = Transformer(TransformerConfig.preset("tiny"))
    table = model.summary(print_fn=None)
    lines = table.splitlines()
    assert any(line.startswith("src_embed (Embedder)") and "(1, 8, 32)" in line for line in lines)
    assert any("layers.1 (DecoderLayer)" in line and "(1, 8, 32)" in line and "12,832" in line for line in lines)
    assert any(line.startswith("out_proj (Linear)") and "(1, 8, 64)" in line for line in lines)
    assert f"Total params: {sum(p.numel() for p in model.parameters()):,}" in table
    assert model.training  # the summary's forward pass restores the mode


def test_summary_depth_lists_each_level_and_refuses_what_is_not_a_depth():
    # depth="2" failed in a comparison ("'<=' not supported between 'int' and 'str'"); -1 printed an empty table
    model = Transformer(TransformerConfig.preset("tiny"))
    rows = {depth: [line for line in model.summary(depth=depth, print_fn=None).splitlines() if "(" in line
                    and not line.startswith("Layer")] for depth in (0, 1, 2)}
    top = [name for name, _ in model.named_children()]  # the oracle: the model's own module tree
    assert rows[0] == [] and [line.split(" (")[0] for line in rows[1]] == top and len(rows[2]) > len(rows[1])
    for depth in ("2", -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"^summary: depth must be an int >= 0 .*, got {re.escape(repr(depth))}$"):
            model.summary(depth=depth, print_fn=None)


def test_dropout_acts_in_training_only():
    model = Transformer(TransformerConfig.preset("tiny", dropout=0.1))
    src = torch.randint(3, 64, (2, 7))
    assert not torch.equal(model(src, src), model(src, src))
    model.eval()
    assert torch.equal(model(src, src), model(src, src))
