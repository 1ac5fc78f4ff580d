"""DecoderLM: causality, padding, and packed documents against the same documents one by one."""

import pytest
import torch

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


def test_swiglu_gqa_variant_trains_a_step():
    config = DecoderLMConfig.preset("tiny", activation="swiglu", num_kv_heads=1, positions="rope", dropout=0.1)
    model = DecoderLM(config)
    ids = torch.randint(0, 64, (2, 8))
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, 64), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_doc_ids_name_the_argument():
    model = DecoderLM(DecoderLMConfig.preset("tiny"))
    with pytest.raises(ValueError, match="doc_ids must have the shape of input_ids"):
        model(torch.zeros(2, 5, dtype=torch.long), doc_ids=torch.zeros(2, 4, dtype=torch.long))
