"""maskattn.io: atomic writes leave the old file or the new one, hashes match hashlib, one format error."""

import hashlib
import json

import pytest
import torch

from maskattn import io
from maskattn.checkpoint import CheckpointError


def test_sha256_equals_hashlib_over_the_whole_file(tmp_path):
    data = bytes(range(256)) * 9000  # > 2 MiB: several 1 MiB chunks
    (tmp_path / "f").write_bytes(data)
    assert io.sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    io.atomic_write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")

    def half_then_crash(tmp):
        tmp.write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.atomic_write(path, half_then_crash)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    with io.atomic_directory(tmp_path / "d") as tmp:
        (tmp / "x").write_text("1")
        assert not (tmp_path / "d").exists()
    assert (tmp_path / "d" / "x").read_text() == "1"
    with pytest.raises(KeyError), io.atomic_directory(tmp_path / "e") as tmp:
        (tmp / "x").write_text("1")
        raise KeyError("crash")
    with io.atomic_directory(tmp_path / "d") as tmp:  # an existing directory is replaced
        (tmp / "y").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["y"]


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_read_json_object_names_the_file_and_the_fault(tmp_path, content, message):
    path = tmp_path / "meta.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(io.FormatError, match=message) as info:
        io.read_json_object(path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)


def test_read_json_object_round_trips(tmp_path):
    io.atomic_write_text(tmp_path / "m.json", json.dumps({"a": [1, 2], "b": None}))
    assert io.read_json_object(tmp_path / "m.json") == {"a": [1, 2], "b": None}


def test_checkpoint_error_is_the_format_error_and_still_a_runtime_error():
    assert issubclass(CheckpointError, io.FormatError)
    assert issubclass(CheckpointError, RuntimeError) and issubclass(CheckpointError, ValueError)


def test_atomic_directory_gets_the_mode_mkdir_would_give(tmp_path):
    import os

    os.chmod(tmp_path, 0o2775)  # a group-shared runs directory: new directories inherit its group (setgid)
    (tmp_path / "plain").mkdir()
    with io.atomic_directory(tmp_path / "built") as tmp:
        (tmp / "a").write_text("x")
    # mkdtemp made it 0700, so a shared runs directory's checkpoints were unreadable to the group
    assert (tmp_path / "built").stat().st_mode & 0o7777 == (tmp_path / "plain").stat().st_mode & 0o7777
    assert os.listdir(tmp_path / "built") == ["a"]


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    # model.safetensors came out 0600 (unreadable to a group sharing the runs) while other files were 0644
    import os

    from safetensors.torch import save_file

    io.atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"x": torch.zeros(2)}, str(tmp)))
    (tmp_path / "plain").write_text("x")
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert sorted(os.listdir(tmp_path)) == ["plain", "w.safetensors"]  # no temporary left


