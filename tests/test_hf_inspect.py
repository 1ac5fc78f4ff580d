"""The audit, the attention pictures and the CLI on Hugging Face models (maskattn.hf_inspect).

Honest tiny random models of each kind pass with and without attn_implementation="maskattn"; the two
planted leaks of issue 14 (the packing bug, a mask function that lets each token see its successor)
are caught and named. Everything is built locally: no downloads.
"""

import copy
import gzip
import json
import math
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers not installed: pip install "
                                   "'maskattn[hf]'")

import maskattn  # noqa: E402
from maskattn import hf, hf_inspect  # noqa: E402
from maskattn.cli import main  # noqa: E402
from maskattn.errors import UsageError  # noqa: E402
from maskattn.models import inspectable  # noqa: E402
from maskattn.viz import capture_attention  # noqa: E402

NAME = hf.register()
VOCAB, LENGTH = 61, 10
IMPLEMENTATIONS = ["eager", "sdpa", NAME]

MODELS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=2, eos_token_id=3)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, bos_token_id=2, eos_token_id=3)),
    "bert": lambda: transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64)),
}


def _model(name: str, implementation: str = NAME):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    model.set_attn_implementation(implementation)
    return model


def _leaks(report, title: str) -> list[tuple[int, int, int]]:
    return next(v.leaks for v in report.verdicts if title in v.name)


# --- the audit ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_honest_models_pass(name, implementation):
    report = maskattn.audit(_model(name, implementation), length=LENGTH)
    assert report.ok, str(report)
    titles = [v.name for v in report.verdicts]
    if name == "bert":
        assert titles == ["BertModel hidden states vs padding"]
    else:
        assert [t.split(" ", 1)[1] for t in titles] == ["logits vs later tokens",
                                                       "packed documents (position_id_resets)"]
    assert all(v.checked_pairs > 0 for v in report.verdicts)


@pytest.mark.parametrize("implementation", ["eager", NAME])
def test_packing_bug_is_caught_and_names_the_pairs(implementation):
    """A packed batch fed with an all-ones attention_mask and no position_ids resets: the second document
    sees the first."""

    def all_ones(input_ids, documents):
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    report = maskattn.audit(hf_inspect.HFAdapter(_model("llama", implementation), packing=all_ones), length=LENGTH)
    assert not report.ok
    leaks = _leaks(report, "packed documents (all_ones)")
    half = LENGTH // 2  # the probe's second document starts here
    assert leaks and all(q >= half > k for _, q, k in leaks)
    assert leaks[0] == (0, half, 0) and "b0 q5->k0" in str(report)
    assert _leaks(report, "logits vs later tokens") == []  # still causal: only the documents leak


def _register_leaky(name: str = "maskattn-test-sees-next") -> str:
    """An implementation whose mask function was swapped for one that also lets each token see its successor."""
    mu = transformers.masking_utils

    def sees_next(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx == q_idx + 1

    def leaky_mask(*args, mask_function=mu.causal_mask_function, **kwargs):
        return mu.sdpa_mask(*args, mask_function=mu.or_masks(mask_function, sees_next),
                            **{**kwargs, "allow_is_causal_skip": False})

    transformers.AttentionInterface.register(name, transformers.AttentionInterface._global_mapping["sdpa"])
    mu.AttentionMaskInterface.register(name, leaky_mask)
    return name


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_mask_function_that_sees_the_successor_is_caught(name):
    report = maskattn.audit(_model(name, _register_leaky()), length=LENGTH)
    assert not report.ok
    assert _leaks(report, "logits vs later tokens") == [(0, 0, 1)]  # query 0 saw key 1
    assert "b0 q0->k1" in str(report)
    documents = _leaks(report, "packed documents")
    assert (0, LENGTH // 2 - 1, LENGTH // 2) in documents  # the last token of document 0 sees document 1


def test_encoder_whose_padding_is_dropped_is_caught():
    """The issue's first try: maskattn's attention function registered without its mask function, so
    transformers builds no mask and the padding is silently dropped."""
    transformers.AttentionInterface.register("maskattn-test-no-mask", hf.attention_forward)
    report = maskattn.audit(_model("bert", "maskattn-test-no-mask"), length=LENGTH)
    assert not report.ok
    (b, q, k), *_ = _leaks(report, "hidden states vs padding")
    assert b == 1 and q < LENGTH - 4 <= k  # row 1 has LENGTH - 4 real tokens


SLIDING = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=64, bos_token_id=2, eos_token_id=3)
WINDOWED = {  # tiny causal LMs whose every layer slides a window of 3 keys
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**SLIDING, sliding_window=3)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **SLIDING, use_sliding_window=True, sliding_window=3, max_window_layers=0)),
}


