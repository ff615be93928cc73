"""engine/runs.py: the run directory's exclusive creation, atomic writes that leave the old file or
the new one, files read without running code, JSON lines cut by a kill, paths kept inside a run,
the lock of the process that owns a run and the room kept for its summary. (summary.json's schema
and write_json's non-finite numbers: tests/engine/test_summary.py.)"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import time

import pytest
import torch

import engine

runs = engine.runs


def test_a_named_run_is_created_once(tmp_path):
    made = runs.create(tmp_path / "runs", "mine")
    assert made == tmp_path / "runs" / "mine" and made.is_dir()
    with pytest.raises(engine.ConfigError, match=r"^run 'mine' exists: use --resume .*/runs/mine or another run_name$"):
        runs.create(tmp_path / "runs", "mine")
    with pytest.raises(engine.ConfigError, match=r"^run 'mine' exists"):
        runs.check_free(tmp_path / "runs", "mine")
    runs.check_free(tmp_path / "runs", "other")
    runs.check_free(tmp_path / "runs", "")  # an unnamed run takes a free name when it starts


def test_runs_dir_that_cannot_be_created_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(engine.ConfigError, match=r"^runs_dir: cannot create '.*file/runs': "):
        runs.create(tmp_path / "file" / "runs", "x")


def test_replacing_writes_the_new_file_whole_or_leaves_the_old_one(tmp_path):
    target = tmp_path / "file.txt"
    runs.write_text(target, "old\n")
    with pytest.raises(RuntimeError), runs.replacing(target) as temporary:
        temporary.write_text("half")
        assert temporary in runs.IN_FLIGHT  # a second signal would remove it
        raise RuntimeError("killed while writing")
    assert target.read_text() == "old\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file.txt"] and not runs.IN_FLIGHT
    runs.write_text(target, "new\n")
    assert target.read_text() == "new\n" and sorted(path.name for path in tmp_path.iterdir()) == ["file.txt"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~runs._UMASK)  # not mkstemp's private mode


def test_remove_in_flight_removes_the_temporary_files_being_written(tmp_path):
    with runs.replacing(tmp_path / "file.txt") as temporary:
        temporary.write_text("half")
        runs.remove_in_flight()  # what a second signal does before it exits
        assert not temporary.exists()
        temporary.write_text("whole")  # (the process would be gone; here the block goes on)
    assert (tmp_path / "file.txt").read_text() == "whole"


def test_save_and_load_a_file_of_tensors_and_plain_values(tmp_path):
    saved = {"format": runs.MODEL_FORMAT, "model": {"weight": torch.ones(2)}, "step": 3}
    runs.save(saved, tmp_path / "sub" / "model.pt")
    loaded = runs.load(tmp_path / "sub" / "model.pt", runs.MODEL_FORMAT)
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["weight"], torch.ones(2))


class Payload:
    """Unpickled, it would create the file `marker`."""

    def __init__(self, marker: str = "") -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file '{path}' does not exist"),
        (b"not a torch file", "file '{path}' is not a readable engine.model/2 file: "),
        ({"format": runs.CHECKPOINT_FORMAT, "model": {}}, "file '{path}' is not a engine.model/2 file"),
        ([1, 2], "file '{path}' is not a engine.model/2 file"),
        (Payload(), "file '{path}' is not a readable engine.model/2 file: UnpicklingError"),  # no code runs
    ],
)
def test_loading_what_is_not_a_file_of_the_format_is_a_config_error_naming_it(tmp_path, content, message):
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, Payload):
        path.write_bytes(pickle.dumps(Payload(str(tmp_path / "ran")), protocol=2))
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(engine.ConfigError) as raised:
        runs.load(path, runs.MODEL_FORMAT)
    assert str(raised.value).startswith(message.format(path=path))
    assert not (tmp_path / "ran").exists()


def test_read_lines_keeps_the_whole_lines_of_a_file_a_kill_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert runs.read_lines(path) == []  # none yet
    path.write_text(json.dumps({"epoch": 1}) + "\n" + json.dumps({"epoch": 2}) + "\n" + '{"epoch": 3, "lo')
    assert runs.read_lines(path) == [{"epoch": 1}, {"epoch": 2}]
    path.write_text('{"epoch": 1}\n')
    assert runs.read_lines(path) == [{"epoch": 1}]


def test_write_json_is_strict_json_with_a_newline(tmp_path):
    runs.write_json(tmp_path / "s.json", {"status": "completed", "steps": 3, "loss": 0.5, "error": None})
    text = (tmp_path / "s.json").read_text()
    assert text.endswith("}\n") and json.loads(text) == {"status": "completed", "steps": 3, "loss": 0.5, "error": None}


def test_inside_keeps_a_path_inside_the_run_once_links_are_resolved(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    inner = run_dir / "checkpoints" / "step-1.pt"
    assert runs.inside(run_dir, inner, "checkpoint") == inner
    assert runs.inside(run_dir, run_dir / "checkpoints" / ".." / "model.pt", "checkpoint")
    outside = tmp_path / "elsewhere.pt"
    with pytest.raises(engine.ConfigError, match=r"^checkpoint '.*elsewhere.pt' is outside run '.*runs/r'$"):
        runs.inside(run_dir, outside, "checkpoint")
    with pytest.raises(engine.ConfigError, match="is outside run"):
        runs.inside(run_dir, run_dir / ".." / "other" / "x.pt", "checkpoint")
    (run_dir / "checkpoints" / "link.pt").symlink_to(outside)  # a link out of the run
    with pytest.raises(engine.ConfigError, match=r"^checkpoint '.*link.pt' is outside run"):
        runs.inside(run_dir, run_dir / "checkpoints" / "link.pt", "checkpoint")


@pytest.mark.parametrize(
    ("name", "valid"),
    [("run-1", True), ("2024.05_a+b=c@d", True), ("", False), (".hidden", False), ("-x", False), ("a/b", False)],
)
def test_a_run_name_is_one_plain_path_component(name, valid):
    assert runs.valid_run_name(name) is valid


# --- one process owns a run: its lock -------------------------------------------------------------


def test_a_run_locked_by_one_holder_is_refused_to_another_naming_the_holder(tmp_path):
    run_dir = runs.create(tmp_path, "r")
    assert not runs.held(run_dir)
    lock = runs.Lock(run_dir)
    assert runs.held(run_dir)
    # Another holder: here a second open file of the same process, as another process would be.
    host = socket.gethostname()
    with pytest.raises(engine.ConfigError, match=rf"^run 'r' is in use by pid {os.getpid()} on {host} \("):
        runs.Lock(run_dir)
    lock.release()
    lock.release()  # once is enough
    assert not runs.held(run_dir)
    runs.Lock(run_dir).release()


def test_a_forked_child_does_not_keep_its_parents_lock(tmp_path):
    """A DataLoader worker is a forked child: when the run's process dies, its lock must go with it,
    not when the last worker does."""
    run_dir = runs.create(tmp_path, "r")
    lock = runs.Lock(run_dir)
    started, said = os.pipe()
    child = os.fork()
    if child == 0:  # the child (its fork handlers have run): alive, holding whatever it inherited
        os.write(said, b"up")
        time.sleep(3)
        os._exit(0)
    try:
        assert os.read(started, 2) == b"up"
        lock.release()
        assert not runs.held(run_dir)  # the child closed its copy when it was forked
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(started)
        os.close(said)


def test_the_reserve_holds_disk_space_until_freed(tmp_path):
    run_dir = runs.create(tmp_path, "r")
    runs.reserve(run_dir)
    reserved = run_dir / runs.RESERVE
    assert reserved.stat().st_size == runs.RESERVED_BYTES
    assert reserved.stat().st_blocks * 512 >= runs.RESERVED_BYTES  # allocated, not a sparse file
    runs.unreserve(run_dir)
    runs.unreserve(run_dir)
    assert not reserved.exists()


def test_a_runs_folder_or_file_that_is_a_link_out_of_it_is_refused(tmp_path):
    run_dir = runs.create(tmp_path, "r")
    assert runs.folder(run_dir, "checkpoints") == run_dir / "checkpoints"
    assert runs.folder(run_dir, "checkpoints").is_dir()  # again: it exists
    (tmp_path / "elsewhere").mkdir()
    (run_dir / "exports").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(engine.ConfigError, match=r"^'.*r/exports' is a link: a run's files stay inside it$"):
        runs.folder(run_dir, "exports")
    (run_dir / "notes").write_text("")
    with pytest.raises(engine.ConfigError, match=r"^'.*r/notes' is not a folder"):
        runs.folder(run_dir, "notes")
    (tmp_path / "victim.txt").write_text("keep\n")
    (run_dir / "metrics.jsonl").symlink_to(tmp_path / "victim.txt")
    with pytest.raises(engine.ConfigError, match=r"^'.*r/metrics.jsonl' is a link: a run's files stay inside it$"):
        runs.append_only(run_dir / "metrics.jsonl")
    assert (tmp_path / "victim.txt").read_text() == "keep\n"
    descriptor = runs.append_only(run_dir / "log.jsonl")
    os.close(descriptor)
    assert (run_dir / "log.jsonl").is_file()
