"""Bad input at the command line is one line naming it and exit status 2, never a traceback (issue 16).

Each case printed a Python traceback or an internal message on main.
"""

import gzip
import re

import pytest

from maskattn import cli
from maskattn.cli import main


def _run(argv, capsys):
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors: usage line + one error line
        status = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


def _files(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("Grüße aus Köln\n".encode("latin-1"))
    (tmp_path / "huge.tsv").write_text("sentence\tlabel\nfine\t1\n" + "x" * 200_000 + "\t0\n")
    (tmp_path / "fake.gz").write_text("ein\tone\n")
    (tmp_path / "file").write_text("x")
    (tmp_path / "labelled.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    (tmp_path / "header.tsv").write_text("sentence\tlabel\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nosquad.json").write_text('{"version": "1.1", "data": []}')
    (tmp_path / "dir").mkdir()
    qa = tmp_path / "qa_model"
    qa.mkdir()
    (qa / "task.json").write_text('{"task": "qa", "max_len": 32, "stride": 16, "max_answer": 5}')
    return tmp_path


CASES = {
    "non-UTF-8 input": (["train", "lm", "--train", "{t}/latin1.txt"], r"latin1\.txt:1: not UTF-8 text"),
    "200k-character TSV field": (["train", "classification", "--train", "{t}/huge.tsv"],
                                 r"huge\.tsv:3: field larger than field limit"),
    ".gz that is not gzip": (["train", "translation", "--train-src", "{t}/fake.gz"], r"fake\.gz: not a gzip file"),
    "--train for translation": (["train", "translation", "--train", "{t}/file"],
                                r"--train is not read by the translation task; it reads --train-src, --train-tgt"),
    "header-only --valid": (["train", "classification", "--train", "{t}/labelled.tsv", "--valid", "{t}/header.tsv"],
                            r"data\.valid \(.*header\.tsv\): the file holds no examples"),
    "empty --valid-src": (["train", "translation", "--train-src", "{t}/file", "--train-tgt", "{t}/file",
                           "--valid-src", "{t}/empty.txt", "--valid-tgt", "{t}/empty.txt"],
                          r"data\.valid_src \(.*empty\.txt\): the file holds no sentence pairs"),
    "no questions in --valid": (["train", "qa", "--train", "{t}/nosquad.json", "--valid", "{t}/nosquad.json",
                                 "--pretrained", "{t}/dir"],
                                r"data\.valid \(.*nosquad\.json\): the file holds no questions"),
    "--config DIR": (["train", "lm", "--config", "{t}/dir"], r"--config .*dir: a directory"),
    "--out FILE": (["train", "lm", "--train", "{t}/file", "--out", "{t}/file"], r"is a file, not a directory"),
    "--out FILE/sub": (["train", "lm", "--train", "{t}/file", "--out", "{t}/file/sub"], r"file is a file"),
    "viz --out FILE": (["viz", "{t}/dir", "--input", "x", "--out", "{t}/file"], r"viz --out .*: a file"),
    "evaluate --predictions DIR": (["evaluate", "{t}/qa_model", "--data", "x.json", "--predictions", "{t}/dir"],
                                   r"--predictions .*dir: a directory"),
    "masks stats --block 0": (["masks", "stats", "causal", "--block", "0"], r"expected a positive integer, got 0"),
    "masks stats document(3)": (["masks", "stats", "document(3)", "--length", "16"],
                                r"doc_ids covers 3 positions but the call needs 16"),
    "~ x 5000": (["masks", "show", "~" * 5000 + "causal"], r"nests ~ and parentheses more than 100 deep"),
    "window(10^26)": (["masks", "show", f"window({10**26})"], r"too large for an argument of window\(\)"),
    "q_offset 2**63": (["masks", "show", "causal", "--keys", "4", "--q-offset", str(2**63)],
                       r"positions must stay below 2\*\*62"),
    "audit --length -3": (["audit", "--length", "-3"], r"expected a positive integer, got -3"),
    "showcase --length 0": (["showcase", "--length", "0"], r"expected a positive integer, got 0"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_naming_it(case, tmp_path, capsys):
    argv, message = CASES[case]
    t = _files(tmp_path)
    status, err = _run([a.replace("{t}", str(t)) for a in argv], capsys)
    assert status == 2
    lines = err.strip().splitlines()
    if lines[0].startswith("usage:"):  # argparse: its usage, then one error line
        assert re.search(message, lines[-1]) and lines[-1].startswith("maskattn "), err
    elif case.startswith(("~", "window")):  # a syntax error: one line, then the expression and a caret
        assert re.search(message, lines[0]) and lines[-1].strip() == "^", err
    else:
        assert len(lines) == 1 and re.search(message, lines[0]), err


def test_a_bug_shows_its_traceback_instead_of_posing_as_a_usage_error(monkeypatch):
    # on main, cli.main turned every KeyError / TypeError into "exit 2" without a traceback
    def broken(args):
        return {}["missing"]

    monkeypatch.setattr(cli, "_showcase", broken)
    with pytest.raises(KeyError):
        main(["showcase"])


def test_gzip_data_still_reads(tmp_path):
    from maskattn.data import read_parallel

    with gzip.open(tmp_path / "pairs.tsv.gz", "wt", encoding="utf-8") as f:
        f.write("ein\tone\nzwei\ttwo\n")
    assert read_parallel(tmp_path / "pairs.tsv.gz") == [("ein", "one"), ("zwei", "two")]


@pytest.mark.parametrize("missing, extra", [("onnxscript", "onnx"), ("transformers", "hf"), ("sklearn", "caption")])
def test_a_missing_optional_package_is_one_line_naming_its_extra(monkeypatch, capsys, missing, extra):
    # the first install line has no extras: export --format onnx, audit of an HF directory, train caption gave
    # a raw ModuleNotFoundError traceback (exit 1)
    def needs(args):
        raise ModuleNotFoundError(f"No module named '{missing}'", name=missing)

    monkeypatch.setattr(cli, "_showcase", needs)
    assert main(["showcase"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"maskattn showcase: No module named '{missing}'; pip install 'maskattn[{extra}]'"]


def test_an_import_error_of_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise ModuleNotFoundError("No module named 'maskattn.nothing'", name="maskattn.nothing")

    monkeypatch.setattr(cli, "_showcase", broken)
    with pytest.raises(ModuleNotFoundError):
        main(["showcase"])


def test_compress_and_average_write_only_new_model_directories(tmp_path, capsys):
    # compress --out <another task's model> replaced it without a word, and --out <a folder> mixed files into it
    from maskattn.models import DecoderLM, DecoderLMConfig
    from maskattn.tasks.common import write_task
    from maskattn.tokenization import Tokenizer

    tok = Tokenizer.train_chars(["abc"])
    for name in ("a", "b", "old"):
        model = DecoderLM(DecoderLMConfig.preset("tiny", vocab_size=tok.vocab_size))
        model.save(tmp_path / name, tokenizer=tok.backend)
        write_task(tmp_path / name, {"task": "lm", "documents": "none", "block": 8})
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    soup = ["average", "--models", str(tmp_path / "a"), str(tmp_path / "b"), "--out"]
    assert main([*soup, str(tmp_path / "old")]) == 2
    assert "is not empty" in capsys.readouterr().err and (tmp_path / "old" / "task.json").is_file()
    assert main([*soup, str(tmp_path / "notes"), "--overwrite"]) == 2
    assert "mine.txt, which is not part of a model directory" in capsys.readouterr().err
    assert main([*soup, str(tmp_path / "a"), "--overwrite"]) == 2  # never the input itself
    assert "it holds the input" in capsys.readouterr().err and (tmp_path / "a" / "config.json").is_file()
    before = (tmp_path / "old" / "model.safetensors").read_bytes()
    # a replacing command that fails puts the old model back
    assert main(["compress", str(tmp_path / "a"), "--out", str(tmp_path / "old"), "--overwrite", "--prune-heads",
                 "0.5"]) == 2
    assert "its models can be quantised (--int8) but not pruned" in capsys.readouterr().err
    assert (tmp_path / "old" / "model.safetensors").read_bytes() == before
    assert main([*soup, str(tmp_path / "old"), "--overwrite"]) == 0
    assert (tmp_path / "old" / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert main(["compress", str(tmp_path / "a"), "--out", str(tmp_path / "old"), "--int8"]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_text_that_is_not_utf8_is_one_error_naming_it(monkeypatch, capsys):
    # bytes that are not UTF-8 reach Python as lone surrogates: the tokenizer raised a TypeError traceback
    import io

    from maskattn.tasks.base import input_lines

    assert main(["masks", "show", "caus\udce9al"]) == 2
    assert "argument expression: not UTF-8 text (byte b'\\xe9' at character 4)" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("Ein Mann.\r\nzwei\n"))
    assert input_lines([]) == ["Ein Mann.", "zwei"]  # CRLF lines read as the same text as LF ones
    monkeypatch.setattr("sys.stdin", io.StringIO("drei\n"))
    assert input_lines(["-"]) == ["drei"]  # "-" alone is stdin, as for any Unix tool
    monkeypatch.setattr("sys.stdin", io.StringIO("gut\nca\udce9\n"))
    with pytest.raises(cli.UsageError, match="stdin line 2: not UTF-8 text at character 2"):
        input_lines([])


def test_text_from_stdin_reads_a_byte_order_mark_as_the_data_readers_do(monkeypatch, tmp_path):
    """A file saved by Notepad, piped to `translate`/`classify`, began its first sentence with U+FEFF, which
    `evaluate` of the same file (data.open_text) drops: line 1 was tokenised differently."""
    import io

    from maskattn.data import read_text
    from maskattn.tasks.base import input_lines

    raw = "\ufeffEin Mann schl\u00e4ft.\r\nZwei \ufeffHunde.\n".encode()
    (tmp_path / "x.de").write_bytes(raw)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    expected = ["Ein Mann schl\u00e4ft.", "Zwei \ufeffHunde."]  # only a mark that begins the text
    assert input_lines([]) == read_text(tmp_path / "x.de").splitlines() == expected


def test_ctrl_c_is_one_line_and_the_shells_status(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_masks_show", interrupted)
    assert main(["masks", "show", "causal"]) == 130
    assert capsys.readouterr().err.strip() == "maskattn masks: interrupted"


def test_lengths_beyond_what_a_command_can_draw_or_count_are_refused(capsys):
    # `masks show causal --length 100000` was killed for memory (21 GB); stats, showcase and audit tracebacks
    cases = ((["masks", "show", "causal", "--length", "100000"], "masks show draws at most 1024 queries and keys"),
             (["masks", "show", "causal", "--keys", "5000"], "--keys 5000"),
             (["masks", "show", "causal", "--q-offset", "-5"], "--q-offset must be >= 0, got -5"),
             (["masks", "stats", "causal", "--length", "9999999", "--block", "1"],
              "tiles, more than the 67,108,864 stats counts"),
             # few tiles, but killed for memory after a minute (per-position work)
             (["masks", "stats", "causal & window(256)", "--length", "2000000000", "--block", "1000000"],
              "masks stats counts at most 16,777,216 positions"),
             (["showcase", "--length", "100000"], "the showcase draws at most 1024 positions"),
             (["audit", "--length", "100000"], "--length 100000: more than the"))
    for args, expected in cases:
        assert main(args) == 2
        assert expected in capsys.readouterr().err
    assert main(["masks", "show", "causal", "--length", "1024", "--keys", "4"]) == 0


def test_small_cli_inputs_that_were_accepted_or_crashed(tmp_path, capsys):
    # --seed 99999999999999999999999: "Overflow when unpacking long long"; masks show --png DIR printed
    # "wrote DIR" after writing DIR.png, --png "" wrote nothing, --png x.txt failed after printing
    (tmp_path / "pics").mkdir()
    with pytest.raises(SystemExit) as bad:
        main(["demo", "--seed", "99999999999999999999999"])
    said = capsys.readouterr().err
    assert bad.value.code == 2 and "a seed must be an int in [0, 2**63), got 99999999999999999999999" in said
    cases = ((["masks", "show", "causal", "--png", str(tmp_path / "pics")], "a directory, expected a file"),
             (["masks", "show", "causal", "--png", ""], "--png: an empty path"),
             (["masks", "show", "causal", "--png", str(tmp_path / "x.txt")], "name a .png (or .svg, .pdf) file"))
    for args, expected in cases:
        assert main(args) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()


def test_masks_show_counts_the_keys_a_q_offset_adds(capsys):
    # without --keys, the keys are --q-offset + --length, but the 1024-key limit read --length alone: `--length 3
    # --q-offset 5000` drew 5003 columns and `--q-offset 100000000` ran for minutes building a 10**8-key picture
    assert main(["masks", "show", "causal", "--length", "3", "--q-offset", "5000"]) == 2
    assert "--length 3 / --q-offset 5000: 5003 keys; masks show draws at most 1024" in capsys.readouterr().err
    assert main(["masks", "show", "causal", "--length", "3", "--q-offset", "100000000"]) == 2
    capsys.readouterr()
    assert main(["masks", "show", "causal", "--length", "3", "--q-offset", "1021"]) == 0
    shown = capsys.readouterr().out  # the oracle: 1024 keys, row q (absolute) sees keys 0..q
    assert "[Lq=3, Lk=1024, q_offset=1021]" in shown
    rows = [line.split()[2:] for line in shown.splitlines() if line.startswith("  q ")]
    assert [row.count("■") for row in rows] == [1022, 1023, 1024]


def test_masks_stats_refuses_a_tile_larger_than_it_counts(capsys):
    # `masks stats causal --length 1 --block 100000000000` padded the one position to a 10**11-position tile: a
    # RuntimeError traceback "you tried to allocate 800000000000 bytes"
    status, err = _run(["masks", "stats", "causal", "--length", "1", "--block", "100000000000"], capsys)
    assert status == 2
    assert err.strip() == ("maskattn masks: --block 100000000000: masks stats takes tiles of at most 16,777,216 "
                           "positions (2**24)")
    assert main(["masks", "stats", "causal", "--length", "3", "--block", "4"]) == 0  # one tile larger than the mask
    assert "Lq=3 Lk=3: density 66.67% (6 of 9 scores)" in capsys.readouterr().out  # the oracle: 1+2+3 of 3*3


def test_train_passes_an_empty_out_or_data_flag_on_instead_of_dropping_it(tmp_path, monkeypatch, capsys):
    # `train lm --out ""` was read as no --out: the run went to the default runs/lm of the working directory, exit 0;
    # `--train ""` likewise fell back to data.train of --config
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("To be, or not to be, that is the question.\n" * 50)
    (tmp_path / "run.toml").write_text('[data]\ntrain = "text.txt"\n')
    tiny = [a for s in ("train.steps=1", "train.progress=false", "model.num_layers=1", "model.d_model=16",
                        "model.d_ff=16", 'data.tokenizer="chars"') for a in ("--set", s)]
    status, err = _run(["train", "lm", "--out", "", "--train", "text.txt", *tiny], capsys)
    assert (status, err.strip()) == (2, "maskattn train: out is empty: name the run directory (--out DIR or --set "
                                        "out=DIR)")
    status, err = _run(["train", "lm", "--config", "run.toml", "--train", "", "--out", "run", *tiny], capsys)
    assert (status, err.strip()) == (2, "maskattn train: data.train is required (a plain text file)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.toml", "text.txt"]  # no run written anywhere


def test_an_empty_output_or_data_path_is_refused_naming_the_flag(tmp_path, monkeypatch, capsys):
    # `viz MODEL --input x --out ""` wrote its 16 pictures and explorer.html into the working directory ("wrote 16
    # files to ; open explorer.html"), exit 0; `evaluate --data ""` said ". is a directory"
    from maskattn.models import DecoderLM, DecoderLMConfig
    from maskattn.tokenization import Tokenizer

    tok = Tokenizer.train_chars(["abc"])
    DecoderLM(DecoderLMConfig.preset("tiny", vocab_size=tok.vocab_size)).save(tmp_path / "model", tokenizer=tok)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    model = str(tmp_path / "model")
    for argv, flag in ((["viz", model, "--input", "ab", "--out", ""], "--out"),
                       (["evaluate", model, "--data", ""], "--data"),
                       (["average", "--models", model, model, "--out", " "], "--out"),
                       (["compress", model, "--int8", "--out", ""], "--out")):
        status, err = _run(argv, capsys)
        assert status == 2 and f"error: argument {flag}: an empty path" in err.splitlines()[-1], (argv, err)
    assert list(work.iterdir()) == []
    assert main(["viz", model, "--input", "ab", "--out", "pics"]) == 0  # the oracle: what an --out gets
    assert (work / "pics" / "explorer.html").is_file()


def test_out_of_memory_is_one_line_naming_the_sizes_given(tmp_path, monkeypatch, capsys):
    # `train lm --set model.max_len=100000000000` (or d_model, d_ff; `translate --beam 10**11`) ended in the CPU
    # allocator's RuntimeError traceback from inside nn.Parameter
    import torch

    (tmp_path / "text.txt").write_text("To be, or not to be, that is the question.\n" * 50)
    status, err = _run(["train", "lm", "--train", str(tmp_path / "text.txt"), "--out", str(tmp_path / "run"),
                        "--set", 'data.tokenizer="chars"', "--set", "model.max_len=100000000000"], capsys)
    assert status == 1
    assert re.fullmatch(r"maskattn train: out of memory \([\d,.]+ GiB asked for\); lower the sizes given "
                        r"\(--set data.tokenizer=\"chars\", --set model.max_len=100000000000\)", err.strip()), err

    def cuda_oom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has ...")

    monkeypatch.setattr(cli, "_showcase", cuda_oom)
    status, err = _run(["showcase", "--length", "8"], capsys)
    assert (status, err.strip()) == (1, "maskattn showcase: out of memory (20.00 GiB asked for); lower the sizes "
                                        "given (--length 8)")

    def bug(args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(cli, "_showcase", bug)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):  # any other RuntimeError is a bug: traceback
        main(["showcase"])


@pytest.mark.parametrize("value", ["", "x", "-1"])
def test_a_rank_variable_set_by_hand_is_one_error_naming_it(value, monkeypatch, capsys):
    # RANK= (set by hand, not by torchrun) was "ValueError: invalid literal for int() with base 10: ''", a traceback
    # from every command, as WORLD_SIZE and LOCAL_RANK were before 7b9d140
    monkeypatch.setenv("RANK", value)
    with pytest.raises(SystemExit) as caught:
        main(["masks", "show", "causal", "--length", "3"])
    assert caught.value.code == 2
    assert f"environment variable RANK={value!r}: expected an int >= 0" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    assert main(["masks", "show", "causal", "--length", "3"]) == 0


def test_a_home_directory_written_where_no_shell_expands_it_is_the_home_directory(tmp_path, monkeypatch, capsys):
    # a shell expands `~` only at the start of a word: `--out=~/runs/x`, `--png=~/m.png`, `--set out=~/x` and a
    # TOML `out = "~/x"` reached the program as typed, and a directory named `~` was made in the working
    # directory (`rm -rf ~` is how a user then deletes it). Oracle: os.path.expanduser with HOME set here.
    import os
    import tomllib

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert os.path.expanduser("~/m.png") == str(home / "m.png")
    assert main(["masks", "show", "causal", "--length", "2", "--png=~/m.png"]) == 0
    assert (home / "m.png").is_file() and not (work / "~").exists()
    assert f"wrote {home / 'm.png'}" in capsys.readouterr().out
    (home / "run.toml").write_text('out = "~/from-file"\n')
    for argv, key, expected in ((["--out=~/runs/x"], "out", home / "runs" / "x"),
                                (["--set", "out=~/runs/y"], "out", home / "runs" / "y"),
                                (["--train=~/t.txt"], "train", home / "t.txt"),
                                (["--set", "data.valid=~"], "valid", home),
                                (["--config=~/run.toml"], "out", home / "from-file")):
        assert main(["train", "lm", *argv, "--show-config"]) == 0, argv
        shown = tomllib.loads(capsys.readouterr().out)
        assert (shown["out"] if key == "out" else shown["data"][key]) == str(expected), argv
    # text is not a path: a mask expression's `~` and a user name that is not one stay as typed
    assert main(["masks", "show", "~causal", "--length", "2"]) == 0
    assert main(["train", "lm", "--set", "out=runs/~x", "--show-config"]) == 0
    assert "out = 'runs/~x'" in capsys.readouterr().out


def test_an_empty_config_path_is_refused_naming_the_flag(capsys):
    # `--config ""` said "--config .: a directory", a path the user never typed
    status, err = _run(["train", "lm", "--config", "", "--show-config"], capsys)
    assert status == 2 and "argument --config: an empty path ('')" in err and "--config ." not in err


def test_an_error_that_names_its_command_is_not_prefixed_with_it_twice(tmp_path, capsys):
    # compress's own checks begin "compress: ", and the command line put its "maskattn compress: " before them:
    # "maskattn compress: compress: nothing to do; ..."
    status, err = _run(["compress", str(tmp_path / "model"), "--out", str(tmp_path / "out")], capsys)
    assert status == 2 and err.startswith("maskattn compress: nothing to do; give --int8")


@pytest.mark.parametrize(("code", "status"), [("ENOSPC", 1), ("EDQUOT", 1), ("EROFS", 2)])
@pytest.mark.parametrize("rust", [False, True], ids=["python", "safetensors"])
def test_a_full_disk_or_read_only_output_is_one_line_and_leaves_the_old_model(tmp_path, capsys, monkeypatch, code,
                                                                             status, rust):
    # a full disk (or a read-only one) under `compress` / `average` / `export` was a traceback: OSError, or
    # safetensors' own SafetensorError carrying "(os error 28)"
    import errno
    import os

    from safetensors import SafetensorError

    from maskattn.models import DecoderLM, DecoderLMConfig, persistence
    from maskattn.tasks.common import write_task
    from maskattn.tokenization import Tokenizer

    tok = Tokenizer.train_chars(["abc"])
    for name in ("a", "b", "old"):
        DecoderLM(DecoderLMConfig.preset("tiny", vocab_size=tok.vocab_size)).save(tmp_path / name,
                                                                                   tokenizer=tok.backend)
        write_task(tmp_path / name, {"task": "lm", "documents": "none", "block": 8})
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    number = getattr(errno, code)

    def full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")  # what a writer leaves before the disk fills
        if rust:
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(number)} (os error {number})")
        raise OSError(number, os.strerror(number), str(path))

    monkeypatch.setattr(persistence, "save_file", full)
    for argv in (["compress", str(tmp_path / "a"), "--int8", "--out", str(tmp_path / "old"), "--overwrite"],
                 ["average", "--models", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "new")]):
        got, err = _run(argv, capsys)
        assert got == status
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"maskattn {argv[0]}: could not write ")
        assert os.strerror(number) in lines[0] and str(tmp_path) in lines[0]
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _tiny_lm(directory):
    from maskattn.models import DecoderLM, DecoderLMConfig
    from maskattn.tasks.common import write_task
    from maskattn.tokenization import Tokenizer

    tok = Tokenizer.train_chars(["abc"])
    DecoderLM(DecoderLMConfig.preset("tiny", vocab_size=tok.vocab_size)).save(directory, tokenizer=tok.backend)
    write_task(directory, {"task": "lm", "documents": "none", "block": 8})
    return str(directory)


def test_generate_and_average_name_the_flags_typed_not_the_python_parameters(tmp_path, capsys):
    # `generate --max-new-tokens 0` said "max_new_tokens must be a positive int", `--top-k 0` "top_k must be ...",
    # `--seed -1` "seed must be ..."; `average --last 0` "last must be an int >= 1", `average --models ONE`
    # "models: give at least two ...": Python names the user never typed
    import maskattn
    from maskattn.averaging import average_models, average_run
    from maskattn.tasks import lm

    model = _tiny_lm(tmp_path / "m")
    out = str(tmp_path / "out")
    cases = ((["generate", model, "--max-new-tokens", "0"],
              "argument --max-new-tokens: expected a positive integer, got 0"),
             (["generate", model, "--top-k", "0"], "argument --top-k: expected a positive integer, got 0"),
             (["generate", model, "--seed", "-1"], "argument --seed: a seed must be an int in [0, 2**63), got -1"),
             (["generate", model, "--top-p", "2"], "argument --top-p: expected a number in (0, 1], got 2.0"),
             (["generate", model, "--top-p", "nan"], "argument --top-p: expected a number in (0, 1], got nan"),
             (["generate", model, "--top-p", "0"], "argument --top-p: expected a number in (0, 1], got 0.0"),
             (["generate", model, "--temperature", "inf"],
              "argument --temperature: expected a finite number >= 0 (0: greedy), got inf"),
             (["generate", model, "--temperature", "-1"],
              "argument --temperature: expected a finite number >= 0 (0: greedy), got -1.0"),
             (["average", str(tmp_path), "--last", "0", "--out", out],
              "argument --last: expected a positive integer, got 0"),
             (["average", "--models", model, "--out", out],
              "maskattn average: --models: give at least two model directories to average, got 1"))
    for argv, expected in cases:
        status, err = _run(argv, capsys)
        assert status == 2 and expected in err, (argv, err)
        assert not re.search(r"max_new_tokens|top_k|top_p|(?<!a )seed must|\blast must|(?<!--)models:", err), err
    # the values the checks let through run, as the library runs them (the oracle: lm.generate called directly)
    assert main(["generate", model, "--prompt", "ab", "--max-new-tokens", "3", "--top-k", "2", "--top-p", "1",
                 "--temperature", "0.5", "--seed", "7"]) == 0
    loaded, tok, _ = lm.load(model)
    assert capsys.readouterr().out.rstrip("\n") == lm.generate(loaded, tok, "ab", max_new_tokens=3, temperature=0.5,
                                                               top_k=2, top_p=1.0, seed=7)
    # Python callers keep the names of their parameters
    with pytest.raises(ValueError, match=r"^max_new_tokens must be a positive int, got 0"):
        lm.generate(loaded, tok, "ab", max_new_tokens=0)
    with pytest.raises(ValueError, match=r"^last must be an int >= 1, got 0"):
        average_run(tmp_path, 0, out)
    with pytest.raises(ValueError, match=r"^models: give at least two model directories to average, got 1"):
        average_models([model], out)
    assert maskattn.cli.positive_int("3") == 3 and maskattn.cli.seed_int("0") == 0  # still where they were


def test_a_missing_model_directory_is_named_missing_not_a_model_directory(tmp_path, monkeypatch, capsys):
    # `maskattn translate "~/x/model" hi` (quoted: expanded by the command line) said "/home/u/x/model: not a model
    # directory", and viz / audit / export / average "/home/u/x/model/config.json: file not found", where nothing is
    import os

    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    missing = os.path.expanduser("~/x/model")  # the oracle: the home directory, and nothing there
    assert missing == str(home / "x" / "model") and not os.path.lexists(missing)
    commands = (["translate", "{m}", "hi"], ["generate", "{m}"], ["classify", "{m}", "hi"],
                ["answer", "{m}", "--question", "q", "--context", "c"], ["evaluate", "{m}", "--data", "d.txt"],
                ["viz", "{m}", "--input", "hi", "--out", str(tmp_path / "viz")], ["audit", "{m}"],
                ["export", "{m}", "--out", str(tmp_path / "m.onnx")],
                ["compress", "{m}", "--int8", "--out", str(tmp_path / "small")],
                ["average", "--models", "{m}", "{m}2", "--out", str(tmp_path / "soup")])
    for given, expected in (("~/x/model", f"{missing}: no such directory, expected a model directory"),
                            (str(tmp_path / "file"), f"{tmp_path / 'file'}: a file, expected a model directory")):
        for command in commands:
            status, err = _run([a.replace("{m}", given) for a in command], capsys)
            assert status == 2 and err == f"maskattn {command[0]}: {expected}\n", (command, err)
    assert not any((tmp_path / name).exists() for name in ("viz", "m.onnx", "small", "soup"))


def _tiny_translator(directory):
    import torch

    from maskattn.models import Transformer, TransformerConfig
    from maskattn.tasks.common import write_task
    from maskattn.tokenization import Tokenizer

    tok = Tokenizer.train_chars(["abc"])
    torch.manual_seed(0)
    config = TransformerConfig.preset("tiny", vocab_size=tok.vocab_size, tgt_vocab_size=tok.vocab_size, max_len=16)
    Transformer(config).eval().save(directory, tokenizer=tok.backend)
    write_task(directory, {"task": "translation"})
    return str(directory)


def test_translate_evaluate_and_compress_name_the_flags_typed_not_the_python_parameters(tmp_path, capsys):
    # `translate --beam 0` said "beam_size must be an int >= 1", `--min-new-tokens -1` "min_new_tokens must be ...",
    # `compress --prune-heads 1.5` "prune fraction must be in [0, 1)", `--seed -1` "--seed must be None or ...",
    # `--average-every 0` "it needs --average-last N > 1"; `--beam 10**30` / `--nbest 10**30` crashed with torch's
    # TypeError (or RuntimeError: "Storage size calculation overflowed") traceback
    from dataclasses import replace

    from maskattn.tasks import translation

    model = _tiny_translator(tmp_path / "m")
    (tmp_path / "src.txt").write_text("abc\n")
    evaluate = ["evaluate", model, "--data", str(tmp_path / "src.txt"), "--ref", str(tmp_path / "src.txt")]
    compress = ["compress", model, "--out", str(tmp_path / "out")]
    huge = str(10**30)
    cases = [*((["translate", model, "abc", flag, value], f"argument {flag}: expected a positive integer, got {value}")
               for flag in ("--beam", "--nbest") for value in ("0", "-1")),
             *(([*evaluate, "--beam", value], f"argument --beam: expected a positive integer, got {value}")
               for value in ("0", "-1")),
             *(([*command, "--min-new-tokens", "-1"], "argument --min-new-tokens: expected an integer >= 0, got -1")
               for command in (["translate", model, "abc"], evaluate)),
             *(([*command, flag, huge], f"argument {flag}: expected at most 2**40 beams")
               for command, flag in ((["translate", model, "abc"], "--beam"), (["translate", model, "abc"], "--nbest"),
                                     (evaluate, "--beam"))),
             *(([*compress, "--prune-heads", value],
                f"argument --prune-heads: expected a fraction in [0, 1), got {value}")
               for value in ("1.5", "-1", "nan", "1", huge)),
             ([*compress, "--prune-heads", "0.5", "--seed", "-1"],
              "argument --seed: a seed must be an int in [0, 2**63)"),
             ([*compress, "--prune-heads", "0.5", "--average-every", "0"],
              "maskattn compress: --average-every must be an int >= 1, got 0")]
    for argv, expected in cases:
        status, err = _run(argv, capsys)
        assert status == 2 and expected in err, (argv, err)
        assert [line for line in err.splitlines() if line.startswith("maskattn ")] == [err.splitlines()[-1]], err
        assert not re.search(r"beam_size|min_new_tokens|prune fraction|None or", err), err
    assert not (tmp_path / "out").exists()
    # the values the checks let through run, as the library runs them (the oracle: translation.translate called
    # directly with the model's decoding settings changed)
    assert main(["translate", model, "abc", "cab", "--beam", "2", "--min-new-tokens", "0"]) == 0
    loaded, tok, decode = translation.load(model)
    assert capsys.readouterr().out.splitlines() == translation.translate(
        loaded, tok, ["abc", "cab"], replace(decode, beam_size=2, min_new_tokens=0))
    # Python callers keep the names of their parameters
    with pytest.raises(ValueError, match=r"beam_size must be an int >= 1, got 0"):
        replace(decode, beam_size=0)


def test_a_home_directory_in_a_repeated_path_flag_is_the_home_directory(tmp_path, monkeypatch):
    # `--ensemble=~/m --ensemble=~/n` (a flag repeated, its values a list) reaches no shell either: each `~` is
    # the home directory, as for a single path. Oracle: os.path.expanduser with HOME set here.
    import os

    from maskattn import cli

    monkeypatch.setenv("HOME", str(tmp_path))
    seen = []
    monkeypatch.setattr(cli, "_evaluate", lambda args: seen.append(args) or 0)
    assert main(["evaluate", "m", "--data", "d", "--ensemble=~/m", "--ensemble=~/n"]) == 0
    assert seen[0].ensemble == [os.path.expanduser("~/m"), str(tmp_path / "n")]
    assert seen[0].model == "m"
