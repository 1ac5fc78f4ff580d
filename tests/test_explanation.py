import logging
import re

import pytest
import torch

import maskattn
from maskattn import masks
from maskattn.backends import REGISTRY


def _qkv(n=1024, heads=2):
    return (torch.randn(1, heads, n, 16) for _ in range(3))


@pytest.mark.parametrize("mask,expected", [
    (None, "sdpa"), (masks.causal(), "sdpa"), (masks.padding([300]), "sdpa"),
    (masks.causal() & masks.sliding_window(64), "blocked"),
    (masks.document(torch.arange(4).repeat_interleave(256)[None]) & masks.causal(), "sdpa"),  # one call per doc
    (masks.document(torch.arange(128).repeat_interleave(8)[None]) & masks.causal(), "blocked"),
])
def test_explain_names_the_backend_auto_runs_and_why(mask, expected):
    q, k, v = _qkv()
    e = maskattn.explain(q, k, v, mask)
    assert e.backend == expected == maskattn.choose_backend(q, k, mask, dropout_p=0.0, return_weights=False)
    assert expected in str(e).splitlines()[0] and e.why
    assert list(e.costs) == list(REGISTRY)


def test_costs_follow_the_mask_structure():
    q, k, v = _qkv(n=1024)
    window = maskattn.explain(q, k, v, masks.causal() & masks.sliding_window(128), block=128)
    flops = {name: float(text.split()[0]) for name, text in window.costs.items() if "GFLOP" in text}
    # the window keeps 2 of 8 key tiles per query tile (plus the diagonal): blocked does a fraction of the work
    assert flops["blocked"] < 0.3 * flops["reference"]
    assert "band calls, no Lq x Lk mask" in window.costs["sdpa"]  # sdpa runs a window in chunks
    assert "mask tensor" in maskattn.explain(q, k, v, masks.causal() & ~masks.sliding_window(128)).costs["sdpa"]
    weights = maskattn.explain(q, k, v, masks.causal(), return_weights=True)
    assert weights.backend == "reference" and "cannot run" in weights.costs["blocked"]
    seeded = maskattn.explain(q, k, v, masks.causal(), dropout_p=0.1, generator=torch.Generator())
    assert seeded.backend == "blocked" and "dropout" in seeded.why and "cannot run" in seeded.costs["sdpa"]
    assert maskattn.explain(q, k, v, masks.causal(), dropout_p=0.1).backend == "sdpa"  # SDPA's own dropout


def test_small_problems_go_to_sdpa_with_the_reason():
    q, k, v = _qkv(n=64)
    e = maskattn.explain(q, k, v, masks.causal() & masks.sliding_window(8))
    assert e.backend == "sdpa" and "small" in e.why


def test_auto_logs_its_choice_at_debug_level(caplog):
    q, k, v = _qkv(n=64)
    with caplog.at_level(logging.DEBUG, logger="maskattn.attention"):
        maskattn.attention(q, k, v, masks.causal() & masks.sliding_window(8))
    assert any("backend=" in r.message and "is small" in r.message for r in caplog.records)  # (tests may force it)


@pytest.mark.parametrize("bad", [dict(dropout_p=2.0), dict(dropout_p=float("nan")), dict(q_offset=-1),
                                 dict(return_weights=True, return_lse=True), dict(generator=3)])
def test_explain_refuses_what_attention_refuses_with_the_same_error(bad):
    # explain(dropout_p=2.0) answered "auto -> sdpa" for a call that maskattn.attention refuses
    q, k, v = _qkv(n=16)
    with pytest.raises((ValueError, TypeError)) as refused:
        maskattn.attention(q, k, v, **bad)
    with pytest.raises(type(refused.value), match=re.escape(str(refused.value))):
        maskattn.explain(q, k, v, **bad)


def test_explain_names_its_own_block_argument():
    q, k, v = _qkv(n=16)  # block=0 was refused as "block_q must be a positive int", an argument explain has not
    for block in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match=rf"block must be a positive int \(the tile side\), got {block!r}"):
            maskattn.explain(q, k, v, masks.causal(), block=block)
    assert "empty 64x64 tiles" in maskattn.explain(q, k, v, masks.causal(), block=64).mask


@pytest.mark.parametrize("mask", [~masks.causal(), masks.padding([0, 8]), masks.causal() & masks.padding([3, 0]),
                                  torch.tensor([True, False, False, True]).view(1, 4, 1, 1).expand(1, 4, 8, 8)])
def test_explain_counts_the_fully_masked_rows_of_the_call(mask):
    # the count was the mask's own (B|1 x H|1 x Lq): "1 fully masked row(s)" for ~causal() on a call of 2 x 4 heads
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    dense = masks.as_mask(mask).to_dense(8, 8).expand(2, 4, 8, 8)  # (B, H, Lq, Lk)
    out = maskattn.attention(q, k, v, mask)
    empty = int((~dense.any(-1)).sum())
    assert empty == int((out == 0).all(-1).sum()) > 0  # the rows that output zeros
    assert f"{empty} fully masked row(s)" in maskattn.explain(q, k, v, mask).mask


