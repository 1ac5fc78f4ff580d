"""The leak audit passes on every model and layer with its standard masks, and catches broken ones."""

import math
import re

import pytest
import torch
from torch import nn

import maskattn
from maskattn import MultiHeadAttention, masks
from maskattn.audit import audit_call, audit_layer, audit_model
from maskattn.models import (
    AttentionSite,
    AuditProbe,
    DecoderLM,
    DecoderLMConfig,
    EncoderConfig,
    EncoderModel,
    Inspectable,
    ProbeCheck,
    ProbeInput,
    Transformer,
    TransformerConfig,
)


class ArticleAttention(MultiHeadAttention):
    """The seed article's layer: scores multiplied by a 0/1 mask, so hidden keys still get weight."""

    def forward(self, query, key=None, value=None, *, mask=None, **kwargs):
        key = query if key is None else key
        value = key if value is None else value
        b, lq, _ = query.shape
        q = self.q_proj(query).view(b, lq, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(key).view(b, key.shape[1], self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(value).view(b, key.shape[1], self.num_heads, -1).transpose(1, 2)
        keep = mask.to_dense(lq, key.shape[1]).float()
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) * keep, dim=-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, lq, -1))


class OffByOneCausal(MultiHeadAttention):
    """Claims causal masking but builds tril(diagonal=1): every token sees its successor."""

    def forward(self, query, key=None, value=None, *, mask=None, **kwargs):
        n = query.shape[1]
        wrong = masks.from_tensor(torch.ones(n, n, dtype=torch.bool).tril(1))
        return super().forward(query, key, value, mask=wrong, **kwargs)


class QueryPadding(MultiHeadAttention):
    """Applies the key-padding mask to the queries (rows) instead of the keys (columns)."""

    def forward(self, query, key=None, value=None, *, mask=None, **kwargs):
        dense = mask.to_dense(query.shape[1], query.shape[1])  # (B, 1, L, L): column j valid
        valid_rows = dense[:, :, :1, :].transpose(-1, -2)  # (B, 1, L, 1): row i valid
        return super().forward(query, key, value, mask=masks.from_tensor(valid_rows), **kwargs)


class LengthLeakingPositions(nn.Module):
    """Positions counted from the end of the sequence: position t knows how long the future is."""

    def forward(self, ids):
        n = ids.shape[1]
        return torch.arange(n - 1, -1, -1).expand_as(ids)


@pytest.mark.parametrize("mask", [masks.causal(), masks.causal() & masks.sliding_window(3),
                                  masks.padding([12, 7]), masks.prefix_lm(4)])
def test_correct_layer_passes(mask):
    report = audit_layer(MultiHeadAttention(16, 4), mask, length=12)
    assert report.ok, str(report)
    assert report.verdicts[0].checked_pairs > 0


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_an_audit_called_without_autograd_still_differentiates(context):
    # under no_grad / inference_mode the Jacobian check failed: "element 0 of tensors does not require grad"
    layer, model = MultiHeadAttention(16, 4), DecoderLM(DecoderLMConfig.preset("tiny")).eval()  # built outside
    with context():
        assert audit_layer(layer, masks.causal(), length=8).ok
        assert maskattn.audit(model).ok


def test_correct_cross_attention_passes():
    report = audit_layer(MultiHeadAttention(16, 4), masks.padding([5, 9]), length=6, cross_length=9)
    assert report.ok, str(report)


def test_article_layer_leaks_and_names_pairs():
    report = audit_layer(ArticleAttention(16, 4), masks.causal(), length=8)
    assert not report.ok
    _b, q, k = report.verdicts[0].leaks[0]
    assert k > q  # a query saw a later key
    assert "LEAK" in str(report) and f"q{q}->k{k}" in str(report)


def test_off_by_one_causal_leaks_its_successor():
    verdict = audit_layer(OffByOneCausal(16, 4), masks.causal(), length=8).verdicts[0]
    assert not verdict.ok
    assert all(k == q + 1 for _, q, k in verdict.leaks)


