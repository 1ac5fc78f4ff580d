import pytest

from maskattn import metrics


def test_squad_normalisation_follows_the_official_script():
    assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.normalize_answer("an apple, a pear") == "apple pear"
    assert metrics.normalize_answer("Theatre") == "theatre"  # 'the' only as a whole word


def test_squad_normalisation_builds_no_set_per_character(monkeypatch):
    # The punctuation set was built for every character of every answer: SQuAD scoring ran 13x slower
    built = []
    monkeypatch.setattr(metrics, "set", lambda *a: built.append(a) or set(*a), raising=False)
    assert metrics.normalize_answer("The  Eiffel Tower, in Paris!" * 10) == " ".join(["eiffel tower in paristhe"] * 9
                                                                                   + ["eiffel tower in paris"])
    assert len(built) <= 1

def test_squad_hand_computed():
    # prediction "the big red dog" vs gold "a red dog": tokens [big, red, dog] vs [red, dog]
    assert metrics.squad_exact("the big red dog", "a red dog") == 0.0
    assert metrics.squad_f1("the big red dog", "a red dog") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert metrics.squad_exact("Denver Broncos.", "denver broncos") == 1.0
    assert metrics.squad_f1("the", "a") == 0.0  # both normalise to nothing: no overlap
    # max over gold answers, averaged over questions; a missing prediction counts as zero
    golds = {"q1": ["Broncos", "Denver Broncos"], "q2": ["1990"], "q3": ["x"]}
    scores = metrics.squad({"q1": "Denver Broncos", "q2": "in 1990"}, golds)
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


def test_squad_refuses_gold_answers_given_as_one_string_or_none():
    # {"q": "Paris"} was scored as the answers "P", "a", "r", "i", "s" (a right prediction scored 0), and a
    # question without answers ended in "max() arg is an empty sequence"
    with pytest.raises(TypeError, match=r"golds\['q'\]: a list of gold answers, not the one string 'Paris'"):
        metrics.squad({"q": "Paris"}, {"q": "Paris"})
    with pytest.raises(ValueError, match=r"golds\['q2'\]: no gold answer"):
        metrics.squad({"q1": "x", "q2": "y"}, {"q1": ["x"], "q2": []})
    assert metrics.squad({"q": "Paris"}, {"q": ("Paris",)}) == {"exact_match": 100.0, "f1": 100.0}


def test_classification_metrics():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    assert metrics.accuracy(pred, gold) == 0.6
    # F1: a = 2*1/(2+1+1) = 0.5, b = 2*2/(4+1+0) = 0.8, c = 0
    assert metrics.macro_f1(pred, gold) == pytest.approx((0.5 + 0.8 + 0) / 3)


def test_bleu_and_chrf_use_sacrebleu():
    refs = ["a man is riding a red bike .", "two dogs play in the snow ."]
    assert metrics.bleu(refs, refs) == pytest.approx(100.0)
    assert metrics.chrf(refs, refs) == pytest.approx(100.0)
    assert 0 < metrics.bleu(["a man is riding a bike .", "two dogs in the snow ."], refs) < 100
    with pytest.raises(ValueError, match=r"predictions \(1\) and references \(2\)"):
        metrics.bleu(refs[:1], refs)


def test_empty_corpora_strings_and_huge_losses_are_named_or_bounded():
    # sacrebleu raised IndexError on an empty corpus; a string was scored as one sentence per character;
    # math.exp overflowed on a diverged model's loss
    for score in (metrics.bleu, metrics.chrf):
        with pytest.raises(ValueError, match="no sentences to score"):
            score([], [])
        with pytest.raises(TypeError, match="not one string"):
            score("abc", "abd")
    assert metrics.perplexity(1000.0) == float("inf") and metrics.perplexity(0.0) == 1.0


def test_scores_of_nothing_are_refused_not_zero():
    # sacrebleu_signatures([], []) was sacrebleu's IndexError, and a string its characters; accuracy, macro-F1 and
    # SQuAD EM/F1 of no examples were 0.0, a score that reads as a model getting everything wrong
    with pytest.raises(ValueError, match="no sentences to score"):
        metrics.sacrebleu_signatures([], [])
    with pytest.raises(TypeError, match="not one string"):
        metrics.sacrebleu_signatures("abc", "abd")
    for score, says in ((metrics.accuracy, "accuracy"), (metrics.macro_f1, "macro-F1"),
                        (lambda p, g: metrics.squad(dict(p), dict(g)), "SQuAD exact match and F1")):
        with pytest.raises(ValueError, match=f"no examples to score: {says} is undefined on an empty set"):
            score([], [])
    assert metrics.accuracy(["a"], ["a"]) == 1.0 and metrics.squad({}, {"q": ["x"]}) == {"exact_match": 0.0, "f1": 0.0}


def test_macro_f1_reads_its_inputs_once_whatever_the_number_of_labels():
    # Three passes over every example per gold label: 400 labels on 20,000 examples took 2.3 s an evaluation
    sklearn_metrics = pytest.importorskip("sklearn.metrics")

    class Counted(list):
        passes = 0

        def __iter__(self):
            Counted.passes += 1
            return super().__iter__()

    gold = Counted(f"l{(i * 7) % 60}" for i in range(600))
    pred = Counted(f"l{(i * 11) % 70}" if i % 3 else g for i, g in enumerate(gold))
    Counted.passes = 0
    score = metrics.macro_f1(pred, gold)
    assert Counted.passes <= 4  # not a pass per label
    labels = sorted(set(gold))
    assert score == pytest.approx(sklearn_metrics.f1_score(list(gold), list(pred), labels=labels, average="macro",
                                                           zero_division=0))


def test_chrf_reads_hypotheses_first_and_weighs_recall_over_precision():
    # chrF's beta = 2 counts recall twice as much as precision, so it is not symmetric: a hypothesis that says a
    # part of the reference (all precise, little recall) scores below one that says the reference and more
    import sacrebleu

    part, whole = ["the cat"], ["the cat sat on the mat today"]
    assert metrics.chrf(part, whole) < metrics.chrf(whole, part)
    assert metrics.chrf(part, whole) == pytest.approx(sacrebleu.sentence_chrf(part[0], whole).score)
    assert metrics.sacrebleu_scores(part, whole)["chrf"] == pytest.approx(metrics.chrf(part, whole))