def _farthest_read(model, length: int = LENGTH) -> int:
    """The oracle: how far back any logit reads, found by changing one token at a time."""
    ids = torch.randint(4, VOCAB, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(input_ids=ids).logits[0]
        return max(t - k for k in range(length) for t in
                   ((model(input_ids=ids.index_fill(1, torch.tensor([k]), (int(ids[0, k]) + 1) % VOCAB)).logits[0]
                     != base).any(-1).nonzero()[:, 0].tolist()))


def _wider_by(extra: int):
    """transformers' sliding-window mask built for a window ``extra`` keys wider than the config's."""
    build = transformers.masking_utils.create_sliding_window_causal_mask

    def wider(config, **kwargs):
        config = copy.copy(config)
        config.sliding_window += extra
        return build(config=config, **kwargs)
    return wider


@pytest.mark.parametrize("implementation", ["eager", NAME])
@pytest.mark.parametrize("name", sorted(WINDOWED))
@pytest.mark.parametrize("leak", ["one-key-wider", "no-window"])
def test_an_hf_model_that_reads_beyond_its_sliding_window_is_caught(monkeypatch, name, implementation, leak):
    # an HF causal LM whose mask ignored its config's sliding window (or built it a key wider) passed: no check looked
    # back. The oracle is transformers' own model: an honest one reads exactly 2 * (3 - 1) positions back (windows
    # of keys q - 2 .. q), the leaky one further
    torch.manual_seed(0)
    model = WINDOWED[name]().eval()
    model.set_attn_implementation(implementation)
    assert _farthest_read(model) == 4
    report = maskattn.audit(model, length=LENGTH)
    assert report.ok and any(v.name.endswith("logits vs tokens outside the sliding window") and v.checked_pairs > 0
                             for v in report.verdicts), str(report)
    module = sys.modules[type(model).__module__]
    build = transformers.masking_utils.create_causal_mask if leak == "no-window" else _wider_by(1)
    monkeypatch.setattr(module, "create_sliding_window_causal_mask", build)
    assert _farthest_read(model) > 4
    report = maskattn.audit(model, length=LENGTH)
    assert [v.name.split(" ", 1)[1] for v in report.verdicts if not v.ok] == [
        "logits vs tokens outside the sliding window"], str(report)
    _, q, k = _leaks(report, "sliding window")[0]
    assert q - k > 4


@pytest.mark.parametrize("config, reach", [
    (transformers.MistralConfig(**SLIDING, sliding_window=3), 4),
    (transformers.MistralConfig(**{**SLIDING, "num_hidden_layers": 3}, sliding_window=5), 12),
    (transformers.MistralConfig(**SLIDING, sliding_window=None), None),
    (transformers.Qwen2Config(**SLIDING, use_sliding_window=True, sliding_window=3, max_window_layers=0), 4),
    (transformers.Qwen2Config(**SLIDING, use_sliding_window=True, sliding_window=3, max_window_layers=1), None),
    (transformers.Qwen2Config(**SLIDING, use_sliding_window=False, sliding_window=3, max_window_layers=0), None),
    (transformers.Gemma2Config(**SLIDING, sliding_window=3), None),  # alternating: every other layer is global
    (transformers.Gemma3TextConfig(**SLIDING, sliding_window=3, layer_types=["sliding_attention"] * 2), 4),
    (transformers.LlamaConfig(**SLIDING), None),
], ids=["mistral", "mistral-3-layers", "mistral-no-window", "qwen2-all-sliding", "qwen2-layer-0-global",
        "qwen2-window-off", "gemma2-alternating", "gemma3-all-sliding", "llama"])
def test_the_window_check_is_declared_only_where_every_layer_slides(config, reach):
    # a global layer reads the whole prefix: a receptive field is bounded only when every layer slides
    assert hf_inspect.window_reach(config) == reach
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    checks = [c for c in inspectable(model).audit_probe().checks if c.kind == "window"]
    assert [c.reach for c in checks] == ([] if reach is None else [reach])
    if reach is not None and reach < LENGTH - 1:
        assert _farthest_read(model) == reach
        assert maskattn.audit(model, length=LENGTH).ok


def test_adapter_declares_sites_and_kind():
    gpt2, bert = _model("gpt2"), _model("bert")
    view = inspectable(gpt2)
    assert isinstance(view, hf_inspect.HFAdapter) and view.causal
    assert {n: (s.kind, s.layer) for n, s in view.attention_sites().items()} == {
        "transformer.h.0.attn": ("self-causal", 0), "transformer.h.1.attn": ("self-causal", 1)}
    assert not inspectable(bert).causal
    assert {s.kind for s in inspectable(bert).attention_sites().values()} == {"self-bidirectional"}
    assert inspectable(torch.nn.Linear(2, 2)) is None


def test_position_id_resets():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    got = hf_inspect.position_id_resets(torch.zeros_like(docs), docs)
    assert got["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]
    assert got["use_cache"] is False and "attention_mask" not in got


def test_importing_maskattn_imports_no_transformers():
    code = "import sys, maskattn, maskattn.audit, maskattn.viz; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- attention pictures ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODELS))
def test_capture_from_the_lse_equals_eager_weights(name):
    ids = torch.tensor([[5, 9, 14, 3, 22, 7], [8, 4, 30, 11, 0, 0]])
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    captured = {}
    for implementation in ("eager", NAME):
        model = _model(name, implementation)
        with torch.no_grad(), capture_attention(model, heads=[0, 3], rows=[1, 4]) as weights:
            model(**inputs)
        captured[implementation] = weights
    assert captured["eager"].keys() == captured[NAME].keys() == inspectable(model).attention_sites().keys()
    for layer, (want,) in captured["eager"].items():
        (got,) = captured[NAME][layer]
        assert got.shape == (2, 2, 2, 6)
        assert (got - want).abs().max() <= 1e-5, layer
        assert got[1, :, :, 4:].abs().max() == 0  # row 1's padding keys get no weight


@pytest.mark.parametrize("implementation", ["eager", NAME])
def test_capture_refuses_heads_and_rows_past_the_call_under_either_implementation(implementation):
    # under "eager" head 99 was torch's IndexError and -1 the last row, where "maskattn" refused both by name
    model, ids = _model("llama", implementation), torch.tensor([[5, 9, 14, 3, 22, 7]])
    for kwargs, said in [({"heads": [99]}, r"heads must be indices in \[0, 4\), got \[99\]"),
                         ({"rows": [-1]}, r"rows must be indices in \[0, 6\), got \[-1\]")]:
        with pytest.raises(ValueError, match=said), torch.no_grad(), capture_attention(model, **kwargs):
            model(input_ids=ids)


def test_capture_without_weights_raises_naming_the_module_and_the_fix():
    model = _model("llama", "sdpa")
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn .*'sdpa'.*'maskattn'"), \
            capture_attention(model):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_capture_that_matches_nothing_raises_listing_the_layers():
    model = _model("gpt2")
    with pytest.raises(ValueError, match=r"matches no attention module.*transformer\.h\.0\.attn"), \
            capture_attention(model, layers=["decoder.*"]):
        pass
    with pytest.raises(ValueError, match="no attention module that capture_attention can observe"), \
            capture_attention(torch.nn.Linear(2, 2)):
        pass
    with pytest.raises(ValueError, match="method='rerun' needs maskattn layers"), \
            capture_attention(model, method="rerun"):
        pass


def test_observers_are_removed_after_a_capture():
    model = _model("gpt2")
    with capture_attention(model):
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert not hf._OBSERVERS
    assert all(not m._forward_hooks for m in model.modules())


# --- Hugging Face directories on the command line ----------------------------------------------------
TEXT = "the cat sat on the mat\nthe dog sat on the log\n"


def _saved(name: str, directory):
    """A tiny random model saved with save_pretrained, with a character tokenizer built here."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = sorted(set(TEXT))
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *chars])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                                     bos_token="<s>", eos_token="</s>")
    _model(name, "eager").save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: _saved(name, root / name) for name in ("gpt2", "bert", "llama")}


def test_hf_directory_is_recognised(hf_dirs, tmp_path):
    assert hf_inspect.is_hf_directory(hf_dirs["gpt2"])
    assert not hf_inspect.is_hf_directory(tmp_path) and not hf_inspect.is_hf_directory(None)
    (tmp_path / "config.json").write_text(json.dumps({"format": "maskattn", "model_type": "x"}))
    assert not hf_inspect.is_hf_directory(tmp_path)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_audit_command_on_an_hf_directory(hf_dirs, name, capsys):
    assert main(["audit", hf_dirs[name]]) == 0
    out = capsys.readouterr().out
    assert "no leak found" in out and ("packed documents" in out) == (name == "gpt2")


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_viz_command_on_an_hf_directory(hf_dirs, name, tmp_path, capsys):
    out = tmp_path / "viz"
    assert main(["viz", hf_dirs[name], "--input", "the cat", "--out", str(out)]) == 0
    assert (out / "explorer.html").is_file()
    assert len(list(out.glob("*_grid.png"))) == 2 and len(list(out.glob("*_head*.png"))) == 8
    assert "wrote 11 files" in capsys.readouterr().out
    assert main(["viz", hf_dirs[name], "--input", "the cat", "--target", "a dog", "--out", str(out)]) == 2
    assert "has no cross-attention" in capsys.readouterr().err  # --target was dropped without a word


def test_evaluate_command_on_an_hf_directory(hf_dirs, tmp_path, capsys):
    data = tmp_path / "valid.txt"
    data.write_text(TEXT)
    assert main(["evaluate", hf_dirs["gpt2"], "--data", str(data)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["tokens"] == len(TEXT) - 1 and abs(scores["perplexity"] - torch.tensor(scores["loss"]).exp()) < 1e-3
    assert main(["evaluate", hf_dirs["bert"], "--data", str(data)]) == 2
    assert "causal language models; BertModel is not one" in capsys.readouterr().err


def test_the_perplexity_of_a_far_off_hf_model_is_exp_of_its_loss_not_capped(hf_dirs, tmp_path):
    # exp(min(loss, 50)): 5.2e21 for any loss above 50 nats a token
    data = tmp_path / "valid.txt"
    data.write_text(TEXT)
    model, tokenizer = hf_inspect.load(hf_dirs["gpt2"])
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(300.0)  # sharp, and mostly wrong, predictions
        ids = torch.tensor([tokenizer(TEXT)["input_ids"]])  # (1, L): the oracle, from the logits themselves
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1].double(), ids[0, 1:]).item()
    found = hf_inspect.evaluate_text(model, tokenizer, data)
    assert 50 < loss < 700 and found["loss"] == pytest.approx(loss, rel=1e-5)
    assert found["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_generate_command_on_an_hf_directory(hf_dirs, capsys):
    assert main(["generate", hf_dirs["gpt2"], "--prompt", "the ", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("the ")
    model, tokenizer = hf_inspect.load(hf_dirs["gpt2"])
    assert greedy.rstrip("\n") == hf_inspect.generate_text(model, tokenizer, "the ", max_new_tokens=6, temperature=0)
    assert main(["generate", hf_dirs["gpt2"], "--prompt", "the ", "--max-new-tokens", "4", "--seed", "1"]) == 0
    capsys.readouterr()
    for args, expected in ((["--max-new-tokens", "0"], "argument --max-new-tokens: expected a positive integer, got 0"),
                           (["--temperature", "-1"],
                            "argument --temperature: expected a finite number >= 0 (0: greedy), got -1.0"),
                           (["--top-k", "0"], "argument --top-k: expected a positive integer, got 0")):
        with pytest.raises(SystemExit) as refused:  # the flag's argparse type refuses it, naming the flag
            main(["generate", hf_dirs["gpt2"], "--prompt", "the ", *args])
        assert refused.value.code == 2 and expected in capsys.readouterr().err
    # the command's default of 200 new tokens, beyond GPT-2's 64 positions: an IndexError traceback before (when no
    # end-of-text token stops it first)
    model.generation_config.eos_token_id = None
    with pytest.raises(UsageError, match=r"--max-new-tokens 200: the prompt \(4 tokens\) and the new tokens are longer "
                       r"than GPT2LMHeadModel can read \(max_position_embeddings=64\); at most 60 new tokens fit"):
        hf_inspect.generate_text(model, tokenizer, "the ", max_new_tokens=200)


def test_loaded_directory_runs_maskattn_and_equals_the_saved_model(hf_dirs):
    model, tokenizer = hf_inspect.load(hf_dirs["gpt2"])
    assert isinstance(model, transformers.GPT2LMHeadModel) and model.config._attn_implementation == NAME
    ids = torch.tensor([tokenizer("the cat")["input_ids"]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = _model("gpt2", "eager")(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5


def test_hf_commands_refuse_input_they_cannot_score_or_draw(hf_dirs, tmp_path, capsys):
    # evaluate scored a one-character file as loss 0.0 / perplexity 1.0; viz of "" or of more tokens than the
    # model's positions ended in a traceback
    data = tmp_path / "one.txt"
    data.write_text("t")
    assert main(["evaluate", hf_dirs["gpt2"], "--data", str(data)]) == 2
    assert "fewer than 2 tokens to score" in capsys.readouterr().err
    limit = transformers.AutoConfig.from_pretrained(hf_dirs["gpt2"]).max_position_embeddings
    assert main(["viz", hf_dirs["gpt2"], "--input", "", "--out", str(tmp_path / "viz")]) == 2
    assert "--input: '' is no token for GPT2LMHeadModel" in capsys.readouterr().err
    assert main(["viz", hf_dirs["gpt2"], "--input", "t" * (limit + 5), "--out", str(tmp_path / "viz")]) == 2
    assert f"longer than GPT2LMHeadModel can read (max_position_embeddings={limit})" in capsys.readouterr().err


def test_hf_viz_reads_past_max_position_embeddings_with_rope(hf_dirs, tmp_path, capsys):
    # RoPE has no table that ends there: only learned positions (the test above) refuse longer input
    assert main(["viz", hf_dirs["llama"], "--input", "t" * 70, "--out", str(tmp_path / "viz")]) == 0
    assert "wrote" in capsys.readouterr().out


def test_hf_commands_refuse_what_the_model_cannot_do_with_status_two(hf_dirs, tmp_path, capsys):
    # an IndexError (audit past GPT-2's 64 positions) and an AttributeError (generate with a BertModel) were
    # tracebacks with status 1, which audit uses for "leak found"; evaluate ignored other tasks' flags and read no
    # .gz file
    limit = transformers.AutoConfig.from_pretrained(hf_dirs["gpt2"]).max_position_embeddings
    assert main(["audit", hf_dirs["gpt2"], "--length", str(limit + 10)]) == 2
    assert f"--length {limit + 10}: more than the {limit} positions" in capsys.readouterr().err
    assert main(["generate", hf_dirs["bert"], "--prompt", "the "]) == 2
    assert "causal language models; BertModel is not one" in capsys.readouterr().err
    data = tmp_path / "valid.txt.gz"
    data.write_bytes(gzip.compress(TEXT.encode()))
    assert main(["evaluate", hf_dirs["gpt2"], "--data", str(data), "--beam", "3"]) == 2
    assert "--beam: not read when evaluating a Hugging Face model" in capsys.readouterr().err
    assert main(["evaluate", hf_dirs["gpt2"], "--data", str(data)]) == 0
    from_gz = json.loads(capsys.readouterr().out)
    plain = tmp_path / "valid.txt"
    plain.write_text(TEXT)
    assert main(["evaluate", hf_dirs["gpt2"], "--data", str(plain)]) == 0
    assert json.loads(capsys.readouterr().out) == from_gz


def test_hf_commands_refuse_an_encoder_decoder_directory_in_one_line(tmp_path, capsys):
    # audit, viz and evaluate of a saved BART ended in HFAdapter's TypeError traceback (status 1, audit's "leak found")
    torch.manual_seed(0)
    transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)).save_pretrained(
        tmp_path / "bart")
    data = tmp_path / "valid.txt"
    data.write_text(TEXT)
    for args in (["audit"], ["viz", "--input", "the cat", "--out", str(tmp_path / "viz")], ["evaluate", "--data",
                 str(data)], ["generate", "--prompt", "the "]):
        assert main([args[0], str(tmp_path / "bart"), *args[1:]]) == 2, args
        assert "an encoder-decoder model (bart); maskattn's commands run" in capsys.readouterr().err, args


def test_viz_of_an_hf_directory_names_an_out_that_is_a_file_as_for_maskattn_models(hf_dirs, tmp_path, capsys):
    # a maskattn model said "viz --out F: a file, expected a directory"; an HF directory loaded the model, ran it,
    # then "[Errno 17] File exists: 'F'" (and a path under a file "[Errno 20] Not a directory")
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"x")
    for out, said in ((taken, "a file"), (taken / "viz", f"{taken} is a file")):
        assert main(["viz", hf_dirs["gpt2"], "--input", "the cat", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == f"maskattn viz: viz --out {out}: {said}, expected a directory to write the pictures into"
    assert taken.read_bytes() == b"x"


class _Planted:
    """Unpickling this runs ``open(path, "w")``: the file appearing means a pickle was loaded as code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_hf_commands_never_unpickle_nor_run_a_directorys_code(hf_dirs, tmp_path, capsys, monkeypatch):
    import pickle
    import shutil

    planted = tmp_path / "planted"
    # weights as a pickle only: transformers' weights_only torch.load refused it, in a 40-line traceback (status 1)
    pickled = shutil.copytree(hf_dirs["gpt2"], tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Planted(planted)}))
    assert main(["audit", str(pickled)]) == 2
    assert "safetensors weights only, never a pickle such as pytorch_model.bin" in capsys.readouterr().err
    # a model_type defined by the directory's own code: transformers asked on a terminal and ran it on "y"
    coded = shutil.copytree(hf_dirs["gpt2"], tmp_path / "coded")
    meta = json.loads((coded / "config.json").read_text())
    (coded / "config.json").write_text(json.dumps({**meta, "model_type": "planted", "auto_map": {
        "AutoConfig": "planted.Config", "AutoModelForCausalLM": "planted.Model"}}))
    (coded / "planted.py").write_text(f"open({str(planted)!r}, 'w').close()\n"
                                      "from transformers import GPT2Config as Config, GPT2LMHeadModel as Model\n")
    monkeypatch.setattr("builtins.input", lambda *args: "y")  # the user answering transformers' question
    assert main(["audit", str(coded)]) == 2
    assert "model_type 'planted' is defined by Python code in the directory" in capsys.readouterr().err
    assert not planted.exists()