def test_padding_on_queries_instead_of_keys_leaks_padded_keys():
    verdict = audit_layer(QueryPadding(16, 4), masks.padding([8, 5]), length=8).verdicts[0]
    assert not verdict.ok
    assert all(b == 1 and k >= 5 for b, q, k in verdict.leaks)


def _tiny(kind, **kw):
    if kind == "transformer":
        return Transformer(TransformerConfig.preset("tiny", **kw))
    if kind == "decoder":
        return DecoderLM(DecoderLMConfig.preset("tiny", **kw))
    return EncoderModel(EncoderConfig.preset("tiny", **kw))


@pytest.mark.parametrize("kind", ["transformer", "decoder", "encoder"])
@pytest.mark.parametrize("positions", ["sinusoidal", "rope", "learned"])
def test_every_model_passes(kind, positions):
    torch.manual_seed(0)
    report = audit_model(_tiny(kind, positions=positions), length=8)
    assert report.ok, str(report)
    assert len(report.verdicts) >= 3


def test_decoder_whose_positions_leak_future_length_fails():
    torch.manual_seed(0)
    model = _tiny("decoder", positions="learned")
    import maskattn.models.decoder_lm as decoder_lm

    original = decoder_lm.default_positions
    decoder_lm.default_positions = lambda ids, offset=0: LengthLeakingPositions()(ids) + offset
    try:
        report = audit_model(model, length=8)
    finally:
        decoder_lm.default_positions = original
    assert not report.ok
    failed = [v for v in report.verdicts if not v.ok]
    assert any("length of the future" in v.how for v in failed), str(report)


def test_top_level_audit_function():
    import maskattn

    assert maskattn.audit(MultiHeadAttention(16, 4), masks.causal(), length=6).ok
    assert not maskattn.audit(ArticleAttention(16, 4), masks.causal(), length=6).ok
    assert maskattn.audit(_tiny("decoder"), length=6).ok
    with pytest.raises(ValueError, match="models build their own masks"):
        maskattn.audit(_tiny("decoder"), masks.causal())


class Wrapped(nn.Module):
    """Not a maskattn model class, and its module names start with ``body.``: audited and drawn from
    its declarations alone (as an adapter for another library's models would be)."""

    def __init__(self, inner):
        super().__init__()
        self.body, self.config = inner, inner.config

    def forward(self, *args, **kwargs):
        return self.body(*args, **kwargs)

    def attention_sites(self):
        return {f"body.{name}": site for name, site in self.body.attention_sites().items()}

    def audit_probe(self):
        return self.body.audit_probe()


@pytest.mark.parametrize("kind", ["transformer", "decoder", "encoder"])
def test_models_declare_every_attention_module_with_its_kind(kind):
    model = _tiny(kind)
    sites = model.attention_sites()
    assert list(sites) == [n for n, m in model.named_modules() if isinstance(m, MultiHeadAttention)]
    for name, site in sites.items():
        expected = ("cross" if name.endswith("cross_attn") else "self-bidirectional" if name.startswith("encoder")
                    else "self-causal")
        assert site == AttentionSite(expected, int(name.split(".")[2]))
    assert isinstance(model, Inspectable)


@pytest.mark.parametrize("kind", ["transformer", "encoder"])
def test_audit_reads_declarations_not_model_classes(kind):
    torch.manual_seed(0)
    model = _tiny(kind)
    direct = str(audit_model(model, length=7))
    wrapped = str(audit_model(Wrapped(model), length=7))
    assert wrapped == direct.replace("PASS  encoder.", "PASS  body.encoder.").replace("PASS  decoder.",
                                                                                      "PASS  body.decoder.")
    assert "body.encoder.layers.0.self_attn (self-attention)" in wrapped


def test_audit_of_an_undeclared_model_is_a_type_error():
    with pytest.raises(TypeError, match="audit_model takes a maskattn model, got Linear; use audit_layer"):
        audit_model(nn.Linear(2, 2))


