"""GPT-2 and Llama Hugging Face directories through maskattn.from_pretrained into DecoderLM: the same
logits as the Hugging Face model (tiny random configs written with save_pretrained; no downloads)."""

import json
import re

import pytest
import torch

from maskattn import DecoderLM, from_pretrained

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers not installed: pip install "
                                   "'maskattn[hf]'")

LLAMA = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
CASES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=2,
                                                                         n_head=4, n_positions=64)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)),
    "llama-tied-theta": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLAMA, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
}


def _bert():
    return transformers.BertModel(transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=48,
                                                          max_position_embeddings=64))


def _saved(name, tmp_path):
    torch.manual_seed(0)
    theirs = (_bert if name == "bert" else CASES[name])().eval()
    theirs.save_pretrained(tmp_path)
    return theirs


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_decoder_loads_with_equal_logits(name, tmp_path):
    theirs = _saved(name, tmp_path)
    ours = from_pretrained(tmp_path).eval()
    assert isinstance(ours, DecoderLM)
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(ids).logits
        got = ours(ids)
    assert (got - want).abs().max() <= 1e-5
    assert ours.config.tie_output == theirs.config.tie_word_embeddings


def test_llama_config_fields(tmp_path):
    _saved("llama-tied-theta", tmp_path)
    c = from_pretrained(tmp_path).config
    assert (c.norm, c.positions, c.activation, c.bias, c.rope_base, c.num_kv_heads) == \
        ("rms", "rope", "swiglu", False, 500.0, 2)


def test_unsupported_settings_are_refused_by_name(tmp_path):
    _saved("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported settings rope_parameters="):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"\['num_labels'\] add heads to BERT encoders"):
        from_pretrained(tmp_path, num_labels=2)
    for theta in ({"rope_theta": 500.0}, {}):  # without rope_parameters.rope_theta: the top level's, or 10000 (as
        # transformers 5 reads it; a KeyError before). The oracle: transformers' own config.
        (tmp_path / "config.json").write_text(json.dumps({**config, **theta,
                                                          "rope_parameters": {"rope_type": "default"}}))
        want = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"]
        assert from_pretrained(tmp_path).config.rope_base == want == theta.get("rope_theta", 10000.0)
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_parameters": "x"}))  # was an AttributeError
    with pytest.raises(ValueError, match=r"config\.json: rope_parameters must be a JSON object, got 'x'$"):
        from_pretrained(tmp_path)


def test_a_transformers_4_rope_scaling_is_refused_too(tmp_path):
    # transformers 4 wrote {"type": "linear", ...}: read as the default RoPE, the scaling was dropped silently
    _saved("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported settings rope_scaling="):  # the field the file holds
        from_pretrained(tmp_path)


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0}, {"type": "dynamic", "factor": 2.0},
                                     {"rope_type": "default"}, {"rope_type": "default", "rope_theta": 500.0}])
