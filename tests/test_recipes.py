import random
import re

import pytest
import torch
from recipes import squad_articles, sst2_sentences

from maskattn.models import EncoderConfig, EncoderModel
from maskattn.tasks.classification import copy_word_vectors, drop_tokens


def test_sentence_split_holds_out_whole_sentences_and_their_phrases():
    rows = [("a good film", "1"), ("good film", "1"), ("film", "1"), ("a bad plot", "0"), ("bad plot", "0"),
            ("bad", "0"), ("good film", "1"), ("a good film .", "1"), ("plot", "0")]
    # full sentences: rows inside no other row ("a good film" is inside "a good film .")
    unique = list(dict.fromkeys(rows))
    assert sorted(unique[i][0] for i in sst2_sentences.sentences(unique)) == ["a bad plot", "a good film ."]
    for seed in range(4):
        train, valid = sst2_sentences.split(rows, 1, seed=seed)
        assert len(valid) == 1
        held = f" {valid[0][0]} "
        assert all(f" {t} " not in held for t, _ in train)  # nothing inside a held-out sentence trains
        kept = {t for t, _ in rows if f" {t} " not in held}
        assert {t for t, _ in train} == kept and len(train) == len(kept)  # the rest trains, duplicates once
    # word-bounded: "art" is not inside "heart"
    assert len(sst2_sentences.sentences([("art", "1"), ("heart", "1")])) == 2


def test_word_dropout_keeps_the_ends_and_drops_at_its_rate():
    torch.manual_seed(0)
    ids = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 2, 0, 0, 0]])
    lengths = torch.tensor([5, 3])
    same, n = drop_tokens(ids, lengths, 0.0, 0)
    assert torch.equal(same, ids[:, :5]) and torch.equal(n, lengths)
    long = torch.tensor([[1, *range(10, 1010), 2]])
    out, n = drop_tokens(long, torch.tensor([1002]), 0.3, 0)
    kept = out[0, 1 : n[0] - 1]
    assert out[0, 0] == 1 and out[0, n[0] - 1] == 2
    assert 0.65 < len(kept) / 1000 < 0.75 and torch.all(kept[1:] > kept[:-1])  # order kept
    out, n = drop_tokens(ids, lengths, 0.999, 0)
    assert n.tolist() == [3, 3] and out[0, 1].item() in (5, 6, 7) and out[1].tolist() == [1, 8, 2]


def test_word_vectors_from_a_pretrained_encoder_start_a_new_model(tmp_path):
    torch.manual_seed(0)
    source = EncoderModel(EncoderConfig.preset("tiny"))
    source.save(tmp_path / "enc")
    model = EncoderModel(EncoderConfig.preset("tiny", num_layers=1, num_labels=2))
    before = model.encoder.layers[0].self_attn.q_proj.weight.clone()
    copy_word_vectors(model, str(tmp_path / "enc"))
    assert torch.equal(model.embed.tokens.weight, source.embed.tokens.weight)
    assert torch.equal(model.encoder.layers[0].self_attn.q_proj.weight, before)  # the rest stays new
    wide = EncoderModel(EncoderConfig.preset("tiny", d_model=64, num_labels=2))
    with pytest.raises(ValueError, match=r"set model.d_model=32"):
        copy_word_vectors(wide, str(tmp_path / "enc"))


def test_frozen_word_vectors_do_not_train(tmp_path):
    from maskattn.tasks.classification import ClassificationConfig, DataConfig, build_model
    from maskattn.tokenization import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.train_chars(["abcdefghij klmnop"])
    source = EncoderModel(EncoderConfig.preset("tiny", vocab_size=tok.vocab_size))
    (tmp_path / "enc").mkdir()
    tok.save(tmp_path / "enc")
    source.save(tmp_path / "enc")
    cfg = ClassificationConfig(data=DataConfig(embeddings=str(tmp_path / "enc"), freeze_embeddings=True, max_len=64),
                               model=EncoderConfig.preset("tiny", num_layers=1))
    model = build_model(cfg, ["0", "1"], tok)
    assert not model.embed.tokens.weight.requires_grad
    assert torch.equal(model.embed.tokens.weight, source.embed.tokens.weight)
    with pytest.raises(ValueError, match=r"needs data\.embeddings"):
        build_model(ClassificationConfig(data=DataConfig(freeze_embeddings=True)), ["0", "1"], tok)


