"""Incremental decoding against the full forward, and greedy / beam search / sampling against
independent oracles (greedy, exhaustive search, the softmax of a full forward)."""

import itertools
import re

import pytest
import torch

import maskattn
from maskattn import decoding
from maskattn.models import DecoderLM, DecoderLMConfig, Transformer, TransformerConfig

POSITIONS = ["sinusoidal", "rope", "learned"]


def _src_batch(vocab=64):
    src = torch.randint(3, vocab, (3, 8))
    lengths = torch.tensor([8, 5, 2])
    src[torch.arange(8) >= lengths[:, None]] = 0  # right padding with pad_id
    return src, lengths


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_transformer_cached_steps_equal_full_forward(positions, norm_first):
    model = Transformer(TransformerConfig.preset("tiny", positions=positions, norm_first=norm_first,
                                                 num_kv_heads=2)).eval()
    src, lengths = _src_batch()
    tgt = torch.randint(3, 64, (3, 7))
    tgt[:, 0] = model.config.bos_id
    with torch.no_grad():
        state = model.start(src, lengths, max_len=7)
        for t in range(7):
            step = model.step(state, tgt[:, t : t + 1])[:, -1]
            full = model(src, tgt[:, : t + 1], src_lengths=lengths)[:, -1]
            torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("positions", POSITIONS)
def test_decoder_lm_cached_steps_equal_each_row_alone(positions):
    # Right-padded prompts of different lengths decode in one batch; each row must get exactly the
    # logits of a full forward over its own tokens, without any padding.
    model = DecoderLM(DecoderLMConfig.preset("tiny", positions=positions, num_kv_heads=2)).eval()
    prompt = torch.randint(0, 64, (3, 6))
    lengths = torch.tensor([6, 3, 1])
    new = torch.randint(0, 64, (3, 5))
    with torch.no_grad():
        state, logits = model.begin_decoding(prompt, lengths, max_new_tokens=5)
        for t in range(6):
            for b in range(3):
                row = torch.cat([prompt[b, : lengths[b]], new[b, :t]])[None]
                torch.testing.assert_close(logits[b], model(row)[0, -1], atol=1e-5, rtol=0)
            if t < 5:
                logits = model.step(state, new[:, t : t + 1])[:, -1]


def _with_eos_from_greedy(model, inputs, lengths):
    """An EOS id that the greedy output of row 0 produces at step 2, so rows end at different steps."""
    out = decoding.greedy(model, inputs, lengths, max_new_tokens=6, eos_id=None)
    return int(out[0, 2])


@pytest.mark.parametrize("kind", ["transformer", "decoder_lm"])
def test_beam_size_one_equals_greedy(kind):
    src, lengths = _src_batch()
    if kind == "transformer":
        model = Transformer(TransformerConfig.preset("tiny"))
    else:
        model = DecoderLM(DecoderLMConfig.preset("tiny", positions="rope"))
    eos = _with_eos_from_greedy(model, src, lengths)
    greedy = decoding.greedy(model, src, lengths, max_new_tokens=6, eos_id=eos, pad_id=63)
    beam, scores = decoding.beam_search(model, src, lengths, beam_size=1, max_new_tokens=6, eos_id=eos, pad_id=63)
    assert torch.equal(beam, greedy)
    assert (greedy == eos).any()
    assert scores.shape == (3,)


