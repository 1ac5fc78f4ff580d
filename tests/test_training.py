import collections
import contextlib
import functools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maskattn import checkpoint
from maskattn.checkpoint import CheckpointError
from maskattn.training import TrainConfig, learning_rate

SCRIPT = Path(__file__).with_name("train_script.py")


def _run(*args, **kw):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], check=True, capture_output=True,
                          text=True, timeout=300, **kw)


def _final_weights(out):
    return checkpoint.load(checkpoint.latest(out / "checkpoints"))["model"]


def test_schedules():
    cfg = TrainConfig(lr=1.0, warmup=4, steps=20)
    assert [learning_rate(cfg, s) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert learning_rate(cfg, 16) == pytest.approx(0.5)  # sqrt(4 / 16)
    cos = TrainConfig(lr=1.0, warmup=4, steps=20, schedule="cosine", min_lr_ratio=0.1)
    assert learning_rate(cos, 4) == 1.0 and learning_rate(cos, 20) == pytest.approx(0.1)
    assert learning_rate(cos, 12) == pytest.approx(0.55)
    linear = TrainConfig(lr=1.0, warmup=4, steps=20, schedule="linear", min_lr_ratio=0.0)  # BERT's: down to zero
    assert [learning_rate(linear, s) for s in (2, 4, 8, 12, 20)] == pytest.approx([0.5, 1.0, 0.75, 0.5, 0.0])
    assert learning_rate(TrainConfig(lr=1.0, warmup=4, steps=20, schedule="linear"), 12) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="schedule must be"):
        TrainConfig(schedule="step")


def test_training_lowers_the_loss_and_writes_log_and_plot(tmp_path):
    _run(tmp_path, "--steps", 30)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_kill_minus_nine_and_resume_equals_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(straight, "--steps", 40)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(killed), "--steps", "40", "--sleep", "0.05"])
    kill_after = random.Random(os.getpid()).randint(2, 6)  # a random checkpoint count: steps 10..30
    while len(checkpoint.list_checkpoints(killed / "checkpoints")) < 2 or \
            checkpoint.latest(killed / "checkpoints").name < f"step-{5 * kill_after:09d}":
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    time.sleep(random.random() * 0.2)  # land somewhere between two checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.load(checkpoint.latest(killed / "checkpoints"))["step"]
    assert killed_at < 40
    _run(killed, "--steps", 40, "--resume")
    a, b = _final_weights(straight), _final_weights(killed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 40  # replayed steps are not logged twice


def test_truncated_checkpoint_is_rejected_on_resume(tmp_path):
    _run(tmp_path, "--steps", 10)
    last = checkpoint.latest(tmp_path / "checkpoints")
    data = (last / "tensors.safetensors").read_bytes()
    (last / "tensors.safetensors").write_bytes(data[:100])
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--steps", "12", "--resume"],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "is corrupt" in result.stderr and "step-000000005" in result.stderr
    with pytest.raises(CheckpointError):
        checkpoint.load(last)
    assert checkpoint.load(tmp_path / "checkpoints" / "step-000000005")["step"] == 5


def _torchrun(out, *args, check=True, port=29533):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(SCRIPT),
           str(out), *map(str, args)]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_and_resume_after_a_kill(tmp_path):
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    # float64: the two runs sum gradients in different orders, and Adam amplifies float32 rounding
    # (the per-step losses agree to 1e-7 in float32, the weights after 8 steps only to 1e-3).
    settings = ("--steps", 8, "--dropout", 0.0, "--double")  # a checkpoint every 5 steps
    _run(one, *settings)
    _torchrun(two, *settings)
    a, b = _final_weights(one), _final_weights(two)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    # rank 0 logs the loss of the whole step (both processes' targets), as one process logs it: one line a step
    logged = {run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (one, two)}
    assert [r["step"] for r in logged[two]] == [r["step"] for r in logged[one]] == list(range(1, 9))
    assert [r["loss"] for r in logged[two]] == pytest.approx([r["loss"] for r in logged[one]], rel=0, abs=1e-9)
    died = _torchrun(killed, *settings, "--exit-after", 6, check=False)  # both processes die in step 7
    assert died.returncode != 0
    assert checkpoint.load(checkpoint.latest(killed / "checkpoints"))["step"] == 5
    _torchrun(killed, *settings, "--resume")
    c = _final_weights(killed)
    for name in b:  # the same two processes, the same order of sums: the same numbers
        torch.testing.assert_close(c[name], b[name], rtol=0, atol=1e-12)


@pytest.mark.slow
def test_torchrun_ranks_that_find_different_checkpoints_refuse_to_resume(tmp_path):
    _run(tmp_path / "run-0", "--steps", 5)  # rank 0's directory has a checkpoint at step 5, rank 1's none
    result = _torchrun(tmp_path / "run", "--steps", 10, "--resume", "--out-per-rank", check=False, port=29535)
    assert result.returncode != 0
    assert "rank 0 resumed at step 5" in result.stderr or "rank 1 resumed at step 0" in result.stderr
    assert "every process must read the same run directory" in result.stderr


@pytest.mark.slow
def test_torchrun_a_nan_loss_on_one_process_stops_both_in_the_same_step(tmp_path):
    # the step's loss comes back in one read and is summed over the processes before the check: rank 0, whose own
    # loss is finite, must stop with rank 1 (else it waits for rank 1 in the next step, or trains on)
    result = _torchrun(tmp_path, "--steps", 8, "--checkpoint-every", 2, "--nan-in-step", 4, check=False, port=29537)
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"[rank{rank}]: maskattn.errors.TrainingError: step 4: the training loss is nan" in result.stderr
    assert checkpoint.load(checkpoint.latest(tmp_path / "checkpoints"))["step"] == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # step 4 updated nothing and logged nothing


@pytest.mark.slow
def test_torchrun_an_early_stop_is_said_once_and_stops_both_processes(tmp_path):
    # `torchrun ... maskattn train 2> log`: rank 0 alone writes the plain progress, eval and early-stop lines and
    # the log, and both processes end at the stop (none waits in a collective call for the other)
    from test_run_directory import lm_args

    out = tmp_path / "run"
    args = lm_args(tmp_path, out, "--set", "train.steps=12", "--set", "train.progress=true", "--set",
                   "train.patience=2", "--set", "train.higher_is_better=true")  # each evaluation after the first: worse
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29539", "-m",
           "maskattn", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    said = [re.match(r"train: step \d+/\d+|eval step \d+|train: stopped early at step \d+ of \d+|", line).group()
            for line in done.stderr.splitlines()]
    assert [line for line in said if line] == [
        "train: step 1/12",  # the first log line; the stop's is not due (an interval has not passed)
        "eval step 2", "eval step 4", "eval step 6", "train: stopped early at step 6 of 12"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4, 6]
    assert json.loads(done.stdout)["step"] == 2  # the result, printed once: the best (first) evaluation's model


