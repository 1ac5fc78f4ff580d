import json
import math
import re
from pathlib import Path

import pytest
import torch

from maskattn.cli import main
from maskattn.models import DecoderLM, DecoderLMConfig
from maskattn.tasks import lm
from maskattn.tokenization import Tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
needs_text = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"tiny Shakespeare not found at {SHAKESPEARE}")


@needs_text
@pytest.mark.parametrize("documents", ["none", "paragraphs"])
def test_train_generate_evaluate(tmp_path, capsys, documents):
    text = tmp_path / "small.txt"
    text.write_text(SHAKESPEARE.read_text()[:20000])
    out = tmp_path / "run"
    args = ["train", "lm", "--train", str(text), "--out", str(out), "--set", "train.steps=6", "--set",
            "train.warmup=2", "--set", "train.progress=false", "--set", "train.eval_every=3", "--set",
            "model.num_layers=1", "--set", "model.d_model=32", "--set", "model.d_ff=64",
            "--set", f"data.documents={json.dumps(documents)}", "--set", "train.log_every=1"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(torch.tensor(result["loss"]).exp().item(), rel=1e-6)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]  # a few steps already lower the loss of an untrained model

    assert main(["generate", str(out / "model"), "--prompt", "ROMEO:", "--max-new-tokens", "100", "--seed", "1"]) == 0
    sample = capsys.readouterr().out
    # 100 new tokens, past the 64-token context (an untrained model may also draw a few special tokens)
    assert sample.startswith("ROMEO:") and len(sample) > len("ROMEO:") + 70
    assert main(["generate", str(out / "model"), "--prompt", "ROMEO:", "--max-new-tokens", "100", "--seed", "1"]) == 0
    assert capsys.readouterr().out == sample  # seeded

    assert main(["evaluate", str(out / "model"), "--data", str(text)]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] > 0


def test_generate_refuses_settings_it_would_ignore():
    # --max-new-tokens 0 or -3 printed the prompt alone, and temperature 0 ignored a bad --top-k / --top-p
    tok = Tokenizer.train_chars(["abc"])
    model = DecoderLM(DecoderLMConfig.preset("tiny", vocab_size=tok.vocab_size)).eval()
    cases = (({"max_new_tokens": 0}, "max_new_tokens must be a positive int, got 0"),
             ({"max_new_tokens": -3}, "max_new_tokens must be a positive int, got -3"),
             ({"temperature": -1.0}, "temperature must be a number >= 0 (0: greedy), got -1.0"),
             ({"temperature": 0.0, "top_k": -2}, "top_k must be a positive int or None, got -2"),
             ({"temperature": 0.0, "top_p": 0.0}, "top_p must be a number in (0, 1], got 0.0"))
    for settings, expected in cases:
        with pytest.raises(ValueError, match=re.escape(expected)):
            lm.generate(model, tok, "ab", **({"max_new_tokens": 3} | settings))
    assert lm.generate(model, tok, "ab", max_new_tokens=3, temperature=0.0).startswith("ab")


def test_packed_rows_never_see_across_documents():
    tok = Tokenizer.train_chars(["ab\n\ncd"])
    stream = lm.to_stream(tok, "aaa\n\nbbbb\n\ncc", "paragraphs")
    ids, docs = lm.rows(stream, block=5)
    torch.manual_seed(0)
    model = DecoderLM(DecoderLMConfig.preset("tiny", vocab_size=tok.vocab_size)).eval()
    loss, n = lm.row_loss(model, ids, docs, packed=True)
    assert n == int((docs[:, 1:] == docs[:, :-1]).sum())
    # the logits of each document equal those of the document alone, wherever it sits in the row
    logits = model(ids[:, :-1], doc_ids=docs[:, :-1])
    first_doc = (docs[0, :-1] == docs[0, 0]).sum()
    alone = model(ids[:1, :first_doc])
    torch.testing.assert_close(logits[0, :first_doc], alone[0], atol=1e-5, rtol=0)
    assert torch.isfinite(loss)


