import re
from dataclasses import dataclass, field

import pytest

from maskattn import config


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    clip: float | None = 1.0
    name: str = "adam"


@dataclass
class Outer:
    steps: int = 10
    inner: Inner = field(default_factory=Inner)


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("steps = 20\n[inner]\nlr = 1\nbetas = [0.8, 0.9]\n")
    cfg = config.load(Outer(), path, ["inner.clip=none", "inner.name=sgd", "steps=30"])
    assert cfg == Outer(steps=30, inner=Inner(lr=1.0, betas=(0.8, 0.9), clip=None, name="sgd"))
    assert isinstance(cfg.inner.lr, float)


def test_errors_name_the_setting():
    with pytest.raises(KeyError, match=r"unknown setting 'inner.lrr'"):
        config.load(Outer(), None, ["inner.lrr=1"])
    with pytest.raises(TypeError, match=r"steps: expected int, got 'many'"):
        config.load(Outer(), None, ["steps=many"])
    with pytest.raises(TypeError, match="inner is a section"):
        config.load(Outer(), None, ["inner=3"])
    with pytest.raises(TypeError, match="inner was set to a value by an earlier --set, but inner is a section"):
        config.load(Outer(), None, ["inner=3", "inner.lr=0.1"])  # was "'int' object does not support item assignment"
    with pytest.raises(ValueError, match="key=value"):
        config.overrides(["steps"])


def test_an_unknown_setting_names_the_closest_known_one():
    # only the sorted list of every field was given: model's 26 names to scan for the one a typo meant
    from maskattn.tasks.base import get

    for given, unknown, meant in (("train.lrr", "train.lrr", "train.lr"), ("trian.lr", "trian", "train"),
                                  ("model.dmodel", "model.dmodel", "model.d_model"),
                                  ("model.num_head", "model.num_head", "model.num_heads"),
                                  ("data.vaild", "data.vaild", "data.valid")):
        with pytest.raises(KeyError, match=rf"^unknown setting '{re.escape(unknown)}' \(did you mean "
                           rf"'{re.escape(meant)}'\?\); known here: \["):
            config.load(get("lm").config(), None, [f"{given}=1"])
    with pytest.raises(KeyError, match=r"^unknown setting 'zzz'; known here: \["):  # nothing close: no guess
        config.load(get("lm").config(), None, ["zzz=1"])


def test_a_setting_below_a_plain_setting_is_named_as_unknown():
    # `--set model.d_model.x=3` said "model.d_model: expected int, got {'x': 3}": a dict the user never wrote
    from maskattn.tasks.base import get

    for given, unknown, parent in (("model.d_model.x", "model.d_model.x", "model.d_model"),
                                   ("train.lr.a.b", "train.lr.a", "train.lr"), ("out.x", "out.x", "out")):
        with pytest.raises(KeyError, match=rf"^unknown setting '{re.escape(unknown)}': {re.escape(parent)} is a "
                           rf"setting, not a section; set it as {re.escape(parent)}=\.\.\.$"):
            config.load(get("lm").config(), None, [f"{given}=3"])


def test_describe_lists_every_field():
    assert "inner.lr = 0.001" in config.describe(Outer())


# --- every setting's range, checked where the section is built (issue 16, item 2) ----------------------
# On main each of these was accepted: keep=-1 then deleted every checkpoint right after writing it.
BAD_SETTINGS = {
    "lm": ["train.keep=-1", "train.keep=0", "data.batch_size=0", "train.log_every=0", "train.betas=[0.9]",
           "train.betas=[0.9, 1.0]", "train.betas=[0.9, 0.99, 0.5]", "train.warmup=-1",
           "train.lr=0", "train.clip_norm=-1", "data.block=0",
           "data.valid_fraction=0", "data.valid_fraction=1", "data.documents=\"pages\"", "train.accumulate=0"],
    "translation": ["decode.beam_size=0", "data.max_tokens=0", "label_smoothing=1.0", "decode.batch_size=0"],
    "classification": ["data.max_len=2", "train.eval_every=-1", "data.max_tokens=-1", "data.batch_size=0"],
    "qa": ["data.stride=0", "data.max_answer=0"],
}