def test_declarations_are_validated():
    with pytest.raises(ValueError, match=r"kind must be one of \['self-causal', 'self-bidirectional', 'cross'\], "
                                         r"got 'causal'"):
        AttentionSite("causal", 0)
    with pytest.raises(ValueError, match="layer must be an int >= 0, got -1"):
        AttentionSite("cross", -1)
    with pytest.raises(ValueError, match="a 'padding' check needs lengths, got ''"):
        ProbeCheck("padding", ("ids",), "padding", varies="ids")
    with pytest.raises(ValueError, match="reach must be an int >= 0, got -1"):
        ProbeCheck("window", ("ids",), "w", varies="ids", reach=-1)
    with pytest.raises(ValueError, match=r"tokens input 'ids' needs vocab_size >= 1, got 0"):
        ProbeInput("ids", "tokens")
    unknown = r"check 'causal' names inputs \['tgt'\] that the probe does not draw \['ids'\]"
    with pytest.raises(ValueError, match=unknown):
        AuditProbe((ProbeInput("ids", "tokens", 9),), (ProbeCheck("causal", ("ids",), "c", varies="tgt"),))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "blocked"])
@pytest.mark.parametrize("mask", [masks.causal(), masks.padding([8, 5]), masks.causal() & masks.sliding_window(3)],
                         ids=["causal", "padding", "window"])
def test_nan_in_hidden_inputs_reaches_no_output(backend, mask, monkeypatch):
    """The audit's non-finite probe passes on every backend, and catches 0 x NaN where hidden inputs are not
    guarded (issue 16 item 10: on main, NaN in a hidden value reached visible outputs on every backend)."""
    from maskattn.audit import audit_nonfinite_call
    from maskattn.backends import guards

    layer = MultiHeadAttention(16, 4, backend=backend)
    report = audit_layer(layer, mask, length=8)
    assert report.ok, str(report)
    assert any(v.name.endswith("NaN hidden") for v in report.verdicts)
    monkeypatch.setattr(guards, "hide_nonfinite", lambda q, k, v, mask, q_offset=0: (k, v, None))
    x = torch.randn(2, 8, 16)
    verdict = audit_nonfinite_call(layer.eval(), x, mask=mask)
    assert not verdict.ok and "NaN in hidden inputs" in verdict.how


def _captioner(**kw):
    from maskattn.models import Captioner, CaptionerConfig

    torch.manual_seed(0)
    return Captioner(CaptionerConfig(vocab_size=16, d_model=32, num_heads=2, d_ff=64, dropout=0.0, **kw))


@pytest.mark.parametrize("channels", [1, 3])
def test_a_captioner_passes_the_audit_on_images_of_different_sizes(channels):
    report = audit_model(_captioner(channels=channels), length=6, batch=3)
    assert report.ok, str(report)
    names = [v.name for v in report.verdicts]
    assert {"Captioner logits vs pixels outside the canvas", "Captioner logits vs later caption tokens"} <= set(names)
    # every attention module of both stacks was audited (patch self-attention, causal self, cross)
    assert {n.split(" ")[0] for n in names if "_attn" in n} == set(_captioner().attention_sites())
    outside = next(v for v in report.verdicts if "outside the canvas" in v.name)
    # of the (2 x 6)-patch probe, row 1 keeps 1 x 4 patches and row 2 1 x 3: 8 + 9 hidden, each seen by 6 queries
    assert outside.checked_pairs == (8 + 9) * 6


def test_a_captioner_that_lets_its_patches_see_the_outside_is_caught(monkeypatch):
    import maskattn.models.captioner as captioner

    model = _captioner()
    monkeypatch.setattr(captioner, "patch_valid", lambda sizes, grid, p, batch, device: None)  # padding mask dropped
    report = audit_model(model, length=6, batch=3)
    failed = [v for v in report.verdicts if not v.ok]
    assert [v.name for v in failed] == ["Captioner logits vs pixels outside the canvas"]
    b, _, k = failed[0].leaks[0]
    assert b in (1, 2) and k >= 0