# --- never a loss of 0.0 / perplexity 1.0 from no text (issue 16, item 3) ---------------------------
# On main each of these trained and reported loss 0.0, perplexity 1.0, and picked the best checkpoint by it.
def _tiny_lm_args(tmp_path, text, *extra):
    path = tmp_path / "train.txt"
    path.write_text(text)
    return ["train", "lm", "--train", str(path), "--out", str(tmp_path / "run"), "--set", "train.steps=2",
            "--set", "train.progress=false", "--set", "model.num_layers=1", "--set", "model.d_model=16",
            "--set", "model.d_ff=32", "--set", "data.block=8", "--set", "data.batch_size=2", *extra]


@pytest.mark.parametrize(("text", "extra", "message"), [
    ("abcdefgh" * 10, ["--set", "data.valid_fraction=0.01"], r"the last data.valid_fraction \(0.01\) of data.train"),
    ("ab", [], r"data.train \(.*train.txt\) is too short: 1 tokens"),
])
def test_too_little_text_is_an_error_naming_it_not_a_perplexity_of_one(tmp_path, capsys, text, extra, message):
    assert main(_tiny_lm_args(tmp_path, text, *extra)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "too short" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "model").exists()


def test_evaluate_on_an_empty_file_is_an_error_naming_it(tmp_path, capsys):
    assert main(_tiny_lm_args(tmp_path, "the quick brown fox jumps over the lazy dog " * 10)) == 0
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run" / "model"), "--data", str(empty)]) == 2
    assert f"{empty} gives no token to score" in capsys.readouterr().err


def test_a_diverging_run_exits_non_zero_naming_the_step_and_exports_nothing(tmp_path, capsys):
    # A learning rate of 1e30 sends the weights past float range after the first step. On main a run like this
    # trained to the end, exited 0 and exported NaN weights. (norm_eps=-1 did it at step 1; it is refused now.)
    args = _tiny_lm_args(tmp_path, "the quick brown fox jumps over the lazy dog " * 10, "--set", "train.lr=1e30",
                         "--set", "train.warmup=0")
    assert main(args) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # after the task's opening log line
    assert re.match(r"maskattn train: step [23]: the training (loss|gradient norm) is (nan|inf)", last), last
    assert not (tmp_path / "run" / "model").exists()


def test_generated_bpe_text_keeps_the_space_after_the_prompt(monkeypatch):
    # the new tokens were decoded alone, and a BPE decoder drops a leading space: "To" + "▁be" gave "Tobe"
    tok = Tokenizer.train_bpe(["to be, or not to be: that is the question"] * 50, vocab_size=60)
    model = DecoderLM(DecoderLMConfig.preset("tiny", vocab_size=tok.vocab_size))
    continuation = tok.encode("to be, or not")[1:]  # the tokens after "to"
    assert tok.backend.decode(continuation).startswith("be")  # decoded alone, the space is gone
    monkeypatch.setattr(lm.decoding, "greedy", lambda m, x, max_new_tokens: torch.tensor([continuation]))
    text = lm.generate(model, tok, "to", max_new_tokens=len(continuation), temperature=0)
    assert text == "to be, or not"