def _tiny_trainer(tmp_path, rank=0, world_size=1, **overrides):
    from torch import nn

    from maskattn.training import Trainer

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    cfg = TrainConfig(**{"steps": 20, "lr": 1e-2, "warmup": 2, "progress": False, "log_every": 1,
                         "checkpoint_every": 0, **overrides})
    evals = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1])
    return Trainer(model, cfg, out_dir=tmp_path, device="cpu", rank=rank, world_size=world_size,
                   plan=lambda epoch: [list(range(i, i + 16)) for i in range(0, 64, 16)],
                   collate=lambda idx: {"x": x[idx], "y": y[idx], "num_targets": len(idx)},
                   loss=lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum(),
                   evaluate=lambda m: {"loss": next(evals)})


def test_bf16_autocast_trains(tmp_path):
    trainer = _tiny_trainer(tmp_path, bf16=True)
    trainer.fit()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert all(map(lambda v: v == v, losses)) and losses[-1] < 0.5 * losses[0]


def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    trainer = _tiny_trainer(tmp_path, eval_every=2, patience=3)
    trainer.fit()
    # evaluations at steps 2, 4, 6, 8, 10 give 1.0, 0.5, 0.6, 0.7, 0.8: three without improvement after step 4
    assert trainer.step == 10
    best = checkpoint.latest(tmp_path / "best")
    assert checkpoint.load(best)["step"] == 4 and trainer.best == 0.5