@pytest.mark.parametrize(("name", "key", "value", "said"), [
    ("gpt2", "n_layer", 10**9, "does not fit the weights: model.safetensors holds"),
    ("llama", "num_hidden_layers", 10**9, "does not fit the weights: model.safetensors holds"),
    ("gpt2", "n_embd", 48, "does not fit the weights: tensor 'transformer.wte.weight' would be (61, 48), "
                           "model.safetensors holds (61, 32)"),
    ("bert", "hidden_size", 40, "does not fit the weights: tensor 'embeddings.word_embeddings.weight' would be "
                                "(61, 40), model.safetensors holds (61, 32)")])
def test_hf_commands_compare_config_sizes_with_the_weights_before_building(hf_dirs, tmp_path, capsys, name, key,
                                                                          value, said):
    # transformers built the model from config.json before reading a tensor: 10^9 layers hung until memory ran out,
    # a hidden size the tensors do not have was its 'ignore_mismatched_sizes' RuntimeError traceback
    import shutil

    changed = shutil.copytree(hf_dirs[name], tmp_path / name)
    meta = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**meta, key: value}))
    assert main(["audit", str(changed)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{changed / 'config.json'}: {key}={value} {said}" in err


def test_hf_size_check_reads_tensors_stored_without_the_base_models_prefix(hf_dirs, tmp_path, capsys):
    # the released gpt2 checkpoint names its tensors 'h.0.attn.c_attn.weight', not 'transformer.h.0...': such a
    # directory still loads, and a config.json that does not fit it is still named
    import shutil

    from safetensors.torch import load_file, save_file

    bare = shutil.copytree(hf_dirs["gpt2"], tmp_path / "bare")
    tensors = load_file(bare / "model.safetensors")
    save_file({n.removeprefix("transformer."): t for n, t in tensors.items() if n != "lm_head.weight"},
              bare / "model.safetensors", metadata={"format": "pt"})
    want = hf_inspect.load(hf_dirs["gpt2"], tokenizer=False)[0]
    got = hf_inspect.load(bare, tokenizer=False)[0]
    x = torch.tensor([[4, 5, 6, 7]])
    torch.testing.assert_close(got(input_ids=x).logits, want(input_ids=x).logits, rtol=0, atol=0)
    meta = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**meta, "n_embd": 48}))
    assert main(["audit", str(bare)]) == 2
    assert "n_embd=48 does not fit the weights: tensor 'transformer.wte.weight' would be (61, 48)" in \
        capsys.readouterr().err


