"""Converters between conventions, checked against brute-force evaluation and against torch/HF."""

import re
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from maskattn import MultiHeadAttention, masks
from strategies import mask_cases


def _dense(mask, q_len, k_len, batch=1, heads=1, q_offset=0):
    return mask.to_dense(q_len, k_len, q_offset=q_offset).expand(batch, heads, q_len, k_len)


@given(mask_cases(max_len=8))
def test_torch_mha_round_trip(case):
    heads = case.mask.heads if case.mask.heads > 1 else 2
    batch = case.mask.batch
    attn, kpm = masks.to_torch_mha(case.mask, case.q_len, case.k_len, num_heads=heads, q_offset=case.q_offset,
                                   batch=batch)
    if kpm is not None and bool(kpm.all()):  # nothing visible at all: refused as probably inverted
        with pytest.raises(ValueError, match="hides every key"):
            masks.from_torch_mha(attn, kpm, num_heads=heads)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", masks.InvertedMaskWarning)  # random masks may look inverted
        back = masks.from_torch_mha(attn, kpm, num_heads=heads)
    want = case.brute_dense()[:case.mask.batch, :case.mask.heads]
    got = back.to_dense(case.q_len, case.k_len)
    assert torch.equal(got.expand(want.shape[0], heads, *got.shape[2:]),
                       want.expand(want.shape[0], heads, *want.shape[2:]))
    # the additive form says the same
    attn_f, kpm_f = masks.to_torch_mha(case.mask, case.q_len, case.k_len, num_heads=heads, q_offset=case.q_offset,
                                       additive=torch.float32, batch=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", masks.InvertedMaskWarning)
        again = masks.from_torch_mha(attn_f, kpm_f, num_heads=heads).to_dense(case.q_len, case.k_len)
    assert torch.equal(again, got)


@given(mask_cases(max_len=8))
def test_additive_and_hf_4d_round_trip(case):
    add = masks.to_additive(case.mask, case.q_len, case.k_len, q_offset=case.q_offset)
    assert set(add.unique().tolist()) <= {0.0, float("-inf")}
    back = masks.from_hf(add).to_dense(case.q_len, case.k_len)
    assert torch.equal(back, case.mask.to_dense(case.q_len, case.k_len, q_offset=case.q_offset))
    hf_min = masks.to_additive(case.mask, case.q_len, case.k_len, q_offset=case.q_offset,
                               fill=torch.finfo(torch.float32).min)
    assert torch.equal(masks.from_hf(hf_min).to_dense(case.q_len, case.k_len), back)


@given(st.lists(st.integers(0, 5), min_size=1, max_size=6))
def test_cu_seqlens_is_a_document_mask(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    if cu[-1] == 0:
        return
    dense = masks.from_cu_seqlens(cu).to_dense(cu[-1], cu[-1])[0, 0]
    doc = [d for d, n in enumerate(lengths) for _ in range(n)]
    expected = torch.tensor([[doc[i] == doc[j] for j in range(cu[-1])] for i in range(cu[-1])])
    assert torch.equal(dense, expected)


def test_nn_multihead_attention_agrees_given_to_torch_mha():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(16, 4, batch_first=True)
    ours = MultiHeadAttention(16, 4)
    with torch.no_grad():
        for proj, w, b in zip((ours.q_proj, ours.k_proj, ours.v_proj), theirs.in_proj_weight.split(16),
                              theirs.in_proj_bias.split(16), strict=True):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        ours.out_proj.load_state_dict(theirs.out_proj.state_dict())
    x = torch.randn(2, 6, 16)
    for mask in (masks.causal() & masks.sliding_window(3), masks.padding([6, 4]),
                 masks.prefix_lm(2) & masks.padding([6, 5])):
        attn, kpm = masks.to_torch_mha(mask, 6, 6, num_heads=4)
        expected, _ = theirs(x, x, x, attn_mask=attn, key_padding_mask=kpm)
        torch.testing.assert_close(ours(x, mask=mask), expected, atol=1e-5, rtol=1e-4)


def test_keras_is_batch_first():
    m = torch.tensor([[[1, 0], [1, 1]], [[0, 1], [1, 1]]])  # (B=2, T=2, S=2), 1 = attend
    dense = masks.from_keras(m).to_dense(2, 2)
    assert dense.shape == (2, 1, 2, 2) and dense[1, 0, 0].tolist() == [False, True]
    assert masks.from_keras(torch.tensor([[1, 1, 0]])).to_dense(1, 3)[0, 0, 0].tolist() == [True, True, False]


def test_things_that_look_inverted_are_reported():
    with pytest.raises(ValueError, match=r"not additive.*0/1 keep-mask"):
        masks.from_hf(torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]]))
    with pytest.raises(ValueError, match="hides every key"):
        masks.from_torch_mha(key_padding_mask=torch.ones(2, 3, dtype=torch.bool))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # right-padded batch given in the HF convention to the torch converter: True = keep, read as masked
        masks.from_torch_mha(key_padding_mask=torch.tensor([[True, True, False], [True, False, False]]))
    assert any(issubclass(w.category, masks.InvertedMaskWarning) for w in caught)
    with pytest.raises(ValueError, match="bias"):
        masks.from_torch_mha(torch.tensor([[0.0, -0.5], [0.0, 0.0]]))


