"""EncoderModel: padding invariance and the classification / span heads."""

import pytest
import torch
from torch import nn

from maskattn.models import EncoderConfig, EncoderModel


def test_padding_does_not_change_real_positions():
    model = EncoderModel(EncoderConfig.preset("tiny", num_labels=3)).eval()
    ids = torch.randint(1, 64, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded)[:, :5], model(ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.classify(padded), model.classify(ids), atol=1e-5, rtol=0)
        mask = torch.tensor([[1] * 5 + [0] * 3])
        torch.testing.assert_close(model(padded, mask), model(padded, lengths=[5]), atol=0, rtol=0)


def _torch_layer(ours, c: EncoderConfig) -> tuple[nn.TransformerEncoderLayer, list]:
    """nn.TransformerEncoderLayer (post-LN, GELU: BERT's layer) holding a copy of our layer's weights, and
    ``(our parameter, its torch parameter, rows)`` for each of our parameters."""
    ref = nn.TransformerEncoderLayer(c.d_model, c.num_heads, c.d_ff, dropout=0.0, activation="gelu",
                                     layer_norm_eps=c.norm_eps, batch_first=True).double()
    a, t, d = ours.self_attn, ref.self_attn, c.d_model
    pairs = [(getattr(a, f"{n}_proj").weight, t.in_proj_weight, slice(i * d, (i + 1) * d)) for i, n in enumerate("qkv")]
    pairs += [(getattr(a, f"{n}_proj").bias, t.in_proj_bias, slice(i * d, (i + 1) * d)) for i, n in enumerate("qkv")]
    for mine, theirs in ((a.out_proj, t.out_proj), (ours.ffn.up, ref.linear1), (ours.ffn.down, ref.linear2),
                         (ours.self_attn_block.norm, ref.norm1), (ours.ffn_block.norm, ref.norm2)):
        pairs += [(mine.weight, theirs.weight, slice(None)), (mine.bias, theirs.bias, slice(None))]
    with torch.no_grad():
        for mine, theirs, rows in pairs:
            theirs[rows] = mine
    return ref, pairs


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
def test_heads_equal_a_bert_built_from_torch_layers_forward_and_gradients():
    # Oracle: BERT written with torch's own modules (embedding sum and LayerNorm, nn.TransformerEncoderLayer,
    # tanh pooler on the first token, linear heads) and copies of our weights, on a right-padded batch.
    c = EncoderConfig.preset("tiny", num_labels=4, span_head=True, dropout=0.0, attention_dropout=0.0)
    model = EncoderModel(c).double()
    refs, pairs = zip(*(_torch_layer(layer, c) for layer in model.encoder.layers), strict=True)
    pairs = [pair for layer in pairs for pair in layer]
    ids = torch.randint(1, 64, (3, 7))
    pad = torch.arange(7) >= torch.tensor([7, 4, 2])[:, None]  # (B, L) torch's convention: True = masked
    ids[pad] = 0
    types = (torch.arange(7) >= 3).long().expand(3, -1)
    got = [model.classify(ids, token_type_ids=types), *model.span_logits(ids, token_type_ids=types)]

    e, m = model.embed, model
    x = e.tokens.weight[ids] + e.positions.weight[:7] + e.token_types.weight[types]  # (B, L, E)
    x = nn.functional.layer_norm(x, (c.d_model,), e.norm.weight, e.norm.bias, c.norm_eps)
    for ref in refs:
        x = ref.train()(x, src_key_padding_mask=pad)  # train mode: torch's eval fast path zeroes padded rows
    pooled = torch.tanh(x[:, 0] @ m.pooler.weight.T + m.pooler.bias)  # (B, E)
    spans = x @ m.span_head.weight.T + m.span_head.bias  # (B, L, 2)
    want = [pooled @ m.classifier.weight.T + m.classifier.bias, spans[..., 0], spans[..., 1]]
    for ours, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)

    # Gradients of one random weighting of the three outputs: embeddings and heads (shared by both
    # computations) and every layer parameter against its torch counterpart.
    weights = [torch.randn_like(t) for t in got]
    shared = [e.tokens.weight, e.positions.weight, e.token_types.weight, e.norm.weight, e.norm.bias,
              *m.pooler.parameters(), *m.classifier.parameters(), *m.span_head.parameters()]
    ref_params = [p for ref in refs for p in ref.parameters()]
    ours = torch.autograd.grad(sum((a * w).sum() for a, w in zip(got, weights, strict=True)),
                               shared + [p for p, _, _ in pairs])
    theirs = torch.autograd.grad(sum((a * w).sum() for a, w in zip(want, weights, strict=True)), shared + ref_params)
    for a, b in zip(ours[:len(shared)], theirs[:len(shared)], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    by_param = {id(p): g for p, g in zip(ref_params, theirs[len(shared):], strict=True)}
    for (_, theirs_param, rows), grad in zip(pairs, ours[len(shared):], strict=True):
        torch.testing.assert_close(grad, by_param[id(theirs_param)][rows], atol=1e-10, rtol=1e-8)


def test_missing_heads_and_bad_masks_are_clear_errors():
    model = EncoderModel(EncoderConfig.preset("tiny"))
    ids = torch.randint(1, 64, (2, 5))
    with pytest.raises(ValueError, match="no classification head"):
        model.classify(ids)
    with pytest.raises(ValueError, match="no span head"):
        model.span_logits(ids)
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        model(ids, torch.ones(2, 4))


@pytest.mark.parametrize("pooler", [False, True])
def test_mean_pooling_averages_the_real_tokens_only(pooler):
    """Oracle: the mean of forward()'s hidden states over the real positions, computed row by row."""
    torch.manual_seed(0)
    cfg = EncoderConfig.preset("tiny", num_labels=3, pooling="mean", pooler=pooler, dropout=0.0, attention_dropout=0.0)
    model = EncoderModel(cfg).eval()
    ids = torch.randint(3, cfg.vocab_size, (3, 7))
    lengths = torch.tensor([7, 4, 1])
    hidden = model(ids, lengths=lengths)
    pooled = torch.stack([hidden[i, :n].mean(0) for i, n in enumerate(lengths.tolist())])
    if pooler:
        pooled = torch.tanh(model.pooler(pooled))
    torch.testing.assert_close(model.classify(ids, lengths=lengths), model.classifier(pooled))
    # a padded row classifies like the same row alone
    torch.testing.assert_close(model.classify(ids[1:2, :4]), model.classify(ids, lengths=lengths)[1:2])


def test_unknown_pooling_is_a_clear_error():
    with pytest.raises(ValueError, match="pooling must be one of"):
        EncoderConfig.preset("tiny", pooling="max")


def test_a_forward_reads_ids_and_token_types_once_each_and_its_own_positions_never(host_reads):
    # positions built from arange were read back to be checked, and ids and token types each read min and max apiece
    model = EncoderModel(EncoderConfig.preset("tiny", vocab_size=11, type_vocab_size=2)).eval()
    host_reads.uncounted(model.encoder)  # the attention layers' own reads are not counted here
    # lengths given as a list are checked on the host: only the ids are read
    ids, types = torch.randint(0, 11, (2, 6)), torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    for extra, reads_allowed in (({}, 1), ({"token_type_ids": types}, 2), ({"lengths": [6, 3]}, 1)):
        with torch.no_grad(), host_reads() as reads:
            model(ids, **extra)
        assert reads.count == reads_allowed, (extra, reads.count)


def test_token_type_ids_are_checked_like_input_ids():
    c = EncoderConfig(vocab_size=20, d_model=16, num_heads=2, d_ff=32, num_layers=1, max_len=32, type_vocab_size=2)
    model = EncoderModel(c).eval()
    ids = torch.randint(4, 20, (2, 5))
    for types, error, words in (
        (torch.full((2, 5), 5), ValueError, r"token_type_ids: ids must be in \[0, 2\), got values in \[5, 5\]"),
        (torch.zeros(2, 4, dtype=torch.long), ValueError, r"shape of input_ids \(2, 5\), got \(2, 4\)"),
        (torch.zeros(1, 5, dtype=torch.long), ValueError, r"shape of input_ids \(2, 5\), got \(1, 5\)"),  # no broadcast
        (torch.zeros(2, 5), TypeError, "token_type_ids: ids must be an integer tensor"),
    ):
        with pytest.raises(error, match=words):
            model(ids, token_type_ids=types)
    # the oracle for a valid call: the token-type row added to every embedding by hand
    types = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    with torch.no_grad():
        shifted = EncoderModel(c).eval()
        shifted.load_state_dict(model.state_dict())
        shifted.embed.token_types.weight[0] = model.embed.token_types.weight[1]  # type 0 now reads type 1's row
        torch.testing.assert_close(model(ids, token_type_ids=torch.ones_like(ids)), shifted(ids))
    # a model without a token-type table reads none (QA hands segments to every encoder it fine-tunes)
    no_table = EncoderModel(EncoderConfig(vocab_size=20, d_model=16, num_heads=2, d_ff=32, num_layers=1, max_len=32,
                                          type_vocab_size=0)).eval()
    with torch.no_grad():
        assert torch.equal(no_table(ids, token_type_ids=types), no_table(ids))


def test_lengths_beside_an_attention_mask_is_refused():
    model = EncoderModel(EncoderConfig(vocab_size=20, d_model=16, num_heads=2, d_ff=32, num_layers=1, max_len=32))
    ids = torch.randint(4, 20, (2, 5))
    with pytest.raises(ValueError, match="attention_mask or lengths, not both"):
        model(ids, torch.ones(2, 5, dtype=torch.long), lengths=[3, 3])


def test_an_attention_mask_of_other_values_than_one_and_zero_is_refused():
    # An additive 2-D mask (0 keep, -10000 or -inf hide) was read by .bool() as "every token real": padding was
    # attended without a word. The oracle for the masks that are accepted: lengths, which say the same.
    torch.manual_seed(0)
    model = EncoderModel(EncoderConfig(vocab_size=20, d_model=16, num_heads=2, d_ff=32, num_layers=1, max_len=32))
    model.eval()
    ids = torch.randint(4, 20, (2, 5))
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        by_lengths = model(ids, lengths=[5, 3])
        for mask in (keep, keep.bool(), keep.float(), keep.to(torch.int8)):
            assert torch.equal(model(ids, mask), by_lengths)
        for additive in ((keep - 1) * 10000, torch.where(keep.bool(), 0.0, float("-inf")), keep * 2):
            with pytest.raises(ValueError, match=r"attention_mask must hold 1 for real tokens and 0 for padding"):
                model(ids, additive)
