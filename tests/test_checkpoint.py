import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from maskattn import checkpoint
from maskattn.checkpoint import CheckpointError


def _training_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight  # tied weights share storage
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "data": {"epoch": 3, "batch": 17},
    }


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_keeps_types_and_values(tmp_path):
    state = _training_state()
    path = checkpoint.save(tmp_path, 5, state)
    loaded = checkpoint.load(path)
    assert loaded.pop("step") == 5
    _assert_same(state, loaded)
    # optimizer state is keyed by int and must load straight back into an optimizer
    assert all(isinstance(k, int) for k in loaded["optimizer"]["state"])
    random.setstate(loaded["rng"]["python"])


def test_tensor_names_are_read_without_loading_and_match_the_loaded_state(tmp_path):
    state = _training_state()
    path = checkpoint.save(tmp_path, 5, state)
    model_names = {n.removeprefix("model.") for n in checkpoint.tensor_names(path) if n.startswith("model.")}
    assert model_names == set(state["model"])  # the oracle: the state_dict that was saved
    assert any(n.startswith("optimizer.state.") for n in checkpoint.tensor_names(path))
    (path / "tensors.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="tensor names"):
        checkpoint.tensor_names(path)
    with pytest.raises(CheckpointError, match="tensor names"):
        checkpoint.tensor_names(tmp_path / "step-000000099")


def test_no_pickle_is_written(tmp_path):
    path = checkpoint.save(tmp_path, 1, _training_state())
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "state.json", "tensors.safetensors"]
    json.loads((path / "state.json").read_text())


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_checkpoint_is_refused_and_the_previous_survives(tmp_path, damage):
    state = _training_state()
    good = checkpoint.save(tmp_path, 10, state)
    bad = checkpoint.save(tmp_path, 20, state)
    target = bad / "tensors.safetensors"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    else:
        target.unlink()
    with pytest.raises(CheckpointError, match=r"corrupt|incomplete") as info:
        checkpoint.load(bad)
    assert str(bad) in str(info.value)
    assert checkpoint.load(good)["step"] == 10


def test_save_and_load_hash_the_tensor_file_once_and_still_refuses_a_flipped_byte(tmp_path, hashed_files):
    # save and load each hashed tensors.safetensors twice: for manifest.json and for state.json's own "sha256"
    path = checkpoint.save(tmp_path, 4, _training_state())
    assert hashed_files == ["tensors.safetensors", "state.json"]  # save: the tensors too are hashed once
    hashed_files.clear()
    _assert_same(checkpoint.load(path), {**_training_state(), "step": 4})
    assert hashed_files.count("tensors.safetensors") == 1
    data = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors: SHA-256 does not match manifest\.json"):
        checkpoint.load(path)
    (path / "manifest.json").unlink()  # a checkpoint written before manifests: state.json's hash alone refuses it
    hashed_files.clear()
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors has SHA-256 .* \(truncated or modified\)"):
        checkpoint.load(path)
    assert hashed_files == ["tensors.safetensors"]


