import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import maskattn
from maskattn import masks
from maskattn.masks import EMPTY, FULL, PARTIAL
from strategies import mask_cases


@given(mask_cases())
def test_to_dense_agrees_with_brute_force(case):
    dense = case.mask.to_dense(case.q_len, case.k_len, q_offset=case.q_offset)
    assert dense.dtype == torch.bool
    assert dense.shape[2:] == (case.q_len, case.k_len)
    assert dense.shape[0] in (1, case.batch) and dense.shape[1] in (1, case.heads)
    expanded = dense.expand(case.batch, case.heads, case.q_len, case.k_len)
    assert torch.equal(expanded, case.brute_dense())


def _exact_tile_kinds(dense: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Classify tiles by looking at every position (the oracle for block_map)."""
    B, H, Lq, Lk = dense.shape
    nq, nk = -(-Lq // block_q), -(-Lk // block_k)
    kinds = torch.empty(B, H, nq, nk, dtype=torch.int8)
    for i in range(nq):
        for j in range(nk):
            tile = dense[:, :, i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k]
            any_, all_ = tile.flatten(2).any(-1), tile.flatten(2).all(-1)
            kinds[:, :, i, j] = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY))
    return kinds


@given(mask_cases(), st.integers(1, 5), st.integers(1, 5))
def test_block_map_is_sound(case, block_q, block_k):
    shape = (case.batch, case.heads)
    got = case.mask.block_map(case.q_len, case.k_len, block_q, block_k, q_offset=case.q_offset)
    exact = _exact_tile_kinds(case.brute_dense(), block_q, block_k)
    got = got.expand(*shape, *exact.shape[2:])
    # never EMPTY where something is allowed, never FULL where something is hidden
    assert not ((got == EMPTY) & (exact != EMPTY)).any()
    assert not ((got == FULL) & (exact != FULL)).any()


LEAVES = [
    ("causal", lambda B, L: masks.causal()),
    ("window", lambda B, L: masks.sliding_window(3)),
    ("causal window", lambda B, L: masks.causal() & masks.sliding_window(4)),
    ("lengths", lambda B, L: masks.padding(torch.tensor([L, 1, 0, L // 2])[:B])),
    ("valid", lambda B, L: masks.padding(torch.rand(B, L) > 0.3)),
    ("sorted documents", lambda B, L: masks.document(torch.sort(torch.randint(0, 4, (B, L)))[0])),
    ("prefix", lambda B, L: masks.prefix_lm(5)),
    ("tensor", lambda B, L: masks.from_tensor(torch.rand(B, 2, L, L) > 0.5)),
]


@pytest.mark.parametrize("name,make", LEAVES, ids=[n for n, _ in LEAVES])
@pytest.mark.parametrize("q_offset", [0, 3])
def test_block_map_is_exact_for_structured_leaves(name, make, q_offset):
    # Soundness alone would allow "everything PARTIAL"; single masks must classify exactly so that
    # a backend really skips the tiles it can.
    B, L, Lq = 3, 23, 20 - q_offset
    mask = make(B, L)
    for block_q, block_k in [(4, 4), (3, 5), (8, 2)]:
        got = mask.block_map(Lq, L, block_q, block_k, q_offset=q_offset)
        exact = _exact_tile_kinds(mask.to_dense(Lq, L, q_offset=q_offset), block_q, block_k)
        assert torch.equal(got.expand_as(exact), exact), (name, block_q, block_k)


def test_block_map_never_materialises_structured_masks():
    # 2**20 x 2**20 booleans would need a terabyte; the block map is 256 x 256.
    n, t = 2**20, 4096
    # Window 4096, tiles 4096: tile (i, i-1) spans q - k in [1, 8191], so it is only partly seen.
    kinds = (masks.causal() & masks.sliding_window(t) & masks.padding([n - 5])).block_map(n, n, t, t)[0, 0]
    assert kinds.shape == (256, 256)
    assert (kinds.diagonal() == PARTIAL).all() and (kinds.diagonal(-1) == PARTIAL).all()
    assert (kinds == PARTIAL).sum() == 256 + 255 and (kinds == FULL).sum() == 0
    # Window 8192: q - k <= 8191 holds on the whole tile below the diagonal.
    kinds = (masks.causal() & masks.sliding_window(2 * t) & masks.padding([n - 5])).block_map(n, n, t, t)[0, 0]
    assert (kinds.diagonal(-1) == FULL).all() and (kinds.diagonal(-2) == PARTIAL).all()
    assert (kinds == FULL).sum() == 255 and (kinds == PARTIAL).sum() == 256 + 254


def test_hand_drawn_pictures():
    def grid(mask, n, **kw):
        return ["".join("x" if v else "." for v in row) for row in mask.to_dense(n, n, **kw)[0, 0].tolist()]

    assert grid(masks.causal() & masks.sliding_window(2), 4) == ["x...", "xx..", ".xx.", "..xx"]
    assert grid(masks.sliding_window(2), 3) == ["xxx", "xxx", ".xx"]
    assert grid(masks.prefix_lm(2), 4) == ["xx..", "xx..", "xxx.", "xxxx"]
    assert grid(masks.document(torch.tensor([[0, 0, 1, 1]])), 4) == ["xx..", "xx..", "..xx", "..xx"]
    assert grid(masks.padding([3]), 4) == ["xxx.", "xxx.", "xxx.", "xxx."]
    assert grid(~masks.causal() | masks.full(), 2) == ["xx", "xx"]
    # q_offset: the second half of a causal 4x4, as seen while decoding with a cache
    dense = masks.causal().to_dense(2, 4, q_offset=2)[0, 0]
    assert dense.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_padding_accepts_lengths_or_valid_keys():
    by_length = masks.padding(torch.tensor([2, 4])).to_dense(3, 4)
    by_valid = masks.padding(torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)).to_dense(3, 4)
    assert torch.equal(by_length, by_valid)
    assert by_length.shape == (2, 1, 3, 4)


def test_repr_and_render():
    mask = masks.causal() & (masks.sliding_window(3) | ~masks.prefix_lm(2))
    assert repr(mask) == "causal() & (sliding_window(3) | ~prefix_lm(2))"
    assert repr(masks.causal() & masks.full() & masks.causal()) == "causal() & full() & causal()"
    text = masks.causal().render(3)
    assert text.splitlines()[1:] == ["     k 0 1 2", "  q 0  ■ · ·", "  q 1  ■ ■ ·", "  q 2  ■ ■ ■"]
    assert masks.document(torch.zeros(1, 5, dtype=torch.long)).render().count("■") == 25


def test_combining_with_non_masks_and_bool_is_an_error():
    with pytest.raises(TypeError, match="from_tensor"):
        masks.causal() & torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(TypeError, match="truth value"):
        bool(masks.causal())


@pytest.mark.parametrize(
    "make,error,words",
    [
        (lambda: masks.sliding_window(0), ValueError, "size must be in [1, 2**62] (positions are int64), got 0"),
        (lambda: masks.sliding_window(2**70), ValueError, "size must be in [1, 2**62]"),
        (lambda: masks.prefix_lm(2**70), ValueError, "expected a length in [0, 2**62]"),
        (lambda: masks.sliding_window(2.5), TypeError, "size must be an int"),
        (lambda: masks.padding(torch.tensor([[1, 2]])), ValueError, "lengths must be 1-D"),
        # a Hugging Face attention_mask (int64 1/0) was only told "lengths must be 1-D"
        (lambda: masks.padding(torch.tensor([[1, 1, 0]])), ValueError, "lengths must be 1-D (B,), got shape (1, 3); "
         "a (B, Lk) tensor of valid keys must be bool (.bool(); masks.from_hf reads a Hugging Face attention_mask)"),
        (lambda: masks.padding(torch.tensor([1.0])), TypeError, "float32"),
        (lambda: masks.padding([3, -1]), ValueError, ">= 0"),
        # these were "'int' object is not iterable", "'NoneType' object is not iterable", "too many dimensions 'str'"
        (lambda: masks.padding(5), TypeError, "padding(lengths_or_valid): expected a 1-D integer tensor or list of "
         "lengths (one per batch item, e.g. [5]) or a (B, Lk) bool tensor of valid keys, got int 5"),
        (lambda: masks.padding(None), TypeError, "padding(lengths_or_valid): expected a 1-D integer tensor"),
        (lambda: masks.padding("35"), TypeError, "got str '35'"),
        (lambda: masks.document(torch.zeros(4, dtype=torch.long)), ValueError, "(B, L)"),
        (lambda: masks.document(torch.zeros(1, 4)), TypeError, "integer"),
        (lambda: masks.prefix_lm(-1), ValueError, ">= 0"),
        (lambda: masks.prefix_lm(1.5), TypeError, "a sequence of ints or a 1-D integer tensor, got float 1.5"),
        (lambda: masks.prefix_lm("3"), TypeError, "got str '3'"),
        (lambda: masks.from_tensor(torch.ones(2, 2)), TypeError, "bool tensor"),
        (lambda: masks.from_tensor(torch.ones(1, 1, 1, 2, 2, dtype=torch.bool)), ValueError, "1 to 4 dims"),
        (lambda: masks.padding([2, 3]) & masks.document(torch.zeros(3, 4, dtype=torch.long)),
         ValueError, "different batch sizes"),
    ],
)
def test_bad_constructor_arguments(make, error, words):
    with pytest.raises(error, match=re.escape(words)):
        make()


@pytest.mark.parametrize(
    "mask,q_len,k_len,q_offset,words",
    [
        (masks.padding(torch.ones(1, 3, dtype=torch.bool)), 4, 4, 0, "covers 3 key positions"),
        (masks.document(torch.zeros(1, 6, dtype=torch.long)), 4, 4, 3, "needs 7"),
        (masks.from_tensor(torch.ones(4, 4, dtype=torch.bool)), 2, 4, 3, "has 4 query rows"),
        (masks.from_tensor(torch.ones(4, 4, dtype=torch.bool)), 4, 5, 0, "has 4 key columns"),
        (masks.causal(), 4, 4, -1, "q_offset must be an int >= 0"),
    ],
)
def test_mask_that_does_not_fit_the_call(mask, q_len, k_len, q_offset, words):
    with pytest.raises(ValueError, match=words):
        mask.to_dense(q_len, k_len, q_offset=q_offset)


@given(mask_cases(max_len=12))
def test_relative_masks_depend_only_on_the_distance_to_the_diagonal(case):
    """``mask.relative`` promises that (b, h, i, j) and (b', h', i + d, j + d) agree: the blocked
    backend then shares one element mask among tiles; checked on the brute-force oracle."""
    if not case.mask.relative:
        return
    for b in range(case.batch):
        for h in range(case.heads):
            for i in range(12):
                for j in range(12):
                    assert case.oracle(b, h, i, j) == case.oracle(0, 0, i + 3, j + 3), (b, h, i, j)


def test_relative_is_true_only_for_distance_masks():
    doc = masks.document(torch.zeros(1, 4, dtype=torch.long))
    assert masks.causal().relative and masks.full().relative and (~masks.sliding_window(3) | masks.causal()).relative
    assert not any(m.relative for m in (masks.padding([2]), doc, masks.prefix_lm(2), masks.causal() & doc,
                                        masks.from_tensor(torch.ones(4, 4, dtype=torch.bool))))


# --- the public structure view --------------------------------------------------------------------
def _from_structure(s: masks.MaskStructure, q_len: int, k_len: int, q_offset: int) -> torch.Tensor:
    """The (B|1, 1|H, Lq, Lk) mask the fields of ``s`` describe, from their documented meaning, & its rest."""
    q = torch.arange(q_offset, q_offset + q_len).view(1, 1, -1, 1)
    k = torch.arange(k_len).view(1, 1, 1, -1)
    dense = torch.ones(1, 1, q_len, k_len, dtype=torch.bool)
    if s.causal:
        dense = dense & (k <= q)
    if s.window is not None:
        dense = dense & (q - k < s.window)
    if s.lengths is not None:
        dense = dense & (k < s.lengths.view(-1, 1, 1, 1))
    if s.valid is not None:
        dense = dense & s.valid[:, None, None, :k_len]
    if s.doc_ids is not None:
        ids = s.doc_ids[:, None]  # (B, 1, L)
        dense = dense & (ids[..., q_offset:q_offset + q_len, None] == ids[..., None, :k_len])
    if s.prefix is not None:
        dense = dense & ((k <= q) | (k < s.prefix.view(-1, 1, 1, 1)))
    for part in s.rest:
        dense = dense & part.to_dense(q_len, k_len, q_offset=q_offset)
    return dense


@given(mask_cases(max_len=10))
def test_structure_is_exactly_the_mask(case):
    """The & of a structure's fields and rest is the mask itself, so no consumer can take it for less."""
    s = masks.structure(case.mask)
    rebuilt = _from_structure(s, case.q_len, case.k_len, case.q_offset)
    assert torch.equal(rebuilt.expand(case.batch, case.heads, case.q_len, case.k_len), case.brute_dense())
    assert s.relative == case.mask.relative


def _doc():
    return masks.document(torch.tensor([[0, 0, 1, 1, 1]]))


@pytest.mark.parametrize("make,kinds", [
    (lambda: None, ()),
    (masks.full, ()),
    (lambda: masks.full() & masks.full(), ()),
    (masks.causal, ("causal",)),
    (lambda: masks.causal() & masks.causal(), ("causal",)),
    (lambda: masks.full() & masks.causal(), ("causal",)),
    (lambda: masks.sliding_window(3), ("window",)),
    (lambda: masks.causal() & masks.sliding_window(4) & masks.padding([5, 3]), ("causal", "window", "lengths")),
    (lambda: masks.padding(torch.ones(2, 5, dtype=torch.bool)), ("valid",)),
    (lambda: _doc() & masks.causal(), ("causal", "doc_ids")),
    (lambda: masks.prefix_lm(2), ("prefix",)),
    # what the fields cannot express goes to rest, whole
    (lambda: masks.padding([3]) & masks.padding([2]), ("lengths", "rest")),
    (lambda: _doc() & _doc(), ("doc_ids", "rest")),
    (lambda: masks.causal() | masks.padding([2]), ("rest",)),
    (lambda: ~masks.causal(), ("rest",)),
    (lambda: ~masks.full(), ("rest",)),
    (lambda: masks.from_tensor(torch.ones(5, 5, dtype=torch.bool)), ("rest",)),
    (lambda: masks.causal() & (masks.sliding_window(2) | masks.padding([1])), ("causal", "rest")),
])
def test_structure_of_hand_built_masks(make, kinds):
    mask = make()
    s = masks.structure(mask)
    assert s.kinds == kinds
    assert s.is_full == (kinds == ())
    if mask is not None:
        shape = (mask.batch, mask.heads, 5, 5)
        assert torch.equal(_from_structure(s, 5, 5, 0).expand(shape), mask.to_dense(5, 5).expand(shape))


def test_structure_fields_hold_the_leaves_values():
    lengths, ids = torch.tensor([5, 3]), torch.tensor([[0, 0, 1, 1, 1]])
    s = masks.structure(masks.sliding_window(6) & masks.causal() & masks.padding(lengths) & masks.sliding_window(4))
    assert (s.causal, s.window, s.rest, s.relative) == (True, 4, (), False)  # two windows: the narrower
    assert torch.equal(s.lengths, lengths) and s.valid is None and s.doc_ids is None and s.prefix is None
    assert torch.equal(masks.structure(masks.document(ids)).doc_ids, ids)
    assert masks.structure(masks.prefix_lm(3)).prefix.tolist() == [3]
    second = masks.padding([2])
    assert masks.structure(masks.padding([4]) & second).rest == (second,)
    union = masks.causal() | masks.sliding_window(2)
    assert masks.structure(union).rest == (union,) and masks.structure(union).relative
    assert masks.structure(None).relative and masks.structure(masks.causal()).relative


def test_an_attention_call_reads_its_masks_structure_once(monkeypatch):
    # the hot path: dispatch, the non-finite guard, sdpa's fast-path test and the sdpa call each built the structure
    # of the mask again (four conjunctions of MaskStructure per call for causal() & sliding_window(W)), session 27
    built = []
    cls = type(masks.causal() & masks.sliding_window(2))
    real = cls.structure
    monkeypatch.setattr(cls, "structure", lambda self: built.append(self) or real(self))
    q = torch.randn(1, 2, 6, 4)
    mask = masks.causal() & masks.sliding_window(2)
    with torch.no_grad():
        out = maskattn.attention(q, q, q, mask)
        again = maskattn.attention(q, q, q, mask)  # a model's layers share one mask
    assert built == [mask]
    keep = mask.to_dense(6, 6)  # the oracle: softmax over the dense mask, by hand
    want = torch.softmax((q @ q.transpose(-1, -2) / 2.0).masked_fill(~keep, float("-inf")), -1) @ q
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(again, want)


def test_a_decoders_self_and_cross_attention_masks_keep_their_structures(monkeypatch):
    # a decoder's layers alternate two masks (causal() & padding for self-attention, padding for the memory):
    # structure() kept the last mask's only, so each layer built both again (each mask's, four times for two
    # layers); now the two read last are kept, the older one evicted by a third
    built = []
    for cls in {type(masks.causal() & masks.padding([1])), type(masks.padding([1]))}:
        monkeypatch.setattr(cls, "structure", lambda self, real=cls.structure: built.append(self) or real(self))
    q, memory = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 7, 4)
    own = masks.causal() & masks.padding(torch.tensor([5, 3]))
    cross = masks.padding(torch.tensor([7, 4]))
    with torch.no_grad():
        for _ in range(3):  # three layers
            x = maskattn.attention(q, q, q, own)
            y = maskattn.attention(x, memory, memory, cross)
    third = masks.padding(torch.tensor([2, 2]))

    def whole():  # the structures built for the masks themselves, not for own's parts
        return [m for m in built if any(m is x for x in (own, cross, third))]

    assert whole() == [own, cross]
    for mask in (third, cross, own):  # own was evicted by third: built again
        masks.structure(mask)
    assert whole() == [own, cross, third, own]
    keep = own.to_dense(5, 5)  # the oracle for the numbers: softmax over the dense masks, by hand
    x = torch.softmax((q @ q.transpose(-1, -2) / 2.0).masked_fill(~keep, float("-inf")), -1) @ q
    keep = cross.to_dense(5, 7)
    want = torch.softmax((x @ memory.transpose(-1, -2) / 2.0).masked_fill(~keep, float("-inf")), -1) @ memory
    torch.testing.assert_close(y, want)