def test_a_decoder_that_lets_packed_documents_see_each_other_is_caught(monkeypatch):
    # every layer obeys the mask it is given, so only the end-to-end check can see that the model never built
    # the document mask (found in review: the audit passed such a model)
    import maskattn.models.decoder_lm as decoder_lm

    torch.manual_seed(0)
    model = _tiny("decoder")
    monkeypatch.setattr(decoder_lm.masks, "document", lambda doc_ids: decoder_lm.masks.causal())
    report = audit_model(model, length=8)
    failed = [v for v in report.verdicts if not v.ok]
    assert [v.name for v in failed] == ["DecoderLM logits vs other packed documents"], str(report)
    _, q, k = failed[0].leaks[0]
    assert k < 4 <= q  # a query of the second document (positions 4-7) moved with a token of the first


@pytest.mark.parametrize("kind,length,batch,message", [("transformer", 3, 2, "use length >= 4"),
                                                       ("decoder", 1, 2, "use length >= 2"),
                                                       ("encoder", 8, 1, "use batch >= 2")])
def test_an_audit_too_small_to_check_anything_is_refused(kind, length, batch, message):
    # length 2 gave the Transformer an empty target: every verdict passed with 0 pairs checked
    with pytest.raises(ValueError, match=message):
        audit_model(_tiny(kind), length=length, batch=batch)


def test_the_transformers_padding_check_covers_every_target_position(monkeypatch):
    # source padding used to filter *target* positions: a leak at a target position whose index is a padded
    # source position passed
    torch.manual_seed(0)
    model = _tiny("transformer")
    forward = Transformer.forward

    def leaky(self, src, tgt, *args, **kwargs):
        logits = forward(self, src, tgt, *args, **kwargs)
        return torch.cat([logits[:, :-1], logits[:, -1:] + src[:, -1, None, None]], dim=1)  # last step reads src[-1]

    monkeypatch.setattr(Transformer, "forward", leaky)
    report = audit_model(model, length=8)
    failed = [v for v in report.verdicts if v.name == "Transformer logits vs source padding"]
    assert failed and not failed[0].ok and failed[0].leaks[0][1] == 5  # target length 8 - 2: its last position


def test_padding_audit_of_a_pooled_output_checks_each_row():
    from maskattn.audit import audit_padding

    tokens, lengths = torch.randint(4, 20, (2, 6)), torch.tensor([6, 3])
    honest = audit_padding(lambda t: t[:, :1].float() * 2, tokens, lengths, vocab=20, name="pooled")  # (B, 1)
    assert honest.ok and honest.checked_pairs == 3  # row 1: one output, three padded inputs
    leaky = audit_padding(lambda t: t.float().sum(1, keepdim=True), tokens, lengths, vocab=20, name="pooled")
    assert not leaky.ok and leaky.leaks[0][0] == 1


def _per_head_mask(length=8):
    window = (masks.causal() & masks.sliding_window(2)).to_dense(length, length)  # (1, 1, L, L)
    causal = masks.causal().to_dense(length, length)
    return masks.from_tensor(torch.cat([causal, causal, window, window], dim=1))  # (1, 4, L, L): heads 2-3 windowed


def test_a_per_head_mask_is_audited_head_by_head():
    torch.manual_seed(0)
    assert audit_layer(MultiHeadAttention(16, 4), _per_head_mask(), length=8).ok
    # a layer that gives every head the mask of head 0: heads 2-3 see keys their window hides, which no check
    # could see while a key counted as hidden only when every head hid it
    layer = MultiHeadAttention(16, 4)
    forward = layer.attend.forward
    layer.attend.forward = lambda q, k, v, mask, **kw: forward(q, k, v, masks.causal(), **kw)
    report = audit_layer(layer, _per_head_mask(), length=8)
    assert not report.ok and all(not v.ok for v in report.verdicts), str(report)
    assert all(k < q - 1 for _, q, k in report.verdicts[0].leaks)  # keys outside the window of 2
    with pytest.raises(ValueError, match="differs per head"):
        audit_layer(ArticleAttention(16, 4), _per_head_mask(), length=8)  # no per-head outputs to audit