@pytest.mark.parametrize(("task", "assignment"), [(t, a) for t, items in BAD_SETTINGS.items() for a in items])
def test_an_out_of_range_setting_is_one_error_naming_it_and_its_value(task, assignment, capsys):
    from maskattn.cli import main
    from maskattn.errors import SettingError
    from maskattn.tasks.base import get

    key = assignment.split("=", 1)[0]
    with pytest.raises(SettingError, match=rf"^{re.escape(key)} must be .*, got "):
        config.load(get(task).config(), None, [assignment])
    assert main(["train", task, "--set", assignment, "--show-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"maskattn train: {key} must be ") and err.count("\n") == 1


def test_a_model_setting_error_is_named_after_its_section():
    from maskattn.tasks.base import get

    with pytest.raises(ValueError, match=r"^model: d_model \(30\) must be divisible by num_heads"):
        config.load(get("lm").config(), None, ["model.d_model=30"])


def test_config_file_errors_name_the_file(tmp_path):
    from maskattn.errors import SettingError
    from maskattn.tasks.base import get

    with pytest.raises(SettingError, match=r"--config .*: a directory, expected a TOML file"):
        config.load(get("lm").config(), tmp_path)
    (tmp_path / "bad.toml").write_bytes(b"[train\n")
    with pytest.raises(SettingError, match=r"bad\.toml: not a valid TOML file"):
        config.load(get("lm").config(), tmp_path / "bad.toml")


@pytest.mark.parametrize("task", ["translation", "classification", "qa", "lm", "caption"])
def test_show_config_is_a_toml_file_that_config_reads_back(task, tmp_path, capsys):
    # it printed Python values (None, (0.9, 0.98), True): `--show-config > run.toml` was not a valid --config
    from maskattn.cli import main
    from maskattn.tasks.base import tasks

    assert main(["train", task, "--set", "train.lr=0.25", "--set", 'out="runs/x y"', "--show-config"]) == 0
    (tmp_path / "run.toml").write_text(capsys.readouterr().out)
    want = config.load(tasks()[task].config(), None, ["train.lr=0.25", 'out="runs/x y"'])
    assert config.load(tasks()[task].config(), tmp_path / "run.toml") == want


def test_settings_that_train_to_nan_or_to_nonsense_are_refused_before_training(tmp_path, capsys):
    # train.lr=inf and model.rope_base <= 0 passed the checks and failed at step 1 ("loss is nan", blamed on
    # the learning rate); model.max_len below data.max_len was raised without a word; a text field equal to the
    # label field trained on the label
    from maskattn.cli import main

    data = tmp_path / "t.tsv"
    data.write_text("sentence\tlabel\n" + "good film\t1\nbad film\t0\n" * 8)
    cases = ((["train.lr=inf"], "lr must be a number > 0, got inf"),
             (["model.rope_base=0"], "rope_base must be a number > 0, got 0"),
             (["model.norm_eps=-1e-05"], "norm_eps must be a number > 0, got -1e-05"),
             (["model.max_len=64"], "model.max_len=64 is shorter than data.max_len=128 (where texts are cut)"),
             (['data.text_field="label"'], "data.text_field and data.label_field must name different fields"))
    for settings, expected in cases:
        args = ["train", "classification", "--train", str(data), "--out", str(tmp_path / "run"),
                "--set", 'data.tokenizer="chars"', "--set", "train.steps=1", "--set", "train.progress=false"]
        assert main([*args, *(x for s in settings for x in ("--set", s))]) == 2, settings
        err = capsys.readouterr().err
        assert expected in err and not re.search(r"\b(\w+)\.\1\.", err), err  # not "data.data.text_field"


def test_a_bad_setting_in_a_config_file_names_the_file(tmp_path, capsys):
    # "unknown setting 'trian'" and "train.lr: expected float, got '1e-3'" did not say whether the file or a --set
    # held the setting (a --set is named in the command; a file's key is not)
    from maskattn.cli import main
    from maskattn.errors import SettingTypeError, UnknownSettingError
    from maskattn.tasks.base import get

    (tmp_path / "a.toml").write_text("[trian]\nlr = 1\n")
    (tmp_path / "b.toml").write_text('[train]\nlr = "1e-3"\n')
    with pytest.raises(UnknownSettingError, match=r"^--config .*a\.toml: unknown setting 'trian'"):
        config.load(get("lm").config(), tmp_path / "a.toml")
    with pytest.raises(SettingTypeError, match=r"^--config .*b\.toml: train\.lr: expected float, got '1e-3'"):
        config.load(get("lm").config(), tmp_path / "b.toml")
    assert main(["train", "lm", "--config", str(tmp_path / "b.toml"), "--show-config"]) == 2
    err = capsys.readouterr().err
    assert err == f"maskattn train: --config {tmp_path / 'b.toml'}: train.lr: expected float, got '1e-3'\n"
    with pytest.raises(UnknownSettingError, match=r"^unknown setting 'trian'"):  # a --set's own key: no file named
        config.load(get("lm").config(), None, ["trian.lr=1"])


def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path):
    # Windows editors save UTF-8 with a BOM: "Invalid statement (at line 1, column 1)", though data files accept it
    path = tmp_path / "run.toml"
    path.write_bytes("\ufeffsteps = 20\n[inner]\nlr = 1\n".encode())
    assert config.load(Outer(), path, []) == Outer(steps=20, inner=Inner(lr=1.0))


def test_none_is_the_word_for_a_setting_that_cannot_be_none():
    # `--set data.documents=none` (one of that setting's documented values) was read as None and refused:
    # "data.documents: expected str, got None"
    from maskattn.tasks.lm import LMConfig

    assert config.load(LMConfig(), None, ["data.documents=paragraphs", "data.documents=none"]).data.documents == "none"
    cfg = config.load(Outer(), None, ["inner.clip=none", "inner.name=None"])
    assert cfg.inner.clip is None and cfg.inner.name == "None"  # None where a setting may be None, else the word
    with pytest.raises(TypeError, match=r"steps: expected int, got 'null'"):
        config.load(Outer(), None, ["steps=null"])


def test_a_decimal_point_at_either_end_of_a_number_is_a_float_where_the_setting_is_one():
    # `--set train.lr=.5` said "train.lr: expected float, got '.5'": TOML wants a digit on both sides of the point
    cfg = config.load(Outer(), None, ["inner.lr=.5", "inner.clip=-5.", "inner.name=.25"])
    assert (cfg.inner.lr, cfg.inner.clip, cfg.inner.name) == (0.5, -5.0, ".25")  # a text setting keeps the text
    assert type(cfg.inner.name) is str
    assert config.load(Outer(), None, ["inner.lr=.5e-3"]).inner.lr == 5e-4
    with pytest.raises(TypeError, match=r"steps: expected int, got '5\.'"):
        config.load(Outer(), None, ["steps=5."])


def test_a_text_setting_keeps_a_set_value_that_reads_as_a_number_or_a_switch():
    # `--set out=2024` said "out: expected str, got 2024": the TOML number was checked, not the text typed
    cfg = config.load(Outer(), None, ["inner.name=2024", "inner.lr=2024", "steps=12"])
    assert (cfg.inner.name, cfg.inner.lr, cfg.steps) == ("2024", 2024.0, 12) and type(cfg.inner.name) is str
    assert config.load(Outer(), None, ["inner.name=true"]).inner.name == "true"
    assert config.load(Outer(), None, ["inner.name=1e-3"]).inner.name == "1e-3"  # as typed, not "0.001"
    assert config.load(Outer(), None, ["inner.clip=3"]).inner.clip == 3.0  # float | None: the number
    with pytest.raises(TypeError, match=r"steps: expected int, got True"):
        config.load(Outer(), None, ["steps=true"])
    # a value from a TOML file (or the Python API) is typed as written: a number for a text setting is refused
    with pytest.raises(TypeError, match=r"inner.name: expected str, got 2024"):
        config.update(Outer(), {"inner": {"name": 2024}})


def test_a_set_key_that_is_empty_or_has_an_empty_part_is_named_so():
    # `--set =3` said "unknown setting ''" and `--set train..lr=3` "unknown setting 'train.'": nothing said what is
    # wrong with the key as typed
    from maskattn.errors import UnknownSettingError
    from maskattn.tasks.base import get

    for item in ("=3", " =3"):
        with pytest.raises(UnknownSettingError, match=rf"^--set {re.escape(repr(item))}: no setting named before '='"):
            config.load(get("lm").config(), None, [item])
    for item, key in (("train..lr=3", "train..lr"), ("train.=3", "train."), (".lr=3", ".lr"),
                      ("train. .lr=3", "train. .lr")):
        with pytest.raises(UnknownSettingError, match=rf"^--set {re.escape(repr(item))}: the setting "
                           rf"{re.escape(repr(key))} has an empty part"):
            config.load(get("lm").config(), None, [item])
    assert config.load(get("lm").config(), None, [" train.lr =3"]).train.lr == 3.0  # spaces around the key: as before