def test_the_structure_kept_for_the_last_mask_is_never_another_masks():
    # structure() keeps the last mask's (weakly, by identity): masks built and dropped in turn (CPython reuses
    # their addresses), a moved copy, and the same mask again must each get their own, as the mask builds it
    makers = [masks.causal, lambda: masks.sliding_window(3), lambda: masks.padding(torch.tensor([2, 4])),
              lambda: masks.causal() & masks.padding(torch.tensor([1, 3])),
              lambda: masks.document(torch.tensor([[0, 0, 1, 1]])), masks.full,
              lambda: masks.causal() | masks.sliding_window(2)]
    fields = ("causal", "window", "lengths", "valid", "doc_ids", "prefix", "rest", "relative")
    for i in range(60):
        mask = makers[i % len(makers)]()
        got, want = masks.structure(mask), mask.structure()
        assert got.kinds == want.kinds
        for name in fields:
            a, b = getattr(got, name), getattr(want, name)
            assert a is b or a == b, (i, name)
        del mask
    mask = masks.causal() & masks.padding(torch.tensor([1, 3]))
    assert masks.structure(mask).lengths.device.type == "cpu"
    moved = mask.to("meta")
    assert masks.structure(moved).lengths.device.type == "meta"
    assert masks.structure(mask).lengths.device.type == "cpu"
    assert masks.structure(None).kinds == () and masks.structure(masks.full()).kinds == ()


