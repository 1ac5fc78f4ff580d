"""EncoderModel: padding invariance and the classification / span heads."""

import pytest
import torch

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


def test_heads_shapes_and_gradients():
    model = EncoderModel(EncoderConfig.preset("tiny", num_labels=4, span_head=True))
    ids = torch.randint(1, 64, (3, 7))
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    logits = model.classify(ids, token_type_ids=types)
    start, end = model.span_logits(ids, token_type_ids=types)
    assert logits.shape == (3, 4) and start.shape == end.shape == (3, 7)
    (logits.sum() + start.sum() + end.sum()).backward()
    assert model.classifier.weight.grad is not None and model.span_head.weight.grad is not None


def test_missing_heads_and_bad_masks_are_clear_errors():
    model = EncoderModel(EncoderConfig.preset("tiny"))
    ids = torch.randint(1, 64, (2, 5))
    with pytest.raises(ValueError, match="no classification head"):
        model.classify(ids)
    with pytest.raises(ValueError, match="no span head"):
        model.span_logits(ids)
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        model(ids, torch.ones(2, 4))
