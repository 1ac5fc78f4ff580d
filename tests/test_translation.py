import gzip
import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import sacrebleu
import torch

from maskattn.cli import main
from maskattn.tasks import translation
from maskattn.tasks.common import read_task, write_task

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"
needs_multi30k = pytest.mark.skipif(not SHARED.is_dir(), reason=f"Multi30k not found at {SHARED}")


def _head(src: Path, dst: Path, n: int) -> Path:
    with gzip.open(src, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    dst.write_text("".join(lines), encoding="utf-8")
    return dst


@needs_multi30k
def test_train_translate_evaluate_and_resume_from_the_cli(tmp_path, capsys):
    files = {name: _head(SHARED / f"{name}.gz", tmp_path / name, 300 if name.startswith("train") else 20)
             for name in ("train.de", "train.en", "val.de", "val.en")}
    out = tmp_path / "run"
    args = ["train", "translation", "--train-src", str(files["train.de"]), "--train-tgt", str(files["train.en"]),
            "--valid-src", str(files["val.de"]), "--valid-tgt", str(files["val.en"]), "--out", str(out),
            "--set", "model.d_model=32", "--set", "model.d_ff=64", "--set", "model.num_encoder_layers=1",
            "--set", "model.num_decoder_layers=1", "--set", "data.vocab_size=300", "--set", "train.steps=6",
            "--set", "train.checkpoint_every=3", "--set", "train.warmup=2",
            "--set", "train.log_every=1", "--set", "train.progress=false",
            "--set", "decode.beam_size=2",
            # evaluations at steps 3 and 6, chrF picks the best: here step 3's (0.58 against 0.21), not the last
            "--set", "train.eval_every=3", "--set", "train.metric=chrf", "--set", "train.higher_is_better=true"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"bleu", "chrf", "exact_match", "train_seconds"} <= set(result)
    assert (out / "curves.png").exists() and (out / "metrics.jsonl").exists()

    # prediction from arguments, twice (deterministic), and after a reload
    sentence = "Ein Mann fährt Fahrrad."
    assert main(["translate", str(out / "model"), sentence]) == 0
    first = capsys.readouterr().out
    copy = shutil.copytree(out / "model", tmp_path / "copy")
    assert main(["translate", str(copy), sentence]) == 0
    assert capsys.readouterr().out == first and first.count("\n") == 1
    # a new model never translates to nothing; one saved before min_new_tokens existed decodes as it did
    assert translation.load(out / "model")[2].min_new_tokens == 1
    with pytest.raises(SystemExit) as refused:  # argparse refuses it, naming the flag typed
        main(["translate", str(out / "model"), sentence, "--min-new-tokens", "-1"])
    assert refused.value.code == 2 and "--min-new-tokens" in capsys.readouterr().err
    model, tok, _ = translation.load(out / "model")
    settings = read_task(out / "model")
    del settings["decode"]["min_new_tokens"]
    model.save(tmp_path / "older", tokenizer=tok)
    write_task(tmp_path / "older", settings)
    assert translation.load(tmp_path / "older")[2].min_new_tokens == 0

    assert main(["evaluate", str(out / "model"), "--data", str(files["val.de"]), "--ref", str(files["val.en"])]) == 0
    printed = capsys.readouterr()
    scores = json.loads(printed.out)
    assert "translate" in printed.err and "/20" in printed.err  # a progress bar of the 20 sentences on stderr
    # the oracle: sacrebleu itself on what `maskattn translate` writes for the same sources, line by line
    assert main(["translate", str(out / "model"), *files["val.de"].read_text().splitlines()]) == 0
    hyps, refs = capsys.readouterr().out.splitlines(), files["val.en"].read_text().splitlines()
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    # the hypotheses file beside the run, and sacreBLEU's signatures
    assert Path(scores["hypotheses"]) == (out / "hypotheses.val.de.txt").resolve()
    assert Path(scores["hypotheses"]).read_text().splitlines() == hyps
    assert "tok:13a" in scores["bleu_signature"] and "nrefs:1" in scores["bleu_signature"]
    assert scores["chrf_signature"].startswith("nrefs:1|")
    # what training printed is the exported (best) model's evaluation, not the last one's (session twenty-one);
    # validation during training decodes greedily
    assert main(["evaluate", str(out / "model"), "--data", str(files["val.de"]), "--ref", str(files["val.en"]),
                 "--beam", "1"]) == 0
    greedy = json.loads(capsys.readouterr().out)
    assert (greedy["bleu"], greedy["chrf"]) == pytest.approx((result["bleu"], result["chrf"]), abs=1e-9)
    assert result["step"] == 3
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step": result["step"], "eval_chrf": result["chrf"]}.items() <= next(
        r for r in logged if r.get("step") == result["step"] and "eval_chrf" in r).items()

    # n-best: N lines 'score<TAB>text' per sentence, best first, the first being the 1-best translation
    assert main(["translate", str(out / "model"), sentence, sentence, "--nbest", "3", "--beam", "2"]) == 0
    blocks = capsys.readouterr().out.rstrip("\n").split("\n\n")
    assert len(blocks) == 2 and blocks[0] == blocks[1]
    nbest = [line.split("\t") for line in blocks[0].splitlines()]
    assert len(nbest) == 3 and [float(s) for s, _ in nbest] == sorted((float(s) for s, _ in nbest), reverse=True)
    assert main(["translate", str(out / "model"), sentence, "--beam", "3"]) == 0
    assert capsys.readouterr().out.strip() == nbest[0][1].strip()

    # checkpoint averaging: the last two checkpoints (steps 3 and 6) of this run
    assert main(["average", str(out), "--last", "2", "--out", str(tmp_path / "avg")]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "avg"
    assert main(["translate", str(tmp_path / "avg"), sentence]) == 0 and capsys.readouterr().out.count("\n") == 1

    # resuming a finished run to more steps continues from its last checkpoint
    assert main([*args[:-4], "--set", "train.steps=8", "--resume"]) == 0
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))


