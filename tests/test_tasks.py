"""The task protocol: the CLI's train, evaluate and prediction commands come from the task registry."""

import json
from dataclasses import dataclass, field, replace

import pytest

from maskattn import cli
from maskattn.cli import main
from maskattn.tasks import BUILTIN, base
from maskattn.tasks.common import TASK_FILE


def test_builtin_tasks_are_registered_in_order_with_their_cli_parts():
    registered = base.tasks()
    assert list(registered)[: len(BUILTIN)] == list(BUILTIN)
    assert [t.predict.name for t in registered.values()] == ["translate", "classify", "answer", "generate", "caption"]
    # the shortcuts of `maskattn train` (and the old constant) are every task's paths, each once
    assert cli.SHORTCUTS == ("train_src", "train_tgt", "valid_src", "valid_tgt", "train", "valid", "pretrained",
                             "embeddings")
    with pytest.raises(ValueError, match=r"unknown task 'nope'; registered tasks: translation, classification"):
        base.get("nope")
    with pytest.raises(ValueError, match="task 'lm' is already registered"):
        base.register(base.Task("lm", *[None] * 5, data_help=""))


@dataclass
class ToyData:
    train: str = ""  # a file
    words: int = 3  # a setting


@dataclass
class ToyConfig:
    data: ToyData = field(default_factory=ToyData)
    out: str = "runs/toy"


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """A task registered for one test only: it records what the CLI passed to it."""
    calls = []

    def train(cfg, *, resume=False, log=None):
        calls.append(("train", cfg, resume))
        directory = tmp_path / "model"
        directory.mkdir()
        (directory / TASK_FILE).write_text(json.dumps({"task": "toy"}))
        return {"model": str(directory)}

    def evaluate_file(directory, path, **options):
        calls.append(("evaluate", directory, path, options))
        return {"score": 42.0}

    def arguments(parser):  # after `model`, which every prediction command takes first
        parser.add_argument("--loud", action="store_true")

    def run(args):
        calls.append(("predict", args.model, args.loud))
        return 0

    task = base.Task(name="toy", config=ToyConfig, train=train, load=lambda d: None, evaluate_file=evaluate_file,
                     predict=base.Command("toyify", "toy predictions", arguments, run), data_help="a toy file",
                     paths=("train", "toy_words"), evaluate_options=(base.Option("--depth", "depth", "how deep", int),
                                                                     base.Option("--beam", "beam_size", "beams",
                                                                                 base.beam_width)))
    base.tasks()  # the built-in tasks first
    monkeypatch.setitem(base._REGISTRY, "toy", task)
    return calls


def test_a_registered_task_gets_train_evaluate_and_predict_commands(toy, tmp_path, capsys):
    assert main(["train", "toy", "--train", "t.txt", "--set", "data.words=5", "--out", str(tmp_path / "r")]) == 0
    kind, cfg, resume = toy[-1]
    assert (kind, cfg.data.train, cfg.data.words, cfg.out, resume) == ("train", "t.txt", 5, str(tmp_path / "r"), False)
    model = json.loads(capsys.readouterr().out)["model"]

    assert main(["train", "toy", "--show-config"]) == 0
    assert "data.words = 3" in capsys.readouterr().out

    assert main(["evaluate", model, "--data", "d.txt", "--depth", "2"]) == 0
    assert toy[-1] == ("evaluate", model, "d.txt", {"depth": 2})  # only the flags given, only the task's own
    assert json.loads(capsys.readouterr().out) == {"score": 42.0}

    assert main(["toyify", model, "--loud"]) == 0
    assert toy[-1] == ("predict", model, True)

    evaluate_help = cli.build_parser()._subparsers._group_actions[0].choices["evaluate"].format_help()
    evaluate_help = " ".join(evaluate_help.split())
    assert "toy: a toy file" in evaluate_help and "toy: how deep" in evaluate_help
    assert "translation: beam size (default: the model's setting); toy: beams" in evaluate_help


def test_tasks_that_share_an_evaluate_flag_must_parse_it_alike(toy, monkeypatch):
    # one argparse argument serves every task that names the flag; the toy's --beam is a beam_width, like translation's
    cli.build_parser()
    changed = replace(base._REGISTRY["toy"], evaluate_options=(base.Option("--beam", "beam_size", "beams"),))
    monkeypatch.setitem(base._REGISTRY, "toy", changed)
    refusal = r"evaluate flag --beam: task 'toy' reads it as str, another task as beam_width"
    with pytest.raises(ValueError, match=refusal):
        cli.build_parser()


def test_evaluate_names_an_unregistered_task(tmp_path, capsys):
    (tmp_path / TASK_FILE).write_text(json.dumps({"task": "poetry"}))
    assert main(["evaluate", str(tmp_path), "--data", "x"]) == 2
    assert "no evaluation for task 'poetry'" in capsys.readouterr().err


def test_a_model_of_another_task_is_refused_by_load(tmp_path):
    from maskattn.tasks import translation

    (tmp_path / TASK_FILE).write_text(json.dumps({"task": "lm"}))
    with pytest.raises(ValueError, match=r"holds a 'lm' model, not a 'translation' one"):
        translation.load(tmp_path)


@pytest.mark.parametrize(("task", "data"), [("translation", "--train-src"), ("classification", "--train"),
                                            ("lm", "--train")])
