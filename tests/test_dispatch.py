"""The auto rules of docs/performance.md, checked by the backend that actually ran, and the registry's
records checked against what their backends do."""

import re
from dataclasses import replace

import pytest
import torch

import maskattn
from maskattn import dispatch, masks
from maskattn.backends import REGISTRY, Backend, reference, sdpa
from maskattn.dispatch import choose_backend  # the real rules, even when conftest forces a backend


def _docs(n, count):
    return masks.document((torch.arange(n) * count // n).view(1, n))


# (row of the table in docs/performance.md, mask(n), Lq, q_offset, options, the backend that must run)
RULES = [
    ("return_weights", lambda n: masks.causal(), 16, 0, {"return_weights": True}, "reference"),
    ("return_lse", lambda n: masks.causal(), 16, 0, {"return_lse": True}, "blocked"),
    ("dropout with a generator", lambda n: masks.causal(), 16, 0,
     {"dropout_p": 0.1, "generator": torch.Generator()}, "blocked"),
    ("dropout without one: small", lambda n: masks.causal() & masks.padding([n, 9]), 16, 0, {"dropout_p": 0.1},
     "sdpa"),
    ("dropout without one: window", lambda n: masks.causal() & masks.sliding_window(4), 1024, 0,
     {"dropout_p": 0.1}, "blocked"),
    ("no mask", lambda n: None, 1024, 0, {}, "sdpa"),
    ("full()", lambda n: masks.full(), 1024, 0, {}, "sdpa"),
    ("pure causal", lambda n: masks.causal(), 1024, 0, {}, "sdpa"),
    ("pure key padding", lambda n: masks.padding([n, 9]), 1024, 0, {}, "sdpa"),
    ("small problem", lambda n: masks.causal() & masks.sliding_window(4), 16, 0, {}, "sdpa"),
    ("a few contiguous documents", lambda n: _docs(n, 4) & masks.causal(), 1024, 0, {}, "sdpa"),
    ("other: window", lambda n: masks.causal() & masks.sliding_window(64), 1024, 0, {}, "blocked"),
    ("other: many documents", lambda n: _docs(n, sdpa.MAX_SEGMENTS + 1), 1024, 0, {}, "blocked"),
    ("other: interleaved documents", lambda n: masks.document(torch.arange(n).view(1, n) % 2), 1024, 0, {},
     "blocked"),
    ("other: prefix-LM", lambda n: masks.prefix_lm(3), 1024, 0, {}, "blocked"),
    ("other: composition", lambda n: masks.causal() & masks.padding([n, 9]), 1024, 0, {}, "blocked"),
    ("other: tensor", lambda n: masks.from_tensor(torch.ones(n, n, dtype=torch.bool)), 1024, 0, {}, "blocked"),
    ("other: causal with q_offset", lambda n: masks.causal(), 512, 512, {}, "blocked"),
]


@pytest.fixture
def ran(monkeypatch):
    """Names of the backends that ran, in order: every registered function is wrapped to record its call."""
    calls = []
    monkeypatch.setattr(dispatch, "choose_backend", choose_backend)  # undo conftest's MASKATTN_BACKEND
    for name, record in list(REGISTRY.items()):

        def counted(*args, _name=name, _fn=record.fn, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setitem(REGISTRY, name, replace(record, fn=counted))
    return calls


@pytest.mark.parametrize("rule,make,q_len,q_offset,options,expected", RULES, ids=[r[0] for r in RULES])
def test_auto_runs_the_backend_its_rule_names(ran, rule, make, q_len, q_offset, options, expected):
    n = q_len + q_offset
    q, k, v = torch.randn(2, 2, q_len, 8), torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 8)
    maskattn.attention(q, k, v, make(n), q_offset=q_offset, **options)
    assert ran == [expected], rule


def test_the_per_document_split_never_competes_with_the_small_problem_rule():
    # dispatch.RULES checks sdpa's fast path (which includes the split) before the small-problem rule
    assert sdpa.MIN_SPLIT_SCORES >= dispatch.SMALL_SCORES


@pytest.mark.parametrize("name", list(REGISTRY))
def test_records_say_what_their_backends_refuse(name):
    record, q = REGISTRY[name], torch.randn(1, 1, 4, 8)
    for flag, claimed in (("return_weights", record.returns_weights), ("return_lse", record.returns_lse)):
        features = {"return_weights": False, flag: True}
        assert dispatch.can_run(name, q, dropout_p=0.0, **features) == claimed
        if not claimed:
            with pytest.raises(ValueError, match=flag):
                record.fn(q, q, q, masks.causal(), scale=1.0, **{flag: True})


def test_a_named_custom_backend_is_held_to_its_record(monkeypatch):
    """A registered backend that checks nothing itself: maskattn.attention reads its record when it is named (as
    auto does), instead of returning None weights or running a feature or device the record refuses."""
    ran = []

    def plain(q, k, v, mask, *, scale, dropout_p=0.0, q_offset=0, return_weights=False, generator=None,
              return_lse=False):
        ran.append(1)
        return reference.attention(q, k, v, mask, scale=scale, q_offset=q_offset)

    def no_dropout(call):
        return "backend 'plain' has no dropout" if call.dropout_p > 0 else None

    record = Backend("plain", plain, refuses=no_dropout, cost=lambda call, kept: (call.scores, ""))
    monkeypatch.setitem(REGISTRY, "plain", record)
    q = torch.randn(1, 2, 4, 8)
    for features, message in (({"return_weights": True}, "does not return attention weights"),
                              ({"return_lse": True}, "does not return the log-sum-exp"),
                              ({"dropout_p": 0.5}, "has no dropout")):
        with pytest.raises(ValueError, match=message + ".*backend='auto' picks one"):
            maskattn.attention(q, q, q, masks.causal(), backend="plain", **features)
    monkeypatch.setitem(REGISTRY, "plain", replace(record, devices=frozenset({"cuda"})))
    with pytest.raises(ValueError, match=r"runs on \['cuda'\], not on cpu"):
        maskattn.attention(q, q, q, masks.causal(), backend="plain")
    assert not ran
    monkeypatch.setitem(REGISTRY, "plain", record)
    torch.testing.assert_close(maskattn.attention(q, q, q, masks.causal(), backend="plain"),
                               reference.attention(q, q, q, masks.causal(), scale=8 ** -0.5)[0])
    assert ran == [1]


def test_flex_named_where_it_cannot_run_is_a_value_error():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'flex': FlexAttention does not take float64 on CPU .*backend='blocked'"):
        maskattn.attention(q, q, q, masks.causal(), backend="flex")


def test_unknown_backends_are_named():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=re.escape(f"one of {sorted(REGISTRY)}, got 'fast'")):
        dispatch.can_run("fast", q, dropout_p=0.0, return_weights=False)
    assert sorted(dispatch.BACKENDS) == sorted(REGISTRY) and dispatch.BACKENDS["sdpa"] is REGISTRY["sdpa"].fn


@pytest.mark.parametrize("make", [r[1] for r in RULES if r[0].startswith("other:") and "documents" not in r[0]],
                         ids=[r[0] for r in RULES if r[0].startswith("other:") and "documents" not in r[0]])
def test_off_the_cpu_the_masks_that_go_to_blocked_go_to_sdpa(make):
    # the rule reads only the device type and shapes: meta tensors stand in for a GPU's
    q_len = 1024
    q, k = torch.empty(2, 2, q_len, 8, device="meta"), torch.empty(2, 2, 2 * q_len, 8, device="meta")
    mask = make(2 * q_len)
    backend, why = dispatch.decide(q, k, mask, dropout_p=0.0, return_weights=False, q_offset=q_len)
    assert (backend, "on meta" in why) == ("sdpa", True)
    cpu = dispatch.decide(torch.empty(2, 2, q_len, 8), torch.empty(2, 2, 2 * q_len, 8), mask, dropout_p=0.0,
                          return_weights=False, q_offset=q_len)[0]
    assert cpu == "blocked"


def test_off_the_cpu_a_dense_mask_too_large_for_memory_stays_on_blocked():
    n = 1 << 15  # a (32k x 32k) prefix-LM: 2^30 entries as a dense mask; the window still takes its band calls
    q = torch.empty(1, 2, n, 8, device="meta")
    assert dispatch.decide(q, q, masks.prefix_lm(3), dropout_p=0.0, return_weights=False)[0] == "blocked"
    window = masks.causal() & masks.sliding_window(256)
    assert dispatch.decide(q, q, window, dropout_p=0.0, return_weights=False)[0] == "sdpa"


def test_the_small_problem_rule_holds_up_to_and_including_small_scores():
    # docs/performance.md: "Lq * Lk <= SMALL_SCORES" goes to sdpa; a window cannot take sdpa's fast path
    window = masks.causal() & masks.sliding_window(4)
    side = int(dispatch.SMALL_SCORES ** 0.5)
    assert side * side == dispatch.SMALL_SCORES
    q = torch.empty(1, 1, side, 8)
    assert choose_backend(q, q, window, dropout_p=0.0, return_weights=False) == "sdpa"
    longer = torch.empty(1, 1, side + 1, 8)
    assert choose_backend(q, longer, window, dropout_p=0.0, return_weights=False) == "blocked"


def test_a_generator_without_dropout_leaves_the_choice_to_the_mask(ran):
    # the generator rule is for dropout: a training loop that always passes its generator must not send every
    # evaluation call (dropout 0) to blocked
    q = torch.randn(2, 2, 1024, 8)
    for mask in (None, masks.causal(), masks.padding([1024, 9])):
        ran.clear()
        maskattn.attention(q, q, q, mask, dropout_p=0.0, generator=torch.Generator())
        assert ran == ["sdpa"], mask
