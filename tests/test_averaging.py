"""Checkpoint averaging against a hand-computed mean of the checkpoints' weights."""

import json

import pytest
import torch

import maskattn
from maskattn import checkpoint
from maskattn.averaging import average_models, average_run, average_states
from maskattn.models import DecoderLM, DecoderLMConfig
from maskattn.tasks.common import write_task
from maskattn.tokenization import Tokenizer


def _run(tmp_path, prefix=""):
    """A run directory: an exported model and three step checkpoints with known, different weights."""
    torch.manual_seed(0)
    tok = Tokenizer.train_chars(["abcdef ghij"])
    model = DecoderLM(DecoderLMConfig.preset("tiny", vocab_size=tok.vocab_size))
    model.save(tmp_path / "model", tokenizer=tok.backend)
    write_task(tmp_path / "model", {"task": "lm", "documents": "none", "block": 8})
    states = []
    for step in (10, 20, 30):
        state = {k: v + step * torch.ones_like(v) if v.is_floating_point() else v
                 for k, v in model.state_dict().items()}
        states.append(state)
        checkpoint.save(tmp_path / "checkpoints", step, {"model": {prefix + k: v for k, v in state.items()}}, keep=None)
    return model, states


@pytest.mark.parametrize("prefix", ["", "model."])
def test_average_run_is_the_mean_of_the_last_checkpoints(tmp_path, prefix):
    _, states = _run(tmp_path, prefix)
    out = average_run(tmp_path, 2, tmp_path / "avg")
    averaged = maskattn.load(out)
    for key, value in averaged.state_dict().items():
        expected = (states[1][key] + states[2][key]) / 2  # steps 20 and 30: + 25 on every weight
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=key)
    assert json.loads((out / "task.json").read_text())["task"] == "lm"
    assert Tokenizer.load(out).vocab_size == Tokenizer.load(tmp_path / "model").vocab_size


def test_average_run_refuses_too_few_checkpoints_and_overwriting_the_model(tmp_path):
    _run(tmp_path)
    with pytest.raises(ValueError, match="fewer than last=5"):
        average_run(tmp_path, 5, tmp_path / "avg")
    with pytest.raises(ValueError, match="out must be a new directory"):
        average_run(tmp_path, 2, tmp_path / "model")
    with pytest.raises(ValueError, match="last must be an int >= 1"):
        average_run(tmp_path, 0, tmp_path / "avg")
    with pytest.raises(ValueError, match=r"model is a model directory, not a training run: give the run directory"):
        average_run(tmp_path / "model", 2, tmp_path / "avg")  # said "has no exported model (model/model/...)"