def test_the_structure_kept_for_the_last_mask_does_not_keep_its_tensors_alive():
    # structure() kept the last mask's structure until the next call: the mask's padding, valid or document tensors
    # outlived it, and a from_tensor or | mask (its structure's rest holds the mask) was never let go: a dense
    # (B, 1, L, L) mask on a GPU stayed after the caller dropped it. The oracle: weak references die.
    import gc
    import weakref

    q = torch.randn(2, 2, 8, 4)
    makers = [(lambda t: masks.causal() & masks.padding(t), lambda: torch.tensor([8, 5])),
              (masks.document, lambda: torch.tensor([[0] * 4 + [1] * 4] * 2)),
              (masks.padding, lambda: torch.arange(8)[None] < 6),
              (masks.from_tensor, lambda: torch.rand(2, 1, 8, 8) > 0.3),
              (lambda t: masks.causal() | masks.padding(t), lambda: torch.tensor([3, 8]))]
    for make, tensor_of in makers:
        tensor = tensor_of()
        mask = make(tensor)
        with torch.no_grad():
            maskattn.attention(q, q, q, mask)
        assert masks.structure(mask) is not None
        gone = weakref.ref(mask), weakref.ref(tensor)
        del mask, tensor
        gc.collect()
        assert [ref() for ref in gone] == [None, None], make