def test_squad_article_split_holds_out_the_last_articles_whole(tmp_path):
    import json

    def article(title, n):
        qas = [{"id": f"{title}{i}", "question": "q"} for i in range(n)]
        return {"title": title, "paragraphs": [{"context": "c", "qas": qas}]}

    doc = {"version": "1.1", "data": [article("a", 2), article("b", 3), article("c", 1)]}
    train, valid = squad_articles.split(doc, 1)
    assert [a["title"] for a in train["data"]] == ["a", "b"] and [a["title"] for a in valid["data"]] == ["c"]
    assert squad_articles.questions(train) == 5 and squad_articles.questions(valid) == 1
    with pytest.raises(ValueError, match=r"--valid 3: expected 1 to 2 articles"):
        squad_articles.split(doc, 3)
    (tmp_path / "in.json").write_text(json.dumps(doc))
    assert squad_articles.main([str(tmp_path / "in.json"), str(tmp_path / "out"), "--valid", "2"]) == 0
    held = json.loads((tmp_path / "out" / "valid.json").read_text())
    assert held["version"] == "1.1" and [a["title"] for a in held["data"]] == ["b", "c"]
    # an article without a title or paragraphs is one the qa task reads (as "" and none): split, not a KeyError
    doc["data"].append({})
    (tmp_path / "in.json").write_text(json.dumps(doc))
    assert squad_articles.main([str(tmp_path / "in.json"), str(tmp_path / "out2"), "--valid", "2"]) == 0
    assert json.loads((tmp_path / "out2" / "valid.json").read_text())["data"] == [article("c", 1), {}]


def _sst2(t):
    """A directory with an SST-2 train.tsv (two full sentences) and dev.tsv (one)."""
    (t / "train.tsv").write_text("sentence\tlabel\na good film\t1\ngood film\t1\na bad plot\t0\n")
    (t / "dev.tsv").write_text("sentence\tlabel\nawful\t0\n")
    return t



def test_sst2_valid_0_trains_on_every_row_and_writes_no_valid_file(tmp_path):
    # results.md's SST-2 round nine runs `sst2_sentences ... runs/sst2-all --valid 0` ("every row, no held-out
    # sentence"); a later check refused 0, so the recorded command stopped with a usage error
    data, out = _sst2(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "valid.tsv").write_text("sentence\tlabel\nstale\t1\n")  # an earlier split's
    assert sst2_sentences.main([str(data), str(out), "--valid", "0"]) == 0
    rows = (out / "train.tsv").read_text().splitlines()
    assert rows[0] == "sentence\tlabel"
    assert sorted(rows[1:]) == ["a bad plot\t0", "a good film\t1", "awful\t0", "good film\t1"]
    assert not (out / "valid.tsv").exists()


