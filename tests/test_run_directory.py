"""Run-directory safety (issue 16, item 1): a new run never mixes with an older run's files.

Each test here failed on main before the rule: a second run into the same directory trained, its
checkpoints were pruned by name as they were written, and export shipped the older run's model.
"""

import json

import pytest
import torch

from maskattn import checkpoint
from maskattn.cli import main
from maskattn.errors import RunDirectoryError
from maskattn.run_directory import clear_run_directory, prepare_run_directory


def lm_args(tmp_path, out, *extra):
    text = tmp_path / "text.txt"
    if not text.exists():
        text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return ["train", "lm", "--train", str(text), "--out", str(out), "--set", "train.steps=4",
            "--set", "train.warmup=1", "--set", "train.progress=false", "--set", "train.log_every=1",
            "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2", "--set", "model.num_layers=1",
            "--set", "model.d_model=16", "--set", "model.d_ff=32", "--set", "data.block=16", *extra]


def test_a_second_run_into_a_used_directory_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(lm_args(tmp_path, out)) == 0
    first_model = (out / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(lm_args(tmp_path, out, "--set", "model.d_model=32")) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "model" / "model.safetensors").read_bytes() == first_model  # nothing touched

    # --overwrite replaces the run: the log holds only the new run's steps, the export is the new model
    assert main(lm_args(tmp_path, out, "--set", "model.d_model=32", "--overwrite")) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]
    assert json.loads((out / "model" / "config.json").read_text())["config"]["d_model"] == 32
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == ["step-000000002", "step-000000004"]


@pytest.mark.parametrize("failure", ["a mistyped data path", "a block longer than the text"])
def test_a_failed_overwrite_run_keeps_the_old_run(tmp_path, capsys, failure):
    # the run was deleted before the task read its data (the first case), or before the task's checks of the
    # data it had read (the second: the new run had already written its tokenizer)
    out = tmp_path / "run"
    assert main(lm_args(tmp_path, out)) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = lm_args(tmp_path, out, "--overwrite")
    if failure == "a mistyped data path":
        args[args.index("--train") + 1] = str(tmp_path / "typo.txt")
    else:
        args += ["--set", "data.block=5000"]
    assert main(args) == 2
    assert ("typo.txt" if failure == "a mistyped data path" else "too short") in capsys.readouterr().err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left aside


def test_overwrite_clears_hypotheses_that_evaluate_wrote(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "hypotheses.test.de.txt").write_text("a\n")  # `maskattn evaluate RUN/model` writes it here
    clear_run_directory(tmp_path)
    assert not tmp_path.exists()


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match=r"notes\.txt, which no maskattn run writes"):
        clear_run_directory(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kind", ["file", "under a file"])
def test_a_run_directory_that_is_a_file_is_one_error(tmp_path, kind):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if kind == "file" else tmp_path / "f" / "sub"
    with pytest.raises(RunDirectoryError, match="is a file, not a directory"):
        prepare_run_directory(out)


def test_retention_is_by_step_of_this_run(tmp_path):
    # checkpoints of later steps belong to a replaced run: saving step 3 removes them, keeps this run's newest
    for step in (8, 9):
        checkpoint.save(tmp_path, step, {"w": torch.zeros(1)}, keep=None)
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, {"w": torch.full((1,), float(step))}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000000002", "step-000000003"]
    assert checkpoint.load(checkpoint.latest(tmp_path))["step"] == 3
    # ordered by step, not by name: a step past 10^9 sorts after the others
    checkpoint.save(tmp_path, 10**9 + 1, {"w": torch.zeros(1)}, keep=None)
    assert checkpoint.step_of(checkpoint.latest(tmp_path)) == 10**9 + 1


def test_a_tokenizer_left_by_a_failed_run_is_not_reused_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "tokenizer.json").write_text("{ not a tokenizer")  # a run that died before its first checkpoint
    assert main(lm_args(tmp_path, out, "--resume")) == 0
    assert "not a tokenizer" not in (out / "tokenizer.json").read_text()


def test_a_corrupt_tokenizer_on_resume_is_one_error_naming_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(lm_args(tmp_path, out)) == 0
    (out / "tokenizer.json").write_text("{ not json")
    capsys.readouterr()
    assert main(lm_args(tmp_path, out, "--set", "train.steps=6", "--resume")) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json: not a readable tokenizer.json" in err and err.count("\n") == 1