def test_the_nan_audit_names_the_key_that_leaked():
    # the NaN check named the row's first hidden key, whichever leaked; OffByOneCausal leaks only q + 1
    verdict = audit_layer(OffByOneCausal(16, 4), masks.causal(), length=8).verdicts[1]
    assert not verdict.ok and all(k == q + 1 for _, q, k in verdict.leaks), verdict


def test_audits_give_verdicts_on_two_dimensional_outputs_and_batch_wide_leaks():
    # audit_padding raised IndexError when a row without padding moved (a dependence across the batch);
    # audit_documents and audit_image_padding raised IndexError on (B, L) / (B, C) outputs
    from maskattn.audit import audit_documents, audit_image_padding, audit_padding

    tokens, lengths = torch.randint(0, 10, (2, 5)), torch.tensor([5, 3])
    across = audit_padding(lambda x: x.float().sum() * torch.ones(2, 5, 3), tokens, lengths, vocab=10, name="p",
                           aligned=False)
    assert not across.ok and across.leaks[0][0] == 0 and across.leaks[0][2] == -1  # row 0 has no padding to name
    tokens6 = torch.randint(0, 10, (2, 6))
    docs = (torch.arange(6) >= 3).long().expand(2, 6)
    assert audit_documents(lambda x: x.float() * 2, tokens6, docs, vocab=10, name="d").ok  # (B, L): position-wise
    leaky = audit_documents(lambda x: x.float().cumsum(1), tokens6, docs, vocab=10, name="d")
    assert not leaky.ok and all(docs[b, q] != docs[b, k] for b, q, k in leaky.leaks)
    images, sizes = torch.randn(2, 8, 8), torch.tensor([[8, 8], [4, 4]])
    assert audit_image_padding(lambda x: x.flatten(1)[:, :3] * 0 + 1, images, sizes, patch_size=4, name="i").ok
    assert not audit_image_padding(lambda x: x.flatten(1)[:, -3:], images, sizes, patch_size=4, name="i").ok


@pytest.mark.parametrize("call, words", [
    # was "The expanded size of the tensor (2) must match the existing size (3) at non-singleton dimension 0"
    (lambda layer: audit_layer(layer, masks.padding([6, 4, 2]), length=6),
     "mask padding(lengths=[6, 4, 2]) has batch size 3, which does not match the batch size B=2 of the inputs"),
    (lambda layer: audit_call(layer, torch.randn(2, 6, 16), mask=masks.padding([6, 4, 2])),
     "has batch size 3, which does not match the batch size B=2"),
    # was "Trying to create tensor with negative dimension -1"; 0 passed with nothing checked
    (lambda layer: audit_layer(layer, masks.causal(), length=-1), "audit_layer: length must be an int >= 1, got -1"),
    (lambda layer: audit_layer(layer, masks.causal(), length=0), "audit_layer: length must be an int >= 1, got 0"),
    (lambda layer: audit_layer(layer, masks.causal(), batch=0), "audit_layer: batch must be an int >= 1, got 0"),
    (lambda layer: audit_layer(layer, None, cross_length=0), "audit_layer: cross_length must be an int >= 1, got 0"),
])
def test_audit_layer_arguments_are_checked_by_name(call, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        call(MultiHeadAttention(16, 4))


def test_an_audit_runs_in_eval_mode_and_gives_the_module_back_in_its_own_mode():
    # audit_call ran a training layer as it was: its dropout moved every output, and a correct layer was reported
    # as leaking; audit_layer and audit_model switched the module to eval and left it there, so training after an
    # audit went on without dropout
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 4, dropout=0.5).train()
    verdict = audit_call(layer, torch.randn(2, 6, 16), mask=masks.causal())
    assert verdict.ok, str(verdict)
    assert verdict.checked_pairs == 2 * 15  # the oracle: 15 keys above the diagonal of 6 x 6, per row of the batch
    assert layer.training
    assert audit_layer(layer, masks.causal(), length=6).ok and layer.training
    model = DecoderLM(DecoderLMConfig.preset("tiny"))
    model.train()
    model.lm_head.eval()  # a module in its own mode keeps it
    assert audit_model(model).ok
    assert model.training and not model.lm_head.training
    assert all(m.training for name, m in model.named_modules() if not name.startswith("lm_head"))