@given(mask_cases(max_len=10), st.integers(1, 4), st.integers(1, 4))
def test_stats_equal_dense_counts(case, block_q, block_k):
    stats = case.mask.stats(case.q_len, case.k_len, block_q=block_q, block_k=block_k, q_offset=case.q_offset)
    dense = case.mask.to_dense(case.q_len, case.k_len, q_offset=case.q_offset)
    assert stats.allowed == int(dense.sum())
    assert stats.empty_rows == int((~dense.any(-1)).sum())
    kinds = case.mask.block_map(case.q_len, case.k_len, block_q, block_k, q_offset=case.q_offset)
    assert stats.tiles_empty + stats.tiles_partial + stats.tiles_full == kinds.numel()
    tiles = [(b, h, i, j) for b in range(kinds.shape[0]) for h in range(kinds.shape[1])
             for i in range(kinds.shape[2]) for j in range(kinds.shape[3])]
    cells = {t: dense[t[0], t[1], t[2] * block_q:(t[2] + 1) * block_q, t[3] * block_k:(t[3] + 1) * block_k]
             for t in tiles}
    truly_empty = [t for t in tiles if not cells[t].any()]
    mapped_empty = [t for t in tiles if kinds[t] == masks.EMPTY]
    assert set(mapped_empty) <= set(truly_empty)  # the block map is conservative
    # stats finds the empty tiles from row intervals where the mask has them, else from the block map: at least
    # the map's, at most the true ones (an AND of two PARTIAL tiles can be empty, which only the intervals see)
    assert len(mapped_empty) <= stats.tiles_empty <= len(truly_empty)
    skipped = stats.flops_skipped // (4 * 64)
    assert sum(cells[t].numel() for t in mapped_empty) <= skipped <= sum(cells[t].numel() for t in truly_empty)


def test_stats_see_an_and_of_partial_tiles_that_is_empty():
    # hypothesis (thorough profile) found it: item 2's only key (0) is outside every query's window, so no tile
    # holds an allowed entry; the block map ANDs two PARTIAL tiles into PARTIAL, the row intervals see empty
    mask = masks.document(torch.zeros(3, 10, dtype=torch.long)) & masks.sliding_window(1) & masks.padding([0, 0, 1])
    assert not mask.to_dense(8, 3, q_offset=2).any()
    stats = mask.stats(8, 3, block_q=1, block_k=3, q_offset=2)
    kinds = mask.block_map(8, 3, 1, 3, q_offset=2)
    assert (stats.tiles_empty, stats.allowed) == (kinds.numel(), 0) and (kinds != masks.EMPTY).any()


@pytest.mark.parametrize("window", [None, 3])
def test_hf_masks_from_transformers_own_mask_preparation(window):
    pytest.importorskip("transformers", reason="transformers is not installed (test extra)")
    from transformers import masking_utils as hf

    padding_2d = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])  # right padding, 1 = real token
    function = hf.causal_mask_function if window is None else hf.sliding_window_causal_mask_function(window)
    ours = masks.causal() & masks.from_hf(padding_2d)
    if window is not None:
        ours = ours & masks.sliding_window(window)
    expected = ours.to_dense(6, 6)
    keep = hf.sdpa_mask(batch_size=2, q_length=6, kv_length=6, mask_function=function, attention_mask=padding_2d.bool(),
                        allow_is_causal_skip=False)  # (B, 1, 6, 6) bool, True = keep
    additive = hf.eager_mask(batch_size=2, q_length=6, kv_length=6, mask_function=function,
                             attention_mask=padding_2d.bool(), dtype=torch.float32)  # 0 / finfo.min
    for hf_mask in (keep, additive):
        assert torch.equal(masks.from_hf(hf_mask).to_dense(6, 6), expected)


