"""The targets of ``engine sweep`` on the digits example (bench/examples/digits.toml, whose
``[sweep]`` searches the learning rate, the weight decay and the width: 24 trials of 60 epochs).

    pip install scikit-learn optuna
    python bench/examples/export_sklearn.py
    python bench/examples/sweep.py              # the sweep, with pruner = "median" and "none"
    python bench/examples/sweep.py --kill       # and a sweep killed with SIGKILL, run again
    python bench/examples/sweep.py --only-kill  # that alone

Each sweep runs as a user runs it (``python -m engine sweep``, in a process of its own) with the
runs in a temporary folder; the figures come from the runs' summaries and the study. The machine
is shared: the load average is printed with each figure.

1. parallel = 2, pruner = "median" (the job's): the wall time and the best validation accuracy;
2. the same with pruner = "none": the epochs each trains in all, and its best;
3. with --kill, parallel = 1: a sweep never killed, and one killed with SIGKILL at a random moment
   and run again: its trials (none duplicated) and whether its table is the first one's.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
JOB = HERE / "digits.toml"


def sweep(runs_dir: Path, *settings: str) -> tuple[subprocess.CompletedProcess, float]:
    command = [sys.executable, "-m", "engine", "sweep", str(JOB), "--set", f"runs_dir={runs_dir}"]
    for setting in settings:
        command += ["--set", setting]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr}")
    return done, time.perf_counter() - started


def trials(directory: Path) -> list[dict]:
    """Each trial: its state, value, parameters and the epochs its run trained."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.journal.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(directory / "study.journal"))
    )
    found = []
    for trial in optuna.load_study(study_name="sweep", storage=storage).get_trials():
        path = directory / f"trial-{trial.number:04d}" / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        found.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "value": trial.value,
                "params": trial.params,
                "epochs": summary.get("epochs_completed", 0),
            }
        )
    return found


def table(output: str) -> list[list[str]]:
    """The table's rows without the time column."""
    lines = output[output.index("\ntrial ") + 1 :].splitlines()
    return [fields[:4] + fields[5:] for fields in (line.split() for line in lines if line.startswith("trial-"))]


def load() -> str:
    return "load {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def pruning(runs_dir: Path) -> None:
    print(f"before: {load()}")
    median, seconds = sweep(runs_dir, "sweep.name=median")
    median_trials = trials(runs_dir / "median")
    print(f"pruner median, parallel 2: {seconds:.0f} s ({load()})")
    _, seconds_none = sweep(runs_dir, "sweep.name=none", "sweep.pruner=none")
    none_trials = trials(runs_dir / "none")
    print(f"pruner none, parallel 2: {seconds_none:.0f} s ({load()})")
    for name, found in (("median", median_trials), ("none", none_trials)):
        completed = [trial for trial in found if trial["state"] == "COMPLETE"]
        best = max(completed, key=lambda trial: trial["value"])
        epochs = sum(trial["epochs"] for trial in found)
        states = {state: sum(t["state"] == state for t in found) for state in ("COMPLETE", "PRUNED", "FAIL")}
        print(f"| {name} | {len(found)} | {states} | {epochs} | {best['value']:.4f} (trial {best['number']}) |")
    ratio = sum(t["epochs"] for t in median_trials) / sum(t["epochs"] for t in none_trials)
    print(f"epochs, median / none: {ratio:.2f}")
    print(median.stdout[median.stdout.index("sweep ") :])


def kill(runs_dir: Path) -> None:
    # One thread per trial: on a machine other jobs share, two threads for this small MLP cost
    # several times more than one.
    whole, seconds = sweep(runs_dir, "sweep.name=whole", "sweep.parallel=1", "sweep.threads=1")
    print(f"never killed, parallel 1: {seconds:.0f} s ({load()})")
    # A random moment inside the sweep: a random trial's start, then up to 5 s more.
    trial, delay = random.randint(1, 22), random.uniform(0, 5)
    command = [sys.executable, "-m", "engine", "sweep", str(JOB), "--set", f"runs_dir={runs_dir}"]
    command += ["--set", "sweep.name=killed", "--set", "sweep.parallel=1", "--set", "sweep.threads=1"]
    killed = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (runs_dir / "killed" / f"trial-{trial:04d}").is_dir() and killed.poll() is None:
        time.sleep(0.05)
    time.sleep(delay)
    killed.kill()
    killed.wait()
    before = trials(runs_dir / "killed")
    finished = sum(trial["state"] in ("COMPLETE", "PRUNED", "FAIL") for trial in before)
    print(f"killed with SIGKILL {delay:.1f} s after trial {trial} started: {finished} trials finished")
    again, _ = sweep(runs_dir, "sweep.name=killed", "sweep.parallel=1", "sweep.threads=1")
    after = trials(runs_dir / "killed")
    duplicated = len(after) - len({json.dumps(trial["params"], sort_keys=True) for trial in after})
    same = table(again.stdout) == table(whole.stdout)
    print(f"run again: {len(after)} trials, {duplicated} duplicated, the same table as never killed: {same}")


def main() -> int:
    if not (HERE / "data" / "digits.npz").is_file():
        print("run bench/examples/export_sklearn.py first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        if "--only-kill" not in sys.argv[1:]:
            pruning(Path(folder))
        if {"--kill", "--only-kill"} & set(sys.argv[1:]):
            kill(Path(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
