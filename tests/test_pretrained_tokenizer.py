"""The tokenizer of a Hugging Face directory through from_pretrained, against transformers' AutoTokenizer (the
oracle): transformers 5's BertTokenizer, GPT2Tokenizer and LlamaTokenizer rebuild tokenizer.json's normalizer and
pre-tokenizer from tokenizer_config.json's settings; those are applied, or a warning names them. Tiny tokenizers
trained here with the ``tokenizers`` library and saved with transformers; no downloads."""

import json
import re
import shutil

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from maskattn import from_pretrained
from maskattn.io import FormatError

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers not installed: pip install "
                                   "'maskattn[hf]'")

CORPUS = ["The café served crème brûlée to naïve Zoë.", "東京は日本の首都です。我爱北京天安门。",
          "Hello world, hello there. Ünïcödé ÀÉÎÕÜ ß", "Numbers 12345 and   spaces\ttabs\nnewlines."] * 5
TEXTS = ["The café served crème brûlée.", "東京は日本の首都です", "  leading and trailing  ", "Ünïcödé ÀÉÎ",
         "unknown zzzq words ☃", "[CLS] hello [SEP] <|endoftext|> <s> </s>", ""]
SIZES = dict(vocab_size=300, max_position_embeddings=64)


def _gpt2():
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder, t.post_processor = decoders.ByteLevel(), processors.ByteLevel(trim_offsets=False)
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2,
                                                                 n_positions=64))
    return model, transformers.GPT2TokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>",
                                                 eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def _llama():  # the layout transformers 4 converted SentencePiece Llama tokenizers to (Llama 2, TinyLlama)
    t = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300 + 256, special_tokens=specials,
                                                      show_progress=False))
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    config = transformers.LlamaConfig(vocab_size=600, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config), transformers.PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _bert():
    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None)
    t.pre_tokenizer, t.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    t.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    t.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                              ("[SEP]", 3)])
    model = transformers.BertModel(transformers.BertConfig(**SIZES, hidden_size=16, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=24))
    return model, transformers.BertTokenizerFast(tokenizer_object=t)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    for name, build in {"gpt2": _gpt2, "llama": _llama, "bert": _bert}.items():
        model, tokenizer = build()
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def _variant(saved, tmp_path, name, settings, edit=None):
    """A copy of the saved ``name`` with ``settings`` in its tokenizer_config.json, ``edit`` applied to the JSON of
    its tokenizer.json."""
    directory = tmp_path / name
    shutil.copytree(saved / name, directory)
    for file, change in [("tokenizer_config.json", lambda c: c.update(settings)), ("tokenizer.json", edit)]:
        if change is not None:
            content = json.loads((directory / file).read_text())
            change(content)
            (directory / file).write_text(json.dumps(content))
    return directory


def _differences(directory):
    """The texts that AutoTokenizer encodes (or decodes back) other than from_pretrained's tokenizer."""
    transformers.logging.set_verbosity_error()
    auto, ours = transformers.AutoTokenizer.from_pretrained(directory), from_pretrained(directory).tokenizer
    differ = []
    for text in TEXTS:
        want, got = auto(text)["input_ids"], ours.encode(text).ids
        if want != got or auto.decode(want, skip_special_tokens=True) != ours.decode(got, skip_special_tokens=True):
            differ.append(text)
    return differ


@pytest.mark.parametrize("name, settings", [
    ("llama", {}),  # tokenizer_class TokenizersBackend: tokenizer.json as written
    ("llama", {"tokenizer_class": "LlamaTokenizer"}),  # Metaspace prepending to the first piece only
    ("llama", {"tokenizer_class": "LlamaTokenizerFast", "legacy": False, "add_prefix_space": False}),
    ("llama", {"tokenizer_class": "LlamaTokenizer", "legacy": True}),  # prepending to every piece
    ("gpt2", {"tokenizer_class": "LlamaTokenizer"}),  # a ByteLevel tokenizer.json: AutoTokenizer reads it as written
    ("gpt2", {"add_prefix_space": True}),
    ("bert", {"do_lower_case": False}),
    ("bert", {"tokenize_chinese_chars": False}),
    ("bert", {"strip_accents": False}),
    ("bert", {"tokenizer_class": "PreTrainedTokenizerFast", "do_lower_case": False}),  # as written: ignored
])
def test_tokenizer_config_settings_encode_as_autotokenizer_does(name, settings, saved, tmp_path, caplog):
    directory = _variant(saved, tmp_path, name, settings)
    with caplog.at_level("WARNING", logger="maskattn"):
        assert _differences(directory) == []
    assert "tokenizer_config.json" not in caplog.text  # applied, so nothing to warn of


@pytest.mark.parametrize("name, settings, edit, message", [
    ("bert", {"do_lower_case": False},
     lambda t: t.update(normalizer={"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "Lowercase"}]}),
     "do_lower_case=False, tokenize_chinese_chars=True, strip_accents=None: transformers' BertTokenizer applies "
     "these over tokenizer.json, whose normalizer is Sequence, not a BertNormalizer"),
    ("gpt2", {"add_prefix_space": True},
     lambda t: t.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [t["pre_tokenizer"]]}),
     "add_prefix_space=True: transformers' GPT2Tokenizer applies this over tokenizer.json, whose pre-tokenizer is "
     "Sequence, not a ByteLevel"),
    ("llama", {"tokenizer_class": "LlamaTokenizer"}, lambda t: t["model"].update(byte_fallback=False),
     "tokenizer_class='LlamaTokenizer': transformers' LlamaTokenizer applies this over tokenizer.json, whose model "
     r"is a BPE \(byte_fallback=False, fuse_unk=True\)"),
])
def test_tokenizer_config_settings_it_cannot_apply_are_warned_of(name, settings, edit, message, saved, tmp_path,
                                                                 caplog):
    directory = _variant(saved, tmp_path, name, settings, edit)
    with caplog.at_level("WARNING", logger="maskattn"):
        assert _differences(directory)  # AutoTokenizer does encode some text otherwise: the warning is due
    assert len(caplog.records) == 1
    assert f"{directory / 'tokenizer_config.json'}: " in caplog.text
    assert re.search(message + r".*the encoding may differ from transformers'", caplog.text)


@pytest.mark.parametrize("name, key", [("bert", "do_lower_case"), ("bert", "tokenize_chinese_chars"),
                                       ("gpt2", "add_prefix_space")])
def test_a_tokenizer_setting_that_is_not_a_bool_is_named(name, key, saved, tmp_path):
    directory = _variant(saved, tmp_path, name, {key: "no"})
    with pytest.raises(TypeError):  # transformers' BertNormalizer / ByteLevel refuse it too, less clearly
        transformers.AutoTokenizer.from_pretrained(directory)
    with pytest.raises(FormatError, match=rf"tokenizer_config\.json: {key} must be true or false, got 'no'"):
        from_pretrained(directory)


def test_a_llama_tokenizer_config_without_legacy_prepends_to_the_first_piece_as_autotokenizer_does(saved, tmp_path):
    # "legacy" absent, not null (configs written by hand or by older tools): a piece after a special token gets no
    # "▁" ("x <s>y": "y"), as AutoTokenizer reads it (the oracle); "always" would prepend it to every piece
    directory = _variant(saved, tmp_path, "llama", {"tokenizer_class": "LlamaTokenizer"})
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("legacy", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    transformers.logging.set_verbosity_error()
    auto, ours = transformers.AutoTokenizer.from_pretrained(directory), from_pretrained(directory).tokenizer
    for text in ["x <s>y", "a </s>b c", *TEXTS]:
        assert ours.encode(text).ids == auto(text)["input_ids"], text