def _reversals(path: Path, n: int, rng: random.Random) -> Path:
    words = ["".join(rng.choice("abcdef") for _ in range(rng.randint(2, 4))) for _ in range(n)]
    path.write_text("".join(f"{w}\t{w[::-1]}\n" for w in words))
    return path


def test_a_tiny_model_learns_to_reverse_words(tmp_path, capsys):
    """Reversing 2-4 letters of 6 is learnt well above chance (about 0.5% exact) in 100 steps: a broken
    batch, loss, decoder or un-sorting of the length-sorted translation batches keeps it near zero."""
    rng = random.Random(0)
    train, test = _reversals(tmp_path / "train.tsv", 2000, rng), _reversals(tmp_path / "test.tsv", 50, rng)
    out = tmp_path / "run"
    settings = ['data.tokenizer="chars"', "data.max_tokens=400", "model.d_model=32", "model.d_ff=64",
                "model.num_heads=2", "model.num_encoder_layers=1", "model.num_decoder_layers=1", "model.dropout=0.0",
                "model.norm_first=true", "label_smoothing=0.0", "decode.beam_size=1", "train.steps=100",
                "train.warmup=10", "train.lr=3e-3", "train.progress=false"]
    sets = [arg for setting in settings for arg in ("--set", setting)]
    assert main(["train", "translation", "--train-src", str(train), "--out", str(out), *sets]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out / "model"), "--data", str(test)]) == 0
    scores = json.loads(capsys.readouterr().out)
    sources, targets = zip(*(line.split("\t") for line in test.read_text().splitlines()), strict=True)
    assert main(["translate", str(out / "model"), *sources]) == 0
    hyps = capsys.readouterr().out.splitlines()
    exact = 100 * sum(h == t for h, t in zip(hyps, targets, strict=True)) / len(targets)
    assert scores["exact_match"] == pytest.approx(exact) and exact >= 25, (exact, hyps[:10])