def test_beam_size_one_is_greedy_when_eos_is_the_runner_up():
    # an EOS ranked second of the 2K candidates used to finish a hypothesis, which then won on score (greedy gave
    # [3, 3, 3, 2], beam_size=1 [3, 3, 2]: found by a helper in session twenty-one)
    torch.manual_seed(0)
    model = DecoderLM(DecoderLMConfig(vocab_size=6, d_model=16, num_heads=2, d_ff=32, num_layers=1, max_len=20,
                                      pad_id=0, eos_id=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)
    prompt = torch.tensor([[3, 4, 5]])
    greedy = decoding.greedy(model, prompt, max_new_tokens=6)
    beam, _ = decoding.beam_search(model, prompt, beam_size=1, max_new_tokens=6)
    assert torch.equal(beam, greedy)


@pytest.mark.parametrize("kind", ["transformer", "decoder_lm"])
def test_rows_that_finish_leave_the_batch_and_every_row_gets_what_it_gets_alone(kind, monkeypatch):
    from maskattn.models.common import DecodeState

    torch.manual_seed(0)
    src, lengths = _src_batch()
    if kind == "transformer":
        model = Transformer(TransformerConfig.preset("tiny")).eval()
    else:
        model = DecoderLM(DecoderLMConfig.preset("tiny", positions="rope")).eval()
    eos = _with_eos_from_greedy(model, src, lengths)
    batch_sizes = []
    reorder = DecodeState.reorder
    monkeypatch.setattr(DecodeState, "reorder", lambda self, index, **kw: (
        batch_sizes.append(index.shape[0]), reorder(self, index, **kw))[1])
    tokens, scores = decoding.beam_search(model, src, lengths, beam_size=3, max_new_tokens=12, eos_id=eos,
                                          pad_id=63, length_penalty=0.6)
    assert min(batch_sizes) < max(batch_sizes)  # some row left early, and the rest went on without it
    monkeypatch.setattr(DecodeState, "reorder", reorder)
    for b in range(3):
        alone, score = decoding.beam_search(model, src[b : b + 1, : lengths[b]], beam_size=3, max_new_tokens=12,
                                            eos_id=eos, pad_id=63, length_penalty=0.6)
        n = alone.shape[1]
        assert torch.equal(tokens[b, :n], alone[0]) and (tokens[b, n:] == 63).all()
        torch.testing.assert_close(scores[b], score[0], atol=1e-5, rtol=0)


def _sequence_scores(model, src, lengths, candidates, alpha):
    """Length-normalised log-probability of every candidate continuation, by full forward: (B, N)."""
    scores = torch.empty(src.shape[0], len(candidates), dtype=next(model.parameters()).dtype)
    for n in sorted({len(seq) for seq in candidates}):  # one batch per candidate length
        which = [i for i, seq in enumerate(candidates) if len(seq) == n]
        seqs = torch.tensor([candidates[i] for i in which])  # (N, n)
        for b in range(src.shape[0]):
            tgt = torch.cat([torch.full((len(which), 1), model.config.bos_id), seqs], dim=1)
            with torch.no_grad():
                logits = model(src[b : b + 1, : lengths[b]].expand(len(which), -1), tgt[:, :-1],
                               tgt_lengths=[n] * len(which))
            total = torch.log_softmax(logits, dim=-1).gather(2, seqs[..., None]).squeeze(-1).sum(dim=1)
            scores[b, which] = total / ((5 + n) / 6) ** alpha
    return scores


def _exhaustive(alpha):
    """A tiny model, two sources, every candidate output up to 4 tokens and its (2, N) exact score."""
    vocab, eos, steps = 5, 2, 4
    model = Transformer(TransformerConfig.preset("tiny", vocab_size=vocab)).eval()
    with torch.no_grad():  # flatten the output distribution so that greedy is not already optimal
        model.src_embed.tokens.weight.mul_(0.3)
    src = torch.tensor([[3, 4, 3, 3, 4], [4, 3, 0, 0, 0]])
    lengths = torch.tensor([5, 2])
    never = (eos, model.config.pad_id, model.config.bos_id)  # pad and BOS are never output
    others = [t for t in range(vocab) if t not in never]
    candidates = [(*p, eos) for n in range(steps) for p in itertools.product(others, repeat=n)]
    candidates += list(itertools.product(others, repeat=steps))  # out of length without EOS
    return model, src, lengths, candidates, _sequence_scores(model, src, lengths, candidates, alpha), eos, steps


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_finds_the_best_sequence_found_by_exhaustive_search(alpha):
    model, src, lengths, candidates, scores, eos, steps = _exhaustive(alpha)
    best_score, best = scores.max(dim=1)

    # A beam wide enough never to prune is exhaustive, so it must find the same optimum.
    tokens, beam_scores = decoding.beam_search(model, src, lengths, beam_size=256, max_new_tokens=steps,
                                               length_penalty=alpha, eos_id=eos, pad_id=0)
    for b in range(2):
        assert _until_eos(tokens[b].tolist(), eos) == candidates[best[b]]
    torch.testing.assert_close(beam_scores, best_score, atol=1e-5, rtol=0)
    # Greedy misses the optimum for some row; otherwise this test would not show anything.
    greedy = decoding.greedy(model, src, lengths, max_new_tokens=steps, eos_id=eos)
    greedy_rows = [_until_eos(row, eos) for row in greedy.tolist()]
    assert any(greedy_rows[b] != candidates[best[b]] for b in range(2))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_nbest_are_the_n_best_sequences_of_exhaustive_search(alpha):
    model, src, lengths, candidates, scores, eos, steps = _exhaustive(alpha)
    top_scores, top = scores.topk(5, dim=1)
    found = decoding.beam_search_nbest(model, src, lengths, n=5, beam_size=256, max_new_tokens=steps,
                                       length_penalty=alpha, eos_id=eos, pad_id=0)
    for b in range(2):
        assert [tuple(seq) for _, seq in found[b]] == [candidates[i] for i in top[b]]
        torch.testing.assert_close(torch.tensor([score for score, _ in found[b]]), top_scores[b], atol=1e-5, rtol=0)
    # the first of the n best is beam_search's answer, with a narrow beam too
    tokens, best = decoding.beam_search(model, src, lengths, beam_size=3, max_new_tokens=steps, eos_id=eos, pad_id=0)
    narrow = decoding.beam_search_nbest(model, src, lengths, n=3, beam_size=3, max_new_tokens=steps, eos_id=eos,
                                        pad_id=0)
    for b in range(2):
        assert tuple(narrow[b][0][1]) == _until_eos(tokens[b].tolist(), eos) and narrow[b][0][0] == float(best[b])
        assert [s for s, _ in narrow[b]] == sorted((s for s, _ in narrow[b]), reverse=True)
    with pytest.raises(ValueError, match=r"n must be an int in \[1, beam_size=3\], got 4"):
        decoding.beam_search_nbest(model, src, lengths, n=4, beam_size=3, max_new_tokens=steps)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_min_new_tokens_finds_the_best_sequence_of_at_least_that_length(alpha):
    # The oracle: exhaustive search over the candidates with >= min_new tokens before EOS, scored by the
    # model's own (not renormalised) log-probabilities.
    model, src, lengths, candidates, scores, eos, steps = _exhaustive(alpha)
    min_new = 3
    long_enough = torch.tensor([len(seq) - (seq[-1] == eos) >= min_new for seq in candidates])
    best_score, best = scores.masked_fill(~long_enough, float("-inf")).max(dim=1)
    assert any(not long_enough[i] for i in scores.argmax(dim=1)), "the constraint must change some row's answer"
    tokens, beam_scores = decoding.beam_search(model, src, lengths, beam_size=256, max_new_tokens=steps,
                                               length_penalty=alpha, eos_id=eos, pad_id=0, min_new_tokens=min_new)
    for b in range(2):
        assert _until_eos(tokens[b].tolist(), eos) == candidates[best[b]]
    torch.testing.assert_close(beam_scores, best_score, atol=1e-5, rtol=0)
    # greedy: with EOS = the token greedy picks first, it would stop at once; with min_new_tokens it cannot
    first = int(decoding.greedy(model, src, lengths, max_new_tokens=1)[0, 0])
    greedy = decoding.greedy(model, src, lengths, max_new_tokens=steps, eos_id=first, min_new_tokens=min_new)
    assert (greedy[:, :min_new] != first).all()
    with pytest.raises(ValueError, match="min_new_tokens must be an int >= 0, got -1"):
        decoding.beam_search(model, src, lengths, max_new_tokens=steps, min_new_tokens=-1)


def _until_eos(row, eos):
    return tuple(row[: row.index(eos) + 1]) if eos in row else tuple(row)


def test_sampling_with_top_k_one_is_greedy():
    model = DecoderLM(DecoderLMConfig.preset("tiny"))
    prompt, lengths = _src_batch()
    greedy = decoding.greedy(model, prompt, lengths, max_new_tokens=5)
    sampled = decoding.sample(model, prompt, lengths, max_new_tokens=5, top_k=1, temperature=0.7)
    assert torch.equal(sampled, greedy)


def test_a_tiny_temperature_draws_the_greedy_tokens_and_an_infinite_one_is_refused():
    # 1e-45: logits / temperature overflowed to inf and torch.multinomial failed on the NaN softmax; inf made the
    # banned pad logit -inf / inf = NaN (session twenty-one)
    model = DecoderLM(DecoderLMConfig.preset("tiny", pad_id=0)).eval()
    prompt = torch.tensor([[5, 6, 7], [9, 3, 2]])
    greedy = decoding.greedy(model, prompt, max_new_tokens=4)
    assert torch.equal(decoding.sample(model, prompt, max_new_tokens=4, temperature=1e-45), greedy)
    for bad in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match=r"temperature must be a number > 0 and finite, got"):
            decoding.sample(model, prompt, max_new_tokens=4, temperature=bad)