def _exact_tile_counts(dense, block_q, block_k):
    """(empty, full) tiles of a dense (B, H, Lq, Lk) mask, counted tile by tile."""
    empty = full = 0
    for i in range(0, dense.shape[2], block_q):
        for j in range(0, dense.shape[3], block_k):
            tile = dense[:, :, i:i + block_q, j:j + block_k].flatten(2)
            empty += int((~tile.any(-1)).sum())
            full += int(tile.all(-1).sum())
    return empty, full


def _interval_path_applies(dense, block_q):
    """Whether stats counts tiles from row intervals (stats.py, _tiles_from_bounds): in every query tile the
    rows that see something start in order and without a gap, and, as stats.py implements it, a tile whose
    first row sees nothing sees nothing in any row. ``dense`` is (B, H, Lq, Lk), each row one interval."""
    for rows in dense.flatten(0, 1):
        for tile in rows.split(block_q):
            live = [row.nonzero().flatten() for row in tile if row.any()]
            if not live:
                continue
            if not tile[0].any():
                return False
            start, reach = int(live[0][0]), int(live[0][-1]) + 1
            for keys in live[1:]:
                lo, hi = int(keys[0]), int(keys[-1]) + 1
                if lo < start or lo > reach:
                    return False
                start, reach = lo, max(reach, hi)
    return True


@given(mask_cases(max_len=12), st.integers(1, 5), st.integers(1, 5))
def test_stats_tiles_equal_the_exact_classification(case, block_q, block_k):
    # interval-structured masks count tiles from their row bounds: exactly, wherever that path applies; any
    # other count comes from the block map, which must never call a non-empty tile empty nor a partial one full
    stats = case.mask.stats(case.q_len, case.k_len, block_q=block_q, block_k=block_k, q_offset=case.q_offset)
    dense = case.mask.to_dense(case.q_len, case.k_len, q_offset=case.q_offset)
    empty, full = _exact_tile_counts(dense, block_q, block_k)
    assert stats.tiles_empty <= empty and stats.tiles_full <= full
    assert stats.allowed == int(dense.sum())
    bounds = case.mask.row_bounds(torch.arange(case.q_offset, case.q_offset + case.q_len), case.k_len)
    if bounds is None:
        return
    lo, hi = (torch.as_tensor(x).clamp(0, case.k_len)[..., None] for x in bounds)  # (B|1, H|1, Lq, 1)
    keys = torch.arange(case.k_len)
    assert torch.equal(((keys >= lo) & (keys < hi)).expand_as(dense), dense)  # the rows are those intervals
    if _interval_path_applies(dense, block_q):
        assert (stats.tiles_empty, stats.tiles_full) == (empty, full)


@pytest.mark.parametrize("mask", [
    masks.full(), masks.causal(), masks.causal() & masks.sliding_window(3), masks.prefix_lm(4),
    masks.padding([12, 2]), masks.document(torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]])) & masks.causal(),
], ids=repr)
@pytest.mark.parametrize("block_q,block_k", [(4, 3), (5, 5), (3, 7)])
def test_stats_counts_interval_masks_exactly(mask, block_q, block_k):
    """Masks that take the interval path for certain (short last tiles included), so the exactness above
    is exercised on every run, not only when hypothesis draws such a mask."""
    dense = mask.to_dense(12, 12)
    assert _interval_path_applies(dense, block_q)
    stats = mask.stats(12, 12, block_q=block_q, block_k=block_k)
    assert (stats.tiles_empty, stats.tiles_full) == _exact_tile_counts(dense, block_q, block_k)