@pytest.mark.parametrize("built", [masks.causal() & masks.sliding_window(5), masks.causal()],
                         ids=["wider-window", "no-window"])
def test_a_decoder_that_attends_beyond_its_sliding_window_is_caught(monkeypatch, built):
    # every layer obeys the mask it is given and the logits never see a later token, so no check saw that the model
    # built a wider window than its sliding_window=3 promises (or none): the oracle is the receptive field of
    # 2 layers of window 3, logits at t reading no token before t - 4
    torch.manual_seed(0)
    model = _tiny("decoder", sliding_window=3)
    assert model.config.num_layers == 2
    assert audit_model(model, length=10).ok
    monkeypatch.setattr(DecoderLM, "_causal", lambda self: built)
    report = audit_model(model, length=10)
    failed = [v for v in report.verdicts if not v.ok]
    assert [v.name for v in failed] == ["DecoderLM logits vs tokens outside the sliding window"], str(report)
    _, q, k = failed[0].leaks[0]
    assert k < q - 4


def test_a_sliding_window_decoder_passes_at_every_length_and_depth():
    for layers, window in ((1, 1), (1, 4), (3, 2)):
        torch.manual_seed(0)
        model = _tiny("decoder", sliding_window=window, num_layers=layers)
        report = audit_model(model, length=12)
        assert report.ok, str(report)
        verdict = next(v for v in report.verdicts if "sliding window" in v.name)
        reach = layers * (window - 1)
        assert verdict.checked_pairs == 2 * sum(range(1, 12 - reach))  # (query, key) pairs beyond the reach, per row


@pytest.mark.parametrize("kind", ["decoder", "transformer"])
def test_a_decoder_whose_rows_see_each_other_is_caught(kind):
    # each row's position t read the previous row's position t (a statistic over the batch): no token is later, so
    # the causal check passed; the oracle is the model itself, its row 0 logits moving with row 1's tokens
    torch.manual_seed(0)
    model = _tiny(kind)
    model.decoder.layers[0].ffn.register_forward_hook(lambda module, args, out: out + 0.1 * out.roll(1, 0))
    tokens = torch.randint(4, 20, (2, 6))
    changed = tokens.clone()
    changed[1] = (tokens[1] + 1) % 20
    forward = (lambda t: model(t)) if kind == "decoder" else (lambda t: model(tokens, t))
    with torch.no_grad():
        assert (forward(changed)[0] != forward(tokens)[0]).any()
    report = audit_model(model, length=8)
    failed = [v for v in report.verdicts if not v.ok and "later" in v.name]
    assert failed and "another row" in failed[0].how, str(report)
    assert failed[0].leaks[0][2] == -1


@pytest.mark.parametrize("kind", ["encoder", "transformer"])
def test_an_encoder_whose_rows_see_each_other_is_caught(kind):
    # each row's encoder states read the other row's first state (always a real token): the padding check changes
    # padding only, and the decoder's checks change target tokens only, so nothing saw it; the oracle is the model
    # itself, its row 0 outputs moving with row 1's real source tokens
    torch.manual_seed(0)
    model = _tiny(kind).eval()
    tokens, lengths = torch.randint(4, 20, (2, 6)), torch.tensor([6, 4])
    forward = ((lambda s: model(s, lengths=lengths)) if kind == "encoder" else
               (lambda s: model(s, tokens[:, :4], src_lengths=lengths)))
    changed = tokens.clone()
    changed[1, 1] = (tokens[1, 1] + 1) % 20
    assert audit_model(model, length=8).ok
    model.encoder.layers[0].ffn.register_forward_hook(lambda module, args, out: out + 0.1 * out[:, :1].roll(1, 0))
    with torch.no_grad():
        assert (forward(changed)[0] != forward(tokens)[0]).any()
    report = audit_model(model, length=8)
    failed = [v for v in report.verdicts if not v.ok]
    assert [v.name for v in failed] == [next(v.name for v in report.verdicts if "padding" in v.name)], str(report)
    assert "another row" in failed[0].how and failed[0].leaks[0][2] == -1