def test_rope_scaling_beside_rope_parameters_is_read_as_transformers_reads_it(scaling, tmp_path):
    # A config.json holding both (a transformers-4 file edited, or written by hand): transformers 5 takes rope_scaling
    # over rope_parameters, and the theta from rope_scaling or the top level. rope_parameters' default RoPE was read
    # instead: a linear scaling dropped silently (logits 1e-3 off). The oracle: transformers' own config and model.
    theirs = _saved("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(rope_scaling=scaling, rope_parameters={"rope_type": "default", "rope_theta": 700.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    rope = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
    if rope["rope_type"] != "default":
        with pytest.raises(ValueError, match=r"unsupported settings rope_scaling=.*'(rope_)?type': '(linear|dynamic)'"):
            from_pretrained(tmp_path)
        return
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ours = from_pretrained(tmp_path)
    assert ours.config.rope_base == rope["rope_theta"]
    ids = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-5


def test_a_null_head_dim_is_hidden_size_over_heads_as_transformers_reads_it(tmp_path):
    # "head_dim": null was refused as an unsupported head_dim=None; transformers takes hidden_size / heads
    _saved("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "head_dim": None}))
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (from_pretrained(tmp_path)(ids) - theirs(ids).logits).abs().max() <= 1e-5
    (tmp_path / "config.json").write_text(json.dumps({**config, "head_dim": 16}))  # 32 / 4 heads is 8: refused
    with pytest.raises(ValueError, match="unsupported settings head_dim=16"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("head", ["BertForSequenceClassification", "BertForMaskedLM", "BertForQuestionAnswering"])
def test_a_bert_checkpoint_with_task_heads_loads_its_encoder(head, tmp_path, caplog):
    # released BERT files carry cls.* (pre-training) or classifier / qa_outputs heads: all refused as unexpected
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64)
    theirs = getattr(transformers, head)(config).eval()
    theirs.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="maskattn"):
        ours = from_pretrained(tmp_path, num_labels=3).eval()
    assert "the checkpoint's own heads are not loaded" in caplog.text  # a trained classifier is not silently swapped
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs.bert(ids).last_hidden_state
        got = ours(ids)
    assert (got - want).abs().max() <= 1e-5 and ours.config.num_labels == 3


@pytest.mark.parametrize("backend", ["reference", "blocked", "sdpa"])
def test_the_fine_tuning_loss_and_its_gradients_equal_bert_for_sequence_classification(backend, tmp_path):
    # What a fine-tune of a BERT checkpoint computes, against transformers' own classifier on the same weights:
    # padded rows, the pretrained pooler on [CLS], the classifier; the loss, and the gradients that reach the
    # word embeddings (through every layer), the pooler and the classifier
    from maskattn.layers.mha import MultiHeadAttention

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    theirs = transformers.BertForSequenceClassification(config).train()
    theirs.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, num_labels=2).train()
    for module in ours.modules():
        if isinstance(module, MultiHeadAttention):
            module.backend = backend
    with torch.no_grad():  # the checkpoint's head is refused on load (test above): give ours the same one
        ours.classifier.weight.copy_(theirs.classifier.weight)
        ours.classifier.bias.copy_(theirs.classifier.bias)
    lengths = torch.tensor([9, 4, 6])
    ids = torch.randint(1, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    ids[torch.arange(9) >= lengths[:, None]] = 0  # right padding, pad id 0
    labels = torch.tensor([1, 0, 1])
    want = theirs(ids, attention_mask=(ids != 0).long(), labels=labels).loss
    want.backward()
    got = torch.nn.functional.cross_entropy(ours.classify(ids, lengths=lengths), labels)
    got.backward()
    assert abs(got.item() - want.item()) <= 1e-5
    pairs = [(ours.embed.tokens.weight, theirs.bert.embeddings.word_embeddings.weight),
             (ours.pooler.weight, theirs.bert.pooler.dense.weight), (ours.classifier.weight, theirs.classifier.weight)]
    for mine, hf in pairs:
        torch.testing.assert_close(mine.grad, hf.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("settings", [{"is_decoder": True}, {"is_decoder": True, "add_cross_attention": True}])
def test_a_causal_bert_checkpoint_is_refused_by_name(settings, tmp_path):
    # a BERT saved with is_decoder=True (BertLMHeadModel) attends causally: it loaded as the bidirectional EncoderModel
    # without a word, and its hidden states were not the checkpoint's (0.03 apart on this tiny model)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64, **settings)
    transformers.BertLMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported settings is_decoder=True"):
        from_pretrained(tmp_path)


def test_a_sharded_checkpoint_loads_with_equal_logits(tmp_path):
    # save_pretrained splits weights larger than max_shard_size into model-0000k-of-0000n.safetensors files listed in
    # model.safetensors.index.json (as released Llama checkpoints are): "model.safetensors: No such file" before
    torch.manual_seed(0)
    theirs = CASES["llama"]().eval()
    theirs.save_pretrained(tmp_path, max_shard_size="20KB")
    assert not (tmp_path / "model.safetensors").exists() and len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (from_pretrained(tmp_path)(ids) - theirs(ids).logits).abs().max() <= 1e-5
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    for outside in ("../elsewhere.safetensors", "/etc/passwd"):  # the index is data: it reads its own directory only
        first = next(iter(index["weight_map"]))
        (tmp_path / "model.safetensors.index.json").write_text(
            json.dumps({**index, "weight_map": {**index["weight_map"], first: outside}}))
        with pytest.raises(ValueError, match="weight_map names files outside its directory"):
            from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    next(tmp_path.glob("model-*.safetensors")).unlink()  # a shard the index lists is missing: named
    with pytest.raises(ValueError, match=r"model-\d+-of-\d+\.safetensors"):
        from_pretrained(tmp_path)


def test_a_directory_without_safetensors_weights_is_refused_naming_what_it_expected(tmp_path):
    torch.manual_seed(0)
    CASES["gpt2"]().save_pretrained(tmp_path, safe_serialization=False)
    for weights in tmp_path.glob("*.safetensors*"):  # transformers 5 may write safetensors regardless
        weights.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickled")
    with pytest.raises(ValueError, match=r"no model\.safetensors nor model\.safetensors\.index\.json"):
        from_pretrained(tmp_path)



def test_weights_that_are_a_broken_symbolic_link_are_named(tmp_path):
    # an HF cache whose blob was removed said "no model.safetensors nor ... (found [..., 'model.safetensors'])"
    import os

    torch.manual_seed(0)
    CASES["gpt2"]().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors").symlink_to(tmp_path / "removed-blob")
    assert os.path.lexists(tmp_path / "model.safetensors") and not os.path.exists(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'model.safetensors'))}: a broken symbolic link "
                       rf"\(to {re.escape(str(tmp_path / 'removed-blob'))}, which is missing or links in a loop\)"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("name, edit, message", [
    ("gpt2", {"n_head": 5}, r"d_model \(32\) must be divisible by num_heads \(5\)"),
    ("gpt2", {"n_layer": 0}, r"num_layers must be a positive int, got 0"),
    ("llama", {"num_key_value_heads": 3}, r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"),
    ("llama", {"rms_norm_eps": -1.0}, r"norm_eps must be a number > 0, got -1.0"),
    ("bert", {"hidden_dropout_prob": 1.5}, r"dropout must be in \[0, 1\), got 1.5"),
    ("bert", {"pad_token_id": 99}, r"pad_id must be None or an id in \[0, 61\), got 99"),
    # these were ZeroDivisionError, TypeError, ValueError or KeyError tracebacks naming no file
    ("llama", {"num_attention_heads": 0}, r"num_heads must be a positive int, got 0"),
    ("llama", {"num_key_value_heads": 0}, r"num_kv_heads must be None or a positive int, got 0"),  # read as unset
    ("llama", {"num_attention_heads": "4"}, r"num_heads must be a positive int, got '4'"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": "abc"}}, r"rope_base must be a number > 0, "
                                                                                  r"got 'abc'"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": None}}, r"rope_base must be a number > 0, "
                                                                                 r"got None"),
])
def test_a_hugging_face_config_of_impossible_settings_names_its_file(name, edit, message, tmp_path):
    # "d_model (32) must be divisible by num_heads (5)" named neither the file nor that it came from it (n_head). The
    # rules are the model configs' own (tests/test_model_configs.py); here the message must also name the file.
    from maskattn.io import FormatError

    _saved(name, tmp_path)
    config = {**json.loads((tmp_path / "config.json").read_text()), **edit}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=rf"^{tmp_path / 'config.json'}: its settings make no valid \w+Config: "
                                          rf"{message}$"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("option", [{"num_labels": -1}, {"num_labels": 2.5}, {"span_head": "yes"}])
def test_a_bad_head_argument_is_named_as_the_callers_not_the_files(option, tmp_path):
    # from_pretrained(bert_dir, num_labels=-1) was a FormatError "config.json: its settings make no valid
    # EncoderConfig: ...", blaming a sound file for the caller's argument. The oracle: EncoderConfig's own rule.
    from maskattn.io import FormatError
    from maskattn.models import EncoderConfig

    with pytest.raises(ValueError) as own:
        EncoderConfig.preset("tiny", **option)
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=4, intermediate_size=48,
                                                   max_position_embeddings=64)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"^{re.escape(str(own.value))}$") as got:
        from_pretrained(tmp_path, **option)
    assert not isinstance(got.value, FormatError)
    assert from_pretrained(tmp_path, num_labels=3, span_head=True).config.num_labels == 3


