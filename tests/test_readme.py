"""README.md: its examples run verbatim — the custom-loss plugin and its command, the default job's
output, the job file and the Python snippet."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import engine
from engine.cli import main
from tests.conftest import REPO
from tests.helpers import read_json, read_jsonl

README = REPO / "README.md"


def readme() -> str:
    if not README.is_file():
        pytest.fail("README.md is missing")
    return README.read_text(encoding="utf-8")


def example(marker: str, language: str) -> str:
    """The fenced block right after ``<!-- example: marker -->``."""
    found = re.search(rf"<!-- example: {re.escape(marker)} -->\s*```{language}\n(.*?)```", readme(), re.S)
    assert found, f"README.md has no ```{language} block after <!-- example: {marker} -->"
    return found.group(1)


def block_after(heading_text: str, language: str) -> str:
    """The first fenced block of `language` after `heading_text`."""
    text = readme()
    start = text.index(heading_text)
    for fence in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M):  # opening and closing fences paired
        if fence.start() > start and fence.group(1) == language:
            return fence.group(2)
    raise AssertionError(f"no ```{language} block after {heading_text!r}")


def test_the_custom_loss_example_runs_verbatim(tmp_path):
    (tmp_path / "my_losses.py").write_text(example("my_losses.py", "python"))
    command = example("run-my-loss", "bash").strip()
    assert command.startswith("python -m engine run") and "loss.name=focal" in command
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""

    lines = done.stdout.splitlines()
    loss_lines = [line for line in lines if line.startswith("Epoch [")]
    assert loss_lines and all(re.fullmatch(r"Epoch \[\d+/\d+\], Loss: \d+\.\d{4}.*", line) for line in loss_lines)
    assert lines[-1].startswith("Run files: runs/")
    run_dir = tmp_path / lines[-1].removeprefix("Run files: ")

    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert config["loss"]["name"] == "focal" and "gamma" in config["loss"]
    assert config["plugins"] == ["my_losses"] and config["data"]["name"] == "classification"  # reruns as is
    logged = read_jsonl(run_dir / "metrics.jsonl")
    assert len(logged) == len(loss_lines)
    assert all("focal" in line and line["focal"] == line["loss"] for line in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]  # it trained
    assert read_json(run_dir / "summary.json")["status"] == "completed"


def test_the_example_loss_is_focal_loss(tmp_path, write_plugin):
    import torch

    write_plugin("readme_losses", example("my_losses.py", "python"))
    plugins = engine.make_plugins(["readme_losses"])
    component = plugins.component("loss", "focal")
    assert component.plugin == "readme_losses"
    output, target = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    loss = component.factory(gamma=2.0)(output, target)
    p = torch.softmax(output, dim=1)[:, 0]
    torch.testing.assert_close(loss, (-((1 - p) ** 2) * p.log()).mean())
    torch.testing.assert_close(
        component.factory(gamma=0.0)(output, target), torch.nn.functional.cross_entropy(output, target)
    )


def test_the_default_jobs_output_in_the_readme_is_real(capsys):
    shown = block_after("## Run the default job", "").strip().splitlines()
    assert main(["run", "--set", "run_name=readme"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert shown[:-1] == printed[:-1]
    assert shown[-1].startswith("Run files: runs/") and printed[-1] == "Run files: runs/readme"


def test_the_job_file_example_is_a_valid_job(tmp_path, capsys):
    (tmp_path / "classify.toml").write_text(block_after("## A job file", "toml"))
    config, _ = engine.load_config(tmp_path / "classify.toml")
    assert config["model"]["name"] == "mlp" and config["loss"]["name"] == "cross_entropy"
    assert main(["run", "classify.toml", "--set", "epochs=1", "--set", "data.n_samples=200"]) == 0
    assert capsys.readouterr().out.startswith("Epoch [1/1], Loss: ")


def test_the_python_snippet_runs(capsys):
    snippet = block_after("## From Python", "python")
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.metrics["epoch"] == 200 and isinstance(namespace["model"], __import__("torch").nn.Module)


def test_the_contributing_guide_examples_make_a_working_plugin(tmp_path, monkeypatch):
    """CONTRIBUTING's settings dataclass and its EMA plugin (`wrap_model`), run as one module."""
    guide = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```$", guide, re.S | re.M)
    settings = next(block for block in blocks if "class EmaSettings" in block)
    plugin = next(block for block in blocks if "def wrap_model" in block)
    (tmp_path / "ema_plugin.py").write_text(settings + "\n" + plugin)
    monkeypatch.syspath_prepend(str(tmp_path))
    import ema_plugin

    trainer = engine.setup(
        {"epochs": 20, "run_name": "ema", "ema": {"decay": 0.5}, "data": {"val_fraction": 0.2}},
        plugins=[ema_plugin.Ema],
    )
    result = trainer.fit()
    wrapped = trainer.model
    assert isinstance(wrapped, ema_plugin.EmaModel) and wrapped.module is trainer.module is result.model
    averaged = dict(wrapped.average.named_parameters())
    for name, weight in trainer.module.named_parameters():
        assert not torch.equal(averaged[name], weight) and torch.allclose(averaged[name], weight, atol=0.2)
    with pytest.raises(engine.ConfigError, match=r"ema.decay: must be < 1, got 1.5"):
        engine.setup({"ema": {"decay": 1.5}}, plugins=[ema_plugin.Ema])
    sys.modules.pop("ema_plugin", None)


def test_the_after_training_commands_are_valid_commands():
    """Every command of "After training" parses as written (the commands run in tests/engine/test_inference.py)."""
    import shlex

    from engine.cli import parser

    lines = [line.split("#")[0].strip() for line in block_after("## After training", "bash").splitlines()]
    commands = [shlex.split(line)[3:] for line in lines if line.startswith("python -m engine ")]
    assert [command[0] for command in commands] == ["run", "evaluate", "predict", "export", "export"]
    for command in commands:
        parser().parse_args(command)  # exits 2 on an unknown option
