"""plugins/sweep: ``engine sweep JOB.toml`` on Optuna. The space is checked against the settings'
schema before anything is written; each trial is an ordinary run; the table, best.toml and the
plots; pruning; a sweep killed (SIGKILL, SIGINT) and run again ends as one never stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

import engine
from engine.cli import main
from tests.helpers import read_json

optuna = pytest.importorskip("optuna")

from engine_plugins.sweep import space as spaces  # noqa: E402 (after the skip: it needs optuna to run)
from engine_plugins.sweep.study import JOURNAL, STUDY, storage  # noqa: E402

JOB = """
epochs = {epochs}

[data]
name = "classification"
n_samples = 240
n_features = 8
n_classes = 3
batch_size = 30
val_fraction = 0.25

[model]
name = "mlp"
hidden = [16]

[loss]
name = "cross_entropy"

[sweep]
trials = {trials}
metric = "val_accuracy"
pruner = "{pruner}"
threads = 1

[sweep.space]
"optimizer.lr" = {{ log = [1e-4, 0.3] }}
"optimizer.weight_decay" = {{ range = [0.0, 0.1] }}
"model.hidden" = {{ choice = [[4], [16], [32, 32]] }}
"""


def write_job(directory: Path, epochs: int = 3, trials: int = 3, pruner: str = "none", extra: str = "") -> Path:
    path = directory / "job.toml"
    path.write_text(JOB.format(epochs=epochs, trials=trials, pruner=pruner) + extra)
    return path


def sweep(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The command in a process of its own, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "engine", "sweep", *argv], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def trials_of(directory: Path) -> list:
    study = optuna.load_study(study_name=STUDY, storage=storage(directory))
    return study.get_trials(deepcopy=False)


def table_lines(output: str) -> list[list[str]]:
    """The table's rows, their time column removed: what two sweeps of one job must agree on."""
    lines = output[output.index("\ntrial ") + 1 :].splitlines()
    return [fields[:4] + fields[5:] for fields in (line.split() for line in lines if line.startswith("trial-"))]


# --- the space and its checks ---------------------------------------------------------------------


