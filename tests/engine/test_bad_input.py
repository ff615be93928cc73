"""Bad input through `python -m engine` (engine.cli.main): one line naming what is at fault, exit 2
before training with no run directory created, exit 1 only once the run has begun, and never a
traceback. Each case of issue 10 is here by name; tests/engine/test_fuzz.py generates the rest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import engine
import engine.plugins as discovery
from engine.cli import main
from tests.helpers import Pairs, read_json, tutorial_data


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    """The error line of stderr, which must be its only line and hold no traceback."""
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.removeprefix("error: ").rstrip("\n")


# --- components and files the cases refer to -------------------------------------------------------


def int_model(info: engine.DataInfo) -> int:
    return 5


class Strings(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return "text", 1.0


def string_dataset() -> Strings:
    return Strings()


def float64_dataset(seed: int) -> Pairs:
    """The tutorial's samples as numpy float64 arrays, as a Dataset returns them."""
    x, y = tutorial_data(seed, 40)
    return Pairs(x.double().numpy(), y.double().numpy())


class NotAModel:
    def __init__(self, info: engine.DataInfo) -> None:
        pass


@pytest.fixture
def files(tmp_path: Path) -> Path:
    np.savez(tmp_path / "strings.npz", x=np.array([["a"], ["b"], ["c"]]), y=np.array([1.0, 2.0, 3.0]))
    x = np.random.RandomState(0).randn(10, 2).astype(np.float32)
    np.savez(tmp_path / "huge_labels.npz", x=x, y=np.full(10, 10**15, dtype=np.int64))
    (tmp_path / "not.npz").write_bytes(b"PK\x03\x04 not a zip")
    rows = [f"{i / 10},{(i * 37) % 350}" for i in range(400)]  # prices: whole numbers, 350 values
    (tmp_path / "prices.csv").write_text("size,price\n" + "\n".join(rows) + "\n")
    (tmp_path / "ragged.csv").write_text("a,b,t\n1,2,0.5\n3,4,1.5,9\n")
    (tmp_path / "short.csv").write_text("a,b,t\n1,2,0.5\n3,4\n")
    (tmp_path / "twice.csv").write_text("a,a,t\n1,2,0.5\n3,4,1.5\n")
    (tmp_path / "headless.csv").write_text("1,2,0.5\n3,4,1.5\n")
    (tmp_path / "unnamed.csv").write_text("a,,t\n1,2,0.5\n3,4,1.5\n")
    (tmp_path / "empty_cell.csv").write_text("a,b,t\n1,2,0.5\n3,,1.5\n")
    (tmp_path / "nan.csv").write_text("a,b,t\n1,2,0.5\n3,nan,1.5\n")
    (tmp_path / "inf.csv").write_text("a,b,t\n1,2,0\n3,4,1e400\n")  # a whole number? no: not finite
    (tmp_path / "settings_plugin.py").write_text(
        "import engine\n\n@engine.hookimpl\ndef register_settings():\n    return {'data': 5}\n"
    )
    (tmp_path / "hookless.py").write_text("import engine\n\nX = 1\n")
    (tmp_path / "starts_badly.py").write_text(
        "import engine\n\n@engine.hookimpl\ndef on_run_start():\n    raise engine.ConfigError('cannot start')\n"
    )
    return tmp_path


CSV = ("--set", "data.name=csv", "--set", "data.target=t", "--set", "data.path=")
NPZ = ("--set", "data.name=npz", "--set", "data.path=")
REF = "tests.engine.test_bad_input"