def test_the_perplexity_of_a_far_off_model_is_exp_of_its_loss_not_capped():
    # the perplexity was exp(min(loss, 50)): 5.2e21 for any loss above 50 nats a token
    import math

    import torch.nn.functional as F

    torch.manual_seed(0)
    tok = Tokenizer.train_chars(["abcdefgh "])
    model = DecoderLM(DecoderLMConfig(vocab_size=tok.vocab_size, d_model=16, num_heads=2, d_ff=32, num_layers=1,
                                      max_len=16)).eval()
    with torch.no_grad():
        model.decoder.norm.weight.mul_(300.0)  # sharp, and mostly wrong, predictions
    cfg = lm.DataConfig(block=8)
    stream = lm.to_stream(tok, ("abc defgh bad cafe head fade egg " * 3)[:97], "none")
    found = lm.evaluate_stream(model, stream, cfg)
    rows = stream.ids.unfold(0, 9, 8)  # 12 rows overlapping by one; the oracle: cross-entropy of the logits itself
    with torch.no_grad():
        logits = model(rows[:, :-1]).double()
    loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item()
    assert 50 < loss < 700 and found["loss"] == pytest.approx(loss, rel=1e-5)
    assert found["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_the_training_loss_reads_nothing_back_beside_the_models_own_checks(tmp_path, capsys, monkeypatch, host_reads):
    # row_loss counted the batch's targets with int(...) on every micro-batch, a wait for a GPU that training then
    # threw away (the collate knows the count already); the model's forward (its input checks) is not counted here
    from maskattn.training import Trainer

    counts = []

    def counting_loss(loss):
        def counted(model, batch):
            paused = []

            def pause(*_):
                paused.append(host_reads.paused())
                paused[-1].__enter__()

            def resume(*_):
                paused.pop().__exit__(None, None, None)

            hooks = [model.register_forward_pre_hook(pause), model.register_forward_hook(resume)]
            with host_reads() as reads:
                value = loss(model, batch)
            for hook in hooks:
                hook.remove()
            counts.append(reads.count)
            return value
        return counted

    init = Trainer.__init__
    monkeypatch.setattr(Trainer, "__init__", lambda self, *a, loss, **k: init(self, *a, loss=counting_loss(loss), **k))
    text = "the quick brown fox.\n\njumps over the lazy dog\n\n" * 10
    assert main(_tiny_lm_args(tmp_path, text, "--set", 'data.documents="paragraphs"')) == 0
    assert counts and set(counts) == {0}, counts


@pytest.mark.parametrize(("length", "block", "documents"), [(41, 8, "none"), (40, 8, "none"), (37, 9, "none"),
                                                            (6, 8, "none"), (9, 8, "none"), (45, 8, "paragraphs")])
def test_the_validation_loss_scores_every_token_of_the_text_once(length, block, documents):
    # rows of block + 1 that did not overlap left out the first token of each row as a target (1 in 65 of tiny
    # Shakespeare's validation text at block 64) and the text after the last whole row; a text shorter than a row
    # was refused. The oracle: token t (t >= 1) scored once, from the tokens of its window (t - 1) // block before it.
    import torch.nn.functional as F

    torch.manual_seed(0)
    text = ("ab cd\n\nefg hi\n\njk lmn op\n\n" * 4)[:length]
    tok = Tokenizer.train_chars([text])
    model = DecoderLM(DecoderLMConfig(vocab_size=tok.vocab_size, d_model=16, num_heads=2, d_ff=32, num_layers=1,
                                      max_len=16)).eval().double()
    stream = lm.to_stream(tok, text, documents)
    ids, docs = stream.ids, stream.docs
    total, count = 0.0, 0
    with torch.no_grad():
        for t in range(1, len(ids)):
            start = (t - 1) // block * block
            if docs[t] != docs[t - 1]:
                continue  # a document's first token is not predictable
            start = max(start, int((docs[:t] != docs[t]).nonzero().max()) + 1 if (docs[:t] != docs[t]).any() else 0)
            logits = model(ids[None, start:t])[0, -1]  # only the tokens of its own document in its window
            total, count = total + F.cross_entropy(logits, ids[t]).item(), count + 1
    found = lm.evaluate_stream(model, stream, lm.DataConfig(block=block, documents=documents))
    assert found["loss"] == pytest.approx(total / count, rel=1e-9)
    assert found["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-9)
    assert sum(int((d[:, 1:] == d[:, :-1]).sum()) for _, d in lm.windows(stream, block)) == count