def test_an_output_file_is_checked_before_the_work_and_its_directories_made(tmp_path):
    # QA --predictions into a missing directory failed after answering every question; translation --hypotheses under
    # a file failed after decoding everything, with "[Errno 17] File exists"
    (tmp_path / "existing.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"--hypotheses .*h\.txt: .*existing\.txt is a file, not a directory"):
        io.check_output_file(tmp_path / "existing.txt" / "h.txt", "--hypotheses")
    assert (tmp_path / "existing.txt").read_text() == "keep"
    path = io.check_output_file(tmp_path / "new" / "sub" / "p.json", "--predictions")
    assert not path.parent.exists()  # made by the write, after every other refusal: a refused command leaves nothing
    io.atomic_write_text(path, "{}")
    assert path.read_text() == "{}"
    with pytest.raises(ValueError, match="a directory, expected a file"):
        io.check_output_file(tmp_path / "new", "--predictions")


def test_an_output_path_written_as_a_directory_or_through_a_symlink_loop_is_named(tmp_path):
    # `--hypotheses out/` (a directory not made yet) was accepted and wrote a file named "out"; a symlink loop was
    # Python's RuntimeError "Symlink loop from ...", which the command line shows as a traceback
    import os

    for given in (f"{tmp_path / 'out'}/", f"{tmp_path / 'out'}{os.sep}"):
        with pytest.raises(ValueError, match=r"--hypotheses .*out/: ends in '/', a directory; expected a file"):
            io.check_output_file(given, "--hypotheses")
    assert os.listdir(tmp_path) == []
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    for given in (tmp_path / "a", tmp_path / "a" / "h.txt"):
        with pytest.raises(ValueError, match=r"--hypotheses .*: a symbolic link loop"):
            io.check_output_file(given, "--hypotheses", [tmp_path / "in.txt"])


def test_a_symlink_loop_among_the_inputs_is_named_as_that_input_not_the_output(tmp_path):
    # `caption --example out.png MODEL loop.png`: the loop in the input was reported as "--example out.png: a
    # symbolic link loop", blaming the output path, which has none
    import os

    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(ValueError) as caught:
        io.check_output_file(tmp_path / "out.png", "--example", [tmp_path / "model", tmp_path / "a"])
    assert str(caught.value).startswith(f"{tmp_path / 'a'}: a symbolic link loop")
    assert not (tmp_path / "out.png").exists()


def test_an_output_file_inside_an_input_directory_or_existing_without_overwrite_is_refused(tmp_path):
    # writing into a model directory puts a file its manifest does not list (the next load refuses it)
    model = tmp_path / "model"
    model.mkdir()
    for out in (model / "h.txt", model / "sub" / "h.txt"):
        with pytest.raises(ValueError, match=r"--hypotheses .*h\.txt: that would write over the input .*model"):
            io.check_output_file(out, "--hypotheses", [model])
    assert io.check_output_file(tmp_path / "h.txt", "--hypotheses", [model]) == tmp_path / "h.txt"
    (tmp_path / "old.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"--hypotheses .*old\.txt exists; give --overwrite"):
        io.check_output_file(tmp_path / "old.txt", "--hypotheses", overwrite=False)
    assert io.check_output_file(tmp_path / "new.txt", "--hypotheses", overwrite=False) == tmp_path / "new.txt"
    assert io.check_output_file(tmp_path / "old.txt", "--hypotheses") == tmp_path / "old.txt"  # overwrite=True


def _manifested(directory):
    import hashlib

    directory.mkdir()
    (directory / "a.json").write_text("{}")
    (directory / "b.bin").write_bytes(b"\x00\x01")
    io.write_manifest(directory, ["a.json", "b.bin"])
    listed = json.loads((directory / io.MANIFEST).read_text())["files"]
    assert listed == {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in listed}
    return directory


def test_verify_manifest_of_some_files_checks_those_files(tmp_path):
    # read_task verifies task.json alone (every_file=False): a modified task.json must still be refused
    d = _manifested(tmp_path / "d")
    (d / "a.json").write_text('{"x": 1}')
    with pytest.raises(io.FormatError, match=r"a\.json: SHA-256 does not match"):
        io.verify_manifest(d, ["a.json"], every_file=False)
    assert io.verify_manifest(d, ["b.bin"], every_file=False)  # only what is read is hashed


def test_adding_to_a_manifest_never_vouches_for_a_modified_file(tmp_path):
    d = _manifested(tmp_path / "d")
    (d / "b.bin").write_bytes(b"changed")
    (d / "c.txt").write_text("new")
    with pytest.raises(io.FormatError, match=r"b\.bin: SHA-256 does not match"):
        io.add_to_manifest(d, "c.txt")
    assert sorted(io.manifest_files(d)) == ["a.json", "b.bin"]  # unchanged


@pytest.mark.parametrize("name", ["sub/a.json", "../a.json", "..", "", "a\\b"])
def test_a_manifest_naming_a_path_outside_its_directory_is_refused(tmp_path, name):
    d = tmp_path / "d"
    d.mkdir()
    (d / io.MANIFEST).write_text(json.dumps({"format": io.MANIFEST_FORMAT, "files": {name: "0" * 64}}))
    with pytest.raises(io.FormatError, match="not a maskattn-manifest-1 manifest"):
        io.manifest_files(d)