def test_hf_size_check_counts_layers_by_the_layer_count_alone(tmp_path):
    # every config key ending in 'layers' was read as a layer count: a small Qwen2 (max_window_layers=28 by default,
    # a setting of its sliding window, not a count of layers) was refused as 'does not fit the weights'
    from safetensors.torch import load_file

    config = transformers.Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      num_hidden_layers=1, intermediate_size=64, vocab_size=61,
                                      max_position_embeddings=64)
    assert config.max_window_layers == 28
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen2")
    assert len(load_file(tmp_path / "qwen2" / "model.safetensors")) < 28
    model = hf_inspect.load(tmp_path / "qwen2", tokenizer=False)[0]
    want = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "qwen2").eval()
    x = torch.tensor([[4, 5, 6, 7]])
    torch.testing.assert_close(model(input_ids=x).logits, want(input_ids=x).logits)


def test_hf_commands_name_an_architecture_without_the_attention_interface(tmp_path, capsys):
    # Falcon and GPT-Neo pick their attention class from a dict of their own: attn_implementation='maskattn' was
    # their KeyError: 'maskattn' traceback (exit 0 printed nothing useful)
    config = transformers.GPTNeoConfig(hidden_size=32, num_heads=4, num_layers=2, vocab_size=61,
                                       max_position_embeddings=64, attention_types=[[["global", "local"], 1]])
    transformers.GPTNeoForCausalLM(config).save_pretrained(tmp_path / "neo")
    assert main(["audit", str(tmp_path / "neo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{tmp_path / 'neo'}: transformers' gpt_neo model does not take attn_implementation='maskattn'" in err


@pytest.mark.parametrize("name", ["bloom", "deberta-v2"])
def test_hf_commands_refuse_a_model_whose_attention_bypasses_the_interface(tmp_path, capsys, name):
    # transformers accepts attn_implementation='maskattn' for any class and then its own attention code runs: Bloom
    # added maskattn's mask to its scores ("unsupported operand type(s) for +: 'Tensor' and 'HFMask'", a traceback
    # with status 1, the audit's leak status); DeBERTa-v2 ignored it and the audit passed with maskattn never called
    torch.manual_seed(0)
    if name == "bloom":
        model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2,
                                                                       n_head=4))
    else:
        model = transformers.DebertaV2Model(transformers.DebertaV2Config(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48))
    model.save_pretrained(tmp_path / name)
    assert main(["audit", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    model_type = model.config.model_type
    assert f"{tmp_path / name}: transformers' {model_type} model does not take attn_implementation='maskattn'" in err
    assert "AttentionInterface" in err


@pytest.mark.parametrize(("name", "key", "drop"), [("qwen2", "num_hidden_layers", "layer_types"),
                                                   ("qwen2", "num_hidden_layers", None),
                                                   ("gpt2", "n_layer", None)])
def test_hf_commands_compare_layer_counts_with_the_weights_before_transformers_reads_config(
        tmp_path, capsys, monkeypatch, name, key, drop):
    # transformers' own AutoConfig builds a list as long as Qwen2's num_hidden_layers (its layer_types) before the
    # size check ran: 10^9 layers took all memory (or, with config.json's own layer_types, was its validation
    # traceback); config.json's layer count is now compared with the safetensors headers first
    from safetensors.torch import load_file

    torch.manual_seed(0)
    if name == "qwen2":
        transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1, intermediate_size=64,
            vocab_size=61, max_position_embeddings=64)).save_pretrained(tmp_path / name)
    else:
        transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=61,
                                                             n_positions=64)).save_pretrained(tmp_path / name)
    assert hf_inspect.load(tmp_path / name, tokenizer=False)[0] is not None  # the directory as saved loads
    stored = len(load_file(tmp_path / name / "model.safetensors"))
    meta = json.loads((tmp_path / name / "config.json").read_text())
    meta.pop(drop, None)
    (tmp_path / name / "config.json").write_text(json.dumps({**meta, key: 10**9}))

    def never(*args, **kwargs):  # reading config.json with 10^9 layers into transformers is what ran out of memory
        raise AssertionError("transformers read config.json before its layer count was compared with the weights")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", never)
    assert main(["audit", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{tmp_path / name / 'config.json'}: {key}=1000000000 does not fit the weights: model.safetensors " \
           f"holds {stored} tensors in all" in err


def test_evaluate_scores_every_token_of_a_text_longer_than_the_context_once(hf_dirs, tmp_path):
    # blocks of 64 tokens that did not overlap never scored the first token of each block (nor a last block of one
    # token). The oracle: token t (t >= 1) scored once, from the tokens of its window (t - 1) // 63 before it.
    data = tmp_path / "long.txt"
    data.write_text(TEXT * 3 + "x")  # 139 tokens: windows of 64 tokens start at 0, 63 and 126
    model, tokenizer = hf_inspect.load(hf_dirs["gpt2"])
    ids = torch.tensor(tokenizer(TEXT * 3 + "x")["input_ids"])
    assert model.config.max_position_embeddings == 64 and len(ids) == 139
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(input_ids=ids[None, (t - 1) // 63 * 63 : t]).logits[0, -1]
                                                    .double(), ids[t]).item() for t in range(1, len(ids))]
    found = hf_inspect.evaluate_text(model, tokenizer, data)
    assert found["tokens"] == len(ids) - 1
    assert found["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)


def _cut_weights(directory):
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_config(directory, **settings):
    meta = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**meta, **settings}))