@pytest.mark.parametrize("mask,scores", [
    (masks.causal() & masks.sliding_window(64), 4 * 2 * 64 * 64 * (2 * 16 - 1)),  # band calls: W x W, then W x 2W
    (masks.causal() & ~masks.sliding_window(64), 4 * 2 * 1024 * 1024),  # one (1, 1, Lq, Lk) mask for the batch
    (torch.rand(1, 2, 1024, 1024, generator=torch.Generator().manual_seed(0)) > 0.5, 4 * 2 * 1024 * 1024),  # per head
    (masks.document(torch.tensor([[0] * 300 + [1] * 300 + [2] * 424])), 4 * 2 * (300**2 + 300**2 + 424**2)),  # per doc
])
def test_explain_counts_the_scores_and_mask_bytes_sdpa_runs(mask, scores, monkeypatch):
    # sdpa's line said "8,388,608 scores, needs a 4.2 MB Lq x Lk mask tensor" of all three: B x Lq x Lk bytes
    # whatever the mask's own batch and heads, and neither the scores nor the mask of the band calls; documents
    # (one call each) were counted by 128 x 128 tiles
    from maskattn.backends import sdpa

    q, k, v = torch.randn(4, 2, 1024, 16), torch.randn(4, 2, 1024, 16), torch.randn(4, 2, 1024, 16)
    seen, run = {"scores": 0, "mask": 0}, torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen["scores"] += q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
        seen["mask"] = max(seen["mask"], 0 if attn_mask is None else attn_mask.numel() * attn_mask.element_size())
        return run(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", spy)
    maskattn.attention(q, k, v, mask, backend="sdpa")
    monkeypatch.undo()
    assert seen["scores"] == scores
    said = maskattn.explain(q, k, v, mask).costs["sdpa"]
    assert f"({scores:,} scores)" in said
    if seen["mask"] < 1e5:
        assert "mask tensor" not in said
    else:
        assert f"needs a {seen['mask'] / 1e6:.1f} MB" in said


@pytest.mark.parametrize("mask", [
    masks.causal() & (masks.sliding_window(64) | masks.from_tensor(torch.arange(1000) == 0)),  # window + sink
    masks.causal(),
    masks.causal() & masks.sliding_window(200),
    masks.padding([700, 1000]),
    None,
])
def test_explain_counts_the_scores_blocked_computes(mask, monkeypatch):
    # blocked's line said the scores outside empty tiles, but each query block computes the whole range of key
    # tiles between its first and last live one (and groups of blocks their widest range): a causal window with an
    # attention sink was said to cost 0.9M scores and computed 4.2M, as much as causal
    from maskattn.backends import blocked

    q, k, v = torch.randn(2, 4, 1000, 16), torch.randn(2, 2, 1000, 16), torch.randn(2, 2, 1000, 16)
    seen = {"scores": 0}
    kernels = dict(blocked._KERNELS)

    def spying(forward):
        def spy(q, keys, *args):  # q (B', g, R, D), keys (B', g, W, D): the scores the kernel computes
            seen["scores"] += q.shape[0] * q.shape[1] * q.shape[2] * keys.shape[2]
            return forward(q, keys, *args)
        return spy

    for name, (forward, backward) in kernels.items():
        monkeypatch.setitem(blocked._KERNELS, name, (spying(forward), backward))
    maskattn.attention(q, k, v, mask, backend="blocked")
    monkeypatch.undo()
    assert seen["scores"] > 0
    assert f"({seen['scores']:,} scores)" in maskattn.explain(q, k, v, mask).costs["blocked"]


@pytest.mark.parametrize("mask,length,block", [
    (masks.causal() & masks.sliding_window(64), 300, 128),
    (masks.causal(), 300, 128),
    (masks.causal(), 256, 64),
    (masks.padding([100, 250]), 250, 32),
])
def test_flex_counts_the_scores_of_every_tile_the_mask_does_not_empty(mask, length, block):
    # flex's line is "skips empty tiles" at the block argument's tile size: the entries of every block x block tile
    # with an allowed pair, counted here tile by tile from the dense mask (not the mask's density)
    q = torch.randn(2, 3, length, 8)
    dense = mask.to_dense(length, length).expand(2, 3, length, length)
    scores = 0
    for i in range(0, length, block):
        for j in range(0, length, block):
            tile = dense[..., i:i + block, j:j + block]  # (B, H, <=block, <=block)
            scores += int(tile.any(-1).any(-1).sum()) * tile.shape[-2] * tile.shape[-1]
    said = maskattn.explain(q, q, q, mask, block=block).costs["flex"]
    assert f"({scores:,} scores)" in said, said


def test_explain_counts_the_flops_of_a_value_width_other_than_the_key_width():
    # every score was counted at 4 x D FLOPs (D of q), so a call with D = 16 and Dv = 64 was said to cost 64 FLOPs a
    # score where it costs 160; the oracle is PyTorch's own FLOP counter over a written-out dense attention
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = torch.randn(1, 2, 96, 16), torch.randn(1, 2, 96, 16), torch.randn(1, 2, 96, 64)
    with FlopCounterMode(display=False) as counter:
        torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v
    e = maskattn.explain(q, k, v)
    assert e.costs["reference"].startswith(f"{counter.get_total_flops() / 1e9:.3f} GFLOP forward (18,432 scores)")
    assert "160 FLOPs a score (2 x (D=16 + Dv=64))" in e.call