def test_a_generator_that_is_not_one_is_refused_by_name_and_a_seeded_one_repeats():
    # generator=3 or a seed given as generator="1": AttributeError "'int' object has no attribute 'device'", after
    # the prompt had run
    model = DecoderLM(DecoderLMConfig.preset("tiny", pad_id=0)).eval()
    prompt = torch.tensor([[5, 6, 7], [9, 3, 2]])
    for bad in (3, "1", torch.tensor(3)):
        with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got "):
            decoding.sample(model, prompt, max_new_tokens=4, generator=bad)
    draws = [decoding.sample(model, prompt, max_new_tokens=6, generator=torch.Generator().manual_seed(7))
             for _ in range(2)]
    assert torch.equal(*draws)


def test_a_vocabulary_of_forbidden_ids_only_is_refused_by_name():
    # vocabulary (pad, EOS) with min_new_tokens=1: greedy generated the pad id it must never generate, sample failed
    # in torch.multinomial ("probability tensor contains either inf, nan"), beam search in max() of an empty list
    model = DecoderLM(DecoderLMConfig.preset("tiny", vocab_size=2, pad_id=0, eos_id=1)).eval()
    prompt = torch.tensor([[1, 1]])
    expected = re.escape("no token may be chosen before min_new_tokens (1) tokens: the model's vocabulary (2) holds "
                         "only ids decoding never generates ([0]) and eos_id 1")
    for decode in (decoding.greedy, decoding.sample, decoding.beam_search):
        with pytest.raises(ValueError, match=expected):
            decode(model, prompt, max_new_tokens=3, min_new_tokens=1)
    assert decoding.greedy(model, prompt, max_new_tokens=3).tolist() == [[1]]  # EOS, the one token left
    only_pad = DecoderLM(DecoderLMConfig.preset("tiny", vocab_size=1, pad_id=0)).eval()
    with pytest.raises(ValueError, match=re.escape("no token may be chosen at any step: the model's vocabulary (1) "
                                                   "holds only ids decoding never generates ([0])")):
        decoding.greedy(only_pad, torch.tensor([[0]]), [1], max_new_tokens=2, pad_id=0)


def test_sampled_first_tokens_follow_the_filtered_softmax():
    model = DecoderLM(DecoderLMConfig.preset("tiny", vocab_size=8)).eval()
    prompt = torch.tensor([[3, 5, 1]])
    with torch.no_grad():
        logits = model(prompt)[0, -1] / 2.0
    keep = logits.topk(4).indices
    expected = torch.zeros(8)
    expected[keep] = torch.softmax(logits[keep], dim=0)
    n = 4000
    draws = decoding.sample(model, prompt.expand(n, -1), max_new_tokens=1, temperature=2.0, top_k=4,
                            generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws[:, 0], minlength=8).float() / n
    assert (freq[expected == 0] == 0).all()
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)


@pytest.mark.parametrize("logits", [torch.tensor(1.0), torch.tensor([[3, 1, 2]]), torch.zeros(2, 0), [[1.0, 2.0]]],
                         ids=["0-d", "int64", "empty vocabulary", "list"])
def test_filter_logits_names_logits_it_cannot_filter(logits):
    # integer logits came back from inside torch's softmax, 0-d ones as an IndexError, an empty vocabulary unchanged
    with pytest.raises(ValueError, match=r"filter_logits: logits must be a floating-point tensor \(\.\.\., V\)"):
        decoding.filter_logits(logits, top_k=2, top_p=0.5)


def test_filter_logits_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    kept = decoding.filter_logits(logits, top_p=0.8).isfinite()
    assert kept.tolist() == [[True, False, True, False]]  # 0.5 + 0.3 reaches 0.8
    kept = decoding.filter_logits(logits, top_p=0.81).isfinite()
    assert kept.tolist() == [[True, False, True, True]]
    kept = decoding.filter_logits(logits, top_p=0.1, top_k=3).isfinite()
    assert kept.tolist() == [[True, False, False, False]]  # the most likely token always stays


def test_generation_stops_rows_at_eos_and_pads_them():
    model = DecoderLM(DecoderLMConfig.preset("tiny"))
    prompt, lengths = _src_batch()
    eos = _with_eos_from_greedy(model, prompt, lengths)
    out = decoding.greedy(model, prompt, lengths, max_new_tokens=6, eos_id=eos, pad_id=63)
    row = out[0].tolist()
    first = row.index(eos)
    assert first <= 2 and row[first + 1 :] == [63] * (len(row) - first - 1)