def test_from_torch_mha_with_a_first_size_not_divisible_by_num_heads_is_a_clear_error():
    # on main: a RuntimeError from view() (issue 16)
    with pytest.raises(ValueError, match=r"first size 5 is not a multiple of num_heads \(2\)"):
        masks.from_torch_mha(torch.zeros(5, 3, 3, dtype=torch.bool), num_heads=2)


@pytest.mark.parametrize("mask", [masks.padding(torch.tensor([256, 100])),
                                  masks.causal() & masks.padding(torch.tensor([60, 256, 130])),
                                  masks.from_tensor(torch.rand(1, 2, 256, 256) > 0.999)],
                         ids=["padding per row", "causal & padding", "per head"])
def test_to_flex_block_map_is_each_rows_and_heads_own(mask):
    # compiled FlexAttention skips the blocks its map calls empty: a map built from row 0 alone dropped row 1's
    # padding (issue found in review: outputs off by 1.07 against the reference)
    pytest.importorskip("torch.nn.attention.flex_attention")
    _, block_mask = masks.to_flex(mask, 256, 256, block_size=128)
    dense = mask.to_dense(256, 256).expand(max(mask.batch, 1), max(mask.heads, 1), 256, 256)  # (B, H, L, S)
    touched = dense.reshape(dense.shape[0], dense.shape[1], 2, 128, 2, 128).any(-1).any(-2)  # (B, H, 2, 2)
    assert torch.equal(block_mask.to_dense().bool(), touched)
    with pytest.raises(ValueError, match="different batch entries" if mask.batch > 1 else "different heads"):
        masks.to_flex(mask, 256, 256, batch=7, heads=7)


def test_to_torch_mha_names_num_heads_for_a_per_head_mask():
    per_head = masks.from_tensor(torch.rand(1, 3, 4, 4) > 0.5)
    with pytest.raises(ValueError, match=r"differs per head \(3 heads\); pass num_heads=3"):
        masks.to_torch_mha(per_head, 4, 4, batch=1)
    with pytest.raises(ValueError, match=r"not per item.*pass batch=N"):  # the mask cannot say N
        masks.to_torch_mha(per_head, 4, 4, num_heads=3)
    attn, _ = masks.to_torch_mha(per_head, 4, 4, num_heads=3, batch=1)
    assert torch.equal(attn, ~per_head.to_dense(4, 4)[0])  # (3, 4, 4): batch 1 times 3 heads
    with pytest.raises(ValueError, match="holds 2 items, got batch=3"):
        masks.to_torch_mha(masks.from_tensor(torch.rand(2, 3, 4, 4) > 0.5), 4, 4, num_heads=3, batch=3)
    with pytest.raises(ValueError, match="holds 2 items, got batch=3"):  # key padding too
        masks.to_torch_mha(masks.padding([3, 2]), 4, 5, batch=3)
    _, kpm = masks.to_torch_mha(masks.padding([3]), 4, 5, num_heads=2, batch=4)  # one row, for each of 4 items
    assert torch.equal(kpm, torch.tensor([[False] * 3 + [True] * 2] * 4))


def test_a_per_head_mask_drives_nn_multihead_attention_over_a_batch():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x, y = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    keep = (torch.rand(1, 4, 5, 7) > 0.5) | (torch.arange(7) == 0)  # every row sees key 0
    attn, kpm = masks.to_torch_mha(masks.from_tensor(keep), 5, 7, num_heads=4, batch=2)
    got, _ = theirs(x, y, y, attn_mask=attn, key_padding_mask=kpm)
    for item in range(2):  # the oracle: each item alone, with the (H, L, S) mask of that item
        want, _ = theirs(x[item:item + 1], y[item:item + 1], y[item:item + 1], attn_mask=~keep[0])
        torch.testing.assert_close(got[item:item + 1], want)




def test_integer_masks_other_than_zero_and_one_are_refused():
    # a packed batch's 2-D attention_mask of document numbers ([1, 1, 2, 2, 0]: the multipack convention) was read
    # as "every non-zero is a real token", so the two documents saw each other; floats were already refused
    packed = torch.tensor([[1, 1, 2, 2, 0]])
    with pytest.raises(ValueError, match=r"attention_mask holds 1 \(token\) and 0 \(padding\); this one holds "
                                         r"\[0, 1, 2\].*masks\.document"):
        masks.from_hf(packed)
    with pytest.raises(ValueError, match=r"a Keras mask holds 1 \(attend\) and 0 \(hide\); this one holds other"):
        masks.from_keras(torch.tensor([[[1, 2], [1, 1]]]))
    # 0 / 1 integers stay what they were: the oracle is the mask written out by hand
    ok = masks.from_hf(torch.tensor([[1, 1, 1, 0]])).to_dense(2, 4)
    assert ok[0, 0].tolist() == [[True, True, True, False]] * 2