def test_no_private_names_are_exported_and_old_private_classes_warn():
    import maskattn
    from maskattn.masks import base, convert, expr, kinds, stats, structure, tensor_kinds, tiles

    for module in (maskattn, masks, base, convert, expr, kinds, stats, structure, tensor_kinds, tiles):
        assert not [name for name in getattr(module, "__all__", []) if name.startswith("_")], module.__name__
    with pytest.warns(DeprecationWarning, match="structure"):
        assert masks._Causal is type(masks.causal())
    with pytest.raises(AttributeError):
        masks._NoSuchThing  # noqa: B018


def test_to_moves_every_tensor_of_the_expression_and_keeps_its_meaning():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = (masks.causal() & masks.document(ids)) | ~masks.padding(torch.tensor([4])) & masks.prefix_lm(2)
    mask = mask | masks.from_tensor(torch.eye(6, dtype=torch.bool))
    assert mask.to("cpu") is mask  # already there: no copy
    moved = mask.to("meta")
    leaves = moved._leaves()
    assert [type(x) for x in leaves] == [type(x) for x in mask._leaves()]
    assert all(t.device.type == "meta" for leaf in leaves for t in vars(leaf).values() if isinstance(t, torch.Tensor))
    assert all(t.device.type == "cpu" for leaf in mask._leaves() for t in vars(leaf).values()
               if isinstance(t, torch.Tensor))  # the original is untouched
    assert masks.structure(moved).kinds == masks.structure(mask).kinds
    doc = leaves[1]
    assert doc.doc_ids is doc.tensor  # aliased attributes stay one tensor
    prefix = next(leaf for leaf in leaves if hasattr(leaf, "prefix"))
    assert prefix._as_or._leaves()[1].tensor is prefix.prefix  # the prefix-LM's own "causal | padding" too