def test_average_cli_never_sets_aside_the_model_it_reads(tmp_path, capsys):
    # --out RUN/model --overwrite moved the run's model aside, then failed for want of it
    from maskattn.cli import main

    _run(tmp_path)
    before = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert main(["average", str(tmp_path), "--last", "2", "--out", str(tmp_path / "model"), "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == before


def test_average_states_checks_keys_shapes_and_integers():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    torch.testing.assert_close(average_states([a, {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(3)}])["w"],
                               torch.tensor([2.0, 4.0]))
    with pytest.raises(ValueError, match="different keys"):
        average_states([a, {"w": a["w"]}])
    with pytest.raises(ValueError, match="shape"):
        average_states([a, {"w": torch.zeros(3), "n": torch.tensor(3)}])
    with pytest.raises(ValueError, match="integer tensor differs"):
        average_states([a, {"w": a["w"], "n": torch.tensor(4)}])



def test_average_run_holds_one_loaded_checkpoint_at_a_time(tmp_path, monkeypatch):
    # Every chosen checkpoint was loaded before the first was added: memory grew with --last (a 72 MB model:
    # peak RSS 634 MB for 2, 1,285 MB for 8); the mean is a running sum of checkpoints read one at a time.
    import gc
    import weakref

    _, states = _run(tmp_path)
    read, alive = checkpoint.load, []
    loaded: list[weakref.ref] = []

    def load(path):
        gc.collect()
        alive.append(sum(ref() is not None for ref in loaded))  # earlier checkpoints' weights still held
        state = read(path)
        loaded.append(weakref.ref(next(iter(state["model"].values()))))
        return state

    monkeypatch.setattr(checkpoint, "load", load)
    out = average_run(tmp_path, 3, tmp_path / "avg")
    assert alive == [0, 1, 1]  # the one being added, never all of them
    for key, value in maskattn.load(out).state_dict().items():
        torch.testing.assert_close(value, (states[0][key] + states[1][key] + states[2][key]) / 3, rtol=0, atol=1e-6)


def test_average_models_is_the_mean_of_finished_models_and_the_cli_runs_it(tmp_path, capsys):
    from maskattn.cli import main

    model, _ = _run(tmp_path / "a")
    other = DecoderLM(DecoderLMConfig(**{**model.config.to_dict(), "dropout": 0.3}))  # other weights and dropout
    tok = Tokenizer.load(tmp_path / "a" / "model")
    other.save(tmp_path / "b", tokenizer=tok.backend)
    write_task(tmp_path / "b", {"task": "lm", "documents": "none", "block": 8})
    assert main(["average", "--models", str(tmp_path / "a" / "model"), str(tmp_path / "b"),
                 "--out", str(tmp_path / "soup")]) == 0
    soup = maskattn.load(tmp_path / "soup")
    for key, value in soup.state_dict().items():
        expected = (model.state_dict()[key] + other.state_dict()[key]) / 2
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=key)
    wide = DecoderLM(DecoderLMConfig.preset("tiny", vocab_size=tok.vocab_size, d_model=64))
    wide.save(tmp_path / "c", tokenizer=tok.backend)
    write_task(tmp_path / "c", {"task": "lm", "documents": "none", "block": 8})
    with pytest.raises(ValueError, match=r"config\.json differs"):
        average_models([tmp_path / "b", tmp_path / "c"], tmp_path / "bad")
    with pytest.raises(ValueError, match="at least two"):
        average_models([tmp_path / "b"], tmp_path / "bad")
    capsys.readouterr()
    assert main(["average", str(tmp_path / "a"), "--models", str(tmp_path / "b"), "--out", str(tmp_path / "x")]) == 2
    assert "not both" in capsys.readouterr().err


def test_models_pruned_to_other_heads_are_not_averaged(tmp_path):
    # both keep 2 of 4 heads: the same shapes and head counts, but heads [0, 1] and [2, 3] are other heads
    model, _ = _run(tmp_path / "a")
    tok = Tokenizer.load(tmp_path / "a" / "model")
    for name, keep in (("x", [0, 1]), ("y", [2, 3]), ("z", [0, 1])):
        pruned = DecoderLM(model.config)
        pruned.load_state_dict(model.state_dict())
        pruned.decoder.layers[0].self_attn.prune_heads(keep)
        pruned.save(tmp_path / name, tokenizer=tok.backend)
        write_task(tmp_path / name, {"task": "lm", "documents": "none", "block": 8})
        assert maskattn.load(tmp_path / name).decoder.layers[0].self_attn.origin_heads == keep  # saved and loaded
    with pytest.raises(ValueError, match=r"config\.json differs"):
        average_models([tmp_path / "x", tmp_path / "y"], tmp_path / "bad")
    average_models([tmp_path / "x", tmp_path / "z"], tmp_path / "soup")  # the same heads: averaged
    meta = json.loads((tmp_path / "x" / "config.json").read_text())
    del meta["compression"]["origin"]  # a model pruned before the heads' origin was recorded
    (tmp_path / "x" / "config.json").write_text(json.dumps(meta))
    (tmp_path / "x" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="cannot be told whether the models kept the same heads"):
        average_models([tmp_path / "x", tmp_path / "z"], tmp_path / "bad2")


def test_int8_models_are_refused_by_name(tmp_path):
    # two int8 models failed on their first int8 table: "src_embed...weight: integer tensor differs between
    # checkpoints", naming neither model nor int8; int8 weights on their own scales have no mean
    from maskattn.models import compressed

    model, _ = _run(tmp_path / "a")
    tok = Tokenizer.load(tmp_path / "a" / "model")
    for name, shift in (("x", 0.0), ("y", 0.5)):
        float_model = DecoderLM(model.config)
        float_model.load_state_dict({k: v + shift for k, v in model.state_dict().items()})
        compressed.quantize_linears(float_model, tied=True)
        float_model.save(tmp_path / name, tokenizer=tok.backend)
        write_task(tmp_path / name, {"task": "lm", "documents": "none", "block": 8})
    with pytest.raises(ValueError, match=r"models: \S+x is int8 \(maskattn compress --int8\); average the float "):
        average_models([tmp_path / "x", tmp_path / "y"], tmp_path / "bad")


def test_a_run_directory_among_the_models_is_named(tmp_path):
    # said "RUN/config.json: file not found", where compress and the prediction commands name RUN/model
    _run(tmp_path / "a")
    with pytest.raises(ValueError, match=r"\S+/a is a run directory; its model is \S+/a/model$"):
        average_models([tmp_path / "a" / "model", tmp_path / "a"], tmp_path / "soup")


def test_a_model_given_twice_is_refused(tmp_path):
    # "--models A A B" wrote a soup weighting A twice (and "A A" a copy of A), without a word
    _run(tmp_path / "a")
    twice = r"models: \S+/a/model is given twice \(as \S+/a/model and \S+/a/\.\./a/model\)"
    with pytest.raises(ValueError, match=twice):
        average_models([tmp_path / "a" / "model", tmp_path / "a" / ".." / "a" / "model"], tmp_path / "soup")
    assert not (tmp_path / "soup").exists()


def test_a_run_that_is_missing_or_a_file_is_named_as_such(tmp_path, capsys):
    # said "run X has no exported model (X/model/config.json); train it to the end first" for a mistyped or
    # missing run directory, or a file
    from maskattn.cli import main

    (tmp_path / "notes.txt").write_text("x")
    for given, what in ((tmp_path / "runz", "no such directory"), (tmp_path / "notes.txt", "a file")):
        assert main(["average", str(given), "--last", "1", "--out", str(tmp_path / "avg")]) == 2
        assert capsys.readouterr().err.strip() == (f"maskattn average: run {given}: {what}, expected the run directory "
                                                   "of `maskattn train` whose checkpoints to average")
    assert not (tmp_path / "avg").exists()
    (tmp_path / "run").mkdir()  # a directory that is no run keeps its message
    with pytest.raises(ValueError, match="has no exported model"):
        average_run(tmp_path / "run", 1, tmp_path / "avg")


def test_average_run_takes_the_last_step_checkpoints_not_best(tmp_path):
    # a run that evaluates keeps best/step-* beside checkpoints/ (training's own resume lists both); the best
    # checkpoint is usually the final step's again, so counting it took step 30 twice and dropped step 20
    model, states = _run(tmp_path)
    best = {k: v + 30 * torch.ones_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    checkpoint.save(tmp_path / "best", 30, {"model": best}, keep=1)
    averaged = maskattn.load(average_run(tmp_path, 2, tmp_path / "avg"))
    for key, value in averaged.state_dict().items():
        torch.testing.assert_close(value, (states[1][key] + states[2][key]) / 2, rtol=0, atol=1e-6, msg=key)