@pytest.mark.parametrize("call, error, words", [
    # was "value cannot be converted to type int without overflow"
    (lambda: masks.to_torch_mha(masks.causal(), 2, 2, additive=torch.int32), TypeError,
     "to_torch_mha: additive must be a floating dtype (or None for bool masks), got torch.int32"),
    # was accepted (num_heads=0 and -2 only fail for masks that differ per head)
    (lambda: masks.to_torch_mha(masks.causal(), 2, 2, num_heads=0), ValueError,
     "to_torch_mha: num_heads must be an int >= 1, got 0"),
    # was "upper bound and lower bound inconsistent with step sign" from inside FlexAttention
    (lambda: masks.to_flex(masks.causal(), -1, 3), ValueError, "q_len must be an int >= 0, got -1"),
    (lambda: masks.to_flex(masks.causal(), 3, 3, q_offset=-2), ValueError, "q_offset must be an int >= 0, got -2"),
])
def test_converter_arguments_are_checked_by_name(call, error, words):
    with pytest.raises(error, match=re.escape(words)):
        call()


def test_from_torch_mha_checks_its_two_masks_against_each_other():
    # attn_mask (L, 3) with key_padding_mask (N, 5) was accepted and failed at first use naming 'from_tensor'; a 3-D
    # attn_mask of N=2 beside a key_padding_mask of N=3 said "cannot combine masks with different batch sizes"
    with pytest.raises(ValueError, match=re.escape("from_torch_mha: attn_mask (3, 3) has S=3 keys and N=1 items "
                                                   "but key_padding_mask (2, 5) has S=5 and N=2")):
        masks.from_torch_mha(torch.zeros(3, 3, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=re.escape("attn_mask (8, 3, 3) has S=3 keys and N=2 items but "
                                                   "key_padding_mask (3, 3) has S=3 and N=3")):
        masks.from_torch_mha(torch.zeros(8, 3, 3, dtype=torch.bool), torch.zeros(3, 3, dtype=torch.bool), num_heads=4)
    # what nn.MultiheadAttention accepts stays accepted, with its meaning: the oracle is each mask written out
    attn = torch.tensor([[False, True, True], [False, False, True]])  # (L=2, S=3), True = masked
    kpm = torch.tensor([[False, False, False], [False, True, False]])  # (N=2, S=3)
    dense = masks.from_torch_mha(attn, kpm).to_dense(2, 3)
    assert torch.equal(dense, ~attn[None, None] & ~kpm[:, None, None])


@pytest.mark.parametrize("kwargs, name", [({"attn_mask": torch.zeros(2, 3, dtype=torch.long)}, "attn_mask"),
                                          ({"key_padding_mask": torch.tensor([[0, 1, 1]])}, "key_padding_mask")])
def test_from_torch_mha_refuses_integer_masks_as_torch_does(kwargs, name):
    # an int64 attn_mask of zeros was read as additive (nothing hidden), 0/1 integers were called "a float mask";
    # nn.MultiheadAttention takes only bool and float masks
    with pytest.raises(TypeError, match=re.escape(f"from_torch_mha: {name} must be bool (True = masked) or float "
                                                  "(additive), as nn.MultiheadAttention takes, got dtype torch.int64")):
        masks.from_torch_mha(**kwargs)


@pytest.mark.parametrize("kwargs, error, words", [
    # was "value cannot be converted to type c10::Half without overflow"
    ({"dtype": torch.float16, "fill": -1e9}, ValueError,
     "to_additive: fill=-1000000000.0 does not fit torch.float16 (at least -65504.0); use fill=None (-inf) or "
     "torch.finfo(dtype).min"),
    # were accepted: a fill of 0 (or NaN, or a mild -5) does not hide the key, it adds a bias
    ({"fill": 0.0}, ValueError, "to_additive: fill=0.0 would not hide a key; expected -inf (None) or at most -10000.0"),
    ({"fill": float("nan")}, ValueError, "to_additive: fill=nan would not hide a key"),
    ({"fill": -5.0}, ValueError, "to_additive: fill=-5.0 would not hide a key"),
    # was "'str' object has no attribute 'is_floating_point'"
    ({"dtype": "float32"}, TypeError, "to_additive needs a floating torch.dtype, got 'float32'"),
])
def test_to_additive_refuses_a_fill_that_does_not_hide(kwargs, error, words):
    with pytest.raises(error, match=re.escape(words)):
        masks.to_additive(masks.causal(), 2, 2, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_to_additive_with_the_hugging_face_fill_reads_back(dtype):
    mask = masks.causal() & masks.padding([3, 1])
    add = masks.to_additive(mask, 3, 3, dtype, fill=torch.finfo(dtype).min)
    assert torch.equal(masks.from_hf(add).to_dense(3, 3), mask.to_dense(3, 3))  # the oracle: the dense mask


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.complex64])
def test_from_hf_refuses_a_4d_mask_that_is_neither_bool_nor_float(dtype):
    # an int64 4-D mask of zeros was read as additive, so full attention, though as a 0/1 keep-mask it hides every
    # key; 0/1 integers were refused as "a float mask of 0s and 1s"; complex failed inside torch ("le_cpu")
    for values in (torch.zeros(1, 1, 3, 3), torch.ones(1, 1, 3, 3)):
        with pytest.raises(TypeError, match=re.escape(
                f"from_hf: a 4-D attention_mask must be bool (True = keep) or float (additive: 0 keeps, -inf or "
                f"finfo.min hides), as Hugging Face builds them, got dtype {dtype}; a 0/1 keep-mask: pass "
                "attention_mask.bool()")):
            masks.from_hf(values.to(dtype))
    # bool and float stay what they were: the oracle is the mask written out
    keep = torch.tensor([[[[True, False], [True, True]]]])
    assert torch.equal(masks.from_hf(keep).to_dense(2, 2), keep)
    additive = torch.zeros(1, 1, 2, 2).masked_fill(~keep, float("-inf"))
    assert torch.equal(masks.from_hf(additive).to_dense(2, 2), keep)