def test_a_tokenizer_with_ids_past_the_checkpoints_vocabulary_is_refused_at_once(tmp_path):
    # from_pretrained attached it; a fine-tuning run trained on, and only its final save (which refuses such a
    # tokenizer, as load does) failed, after the whole run
    from tokenizers import Tokenizer, models

    from maskattn.io import FormatError

    _saved("gpt2", tmp_path)  # vocab_size 61
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(62)}, unk_token="w0")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(FormatError, match=r"tokenizer\.json: the tokenizer gives ids up to 61, past the model's "
                                          r"vocab_size=61"):
        from_pretrained(tmp_path)
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(61)}, unk_token="w0")).save(str(tmp_path / "tokenizer.json"))
    assert from_pretrained(tmp_path).tokenizer.get_vocab_size() == 61  # ids 0..60: loads
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.json").mkdir()  # a directory in its place: the model loaded without a tokenizer, silently
    with pytest.raises(FormatError, match=r"tokenizer\.json: not a readable tokenizer"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("name, field, value, setting, tensor", [
    ("llama", "vocab_size", 62, "vocab_size", "model.embed_tokens.weight"),
    ("llama", "intermediate_size", 10**12, "d_ff", "model.layers.0.mlp.up_proj.weight"),
    ("gpt2", "n_positions", 65, "max_len", "transformer.wpe.weight"),
    ("llama", "num_hidden_layers", 1000, "num_layers", None),  # 10**9 too, without building a layer
    ("gpt2", "vocab_size", 10**20, "vocab_size", None),
])
def test_config_sizes_that_do_not_fit_the_tensors_are_named_before_building(name, field, value, setting, tensor,
                                                                             tmp_path):
    # the model was built from config.json before its tensors were compared: 10^9 layers ran out of memory (the CLI
    # said "lower the sizes given (none on the command line)"), vocab_size=10^20 was torch.empty's TypeError, and a
    # vocab_size one too large named model.safetensors. Now one FormatError names config.json and the setting; the
    # oracle for the shape is the safetensors header itself.
    from safetensors import safe_open

    from maskattn.io import FormatError

    _saved(name, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tmp_path / "config.json").read_text()),
                                                      field: value}))
    held = (rf"model\.safetensors holds {re.escape(str(shapes[tensor]))}$" if tensor
            else rf"model\.safetensors holds {len(shapes)} tensors in all$" if value < 2**63 else "64-bit integers")
    with pytest.raises(FormatError, match=rf"^{re.escape(str(tmp_path / 'config.json'))}: {setting}={value} does "
                                          rf"not fit the weights: .*{held}"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("apart", [True, False])
def test_tied_embeddings_with_an_output_projection_stored_apart_give_transformers_logits(name, apart, tmp_path):
    # config.json says tie_word_embeddings, the weights hold an lm_head.weight of their own: it was dropped and the
    # token table used (logits 0.7 off transformers', which keeps a differing lm_head apart). The oracle: transformers.
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    config = {"gpt2": lambda: transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                      tie_word_embeddings=False),
              "llama": lambda: transformers.LlamaConfig(**LLAMA)}[name]()
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" in tensors
    if not apart:  # the same values stored twice: tied, as before
        table = next(n for n in tensors if n.endswith(("wte.weight", "embed_tokens.weight")))
        save_file({**tensors, "lm_head.weight": tensors[table].clone()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tmp_path / "config.json").read_text()),
                                                      "tie_word_embeddings": True}))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-5
    assert ours.config.tie_output is not apart


