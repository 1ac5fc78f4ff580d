"""Task metrics: BLEU and chrF (sacrebleu), accuracy and macro-F1, SQuAD exact match and F1, perplexity."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU of detokenised text with sacrebleu's defaults (13a tokenisation), 0-100."""
    import sacrebleu

    _same_length(hypotheses, references)
    _some(hypotheses, references)
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults), 0-100."""
    import sacrebleu

    _same_length(hypotheses, references)
    _some(hypotheses, references)
    return sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score


def sacrebleu_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float | str]:
    """:func:`bleu` and :func:`chrf` with sacreBLEU's signatures, each score computed once:
    ``{"bleu", "chrf", "bleu_signature", "chrf_signature"}``."""
    from sacrebleu.metrics import BLEU, CHRF

    _same_length(hypotheses, references)
    _some(hypotheses, references)
    found: dict[str, float | str] = {}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        found[name] = metric.corpus_score(list(hypotheses), [list(references)]).score
        found[f"{name}_signature"] = str(metric.get_signature())
    return found


def sacrebleu_signatures(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, str]:
    """sacreBLEU's signatures of :func:`bleu` and :func:`chrf` (what to print beside the scores so that
    others can reproduce them), e.g. ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.4.3``."""
    found = sacrebleu_scores(hypotheses, references)
    return {"bleu_signature": str(found["bleu_signature"]), "chrf_signature": str(found["chrf_signature"])}


def accuracy(predicted: Sequence, gold: Sequence) -> float:
    _same_length(predicted, gold)
    _any(gold, "accuracy")
    return sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)


def macro_f1(predicted: Sequence, gold: Sequence) -> float:
    """Unweighted mean over the gold labels of per-label F1."""
    _same_length(predicted, gold)
    _any(gold, "macro-F1")
    # tallied in one pass (three passes per label made it grow with labels x examples)
    tp, fp, fn = Counter(), Counter(), Counter()
    for p, g in zip(predicted, gold, strict=True):
        if p == g:
            tp[g] += 1
        else:
            fp[p], fn[g] = fp[p] + 1, fn[g] + 1
    scores = []
    for label in sorted(set(gold), key=str):
        scores.append(2 * tp[label] / (2 * tp[label] + fp[label] + fn[label]) if tp[label] else 0.0)
    return sum(scores) / max(1, len(scores))


def perplexity(mean_nll: float) -> float:
    """exp of the mean negative log-likelihood per token (nats); inf past what a float holds (a diverged model)."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


# --- SQuAD v1.1, with the official evaluation script's normalisation ---------------------------------
_PUNCTUATION = frozenset(string.punctuation)  # built once (a set per character made scoring 13x slower)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised answers."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = Counter(pred) & Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad(predictions: dict[str, str], golds: dict[str, Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 (0-100), each the max over a question's gold answers, averaged over questions.

    Questions without a prediction count as 0, as in the official script.

    Raises:
        TypeError: a question's answers are one string (its characters would be the answers).
        ValueError: no questions, or a question without answers (its best answer is undefined).
    """
    _any(golds, "SQuAD exact match and F1")
    for qid, answers in golds.items():
        if isinstance(answers, str):
            raise TypeError(f"golds[{qid!r}]: a list of gold answers, not the one string {answers!r}")
        if not len(answers):
            raise ValueError(f"golds[{qid!r}]: no gold answer; SQuAD scores a question by its best gold answer")
    em = f1 = 0.0
    for qid, answers in golds.items():
        if qid in predictions:
            em += max(squad_exact(predictions[qid], a) for a in answers)
            f1 += max(squad_f1(predictions[qid], a) for a in answers)
    return {"exact_match": 100 * em / len(golds), "f1": 100 * f1 / len(golds)}


def _some(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if isinstance(hypotheses, str) or isinstance(references, str):  # read as one sentence per character
        raise TypeError("hypotheses and references must be sequences of sentences, not one string")
    if not len(hypotheses):  # sacrebleu fails inside with an IndexError
        raise ValueError("no sentences to score: BLEU and chrF are undefined on an empty corpus")


def _any(gold: Sequence | dict, metric: str) -> None:
    if not len(gold):  # 0.0 would read as a model that got everything wrong
        raise ValueError(f"no examples to score: {metric} is undefined on an empty set")


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"predictions ({len(a)}) and references ({len(b)}) differ in number")