@pytest.mark.parametrize("call, words", [
    # each was an AttributeError ("'list' object has no attribute 'dim'", "'Tensor' object has no attribute
    # 'structure'"), a TypeError about to_dense's arguments, or torch's "new(): invalid data type 'str'"
    (lambda: masks.from_hf([[1, 1, 0]]), "from_hf: attention_mask must be a torch.Tensor, got list"),
    (lambda: masks.from_keras([[1, 0]]), "from_keras: mask must be a torch.Tensor, got list"),
    (lambda: masks.from_torch_mha([[True]]), "from_torch_mha: attn_mask must be a torch.Tensor or None, got list"),
    (lambda: masks.from_torch_mha(key_padding_mask=[[False]]),
     "from_torch_mha: key_padding_mask must be a torch.Tensor or None, got list"),
    (lambda: masks.from_cu_seqlens("0,3"), "from_cu_seqlens: cu_seqlens must be a tensor or a list of ints, got str"),
    (lambda: masks.from_cu_seqlens(None),
     "from_cu_seqlens: cu_seqlens must be a tensor or a list of ints, got NoneType"),
    (lambda: masks.to_additive(torch.ones(2, 2, dtype=torch.bool), 2, 2),
     "to_additive: mask must be a maskattn Mask (masks.from_tensor wraps a bool tensor), got Tensor"),
    (lambda: masks.to_torch_mha(torch.ones(2, 2, dtype=torch.bool), 2, 2),
     "to_torch_mha: mask must be a maskattn Mask (masks.from_tensor wraps a bool tensor), got Tensor"),
    (lambda: masks.to_flex(None), "to_flex: mask must be a maskattn Mask (masks.from_tensor wraps a bool tensor), got "
     "NoneType"),
])
def test_converters_name_an_argument_of_the_wrong_type(call, words):
    with pytest.raises(TypeError, match=re.escape(words)):
        call()
    # what they take stays taken: a list of ints for cu_seqlens, its document mask written out as the oracle
    assert masks.from_cu_seqlens((0, 2, 3)).to_dense(3, 3)[0, 0].tolist() == [[True, True, False], [True, True, False],
                                                                             [False, False, True]]


