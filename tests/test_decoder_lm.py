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


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rope"])
def test_a_forward_reads_back_the_inputs_it_was_given_once_and_positions_it_built_never(host_reads, positions):
    # positions built from arange or document restarts were read back to be checked, and every range check read its
    # minimum and its maximum apiece: 4 waits for a GPU a plain forward, 6 with lengths (ids, positions, lengths)
    model = DecoderLM(DecoderLMConfig.preset("tiny", vocab_size=11, positions=positions)).eval()
    host_reads.uncounted(model.decoder)  # the attention layers' own reads are not counted here
    x = torch.randint(0, 11, (2, 6))
    for extra, reads_allowed in (({}, 1), ({"lengths": torch.tensor([6, 3])}, 2),
                                 ({"doc_ids": torch.tensor([[0, 0, 1, 1, 1, 2]] * 2)}, 1)):
        with torch.no_grad(), host_reads() as reads:
            model(x, **extra)
        assert reads.count == reads_allowed, (extra, reads.count)
    # positions it builds past max_len are still read, and refused as before
    with pytest.raises(ValueError, match=r"^positions must be in \[0, max_len=64\), got values in \[0, 69\]$"):
        model(torch.randint(0, 11, (1, 70)))


# --- sliding-window models and their KV cache ------------------------------------------------------
def _window_lm(positions="learned", window=8):
    torch.manual_seed(0)
    return DecoderLM(DecoderLMConfig.preset("tiny", max_len=256, sliding_window=window, positions=positions)).eval()