def test_a_half_written_last_log_line_does_not_block_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(lm_args(tmp_path, out)) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # what a kill -9 mid-write leaves
    assert main(lm_args(tmp_path, out, "--set", "train.steps=6", "--resume")) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_an_overwritten_run_is_deleted_at_the_new_runs_first_checkpoint(tmp_path, capsys):
    # it used to stay aside (twice the disk) until the new run ended, though it could no longer come back
    from maskattn import training

    out = tmp_path / "run"
    assert main(lm_args(tmp_path, out)) == 0
    seen = []
    save = training.Trainer.save

    def spy(self):
        save(self)
        seen.append(sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")))

    training.Trainer.save = spy
    try:
        assert main(lm_args(tmp_path, out, "--overwrite")) == 0
    finally:
        training.Trainer.save = save
    assert seen and seen[0] == []


def test_sigterm_before_the_first_checkpoint_puts_the_old_run_back(tmp_path, capsys):
    import os
    import signal

    from maskattn.run_directory import replacing_run, run_lock

    out = tmp_path / "run"
    assert main(lm_args(tmp_path, out)) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(SystemExit) as stopped, replacing_run(out):
        assert out.is_dir() and not any(out.iterdir())  # the new run's directory, made (and locked) at once
        with pytest.raises(RunDirectoryError, match="is in use"), run_lock(out):
            pass
        (out / "tokenizer.json").write_text("{}")  # the new run had begun
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun stopping its workers, a scheduler's time limit
    assert stopped.value.code == 128 + signal.SIGTERM
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back too


def test_resume_with_other_model_settings_is_one_line_naming_the_setting(tmp_path, capsys):
    # load_state_dict's error listed every mismatched tensor: ~44 lines for one changed setting; and a change whose
    # weights still fit (4 heads instead of 2, other positions) resumed without a word (session twenty-one)
    out = tmp_path / "run"
    assert main(lm_args(tmp_path, out, "--set", "train.steps=2")) == 0
    for setting, old, new in (("d_model", 16, 32), ("num_heads", 4, 2), ("positions", "'learned'", "'rope'")):
        capsys.readouterr()
        value = new if setting != "positions" else '"rope"'
        assert main(lm_args(tmp_path, out, "--set", f"model.{setting}={value}", "--resume")) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("maskattn train:")]
        assert len(err) == 1 and f"was trained with model.{setting}={old}, this run has {new}" in err[0], err


def test_a_checkpoint_without_its_run_settings_is_still_checked_by_its_weights(tmp_path, capsys, monkeypatch):
    # checkpoints written before session twenty-one keep no "run": load_state_dict's error, in one line
    monkeypatch.setattr(checkpoint, "read_entry", lambda path, key: None)
    monkeypatch.setattr("maskattn.training.check_same_run", lambda *args: None)  # the name Trainer.resume calls
    out = tmp_path / "run"
    assert main(lm_args(tmp_path, out, "--set", "train.steps=2")) == 0
    capsys.readouterr()
    assert main(lm_args(tmp_path, out, "--set", "model.d_model=32", "--resume")) == 2
    lines = capsys.readouterr().err.splitlines()
    err = [line for line in lines if line.startswith("maskattn train:")]
    assert len(err) == 1 and "does not fit this model: size mismatch for" in err[0] and "more)" in err[0], err
    assert sum("size mismatch" in line for line in lines) == 1