def _rank_of_two(rank, out, scenario):
    """One of two processes (gloo, started by ``_two_ranks``): trains ``_tiny_trainer`` in ``scenario`` and writes
    what it ended with to ``out/rank-RANK.json``."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=5))  # a rank left waiting fails, not hangs
    trainer = _tiny_trainer(out / "run", rank=rank, world_size=2, eval_every=2, patience=2)
    if scenario == "evaluations":  # rank 1 scores a hair lower (better) each time: rank 0 sees ties at 0.5
        scores, counted = iter([1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]), iter(range(10))
        trainer.evaluate = lambda m: {"loss": next(scores) - rank * 1e-9 * next(counted)}
    else:  # rank 1's gradient norm reads inf in step 3, rank 0's is finite
        clip = torch.nn.utils.clip_grad_norm_

        def norm(*args, **kw):
            value = clip(*args, **kw)
            return torch.tensor(math.inf) if rank == 1 and trainer.step == 3 else value

        torch.nn.utils.clip_grad_norm_ = norm
    try:
        last = trainer.fit()
        result = {"step": trainer.step, "best": trainer.best, "bad_evals": trainer.bad_evals, "last": last}
    except Exception as e:  # (a rank left waiting in a collective call ends here, after the gloo timeout)
        result = {"step": trainer.step, "error": f"{type(e).__name__}: {e}"}
    (out / f"rank-{rank}.json").write_text(json.dumps(result))


def _two_ranks(out, scenario):
    """What each of two gloo processes ended with (None for one still running after 20 s: killed)."""
    context = torch.multiprocessing.get_context("spawn")
    processes = [context.Process(target=_rank_of_two, args=(rank, out, scenario)) for rank in (0, 1)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=20)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    return [json.loads(path.read_text()) if (path := out / f"rank-{rank}.json").exists() else None for rank in (0, 1)]


@pytest.mark.slow
def test_early_stopping_and_the_best_checkpoint_follow_rank_0s_evaluation_on_every_rank(tmp_path):
    # Every process scores the validation set itself; on a GPU two processes' scores can differ in the last bit.
    # Each used to count its own: at rank 0's ties (0.5, 0.5, 0.5) rank 1 saw improvements, so rank 0 stopped at
    # step 8 and rank 1 trained on alone (failing in its next collective call). Oracle: rank 0's scores by hand,
    # evaluations at steps 2, 4, 6, 8 = 1.0, 0.5, 0.5, 0.5: best at step 4, the second tie (step 8) stops the run.
    ranks = _two_ranks(tmp_path, "evaluations")
    for rank, result in enumerate(ranks):
        assert result == {"step": 8, "best": 0.5, "bad_evals": 2, "last": {"loss": 0.5}}, (rank, result)
    assert checkpoint.step_of(checkpoint.latest(tmp_path / "run" / "best")) == 4
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_loss"] for r in logged if "eval_loss" in r] == [1.0, 0.5, 0.5, 0.5]


@pytest.mark.slow
def test_a_non_finite_gradient_norm_on_one_rank_stops_every_rank_in_that_step(tmp_path):
    # Each rank took the norm of its own gradients and stopped on its own reading; rank 0 trained on and waited
    # for rank 1 in step 4. The norm now travels with the step's loss in the one sum over processes it already had.
    ranks = _two_ranks(tmp_path, "norm")
    for rank, result in enumerate(ranks):
        assert result is not None and result["step"] == 3, (rank, result)
        assert result["error"].startswith("TrainingError: step 3: the gradient norm is inf"), (rank, result)


def test_the_trainer_takes_rank_and_world_size_from_its_caller_and_checks_them(tmp_path, monkeypatch):
    from maskattn import distributed

    with pytest.raises(ValueError, match=r"rank=1, world_size=2 do not match the process group \(rank 0 of 1\)"):
        _tiny_trainer(tmp_path, rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"rank \(2\) must be in \[0, world_size \(2\)\)"):
        distributed.Context(2, 2)
    # launched by torchrun but nobody joined the group: refused, instead of two runs side by side
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="launched by torchrun with WORLD_SIZE=2 but no process group was joined"):
        _tiny_trainer(tmp_path)


def test_batches_all_too_small_for_the_processes_are_named_not_an_empty_training_set(tmp_path):
    # torchrun with batches of one example and two processes: "is the training set empty?" from both ranks
    trainer = _tiny_trainer(tmp_path)
    trainer.world = 2
    trainer.plan = lambda epoch: [[0], [1], [2]]
    with pytest.raises(ValueError, match=r"every batch of the data plan holds fewer examples than the 2 processes "
                                         r"\(the largest: 1\): raise the batch size"):
        trainer._next_micro_batches()
    trainer.world, trainer.plan, trainer._planned = 1, lambda epoch: [], None
    with pytest.raises(ValueError, match=r"is the training set empty\?"):
        trainer._next_micro_batches()


def test_a_plan_whose_batches_leave_examples_out_across_processes_says_so_once(tmp_path, caplog):
    trainer = _tiny_trainer(tmp_path)
    trainer.world = 2  # as under torchrun (the split is all this test reads)
    trainer.plan = lambda epoch: [[0, 1, 2], [3], [4, 5], [6]]
    with caplog.at_level("WARNING", logger="maskattn"):
        assert trainer._epoch_batches(0) == [[0, 2], [4]]  # rank 0's share; [3] and [6] cannot be split
        trainer._epoch_batches(1)
    said = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert said == ["training: 2 of 7 examples of epoch 0 are left out: their batches hold fewer examples than "
                    "the 2 processes (raise the batch size or data.max_tokens)"]
    caplog.clear()
    trainer.world, trainer._said_left_out = 1, False
    with caplog.at_level("WARNING", logger="maskattn"):
        assert trainer._epoch_batches(0) == [[0, 1, 2], [3], [4, 5], [6]]
    assert not caplog.records


def _trained_batches(trainer, steps):
    """Train ``trainer`` to ``steps``; the batches (example indices) it collated."""
    seen, collate = [], trainer.collate
    trainer.collate = lambda idx: seen.append(list(idx)) or collate(idx)
    trainer.cfg.steps = steps
    trainer.fit()
    return seen


@pytest.mark.parametrize("before,after", [(1, 2), (2, 1)])
def test_a_run_resumed_with_another_number_of_processes_trains_the_batch_after_the_last_one(tmp_path, monkeypatch,
                                                                                            caplog, before, after):
    # A checkpoint's data position counted the batches of this process's split, which leaves out batches smaller
    # than the number of processes: resumed with another number, [1, 2] was trained twice (2 -> 1) or skipped
    # (1 -> 2). Oracle: the plan itself, [[0], [1, 2], [3, 4], [5, 6]] every epoch, read in order. Rank 0 of 2
    # is stood in for by a process whose sums over processes are twice its own (both ranks holding the same).
    from maskattn import distributed

    plan = [[0], [1, 2], [3, 4], [5, 6]]
    seen = {}
    for leg, world, steps in (("before", before, 1), ("after", after, 2)):
        trainer = _tiny_trainer(tmp_path, checkpoint_every=1)
        trainer.plan = lambda epoch: plan
        if world == 2:
            trainer.world = 2
            monkeypatch.setattr(distributed, "all_sum", lambda x: 2 * x)
        else:
            monkeypatch.undo()
        if leg == "after":
            assert trainer.resume()
        seen[leg] = _trained_batches(trainer, steps)
    first = {1: [0], 2: [1]}[before]  # (rank 0's share of [1, 2]; [0] cannot be split between two processes)
    assert seen["before"] == [first]
    following = plan[1] if before == 1 else plan[2]  # the batch after the last one trained
    assert seen["after"] == [following[0::after]]
    assert f"resumed with {after} process(es) a run checkpointed by {before}" in caplog.text


def _without_world_size(state):
    return {k: v for k, v in state().items() if k != "world_size"}


def test_a_checkpoint_without_its_number_of_processes_resumes_as_one_of_this_runs(tmp_path, monkeypatch, caplog):
    # Checkpoints written before "world_size" was kept are taken to be of as many processes as the resuming run:
    # a 2-process run resumed by 2 processes goes on at the next batch, not replaying one as if checkpointed by 1.
    # Oracle: the plan read in order, rank 0's share of each batch of 2 ([0] cannot be split, so it is left out).
    from maskattn import distributed

    plan = [[0], [1, 2], [3, 4], [5, 6]]
    monkeypatch.setattr(distributed, "all_sum", lambda x: 2 * x)
    seen = {}
    for leg, steps in (("before", 1), ("after", 2)):
        trainer = _tiny_trainer(tmp_path, checkpoint_every=1)
        trainer.plan = lambda epoch: plan
        trainer.world = 2
        if leg == "before":  # as an earlier version wrote it
            trainer.state = functools.partial(_without_world_size, trainer.state)
        else:
            assert trainer.resume()
        seen[leg] = _trained_batches(trainer, steps)
    assert seen == {"before": [[1]], "after": [[3]]}
    assert "resumed with" not in caplog.text


def test_each_torchrun_process_gets_its_own_gpu_and_nccl_reduces_on_it(monkeypatch):
    # No GPU here: CUDA and the NCCL group are stood in for, so that what is checked is which device
    # the code picks (all ranks on cuda:0 is what NCCL refuses) and where the reduced tensor lives.
    from maskattn import distributed

    assert distributed.local_device() == torch.device("cpu") or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.local_device() == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # more processes than GPUs: named, not mixed
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1 but this machine has 1 GPU\(s\)"):
        distributed.local_device()
    seen = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t: seen.append(t.device.type == "meta"))
    monkeypatch.setattr(distributed, "_nccl_device", lambda: torch.device("meta"))  # a device torch can build here
    for backend, on_gpu in (("nccl", True), ("gloo", False)):
        monkeypatch.setattr(distributed.dist, "get_backend", lambda b=backend: b)
        with contextlib.suppress(NotImplementedError, RuntimeError):  # .item() of a meta tensor, after the reduce
            distributed.all_sum(2.0)
        assert seen.pop() is on_gpu


def test_init_joins_nccl_only_for_a_process_that_trains_on_a_gpu(monkeypatch):
    from maskattn import distributed

    joined, devices = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", joined.append)
    monkeypatch.setattr(distributed, "current", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    for device in ("cpu", None, "cuda", "cuda:0"):
        distributed.init(device)
    assert joined == ["gloo", "nccl", "nccl", "nccl"]
    assert devices == [torch.device("cuda", 1), torch.device("cuda", 1), torch.device("cuda", 0)]


def test_setup_distributed_is_a_deprecated_alias_of_distributed_init():
    from maskattn.training import setup_distributed

    with pytest.warns(DeprecationWarning, match=r"distributed\.init\(\)"):
        assert setup_distributed() == (0, 1)


def test_curves_are_drawn_from_the_log_by_the_caller_not_by_the_trainer(tmp_path):
    from maskattn.plotting import plot_curves

    trainer = _tiny_trainer(tmp_path, eval_every=5)
    trainer.fit()
    assert not (tmp_path / "curves.png").exists()  # training (rank 5) draws nothing: the viz layer does
    assert plot_curves(tmp_path / "metrics.jsonl") == tmp_path / "curves.png"
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves(tmp_path / "missing.jsonl") is None


def test_training_plot_curves_is_a_deprecated_alias():
    from maskattn import plotting, training

    with pytest.warns(DeprecationWarning, match="moved to maskattn.plotting.plot_curves"):
        assert training.plot_curves is plotting.plot_curves
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        training.nothing  # noqa: B018


def test_a_trainer_that_did_not_resume_refuses_another_runs_checkpoints_and_starts_a_new_log(tmp_path):
    from maskattn.errors import RunDirectoryError

    _tiny_trainer(tmp_path, steps=4, checkpoint_every=2).fit()
    with pytest.raises(RunDirectoryError, match="holds checkpoints of another run"):
        _tiny_trainer(tmp_path, steps=4).fit()
    checkpoint.save(tmp_path / "unrelated", 1, {"w": torch.zeros(1)})
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    _tiny_trainer(tmp_path / "new", steps=2).fit()
    assert [json.loads(line)["step"] for line in (tmp_path / "new" / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)] == [1, 2]


def test_resume_of_a_run_killed_before_its_first_step_checkpoint_starts_again(tmp_path):
    # the run evaluated (and saved best/) at step 2, then died before its first step checkpoint (step 4)
    trainer = _tiny_trainer(tmp_path, steps=4, eval_every=2, checkpoint_every=4)
    checkpoint.save(tmp_path / "best", 2, trainer.state(), keep=1)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert trainer.resume() is False
    assert not (tmp_path / "best").exists()  # the dead run's best is not this run's
    trainer.fit()
    assert trainer.step == 4 and checkpoint.step_of(checkpoint.latest(tmp_path / "checkpoints")) == 4
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_resuming_a_run_that_stopped_early_does_not_train_on(tmp_path):
    # evaluations 1.0, 0.5, 0.6, 0.7: with patience 2 the run stops after the fourth (step 8)
    first = _tiny_trainer(tmp_path, steps=20, eval_every=2, checkpoint_every=2, patience=2)
    assert first.fit() == {"loss": 0.7} and first.step == 8
    again = _tiny_trainer(tmp_path, steps=20, eval_every=2, checkpoint_every=2, patience=2)
    assert again.resume() and again.fit() == {"loss": 0.7}
    assert again.step == 8 and checkpoint.step_of(checkpoint.latest(tmp_path / "checkpoints")) == 8


def test_a_non_finite_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from maskattn.errors import TrainingError

    trainer = _tiny_trainer(tmp_path, steps=10, checkpoint_every=2)
    loss = trainer.loss_fn
    trainer.loss_fn = lambda m, b: loss(m, b) * (float("nan") if trainer.step >= 5 else 1.0)
    with pytest.raises(TrainingError, match=r"^step 5: the training loss is nan; .*/step-000000004"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert checkpoint.latest(tmp_path / "checkpoints").name == "step-000000004"
    assert all(torch.isfinite(t).all() for t in _final_weights(tmp_path).values())


def test_a_learning_rate_whose_update_overflows_stops_training_naming_train_lr(tmp_path):
    # train.lr=1e38 is finite and > 0, but AdamW's step lr / (1 - beta1 ** step) is past float32's 3.4e38: its
    # RuntimeError 'value cannot be converted to type float without overflow' was a traceback from torch.optim
    from maskattn.errors import TrainingError
    from maskattn.training import Callback

    class Raise(Callback):
        def on_step(self, trainer, step, metrics):
            if step == 4:
                trainer.cfg.lr = 3e38

    trainer = _tiny_trainer(tmp_path, steps=10, checkpoint_every=2, schedule="constant")
    trainer.callbacks.append(Raise())
    with pytest.raises(TrainingError, match=r"^step 5: .*overflow.*train\.lr=3e\+38.* The last good checkpoint is "
                                            r".*/step-000000004"):
        trainer.fit()
    assert torch.finfo(torch.float32).max < 3e38 / (1 - trainer.cfg.betas[0] ** 5)  # the oracle: step 5 cannot fit
    assert checkpoint.latest(tmp_path / "checkpoints").name == "step-000000004"
    assert all(torch.isfinite(t).all() for t in _final_weights(tmp_path).values())


def test_callbacks_hear_every_step_evaluation_checkpoint_and_the_end(tmp_path):
    from maskattn.training import Callback

    heard = []

    class Recorder(Callback):
        def on_step(self, trainer, step, metrics):
            heard.append(("step", step, sorted(metrics)))

        def on_evaluate(self, trainer, step, metrics):
            heard.append(("evaluate", step, sorted(metrics)))

        def on_checkpoint(self, trainer, step, path):
            heard.append(("checkpoint", step, path.name))

        def on_end(self, trainer):
            heard.append(("end",))

    trainer = _tiny_trainer(tmp_path, steps=4, eval_every=2, checkpoint_every=2)
    trainer.callbacks.append(Recorder())
    trainer.fit()
    assert heard == [("step", 1, ["loss", "lr"]), ("step", 2, ["loss", "lr"]), ("evaluate", 2, ["loss"]),
                     ("checkpoint", 2, "step-000000002"), ("step", 3, ["loss", "lr"]), ("step", 4, ["loss", "lr"]),
                     ("evaluate", 4, ["loss"]), ("checkpoint", 4, "step-000000004"), ("end",)]  # saved once


def test_report_to_tensorboard_writes_scalars_with_tensorboards_own_writer(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'maskattn[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _tiny_trainer(tmp_path, steps=4, eval_every=2, report_to=["tensorboard"]).fit()
    events = EventAccumulator(str(tmp_path / "events"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]
    assert "train/lr" in events.Tags()["scalars"]
    with pytest.raises(ValueError, match=r"report_to must be a list of 'tensorboard', got \['wandb'\]"):
        TrainConfig(report_to=["wandb"])


def test_layer_decay_scales_each_layer_learning_rate_by_its_depth(tmp_path):
    from maskattn.models import EncoderConfig, EncoderModel
    from maskattn.training import learning_rate, parameter_groups

    model = EncoderModel(EncoderConfig.preset("tiny", num_labels=2))
    layers = len(model.encoder.layers)
    plain = parameter_groups(model, 0.01)
    assert len(plain) == 2 and all(g["lr_scale"] == 1.0 for g in plain)
    # the two groups the trainer always made, in their order (checkpoints hold the optimizer by group index)
    assert [p.dim() >= 2 for p in plain[0]["params"]] == [True] * len(plain[0]["params"])
    assert [p.dim() for p in plain[1]["params"]] == [1] * len(plain[1]["params"])
    groups = parameter_groups(model, 0.01, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if ".layers." in name:
            i = int(name.split(".layers.")[1].split(".")[0])
            assert scale[id(p)] == 0.5 ** (layers - i), name
        elif "embed" in name:
            assert scale[id(p)] == 0.5 ** (layers + 1), name
        else:
            assert scale[id(p)] == 1.0, name
        assert decay[id(p)] == (0.01 if p.dim() >= 2 else 0.0), name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    # the trainer applies the scales on top of the schedule
    trainer = _tiny_trainer(tmp_path, steps=3, layer_decay=0.5)
    trainer.fit()
    lrs = sorted(g["lr"] for g in trainer.optimizer.param_groups)
    base = learning_rate(trainer.cfg, 3)
    # nn.Sequential(Linear, ReLU, Linear): no "layers.i." names, so every parameter is a head (scale 1)
    assert lrs == pytest.approx([base] * len(lrs))
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\], got 1.5"):
        TrainConfig(layer_decay=1.5)


def test_a_seed_torch_cannot_take_is_refused_when_the_settings_are_read():
    # --set train.seed=2**64 passed the settings and failed inside torch.manual_seed ("Overflow when unpacking")
    for bad in (2**64, -1, True, 1.0):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\), got "):
            TrainConfig(seed=bad)
    assert TrainConfig(seed=2**63 - 1).seed == 2**63 - 1


def test_to_device_moves_the_tensors_of_a_batch_and_keeps_the_rest():
    from maskattn.training import to_device

    batch = {"ids": torch.ones(2, 3), "pair": (torch.zeros(1), 5), "rows": [torch.ones(1)], "num_targets": 6}
    moved = to_device(batch, "meta")
    assert moved["ids"].device.type == "meta" and moved["rows"][0].device.type == "meta"
    assert isinstance(moved["pair"], tuple) and moved["pair"][0].device.type == "meta" and moved["pair"][1] == 5
    assert moved["num_targets"] == 6 and batch["ids"].device.type == "cpu"
    pair = collections.namedtuple("pair", "x n")(torch.ones(1), 2)
    assert to_device(pair, "meta").x.device.type == "meta" and to_device(pair, "meta").n == 2


def test_a_resume_trains_with_its_own_optimizer_settings(tmp_path):
    # The optimizer state brought back the checkpoint's weight decay and betas, while the checkpoint that
    # followed recorded the new ones.
    _tiny_trainer(tmp_path, steps=4, checkpoint_every=2, weight_decay=0.1).fit()
    again = _tiny_trainer(tmp_path, steps=6, checkpoint_every=2, weight_decay=0.0, betas=(0.5, 0.6))
    assert again.resume()
    assert [(g["weight_decay"], g["betas"]) for g in again.optimizer.param_groups] == [(0.0, (0.5, 0.6))] * 2
    assert again.optimizer.state  # the moments themselves came back
    again.fit()
    saved = checkpoint.load(checkpoint.latest(tmp_path / "checkpoints"))
    assert [g["weight_decay"] for g in saved["optimizer"]["param_groups"]] == [0.0, 0.0]
    regrouped = _tiny_trainer(tmp_path, steps=8, checkpoint_every=2)  # as train.layer_decay regroups a model
    regrouped.optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": 0.0})
    with pytest.raises(CheckpointError, match="has 2 optimizer parameter groups, this run 3: resume with the "
                                              "train\\.layer_decay"):
        regrouped.resume()


def test_a_resume_past_train_steps_is_refused_and_one_at_train_steps_finishes(tmp_path):
    # A checkpoint past train.steps was evaluated and exported as if the shorter run had ended there.
    _tiny_trainer(tmp_path, steps=6, checkpoint_every=2).fit()
    with pytest.raises(CheckpointError, match=r"step-0+6\S* is at step 6, past train\.steps=4: resume with "
                                              r"train\.steps >= 6"):
        _tiny_trainer(tmp_path, steps=4, checkpoint_every=2).resume()
    same = _tiny_trainer(tmp_path, steps=6, checkpoint_every=2)  # a finished run resumes to its end: no new step
    assert same.resume() and same.step == 6
    same.fit()
    assert same.step == 6


def test_the_metrics_log_is_trimmed_only_when_a_resume_replays_steps(tmp_path, monkeypatch):
    from maskattn import training

    _tiny_trainer(tmp_path, steps=4, checkpoint_every=2).fit()
    written = []
    monkeypatch.setattr(training, "atomic_write_text", lambda path, text: written.append(text))
    again = _tiny_trainer(tmp_path, steps=4, checkpoint_every=2)
    again.resume()  # at step 4, the end: every line is kept, nothing is rewritten
    again.fit()
    assert written == []
    log = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "metrics.jsonl").write_text(log + json.dumps({"step": 9, "loss": 1.0}) + "\n")
    _tiny_trainer(tmp_path, steps=4, checkpoint_every=2).resume()
    assert written == [log]  # step 9 (a replaced run's) dropped, in one atomic write
    (tmp_path / "metrics.jsonl").write_text(log.rstrip("\n"))  # killed before the last record's newline
    _tiny_trainer(tmp_path, steps=4, checkpoint_every=2).resume()
    assert written[-1] == log  # rewritten with it, or the next record would join the last line


@pytest.mark.parametrize(("kept", "released_at"), [(True, [3, 6]), (False, [])], ids=["kept", "not-kept"])
def test_the_trainer_hands_freed_memory_back_every_release_interval_where_memory_is_kept(tmp_path, monkeypatch,
                                                                                          kept, released_at):
    # not kept: a host program that never called keep_freed_memory keeps its allocator as it is
    from maskattn import training

    steps = []
    trainer = _tiny_trainer(tmp_path, steps=7)
    monkeypatch.setattr(training, "RELEASE_EVERY", 3)
    monkeypatch.setattr(training, "memory_kept", lambda: kept)
    monkeypatch.setattr(training, "release_freed_memory", lambda: steps.append(trainer.step) or True)
    trainer.fit()
    assert steps == released_at


def test_resuming_a_finished_run_neither_scores_it_again_nor_counts_that_against_patience(tmp_path):
    # eval_every=0: the run's only evaluation is the final one (step 6). Resumed idle, it was evaluated (and logged)
    # again, a tie counted as no improvement, and with patience 1 a later resume to more steps trained nothing.
    _tiny_trainer(tmp_path, steps=6, checkpoint_every=3, patience=1).fit()
    idle = _tiny_trainer(tmp_path, steps=6, checkpoint_every=3, patience=1)
    assert idle.resume() and idle.fit() == {"loss": 1.0} and idle.bad_evals == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [6]  # logged once
    longer = _tiny_trainer(tmp_path, steps=9, checkpoint_every=3, patience=1)
    assert longer.resume()
    longer.fit()
    assert longer.step == 9 and checkpoint.step_of(checkpoint.latest(tmp_path / "checkpoints")) == 9


def test_a_resume_from_before_the_best_checkpoint_drops_it(tmp_path):
    # Killed at step 5, after its best evaluation at step 4 and before a step checkpoint after 2: best/ held step 4,
    # a step the resumed run replays, and was exported with another step's scores.
    run = _tiny_trainer(tmp_path, steps=8, eval_every=2, checkpoint_every=2)
    run.fit()
    for path in checkpoint.list_checkpoints(tmp_path / "checkpoints"):
        shutil.rmtree(path)
    state = run.state()
    state.update(step=2, best=1.0, bad_evals=0)
    checkpoint.save(tmp_path / "checkpoints", 2, state)  # the kill left step 2's checkpoint and best/ at step 4
    shutil.rmtree(tmp_path / "best")
    checkpoint.save(tmp_path / "best", 4, state, keep=1)
    again = _tiny_trainer(tmp_path, steps=8, eval_every=2, checkpoint_every=2)
    assert again.resume() and again.step == 2
    assert checkpoint.list_checkpoints(tmp_path / "best") == [] and again.best is None
    again.fit()  # evaluations 1.0, 0.5, ... from step 4 on: the best is chosen again, at step 6 (0.5)
    assert checkpoint.step_of(checkpoint.latest(tmp_path / "best")) == 6


def test_a_run_that_stops_early_logs_the_training_loss_of_its_last_steps(tmp_path):
    from maskattn.training import Callback

    losses = {}

    class Recorder(Callback):
        def on_step(self, trainer, step, metrics):
            losses[step] = metrics["loss"]

    # evaluations 1.0, 0.5, 0.6 at steps 3, 6, 9: patience 1 stops at step 9, before a log_every=4 line is due
    trainer = _tiny_trainer(tmp_path, eval_every=3, patience=1, log_every=4)
    trainer.callbacks.append(Recorder())
    trainer.fit()
    assert trainer.step == 9
    logged = {r["step"]: r["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "loss" in (r := json.loads(line))}
    # every step's batch holds 16 targets: a window's loss is the plain mean of its steps' losses
    assert sorted(logged) == [4, 8, 9]
    assert logged[9] == pytest.approx(losses[9])
    assert logged[8] == pytest.approx(sum(losses[s] for s in (5, 6, 7, 8)) / 4)


def test_a_resumed_run_logs_the_same_training_losses_as_an_uninterrupted_one(tmp_path):
    straight = _tiny_trainer(tmp_path / "straight", steps=12, log_every=4, checkpoint_every=3)
    straight.fit()
    killed = _tiny_trainer(tmp_path / "killed", steps=12, log_every=4, checkpoint_every=3)
    loss = killed.loss_fn

    def dies_in_step_8(m, b):
        if killed.step == 8:
            raise KeyboardInterrupt  # after the checkpoint of step 6, in the middle of a log window (steps 5-8)
        return loss(m, b)

    killed.loss_fn = dies_in_step_8
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    resumed = _tiny_trainer(tmp_path / "killed", steps=12, log_every=4, checkpoint_every=3)
    assert resumed.resume() and resumed.step == 6
    resumed.fit()

    def losses(out):
        return [(r["step"], r["loss"]) for line in (out / "metrics.jsonl").read_text().splitlines()
                if "loss" in (r := json.loads(line))]

    assert [s for s, _ in losses(tmp_path / "killed")] == [4, 8, 12]
    for (_, a), (_, b) in zip(losses(tmp_path / "straight"), losses(tmp_path / "killed"), strict=True):
        assert b == pytest.approx(a, rel=1e-6)


def test_patience_without_evaluations_is_refused_naming_the_setting(tmp_path):
    from maskattn.errors import SettingError
    from maskattn.training import Trainer

    trainer = _tiny_trainer(tmp_path, patience=2)  # (it evaluates: accepted)
    with pytest.raises(SettingError, match=r"train\.patience=2 .* this run evaluates nothing .* train\.patience=0"):
        Trainer(trainer.model, trainer.cfg, plan=trainer.plan, collate=trainer.collate, loss=trainer.loss_fn,
                out_dir=tmp_path / "none", device="cpu")  # no evaluate: the setting would be ignored


def test_an_early_stops_log_line_times_the_training_not_the_evaluation(tmp_path, monkeypatch):
    import types

    from maskattn import training

    # the trainer's clock moves only as the step and the evaluation below say (a real step's time varies with the
    # machine's load: the test asserted it under 0.25 s)
    now = [0.0]
    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=lambda: now[0], time=time.time))
    trainer = _tiny_trainer(tmp_path, eval_every=3, patience=1, log_every=4)
    scores, loss = trainer.evaluate, trainer.loss_fn

    def step(model, batch):  # a training step of 10 ms
        now[0] += 0.01
        return loss(model, batch)

    def slow(model):  # an evaluation of 0.5 s
        now[0] += 0.5
        return scores(model)

    trainer.loss_fn, trainer.evaluate = step, slow
    trainer.fit()
    line = next(r for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
                if "targets_per_s" in (r := json.loads(line)) and r["step"] == 9)
    assert line["targets_per_s"] == pytest.approx(16 / 0.01)  # step 9's 16 targets; counting the evaluation: 16 / 0.51


def test_a_resume_replaces_the_tensorboard_scalars_of_the_steps_it_replays(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'maskattn[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    killed = _tiny_trainer(tmp_path, steps=12, checkpoint_every=3, report_to=["tensorboard"])
    loss = killed.loss_fn

    def dies_in_step_9(m, b):
        if killed.step == 9:
            raise KeyboardInterrupt  # steps 7 and 8 were reported, the last checkpoint is step 6's
        return loss(m, b)

    killed.loss_fn = dies_in_step_9
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    resumed = _tiny_trainer(tmp_path, steps=12, checkpoint_every=3, report_to=["tensorboard"], lr=3e-3)
    assert resumed.resume() and resumed.step == 6
    resumed.fit()
    events = EventAccumulator(str(tmp_path / "events"))
    events.Reload()
    logged = {r["step"]: r["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "loss" in (r := json.loads(line))}  # log_every=1: the run's every step, trimmed on resume
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == list(range(1, 13))
    assert [e.value for e in scalars] == pytest.approx([logged[s] for s in range(1, 13)], rel=1e-6)


def test_a_run_resumed_after_an_early_stop_logs_only_its_new_steps(tmp_path):
    from maskattn.training import Callback

    losses = {}

    class Recorder(Callback):
        def on_step(self, trainer, step, metrics):
            losses[step] = metrics["loss"]

    # evaluations 1.0, 0.5, 0.6 at steps 3, 6, 9: patience 1 stops at step 9 and logs steps 9 (after the step-8 line)
    _tiny_trainer(tmp_path, eval_every=3, patience=1, log_every=4).fit()
    longer = _tiny_trainer(tmp_path, steps=12, eval_every=3, patience=0, log_every=4)  # (patience 0: trains on)
    longer.callbacks.append(Recorder())
    assert longer.resume() and longer.step == 9
    longer.fit()
    logged = {r["step"]: r["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "loss" in (r := json.loads(line))}
    assert sorted(logged) == [4, 8, 9, 12]
    assert logged[12] == pytest.approx(sum(losses[s] for s in (10, 11, 12)) / 3)  # step 9 was logged already


def test_eval_every_without_evaluations_says_that_nothing_is_evaluated(tmp_path, caplog):
    from maskattn.training import Trainer

    with caplog.at_level("WARNING", logger="maskattn"):
        trainer = _tiny_trainer(tmp_path, eval_every=5)  # (it evaluates: nothing to say)
        assert not caplog.records
        Trainer(trainer.model, trainer.cfg, plan=trainer.plan, collate=trainer.collate, loss=trainer.loss_fn,
                out_dir=tmp_path / "none", device="cpu")  # no evaluate: eval_every does nothing
    assert [r.getMessage() for r in caplog.records] == [
        "training: train.eval_every=5, but this run has no validation data: nothing is evaluated, and the model "
        "of its last step is exported"]


@pytest.mark.parametrize("accumulate", [1, 4])
def test_an_optimizer_step_reads_the_device_once_whatever_the_accumulation(tmp_path, host_reads, accumulate):
    # float(loss) of every micro-batch, then float(norm): accumulate + 1 waits for a GPU per step; the losses and the
    # gradient norm come back together now, and the logged losses are the same Python sums as before
    trainer = _tiny_trainer(tmp_path, steps=2, accumulate=accumulate)
    micro = trainer._next_micro_batches()
    losses = [float(trainer.loss_fn(trainer.model, b).detach()) for b in micro]
    step = trainer.optimizer.step

    def paused_step(*args, **kwargs):  # AdamW reads its step counter, a CPU tensor on every device
        with host_reads.paused():
            return step(*args, **kwargs)

    trainer.optimizer.step = paused_step
    with host_reads() as reads:
        loss_sum, targets = trainer._optimizer_step(micro)
    assert reads.count == 1
    expected = 0.0
    for loss in losses:
        expected += loss
    assert loss_sum == expected and targets == 16 * accumulate


@pytest.mark.parametrize("every", [0.0, 1e9])
def test_progress_into_a_file_is_a_few_plain_lines_not_a_bar(tmp_path, monkeypatch, caplog, fake_stderr, every):
    # stderr redirected to a file: tqdm rewrote its bar there up to 10 times a second, each one joined to the last by
    # a carriage return (one line of megabytes for a long run, which `tail -f` and an editor cannot read)
    from maskattn import training

    stream = fake_stderr(tty=False)
    monkeypatch.setattr(training, "PLAIN_PROGRESS_EVERY", every, raising=False)
    with caplog.at_level(logging.INFO, logger="maskattn"):
        _tiny_trainer(tmp_path, steps=6, log_every=2, progress=True).fit()
    assert "\r" not in stream.text
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "loss" in r]
    if every:  # the first line at once (training has begun), then at most one per interval, and the last
        logged = [logged[0], logged[-1]]
    lines = [line for line in stream.text.splitlines() if not line.startswith("eval step")]  # the final evaluation
    assert len(lines) == len(logged)
    for line, record in zip(lines, logged, strict=True):
        assert line.startswith(f"train: step {record['step']}/6, loss {record['loss']:.4f}, lr {record['lr']:.3g}, ")


def test_progress_on_a_terminal_is_a_bar(tmp_path, caplog, fake_stderr):
    stream = fake_stderr(tty=True)
    with caplog.at_level(logging.INFO, logger="maskattn"):
        _tiny_trainer(tmp_path, steps=3, progress=True).fit()
    assert "\r" in stream.text and "3/3" in stream.text and "train: step" not in stream.text
    # the throughput is of the loss's targets (tokens, labels, answer spans), as metrics.jsonl names it: "tok_s=10"
    # for a QA run was 10 questions' spans a second, not tokens
    last = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-1]
    assert f"targets/s={last['targets_per_s']:.0f}" in stream.text and "tok_s" not in stream.text


def test_an_early_stop_says_so_naming_the_step_and_the_patience(tmp_path, caplog):
    # the bar stopped at 10/20 and the run ended without a word of why
    trainer = _tiny_trainer(tmp_path, eval_every=2, patience=3)
    with caplog.at_level(logging.INFO, logger="maskattn"):
        trainer.fit()
    records = map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
    evaluations = [r for r in records if "eval_loss" in r]
    best = min(evaluations, key=lambda r: r["eval_loss"])
    said = [r.getMessage() for r in caplog.records if "early" in r.getMessage()]
    assert said == [f"train: stopped early at step {evaluations[-1]['step']} of 20: 3 evaluations without a better "
                    f"loss than {best['eval_loss']:.4g} (train.patience=3)"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="maskattn"):
        _tiny_trainer(tmp_path / "full", steps=8, eval_every=2).fit()  # no patience: trained to the end, nothing said
    assert not [r for r in caplog.records if "early" in r.getMessage()]


def test_every_metrics_record_says_when_it_was_written(tmp_path):
    # the log held no time: when a step or evaluation happened, how long evaluations took and where a resume
    # paused could not be read from it (TensorBoard's events keep a wall time for each scalar)
    before = time.time()
    _tiny_trainer(tmp_path, steps=4, eval_every=2).fit()
    after = time.time()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in records] == [
        ["loss", "lr", "step", "targets_per_s", "time"], ["loss", "lr", "step", "targets_per_s", "time"],
        ["eval_loss", "step", "time"], ["loss", "lr", "step", "targets_per_s", "time"],
        ["loss", "lr", "step", "targets_per_s", "time"], ["eval_loss", "step", "time"]]
    times = [r["time"] for r in records]
    assert before <= times[0] and times == sorted(times) and times[-1] <= after


def test_each_evaluation_is_a_line_on_stderr_unless_quiet(tmp_path, caplog, fake_stderr):
    # evaluations went to metrics.jsonl only: a long run showed no validation score until it ended
    import re

    scores = iter([{"accuracy": 0.8731, "loss": 0.25}, {"accuracy": 0.9, "loss": 0.125},
                   {"accuracy": 0.95, "loss": 0.0625}])
    trainer = _tiny_trainer(tmp_path, steps=5, eval_every=2, metric="accuracy", higher_is_better=True, progress=True)
    trainer.evaluate = lambda model: next(scores)
    stream = fake_stderr(tty=True)
    with caplog.at_level(logging.INFO, logger="maskattn"):
        trainer.fit()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval")]
    assert said == ["eval step 2: accuracy 0.8731, loss 0.25", "eval step 4: accuracy 0.9, loss 0.125",
                    "eval step 5: accuracy 0.95, loss 0.0625"]  # the last: the final evaluation, off the interval
    # on a terminal each is a line of its own, not written on after the bar
    assert [part for part in re.split(r"[\r\n]", stream.text) if "eval step" in part] == said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maskattn"):  # maskattn -q
        _tiny_trainer(tmp_path / "quiet", steps=4, eval_every=2, progress=True).fit()
    assert not [r for r in caplog.records if "eval" in r.getMessage()]


def test_a_kill_while_the_final_evaluation_saves_the_best_checkpoint_is_resumed_to_the_same_best(tmp_path,
                                                                                                  monkeypatch):
    # steps=5, eval_every=4, checkpoint_every=5: the loop saves step 5, then the final evaluation (0.5, the best) is
    # logged and saved as best/, then step 5 is saved again. Killed while best/ was written, the resume found step 5's
    # evaluation in the log and returned it: best/ stayed at step 4 (a worse model exported) and step 5's checkpoint
    # kept a best of 1.0.
    straight = _tiny_trainer(tmp_path / "straight", steps=5, eval_every=4, checkpoint_every=5)
    straight.fit()

    class Killed(BaseException):
        pass

    save = checkpoint.save

    def dies_saving_the_last_best(root, step, state, **kw):
        if Path(root).name == "best" and step == 5:
            raise Killed
        return save(root, step, state, **kw)

    monkeypatch.setattr(checkpoint, "save", dies_saving_the_last_best)
    with pytest.raises(Killed):
        _tiny_trainer(tmp_path / "killed", steps=5, eval_every=4, checkpoint_every=5).fit()
    monkeypatch.setattr(checkpoint, "save", save)
    resumed = _tiny_trainer(tmp_path / "killed", steps=5, eval_every=4, checkpoint_every=5)
    assert resumed.resume() and resumed.step == 5
    assert resumed.fit() == {"loss": 0.5}
    for run in (straight, resumed):  # the uninterrupted run is the oracle
        assert checkpoint.step_of(checkpoint.latest(run.out_dir / "best")) == 5
        last = checkpoint.load(checkpoint.latest(run.out_dir / "checkpoints"))
        assert (last["best"], last["bad_evals"]) == (0.5, 0)
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 5]  # step 5 not scored twice
    best = checkpoint.load(checkpoint.latest(tmp_path / "killed" / "best"))["model"]
    for name, value in checkpoint.load(checkpoint.latest(tmp_path / "straight" / "best"))["model"].items():
        assert torch.equal(best[name], value)


@pytest.mark.parametrize("name,value", [("WORLD_SIZE", ""), ("WORLD_SIZE", "two"), ("WORLD_SIZE", "0"),
                                        ("LOCAL_RANK", "x"), ("LOCAL_RANK", "-1")])
def test_a_process_group_variable_that_is_not_a_count_is_named(name, value, monkeypatch):
    # WORLD_SIZE= (set by hand) said "invalid literal for int() with base 10: ''", naming no variable; WORLD_SIZE=0
    # ran as one process without a word; LOCAL_RANK=-1 read GPU -1
    from maskattn import distributed

    monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # LOCAL_RANK is read where there are GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=rf"environment variable {name}='{value}': expected an int >= "):
        distributed.init("cpu") if name == "WORLD_SIZE" else distributed.local_device()


def test_each_optimizer_step_draws_other_random_numbers(tmp_path):
    # The global RNG is seeded per step (so that a resumed run draws what an uninterrupted one would): a seed
    # without the step would give every step the same dropout masks, which no loss curve or resume test shows.
    trainer = _tiny_trainer(tmp_path, steps=4)
    loss, draws = trainer.loss_fn, []
    trainer.loss_fn = lambda m, b: draws.append(torch.rand(4)) or loss(m, b)
    trainer.fit()
    assert len(draws) == 4 and len({tuple(d.tolist()) for d in draws}) == 4


@pytest.mark.parametrize("clip_norm", [1.0, None])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_stops_training_in_its_step_before_it_reaches_the_weights(tmp_path, clip_norm, bad):
    # Without clipping (train.clip_norm=none) the norm was not computed: AdamW took the inf/NaN gradient, the weights
    # became NaN, the step checkpoint saved them, and the run stopped a step later blaming that step's loss and naming
    # the NaN checkpoint as the last good one.
    from maskattn.errors import TrainingError

    trainer = _tiny_trainer(tmp_path, steps=6, checkpoint_every=1, clip_norm=clip_norm)
    trainer.model[0].weight.register_hook(lambda grad: grad * bad if trainer.step == 3 else grad)
    with pytest.raises(TrainingError, match=rf"^step 3: the gradient norm is {bad}; training stopped before updating "
                                            r"the weights\. The last good checkpoint is .*/step-000000002"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(torch.isfinite(t).all() for t in _final_weights(tmp_path).values())


@pytest.mark.parametrize("clip_norm", [0.05, 1e6, None])
def test_the_clipped_gradients_are_torchs_clip_grad_norm_of_the_mean_loss_gradients(tmp_path, clip_norm):
    # the oracle: the gradient of the step's mean loss computed by hand on a copy, clipped by torch's own function
    from copy import deepcopy

    trainer = _tiny_trainer(tmp_path, steps=1, clip_norm=clip_norm, accumulate=2)
    copy = deepcopy(trainer.model)
    micro = trainer._next_micro_batches()
    mean = sum(trainer.loss_fn(copy, b) for b in micro) / sum(b["num_targets"] for b in micro)
    mean.backward()
    if clip_norm:
        torch.nn.utils.clip_grad_norm_(copy.parameters(), clip_norm)
    seen, step = [], trainer.optimizer.step
    trainer.optimizer.step = lambda: seen.extend(p.grad.clone() for p in trainer.model.parameters()) or step()
    trainer._optimizer_step(micro)
    assert len(seen) == 4 and all(torch.allclose(a, b.grad, rtol=1e-6, atol=1e-9)
                                  for a, b in zip(seen, copy.parameters(), strict=True))


def test_every_seed_the_settings_accept_trains(tmp_path):
    # train.seed up to 2**63 - 1 passes the settings, but the per-step seed (seed * 1_000_003 + ...) and the data
    # order's (seed * 7919 + epoch) overflowed torch.manual_seed: "Overflow when unpacking long long" at step 1
    from maskattn.data import random_batches

    big = 2**63 - 1
    trainer = _tiny_trainer(tmp_path, steps=2, seed=big)
    trainer.plan = lambda epoch: random_batches(64, 16, seed=big, epoch=epoch)
    trainer.fit()
    assert trainer.step == 2
    assert sorted(i for b in random_batches(64, 16, seed=big, epoch=0) for i in b) == list(range(64))


@pytest.mark.parametrize("step", ['"2"', "true", "2.0", "null", "[2]"])
def test_a_metrics_record_whose_step_is_not_an_int_is_refused_naming_the_line(tmp_path, step):
    # a hand-edited step "2" was a traceback ('<=' not supported between 'str' and 'int'); true was kept as step 1
    from maskattn.errors import UsageError

    _tiny_trainer(tmp_path, steps=4, checkpoint_every=2).fit()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    lines[0] = json.dumps({**record, "step": "STEP"}).replace('"STEP"', step)
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=r"metrics\.jsonl:1: not a metrics record \(JSON with an int step\)"):
        _tiny_trainer(tmp_path, steps=4, checkpoint_every=2).resume()


def test_the_smallest_counts_torchrun_sets_are_accepted(monkeypatch):
    # torchrun --nproc_per_node 1 sets WORLD_SIZE=1, and its first process LOCAL_RANK=0: a single process on GPU 0
    from maskattn import distributed

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.init("cpu") == distributed.Context()
    assert distributed.local_device() == torch.device("cuda", 0)


def test_all_sums_and_from_main_in_a_process_group_give_each_value_its_own_sum():
    # In a process group (one gloo process here, so each sum is the value itself: the oracle) every value keeps
    # its own place: a non-finite gradient norm summed beside the loss must come back non-finite.
    import torch.distributed as dist

    from maskattn import distributed

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        values = [1.5, 0.0, math.inf, -2.0]
        assert distributed.all_sums(values) == values
        assert distributed.all_sum(3.0) == 3.0
        assert distributed.from_main({"bleu": 0.25}) == {"bleu": 0.25}
    finally:
        dist.destroy_process_group()


def _plan_of_epoch(epoch):
    return [[0, 1], [2, 3]] if epoch % 2 == 0 else [[4, 5], [6, 7]]


def test_a_run_checkpointed_at_an_epochs_end_resumed_with_another_number_of_processes_starts_the_next_epoch(
        tmp_path, monkeypatch):
    # Oracle: the plan read in order. One process trains epoch 0's two batches; two processes resumed from that
    # checkpoint go on with epoch 1's first batch (rank 0's share, [4]), not a later epoch's.
    from maskattn import distributed

    seen = {}
    for leg, world, steps in (("before", 1, 2), ("after", 2, 3)):
        trainer = _tiny_trainer(tmp_path, checkpoint_every=1)
        trainer.plan = _plan_of_epoch
        if world == 2:
            trainer.world = 2
            monkeypatch.setattr(distributed, "all_sum", lambda x: 2 * x)
            assert trainer.resume()
        seen[leg] = _trained_batches(trainer, steps)
    assert seen == {"before": [[0, 1], [2, 3]], "after": [[4]]}