def test_each_form_of_dimension_gives_its_distribution_values_and_overrides():
    found = spaces.parse_space(
        {
            "optimizer.lr": {"log": [1e-4, 0.1]},
            "optimizer.weight_decay": {"range": [0.0, 0.1], "step": 0.03},
            "data.batch_size": {"int": [16, 128], "step": 16},
            "model.hidden": {"choice": [[64], [128, 128]]},
            "loss.name": {"choice": ["mse", "l1"]},
        }
    )
    lr, decay, batch, hidden, loss = found
    assert lr.distribution() == optuna.distributions.FloatDistribution(1e-4, 0.1, log=True)
    assert decay.grid() == [0.0, 0.03, 0.06, 0.09] and decay.extremes() == [0.0, 0.09]  # the grid's last point
    assert batch.grid() == list(range(16, 129, 16)) and batch.distribution().step == 16
    assert hidden.categories() == ["[64]", "[128, 128]"] and hidden.value("[128, 128]") == [128, 128]
    assert loss.categories() == ["mse", "l1"]
    parameters = {"optimizer.lr": 0.001, "model.hidden": "[128, 128]", "data.batch_size": 48, "loss.name": "l1"}
    assert spaces.overrides(found, parameters) == [
        "optimizer.lr=0.001",
        "data.batch_size=48",
        "model.hidden=[128, 128]",
        'loss.name="l1"',
    ]
    assert spaces.grid([decay, batch]) is not None and len(spaces.grid([decay, batch])) == 4 * 8
    assert spaces.grid([lr, batch]) is None  # a log range has no grid


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('"optimizer.lr" = { log = [0.0, 0.1] }', 'sweep.space."optimizer.lr": log = [0.0, 0.1]: a log range'),
        (
            '"optimizer.lr" = { range = [-0.1, 0.1] }',
            'sweep.space."optimizer.lr": -0.1 does not fit: optimizer.lr: must be > 0, got -0.1',
        ),
        (
            '"model.dropout" = { range = [0.0, 1.5] }',
            'sweep.space."model.dropout": 1.5 does not fit: model.dropout: must be < 1, got 1.5',
        ),
        (
            '"optimizer.lrr" = { log = [1e-4, 0.1] }',
            "optimizer.lrr: unknown key in [optimizer] (did you mean 'lr'?)",
        ),
        (
            '"model.hidden" = { int = [8, 64] }',
            'sweep.space."model.hidden": 8 does not fit: model.hidden: expected a list, got 8',
        ),
        (
            '"model.hidden" = { choice = [[8], [-1]] }',
            'sweep.space."model.hidden": [-1] does not fit: model.hidden[0]: must be >= 1, got -1',
        ),
        ('"data.batch_size" = { int = [16, 128], step = 0 }', "step must be above 0"),
        ('"data.batch_size" = { int = [16.5, 128] }', "int takes [low, high], two integers"),
        ('"optimizer.lr" = { choice = [0.1, 0.1] }', "choice lists 0.1 twice"),
        ('"optimizer.lr" = { log = [1e-4, 0.1], range = [0, 1] }', "give exactly one form"),
        ('"optimizer.lr" = { logg = [1e-4, 0.1] }', "unknown key 'logg'"),
        ('runs_dir = { choice = ["a", "b"] }', "sweep.space.runs_dir: the sweep sets it for each trial"),
        ('"sweep.trials" = { int = [1, 2] }', 'sweep.space."sweep.trials": the sweep sets it'),
        ('"optimizer.lr" = 0.1', 'sweep.space."optimizer.lr": expected a table, got 0.1'),
    ],
)
def test_a_space_that_reaches_outside_a_setting_is_exit_2_naming_the_key_before_anything_exists(
    entry, message, tmp_path, capsys
):
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(epochs=2, trials=2, pruner="none").split("[sweep.space]")[0] + "[sweep.space]\n" + entry)
    assert main(["sweep", str(job)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sweep.metric=val_acc"], "sweep.metric: 'val_acc' is not a validation metric of the job (did you mean"),
        (["data.val_fraction=0.0"], "sweep.metric: 'val_accuracy' is measured on validation data, and the job has"),
        (["sweep.sampler=grid"], 'sweep.space."optimizer.lr": sampler = "grid" needs a finite set of values'),
        (["sweep.metric=val_f1", "sweep.direction=auto"], None),  # f1 is better high: accepted
        (["sweep.space={}"], "sweep.space: no setting to search"),
        (["sweep.name=a/b"], "sweep.name: 'a/b' is not one plain name"),
    ],
)
def test_the_sweep_is_checked_before_its_folder_exists(overrides, message, tmp_path, capsys, monkeypatch):
    job = write_job(tmp_path)
    # No trial process starts early (the check is what is tested; a process costs seconds to start).
    monkeypatch.setattr("engine_plugins.sweep.sweeper.Sweeper.unfinished", lambda self: 0)
    if message is None:  # a valid sweep: checked, then stopped where it would start its trials
        monkeypatch.setattr("engine_plugins.sweep.sweeper.Sweeper.owned", lambda self: pytest.fail("checked"))
        with pytest.raises(pytest.fail.Exception, match="checked"):
            main(["sweep", str(job), *(item for o in overrides for item in ("--set", o))])
        return
    assert main(["sweep", str(job), *(item for o in overrides for item in ("--set", o))]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


# --- a sweep, end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_runs_its_trials_as_runs_and_ends_with_the_table_best_toml_and_the_plots(tmp_path, capsys):
    job = write_job(tmp_path, epochs=3, trials=3)
    assert main(["sweep", str(job)]) == 0
    out = capsys.readouterr().out
    directory = tmp_path / "runs" / "job"

    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert len(progress) == 3 and all(
        re.match(r"\[\d/3\] trial-000\d completed, 3 epochs, val_accuracy ", p) for p in progress
    )
    trials = trials_of(directory)
    assert [trial.number for trial in trials] == [0, 1, 2] and {t.state.name for t in trials} == {"COMPLETE"}

    # Each trial is an ordinary run of the job with its values set.
    for trial in trials:
        run_dir = directory / f"trial-{trial.number:04d}"
        summary = read_json(run_dir / "summary.json")
        assert summary["status"] == "completed" and summary["val_accuracy"] == trial.value
        config = tomllib.loads((run_dir / "config.toml").read_text())
        assert config["optimizer"]["lr"] == trial.params["optimizer.lr"]
        assert config["model"]["hidden"] == json.loads(trial.params["model.hidden"])
        assert tuple(engine.load(run_dir)(torch.zeros(2, 8)).shape) == (2, 3)

    # The table, best first, and --status prints it again.
    rows = [line.split() for line in out[out.index("\ntrial ") + 1 :].splitlines() if line.startswith("trial-")]
    values = [float(row[2]) for row in rows]
    assert values == sorted(values, reverse=True) and len(rows) == 3
    assert main(["sweep", str(job), "--status"]) == 0
    status = capsys.readouterr().out
    assert status.startswith("sweep runs/job: 3 of 3 trials finished (3 completed); val_accuracy, maximize; best ")
    assert table_lines(status) == table_lines(out)

    # best.toml is the best trial's config, and trains again to the same figure.
    best = max(trials, key=lambda trial: trial.value)
    assert f"best trial-{best.number:04d}, val_accuracy {best.value:.4g}" in out
    assert f"Best: runs/job/best.toml (trial-{best.number:04d})" in out
    again = engine.run(directory / "best.toml", blocked=["console"])
    assert again.metrics["val_accuracy"] == best.value and again.run_dir.resolve().parent == tmp_path / "runs"
    assert again.config["optimizer"]["lr"] == best.params["optimizer.lr"]
    assert (directory / "history.png").read_bytes()[:4] == b"\x89PNG" and (directory / "importance.png").is_file()

    # Run again, the sweep is complete: nothing is trained; with another job, it is refused.
    assert main(["sweep", str(job)]) == 0
    assert len(trials_of(directory)) == 3
    assert main(["sweep", str(job), "--set", "optimizer.betas=[0.8, 0.99]"]) == 2
    assert (
        "was started with another job: optimizer.betas = [0.9, 0.999] then, [0.8, 0.99] now" in capsys.readouterr().err
    )


@pytest.mark.slow
def test_a_failing_trial_records_its_one_line_error_and_the_sweep_goes_on(tmp_path, capsys):
    # A learning rate of 1e30 turns the loss into inf at the first logging point.
    job = write_job(tmp_path, epochs=2, trials=2)
    space = '[sweep.space]\n"optimizer.lr" = { choice = [0.01, 1e30] }\n\n[log]\nevery = 1\n'
    job.write_text(job.read_text().split("[sweep.space]")[0] + space)
    assert main(["sweep", str(job), "--set", "sweep.sampler=grid"]) == 0
    out = capsys.readouterr().out
    failed = [trial for trial in trials_of(tmp_path / "runs" / "job") if trial.state.name == "FAIL"]
    assert len(failed) == 1 and failed[0].params["optimizer.lr"] == 1e30
    error = failed[0].user_attrs["error"]
    assert error.startswith("non-finite loss (nan)") and "\n" not in error
    assert f"trial-{failed[0].number:04d} failed: {error}" in out


# --- pruning, processes, kills --------------------------------------------------------------------------


@pytest.mark.slow
def test_pruning_stops_hopeless_trials_whose_runs_say_pruned_with_the_epoch(tmp_path):
    job = write_job(tmp_path, epochs=8, trials=8, pruner="median", extra="")
    done = sweep(str(job), "--set", "sweep.startup_trials=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    directory = tmp_path / "runs" / "job"
    pruned = [trial for trial in trials_of(directory) if trial.state.name == "PRUNED"]
    assert pruned, done.stdout
    for trial in pruned:
        run_dir = directory / f"trial-{trial.number:04d}"
        summary = read_json(run_dir / "summary.json")
        assert summary["status"] == "pruned" and summary["epochs_completed"] == max(trial.intermediate_values) < 8
        assert (run_dir / "model.pt").is_file() and engine.load(run_dir) is not None  # an ordinary run still
        assert f"trial-{trial.number:04d} pruned at epoch {summary['epochs_completed']}" in done.stdout
    completed = [trial for trial in trials_of(directory) if trial.state.name == "COMPLETE"]
    assert all(len(trial.intermediate_values) == 8 for trial in completed)  # every validation reported


@pytest.mark.slow
def test_the_same_job_and_seed_propose_the_same_trials_in_the_same_order(tmp_path):
    job = write_job(tmp_path, epochs=1, trials=3)
    for name, seed in (("first", 42), ("second", 42), ("reseeded", 7)):
        done = sweep(str(job), "--set", f"sweep.name={name}", "--set", f"seed={seed}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    first, second, reseeded = (trials_of(tmp_path / "runs" / name) for name in ("first", "second", "reseeded"))
    assert [trial.params for trial in first] == [trial.params for trial in second]
    assert [trial.params for trial in first] != [trial.params for trial in reseeded]


@pytest.mark.slow
def test_parallel_trials_run_in_processes_of_their_own(tmp_path):
    job = write_job(tmp_path, epochs=2, trials=4)
    done = sweep(str(job), "--set", "sweep.parallel=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    directory = tmp_path / "runs" / "job"
    trials = trials_of(directory)
    assert sorted(trial.number for trial in trials) == [0, 1, 2, 3] and {t.state.name for t in trials} == {"COMPLETE"}
    pids = {read_json(directory / f"trial-{n:04d}" / "summary.json")["pid"] for n in range(4)}
    assert len(pids) == 2  # two processes, each training two trials


def wait_for(condition, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


KILLED_JOB = {"epochs": 6, "trials": 5, "pruner": "median", "extra": "\n[checkpoint]\nevery_epochs = 1\n"}
KILLED_ARGUMENTS = ["--set", "sweep.startup_trials=2"]


@pytest.fixture(scope="module")
def never_killed(tmp_path_factory) -> subprocess.CompletedProcess:
    """The sweep the killed ones are compared with, run once to its end."""
    directory = tmp_path_factory.mktemp("never_killed")
    whole = sweep(str(write_job(directory, **KILLED_JOB)), *KILLED_ARGUMENTS, cwd=directory)
    assert whole.returncode == 0, whole.stderr
    return whole


@pytest.mark.slow
@pytest.mark.parametrize(
    ("trial", "when"),
    [
        ("trial-0001", "checkpoints/step-*.pt"),  # inside a trial, with a checkpoint to resume from
        ("trial-0003", "config.toml"),  # as a trial starts: it runs again from its first step
    ],
)
def test_a_sweep_killed_with_sigkill_and_run_again_ends_as_one_never_killed(tmp_path, trial, when, never_killed):
    """parallel = 1: the table of a killed and rerun sweep is the unkilled one's (but the times)."""
    arguments = [str(write_job(tmp_path, **KILLED_JOB)), *KILLED_ARGUMENTS]
    killed = subprocess.Popen(
        [sys.executable, "-m", "engine", "sweep", *arguments], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    directory = tmp_path / "runs" / "job"
    wait_for(lambda: any((directory / trial).glob(when)), seconds=300)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    finished = [t for t in trials_of(directory) if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) < 5  # it was killed with trials to go
    again = sweep(*arguments, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    trials = trials_of(directory)
    assert [trial.number for trial in trials] == [0, 1, 2, 3, 4]
    assert {trial.state.name for trial in trials} <= {"COMPLETE", "PRUNED"}
    assert len({json.dumps(trial.params, sort_keys=True) for trial in trials}) == 5  # none duplicated
    assert table_lines(again.stdout) == table_lines(never_killed.stdout)


@pytest.mark.slow
def test_ctrl_c_stops_the_trials_with_a_checkpoint_and_the_same_command_resumes_them(tmp_path):
    job = write_job(tmp_path, epochs=40, trials=2, extra="\n[checkpoint]\nevery_epochs = 1\n")
    stopped = subprocess.Popen(
        [sys.executable, "-m", "engine", "sweep", str(job)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = tmp_path / "runs" / "job" / "trial-0000"
    wait_for(lambda: any((run_dir / "checkpoints").glob("step-*.pt")) if run_dir.is_dir() else False)
    stopped.send_signal(signal.SIGINT)
    out, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 130, err
    assert "continue with: python -m engine sweep" in err and "interrupted" in out
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "interrupted"
    status = sweep(str(job), "--status", cwd=tmp_path)
    assert "trial-0000  interrupted" in status.stdout, status.stdout
    again = sweep(str(job), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "Resuming the trials a stopped sweep left: trial-0000" in again.stdout
    resumed = read_json(run_dir / "summary.json")
    assert resumed["status"] == "completed" and resumed["resumed_from"].startswith("checkpoints/step-")
    assert [trial.state.name for trial in trials_of(tmp_path / "runs" / "job")] == ["COMPLETE", "COMPLETE"]


def test_a_second_sweep_of_one_folder_is_refused_while_the_first_holds_it(tmp_path, capsys, monkeypatch):
    import fcntl

    monkeypatch.setattr("engine_plugins.sweep.sweeper.Sweeper.unfinished", lambda self: 0)
    job = write_job(tmp_path)
    directory = tmp_path / "runs" / "job"
    directory.mkdir(parents=True)
    blocked = os.environ.get("ENGINE_BLOCK")
    with open(directory / ".sweep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242\n")
        lock.flush()
        assert main(["sweep", str(job)]) == 2
    assert "sweep 'runs/job' is being run by process 4242" in capsys.readouterr().err
    assert sorted(path.name for path in directory.iterdir()) == [".sweep.lock"]
    assert not (directory / JOURNAL).exists() and os.environ.get("ENGINE_BLOCK") == blocked


def test_a_trial_resumed_by_a_rerun_with_more_trials_continues_the_same_run():
    """[sweep] is read by the command alone: a trial interrupted, then resumed by a rerun that
    raised `trials` (or changed any other sweep setting), is the same run, not a changed one."""
    from tests.helpers import job

    class StopAt:  # SIGTERM after step 2: the run checkpoints and stops, as a stopped sweep's trial does
        @engine.hookimpl
        def after_step(self, state):
            if state.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    sweep = {"trials": 2, "space": {"optimizer.lr": {"log": [1e-3, 1e-1]}}}
    trial = job(epochs=4, run_name="trial-0000", sweep=sweep, checkpoint={"every_steps": 1})
    with pytest.raises(engine.Interrupted):
        engine.run(trial, plugins=[StopAt()])
    resumed = engine.run(resume="runs/trial-0000", overrides=["sweep.trials=5", "sweep.parallel=2"])
    assert resumed.state.step == 4  # continued, its changes recorded as any resume's are
    changes = read_json(Path("runs/trial-0000/summary.json"))["changes"]
    assert sorted((change["key"], change["from"], change["to"]) for change in changes) == [
        ("sweep.parallel", 1, 2),
        ("sweep.trials", 2, 5),
    ]