@pytest.mark.parametrize(("edit", "names"), [
    (_cut_weights, "model.safetensors: not a readable safetensors file"),  # transformers' SafetensorError, no file
    (lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors: not a readable safetensors file"),
    (lambda d: _edit_config(d, n_embd="32"), "config.json: "),  # huggingface_hub's StrictDataclassFieldValidationError
    (lambda d: _edit_config(d, n_head=0), "config.json: "),  # ZeroDivisionError inside GPT-2's attention
    (lambda d: _edit_config(d, n_layer=-1), "config.json: n_layer=-1"),  # "__len__() should return >= 0"
    (lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}'),
     "tokenizer.json: not a readable tokenizer"),  # KeyError: 'added_tokens'
], ids=["truncated", "zero-bytes", "string-size", "zero-heads", "negative-layers", "other-tokenizer"])
def test_a_damaged_hf_directory_is_one_line_naming_its_file(hf_dirs, tmp_path, capsys, edit, names):
    import shutil

    directory = tmp_path / "gpt2"
    shutil.copytree(hf_dirs["gpt2"], directory)
    edit(directory)
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    assert main(["evaluate", str(directory), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"maskattn evaluate: {directory / names}")


def test_weights_that_are_a_broken_symbolic_link_are_named(hf_dirs, tmp_path, capsys):
    # an HF cache whose blob was removed (or a link made in a loop) said "no model.safetensors nor
    # model.safetensors.index.json (... found [..., 'model.safetensors', ...])", which lists the file it says is absent
    import os
    import shutil

    blob = tmp_path / "blobs" / "weights"
    blob.parent.mkdir()
    linked = shutil.copytree(hf_dirs["gpt2"], tmp_path / "linked")
    shutil.move(linked / "model.safetensors", blob)
    (linked / "model.safetensors").symlink_to(blob)
    model, _ = hf_inspect.load(linked)  # a link to a file is read, as the HF cache's snapshots are
    assert model(torch.tensor([[1, 2]])).logits.shape == (1, 2, model.config.vocab_size)
    capsys.readouterr()  # (transformers' progress bar)
    blob.unlink()
    looped = shutil.copytree(hf_dirs["gpt2"], tmp_path / "looped")
    (looped / "model.safetensors").unlink()
    (looped / "model.safetensors").symlink_to(looped / "model.safetensors")
    for directory, target in ((linked, blob), (looped, looped / "model.safetensors")):
        assert not os.path.exists(directory / "model.safetensors") and os.path.lexists(directory / "model.safetensors")
        assert main(["audit", str(directory)]) == 2
        assert capsys.readouterr().err == (f"maskattn audit: {directory / 'model.safetensors'}: a broken symbolic link "
                                           f"(to {target}, which is missing or links in a loop); download the weights "
                                           "again\n")