def test_grid_refuses_a_batch_or_head_the_mask_does_not_have():
    m = masks.padding(torch.tensor([3, 2]))
    assert torch.equal(m.grid(4, batch=1), m.to_dense(4, 4)[1, 0])
    assert torch.equal(masks.causal().grid(4, batch=5, head=3), masks.causal().to_dense(4, 4)[0, 0])  # the same for all
    with pytest.raises(ValueError, match=r"batch=2: the mask has 2 batch entries"):
        m.grid(4, batch=2)  # it drew row 1 instead
    with pytest.raises(ValueError, match=r"head=-1"):
        m.grid(4, head=-1)


def test_stats_text_gives_the_skipped_flops_of_one_batch_item():
    # the figure labelled "per batch item and head" was the sum over the mask's items
    one, four = masks.padding([2048]).stats(4096, 4096), masks.padding([2048] * 4).stats(4096, 4096)
    assert four.flops_skipped == 4 * one.flops_skipped
    said = "2.147 GFLOP forward per batch item and head at head dim 64: 4 x 64 FLOPs a score)"
    assert str(one).rsplit("(", 1)[1] == str(four).rsplit("(", 1)[1] == said


def _walk(mask):
    yield mask
    for value in vars(mask).values():
        for part in value if isinstance(value, tuple) else (value,):
            if isinstance(part, masks.Mask):
                yield from _walk(part)