def test_the_padding_audit_compares_rows_even_without_padding():
    from maskattn.audit import audit_padding

    tokens, lengths = torch.randint(4, 20, (2, 6)), torch.tensor([6, 6])  # equal lengths: no padding to change
    rows = audit_padding(lambda t: t.float()[:, :, None] + 0.1 * t.float().roll(1, 0)[:, :, None], tokens, lengths,
                         vocab=20, name="rows")
    assert not rows.ok and rows.leaks == [(0, 0, -1)]
    # a row reading another row's padding is the padding check's to name (its key is the padded position)
    lengths = torch.tensor([6, 3])
    padding = audit_padding(lambda t: t.float()[:, :, None] + 0.1 * t.float().roll(1, 0)[:, :, None], tokens,
                            lengths, vocab=20, name="rows")
    assert not padding.ok and padding.leaks == [(0, 3, -1)] and "padding" in padding.how
    assert audit_padding(lambda t: t.float()[:, :, None] * 2, tokens, lengths, vocab=20, name="rows").ok


class _IgnoresItsMask(nn.Module):
    """A cross-attention layer that attends every key whatever mask it is given: a leak wherever the mask hides one."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model, self.inner = d_model, MultiHeadAttention(d_model, 2)

    def forward(self, query, key=None, value=None, *, mask=None, **kwargs):
        return self.inner(query, key, value, mask=None, **kwargs)


def test_cross_attention_audits_the_pair_of_a_query_and_the_key_at_its_own_index():
    # only self-attention exempts a query's own position (its input is also its query); in cross-attention query i
    # and key i are different inputs, and a mask hiding key i from query i alone must find this layer's leak there
    torch.manual_seed(0)
    not_own = masks.from_tensor(~torch.eye(5, dtype=torch.bool))
    report = audit_layer(_IgnoresItsMask(8), not_own, length=5, cross_length=5)
    assert not report.ok
    assert {(q, k) for v in report.verdicts for _, q, k in v.leaks} <= {(i, i) for i in range(5)}
    assert report.verdicts[0].checked_pairs == 2 * 5  # B x the five diagonal pairs


def _next_token(tokens):
    """(B, L) -> (B, L, 1): the logit at t is token t + 1 (0 at the last position): a leak of exactly one step."""
    out = torch.zeros(*tokens.shape, 1)
    out[:, :-1, 0] = tokens[:, 1:].float()
    return out


def test_the_causal_audit_names_a_leak_of_the_very_next_token_by_changing_it():
    from maskattn.audit import audit_causal_logits

    tokens = torch.randint(4, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    verdict = audit_causal_logits(_next_token, tokens, vocab=50, name="next")
    assert not verdict.ok
    assert verdict.how == "changing later tokens changed earlier logits"
    assert verdict.leaks[0][1:] == (0, 1)  # query 0 saw key 1


def _back(distance):
    """(B, L) -> (B, L, 1): the logit at t is token t - distance (0 before the first)."""
    def logits_of(tokens):
        out = torch.zeros(*tokens.shape, 1)
        out[:, distance:, 0] = tokens[:, : tokens.shape[1] - distance].float()
        return out
    return logits_of


def test_the_reach_audit_finds_a_receptive_field_one_position_wider_than_declared():
    from maskattn.audit import audit_reach

    tokens = torch.randint(4, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    assert audit_reach(_back(3), tokens, reach=3, vocab=50, name="w").ok  # sees exactly 3 back: within its reach
    verdict = audit_reach(_back(4), tokens, reach=3, vocab=50, name="w")
    assert not verdict.ok and verdict.leaks == [(0, 4, 0)]  # query 4 saw key 0, 4 positions back


class _ZeroWeightAttention(nn.Module):
    """Cross-attention written the naive way: hidden keys get -inf scores, so weight 0, and their values are still
    multiplied by that 0 (0 x NaN is NaN): a leak the non-finite check exists for."""

    d_model = 4

    def forward(self, query, key=None, value=None, *, mask=None):
        allowed = mask.to_dense(query.shape[1], key.shape[1])[:, 0]  # (B|1, Lq, Lk)
        scores = (query @ key.transpose(1, 2)).masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, -1) @ value


def test_the_non_finite_audit_puts_nan_in_hidden_values_too():
    from maskattn.audit import audit_nonfinite_call

    gen = torch.Generator().manual_seed(0)
    query, memory = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 5, 4, generator=gen)
    layer, mask = _ZeroWeightAttention(), masks.padding([3, 5])
    assert audit_call(layer, query, memory, memory, mask=mask).ok  # hidden values weigh exactly 0 ...
    verdict = audit_nonfinite_call(layer, query, memory, memory, mask=mask)
    assert not verdict.ok and {k for _, _, k in verdict.leaks} <= {3, 4}  # ... but NaN x 0 is NaN


def test_the_causal_audit_finds_the_last_row_reading_another_row():
    # every row is checked against the others, the last one too (a batch-mixing bug that shows only in the last row)
    from maskattn.audit import audit_causal_logits

    def logits_of(tokens):  # (B, L) -> (B, L, 1): each row its own tokens, the last row plus row 0's
        out = tokens[..., None].float().clone()
        out[-1] += tokens[0, :, None]
        return out

    tokens = torch.randint(4, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    verdict = audit_causal_logits(logits_of, tokens, vocab=50, name="rows")
    assert not verdict.ok and verdict.how == "changing another row's tokens changed this row's logits"
    assert verdict.leaks[0][0] == 2


class _GradientOnlyLeak(nn.Module):
    """Self-attention whose output is exactly the masked one, plus (x - x.detach()) of an unmasked one: forward
    values are bit-identical, but gradients reach every hidden position (what only the Jacobian check sees)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model, self.inner = d_model, MultiHeadAttention(d_model, 2)

    def forward(self, query, key=None, value=None, *, mask=None):
        leaky = self.inner(query, key, value, mask=None)
        return self.inner(query, key, value, mask=mask) + (leaky - leaky.detach())


