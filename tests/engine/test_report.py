"""engine/report.py and the CLI around it: the runs table (with "crashed"), --version, --quiet,
a closed pipe, the `engine` console script, ENGINE_BLOCK."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import engine
from engine.cli import main


def make_runs() -> None:
    engine.run({"epochs": 6, "run_name": "short", "data": {"val_fraction": 0.2}})
    engine.run({"epochs": 30, "run_name": "long", "optimizer": {"lr": 0.1}})
    engine.run({"epochs": 2, "run_name": "gone"})
    summary = Path("runs/gone/summary.json")
    running = {**json.loads(summary.read_text()), "status": "running", "pid": 2**22 + 12345}  # no such process
    summary.write_text(json.dumps(running))


def test_the_runs_table_sorts_by_a_column_and_spots_crashed_runs(capsys):
    make_runs()
    capsys.readouterr()
    assert main(["runs", "--sort", "loss"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "status", "epochs", "loss", "best", "wall_s", "started"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert [line.split()[0] for line in lines[1:]] == ["long", "short", "gone"]  # lowest loss first
    assert rows["gone"][1] == "crashed" and rows["short"][1] == "completed"
    assert rows["short"][4:6][0] == "val_loss"
    assert main(["runs", "--sort", "epochs", "--reverse"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["long", "short", "gone"]


def test_runs_names_a_missing_directory(capsys):
    assert main(["runs", "nowhere"]) == 2
    assert capsys.readouterr().err == "error: runs_dir: 'nowhere' is not a directory\n"


def test_version_and_quiet(capsys):
    import pytest

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("torch-plugin-engine 0.")
    assert main(["run", "--quiet", "--set", "epochs=3", "--set", "run_name=silent"]) == 0
    assert capsys.readouterr() == ("", "")
    assert Path("runs/silent/model.pt").is_file()


def test_a_closed_pipe_ends_quietly_and_the_console_script_works(tmp_path):
    script = shutil.which("engine", path=str(Path(sys.executable).parent))
    assert script is not None, "the engine console script is installed beside python"
    done = subprocess.run(
        f"'{script}' run --set epochs=400 --set log.every=1 | head -n 2",
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert [line.split(",")[0] for line in done.stdout.splitlines()] == ["Epoch [1/400]", "Epoch [2/400]"]
    assert done.stderr == ""  # no BrokenPipeError, no traceback
    [run_dir] = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_engine_block_blocks_plugins_for_every_run(monkeypatch):
    monkeypatch.setenv("ENGINE_BLOCK", "console, progress")
    assert {"console", "progress"}.isdisjoint(engine.make_plugins().names())