@pytest.fixture
def sharded(tmp_path):
    """A tiny Llama saved in shards, and its index as read."""
    torch.manual_seed(0)
    CASES["llama"]().save_pretrained(tmp_path, max_shard_size="20KB")
    return tmp_path, json.loads((tmp_path / "model.safetensors.index.json").read_text())


@pytest.mark.parametrize("value", [["model-00001-of-00002.safetensors"], None, ""])
def test_a_weight_map_entry_that_is_not_a_file_name_is_named(sharded, value):
    # a list was "unhashable type: 'list'" (a traceback), null "names files outside its directory: ['None']", and ""
    # read the directory itself as a safetensors file
    from maskattn.io import FormatError

    directory, index = sharded
    first = next(iter(index["weight_map"]))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({**index, "weight_map": {**index["weight_map"], first: value}}))
    with pytest.raises(FormatError, match=rf"model\.safetensors\.index\.json: weight_map values must be shard file "
                                          rf"names, got \[{re.escape(repr(f'{first}: {value!r}'))}\]$"):
        from_pretrained(directory)


def test_a_tensor_held_by_two_shards_is_refused_naming_both(sharded):
    # the later shard's copy was loaded silently (values that may differ from the one the index points to)
    from safetensors.torch import load_file, save_file

    from maskattn.io import FormatError

    directory, index = sharded
    shards = sorted(set(index["weight_map"].values()))
    first, last = shards[0], shards[-1]
    name = next(iter(load_file(directory / first)))
    save_file({**load_file(directory / last), name: load_file(directory / first)[name] + 1}, directory / last)
    with pytest.raises(FormatError, match=rf"{re.escape(last)}: holds \['{re.escape(name)}'\], which "
                                          rf"{re.escape(first)} holds too"):
        from_pretrained(directory)