def test_an_unknown_tokenizer_is_one_error_naming_the_setting_value_and_choices(task, data, tmp_path, capsys):
    path = tmp_path / "data.tsv"
    path.write_text("sentence\tlabel\nein\t0\nzwei\t1\n")  # a labelled file, a TSV of pairs and a text at once
    assert main(["train", task, data, str(path), "--set", 'data.tokenizer="words"', "--out", str(tmp_path / "r")]) == 2
    assert "data.tokenizer must be one of 'bpe', 'chars', got 'words'" in capsys.readouterr().err


def test_head_runs_a_model_method_as_forward():
    import torch

    from maskattn.models import EncoderConfig, EncoderModel
    from maskattn.tasks.common import Head

    torch.manual_seed(0)
    model = EncoderModel(EncoderConfig.preset("tiny", vocab_size=11, num_labels=3)).eval()
    ids, lengths = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2])
    head = Head(model, "classify")
    assert torch.equal(head(ids, lengths=lengths), model.classify(ids, lengths=lengths))
    assert list(head.state_dict()) == [f"model.{k}" for k in model.state_dict()]  # checkpoints keep their keys
    with pytest.raises(ValueError, match="EncoderModel has no method 'clasify'"):
        Head(model, "clasify")


@pytest.mark.parametrize("task, setting, source", [
    ("translation", "model.share_embeddings=false", "the tokenizer (source and target share one vocabulary)"),
    ("translation", "model.pad_id=7", "the tokenizer"),
    ("classification", "model.num_labels=5", "the labels of data.train"),
    ("lm", "model.vocab_size=100", "the tokenizer"),
])
def test_settings_the_task_derives_itself_are_refused(tmp_path, capsys, task, setting, source):
    # they were accepted and then silently replaced (config.json showed the task's values)
    from maskattn.cli import main

    data = tmp_path / "data.txt"
    data.write_text("a\tb\n")
    flag = "--train-src" if task == "translation" else "--train"
    assert main(["train", task, flag, str(data), "--out", str(tmp_path / "run"), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert f"set by the task, not by a setting: {setting.split('=')[0]} from {source}" in err


@pytest.mark.parametrize("task", BUILTIN)
def test_a_metric_the_validation_does_not_give_is_refused_before_training(task, tmp_path, capsys):
    # train.metric was only checked at the first evaluation: with eval_every=0, after the whole run, and
    # the run's last steps were lost (no final checkpoint, no model).
    declared = base.tasks()[task].metrics
    assert base.tasks()[task].config().train.metric in declared
    assert main(["train", task, "--out", str(tmp_path / "run"), "--set", 'train.metric="accuracy_x"']) == 2
    assert (f"train.metric='accuracy_x' is not one of the {task} task's validation metrics: "
            f"{', '.join(declared)}") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_contributing_builtin_line_adds_its_task_and_keeps_every_other():
    # CONTRIBUTING.md's worked task showed `BUILTIN = (...)` without "caption": pasted as it says, the
    # captioning task (train, evaluate, `maskattn caption`) disappeared from the command line
    import ast
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text(encoding="utf-8")
    (line,) = re.findall(r"^BUILTIN = (\(.*\))$", text, re.M)
    assert ast.literal_eval(line) == (*BUILTIN, "reverse")


def _contributing() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text(encoding="utf-8")


def test_the_contributing_task_table_describes_every_field_of_the_record():
    # CONTRIBUTING.md's "The record holds" table left out visualize, training_batches, derived and metrics: a task
    # written from it (as its worked example was) let `--set model.vocab_size=...` be ignored without a word
    import dataclasses
    import re

    text = _contributing().split("The record holds:", 1)[1].split("\n\n", 2)[1]
    described = re.findall(r"^\| `(\w+)", text, re.M)
    assert described == [f.name for f in dataclasses.fields(base.Task)]


def test_the_contributing_task_example_trains_and_declares_what_it_sets_itself(tmp_path, monkeypatch):
    # the worked `reverse` task, pasted into a module as it says, against today's task API (few steps: that it
    # runs, not how well); its derived settings and metrics are real settings and the scores it gives
    import importlib.util
    import random
    import re
    import sys

    from maskattn import config

    (code,) = re.findall(r'```python\n("""Reverse words.*?)```', _contributing(), re.S)
    (tmp_path / "reverse_example.py").write_text(code, encoding="utf-8")
    monkeypatch.setattr(base, "register", lambda task: task)  # the registry stays as it is
    spec = importlib.util.spec_from_file_location("reverse_example", tmp_path / "reverse_example.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "reverse_example", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    rng = random.Random(0)
    for name, count in (("train", 100), ("valid", 5)):
        words = ("".join(rng.choice("abcdef") for _ in range(rng.randint(2, 4))) for _ in range(count))
        (tmp_path / f"{name}.txt").write_text(" ".join(words), encoding="utf-8")
    task, defaults = module.TASK, module.ReverseConfig()
    for key in task.derived(defaults):
        config.get(defaults, key)  # a KeyError names a setting that does not exist
    cfg = config.load(defaults, None, [f'data.train="{tmp_path / "train.txt"}"', f'out="{tmp_path / "run"}"',
                                       "model.d_model=16", "model.d_ff=32", "model.num_heads=2", "train.steps=1",
                                       "train.progress=false"])
    trained = task.train(cfg, log=lambda message: None)["model"]
    assert set(task.evaluate_file(trained, str(tmp_path / "valid.txt"))) == set(task.metrics)
