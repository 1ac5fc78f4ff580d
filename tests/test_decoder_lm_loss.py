"""DecoderLM.loss / forward(targets=...) against the logits path and PyTorch's cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

import maskattn
from maskattn.layers import Int8Linear, vocab_loss
from maskattn.models import compressed


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = maskattn.DecoderLMConfig.preset("tiny", vocab_size=97, tie_output=True)
    return maskattn.DecoderLM(config)


def _rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (3, 10), generator=g)
    targets = torch.randint(0, 97, (3, 10), generator=g)
    targets[0, :2] = -100
    docs = torch.tensor([[0] * 4 + [1] * 6, [0] * 10, [0] * 7 + [1] * 3])
    return ids, targets, docs


@pytest.mark.parametrize("chunk_rows", [4, None], ids=["chunked", "one-chunk"])
@pytest.mark.parametrize("packed", [False, True])
def test_loss_and_gradients_equal_the_logits_path(model, packed, chunk_rows, monkeypatch):
    if chunk_rows:  # 30 rows in chunks of 4, rather than one chunk at this small vocabulary
        monkeypatch.setattr(vocab_loss, "CHUNK_ELEMENTS", chunk_rows * 97)
    calls, chunks = [], vocab_loss._chunks
    monkeypatch.setattr(vocab_loss, "_chunks", lambda *a: calls.append(1) or chunks(*a))
    ids, targets, docs = _rows()
    kwargs = {"doc_ids": docs} if packed else {}
    results = []
    for fused in (True, False):
        model.zero_grad()
        if fused:
            loss = model(ids, targets=targets, **kwargs)
        else:
            loss = F.cross_entropy(model(ids, **kwargs).flatten(0, 1), targets.flatten(), reduction="sum")
        loss.backward()
        results.append((loss.detach(), *(p.grad.clone() for p in model.parameters())))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert bool(calls) == bool(chunk_rows)
    mean = model.loss(ids, targets, reduction="mean", **kwargs)
    torch.testing.assert_close(mean, results[0][0] / (targets != -100).sum(), rtol=1e-6, atol=0)


def test_an_int8_head_takes_the_plain_path(model):
    ids, targets, _ = _rows()
    compressed.quantize_linears(model, tied=True)  # the tied head too
    assert isinstance(model.lm_head, Int8Linear)
    with torch.no_grad():
        expected = F.cross_entropy(model(ids).flatten(0, 1).float(), targets.flatten(), reduction="sum")
        torch.testing.assert_close(model.loss(ids, targets), expected)


def test_refusals(model):
    ids, targets, _ = _rows()
    with pytest.raises(ValueError, match=r"targets must have the shape of input_ids \(3, 10\), got \(3, 9\)"):
        model.loss(ids, targets[:, 1:])
    with pytest.raises(ValueError, match="cannot be combined with targets"):
        model(ids, targets=targets, return_weights=True)
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean', got 'none'"):
        model.loss(ids, targets, reduction="none")
    with pytest.raises(ValueError, match=r"targets must be int64 token ids, got dtype torch\.int32"):
        model.loss(ids, targets.int())
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"targets must be in \[0, {vocab}\) or -100 \(no target\), got values in "
                       rf"\[0, {vocab}\]"):  # was cross-entropy's bare "IndexError: Target ... is out of bounds"
        model.loss(ids, targets.clamp(min=0).index_fill(1, torch.tensor([2]), vocab))