def test_bad_setting_is_named(capsys):
    assert main(["train", "translation", "--set", "train.lrr=1"]) == 2
    assert "unknown setting 'train.lrr'" in capsys.readouterr().err
    # found at the first validation, after training (every translation then cut at max_len instead)
    assert main(["train", "translation", "--set", "model.max_len=16", "--set", "decode.min_new_tokens=17",
                 "--show-config"]) == 2
    assert "decode.min_new_tokens (17) must be <= model.max_len (16)" in capsys.readouterr().err


def test_show_config_lists_settings(capsys):
    assert main(["train", "translation", "--show-config", "--set", "train.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "train.lr = 0.001" in out and "model.d_model = 256" in out and "data.tokenizer = 'bpe'" in out


@pytest.fixture
def tiny_translator(tmp_path, capsys):
    train = _reversals(tmp_path / "train.tsv", 40, random.Random(0))
    out = tmp_path / "tiny"
    settings = ['data.tokenizer="chars"', "model.d_model=16", "model.d_ff=32", "model.num_heads=2",
                "model.num_encoder_layers=1", "model.num_decoder_layers=1", "model.max_len=16", "train.steps=2",
                "train.progress=false"]
    assert main(["train", "translation", "--train-src", str(train), "--out", str(out),
                 *[arg for s in settings for arg in ("--set", s)]]) == 0
    capsys.readouterr()
    return out / "model"


def test_translate_input_longer_than_max_len_is_an_error_not_a_silent_cut(tiny_translator, capsys):
    # on main the input was cut to max_len tokens without a word (one case gave an empty output)
    assert main(["translate", str(tiny_translator), "abc", "abcdef" * 5]) == 2
    assert "sentence 2 has 30 tokens, more than the model's max_len (16)" in capsys.readouterr().err


def test_the_batches_compress_scores_with_are_the_plain_cross_entropy_without_label_smoothing(tiny_translator,
                                                                                                tmp_path):
    # compress (head importance, fine-tuning) reads translation.training_batches, documented as "no label
    # smoothing"; giving it the training default 0.1 passed the suite. Oracle: the summed negative log-likelihood of
    # every non-pad target, by hand from the model's logits.
    model, tok, _ = translation.load(tiny_translator)
    batches = translation.training_batches(tiny_translator, [str(tmp_path / "train.tsv")], 256)
    batch = batches.collate(list(range(6)))
    with torch.no_grad():
        logits = model(batch["src"], batch["tgt_in"], src_lengths=batch["src_lengths"],
                       tgt_lengths=batch["tgt_lengths"]).double()  # (B, L, V)
        nll = -logits.log_softmax(-1).gather(-1, batch["tgt_out"].unsqueeze(-1)).squeeze(-1)  # (B, L)
        want = nll[batch["tgt_out"] != tok.pad_id].sum()
        got = batches.loss(model, batch)
    assert int((batch["tgt_out"] != tok.pad_id).sum()) == batch["num_targets"]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_evaluate_names_the_file_of_a_sentence_longer_than_max_len(tiny_translator, tmp_path, capsys):
    # "sentence 3 has 30 tokens, ..." named no file: of --data or of --ref?
    src, ref = tmp_path / "long.de", tmp_path / "long.en"
    src.write_text("abc\ncab\n" + "abcdef" * 5 + "\n")
    ref.write_text("cba\nbac\nfedcba\n")
    assert main(["evaluate", str(tiny_translator), "--data", str(src), "--ref", str(ref)]) == 2
    assert f"{src}: sentence 3 has 30 tokens, more than the model's max_len (16)" in capsys.readouterr().err


def test_beam_zero_is_an_error_and_options_may_follow_the_model(tiny_translator, capsys):
    # on main --beam 0 silently meant greedy, and text after an option was refused by argparse
    with pytest.raises(SystemExit) as refused:  # (refused by the flag's argparse type, naming the flag)
        main(["translate", str(tiny_translator), "--beam", "0", "abc"])
    assert refused.value.code == 2
    assert "argument --beam: expected a positive integer, got 0" in capsys.readouterr().err
    assert main(["translate", str(tiny_translator), "--beam", "1", "abc", "cba"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    # --min-new-tokens beyond the model's positions printed translations cut at max_len, without a word
    assert main(["translate", str(tiny_translator), "--min-new-tokens", "17", "abc"]) == 2
    assert ("--min-new-tokens (decode.min_new_tokens) 17: more new tokens than the model's max_len (16) allows"
            in capsys.readouterr().err)
    assert main(["translate", str(tiny_translator), "--min-new-tokens", "16", "--nbest", "2", "abc"]) == 0


def test_evaluate_of_an_empty_file_is_one_error(tiny_translator, tmp_path, capsys):
    # sacrebleu's IndexError traceback
    (tmp_path / "empty.de").write_text("")
    (tmp_path / "empty.en").write_text("")
    assert main(["evaluate", str(tiny_translator), "--data", str(tmp_path / "empty.de"),
                 "--ref", str(tmp_path / "empty.en")]) == 2
    assert "empty.de: no sentences to score" in capsys.readouterr().err


def test_evaluate_writes_its_hypotheses_over_no_input(tiny_translator, tmp_path, capsys):
    # `--hypotheses va.en` replaced the references with the translations, and exited 0
    src, ref = tmp_path / "va.de", tmp_path / "va.en"
    src.write_text("abc\ncab\n")
    ref.write_text("cba\nbac\n")
    for out in (ref, src, tiny_translator / "config.json"):
        assert main(["evaluate", str(tiny_translator), "--data", str(src), "--ref", str(ref),
                     "--hypotheses", str(out)]) == 2
        assert "that would write over the input" in capsys.readouterr().err
    assert ref.read_text() == "cba\nbac\n" and src.read_text() == "abc\ncab\n"
    # a QA flag was ignored without a word
    assert main(["evaluate", str(tiny_translator), "--data", str(src), "--ref", str(ref), "--max-answer", "5"]) == 2
    assert "--max-answer: not read when evaluating a translation model (its flags: " in capsys.readouterr().err


def test_evaluate_computes_bleu_and_chrf_once_each_and_gives_sacrebleus_own_numbers(tiny_translator, tmp_path,
                                                                                       capsys, monkeypatch):
    # evaluate scored BLEU and chrF for the numbers, then again for their signatures
    import subprocess
    import sys

    from sacrebleu.metrics.base import Metric

    src, ref = tmp_path / "va.de", tmp_path / "va.en"
    src.write_text("abc\ncab\nbca\naab\n")
    ref.write_text("cba\nbac\nacb\nbaa\n")
    scored = []
    real = Metric.corpus_score
    monkeypatch.setattr(Metric, "corpus_score", lambda self, *a, **k: scored.append(type(self).__name__)
                        or real(self, *a, **k))
    hyps = tmp_path / "hyps.txt"
    assert main(["evaluate", str(tiny_translator), "--data", str(src), "--ref", str(ref),
                 "--hypotheses", str(hyps)]) == 0
    found = json.loads(capsys.readouterr().out)
    assert sorted(scored) == ["BLEU", "CHRF"]
    # the oracle: sacrebleu's command line on the hypotheses file
    cli = json.loads(subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyps), "-m", "bleu",
                                     "chrf", "-w", "12"], capture_output=True, text=True, check=True).stdout)
    assert [found["bleu"], found["chrf"]] == pytest.approx([m["score"] for m in cli], abs=1e-9)
    assert [found["bleu_signature"], found["chrf_signature"]] == [m["signature"] for m in cli]


@pytest.mark.parametrize("beam", [1, 3])
def test_a_sentence_translates_the_same_whatever_shares_its_batch(tiny_translator, beam):
    # The new-token limit was the batch's longest sentence's: a short sentence batched with a long one ran
    # longer (an untrained model rarely stops) and decode.batch_size changed evaluate's scores.
    import dataclasses

    model, tok, decode = translation.load(tiny_translator)
    decode = dataclasses.replace(decode, beam_size=beam, max_len_ratio=1.0, max_len_extra=1)
    sentences = ["ab", "abcdefabcdef", "cab", "fedcbafedc"]
    alone = translation.translate(model, tok, sentences, dataclasses.replace(decode, batch_size=1))
    together = translation.translate(model, tok, sentences, dataclasses.replace(decode, batch_size=8))
    assert together == alone
    assert len(tok.encode(alone[0])) <= 3  # within its own limit: 2 source tokens * 1.0 + 1
    limit = dataclasses.replace(decode, max_len_ratio=0.0, max_len_extra=0, batch_size=8)
    assert all(len(tok.encode(t)) <= 1 for t in translation.translate(model, tok, sentences, limit))  # at least 1


def test_pairs_longer_than_the_models_positions_are_dropped_not_a_crash(tmp_path, capsys):
    # data.max_len=40 kept pairs of 30 tokens for a model of 16 positions: the first long batch failed mid-run
    rng = random.Random(0)
    long = "".join(rng.choice("abcdef") for _ in range(30))
    train = tmp_path / "train.tsv"
    train.write_text(f"{long}\t{long[::-1]}\n" * 8 + "abc\tcba\n" * 8)
    out = tmp_path / "run"
    settings = ['data.tokenizer="chars"', "data.max_len=40", "model.max_len=16", "model.d_model=16", "model.d_ff=32",
                "model.num_heads=2", "model.num_encoder_layers=1", "model.num_decoder_layers=1", "train.steps=2",
                "train.warmup=1", "train.progress=false"]
    assert main(["train", "translation", "--train-src", str(train), "--out", str(out),
                 *[arg for setting in settings for arg in ("--set", setting)]]) == 0
    assert "8 training pairs" in capsys.readouterr().err
    shorter = [*settings, "model.max_len=64", "data.max_len=20"]
    assert main(["train", "translation", "--train-src", str(train), "--out", str(tmp_path / "short"),
                 *[arg for setting in shorter for arg in ("--set", setting)]]) == 0
    assert "8 training pairs" in (said := capsys.readouterr().err)  # data.max_len drops pairs too, and says so
    assert "8 pairs longer than data.max_len=20 tokens dropped" in said
    assert json.loads((out / "model" / "config.json").read_text())["config"]["max_len"] == 16
    # when no pair fits: "the data plan gave no batch (is the training set empty?)"
    train.write_text(f"{long}\t{long[::-1]}\n" * 8)
    for extra, says in [("model.max_len=16", "none of the 8 training pairs fits model.max_len=16 tokens"),
                        ("data.max_len=5", "none of the 8 training pairs fits data.max_len=5 tokens")]:
        assert main(["train", "translation", "--train-src", str(train), "--out", str(tmp_path / extra),
                     *[arg for setting in [*settings, extra] for arg in ("--set", setting)]]) == 2
        assert says in capsys.readouterr().err


def test_hypotheses_of_a_model_outside_a_run_and_a_missing_ref(tiny_translator, tmp_path, capsys):
    # a model directory outside a run wrote runs/hypotheses.src.txt.txt (doubled suffix, in a shared parent);
    # a source file without --ref said only "expected 'source<TAB>target'"
    import shutil

    outside = tmp_path / "soups" / "m"
    shutil.copytree(tiny_translator, outside)
    (tmp_path / "src.txt").write_text("abc\ncab\n")
    (tmp_path / "ref.txt").write_text("cba\nbac\n")
    source, ref = str(tmp_path / "src.txt"), str(tmp_path / "ref.txt")
    assert main(["evaluate", str(outside), "--data", source, "--ref", ref]) == 0
    assert json.loads(capsys.readouterr().out)["hypotheses"] == str(tmp_path / "soups" / "m.hypotheses.src.txt")
    assert main(["evaluate", str(outside), "--data", str(tmp_path / "src.txt")]) == 2
    assert "give their references with --ref" in capsys.readouterr().err


@pytest.mark.parametrize("every", [0.0, 1e9])
def test_translation_progress_into_a_file_is_a_few_plain_lines_not_a_bar(tiny_translator, monkeypatch, caplog,
                                                                           fake_stderr, every):
    # `maskattn evaluate 2> log`: tqdm rewrote its bar there after a carriage return for every batch (training had
    # stopped doing so); the rule is training's: plain lines, the first at once, then at most one per interval, and
    # the last
    import dataclasses

    from maskattn import training

    model, tok, decode = translation.load(tiny_translator)
    stream = fake_stderr(tty=False)
    monkeypatch.setattr(training, "PLAIN_PROGRESS_EVERY", every)
    with caplog.at_level(logging.INFO, logger="maskattn"):
        translation.translate(model, tok, ["ab", "abc", "ba", "cab", "fed"], dataclasses.replace(decode, batch_size=2),
                              progress=True)
    assert "\r" not in stream.text
    done = [2, 4, 5] if not every else [2, 5]
    lines = stream.text.splitlines()
    assert len(lines) == len(done)
    for line, n in zip(lines, done, strict=True):
        assert line.startswith(f"translate: {n}/5 sent, ") and line.endswith(" elapsed")


def test_translation_progress_on_a_terminal_is_a_bar(tiny_translator, caplog, fake_stderr):
    import dataclasses

    model, tok, decode = translation.load(tiny_translator)
    stream = fake_stderr(tty=True)
    with caplog.at_level(logging.INFO, logger="maskattn"):
        translation.translate(model, tok, ["ab", "abc", "ba"], dataclasses.replace(decode, batch_size=2),
                              progress=True)
    assert "\rtranslate:" in stream.text and "/3 [" in stream.text and "elapsed" not in stream.text  # a bar, no lines


def test_evaluate_names_references_written_in_a_form_the_tokenizer_never_outputs(tmp_path, capsys, caplog):
    """A BPE tokenizer reads text through NFKC, so a model's translations are in NFKC; references with decomposed
    accents (NFD, as macOS tools write) were scored as misses without a word. The scores stay sacreBLEU's."""
    import unicodedata

    words = ["caf\u00e9", "th\u00e9", "na\u00efve", "\u00e9t\u00e9"]
    train = tmp_path / "train.tsv"
    train.write_text("".join(f"{w} {v}\t{v} {w}\n" for w in words for v in words))
    out = tmp_path / "run"
    settings = ['data.tokenizer="bpe"', "data.vocab_size=60", "model.d_model=16", "model.d_ff=32",
                "model.num_heads=2", "model.num_encoder_layers=1", "model.num_decoder_layers=1", "train.steps=2",
                "train.progress=false"]
    assert main(["train", "translation", "--train-src", str(train), "--out", str(out),
                 *[arg for s in settings for arg in ("--set", s)]]) == 0
    src, ref = tmp_path / "t.fr", tmp_path / "t.en"
    src.write_text("caf\u00e9 th\u00e9\nna\u00efve caf\u00e9\n\u00e9t\u00e9 th\u00e9\n")
    ref.write_text("th\u00e9 caf\u00e9\n" + unicodedata.normalize("NFD", "caf\u00e9 na\u00efve\n\u00e9t\u00e9 x\n"))
    caplog.clear()
    assert main(["evaluate", str(out / "model"), "--data", str(src), "--ref", str(ref)]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and f"{ref}: 2 of 3 references (first: line 2)" in warned[0] and "NFKC" in warned[0]
    # as the tokenizer writes them (NFC here), with a no-break space, which NFKC rewrites but is no word: no warning
    ref.write_text(unicodedata.normalize("NFC", ref.read_text()).replace("\n", " \u00a0\n"))
    caplog.clear()
    assert main(["evaluate", str(out / "model"), "--data", str(src), "--ref", str(ref)]) == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