def test_a_resume_into_another_tasks_run_names_the_task_before_reading_its_tokenizer(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(lm_args(tmp_path, out, "--set", "train.steps=2")) == 0
    capsys.readouterr()
    monkeypatch.setattr("maskattn.tasks.common.run_tokenizer", lambda *a, **k: pytest.fail("tokenizer read"))
    data = tmp_path / "sst.tsv"
    data.write_text("sentence\tlabel\n" + "a fine film\t1\na dull film\t0\n" * 4)
    code = main(["train", "classification", "--train", str(data), "--valid", str(data), "--out", str(out), "--resume"])
    assert code == 2
    assert "is a checkpoint of a 'lm' run, not of a 'classification' one" in capsys.readouterr().err


def test_a_run_directory_given_for_its_model_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(lm_args(tmp_path, out)) == 0
    capsys.readouterr()
    for command in (["generate", str(out), "--prompt", "the"], ["audit", str(out)]):
        assert main(command) == 2
        assert f"{out} is a run directory; its model is {out / 'model'}" in capsys.readouterr().err


def test_a_retry_after_a_failed_start_needs_no_flag(tmp_path, capsys):
    # the failed start left its tokenizer.json, and the corrected command was refused ("not empty: --resume")
    out = tmp_path / "run"
    assert main(lm_args(tmp_path, out, "--set", "data.block=5000")) == 2  # refused once the data is read
    assert [p.name for p in out.iterdir()] == ["tokenizer.json"]
    assert main(lm_args(tmp_path, out)) == 0


def test_overwrite_refuses_a_directory_of_dot_files_that_no_run_wrote(tmp_path, capsys):
    # every name starting with "." counted as the run's own: --overwrite deleted a home directory's .ssh and .bashrc
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret")
    (home / ".bashrc").write_text("x")
    assert main(lm_args(tmp_path, home, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "will not clear" in err and ".bashrc" in err and ".ssh" in err
    assert (home / ".ssh" / "id_ed25519").read_text() == "secret" and (home / ".bashrc").read_text() == "x"
    # what an atomic write of the run's own files leaves behind is still the run's
    from maskattn.run_directory import _run_entry
    assert _run_entry(".metrics.jsonl.4242.tmp") and _run_entry(".model.k2j3h4") and _run_entry(".best.x")
    assert not _run_entry(".bashrc") and not _run_entry(".modelling") and not _run_entry(".ssh")


def test_a_directory_a_run_trains_in_is_refused_to_a_second_process(tmp_path, capsys):
    # a --resume started while the first run trained was accepted: two processes interleaved one log
    from maskattn.run_directory import run_lock

    out = tmp_path / "run"
    with run_lock(out):  # this process stands for the run still training (flock: a second open file conflicts)
        with pytest.raises(RunDirectoryError, match="is in use: another maskattn process is training in it"), \
                run_lock(out):
            pass
        for extra in (["--resume"], ["--overwrite"], []):
            assert main(lm_args(tmp_path, out, *extra)) == 2
            assert "is in use" in capsys.readouterr().err
        assert list(out.iterdir()) == []  # nothing written by the refused runs
    assert main(lm_args(tmp_path, out)) == 0  # the lock ends with its holder
    with run_lock(out):
        pass
    missing = tmp_path / "never"
    with pytest.raises(ValueError), run_lock(missing):  # a run that fails before writing leaves no directory
        raise ValueError
    assert not missing.exists()


def test_an_empty_out_is_refused_not_the_working_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = lm_args(tmp_path, "x")
    args[args.index("--out"):args.index("--out") + 2] = ["--set", "out="]
    assert main(args) == 2
    assert "out is empty: name the run directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]


def test_a_file_system_that_cannot_lock_a_directory_trains_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    # NFS (an exclusive flock needs a file open for writing) and some FUSE mounts: EBADF / ENOTSUP, not "in use"
    import errno
    import logging

    from maskattn import run_directory

    def refuses(fd, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(run_directory.fcntl, "flock", refuses)
    with caplog.at_level(logging.WARNING, logger="maskattn"), run_directory.run_lock(tmp_path / "run"):
        (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert "cannot be locked on this file system" in caplog.text


def test_under_torchrun_every_rank_hears_rank_zeros_refusal(tmp_path):
    # rank 0 refused a directory in use (or not empty) and exited; rank 1 crashed at the next collective call
    # ("Connection closed by peer") instead of stopping with it
    import os
    import subprocess
    import sys

    from maskattn.run_directory import run_lock

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", "-m",
           "maskattn", *lm_args(tmp_path, out)]
    with run_lock(out):  # (two processes on the CPU, also on a machine with one GPU)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode != 0
    assert "run directory" in done.stderr and "is in use" in done.stderr
    assert "refused by rank 0" in done.stderr and "Connection closed by peer" not in done.stderr


def test_a_resume_that_finds_no_checkpoint_says_it_trains_from_step_0(tmp_path, capsys):
    # `--resume` into a directory without checkpoints (a mistyped --out, a run.toml without `out`) trained a
    # whole new run from step 0 without a word, exactly as a plain run would
    out = tmp_path / "never-trained"
    assert main(lm_args(tmp_path, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert "resumed from step" not in err
    assert f"--resume: no checkpoint in {out}; training from step 0" in err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]  # the oracle: what the message says happened

    assert main(lm_args(tmp_path, out, "--resume", "--set", "train.steps=6")) == 0
    err = capsys.readouterr().err
    assert "resumed from step 4" in err and "no checkpoint" not in err


def test_the_run_directory_names_are_still_importable_from_training():
    # they lived in maskattn.training before run_directory.py: code that imports them from there gets the same objects
    from maskattn import run_directory, training

    for name in ("RUN_ENTRIES", "RUN_FILE_PATTERN", "check_run_directory", "check_same_run", "clear_run_directory",
                 "discard_replaced_run", "prepare_run_directory", "replacing_run", "run_lock"):
        assert getattr(training, name) is getattr(run_directory, name), name


def test_check_run_directory_refuses_to_overwrite_a_directory_holding_foreign_files(tmp_path):
    # the check the CLI makes before a task reads its data: it must refuse at once, not after reading the data
    from maskattn.run_directory import check_run_directory

    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "thesis.tex").write_text("keep")
    with pytest.raises(RunDirectoryError, match=r"will not clear .*thesis\.tex"):
        check_run_directory(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "thesis.tex"]


def test_check_same_run_names_a_model_setting_the_new_run_leaves_out(tmp_path):
    # a setting only the checkpoint has (the new run takes its default) is a difference too, in either direction
    from maskattn.run_directory import check_same_run

    saved = {"task": "lm", "model": {"heads": 2, "window": 4}}
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.window=4, this run has None"):
        check_same_run(tmp_path, saved, {"task": "lm", "model": {"heads": 2}})
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.window=None, this run has 4"):
        check_same_run(tmp_path, {"task": "lm", "model": {"heads": 2}}, saved)
    check_same_run(tmp_path, saved, {"task": "lm", "model": {"window": 4, "heads": 2}})  # order does not matter
