"""engine/cli.py: `python -m engine run | config | plugins`, their output, exit codes and errors,
and the commands plugins add (`register_commands`).

Most tests call `engine.cli.main` in-process; a few run the real command in a subprocess."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import engine
from engine.cli import Commands, main, parser
from tests.helpers import read_json, read_jsonl, tutorial_data

PYTHON = sys.executable


def engine_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "engine", *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=os.environ.copy()
    )


def tutorial_lines() -> list[str]:
    """What the tutorial's own loop prints: the loss every 100 epochs, then w and b."""
    import torch
    from torch import nn

    x, y = tutorial_data()
    torch.manual_seed(42)
    model = nn.Linear(1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    lines = []
    for epoch in range(1000):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (epoch + 1) % 100 == 0:
            lines.append(f"Epoch [{epoch + 1}/1000], Loss: {loss.item():.4f}")
    lines.append(f"Learned parameters: weight = {model.weight.item():.4f}, bias = {model.bias.item():.4f}")
    return lines


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- run -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_python_m_engine_run_trains_the_tutorial(tmp_path):
    """The real command, as a new user types it; in a folder of theirs named `plugins`, which the
    built-ins (installed as `engine_plugins`) do not import."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "__init__.py").write_text("raise ImportError('the user folder was imported')\n")
    (tmp_path / "plugins" / "accelerate.py").write_text("raise ImportError('the user module was imported')\n")
    done = engine_command("run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:11] == tutorial_lines()
    assert len(lines) == 12
    assert lines[11].startswith("Run files: runs/")
    run_dir = tmp_path / lines[11].removeprefix("Run files: ")
    files = {
        ".lock",
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "model.pt",
        "checkpoints",
    }  # .lock: held while it trained
    assert {p.name for p in run_dir.iterdir()} - {"curves.png"} == files  # curves.png: with matplotlib
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000001000.pt"]
    weight, bias = (float(part.split(" = ")[1]) for part in lines[10].removeprefix("Learned parameters: ").split(", "))
    assert abs(weight - 2) < 0.05 and abs(bias - 3) < 0.05
    assert done.stderr == ""


def test_run_prints_the_loss_line_at_each_logging_point(capsys):
    code, out, err = run_cli(capsys, "run", "--set", "epochs=5", "--set", "loss.name=l1", "--set", "run_name=l1")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert [line.split(",")[0] for line in lines[:5]] == [f"Epoch [{e}/5]" for e in range(1, 6)]
    logged = read_jsonl(Path("runs/l1/metrics.jsonl"))
    assert lines[:5] == [f"Epoch [{m['epoch']}/5], Loss: {m['loss']:.4f}" for m in logged]
    assert "l1" in logged[0] and logged[0]["l1"] == logged[0]["loss"]
    assert lines[5].startswith("Learned parameters: weight = ")
    assert lines[6] == "Run files: runs/l1"


def test_run_a_job_file_with_overrides(capsys, tmp_path):
    (tmp_path / "job.toml").write_text(
        'epochs = 4\nrun_name = "job"\n[data]\nname = "classification"\nn_samples = 80\nval_fraction = 0.25\n'
        '[model]\nname = "mlp"\nhidden = [8]\n[loss]\nname = "cross_entropy"\n[log]\nevery = 2\n'
    )
    code, out, _ = run_cli(capsys, "run", "job.toml", "--set", "epochs=6", "--set", "optimizer.name=sgd")
    assert code == 0
    lines = out.splitlines()
    assert [line.split(",")[0] for line in lines[:3]] == ["Epoch [2/6]", "Epoch [4/6]", "Epoch [6/6]"]
    assert all(", Val Loss: " in line and ", Val Acc: " in line for line in lines[:3])
    assert lines[3] == "Model: 204 parameters"  # 20*8 + 8 + 8*4 + 4
    config = tomllib.loads(Path("runs/job/config.toml").read_text())
    assert config["epochs"] == 6 and config["optimizer"]["name"] == "sgd" and config["model"]["hidden"] == [8]


# --- config --------------------------------------------------------------------------------------


def test_config_prints_every_default_and_round_trips(capsys):
    code, out, _ = run_cli(capsys, "config")
    assert code == 0
    assert out.startswith("# This job imports no code beyond the installed plugins.\n")
    printed = tomllib.loads(out)
    defaults, _ = engine.load_config()
    # A dry run: the data was read, so what it infers is filled in, as the run's config.toml has it.
    inferred = {"n_features": 1, "n_outputs": 1, "task": "regression", "input_shape": (1,)}
    defaults = defaults.replace("inferred", inferred)
    unset_keys = {key for key, value in defaults.items() if value is None}  # max_steps: printed as a comment
    assert set(printed) == set(defaults) - unset_keys and "\n# max_steps = (not set)\n" in out
    for section, value in defaults.items():
        if isinstance(value, engine.Section):
            unset = {key for key, default in value.items() if default is None}  # printed as comments
            assert set(printed[section]) == set(value) - unset, section
            assert all(f"\n# {key} = (not set)\n" in out for key in unset)
    again, _ = engine.load_config(printed)
    assert again.to_dict() == defaults.to_dict()


def test_config_of_a_job_file_with_overrides_and_a_plugin(capsys, tmp_path, write_plugin):
    write_plugin(
        "tiny_focal",
        "import engine\n\ndef focal(gamma: float = 2.0):\n"
        "    return lambda output, target: (output - target).abs().mean()\n\n"
        "@engine.hookimpl\ndef register_components():\n    return {'loss': {'focal': focal}}\n",
    )
    (tmp_path / "job.toml").write_text('epochs = 7\n[loss]\nname = "focal"\n')
    code, out, _ = run_cli(capsys, "config", "job.toml", "--plugin", "tiny_focal", "--set", "loss.gamma=3")
    assert code == 0
    assert out.startswith("# This job imports and calls code; trust it as you would a script")
    assert "\n#   --plugin tiny_focal\n" in out
    printed = tomllib.loads(out)
    assert printed["epochs"] == 7
    assert printed["loss"] == {"name": "focal", "gamma": 3.0}
    assert '[loss]\nname = "focal"\ngamma = 3.0\n' in out


# --- plugins -------------------------------------------------------------------------------------


def test_plugins_lists_origin_hooks_components_and_call_order(capsys, write_plugin):
    write_plugin(
        "listed_plugin",
        "import engine\n\n@engine.hookimpl(tryfirst=True)\ndef on_epoch_end():\n    pass\n\n"
        "@engine.hookimpl\ndef register_components():\n    return {'loss': {'focal': lambda: None}}\n",
    )
    code, out, _ = run_cli(capsys, "plugins", "--plugin", "listed_plugin", "--block", "progress")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "plugins (name, origin, hooks, components):"
    entry = lines.index("  losses  [built-in]")
    assert lines[entry + 1] == "      hooks: register_components"  # its default declared there too
    assert lines[entry + 2] == (
        "      provides: loss mse, loss cross_entropy, loss l1, loss smooth_l1, loss huber, "
        "loss bce_with_logits, loss nll, loss model"
    )
    mine = lines.index("  listed_plugin  [--plugin listed_plugin]")
    assert lines[mine + 1 : mine + 3] == [
        "      hooks: on_epoch_end, register_components",
        "      provides: loss focal",
    ]
    assert "  progress  [built-in]" not in lines
    assert "essential (cannot be blocked): batching" in lines
    order = lines[lines.index("hook call order:") + 1 :]
    assert "  on_epoch_end: listed_plugin (tryfirst) -> metrics -> early_stopping -> checkpoint (trylast)" in order
    assert any(line.startswith("  on_run_end: checkpoint (tryfirst) -> ") for line in order)
    assert "  final_model: ema -> early_stopping" in order
    assert "  find_checkpoint: checkpoint" in order
    chain = lines[
        lines.index(next(line for line in lines if line.startswith("setup chain"))) + 1 : lines.index(
            "hook call order:"
        )
    ]
    assert [line.split(":")[0].strip() for line in chain] == list(engine.hookspecs.SETUP_CHAIN)
    assert "  loss: component mse (from listed_plugin, losses)" in chain
    assert "  build_loaders: tokens -> batching (trylast)" in chain  # the first result wins


def test_the_plugins_command_shows_the_setup_chain_in_order(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(out) if line.startswith("setup chain"))
    chain = [line.split(":")[0].strip() for line in out[start + 1 : start + 1 + len(engine.hookspecs.SETUP_CHAIN)]]
    assert chain == list(engine.hookspecs.SETUP_CHAIN)


# --- commands plugins add ----------------------------------------------------------------------------

GREETING = """
import engine


def greet(args):
    if args.name == "nobody":
        raise engine.ConfigError("greet: nobody to greet")
    print(f"hello {args.name}, {len(args.overrides)} overrides")
    return 3


@engine.hookimpl
def register_commands(commands):
    commands.add("greet", greet, "say hello", job=True).add_argument("--name", default="world")
"""


def test_a_plugin_adds_a_command_that_main_runs(capsys, tmp_path):
    (tmp_path / "greeting.py").write_text(GREETING)
    code, out, err = run_cli(capsys, "greet", "--name", "you", "--set", "epochs=2", "--plugin", "greeting.py")
    assert (code, out, err) == (3, "hello you, 1 overrides\n", "")
    code, out, err = run_cli(capsys, "greet", "--name", "nobody", "--plugin", "greeting.py")
    assert (code, out, err) == (2, "", "error: greet: nobody to greet\n")  # its errors are one line too
    with pytest.raises(SystemExit) as raised:
        main(["greet"])  # without the plugin, no such command
    assert raised.value.code == 2 and "invalid choice: 'greet'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("commands.add('run', lambda args: 0, 'again')", "command 'run' exists already"),
        ("commands.parser('train')", "no command is named 'train' (choose one of: config, plugins, run)"),
        ("commands.wrap('train', None)", "no command is named 'train' (choose one of: config, plugins, run)"),
    ],
)
def test_a_plugin_failing_to_add_a_command_is_one_line_exit_2(capsys, tmp_path, body, message):
    (tmp_path / "adding.py").write_text(
        f"import engine\n\n@engine.hookimpl\ndef register_commands(commands):\n    {body}\n"
    )
    code, out, err = run_cli(capsys, "run", "--plugin", "adding.py")
    assert (code, out) == (2, "")
    assert err == f"error: plugin 'adding' failed in hook register_commands: {message}\n"
    assert not Path("runs").exists()


def test_run_nproc_comes_from_the_distributed_plugin(capsys):
    def options(blocked: list[str]) -> set[str]:
        _, commands = parser(engine.make_plugins(blocked=blocked))
        return {option for action in commands.parser("run")._actions for option in action.option_strings}

    assert "--nproc" in options([]) and "--nproc" not in options(["distributed"])
    with pytest.raises(SystemExit) as raised:
        main(["run", "--nproc", "2", "--block", "distributed"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: python -m engine: unrecognized arguments: --nproc (--help shows the usage)\n"


def test_commands_add_parse_the_common_options_and_wrap_runs_through_a_wrapper():
    top = argparse.ArgumentParser(prog="engine")
    commands = Commands(top.add_subparsers(dest="command", required=True))
    commands.add("hi", lambda args: 7, "say hi", job=True).add_argument("--loud", action="store_true")
    commands.add("bye", lambda args: 0, "say bye")
    args = top.parse_args(["hi", "job.toml", "--set", "a=1", "--plugin", "p.py", "--block", "console", "--loud"])
    assert (args.job, args.overrides, args.plugin, args.block, args.loud) == (
        "job.toml",
        ["a=1"],
        ["p.py"],
        ["console"],
        True,
    )
    assert (args.no_imports, args.debug) == (False, False)
    with pytest.raises(SystemExit):
        top.parse_args(["bye", "job.toml"])  # a command without job takes no job file
    seen = []
    commands.wrap("hi", lambda args, handler: seen.append(args.command) or handler(args) + 1)
    commands.wrap("hi", lambda args, handler: handler(args) * 10)  # wrappers nest: the last outermost
    assert commands.handlers["hi"](args) == 80 and seen == ["hi"]
    assert commands.parser("bye") is commands.parsers["bye"]
    with pytest.raises(engine.ConfigError, match=r"^command 'bye' exists already$"):
        commands.add("bye", lambda args: 0, "again")


# --- bad input -----------------------------------------------------------------------------------


def assert_one_line_error(err: str, message: str) -> None:
    assert err.startswith(f"error: {message}"), err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "missing.toml"], "job file 'missing.toml' does not exist"),
        (["run", "bad.toml"], "job file 'bad.toml' is not valid TOML"),
        (["run", "--set", "loss.name=msee"], "loss.name: unknown loss 'msee' (did you mean 'mse'?)"),
        (["run", "--set", "optimizer.name=sgdd"], "optimizer.name: unknown optimizer 'sgdd' (did you mean 'sgd'?)"),
        (["run", "--set", "model.name=lineer"], "model.name: unknown model 'lineer' (did you mean 'linear'?)"),
        (["run", "--set", "data.name=nzp"], "data.name: unknown data 'nzp' (did you mean 'npz'?)"),
        (["run", "--plugin", "no_such_plugin_xyz"], "plugin module 'no_such_plugin_xyz' cannot be imported"),
        (["run", "--plugin", "nowhere/p.py"], "plugin file 'nowhere/p.py' does not exist"),
        (["run", "--set", "optimizer.momentum=0.9"], "optimizer.momentum: unknown key in [optimizer]"),
        (["run", "--set", "epochs=ten"], "epochs: expected int, got 'ten'"),
        (["config", "--set", "data.batch_size=1.5"], "data.batch_size: expected int, got 1.5"),
        (["plugins", "--plugin", "no_such_plugin_xyz"], "plugin module 'no_such_plugin_xyz' cannot be imported"),
        (["run", "--set", "data.batch_size=-1"], "data.batch_size: must be >= 0, got -1"),
        (["run", "--set", "model.name=tests.helpers:nope"], "model.name: module 'tests.helpers' has no attribute"),
    ],
)
def test_config_errors_exit_2_with_one_line(capsys, tmp_path, argv, message):
    (tmp_path / "bad.toml").write_text("[data\n")
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, message)
    assert out == "" if argv[0] != "config" else out.startswith("# This job imports")  # listed before anything
    assert not Path("runs").exists()  # rejected before training started


def test_two_plugins_registering_one_component_name(capsys, write_plugin):
    source = (
        "import engine\n\n@engine.hookimpl\ndef register_components():\n    return {'loss': {'focal': lambda: None}}\n"
    )
    write_plugin("focal_one", source)
    write_plugin("focal_two", source)
    code, _, err = run_cli(capsys, "run", "--plugin", "focal_one", "--plugin", "focal_two")
    assert code == 2
    assert_one_line_error(err, "loss 'focal' is provided by both plugin")
    assert "'focal_one'" in err and "'focal_two'" in err


def test_debug_shows_the_traceback(capsys):
    code, _, err = run_cli(capsys, "run", "--debug", "--set", "loss.name=msee")
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1] == "error: loss.name: unknown loss 'msee' (did you mean 'mse'?)"


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["train"])
    assert raised.value.code == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:
        main([])
    assert raised.value.code == 2


@pytest.mark.slow
def test_a_config_error_exits_2_from_the_real_command(tmp_path):
    done = engine_command("run", "--set", "epochs=0", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == "error: epochs: must be >= 1, got 0\n"
    assert done.stdout == ""


def training_failure(capsys, *argv: str) -> tuple[str, Path]:
    code, out, err = run_cli(capsys, "run", "--set", "run_name=failed", *argv)
    assert code == 1, err
    assert out.splitlines()[-1] == "Run files: runs/failed"  # what was written before the failure stays
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err.removeprefix("error: ").strip(), Path("runs/failed")


def test_a_diverging_run_stops_at_the_non_finite_loss_and_keeps_its_files(capsys):
    message, run_dir = training_failure(
        capsys,
        "--set",
        "optimizer.name=sgd",
        "--set",
        "optimizer.lr=10",
        "--set",
        "epochs=5",
        "--set",
        "log.every=1",
        "--set",
        "data.batch_size=10",
    )
    assert message == "non-finite loss (inf) in term 'mse' at epoch 2, step 16; training stopped"
    logged = read_jsonl(run_dir / "metrics.jsonl")
    assert [line["epoch"] for line in logged] == [1]
    assert logged[0]["step"] == 10 and logged[0]["loss"] > 0
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "failed" and summary["error"] == message
    assert summary["epochs_completed"] == 1


def sample_failure(capsys, *argv: str) -> str:
    """A model or loss that does not fit the data: found by the setup chain's check, exit 2."""
    code, out, err = run_cli(capsys, "run", "--set", "run_name=unfit", *argv)
    assert code == 2 and out == ""
    assert_one_line_error(err, "on a sample of the training data: ")
    assert not Path("runs").exists()
    return err.removeprefix("error: on a sample of the training data: ").strip()


def test_mse_on_n_by_1_against_n_does_not_broadcast(capsys):
    message = sample_failure(capsys, "--set", "model.name=tests.helpers:flat_model", "--set", "epochs=2")
    assert message.startswith("loss 'mse': model output shape (100,) does not match target shape (100, 1)")
    assert "lost its trailing dimension of 1" in message


def test_a_datasets_scalar_targets_are_one_column_as_in_memory_data(capsys):
    code, _, err = run_cli(capsys, "run", "--set", "epochs=2", "--set", "data.name=tests.helpers:scalar_target_dataset")
    assert code == 0, err


def test_class_indices_out_of_range_for_cross_entropy(capsys):
    message = sample_failure(
        capsys,
        "--set",
        "data.name=classification",
        "--set",
        "loss.name=cross_entropy",
        "--set",
        "model.out_features=2",
    )
    assert (
        message == "loss 'cross_entropy': the targets hold class indices up to 3, but the model outputs only 2 classes"
    )


def test_an_exception_in_a_plugins_hook_names_plugin_and_hook(capsys, write_plugin):
    write_plugin(
        "exploding",
        "import engine\n\n@engine.hookimpl\ndef after_step(state):\n"
        "    if state.step == 3:\n        raise RuntimeError('boom')\n",
    )
    message, run_dir = training_failure(capsys, "--plugin", "exploding", "--set", "data.batch_size=10")
    assert message == "epoch 1, step 3: plugin 'exploding' failed in hook after_step: RuntimeError: boom"
    assert read_json(run_dir / "summary.json")["error"] == message


def test_an_interrupted_run_exits_130_and_keeps_its_files(capsys, write_plugin):
    write_plugin(
        "interrupting",
        "import engine\n\n@engine.hookimpl\ndef after_step(state):\n"
        "    if state.step == 3:\n        raise KeyboardInterrupt\n",
    )
    code, _, err = run_cli(
        capsys, "run", "--plugin", "interrupting", "--set", "run_name=stopped", "--set", "log.every=1"
    )
    assert code == 130 and err == "interrupted\n"
    assert [line["epoch"] for line in read_jsonl(Path("runs/stopped/metrics.jsonl"))] == [1, 2]
    summary = read_json(Path("runs/stopped/summary.json"))
    assert summary["status"] == "failed" and summary["error"] == "KeyboardInterrupt" and summary["steps"] == 3


# --- resume ----------------------------------------------------------------------------------------


def test_resume_errors_are_one_line_exit_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--resume", "runs/nothing")
    assert code == 2
    assert_one_line_error(err, "--resume: 'runs/nothing' is not a run directory (it has no config.toml)")
    engine.run({"epochs": 2, "run_name": "bare", "checkpoint": {"every_seconds": 0.0}})
    for path in (tmp_path / "runs" / "bare" / "checkpoints").iterdir():
        path.unlink()  # as if it were killed before its first checkpoint
    code, _, err = run_cli(capsys, "run", "--resume", "runs/bare")
    assert code == 2
    assert_one_line_error(
        err,
        "--resume: run 'runs/bare' has no checkpoint to continue from (its summary: completed); start it again under "
        "another run_name, or remove the directory",
    )
    code, _, err = run_cli(capsys, "run", "--resume", "auto")
    assert code == 2
    assert_one_line_error(err, "resume = 'auto': name the run to continue with run_name")
    code, _, err = run_cli(capsys, "run", "--resume", "")
    assert code == 2  # not a new run of the default job
    assert_one_line_error(err, "--resume: expected a run directory or 'auto', got an empty string")
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == ["bare"]


def test_a_usage_error_is_one_line_and_a_deeply_nested_value_a_config_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as raised:
        main(["run", "--epochs", "3"])
    assert raised.value.code == 2
    assert capsys.readouterr().err == (
        "error: python -m engine: unrecognized arguments: --epochs (--help shows the usage)\n"
    )
    deep = "[" * 3000 + "]" * 3000  # tomllib reads nested arrays recursively
    (tmp_path / "deep.toml").write_text(f"epochs = {deep}\n")
    code, _, err = run_cli(capsys, "config", "deep.toml")
    assert code == 2
    assert_one_line_error(err, "job file 'deep.toml' nests arrays or tables too deeply to read")
    code, _, err = run_cli(capsys, "run", "--set", f"model.hidden={deep}")
    assert code == 2
    assert_one_line_error(err, "--set model.hidden: the value nests arrays or tables too deeply to read")


@pytest.mark.slow  # a real command: seconds to start
def test_a_folder_named_engine_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    """A clone of this repository named engine/, where python -m puts the working directory first:
    with an editable install, it became the package (as a namespace package), and its plugins/
    folder engine.plugins."""
    clone = tmp_path / "engine"
    for folder in ("engine", "plugins", "tests"):
        (clone / folder).mkdir(parents=True)
        (clone / folder / "__init__.py").write_text("raise ImportError('the clone was imported')\n")
    done = engine_command("run", "--set", "epochs=2", "--quiet", cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert (tmp_path / "runs").is_dir()


def test_resume_continues_with_more_epochs_in_the_same_directory(capsys, tmp_path):
    engine.run({"epochs": 20, "run_name": "grow", "log": {"every": 10}})
    capsys.readouterr()
    code, out, _ = run_cli(capsys, "run", "--resume", "runs/grow", "--set", "epochs=30")
    assert code == 0
    assert out.splitlines()[0].startswith("Epoch [30/30], Loss: ")  # epochs 21 to 30 only
    logged = read_jsonl(tmp_path / "runs" / "grow" / "metrics.jsonl")
    assert [line["epoch"] for line in logged] == [10, 20, 30]
    assert tomllib.loads((tmp_path / "runs" / "grow" / "config.toml").read_text())["epochs"] == 30