def test_a_failed_save_leaves_no_partial_checkpoint(tmp_path):
    checkpoint.save(tmp_path, 1, {"w": torch.ones(2)})
    with pytest.raises(TypeError, match="cannot store object"):
        checkpoint.save(tmp_path, 2, {"w": torch.ones(2), "bad": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000001"]


def test_keep_prunes_oldest(tmp_path):
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, {"w": torch.full((1,), float(step))}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000000004", "step-000000005"]
    assert checkpoint.latest(tmp_path).name == "step-000000005"


LEGACY = Path(__file__).with_name("data") / "legacy" / "checkpoints" / "step-000000007"


def test_a_checkpoint_written_before_maskattn_io_loads_and_saves_back_byte_for_byte(tmp_path):
    # tests/data/legacy was written by maskattn at commit 0b6c34e (checkpoint.py with its own file code)
    state = checkpoint.load(LEGACY)
    assert state.pop("step") == 7 and state["pair"] == (1, "a") and state["best"] is None
    assert isinstance(state["optimizer"]["state"][0]["exp_avg"], torch.Tensor)
    again = checkpoint.save(tmp_path, 7, state)
    for name in ("state.json", "tensors.safetensors"):
        assert (again / name).read_bytes() == (LEGACY / name).read_bytes(), name


def test_corrupt_state_json_is_a_checkpoint_error_naming_the_file(tmp_path):
    path = checkpoint.save(tmp_path, 1, {"w": torch.ones(2)})
    (path / "state.json").write_text("[1]")
    with pytest.raises(CheckpointError, match=r"is corrupt: .*state\.json: SHA-256 does not match manifest\.json"):
        checkpoint.load(path)
    (path / "manifest.json").unlink()  # a checkpoint written before manifests: its state.json is read as it is
    with pytest.raises(CheckpointError, match=r"is corrupt: .*state\.json: expected a JSON object, got list"):
        checkpoint.load(path)


def test_an_edited_state_json_is_refused(tmp_path):
    # on main only tensors.safetensors was hashed: a checkpoint's step could be edited silently
    path = checkpoint.save(tmp_path, 3, {"w": torch.ones(2)})
    (path / "state.json").write_text((path / "state.json").read_text().replace('"step": 3', '"step": 30'))
    with pytest.raises(CheckpointError, match=r"state\.json: SHA-256 does not match manifest\.json"):
        checkpoint.load(path)


def _hand_made(path, edit):
    """Edit ``path``'s state.json (and maybe its tensors) by ``edit``, then make its hash and manifest match, as a
    checkpoint written by hand would."""
    from maskattn.io import sha256, write_manifest

    meta = json.loads((path / "state.json").read_text())
    edit(path, meta)
    meta["sha256"] = sha256(path / "tensors.safetensors")
    (path / "state.json").write_text(json.dumps(meta))
    write_manifest(path, ["state.json", "tensors.safetensors"])


@pytest.mark.parametrize("edit, message", [
    (lambda p, m: m.pop("state"), r"state\.json must hold a 'state' object .* state of type NoneType"),
    (lambda p, m: m.update(state=[1]), r"state\.json must hold a 'state' object .* state of type list"),
    (lambda p, m: m.pop("step"), r"state\.json must hold .* a 'step' int >= 0, .* step None"),
    (lambda p, m: m.update(step="3"), r"state\.json must hold .* a 'step' int >= 0, .* step '3'"),
    (lambda p, m: m["state"]["__dict__"][0][1].update(__tensor__="gone"), r"state\.json does not describe .*'gone'"),
    (lambda p, m: m["state"].update(__dict__=[1]), r"state\.json does not describe a training state \(TypeError"),
    (lambda p, m: (p / "tensors.safetensors").write_bytes(b""), r"is corrupt: tensors\.safetensors: .*header"),
])
def test_a_hand_made_checkpoint_that_does_not_hold_a_state_is_one_error(tmp_path, edit, message):
    # each was a KeyError, TypeError or SafetensorError traceback from inside unflatten / safetensors
    path = checkpoint.save(tmp_path, 3, {"w": torch.ones(2)})
    _hand_made(path, edit)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(path)
    state = checkpoint.load(checkpoint.save(tmp_path, 4, {"w": torch.ones(2)}))  # as saved: loads
    assert state["step"] == 4 and torch.equal(state["w"], torch.ones(2))


def test_a_transposed_tensor_is_saved_and_loaded(tmp_path):
    w = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous strides, which safetensors refuses as they are
    path = checkpoint.save(tmp_path, 1, {"w": w})
    assert torch.equal(checkpoint.load(path)["w"], w)


def test_tensors_whose_flat_names_coincide_each_come_back(tmp_path):
    # {"a.b": x} beside {"a": {"b": y}}, or int key 0 beside "0", flatten to one tensor name: the second overwrote
    # the first in the file, and both came back as y without a word. The oracle is the state saved.
    state = {"a.b": torch.tensor([1.0]), "a": {"b": torch.tensor([2.0])},
             "x": {0: torch.tensor([3.0]), "0": torch.tensor([4.0])}, "y": [torch.tensor([5.0])], "y.0": torch.ones(2)}
    loaded = checkpoint.load(checkpoint.save(tmp_path, 1, state))
    assert loaded.pop("step") == 1
    assert loaded.keys() == state.keys()
    assert torch.equal(loaded["a.b"], state["a.b"]) and torch.equal(loaded["a"]["b"], state["a"]["b"])
    assert torch.equal(loaded["x"][0], state["x"][0]) and torch.equal(loaded["x"]["0"], state["x"]["0"])
    assert torch.equal(loaded["y"][0], state["y"][0]) and torch.equal(loaded["y.0"], state["y.0"])


@pytest.mark.parametrize("key", [(1, 2), torch.float32, b"x"])
def test_a_dict_key_json_cannot_give_back_is_refused_when_saving(tmp_path, key):
    # a tuple key was saved (as a JSON list) and every load failed: "unhashable type: 'list'"; a dtype or bytes key
    # was json's "Object of type dtype is not JSON serializable", naming no place in the state
    with pytest.raises(TypeError, match=rf"^cannot store a dict key of type {type(key).__name__} .* at 'opt.groups'"):
        checkpoint.save(tmp_path, 1, {"opt": {"groups": {key: torch.ones(1)}}})
    assert checkpoint.list_checkpoints(tmp_path) == []
    state = {"keys": {None: 1, True: torch.ones(1), 2: "b", 2.5: [3], "s": (4,)}}  # the oracle: each comes back
    loaded = checkpoint.load(checkpoint.save(tmp_path, 1, state))
    assert list(loaded["keys"]) == list(state["keys"]) and torch.equal(loaded["keys"][True], torch.ones(1))
    assert [loaded["keys"][k] for k in (None, 2, 2.5, "s")] == [1, "b", [3], (4,)]


def test_a_checkpoint_that_cannot_be_written_is_one_error_naming_the_last_good_one(tmp_path, monkeypatch):
    from maskattn.errors import TrainingError

    state = {"w": torch.ones(3), "step_count": 1}
    first = checkpoint.save(tmp_path, 1, state)
    (tmp_path / ".step-000000002.abc123").mkdir()  # what a save killed half-way leaves
    (tmp_path / ".step-000000001.xyz.old").mkdir()

    def full(tensors, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(TrainingError, match=f"could not write the checkpoint {tmp_path}/step-000000002: No space "
                                            f"left on device; the newest complete checkpoint is {first}"):
        checkpoint.save(tmp_path, 2, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000001"]  # leftovers gone, step 1 intact
    assert checkpoint.load(first)["w"].tolist() == [1.0, 1.0, 1.0]


def test_a_checkpoint_whose_state_names_another_step_than_its_directory_is_refused(tmp_path):
    # step-000000004 holding "step": 3 (edited, its manifest made to match) resumed as step 3 with step 4's weights
    path = checkpoint.save(tmp_path, 4, {"w": torch.ones(2)})
    _hand_made(path, lambda p, m: m.update(step=3))
    with pytest.raises(CheckpointError, match=r"step-000000004: state\.json says step 3, its directory step 4"):
        checkpoint.load(path)
    elsewhere = tmp_path / "copy"  # a directory not named by a step (a copy to look at) loads
    shutil.copytree(path, elsewhere)
    assert checkpoint.load(elsewhere)["step"] == 3


@pytest.mark.parametrize("name", ["7", "0004", "step-²", "step-٤"])
def test_a_copy_under_a_name_that_is_no_step_directory_loads(tmp_path, name):
    # save() names a step directory step-NNNNNNNNN in ASCII digits; step_of read a bare number ("7", a copy named by
    # hand) as a step too, and a non-ASCII digit ("²", which str.isdigit takes and int() refuses) as a ValueError,
    # so load() refused such copies, or failed, since it compares the state's step with its directory's
    path = checkpoint.save(tmp_path / "run", 4, {"w": torch.ones(2)})
    shutil.copytree(path, tmp_path / name)
    assert checkpoint.load(tmp_path / name)["step"] == 4
    assert checkpoint.step_of(tmp_path / name) == -1
    assert checkpoint.step_of(path) == 4