def test_decoding_errors_name_the_argument():
    model = DecoderLM(DecoderLMConfig.preset("tiny"))
    prompt = torch.randint(0, 64, (2, 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoding.greedy(model, prompt, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        decoding.sample(model, prompt, max_new_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match="beam_size"):
        decoding.beam_search(model, prompt, max_new_tokens=2, beam_size=0)
    with pytest.raises(ValueError, match="top_p"):
        decoding.sample(model, prompt, max_new_tokens=2, top_p=1.5)
    # Refused before any work, for every way of decoding, whether or not EOS would have come first.
    for decode in (decoding.greedy, decoding.sample, decoding.beam_search):
        with pytest.raises(ValueError, match=re.escape("max_new_tokens=62 after a prompt of 4 tokens needs 65 "
                                                       "positions, more than the model's max_len (64): at most 61")):
            decode(model, prompt, max_new_tokens=62)
    assert decoding.greedy(model, prompt, max_new_tokens=61).shape == (2, 61)  # exactly the positions left
    # min_new_tokens above a single max_new_tokens ran every row to its limit, EOS forbidden throughout, without a word
    for decode in (decoding.greedy, decoding.sample, decoding.beam_search):
        with pytest.raises(ValueError, match=re.escape("min_new_tokens (5) must be <= max_new_tokens (3)")):
            decode(model, prompt, max_new_tokens=3, min_new_tokens=5)
    assert decoding.greedy(model, prompt, max_new_tokens=3, min_new_tokens=3).shape == (2, 3)
    assert decoding.greedy(model, prompt, max_new_tokens=[3, 6], min_new_tokens=5).shape == (2, 6)  # per row: a cap
    # a prompt longer than the positions was blamed on max_new_tokens=1, "at most 0 new tokens"
    with pytest.raises(ValueError, match=re.escape("prompt: a row has 65 tokens, more than the model's max_len (64); "
                                                   "no new token fits")):
        decoding.greedy(model, torch.randint(0, 64, (2, 65)), max_new_tokens=1)
    assert decoding.greedy(model, torch.randint(0, 64, (2, 64)), max_new_tokens=1).shape == (2, 1)
    seq2seq = Transformer(TransformerConfig.preset("tiny", vocab_size=64, max_len=16))
    with pytest.raises(ValueError, match=re.escape("max_new_tokens=17 needs 17 target positions, more than the "
                                                   "model's max_len (16)")):
        decoding.greedy(seq2seq, prompt, max_new_tokens=17, eos_id=None)
    assert decoding.greedy(seq2seq, prompt, max_new_tokens=16, eos_id=None).shape[1] <= 16
    # NO_EOS runs every row to its limit whatever the config's EOS; min_new_tokens then has no EOS to hold back
    eos_model = DecoderLM(DecoderLMConfig.preset("tiny", eos_id=5)).eval()
    favourite = int(eos_model(prompt)[:, -1].argmax(-1)[0])
    eos_model.config.eos_id = favourite  # row 0 would stop at once
    stopped = decoding.greedy(eos_model, prompt, max_new_tokens=3)
    assert stopped[0, 0] == favourite and (stopped[0, 1:] == 0).all()  # EOS, then the fill
    free = decoding.greedy(eos_model, prompt, max_new_tokens=3, eos_id=decoding.NO_EOS, min_new_tokens=2)
    eos_model.config.eos_id = None  # the oracle: a model without an EOS
    assert torch.equal(free, decoding.greedy(eos_model, prompt, max_new_tokens=3))
    cases = (({"eos_id": -8}, "eos_id must be a token id in [0, 64) (the model's vocabulary), got -8"),
             ({"eos_id": 64}, "eos_id must be a token id in [0, 64)"),
             ({"pad_id": -1}, "pad_id must be a token id in [0, 64) (the model's vocabulary), got -1"),
             ({"max_new_tokens": [2]}, "max_new_tokens must be a positive int, or 2 of them (one per row of "
                                       "inputs), got [2]"),
             ({"max_new_tokens": torch.tensor([2, 0])}, "or 2 of them"))
    for settings, expected in cases:
        for decode in (decoding.greedy, decoding.beam_search):
            with pytest.raises(ValueError, match=re.escape(expected)):
                decode(model, prompt, **({"max_new_tokens": 2} | settings))
    padded = DecoderLM(DecoderLMConfig.preset("tiny", pad_id=0))
    with pytest.raises(ValueError, match=re.escape("prompt: row 1 has no tokens (all pad_id=0); every prompt needs")):
        decoding.greedy(padded, torch.tensor([[5, 6, 7], [0, 0, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=re.escape("inputs must be a batch of B >= 1 rows, (B, L) token ids or "
                                                   "(B, ...) images, got (0, 4)")):
        decoding.greedy(model, prompt[:0], max_new_tokens=2)
    with pytest.raises(ValueError, match=re.escape("prompt: (2, 0), no tokens; every prompt needs at least one")):
        decoding.greedy(model, prompt[:, :0], max_new_tokens=2)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_a_row_with_its_own_limit_decodes_as_it_would_alone(search):
    # Per-row limits: a batch of rows with different limits gives each row what it gives alone.
    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("tiny", vocab_size=12, eos_id=2)).eval()
    src = torch.randint(3, 12, (3, 5))
    caps = [2, 7, 4]

    def run(rows, limit):
        if search == "greedy":
            return decoding.greedy(model, src[rows], max_new_tokens=limit, eos_id=decoding.NO_EOS).tolist()
        found, _ = decoding.beam_search(model, src[rows], max_new_tokens=limit, beam_size=3, eos_id=decoding.NO_EOS)
        return found.tolist()

    together = run(slice(None), torch.tensor(caps))
    for row, cap in enumerate(caps):
        alone = run(slice(row, row + 1), cap)[0]
        assert len(alone) == cap
        assert together[row][:cap] == alone
        assert together[row][cap:] == [model.config.pad_id] * (max(caps) - cap)


def test_a_transformer_never_generates_its_bos():
    # A translation model that emitted BOS printed an empty line (decoding drops special tokens).
    model = Transformer(TransformerConfig.preset("tiny", vocab_size=12, eos_id=2, norm_first=True)).eval()
    with torch.no_grad():  # every target state is e and BOS's output row 10 e: BOS is the favourite everywhere
        e = torch.randn(model.config.d_model)
        model.decoder.norm.weight.zero_()
        model.decoder.norm.bias.copy_(e)
        model.out_proj.weight[model.config.bos_id] = 10 * e
    src = torch.randint(3, 12, (2, 4))
    assert (model(src, torch.full((2, 1), model.config.bos_id))[:, -1].argmax(-1) == model.config.bos_id).all()
    for out in (decoding.greedy(model, src, max_new_tokens=4), decoding.beam_search(model, src, max_new_tokens=4)[0]):
        assert not (out == model.config.bos_id).any()


def test_the_models_pad_id_is_never_generated():
    # A DecoderLM reads its pad id as padding; a generated pad would be a token its own forward cannot see.
    def model(**pad):
        m = DecoderLM(DecoderLMConfig.preset("tiny", norm_first=True, **pad)).eval()
        with torch.no_grad():  # every position's last state is e, and token 0's output row is 10 e: its favourite
            e = torch.randn(m.config.d_model)
            m.decoder.norm.weight.zero_()
            m.decoder.norm.bias.copy_(e)
            m.lm_head.weight[0] = 10 * e
        return m

    prompt = torch.randint(1, 64, (2, 3))
    assert (decoding.greedy(model(), prompt, max_new_tokens=3) == 0).all()  # without a pad id, 0 is chosen
    banned = model(pad_id=0)
    for out in (decoding.greedy(banned, prompt, max_new_tokens=6),
                decoding.sample(banned, prompt, max_new_tokens=6, generator=torch.Generator().manual_seed(0)),
                decoding.beam_search(banned, prompt, max_new_tokens=6, beam_size=3)[0]):
        assert out.shape[1] == 6 and not (out == 0).any()


def test_decoder_lm_beam_scores_are_the_full_forward_scores_of_its_outputs():
    # Beam reordering with prompts of different lengths (padding in the middle of the cache).
    model = DecoderLM(DecoderLMConfig.preset("tiny", eos_id=5)).eval()
    prompt = torch.randint(6, 64, (3, 5))
    lengths = torch.tensor([5, 2, 3])
    alpha = 0.6
    tokens, scores = decoding.beam_search(model, prompt, lengths, beam_size=3, max_new_tokens=6,
                                          length_penalty=alpha, pad_id=0)
    for b in range(3):
        new = list(_until_eos(tokens[b].tolist(), 5))
        row = torch.tensor([prompt[b, : lengths[b]].tolist() + new])
        with torch.no_grad():
            logp = torch.log_softmax(model(row)[0, lengths[b] - 1 : -1], dim=-1)
        total = logp.gather(1, torch.tensor(new)[:, None]).sum()
        assert scores[b].item() == pytest.approx(total.item() / ((5 + len(new)) / 6) ** alpha, abs=1e-5)


def _greedy_oracle(model, prompt, lengths, new):
    """Greedy tokens of each row alone by full forwards without a cache: (B, new)."""
    rows = []
    with torch.no_grad():
        for b in range(prompt.shape[0]):
            seq = prompt[b, : lengths[b]].tolist()
            for _ in range(new):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            rows.append(seq[int(lengths[b]) :])
    return torch.tensor(rows)


LM_CASES = {  # batch 1; rows of one length (no padding); rows of different lengths (padding in the cache)
    "one-row": (torch.tensor([[7, 3, 9, 4, 11]]), torch.tensor([5])),
    "equal-rows": (torch.tensor([[7, 3, 9, 4, 11], [2, 8, 8, 5, 1]]), torch.tensor([5, 5])),
    "padded-rows": (torch.tensor([[7, 3, 9, 4, 11, 6], [2, 8, 0, 0, 0, 0], [5, 1, 4, 9, 0, 0]]),
                    torch.tensor([6, 2, 4])),
}


@pytest.mark.parametrize("case", sorted(LM_CASES))
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_greedy_equals_full_forward_argmax_eager_and_static(case, positions):
    model = DecoderLM(DecoderLMConfig.preset("tiny", positions=positions, num_kv_heads=2)).eval()
    prompt, lengths = LM_CASES[case]
    expected = _greedy_oracle(model, prompt, lengths, 8)
    assert torch.equal(decoding.greedy(model, prompt, lengths, max_new_tokens=8), expected)
    # The static state (fixed shapes, what compile=True traces) run eagerly: same logits step by step.
    with torch.no_grad():
        state, logits = model.begin_decoding(prompt, lengths, max_new_tokens=8, static=True)
        tokens = [logits.argmax(-1)]
        for _ in range(7):
            logits = model.step(state, tokens[-1][:, None])[:, -1]
            assert state.caches[0].k.shape[2] == prompt.shape[1] + 8  # every slot, every step
            tokens.append(logits.argmax(-1))
    assert torch.equal(torch.stack(tokens, dim=1), expected)


def test_static_window_model_decodes_as_the_full_forward():
    # A sliding-window model on a static (full) cache: the window is masked over positions, not slots.
    torch.manual_seed(0)
    model = DecoderLM(DecoderLMConfig.preset("tiny", max_len=64, sliding_window=4)).eval()
    prompt, lengths = torch.randint(1, 64, (3, 9)), torch.tensor([9, 3, 6])
    expected = _greedy_oracle(model, prompt, lengths, 12)
    with torch.no_grad():
        state, logits = model.begin_decoding(prompt, lengths, max_new_tokens=12, static=True)
        tokens = [logits.argmax(-1)]
        for _ in range(11):
            tokens.append(model.step(state, tokens[-1][:, None])[:, -1].argmax(-1))
    assert torch.equal(torch.stack(tokens, dim=1), expected)
    assert torch.equal(decoding.greedy(model, prompt, lengths, max_new_tokens=12), expected)


@pytest.mark.parametrize("batch", [1, 2, 9])  # the three layouts of the output projection (step_logits)
def test_prefill_projects_only_each_rows_last_position(batch, monkeypatch):
    # The (B, P, V) logits of a whole prompt are never built: the LM head sees one (B, E) row per step.
    from maskattn.models import decoder_lm

    model = DecoderLM(DecoderLMConfig.preset("tiny")).eval()
    seen = []

    def recorded(state, head, h):
        seen.append(tuple(h.shape))
        return step_logits(state, head, h)

    step_logits = decoder_lm.step_logits
    monkeypatch.setattr(decoder_lm, "step_logits", recorded)
    prompt = torch.randint(1, 64, (batch, 10))
    lengths = torch.tensor([10, 4] * (batch // 2) + [7] * (batch % 2))
    out = decoding.greedy(model, prompt, lengths, max_new_tokens=16)  # enough steps for the one-row copy
    assert seen[0] == (batch, model.config.d_model) and all(shape == (batch, 1, 32) for shape in seen[1:])
    assert torch.equal(out, _greedy_oracle(model, prompt, lengths, 16))


def test_static_decoding_refuses_what_it_cannot_do():
    model = DecoderLM(DecoderLMConfig.preset("tiny")).eval()
    with torch.no_grad():
        state, _ = model.begin_decoding(torch.randint(1, 64, (1, 3)), max_new_tokens=1, static=True)
        with pytest.raises(ValueError, match="past capacity"):
            model.step(state, torch.ones(1, 1, dtype=torch.long))
            model.step(state, torch.ones(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="window_slots"):
        DecoderLM(DecoderLMConfig.preset("tiny", sliding_window=4)).start(1, max_len=8, window_slots=4, static=True)
    transformer = Transformer(TransformerConfig.preset("tiny")).eval()
    with pytest.raises(ValueError, match="compile=True needs"):
        decoding.greedy(transformer, torch.randint(1, 64, (1, 3)), max_new_tokens=2, compile=True)


def test_reorder_with_the_same_memory_must_keep_the_batch_size():
    model = Transformer(TransformerConfig.preset("tiny")).eval()
    with torch.no_grad():
        state, _ = model.begin_decoding(torch.randint(3, 64, (2, 4)), torch.tensor([4, 2]), max_new_tokens=3)
    memory = state.memory_kv
    state.reorder(torch.tensor([1, 1]), same_memory=True)
    assert state.memory_kv is memory  # kept as it was, not gathered
    with pytest.raises(ValueError, match="same_memory keeps the batch size 2, got an index of 3 rows"):
        state.reorder(torch.tensor([0, 0, 1]), same_memory=True)


def test_one_row_steps_project_through_the_transposed_head_with_the_same_logits():
    # Batch-1 steps multiply by a contiguous (E, V) copy of the LM head (a speed choice on CPU); the logits
    # must equal the full masked forward's at every position, as every other decoding path does.
    model = DecoderLM(DecoderLMConfig.preset("tiny")).eval()
    ids = torch.randint(1, 64, (1, 12))
    with torch.no_grad():
        full = model(ids)  # (1, 12, V)
        state, first = model.begin_decoding(ids[:, :5], max_new_tokens=20)
        assert state.head_t is None  # the prompt's projection does not make it (beam search widens the batch)
        steps = [first] + [model.step(state, ids[:, t : t + 1])[:, -1] for t in range(5, 11)]
        assert state.head_t is not None and state.head_t.shape == (model.config.d_model, model.config.vocab_size)
        torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 4:11], atol=1e-5, rtol=1e-5)
        short, _ = model.begin_decoding(ids[:, :5], max_new_tokens=3)
        model.step(short, ids[:, 5:6])
        assert short.head_t is None  # too few steps for the copy to pay
        static, _ = model.begin_decoding(ids[:, :5], max_new_tokens=20, static=True)
        assert static.head_t is not None  # made eagerly: a compiled step cannot
    # Under autograd the head is used as is (no detached copy), so its weight gets its gradient.
    from types import SimpleNamespace

    from maskattn.models.common import step_logits

    state = SimpleNamespace(head_t=None, head_copy_ok=True)
    step_logits(state, model.lm_head, torch.randn(1, 1, 32)).sum().backward()
    assert state.head_t is None and model.lm_head.weight.grad is not None


def test_top_p_of_one_keeps_every_token():
    # the float cumulative sum reaches 1.0 before the tail: top_p=1.0 dropped the least likely tokens
    logits = torch.randn(64, 32000, generator=torch.Generator().manual_seed(0)) * 5
    assert decoding.filter_logits(logits, top_p=1.0).isfinite().all()


def test_arguments_of_the_wrong_type_are_named():
    model = DecoderLM(DecoderLMConfig.preset("tiny", pad_id=0)).eval()
    prompt = torch.tensor([[5, 6, 7]])
    temperature = "temperature must be a number"
    cases = ((lambda: decoding.sample(model, prompt, max_new_tokens=2, temperature="1"), temperature),
             (lambda: decoding.sample(model, prompt, max_new_tokens=2, top_p="0.9"), "top_p must be a number"),
             (lambda: decoding.sample(model, prompt, max_new_tokens=2, temperature=True), temperature),
             (lambda: decoding.beam_search(model, prompt, beam_size=2, max_new_tokens=2, length_penalty=float("nan")),
              "length_penalty must be a finite number"),
             (lambda: decoding.beam_search(model, prompt, beam_size=2, max_new_tokens=2, length_penalty="0.6"),
              "length_penalty must be a finite number"),
             (lambda: maskattn.attention(*(torch.randn(1, 1, 3, 4),) * 3, dropout_p="0.1"),
              "dropout_p must be a number in \\[0, 1\\), got '0.1'"))
    for call, words in cases:
        with pytest.raises(ValueError, match=words):
            call()


def test_beam_scores_of_a_float64_model_are_its_float64_log_probabilities():
    """A float64 model's beam scores were summed from float32 log-probabilities (``logits.float()``): 1e-7 off and
    returned as float32. Oracle: the full forward's float64 log-probability of each exhaustive candidate."""
    model, src, lengths, candidates, _, eos, steps = _exhaustive(0.0)
    model = model.double()
    best_score, best = _sequence_scores(model, src, lengths, candidates, 0.0).max(dim=1)
    tokens, beam_scores = decoding.beam_search(model, src, lengths, beam_size=256, max_new_tokens=steps,
                                               length_penalty=0.0, eos_id=eos, pad_id=0)
    assert [_until_eos(row, eos) for row in tokens.tolist()] == [candidates[i] for i in best]
    assert beam_scores.dtype == torch.float64
    torch.testing.assert_close(beam_scores, best_score, atol=1e-12, rtol=0)



@pytest.mark.parametrize(("search", "eos", "min_new", "per_token"), [
    ("greedy", None, 0, 0), ("greedy", 3, "all", 0), ("greedy", 3, 0, 1), ("sample", None, 0, 0), ("sample", 3, 0, 1)])
def test_generation_reads_the_device_for_eos_only_where_eos_may_end_a_row(host_reads, search, eos, min_new, per_token):
    # every step read done.all() back (a wait for a GPU per token) even where no row could have ended at EOS: no
    # eos_id, or fewer than min_new_tokens tokens out ("all": as many as max_new_tokens; the last step is known on the
    # host). The model's step (its input checks and cache) is not counted here.
    model = DecoderLM(DecoderLMConfig.preset("tiny", vocab_size=11, eos_id=None)).eval()
    step = model.step

    def paused_step(*args, **kwargs):
        with host_reads.paused():
            return step(*args, **kwargs)

    model.step = paused_step
    prompts, counts = torch.randint(0, 11, (2, 5)), []
    options = {"generator": torch.Generator().manual_seed(0)} if search == "sample" else {}
    for max_new in (12, 16):
        with host_reads() as reads:
            out = getattr(decoding, search)(model, prompts, max_new_tokens=max_new, eos_id=eos,
                                            min_new_tokens=max_new if min_new == "all" else min_new, **options)
        counts.append(reads.count)
        assert out.shape[1] == max_new or eos is not None
    assert counts[1] - counts[0] <= 4 * per_token, counts


@pytest.mark.parametrize("search", ["greedy", "sample", "beam_search"])
@pytest.mark.parametrize("case", ["lengths", "list", "pad_id", "window-lengths", "window-pad_id"])
def test_the_start_of_a_generation_reads_a_padded_prompts_lengths_once(host_reads, search, case):
    # begin_decoding read the lengths back five or six times (key_valid's bounds, any row empty, the right padding,
    # the longest, all full, the shortest for a window cache, key_valid's bounds again for the cache): one wait for a
    # GPU each. Oracle: a row alone, unpadded; the padded batch reads once more for a lengths tensor, no more for a
    # list (already on the host) nor for padding found from pad_id (read once, padded or not).
    # The tokens are those of each row generated alone, unpadded.
    window = 3 if case.startswith("window") else None
    pad_id = 0 if case.endswith("pad_id") else None
    torch.manual_seed(0)
    model = DecoderLM(DecoderLMConfig.preset("tiny", vocab_size=11, eos_id=None, pad_id=pad_id,
                                             sliding_window=window)).eval()
    host_reads.uncounted(model.decoder)  # the attention layers' own reads are not counted here
    prompts, rows = torch.randint(1, 11, (3, 6)), [6, 2, 4]
    for row, n in enumerate(rows):
        prompts[row, n:] = 0
    options = {"beam_size": 2} if search == "beam_search" else {}
    if search == "sample":
        options["generator"] = torch.Generator().manual_seed(0)

    begin, at_start = model.begin_decoding, []

    def run(inputs, lengths):
        if search == "sample":
            options["generator"].manual_seed(0)
        with torch.no_grad(), host_reads() as reads:
            def counted(*args, **kwargs):
                out = begin(*args, **kwargs)
                at_start.append(reads.count)  # the reads before the first new token
                return out

            model.begin_decoding = counted
            out = getattr(decoding, search)(model, inputs, lengths, max_new_tokens=4, **options)
        return out[0] if search == "beam_search" else out, at_start[-1]

    full = [run(prompts[row : row + 1, :n], None) for row, n in enumerate(rows)]
    given = {"lengths": torch.tensor(rows), "list": rows}.get(case.removeprefix("window-"))
    extra = 1 if case.endswith("lengths") else 0
    for row in range(len(rows)):
        got, count = run(prompts[row : row + 1], None if given is None else given[row : row + 1])
        assert count - full[row][1] == extra, (row, count, full[row][1])
        if search != "sample":  # a batch of rows draws its samples otherwise than one row
            assert torch.equal(got, full[row][0]), (row, got, full[row][0])
    if search != "beam_search":
        got, count = run(prompts, given)
        if search == "greedy":
            assert torch.equal(got, torch.cat([out for out, _ in full])), got
        assert count - full[1][1] == extra, (count, full[1][1])


@pytest.mark.parametrize("case", ["lm", "lm-static", "lm-window", "lm-padded", "transformer"])
def test_a_decoded_token_reads_the_device_once_for_its_ids_check(host_reads, monkeypatch, case):
    # every step read each layer's KV cache position (int(pos)) and once more for the state, re-read positions it
    # built itself, and read the min and max of its ids apiece: 7 waits for a GPU per token for a 2-layer DecoderLM.
    # Oracle: the ids check is the one read left (a static cache's position, eager, one more). On CPU only, the
    # attention sums k and v to skip a NaN guard and sdpa asks whether a mask row is empty (no device to wait for;
    # tests/test_backends.py checks that sdpa reads nothing elsewhere): not counted here.
    from dataclasses import replace

    from maskattn.backends import REGISTRY, guards

    def uncounted(call):
        def paused(*args, **kwargs):
            with host_reads.paused():
                return call(*args, **kwargs)
        return paused

    monkeypatch.setattr(guards, "hide_nonfinite", uncounted(guards.hide_nonfinite))
    monkeypatch.setitem(REGISTRY, "sdpa", replace(REGISTRY["sdpa"], fn=uncounted(REGISTRY["sdpa"].fn)))
    if case == "transformer":
        model = Transformer(TransformerConfig.preset("tiny", vocab_size=11, eos_id=None)).eval()
    else:
        window = 3 if case == "lm-window" else None
        model = DecoderLM(DecoderLMConfig.preset("tiny", vocab_size=11, eos_id=None, sliding_window=window)).eval()
    prompts = torch.randint(1, 11, (2, 5))
    lengths = torch.tensor([5, 2]) if case == "lm-padded" else None
    counts, per_token = [], 2 if case == "lm-static" else 1
    for max_new in (4, 12):
        with torch.no_grad(), host_reads() as reads:
            state, logits = model.begin_decoding(prompts, lengths, max_new_tokens=max_new, static=case == "lm-static") \
                if case != "transformer" else model.begin_decoding(prompts, max_new_tokens=max_new)
            tokens = []
            for _ in range(max_new - 1):
                tokens.append(logits.argmax(-1))
                logits = model.step(state, tokens[-1][:, None])[:, -1]
        counts.append(reads.count)
        if max_new == 12 and case != "transformer":  # the tokens of greedy (its own reads are counted elsewhere)
            assert torch.equal(torch.stack([*tokens, logits.argmax(-1)], dim=1),
                               decoding.greedy(model, prompts, lengths, max_new_tokens=12))
    assert counts[1] - counts[0] == 8 * per_token, counts


def test_sampling_settings_accept_temperature_zero_and_refuse_top_p_zero():
    # temperature 0 is greedy (`--temperature 0`); top_p 0 keeps no token: every logit -inf, then NaN probabilities
    decoding.check_sampling(max_new_tokens=1, temperature=0, top_k=None, top_p=None)
    decoding.check_sampling(max_new_tokens=1, temperature=0.0, top_k=1, top_p=1.0)
    for check in (lambda: decoding.check_sampling(max_new_tokens=1, temperature=1.0, top_k=None, top_p=0.0),
                  lambda: decoding.filter_logits(torch.zeros(1, 5), top_p=0.0)):
        with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\], got 0\.0"):
            check()


def _count_masks_made(monkeypatch):
    """The masks a model builds from now on (constructors and ``&``), by name, and the structures read anew."""
    from maskattn import masks

    made, built = [], []
    for name in ("causal", "sliding_window", "padding", "from_tensor"):
        real = getattr(masks, name)
        monkeypatch.setattr(masks, name, lambda *args, real=real, name=name: made.append(name) or real(*args))
    real_and = masks.Mask.__and__
    monkeypatch.setattr(masks.Mask, "__and__", lambda self, other: made.append("&") or real_and(self, other))
    valid = torch.ones(1, 1, dtype=torch.bool)
    for cls in {type(masks.causal()), type(masks.padding(valid)), type(masks.causal() & masks.padding(valid))}:
        monkeypatch.setattr(cls, "structure", lambda self, real=cls.structure: built.append(self) or real(self))
    return made, built


def _decoder_masks(model):
    """The self- and cross-attention masks of every call of ``model.decoder``, in order."""
    seen = []
    model.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["mask"], kwargs.get("memory_mask"))), with_kwargs=True)
    return seen


def _transformer_greedy_oracle(model, src, lengths, new):
    """Greedy tokens of each source row alone by full forwards without a cache (never pad_id nor BOS): (B, new)."""
    rows, banned = [], [model.config.pad_id, model.config.bos_id]
    with torch.no_grad():
        for b in range(src.shape[0]):
            tgt = [model.config.bos_id]
            for _ in range(new):
                logits = model(src[b : b + 1, : lengths[b]], torch.tensor([tgt]))[0, -1]
                tgt.append(int(logits.index_fill(0, torch.tensor(banned), float("-inf")).argmax()))
            rows.append(tgt[1:])
    return torch.tensor(rows)


@pytest.mark.parametrize("case", ["one-row", "padded-rows", "transformer"])
def test_a_decoded_token_builds_no_mask_and_reads_no_structure_anew(monkeypatch, case):
    # every step built its masks again (a DecoderLM's causal(), with padding in the cache causal() & padding(...);
    # a Transformer's causal() & padding(...) and its memory's padding(...)), and read their structures again (a
    # decoder's layers alternate its two masks, and masks.structure kept the last one's): 1, 3 and 4 masks and 1, 3
    # and 8 structures a token. Now one mask object each per generation, its position the call's q_offset.
    # Oracle for the tokens: each row alone, by full forwards without a cache.
    torch.manual_seed(0)
    if case == "transformer":
        model = Transformer(TransformerConfig.preset("tiny", eos_id=None)).eval()
        inputs, lengths = _src_batch()
        oracle = _transformer_greedy_oracle
    else:
        model = DecoderLM(DecoderLMConfig.preset("tiny", eos_id=None)).eval()
        inputs, lengths = LM_CASES[case]
        oracle = _greedy_oracle
    seen = _decoder_masks(model)
    made, built = _count_masks_made(monkeypatch)
    counts = []
    for max_new in (4, 12):
        made.clear(), built.clear(), seen.clear()
        out = decoding.greedy(model, inputs, lengths, max_new_tokens=max_new)
        counts.append((len(made), len(built)))
    assert counts[0] == counts[1], counts  # nothing more for 8 more tokens
    steps = seen[1:]  # the calls after the prompt's (or BOS's)
    assert all(mask is steps[0][0] and memory is steps[0][1] for mask, memory in steps), case
    assert torch.equal(out, oracle(model, inputs, lengths, 12))


def test_beam_steps_keep_the_memory_mask_and_equal_the_full_forward(monkeypatch):
    # Beam search reorders the state every step: the self-attention mask follows the new key_valid, while the
    # memory's padding (the same rows of the same sources, same_memory=True) was built again every step; now once.
    # Oracle for every step's logits: a full forward without a cache over each beam's source and target prefix.
    from maskattn.models import DecodeState

    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("tiny", eos_id=None)).eval()
    src, lengths = _src_batch()
    seen = _decoder_masks(model)
    made, _ = _count_masks_made(monkeypatch)
    beams = {"src": torch.arange(3), "tgt": torch.full((3, 1), model.config.bos_id)}  # per live row
    reorder, step = DecodeState.reorder, model.step

    def tracked_reorder(state, index, **kwargs):
        beams["src"], beams["tgt"] = beams["src"][index], beams["tgt"][index]
        return reorder(state, index, **kwargs)

    def checked_step(state, tokens, *args, **kwargs):
        logits = step(state, tokens, *args, **kwargs)
        if tokens.shape[0] == beams["tgt"].shape[0] and state.length > 1:  # a beam step (not BOS)
            beams["tgt"] = torch.cat([beams["tgt"], tokens], dim=1)
            rows, counted = beams["src"], (len(made), len(seen))
            full = model(src[rows], beams["tgt"], src_lengths=lengths[rows])[:, -1:]
            del made[counted[0] :], seen[counted[1] :]  # the oracle's own masks are not the step's
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
            beams["checked"] = beams.get("checked", 0) + 1
        return logits

    monkeypatch.setattr(DecodeState, "reorder", tracked_reorder)
    monkeypatch.setattr(model, "step", checked_step)
    counts = []
    for max_new in (4, 12):
        made.clear(), seen.clear()
        beams.update(src=torch.arange(3), tgt=torch.full((3, 1), model.config.bos_id), checked=0)
        with torch.no_grad():
            decoding.beam_search(model, src, lengths, beam_size=3, max_new_tokens=max_new)
        counts.append(made.count("padding"))
        assert beams["checked"] == max_new - 1
    assert counts[1] - counts[0] == 8, counts  # one padding a token, the self-attention's; the memory's once
    assert all(memory is seen[1][1] for _, memory in seen[1:])


def test_a_compiled_step_dropped_by_another_thread_is_still_the_callers(monkeypatch):
    # _compiled_step stored a new kind's step, then read it back from the shared table (move_to_end, then []): a
    # thread decoding COMPILED_KINDS other kinds in between dropped it there, and the caller got a KeyError. The
    # interleaving is played in one thread: the table's store of the first kind runs the other thread's calls
    from collections import OrderedDict
    from types import SimpleNamespace

    made = {}
    monkeypatch.setattr(decoding, "_compile_step", lambda step: made.setdefault(len(made), object()))
    first = SimpleNamespace(config="first")

    class Table(OrderedDict):
        played = False

        def __setitem__(self, kind, step):
            super().__setitem__(kind, step)
            if "first" in kind and not self.played:  # the other thread, between the store and the read back
                self.played = True
                for n in range(decoding.COMPILED_KINDS):
                    decoding._compiled_step(SimpleNamespace(config=n))

    monkeypatch.setattr(decoding, "_COMPILED", Table())
    assert decoding._compiled_step(first) is made[0]  # the step compiled for it, though no longer kept
    assert len(decoding._COMPILED) == decoding.COMPILED_KINDS
    again = decoding._compiled_step(first)  # compiled anew and kept, the oldest other kind dropped
    assert again is made[len(made) - 1] and list(decoding._COMPILED.values())[-1] is again
    assert len(decoding._COMPILED) == decoding.COMPILED_KINDS