@pytest.mark.parametrize("name, field, message", [
    ("bert", "model_type", r"model_type \['x'\] is not supported"),
    ("bert", "hidden_act", r"hidden_act \['x'\] is not supported"),
    ("gpt2", "activation_function", r"unsupported settings activation_function=\['x'\]"),
])
def test_a_name_field_that_is_a_list_is_refused_naming_it(name, field, message, tmp_path):
    # "unhashable type: 'list'", a TypeError traceback naming neither the file nor the field
    _saved(name, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tmp_path / "config.json").read_text()),
                                                      field: ["x"]}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'config.json'))}: {message}"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_half_precision_checkpoint_loads_in_its_dtype(name, dtype, tmp_path):
    # released checkpoints are mostly bf16: refused with "tensor 'lm_head.weight' is (61, 32) torch.bfloat16, expected
    # torch.float32". They load in their dtype, as transformers 5 loads them (and maskattn.load its own directories).
    # The oracle: transformers' model of the same file, both lifted to float32 to compare the weights exactly.
    torch.manual_seed(0)
    CASES[name]().to(dtype).save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = from_pretrained(tmp_path)
    assert {p.dtype for p in ours.parameters()} == {theirs.dtype} == {dtype}
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours.float()(ids) - theirs.float()(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("shape", [(32, 96, 1), (), (32, 95)])
def test_a_gpt2_attention_weight_of_the_wrong_form_names_the_tensor(shape, tmp_path):
    # (32, 96, 1), (): torch's "t() expects a tensor with <= 2 dimensions" / "chunk expects at least a 1-dimensional
    # tensor" tracebacks; (32, 95): unequal query/key/value chunks, blamed on config.json's sizes
    from safetensors.torch import load_file, save_file

    from maskattn.io import FormatError

    _saved("gpt2", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "transformer.h.0.attn.c_attn.weight"
    save_file({**tensors, name: torch.zeros(shape)}, tmp_path / "model.safetensors")
    with pytest.raises(FormatError, match=rf"^{re.escape(str(tmp_path / 'model.safetensors'))}: tensor '{name}' is "
                                          rf"{re.escape(str(shape))}; expected "):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("value", ["64", [64], True, 0])
def test_positions_that_are_not_a_positive_int_are_left_to_from_pretrained_to_name(value, tmp_path):
    # pretrained_positions returned "64" or [64] as they were (QA training compared them with data.max_len: a
    # TypeError traceback), and a maskattn config.json's "config": "x" was an AttributeError
    from maskattn.models.pretrained import pretrained_positions

    _saved("bert", tmp_path)
    assert pretrained_positions(tmp_path) == 64
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tmp_path / "config.json").read_text()),
                                                      "max_position_embeddings": value}))
    assert pretrained_positions(tmp_path) is None
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'config.json'))}: .*max_len"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "maskattn-model", "version": 1, "config": "x"}))
    assert pretrained_positions(tmp_path) is None


def test_a_half_precision_checkpoint_is_fine_tuned_in_float32(tmp_path, caplog):
    # from_pretrained keeps a bf16 checkpoint in bf16 (above); fine-tuning those weights in bf16 loses AdamW's small
    # updates (an update below 2**-8 of a weight rounds to nothing), so the tasks lift them to float32. The oracle:
    # the checkpoint's own bf16 values, exactly representable in float32.
    from maskattn.tasks import classification

    torch.manual_seed(0)
    _bert().to(torch.bfloat16).save_pretrained(tmp_path)
    cfg = classification.ClassificationConfig()
    cfg.data.pretrained, cfg.data.max_len = str(tmp_path), 64  # the checkpoint's positions (longer is refused)
    with caplog.at_level("INFO", logger="maskattn"):
        model = classification.build_model(cfg, ["neg", "pos"], tok=None)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    stored = from_pretrained(tmp_path, num_labels=2).state_dict()
    assert stored["embed.tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(model.state_dict()["embed.tokens.weight"], stored["embed.tokens.weight"].float())
    assert "weights stored in bfloat16, fine-tuned in float32" in caplog.text