@pytest.mark.parametrize("make, message", [
    (lambda t: ([squad_articles, str(t / "missing.json"), str(t / "out")]), r"missing\.json: No such file"),
    (lambda t: ((t / "a.json").write_text("[1]"), [squad_articles, str(t / "a.json"), str(t / "out")])[1],
     r"a\.json: expected a SQuAD v1\.1 document"),
    (lambda t: ((t / "b.json").write_text("{oops"), [squad_articles, str(t / "b.json"), str(t / "out")])[1],
     r"b\.json: Expecting property name"),
    (lambda t: ([sst2_sentences, str(t / "nodata"), str(t / "out")]), r"nodata/train\.tsv: No such file"),
    (lambda t: ((t / "train.tsv").write_bytes(b"sentence\tlabel\n\xff\t1\n"),
                [sst2_sentences, str(t), str(t / "out")])[1], r"train\.tsv: not UTF-8 text"),
    # articles that are not SQuAD's ended in a traceback (KeyError 'paragraphs' or 'title', TypeError)
    (lambda t: ((t / "c.json").write_text('{"data": [{"paragraphs": [{"context": "c", "qas": [{}]}]}, {}]}'),
                [squad_articles, str(t / "c.json"), str(t / "out")])[1],
     r"c\.json:1: data\[0\]\.paragraphs\[0\]\.qas\[0\]: field 'id' is missing"),
    (lambda t: ((t / "d.json").write_text('{"data": [1, 2]}'), [squad_articles, str(t / "d.json"), str(t / "out")])[1],
     r"d\.json:1: data\[0\]: field 'article' must be a JSON object, got int '1'"),
    (lambda t: ((t / "e.json").write_text('{"data": [{"paragraphs": [{"context": "c"}]}, {"paragraphs": []}]}'),
                [squad_articles, str(t / "e.json"), str(t / "out")])[1],
     r"e\.json:1: data\[0\]\.paragraphs\[0\]: field 'qas' is missing"),
    # a --valid below 0 said "Sample larger than population or is negative"
    (lambda t: [sst2_sentences, str(_sst2(t)), str(t / "out"), "--valid", "-1"],
     r"--valid -1: expected 0 to 3 full sentences \(the data has 3\)"),
    (lambda t: [sst2_sentences, str(_sst2(t)), str(t / "out"), "--valid", "4"],
     r"--valid 4: expected 0 to 3 full sentences \(the data has 3\)"),
])
def test_recipes_name_bad_input_in_one_line(make, message, tmp_path, capsys):
    recipe, *argv = make(tmp_path)
    with pytest.raises(SystemExit) as e:  # argparse's error: status 2, usage and one line, no traceback
        recipe.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert re.search(message, err.strip().splitlines()[-1]), err