def with_path(option: tuple[str, ...], file: str) -> list[str]:
    return [*option[:-1], option[-1] + file]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # Tracebacks with exit 1 before.
        (["--set", "seed=-1"], "seed: must be >= 0, got -1"),
        (
            ["--set", f"model.name={REF}:int_model"],
            f"model '{REF}:int_model': the factory returned a int, not a Module",
        ),
        (with_path(NPZ, "strings.npz"), "data.path: array 'x' of '{tmp}/strings.npz' holds <U1 values, not numbers"),
        (
            ["--set", "data.n_samples=1", "--set", "data.val_fraction=0.5"],
            "data.val_fraction: 0.5 of 1 sample leaves none to train on",
        ),
        (
            ["--plugin", "settings_plugin.py"],
            "plugin 'settings_plugin': register_settings must map section 'data' to a settings class, got int",
        ),
        # Config errors that were found only at step 1.
        (["--set", "loss.reduction=bogus"], "loss.reduction: expected one of 'mean', 'sum', got 'bogus'"),
        (["--set", "scheduler.name=step", "--set", "scheduler.step_size=0"], "scheduler.step_size: must be >= 1"),
        (
            ["--set", "data.name=classification", "--set", "loss.name=cross_entropy", "--set", "loss.weight=[1, 2]"],
            "loss.weight: 2 weights given, but the data has 4 classes",
        ),
        # Misleading messages before.
        (
            [*with_path(NPZ, "huge_labels.npz"), "--set", "loss.name=cross_entropy"],
            "data: the targets are whole numbers, read as class indices, but the largest (1000000000000000) would "
            "make 1000000000000001 classes for 10 samples; if they are values, not classes, set "
            'data.task = "regression"',
        ),
        (["--set", "optimizer.betas=[0.9]"], "optimizer.betas: expected 2 values, got 1: [0.9]"),
        (
            [*with_path(CSV, "prices.csv"), "--set", "data.target=price", "--set", "data.task=classification"],
            "loss.name: 'mse' compares outputs with values, but the targets were read as class indices (350 "
            'classes): use loss cross_entropy (or nll), or if they are values, set data.task = "regression".',
        ),
        # Nonsense accepted before.
        (["--set", "optimizer.lr=0"], "optimizer.lr: must be > 0, got 0"),
        (["--set", "scheduler.name=onecycle", "--set", "scheduler.max_lr=-1"], "scheduler.max_lr: must be > 0"),
        (["--set", "plugins=[1]"], "plugins[0]: expected str, got 1"),
        (with_path(CSV, "ragged.csv"), "data.path: '{tmp}/ragged.csv' line 3 has 4 values, but the header names 3"),
        # Failed configs that left a run directory behind.
        (["--set", "precision.name=fp8"], "precision.name: unknown precision 'fp8' (choose one of: 16-mixed, 32,"),
        (["--set", "log.every=-1"], "log.every: must be >= 0, got -1"),
        # More of the same kind.
        (with_path(CSV, "short.csv"), "data.path: '{tmp}/short.csv' line 3 has 2 values, but the header names 3"),
        (with_path(CSV, "twice.csv"), "data.path: the header of '{tmp}/twice.csv' names column 'a' twice"),
        (with_path(CSV, "headless.csv"), "data.path: the first line of '{tmp}/headless.csv' is numbers, not a header"),
        (with_path(CSV, "unnamed.csv"), "data.path: column 2 of the header of '{tmp}/unnamed.csv' has no name"),
        (with_path(CSV, "empty_cell.csv"), "data.path: '{tmp}/empty_cell.csv' line 3, column 'b' is empty"),
        (with_path(CSV, "nan.csv"), "data: the training inputs hold values that are not finite in float32"),
        (with_path(CSV, "inf.csv"), "data: the training targets hold values that are not finite in float32"),
        (with_path(NPZ, "not.npz"), "data.path: '{tmp}/not.npz' is not a readable .npz file: BadZipFile"),
        (
            ["--set", f"data.name={REF}:string_dataset"],
            "data: the input of sample 0 of the Dataset is a builtins.str, not a tensor, array or number",
        ),
        (["--set", f"model.name={REF}:NotAModel"], f"model.name: '{REF}:NotAModel' is a class but not a torch.nn"),
        (["--set", f"model.name={REF}:REF"], f"model.name: '{REF}:REF' is a str, not a function or class"),
        (
            ["--set", "data.name=classification", "--set", "model.out_features=2", "--set", "loss.name=nll"],
            "on a sample of the training data: loss 'nll': the targets hold class indices up to 3, but the model "
            "outputs only 2 classes",
        ),
        (["--plugin", "hookless.py"], "plugin 'hookless' (--plugin hookless.py): a module with no hook implementation"),
        (["--plugin", f"{REF}:nothing"], f"plugin '{REF}:nothing': '{REF}' has no attribute 'nothing'"),
        (["--set", "run_name=taken"], "run 'taken' exists: use --resume runs/taken or another run_name"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_creates_nothing(capsys, files, argv, message):
    (files / "runs" / "taken").mkdir(parents=True)
    before = {path.name for path in (files / "runs").iterdir()}
    code, out, err = run_cli(capsys, "run", "--set", "epochs=2", *argv)
    assert code == 2, err
    assert one_line(err).startswith(message.format(tmp=files))
    assert out == ""
    assert {path.name for path in (files / "runs").iterdir()} == before  # no run directory created


def test_a_job_file_with_a_byte_order_mark_is_read(capsys, tmp_path):
    (tmp_path / "job.toml").write_text("epochs = 3\n", encoding="utf-8-sig")
    code, out, err = run_cli(capsys, "config", "job.toml")
    assert code == 0, err
    assert "\nepochs = 3\n" in out


def test_csv_blank_lines_and_a_byte_order_mark_are_read(capsys, tmp_path):
    text = "a,b,t\n\n1,2,0.5\n  \n3,4,1.5\n\n"
    (tmp_path / "blank.csv").write_text(text, encoding="utf-8-sig")  # a BOM, as spreadsheets write
    code, _, err = run_cli(capsys, "config", *with_path(CSV, "blank.csv"))
    assert code == 0, err
    trainer = engine.setup(None, overrides=with_path(CSV, "blank.csv")[1::2])
    assert trainer.loaders.x.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert trainer.loaders.y.tolist() == [[0.5], [1.5]]


def test_a_float64_dataset_is_cast_like_in_memory_data(capsys):
    code, _, err = run_cli(capsys, "run", "--set", f"data.name={REF}:float64_dataset", "--set", "epochs=2")
    assert code == 0, err
    in_memory = engine.run({"epochs": 2, "run_name": "memory", "data": {"n_samples": 40}})
    trained = engine.load(next(p for p in Path("runs").iterdir() if p.name != "memory"), trust=True)
    for mine, theirs in zip(trained.parameters(), in_memory.model.parameters()):
        torch.testing.assert_close(mine, theirs)


# --- code a job file imports ------------------------------------------------------------------------


def test_a_job_file_cannot_call_the_standard_library(capsys, tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "job.toml").write_text(f'[loss]\nname = "os:system"\ncommand = "touch {marker}"\n')
    code, out, err = run_cli(capsys, "run", "job.toml")
    assert code == 2 and out == ""
    assert one_line(err).startswith("loss.name: 'os:system' is in the standard library, which provides no components")
    assert not marker.exists() and not Path("runs").exists()


def test_config_lists_the_code_a_job_imports_and_no_imports_refuses_it(capsys, tmp_path):
    (tmp_path / "job.toml").write_text(
        f'epochs = 2\n[model]\nname = "tests.helpers:flat_model"\n[data]\nname = "{REF}:float64_dataset"\n'
    )
    code, out, err = run_cli(capsys, "config", "job.toml", "--set", "model.name=tests.helpers:scaled_model")
    assert code == 0, err
    assert out.startswith(
        "# This job imports and calls code; trust it as you would a script (--no-imports refuses a job file's):\n"
    )
    listed = [line for line in out.splitlines() if line.startswith("#   ")]
    assert listed == [
        '#   model.name = "tests.helpers:scaled_model"  (--set)',
        f'#   data.name = "{REF}:float64_dataset"',
    ]
    code, out, err = run_cli(capsys, "run", "job.toml", "--no-imports")
    assert code == 2 and out == ""
    assert one_line(err) == (
        "model.name: 'tests.helpers:flat_model' imports code, which --no-imports forbids "
        "(a job file that imports code must be trusted like a script)"
    )
    (tmp_path / "plugins.toml").write_text('plugins = ["hookless_elsewhere.py"]\n')
    code, _, err = run_cli(capsys, "config", "plugins.toml", "--no-imports")
    assert code == 2 and one_line(err).startswith("plugins[0]: 'hookless_elsewhere.py' imports code")
    # What the command line names is the user's own.
    code, _, err = run_cli(
        capsys, "run", "--no-imports", "--set", f"data.name={REF}:float64_dataset", "--set", "epochs=1"
    )
    assert code == 0, err


# --- plugins -----------------------------------------------------------------------------------------


def test_a_plugin_file_loads_under_a_private_module_name(capsys, tmp_path):
    import json

    (tmp_path / "json.py").write_text(
        "import engine\n\n@engine.hookimpl\ndef on_run_start(trainer):\n    print('json plugin here')\n"
    )
    code, out, err = run_cli(capsys, "run", "--plugin", "json.py", "--set", "epochs=1", "--block", "checkpoint")
    assert code == 0, err
    assert out.startswith("json plugin here\n")
    assert sys.modules["json"] is json and hasattr(json, "JSONEncoder")


class Counting:
    """A class plugin: instantiated per run."""

    @engine.hookimpl
    def on_epoch_end(self, epoch: int) -> None:
        print(f"epoch {epoch} ended")


def test_a_class_plugin_from_the_command_line(capsys):
    code, out, err = run_cli(capsys, "run", "--plugin", f"{REF}:Counting", "--set", "epochs=2", "--set", "run_name=c")
    assert code == 0, err
    assert "epoch 1 ended\n" in out and "epoch 2 ended\n" in out
    assert f'plugins = ["{REF}:Counting"]' in Path("runs/c/config.toml").read_text()  # it reruns


class FakeEntryPoint:
    def __init__(self, name: str, value: str, dist: str) -> None:
        self.name, self.value, self.group, self.dist = name, value, engine.ENTRY_POINT_GROUP, SimpleNamespace(name=dist)

    def load(self):
        raise AssertionError("a clashing entry point must not be loaded")


def test_an_entry_point_named_like_a_built_in_names_both_packages(capsys, monkeypatch):
    real = discovery.entry_points
    clash = FakeEntryPoint("losses", "their_losses", "their-package")
    monkeypatch.setattr(
        discovery,
        "entry_points",
        lambda group: [*real(group=group), *([clash] if group == engine.ENTRY_POINT_GROUP else [])],
    )
    code, out, err = run_cli(capsys, "run")
    assert code == 2 and out == ""
    assert one_line(err) == (
        "plugin name 'losses' is declared by two entry points: engine_plugins.losses of package torch-plugin-engine "
        "and their_losses of package their-package; uninstall one or rename its entry point"
    )
    assert not Path("runs").exists()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (1, "plugin 'int' (passed to engine.run): a int with no hook implementation"),
        (nn.Linear(1, 1), "plugin 'Linear' (passed to engine.run): a Linear with no hook implementation"),
        (NotAModel, "plugin 'NotAModel' (passed to engine.run): cannot be instantiated: TypeError"),
        (Strings, "plugin 'Strings' (passed to engine.run): a Strings with no hook implementation"),
    ],
)
def test_only_modules_classes_and_objects_with_hooks_are_plugins(bad, message):
    with pytest.raises(engine.ConfigError) as raised:
        engine.make_plugins([bad])
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize(
    ("hook", "result", "message"),
    [
        ("wrap_model(model)", "return 5", "plugin 'hooked': hook wrap_model returned a int, not Module"),
        ("wrap_step(step)", "return torch.zeros(1)", "plugin 'hooked': hook wrap_step returned a Tensor, not Callable"),
        ("build_loaders()", "return {}", "hook build_loaders returned a dict, not an engine.Loaders"),
        ("before_forward(batch)", "return (batch.x, batch.y)", "plugin 'hooked': hook before_forward returned a tuple"),
        (
            "compute_loss(output)",
            "return {'l2': output}",
            "plugin 'hooked': hook compute_loss returned a tensor of shape (100, 1) float32 for 'l2', not a tensor",
        ),
        (
            "compute_metrics()",
            "return 0.5",
            "plugin 'hooked': hook compute_metrics returned a float, not None or {name",
        ),
        (
            "compute_metrics()",
            "raise engine.TrainingError('no metric')",
            "plugin 'hooked' failed in hook compute_metrics: no metric",
        ),
        ("register_components()", "return {'loss': {'odd': 5}}", "plugin 'hooked': loss 'odd' is not a factory"),
        ("after_step()", "yield", "plugin 'hooked': hook after_step is called per step or epoch by the engine and"),
    ],
)
def test_what_a_hook_returns_is_checked_at_setup(capsys, tmp_path, hook, result, message):
    mark = "@engine.hookimpl(tryfirst=True)" if hook.startswith("build_loaders") else "@engine.hookimpl"
    if result == "yield":
        mark = "@engine.hookimpl(wrapper=True)"
    (tmp_path / "hooked.py").write_text(f"import torch\n\nimport engine\n\n\n{mark}\ndef {hook}:\n    {result}\n")
    code, out, err = run_cli(capsys, "run", "--plugin", "hooked.py", "--set", "epochs=2")
    assert code == 2 and out == ""
    assert one_line(err).startswith(message)
    assert not Path("runs").exists()


# --- the boundary: exit 2 before the run directory exists, exit 1 after ---------------------------


def test_a_failure_once_the_run_directory_exists_is_the_runs(capsys, files):
    code, out, err = run_cli(capsys, "run", "--plugin", "starts_badly.py", "--set", "run_name=late")
    assert code == 1 and out == "Run files: runs/late\n"
    assert one_line(err) == "at the start of the run: plugin 'starts_badly' failed in hook on_run_start: cannot start"
    assert read_json(Path("runs/late/summary.json"))["status"] == "failed"


def test_ctrl_c_while_the_command_imports_torch_prints_no_traceback(tmp_path):
    # -X importtime reports each module when its import ends: a torch submodule's line means that
    # `import torch` is under way.
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "engine", "config"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    for line in process.stderr:
        if line.split("|")[-1].strip() == "torch._utils":
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and out == ""
    assert [line for line in err.splitlines() if not line.startswith("import time:")] == ["interrupted"]
