"""DecoderLM: causality, padding, and packed documents against the same documents one by one."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from maskattn.models import DecoderLM, DecoderLMConfig


@pytest.mark.parametrize("positions", ["learned", "rope", "sinusoidal"])
def test_packed_row_equals_its_documents_alone(positions):
    model = DecoderLM(DecoderLMConfig.preset("tiny", positions=positions)).eval()
    docs = [torch.randint(0, 64, (n,)) for n in (4, 1, 6)]
    packed = torch.cat(docs)[None]  # (1, 11)
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        got = model(packed, doc_ids=doc_ids)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


def test_future_tokens_do_not_change_past_logits():
    model = DecoderLM(DecoderLMConfig.preset("tiny", positions="rope")).eval()
    ids = torch.randint(0, 64, (2, 9))
    changed = ids.clone()
    changed[:, 5:] = torch.randint(0, 64, (2, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :5], model(changed)[:, :5], atol=1e-6, rtol=0)


def test_lengths_and_pad_id_mask_the_padding():
    model = DecoderLM(DecoderLMConfig.preset("tiny", pad_id=0)).eval()
    ids = torch.randint(1, 64, (2, 6))
    ids[1, 3:] = 0
    with torch.no_grad():
        padded = model(ids)
        by_lengths = model(ids, lengths=[6, 3])
        alone = model(ids[1:, :3])
    torch.testing.assert_close(padded, by_lengths, atol=0, rtol=0)
    torch.testing.assert_close(padded[1:, :3], alone, atol=1e-5, rtol=0)


def _next_token_loss(model, ids):
    return F.cross_entropy(model(ids[:, :-1]).reshape(-1, model.config.vocab_size), ids[:, 1:].reshape(-1))


def test_gqa_equals_full_heads_with_each_kv_head_copied_to_its_query_group_forward_and_gradients():
    # Oracle: grouped-query attention with Hkv = 2 of H = 4 heads is full multi-head attention whose key and
    # value projections give query heads 0, 1 the first kv head's rows and heads 2, 3 the second's.
    config = DecoderLMConfig.preset("tiny", activation="swiglu", num_kv_heads=2, positions="rope", dropout=0.0)
    gqa = DecoderLM(config).double()
    full = DecoderLM(replace(config, num_kv_heads=None)).double()
    group, d = config.num_heads // config.num_kv_heads, config.d_model // config.num_heads

    def spread(t):  # (Hkv * D, ...) -> (H * D, ...): kv head j's rows for query heads j * group ... + group - 1
        return t.unflatten(0, (config.num_kv_heads, d)).repeat_interleave(group, dim=0).flatten(0, 1)

    kv = ("k_proj", "v_proj")
    with torch.no_grad():
        full.load_state_dict({n: spread(t) if n.split(".")[-2] in kv else t for n, t in gqa.state_dict().items()})
    ids = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(gqa(ids), full(ids), atol=1e-12, rtol=0)
    _next_token_loss(gqa, ids).backward()
    _next_token_loss(full, ids).backward()
    theirs = dict(full.named_parameters())
    for name, p in gqa.named_parameters():
        want = theirs[name].grad
        if name.split(".")[-2] in kv:  # a shared kv row collects the gradients of its whole query group
            want = want.unflatten(0, (config.num_kv_heads, group, d)).sum(1).flatten(0, 1)
        torch.testing.assert_close(p.grad, want, atol=1e-12, rtol=1e-9, msg=name)


def test_swiglu_gqa_variant_memorises_a_batch():
    config = DecoderLMConfig.preset("tiny", activation="swiglu", num_kv_heads=2, positions="rope", dropout=0.1)
    model = DecoderLM(config)
    ids = torch.randint(0, 64, (2, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(100):
        optimizer.zero_grad()
        _next_token_loss(model, ids).backward()
        optimizer.step()
    with torch.no_grad():  # from ln(64) = 4.16 at the start to nearly certain of all 14 next tokens
        assert _next_token_loss(model.eval(), ids) < 0.1  # about 0.012 over seeds 0-7


def test_bad_doc_ids_name_the_argument():
    model = DecoderLM(DecoderLMConfig.preset("tiny"))
    with pytest.raises(ValueError, match="doc_ids must have the shape of input_ids"):
        model(torch.zeros(2, 5, dtype=torch.long), doc_ids=torch.zeros(2, 4, dtype=torch.long))