def test_a_leak_of_gradients_alone_is_found_by_the_jacobian_check():
    torch.manual_seed(0)
    layer, x = _GradientOnlyLeak(8), torch.randn(2, 5, 8)
    assert torch.equal(layer(x, mask=masks.causal()), layer.inner(x, mask=masks.causal()))  # forward: no trace
    verdict = audit_call(layer, x, mask=masks.causal())
    assert not verdict.ok and verdict.how == "non-zero gradient through a hidden position"
    assert all(k > q for _, q, k in verdict.leaks)  # keys after the query: what causal() hides


class _OneRowForwardLeak(nn.Module):
    """Self-attention that is right for every batch row but the second, which gets the unmasked output, without
    gradient (a leak through a non-differentiable path, in some rows only: what only the perturbation check sees)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model, self.inner = d_model, MultiHeadAttention(d_model, 2)

    def forward(self, query, key=None, value=None, *, mask=None):
        good = self.inner(query, key, value, mask=mask)
        leaky = self.inner(query, key, value, mask=None)
        row = (torch.arange(query.shape[0]) == 1).view(-1, 1, 1)
        return good + torch.where(row, leaky - good, 0.0).detach()


def test_the_perturbation_check_finds_a_leak_in_one_batch_row():
    torch.manual_seed(0)
    verdict = audit_call(_OneRowForwardLeak(8), torch.randn(3, 5, 8), mask=masks.causal())
    assert not verdict.ok and verdict.how == "perturbing hidden inputs changed the output"
    assert {b for b, _, _ in verdict.leaks} == {1} and all(k > q for _, q, k in verdict.leaks)