@given(mask_cases())
def test_each_mask_names_the_state_its_constructor_sets(case):
    """`Mask._state` (what the blocked operator's spec carries, walked without vars() so older compilers can
    trace it) is exactly the attributes a mask holds, also after it was used."""
    mask = case.mask
    mask.to_dense(case.q_len, case.k_len, q_offset=case.q_offset)
    mask.stats(case.q_len, case.k_len, q_offset=case.q_offset, block_q=4, block_k=4)
    for part in _walk(mask):
        assert sorted(vars(part)) == sorted(type(part)._state), type(part).__name__


def test_lengths_beyond_the_call_mean_every_key_is_real():
    """padding(lengths) serves a prefill chunk of an incremental decode, as padding(valid) with more columns does."""
    lengths = torch.tensor([7, 5])
    valid = torch.arange(7) < lengths.view(-1, 1)  # (B, 7), the oracle
    for k_len, q_offset in ((3, 0), (6, 2), (7, 0)):
        q_len = k_len - q_offset
        got = (masks.causal() & masks.padding(lengths)).to_dense(q_len, k_len, q_offset=q_offset)
        want = (masks.causal() & masks.padding(valid)).to_dense(q_len, k_len, q_offset=q_offset)
        assert torch.equal(got, want), (k_len, q_offset)
    q, k, v = (torch.randn(2, 2, 7, 8) for _ in range(3))
    full = maskattn.attention(q, k, v, masks.causal() & masks.padding(lengths))
    for backend in ("reference", "blocked", "sdpa"):
        prefill = maskattn.attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], masks.causal() & masks.padding(lengths),
                                     backend=backend)
        torch.testing.assert_close(prefill, full[:, :, :3], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("given, error, words", [
    ([2.7, 3.1], TypeError, "got dtype torch.float32"),  # not truncated to [2, 3]
    (np.array([2.5]), TypeError, "got dtype torch.float64"),
    # not lengths 1, 0, 1
    ([True, False, True], ValueError, "a bool tensor must be (B, Lk) valid keys, got shape (3,)"),
])
def test_lists_and_arrays_are_read_with_their_own_dtype(given, error, words):
    with pytest.raises(error, match=re.escape(words)):
        masks.padding(given)


def test_a_nested_list_of_bools_is_a_valid_tensor_and_a_list_of_ints_lengths():
    rows = [[True, True, False], [True, False, False]]
    assert torch.equal(masks.padding(rows).to_dense(1, 3), masks.padding(torch.tensor(rows)).to_dense(1, 3))
    assert torch.equal(masks.padding(np.array([2, 1])).to_dense(1, 3), masks.padding(torch.tensor(rows)).to_dense(1, 3))
    with pytest.raises(TypeError, match="cu_seqlens must hold integers"):
        masks.from_cu_seqlens([0, 2.5, 7])


@pytest.mark.parametrize("name,make", LEAVES, ids=[n for n, _ in LEAVES])
@pytest.mark.parametrize("q_len,k_len", [(0, 5), (5, 0), (0, 0)])
def test_block_map_and_stats_of_an_empty_call(name, make, q_len, k_len):
    # from_tensor's block map reshaped zero elements with a -1 size ("cannot reshape tensor of 0 elements"), so
    # mask.stats(0, Lk) and block_map(Lq, 0, ...) failed for tensor masks; the oracle is the empty dense mask
    mask = make(3, 8)
    for block_q, block_k in [(4, 4), (3, 5)]:
        got = mask.block_map(q_len, k_len, block_q, block_k)
        exact = _exact_tile_kinds(mask.to_dense(q_len, k_len), block_q, block_k)
        assert got.shape[2:] == (-(-q_len // block_q), -(-k_len // block_k))
        assert torch.equal(got.expand_as(exact), exact)
        stats = mask.stats(q_len, k_len, block_q=block_q, block_k=block_k)
        assert (stats.allowed, stats.total, stats.empty_rows) == (0, 0, mask.batch * mask.heads * q_len * (k_len == 0))


@pytest.mark.parametrize("name,make", LEAVES, ids=[n for n, _ in LEAVES])
@pytest.mark.parametrize("block", [2**45, 2**63 - 1, 2**64])
def test_a_tile_larger_than_the_call_is_one_tile(name, make, block):
    # tiles were padded to the block size: block_map of documents, valid keys or tensors and stats of any mask
    # tried to allocate 2**45 positions ("can't allocate memory"), 2**63 - 1 overflowed ("Storage size calculation
    # overflowed") and 2**64 was "int too big to convert"; the oracle is the dense mask classified tile by tile
    mask = make(3, 9)
    for q_offset in (0, 2):
        q_len = 9 - q_offset
        dense = mask.to_dense(q_len, 9, q_offset=q_offset)
        for block_q, block_k in ((block, block), (block, 2), (3, block)):
            got = mask.block_map(q_len, 9, block_q, block_k, q_offset=q_offset)
            exact = _exact_tile_kinds(dense, min(block_q, q_len), min(block_k, 9))
            assert torch.equal(got.expand_as(exact), exact), (block_q, block_k, q_offset)
            stats = mask.stats(q_len, 9, block_q=block_q, block_k=block_k, q_offset=q_offset)
            assert (stats.allowed, stats.empty_rows) == (int(dense.sum()), int((~dense.any(-1)).sum()))
            assert stats.tiles_empty + stats.tiles_partial + stats.tiles_full == exact.numel()
            assert (stats.block_q, stats.block_k) == (block_q, block_k)  # reported as given


def test_the_contributing_mask_kind_example_is_its_predicate_on_every_backend():
    # CONTRIBUTING.md's worked `strided(step)` kind, pasted beside the kinds as it says: dense form against the
    # oracle its docstring states (k % step == 0), block map sound, and the backends equal the reference
    import re
    from pathlib import Path

    from maskattn.masks import kinds

    text = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"```python\n# src/maskattn/masks/kinds\.py.*?\n(.*?)```", text, re.S)
    namespace = dict(vars(kinds))
    exec(compile(code, "CONTRIBUTING.md", "exec"), namespace)
    for step, q_len, k_len, q_offset in ((1, 5, 7, 0), (3, 9, 20, 4), (5, 1, 13, 12), (4, 140, 300, 0)):
        mask = namespace["strided"](step)
        oracle = (torch.arange(k_len) % step == 0).expand(q_len, k_len)
        dense = mask.to_dense(q_len, k_len, q_offset=q_offset)
        assert torch.equal(dense.expand(1, 1, q_len, k_len)[0, 0], oracle)
        exact = _exact_tile_kinds(dense.expand(1, 1, q_len, k_len), 4, 8)
        got = mask.block_map(q_len, k_len, 4, 8, q_offset=q_offset).expand_as(exact)
        assert not ((got == EMPTY) & (exact != EMPTY)).any() and not ((got == FULL) & (exact != FULL)).any()
        q, k, v = torch.randn(1, 2, q_len, 8), torch.randn(1, 2, k_len, 8), torch.randn(1, 2, k_len, 8)
        want = maskattn.attention(q, k, v, mask, q_offset=q_offset, backend="reference")
        for backend in ("blocked", "sdpa"):
            got = maskattn.attention(q, k, v, mask, q_offset=q_offset, backend=backend)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("first,second", [
    (masks.prefix_lm(5), masks.prefix_lm(3)),
    (masks.prefix_lm(torch.tensor([2, 6])), masks.prefix_lm(torch.tensor([4, 1]))),
    (masks.padding([4, 2]), masks.padding([1, 5])),
    (masks.padding(torch.tensor([[1, 1, 0, 1, 1, 1]], dtype=torch.bool)),
     masks.padding(torch.tensor([[1, 0, 1, 1, 1, 0]], dtype=torch.bool))),
    (masks.document(torch.tensor([[0, 0, 0, 1, 1, 1]])), masks.document(torch.tensor([[0, 1, 1, 1, 2, 2]]))),
])
def test_the_structure_of_two_parts_of_one_kind_is_both(first, second):
    # a tensor field already set keeps the second part in rest: were it merged into the field (or dropped),
    # prefix_lm(5) & prefix_lm(3) would read as prefix 5, two more keys than the mask lets the first rows see
    for mask in (first & second, second & first):
        s = masks.structure(mask)
        want = first.to_dense(6, 6) & second.to_dense(6, 6)  # the & of the parts, each by its own to_dense
        assert torch.equal(_from_structure(s, 6, 6, 0).expand(want.shape), want)
        assert len(s.rest) == 1


def test_a_kept_mask_collected_while_another_structure_is_built_lets_its_tensors_go(monkeypatch):
    # structure() read the kept entries, built the new mask's structure, then stored the new entry before the ones
    # it had read: a kept mask that the collector freed meanwhile (a cycle, collected at any allocation of the
    # build) had its entry dropped by its weakref callback, and then stored again, dead, holding its tensors until
    # two more masks evicted it. The oracle: the weak reference to the collected mask's tensor dies; every
    # structure is still the mask's own.
    import gc
    import weakref

    new = masks.causal() & masks.padding(torch.tensor([4, 6]))
    build = type(new).structure
    monkeypatch.setattr(type(new), "structure", lambda self: (gc.collect(), build(self))[1])
    was_enabled = gc.isenabled()
    gc.disable()  # the one collection is the build's
    try:
        tensor = torch.ones(2, 6, dtype=torch.bool)
        old = masks.padding(tensor)
        old.cycle = old  # only the collector frees it
        masks.structure(old)
        gone = weakref.ref(tensor)
        del old, tensor
        got = masks.structure(new)
    finally:
        if was_enabled:
            gc.enable()
    assert gone() is None
    assert got.causal and got.lengths is new.parts[1].lengths and got.kinds == ("causal", "lengths")
    assert masks.structure(new) is got  # kept