def test_hf_baseline_fine_tunes_a_bert_checkpoint_and_scores_its_best(tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="the SST-2 oracle recipe needs transformers")
    from recipes import sst2_hf_baseline

    words = ["good", "bad", "film", "plot", "a", "the", "fine", "awful"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    assert tokenizer("a film good")["input_ids"] == [2, 9, 7, 5, 3]  # words, not [UNK]s
    tokenizer.save_pretrained(tmp_path / "bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    # the label says whether the row ends in "good" or "fine": learnable from the words alone
    rng = random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            cue = rng.choice(["good", "fine", "bad", "awful"])
            text = " ".join([*rng.sample(["a", "the", "film", "plot"], 2), cue])
            out.append(f"{text}\t{int(cue in ('good', 'fine'))}")
        return "sentence\tlabel\n" + "\n".join(out) + "\n"

    for name, n in (("train", 256), ("valid", 64), ("test", 64)):
        (tmp_path / f"{name}.tsv").write_text(rows(n))
    log = sst2_hf_baseline.main([str(tmp_path / "bert"), str(tmp_path / "train.tsv"), str(tmp_path / "valid.tsv"),
                                 "--test", str(tmp_path / "test.tsv"), "--out", str(tmp_path / "out"),
                                 "--lr", "1e-3", "--epochs", "6", "--batch-size", "16", "--eval-every", "16"])
    assert log["steps"] == 96 and [v["step"] for v in log["valid"]] == list(range(16, 97, 16))
    assert log["best"]["valid accuracy"] == max(v["accuracy"] for v in log["valid"]) >= 0.95
    assert log["best"]["test accuracy"] >= 0.95  # the kept checkpoint, not a chance-level one
    assert "valid accuracy" in capsys.readouterr().out and (tmp_path / "out" / "log.json").exists()


def test_recipes_refuse_to_write_over_their_input(tmp_path, capsys):
    # `sst2_sentences DIR DIR` replaced DIR/train.tsv by its own split; `squad_articles OUT/train.json OUT`
    # replaced its input by the input less the held-out articles
    (tmp_path / "sst2").mkdir()
    data = _sst2(tmp_path / "sst2")
    squad = tmp_path / "squad" / "train.json"
    squad.parent.mkdir()
    squad.write_text('{"data": [{"title": "a"}, {"title": "b"}]}')
    before = {p: p.read_bytes() for p in (data / "train.tsv", data / "dev.tsv", squad)}
    for recipe, argv, written in ((sst2_sentences, [str(data), str(data), "--valid", "1"], data / "train.tsv"),
                                  (sst2_sentences, [str(data), f"{data}/./", "--valid", "1"], data / "train.tsv"),
                                  (squad_articles, [str(squad), str(squad.parent)], squad)):
        with pytest.raises(SystemExit) as e:
            recipe.main(argv)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and f"{written} is an input of this recipe; give another output directory" in last
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("rows, message", [
    ("a film\tpos\n", r"train\.tsv:2: label must be 0 or 1 \(SST-2's\), got 'pos'"),  # said: invalid literal for int()
    ("a film\t1\nthe plot\t2\n", r"train\.tsv:3: label must be 0 or 1 \(SST-2's\), got '2'"),  # failed in the loss
    ("", r"train\.tsv: no rows under its header"),  # trained 0 steps, then crashed or reported accuracy -100.0
])
def test_hf_baseline_names_bad_rows_before_loading_a_model(rows, message, tmp_path, capsys):
    pytest.importorskip("transformers", reason="the SST-2 oracle recipe needs transformers")
    from recipes import sst2_hf_baseline

    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + rows)
    (tmp_path / "valid.tsv").write_text("sentence\tlabel\na film\t1\n")
    with pytest.raises(SystemExit) as e:  # before the model (here none) is loaded
        sst2_hf_baseline.main([str(tmp_path / "no-model"), str(tmp_path / "train.tsv"), str(tmp_path / "valid.tsv"),
                               "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and re.search(message, capsys.readouterr().err.strip().splitlines()[-1])


@pytest.mark.parametrize("flag, value, expected", [
    ("--epochs", "0", "a number > 0, got 0.0"),  # trained 0 steps: a crash with --test, else "accuracy -100.0"
    ("--epochs", "nan", "a number > 0, got nan"),
    ("--batch-size", "0", "an int >= 1, got 0"),  # ZeroDivisionError
    ("--eval-every", "0", "an int >= 1, got 0"),  # ZeroDivisionError after the first step
    ("--max-len", "0", "an int >= 1, got 0"),
    ("--lr", "-1", "a number > 0, got -1.0"),
    ("--warmup", "1.5", "a share of the steps in [0, 1], got 1.5"),
])
def test_hf_baseline_refuses_bad_numbers_naming_the_flag(flag, value, expected, tmp_path, capsys):
    pytest.importorskip("transformers", reason="the SST-2 oracle recipe needs transformers")
    from recipes import sst2_hf_baseline

    for name in ("train", "valid"):
        (tmp_path / f"{name}.tsv").write_text("sentence\tlabel\na film\t1\n")
    with pytest.raises(SystemExit) as e:  # before the model (here none) is loaded
        sst2_hf_baseline.main([str(tmp_path / "no-model"), str(tmp_path / "train.tsv"), str(tmp_path / "valid.tsv"),
                               "--out", str(tmp_path / "out"), flag, value])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and f"{flag} must be {expected}" in last, last


def test_hf_baseline_names_a_model_directory_that_is_not_one(tmp_path, capsys):
    # a missing or empty MODEL ended in transformers' traceback about Hub repo ids and internet connections
    pytest.importorskip("transformers", reason="the SST-2 oracle recipe needs transformers")
    from recipes import sst2_hf_baseline

    for name in ("train", "valid"):
        (tmp_path / f"{name}.tsv").write_text("sentence\tlabel\na film\t1\n")
    (tmp_path / "empty").mkdir()
    for model in (tmp_path / "no-model", tmp_path / "empty"):
        with pytest.raises(SystemExit) as e:
            sst2_hf_baseline.main([str(model), str(tmp_path / "train.tsv"), str(tmp_path / "valid.tsv"),
                                   "--out", str(tmp_path / "out")])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and f"{model}: no config.json; expected a BERT checkpoint directory" in last, last
