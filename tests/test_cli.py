import json
import subprocess
import sys

import pytest

from maskattn.cli import main


@pytest.mark.parametrize("length", [1, 6, 16])  # its documents and padding were fixed at 8 and 5 positions
def test_showcase_draws_masks_and_agrees_with_torch(capsys, length):
    assert main(["showcase", "--length", str(length)]) == 0
    out = capsys.readouterr().out
    assert f"causal()  [Lq={length}, Lk={length}]" in out
    assert "prefix_lm(3)" in out and "document(" in out and "from_tensor(" in out
    worst = float(out.rsplit("= ", 1)[1])
    assert worst < 1e-12


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "maskattn", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout


def test_masks_show_text_and_png(capsys, tmp_path):
    png = tmp_path / "m.png"
    assert main(["masks", "show", "causal & window(2)", "--length", "3", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "  q 0  ■ · ·\n  q 1  ■ ■ ·\n  q 2  · ■ ■" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_masks_show_bad_expression_points_at_it(capsys):
    assert main(["masks", "show", "causal & windw(2)"]) == 2
    err = capsys.readouterr().err
    assert "unknown mask 'windw'" in err and err.rstrip().endswith(" " * 9 + "^")


def test_masks_show_help_names_every_mask_the_parser_reads(capsys):
    # the description listed six names written by hand: sliding_window(n) and prefix_lm(n) parsed but were not
    # named, nor would a kind added to the expression language (CONTRIBUTING.md) be; the oracle is the parser's
    # own list of the names it knows, from its error on an unknown one
    assert main(["masks", "show", "nosuchmask"]) == 2
    known = capsys.readouterr().err.split("known: ", 1)[1].split(" at position", 1)[0].split(", ")
    assert "causal" in known and "window" in known
    with pytest.raises(SystemExit):
        main(["masks", "show", "--help"])
    described = " ".join(capsys.readouterr().out.split()).split("Expression: names ", 1)[1]
    for name in known:
        assert f" {name}," in f" {described}" or f" {name}(" in f" {described}", name
        written = f" {described}".split(f" {name}", 1)[1]
        make = name if not written.startswith("(") else f"{name}(3)" if written.startswith("(n)") else f"{name}(3,2)"
        assert main(["masks", "show", make, "--length", "4"]) == 0, make  # the help's notation parses
        capsys.readouterr()


def test_masks_stats(capsys):
    assert main(["masks", "stats", "causal & window(4)", "--length", "16", "--block", "4"]) == 0
    out = capsys.readouterr().out
    # 16 rows: rows 0-3 see 1..4 keys, the 12 others 4 keys each: 10 + 48 = 58 of 256
    assert "58 of 256 scores" in out and "0 fully masked row(s)" in out
    # 4x4 tiles of 4x4: the 4 diagonal tiles are triangles and the 3 just below see 3 of 4 keys per row
    # (partial); the other 9 see nothing: 9 * 16 of 256 scores skipped
    assert "tiles 4x4: 9 empty, 7 partial, 0 full; a block-sparse backend skips 56.25% of the scores" in out
    assert main(["masks", "stats", "causal", "--length", "16", "--block", "4"]) == 0
    out = capsys.readouterr().out
    # causal: 16 * 17 / 2 = 136 scores; 4 diagonal tiles partial, the 6 below full, the 6 above empty
    assert "136 of 256 scores" in out
    assert "tiles 4x4: 6 empty, 4 partial, 6 full; a block-sparse backend skips 37.50% of the scores" in out



@pytest.mark.parametrize("head_dim", [None, 48])
def test_masks_stats_says_the_head_dim_its_flop_count_assumes(capsys, head_dim):
    # it printed "3.905 GFLOP forward" without the head dim (64) the figure assumes; the oracle counts the entries of
    # the empty 64 x 64 tiles of the mask written out from arange positions, 4 x D FLOPs each (q.k and the v sum)
    import re

    import torch

    d = head_dim or 64
    flag = [] if head_dim is None else ["--head-dim", str(head_dim)]
    assert main(["masks", "stats", "causal & window(37)", "--length", "300", "--block", "64", *flag]) == 0
    out = capsys.readouterr().out
    q, k = torch.arange(300).view(-1, 1), torch.arange(300).view(1, -1)
    allowed = torch.zeros(320, 320, dtype=torch.bool)
    allowed[:300, :300] = (k <= q) & (k > q - 37)
    empty = allowed.unflatten(0, (5, 64)).unflatten(2, (5, 64)).sum((1, 3)) == 0  # (5, 5) tiles
    sizes = torch.tensor([64, 64, 64, 64, 44])
    skipped = int((empty * sizes[:, None] * sizes[None]).sum())
    said = re.search(r"skips ([\d.]+)% of the scores \(([\d.]+) GFLOP forward per batch item and head at head dim "
                     r"(\d+): 4 x (\d+) FLOPs a score\)", out)
    assert said, out
    assert f"{int(allowed.sum()):,} of 90,000 scores" in out and f"{int(empty.sum())} empty" in out
    assert said[1] == f"{100 * skipped / 90000:.2f}" and said[2] == f"{4 * d * skipped / 1e9:.3f}"
    assert int(said[3]) == int(said[4]) == d


# --- the first hour (issue 16) ------------------------------------------------------------------------
def test_version(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("maskattn ")


def test_show_config_gives_every_setting_its_comment(capsys):
    # config.describe promised comments; on main --show-config printed bare `key = value` lines
    from maskattn.tasks.base import tasks

    for name in tasks():
        assert main(["train", name, "--show-config"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines and all("  # " in line for line in lines), [line for line in lines if "  # " not in line]
    assert main(["train", "lm", "--show-config"]) == 0
    assert "train.keep = 2  # step checkpoints kept" in capsys.readouterr().out


def test_masks_show_into_a_closed_pipe_stops_quietly():
    # on main `maskattn masks show ... | head` ended in a BrokenPipeError traceback
    proc = subprocess.Popen([sys.executable, "-m", "maskattn", "masks", "show", "causal", "--length", "1024"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141) and "Traceback" not in err and "BrokenPipe" not in err


def test_rank_other_than_zero_prints_nothing_and_quiet_silences_messages(monkeypatch, tmp_path, capsys):
    import dataclasses

    from maskattn import distributed
    from maskattn.tasks import base
    from maskattn.tasks.common import log_stderr

    def fake_train(cfg, *, resume=False):
        log_stderr("a progress message")
        return {"loss": 1.0}

    monkeypatch.setitem(base._REGISTRY, "lm", dataclasses.replace(base.get("lm"), train=fake_train))
    assert main(["train", "lm", "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"loss": 1.0} and "a progress message" in captured.err
    assert main(["-q", "train", "lm", "--out", str(tmp_path / "b")]) == 0
    assert "a progress message" not in capsys.readouterr().err
    monkeypatch.setattr(distributed, "init", lambda: distributed.Context(rank=1, world_size=2))
    assert main(["train", "lm", "--out", str(tmp_path / "c")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "a progress message" not in captured.err


def test_path_shortcuts_keep_any_unicode(capsys):
    # json.dumps escaped characters outside the BMP as surrogate pairs, which TOML refuses: the path came out mangled
    path = "data/😀 données.tsv"
    assert main(["train", "lm", "--train", path, "--out", "runs/ü😀", "--show-config"]) == 0
    shown = capsys.readouterr().out
    assert f"data.train = {path!r}" in shown and "out = 'runs/ü😀'" in shown


def test_verbose_and_quiet_also_after_the_command(tmp_path, capsys):
    # "unrecognized arguments: -v": they were accepted only before the command
    from maskattn.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["masks", "show", "causal", "-v", "-v"]).verbose == 2
    assert parser.parse_args(["-q", "showcase"]).quiet is True
    assert parser.parse_args(["showcase", "-q"]).quiet is True
    assert parser.parse_args(["showcase"]).verbose == 0 and parser.parse_args(["showcase"]).quiet is False
    # -v shows the traceback of a user error, and keeps its status (it was raised: exit 1, the status of a leak)
    capsys.readouterr()
    assert main(["train", "lm", "--train", str(tmp_path / "missing.txt"), "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "FileNotFoundError" in err
    assert err.rstrip().splitlines()[-1].startswith("maskattn train: ") and "missing.txt" in err.splitlines()[-1]
    assert main(["-v", "translate", str(tmp_path / "nothing"), "x"]) == 2


def test_an_abbreviated_flag_is_refused_not_read_as_the_flag_it_begins(tmp_path, capsys):
    # argparse took any unambiguous prefix: `train lm --res` trained with --resume, `--over` deleted the old run
    # (--overwrite), `--pre DIR` was --pretrained, `compress --prune 0.5` --prune-heads; a flag added later that
    # shares the prefix would silently change what an old command means
    for argv, short in ((["train", "lm", "--res", "--show-config"], "--res"),
                        (["train", "lm", "--over", "--show-config"], "--over"), (["demo", "--ste", "5"], "--ste"),
                        (["masks", "stats", "causal", "--len", "64"], "--len"),
                        (["compress", str(tmp_path), "--out", str(tmp_path / "o"), "--prune", "0.5"], "--prune")):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2, argv
        assert f"error: unrecognized arguments: {short}" in capsys.readouterr().err
    # the full flags, `--flag=value`, and -v grouped as -vv still parse
    from maskattn.cli import build_parser

    args = build_parser().parse_args(["-vv", "train", "lm", "--resume", "--out=runs/x", "--set=train.lr=0.1"])
    assert (args.verbose, args.resume, args.out, args.set) == (2, True, "runs/x", ["train.lr=0.1"])


def test_a_path_flag_and_a_set_of_its_setting_together_are_refused(capsys):
    # `--out a --set out=b` trained into a, and so did `--set out=b --out a`: the flag won whatever the order,
    # though --out is documented as "same as --set out=..." and of two --set the later wins
    for argv, flag, key in ((["--out", "a", "--set", "out=b"], "--out a", "out"),
                            (["--set", "out=b", "--out", "a"], "--out a", "out"),
                            (["--train", "x.txt", "--set", "data.train=y.txt"], "--train x.txt", "data.train"),
                            (["--set", " data.valid = v.txt", "--valid", "w.txt"], "--valid w.txt", "data.valid")):
        assert main(["train", "lm", *argv, "--show-config"]) == 2, argv
        assert capsys.readouterr().err == (f"maskattn train: {flag} and --set {key}=... both set {key}; "
                                           "give one of them\n")
    # each alone, and a --set of another setting beside the flag, are as before
    assert main(["train", "lm", "--out", "a", "--set", "data.train=y.txt", "--show-config"]) == 0
    shown = capsys.readouterr().out
    assert "out = 'a'" in shown and "data.train = 'y.txt'" in shown


def test_settings_combine_as_the_readme_says(tmp_path, capsys):
    # README: the task's defaults, then --config, then --set (the later of two --set wins); --out and the path
    # flags are --set assignments. Oracle: the resolved settings `--show-config` prints, read as TOML.
    import tomllib

    from maskattn.tasks.base import tasks

    run = tmp_path / "run.toml"
    run.write_text('out = "from-file"\n[train]\nlr = 0.5\nsteps = 7\nwarmup = 3\n[data]\ntrain = "file.txt"\n'
                   'block = 32\n')

    def resolved(*argv):
        assert main(["train", "lm", *argv, "--show-config"]) == 0
        return tomllib.loads(capsys.readouterr().out)

    default = tasks()["lm"].config()
    got = resolved("--config", str(run), "--set", "train.lr=0.25", "--set", "train.steps=9", "--set",
                   "train.steps=11", "--out", "from-flag", "--train", "flag.txt")
    assert got["train"]["lr"] == 0.25 and got["train"]["steps"] == 11  # --set over the file; the later --set
    assert got["train"]["warmup"] == 3 and got["data"]["block"] == 32  # the file over the defaults
    assert got["out"] == "from-flag" and got["data"]["train"] == "flag.txt"  # a flag over the file
    assert got["train"]["weight_decay"] == default.train.weight_decay  # in neither: the task's default
    assert got["model"]["d_model"] == default.model.d_model
    got = resolved("--set", "train.lr=-0", "--set", "train.lr=3E-4", "--set", "train.betas=[0.8, 0.9]",
                   "--set", "out=runs/a b", "--set", 'data.documents="paragraphs"')
    assert (got["train"]["lr"], got["train"]["betas"]) == (3e-4, [0.8, 0.9])
    assert (got["out"], got["data"]["documents"]) == ("runs/a b", "paragraphs")


def test_a_missing_subcommand_is_named_by_its_choices_not_an_internal_name(capsys):
    # `maskattn masks` said "the following arguments are required: masks_command", the parser's own attribute
    with pytest.raises(SystemExit) as stopped:
        main(["masks"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.endswith("maskattn masks: error: the following arguments are required: "
                                            "{show,stats}\n")


def test_train_help_says_which_tasks_read_each_path_flag(capsys):
    # every task's path flags were listed as if any task read them: `train caption --help` offered --train-src
    from maskattn.tasks.base import tasks

    with pytest.raises(SystemExit):
        main(["train", "caption", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    for name in ("train_src", "train", "pretrained", "embeddings"):
        readers = ", ".join(t.name for t in tasks().values() if name in t.paths)
        assert f"shortcut for --set data.{name}=PATH ({readers})" in shown, name
    assert "shortcut for --set data.pretrained=PATH (classification, qa)" in shown


def test_a_second_config_file_is_refused_not_read_instead_of_the_first(tmp_path, capsys):
    # `--config base.toml --config lr.toml` read lr.toml alone: base.toml's settings were dropped without a word
    (tmp_path / "base.toml").write_text("[train]\nsteps = 7\n")
    (tmp_path / "lr.toml").write_text("[train]\nlr = 0.5\n")
    with pytest.raises(SystemExit) as stopped:
        main(["train", "lm", "--config", str(tmp_path / "base.toml"), "--config", str(tmp_path / "lr.toml"),
              "--show-config"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --config: given twice ({tmp_path / 'base.toml'}, {tmp_path / 'lr.toml'})" in err
    assert main(["train", "lm", "--config", str(tmp_path / "base.toml"), "--show-config"]) == 0
    assert "train.steps = 7" in capsys.readouterr().out


def test_help_after_a_positional_and_no_arguments_at_all(capsys):
    # regression: -h after a command's positional still shows that command's help (status 0); no command at
    # all is a usage error naming what is missing (status 2)
    for argv, usage in ((["train", "lm", "-h"], "usage: maskattn train "),
                        (["masks", "show", "causal", "--help"], "usage: maskattn masks show "),
                        (["translate", "some/model", "Ein Mann.", "-h"], "usage: maskattn translate ")):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 0 and capsys.readouterr().out.startswith(usage), argv
    with pytest.raises(SystemExit) as stopped:
        main([])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.endswith("maskattn: error: the following arguments are required: command\n")


def test_every_commands_help_says_what_it_does_and_the_defaults_it_runs_with(capsys):
    # `maskattn translate --help` (and classify, answer, generate, caption, evaluate, showcase, masks, masks stats)
    # listed its flags without a word of what the command does; generate's --temperature (0.8: it samples) and
    # --seed, translate's --nbest, audit / showcase / masks show --length and --q-offset ran with defaults their
    # help did not give. Oracle: the parser itself: each command's description (else its line in the list of
    # commands), and each flag's default.
    import argparse
    import re

    from maskattn.cli import build_parser

    def commands(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for listed in action._choices_actions:
                    yield [*path, listed.dest], action.choices[listed.dest]
                    yield from commands(action.choices[listed.dest], [*path, listed.dest])

    found = list(commands(build_parser(), []))
    assert len(found) >= 16
    for path, parser in found:
        with pytest.raises(SystemExit):
            main([*path, "--help"])
        shown = capsys.readouterr().out
        assert parser.description and "".join(parser.description.split()) in "".join(shown.split()), path  # (wrapped)
        for action in parser._actions:
            default = action.default
            if not action.option_strings or default in (None, argparse.SUPPRESS) or default is False or default == [] \
                    or isinstance(action, argparse._HelpAction):
                continue
            said = re.search(r"default:? ([^;),]+)", action.help or "")
            assert said, (path, action.option_strings)
            if isinstance(default, (int, float)):
                assert float(said[1].split(":")[0]) == default, (path, action.option_strings, said[1])
            elif default.strip():
                assert said[1] == default, (path, action.option_strings, said[1])