class _FullCache(torch.nn.Module):
    """The same model decoding with the full KV cache (beam search cannot ask for it)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def begin_decoding(self, *args, **kw):
        return self.model.begin_decoding(*args, **kw, full_cache=True)

    def step(self, *args):
        return self.model.step(*args)


def test_sliding_window_forward_is_the_causal_window_mask():
    from maskattn import masks

    model = _window_lm(window=4)
    ids = torch.randint(0, 64, (2, 20))
    seen = []
    hook = model.decoder.layers[0].self_attn.attend.register_forward_hook(lambda m, a, o: seen.append(a[3]))
    model(ids)
    hook.remove()
    assert masks.structure(seen[0]).window == 4 and masks.structure(seen[0]).causal
    # Each layer reaches W - 1 positions further back: token 0 changes no logit from 2 * 3 + 1 = 7 on.
    changed = ids.clone()
    changed[:, 0] = (ids[:, 0] + 1) % 64
    diff = (model(ids) - model(changed)).abs().amax(dim=(0, 2))  # (L,)
    assert diff[7:].max() == 0 and diff[6] > 0


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_window_cache_generation_equals_full_cache_and_full_forward(positions):
    from maskattn import decoding

    model, window, new = _window_lm(positions), 8, 150
    prompt = torch.randint(1, 64, (3, 12))  # longer than the window: the prefill keeps its last W slots
    state, logits = model.begin_decoding(prompt, max_new_tokens=new)
    full_state, full_logits = model.begin_decoding(prompt, max_new_tokens=new, full_cache=True)
    assert torch.allclose(logits, full_logits, atol=1e-6)
    tokens = [logits.argmax(-1)]
    for _ in range(new - 1):
        step = model.step(state, tokens[-1][:, None])[:, -1]
        assert torch.allclose(step, model.step(full_state, tokens[-1][:, None])[:, -1], atol=1e-6)
        for cache in state.caches:
            assert cache.k.shape[2] <= window and cache.v.shape[2] <= window
        tokens.append(step.argmax(-1))
    tokens = torch.stack(tokens, dim=1)
    assert torch.equal(decoding.greedy(model, prompt, max_new_tokens=new), tokens)
    forward = model(torch.cat([prompt, tokens], dim=1))[:, prompt.shape[1] - 1 : -1]  # (B, new, V)
    assert torch.equal(forward.argmax(-1), tokens)
    assert torch.allclose(forward[:, -1], step, atol=1e-5)


def test_window_cache_with_padded_prompts_decodes_each_row_as_alone():
    from maskattn import decoding

    model = _window_lm()
    prompt, lengths = torch.randint(1, 64, (3, 12)), torch.tensor([12, 3, 9])
    batch = decoding.greedy(model, prompt, lengths, max_new_tokens=40)
    for b in range(3):
        alone = decoding.greedy(model, prompt[b : b + 1, : lengths[b]], max_new_tokens=40)
        assert torch.equal(batch[b : b + 1], alone)
    beams = decoding.beam_search(model, prompt, lengths, beam_size=3, max_new_tokens=30)
    full = decoding.beam_search(_FullCache(model), prompt, lengths, beam_size=3, max_new_tokens=30)
    assert torch.equal(beams[0], full[0]) and torch.allclose(beams[1], full[1], atol=1e-5)
    gen = torch.Generator().manual_seed(3)
    drawn = decoding.sample(model, prompt, lengths, max_new_tokens=30, generator=gen)
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(drawn, decoding.sample(_FullCache(model), prompt, lengths, max_new_tokens=30, generator=gen))


def test_window_cache_keeps_the_last_slots_only():
    from maskattn.layers import SlidingWindowKVCache

    cache = SlidingWindowKVCache(1, 1, 2, 3)
    k = torch.arange(14.0).view(1, 1, 7, 2)
    keys, _ = cache.update(k[:, :, :5], k[:, :, :5])
    assert torch.equal(keys, k[:, :, :5]) and torch.equal(cache.k, k[:, :, 2:5]) and cache.first_key(1) == 3
    keys, _ = cache.update(k[:, :, 5:6], k[:, :, 5:6])
    assert torch.equal(keys, k[:, :, 3:6]) and cache.length == 6
    with pytest.raises(ValueError, match="capacity"):
        SlidingWindowKVCache(1, 1, 2, 0)


def test_sliding_window_config_round_trips_and_names_bad_values(tmp_path):
    from maskattn.models import load, save

    model = _window_lm(window=5)
    save(model, tmp_path)
    loaded = load(tmp_path)
    assert loaded.config.sliding_window == 5
    ids = torch.randint(0, 64, (1, 30))
    assert torch.equal(loaded(ids), model(ids))
    with pytest.raises(ValueError, match=r"sliding_window must be None or a positive int, got 0"):
        DecoderLMConfig.preset("tiny", sliding_window=0)
    with pytest.raises(ValueError, match="window_slots"):
        DecoderLM(DecoderLMConfig.preset("tiny")).start(1, max_len=8, window_slots=4)


def test_padded_steps_on_a_window_cache_equal_the_full_cache_or_are_refused():
    # a step is refused exactly when a real key inside its window has left the cache: padding slots took its room
    model = _window_lm()  # W = 8
    prompt, lengths = torch.randint(1, 64, (2, 12)), torch.tensor([12, 9])  # C = W + 3 = 11 slots
    state, _ = model.begin_decoding(prompt, lengths, max_new_tokens=60)
    full, _ = model.begin_decoding(prompt, lengths, max_new_tokens=60, full_cache=True)

    def same(tokens, step_lengths=None):
        ours, theirs = model.step(state, tokens, step_lengths), model.step(full, tokens, step_lengths)
        assert torch.allclose(ours, theirs, atol=1e-5)

    same(torch.randint(1, 64, (2, 3)), torch.tensor([1, 3]))  # row 0: + 2 padding slots
    for _ in range(12):  # past the window: the padding slots roll out of the cache
        same(torch.randint(1, 64, (2, 1)))
    same(torch.randint(1, 64, (2, 4)), torch.tensor([1, 4]))  # row 0: + 3
    same(torch.randint(1, 64, (2, 2)), torch.tensor([1, 2]))  # row 0: + 1, its keys still in view for this step
    with pytest.raises(ValueError, match=r"rows \[0\] need keys that their window cache no longer holds"):
        model.step(state, torch.randint(1, 64, (2, 1)))  # row 0's window now reaches a key that left the cache


def test_padded_prompts_decode_on_a_window_cache_that_never_rolls():
    # capacity min(W + padding, prompt + new) < W + padding: every slot stays, nothing to refuse (it was refused)
    from maskattn import decoding

    model = _window_lm(window=64)
    prompt, lengths = torch.randint(1, 64, (2, 10)), torch.tensor([10, 7])
    batch = decoding.greedy(model, prompt, lengths, max_new_tokens=20)
    for b in range(2):
        assert torch.equal(batch[b : b + 1], decoding.greedy(model, prompt[b : b + 1, : lengths[b]], max_new_tokens=20))


def test_left_padded_prompts_are_refused_naming_right_padding():
    model = DecoderLM(DecoderLMConfig.preset("tiny", pad_id=0)).eval()
    with pytest.raises(ValueError, match=r"padding \(pad_id=0\) must be on the right"):
        model.begin_decoding(torch.tensor([[5, 6, 7, 8, 9], [0, 0, 7, 8, 9]]), max_new_tokens=3)


@pytest.mark.parametrize("static", [False, True])
def test_cached_decoding_under_autocast_follows_the_autocast_forward(static):
    # the caches are float32 while autocast gives bf16 keys: decoding stopped at "q, k, v must share a dtype",
    # and the static cache's one-token writes (index_copy_) at "self and source expected to have the same dtype"
    torch.manual_seed(0)
    model = DecoderLM(DecoderLMConfig.preset("tiny")).eval()
    ids = torch.randint(1, model.config.vocab_size, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        state, _ = model.begin_decoding(ids[:, :6], max_new_tokens=3, static=static)
        steps = torch.cat([model.step(state, ids[:, i : i + 1]) for i in range(6, 9)], dim=1)  # (B, 3, V)
        forward = model(ids)[:, 6:]
    assert steps.dtype == forward.dtype and torch.allclose(steps.float(), forward.float(), atol=0.02)
