import re

import pytest

from maskattn.tokenization import Tokenizer

TEXTS = ["Ein Mann fährt ein rotes Fahrrad.", "Zwei Hunde spielen im Schnee.", "Ein Kind lacht."] * 20


def test_bpe_round_trip_and_save_load(tmp_path):
    tok = Tokenizer.train_bpe(TEXTS, vocab_size=120, min_frequency=1)
    ids = tok.encode("Ein Hund spielt.", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "Ein Hund spielt."
    again = Tokenizer.load(tok.save(tmp_path))
    assert again.encode("Zwei Kinder lachen.") == tok.encode("Zwei Kinder lachen.")
    assert (again.pad_id, again.eos_id) == (tok.pad_id, tok.eos_id) == (0, 3)


def test_chars_are_one_token_each_and_deterministic():
    tok = Tokenizer.train_chars(["hello\nworld", "o w"])
    assert tok.vocab_size == 4 + len(set("hello\nworld "))
    ids = tok.encode("hello world\n")
    assert len(ids) == len("hello world\n") and tok.decode(ids) == "hello world\n"
    assert tok.encode("z") == [tok.unk_id]
    assert Tokenizer.train_chars([" dlrow\nolleh"]).encode("hold") == tok.encode("hold")


def test_decode_stops_at_eos():
    tok = Tokenizer.train_chars(["abc"])
    assert tok.decode([*tok.encode("ab"), tok.eos_id, *tok.encode("c")]) == "ab"


@pytest.mark.parametrize("kind", ["chars", "bpe"])
def test_special_token_strings_in_a_text_are_text(kind):
    texts = ["say </s> then <s> more <pad> and <unk>"] * 20
    tok = Tokenizer.train_chars(texts) if kind == "chars" else Tokenizer.train_bpe(texts, vocab_size=80)
    ids = tok.encode(texts[0], bos=True, eos=True)
    specials = {tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id}
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and not specials & set(ids[1:-1])
    assert tok.decode(ids).replace(" ", "") == texts[0].replace(" ", "")  # not cut at the literal "</s>"


def test_a_continuation_reads_as_it_does_after_its_prefix():
    # decoded alone, a BPE text drops its first token's leading space: "to" + "be" instead of "to be"
    from maskattn.tokenization import decode_continuation

    tok = Tokenizer.train_bpe(["to be, or not to be: that is the question"] * 50, vocab_size=60)
    ids = tok.encode("to be, or not")
    before, after = ids[:1], ids[1:]
    assert not tok.backend.decode(after).startswith(" ")
    assert tok.backend.decode(before) + decode_continuation(tok.backend.decode, before, after) == "to be, or not"


def test_a_tokenizer_without_known_special_tokens_is_named(tmp_path, capsys):
    # `train classification --pretrained DIR` with a GPT-2 style tokenizer.json: "tokenizer has no complete set of
    # special tokens; ..." without the file
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from maskattn.cli import main

    HFTokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1}, unk_token="<|endoftext|>")).save(
        str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'tokenizer.json'))}: tokenizer has no "
                                         r"complete set of special tokens; expected one of"):
        Tokenizer.load(tmp_path)
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\t0\nb\t1\n")
    assert main(["train", "classification", "--train", str(tmp_path / "train.tsv"), "--set",
                 f"data.embeddings={tmp_path}", "--out", str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'tokenizer.json'}: tokenizer has no complete set" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    # one text given as a str trained on each character as a text of its own: no merges, silently
    ({"texts": "to be or not to be " * 50}, r"texts must be an iterable of texts, got a str"),
    ({"vocab_size": -5}, r"vocab_size must be an int >= 4 \(the 4 special tokens\), got -5"),  # was OverflowError
    ({"vocab_size": 2}, r"vocab_size must be an int >= 4 \(the 4 special tokens\), got 2"),
    ({"vocab_size": True}, r"vocab_size must be an int >= 4 \(the 4 special tokens\), got True"),
    ({"vocab_size": 2.5}, r"vocab_size must be an int >= 4 \(the 4 special tokens\), got 2.5"),
    ({"min_frequency": -1}, r"min_frequency must be an int >= 0, got -1"),
])
def test_bpe_training_names_a_bad_argument(kwargs, message):
    args = {"texts": ["to be or not to be"] * 50, "vocab_size": 60, **kwargs}
    with pytest.raises(ValueError, match=rf"^{message}"):
        Tokenizer.train_bpe(**args)
    # the oracle for the str case: the same text in a list learns merges (fewer tokens than characters)
    assert len(Tokenizer.train_bpe(["to be or not to be " * 50], vocab_size=60).encode("to be")) < len("to be")


@pytest.mark.parametrize("task", ["lm", "translation", "classification"])
def test_a_data_vocab_size_below_the_special_tokens_is_refused_by_the_setting(task):
    # data.vocab_size=2 passed the setting's check (>= 1), then trained a vocabulary of every character anyway
    import importlib

    config = importlib.import_module(f"maskattn.tasks.{task}").DataConfig
    with pytest.raises(ValueError, match=r"vocab_size must be an int >= 4, got 3"):
        config(vocab_size=3)
    assert config(vocab_size=4).vocab_size == 4


def test_encode_batch_puts_bos_and_eos_where_encode_does():
    tok = Tokenizer.train_chars(["hello world", "abc"])
    texts = ["he", "abc cab", ""]
    for bos, eos in ((True, False), (False, True), (True, True), (False, False)):
        assert tok.encode_batch(texts, bos=bos, eos=eos) == [tok.encode(t, bos=bos, eos=eos) for t in texts]
    assert tok.encode_batch(["a"], bos=True)[0][0] == tok.bos_id != tok.eos_id


def test_character_ids_follow_the_characters_sorted_order():
    # the ids are deterministic only if they are sorted: a set's order changes with the process's hash seed
    letters = "qwertyuiopasdfghjklzxcvbnm"
    tok = Tokenizer.train_chars([letters, letters.upper()])
    vocab = tok.backend.get_vocab()
    chars = sorted(set(letters + letters.upper()))
    assert [vocab[c] for c in chars] == list(range(4, 4 + len(chars)))  # after the four special tokens