def _exact_interval_stats(rows, k_len, block_q, block_k):
    """(tiles empty, partial, full, skipped entries) of one (batch, head) whose query rows see the key intervals
    ``rows`` [(lo, hi), ...], counted with Python ints tile by tile (no floats, nothing materialised)."""
    empty = partial = full = skipped = 0
    for start in range(0, len(rows), block_q):
        band = rows[start:start + block_q]
        distinct = set(band)  # (rows alike are counted once)
        for k0 in range(0, k_len, block_k):
            k1 = min(k0 + block_k, k_len)  # the tile's keys are [k0, k1)
            seen = [max(0, min(hi, k1) - max(lo, k0)) for lo, hi in distinct]
            if not any(seen):
                empty, skipped = empty + 1, skipped + len(band) * (k1 - k0)
            elif all(n == k1 - k0 for n in seen):
                full += 1
            else:
                partial += 1
    return empty, partial, full, skipped


@pytest.mark.parametrize("mask, row, q_len, k_len, q_offset, block_q, block_k", [
    # more keys than float64 counts exactly: tiles were misclassified (1026 full of 1026 tiles, 2 of them partial)
    # and flops_skipped came out negative
    (masks.causal(), lambda q: (0, q + 1), 4, 2**55 + 1, 2**55 - 3, 2, 2**51 - 1),
    (masks.prefix_lm(2**55 - 9), lambda q: (0, max(q + 1, 2**55 - 9)), 4, 2**55 + 1, 2**55 - 3, 2, 2**51 - 1),
    # the skipped entries summed in float64: 5 entries too many, long before 2**53 keys
    (masks.padding([2**39 // 3 + 17]), lambda q: (0, 2**39 // 3 + 17), 2**17 + 3, 2**39 + 999, 0, 4097, 2**31 + 13),
], ids=["causal", "prefix", "padding"])
def test_stats_of_very_long_keys_count_exactly(mask, row, q_len, k_len, q_offset, block_q, block_k):
    stats = mask.stats(q_len, k_len, block_q=block_q, block_k=block_k, q_offset=q_offset)
    rows = [tuple(min(x, k_len) for x in row(q)) for q in range(q_offset, q_offset + q_len)]  # the documented rows
    empty, partial, full, skipped = _exact_interval_stats(rows, k_len, block_q, block_k)
    assert (stats.tiles_empty, stats.tiles_partial, stats.tiles_full) == (empty, partial, full)
    assert stats.flops_skipped == 4 * 64 * skipped
    assert stats.allowed == sum(hi - lo for lo, hi in rows)


def test_additive_masks_are_built_where_the_mask_is():
    # a mask holding CUDA tensors gave "Tensor on device cpu is not on the expected device": the zeros were made on
    # the CPU; the meta device stands in for an accelerator here (same placement rule, no data to read)
    mask = masks.causal() & masks.padding(torch.tensor([3, 2]))
    on_meta = mask.to("meta")
    add = masks.to_additive(on_meta, 3, 3, torch.float16)
    attn, _ = masks.to_torch_mha(on_meta, 3, 3, additive=torch.float16)
    _, kpm = masks.to_torch_mha(masks.padding(torch.tensor([3, 2])).to("meta"), 3, 3, additive=torch.float16)
    for got, shape in ((add, (2, 1, 3, 3)), (attn, (2, 3, 3)), (kpm, (2, 3))):
        assert (got.device.type, got.dtype, tuple(got.shape)) == ("meta", torch.float16, shape)
    # on the CPU the values are the dense mask's: 0 where allowed, -inf where hidden (the oracle written out)
    dense = mask.to_dense(3, 3)
    assert torch.equal(masks.to_additive(mask, 3, 3), torch.where(dense, 0.0, float("-inf")))
    if torch.cuda.is_available():
        on_gpu = mask.to("cuda")
        assert torch.equal(masks.to_additive(on_gpu, 3, 3).cpu(), torch.where(dense, 0.0, float("-inf")))
        assert torch.equal(masks.to_torch_mha(on_gpu, 3, 3, additive=torch.float32)[0].cpu(),
                           torch.where(~dense.flatten(0, 1), float("-inf"), 0.0))
