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


@pytest.mark.slow
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


def contributing_example(marker: str) -> str:
    """The python block after ``<!-- example: marker -->`` in CONTRIBUTING.md."""
    guide = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- example: {re.escape(marker)} -->\s*```python\n(.*?)```", guide, re.S)
    assert found, f"CONTRIBUTING.md has no python block after <!-- example: {marker} -->"
    return found.group(1)


class EpochWeights:
    """Records the trained weights at the end of each epoch."""

    def __init__(self) -> None:
        self.weights: dict[int, list[torch.Tensor]] = {}

    @engine.hookimpl
    def on_epoch_end(self, epoch, trainer):
        self.weights[epoch] = [p.detach().clone() for p in trainer.module.parameters()]


def test_the_contributing_guides_weight_averaging_ends_with_the_mean_of_the_epochs_weights(write_plugin):
    write_plugin("swa_plugin", contributing_example("swa_settings.py") + contributing_example("swa.py"))
    import swa_plugin

    recorder = EpochWeights()
    result = engine.run({"epochs": 8, "run_name": "swa", "swa": {"start_epoch": 5}}, plugins=[swa_plugin.Swa, recorder])
    for index, parameter in enumerate(result.model.parameters()):
        mean = torch.stack([recorder.weights[epoch][index] for epoch in range(5, 9)]).mean(dim=0)
        torch.testing.assert_close(parameter, mean)
    trained = recorder.weights[8]
    assert not all(torch.equal(a, b) for a, b in zip(result.model.parameters(), trained))
    saved = engine.runs.load(result.run_dir / "model.pt", engine.runs.MODEL_FORMAT)["model"]
    torch.testing.assert_close(saved["weight"], result.model.weight)  # model.pt holds the average
    with pytest.raises(engine.ConfigError, match=r"swa.start_epoch: must be >= 0, got -1"):
        engine.setup({"swa": {"start_epoch": -1}}, plugins=[swa_plugin.Swa])


def test_the_contributing_guides_csv_logger_gets_new_columns_and_a_resume_right(write_plugin):
    write_plugin("csv_plugin", contributing_example("csv_log.py"))
    import csv

    import csv_plugin

    job = {"epochs": 6, "val_every": 3, "log": {"every": 1}, "data": {"val_fraction": 0.2}}
    whole = engine.run({**job, "run_name": "whole"}, plugins=[csv_plugin.CsvLog])
    engine.run({**job, "epochs": 4, "run_name": "cut", "checkpoint": {"every_epochs": 2}}, plugins=[csv_plugin.CsvLog])
    (Path("runs/cut/checkpoints") / "step-000000004.pt").unlink()  # the run resumes from epoch 2
    resumed = engine.run(job, resume="runs/cut", plugins=[csv_plugin.CsvLog])

    def rows(run_dir: Path) -> list[dict[str, str]]:
        with open(run_dir / "metrics.csv", newline="") as file:
            return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(file)]

    expected = rows(whole.run_dir)
    assert len(expected) == 6 and expected[0]["val_loss"] == "" and expected[2]["val_loss"] != ""
    assert rows(resumed.run_dir) == expected


def test_the_after_training_commands_are_valid_commands():
    """Every command of "After training" parses as written (the commands run in tests/engine/test_inference.py)."""
    import shlex

    from engine.cli import parser

    top, _ = parser(engine.make_plugins())
    lines = [line.split("#")[0].strip() for line in block_after("## After training", "bash").splitlines()]
    commands = [shlex.split(line)[3:] for line in lines if line.startswith("python -m engine ")]
    assert [command[0] for command in commands] == ["run", "evaluate", "predict", "export", "export"]
    for command in commands:
        top.parse_args(command)  # exits 2 on an unknown option


def test_the_images_section_shows_the_example_job_and_valid_commands():
    import shlex

    from engine.cli import parser

    shown = tomllib.loads(example("digits_cnn.toml", "toml"))
    assert shown == tomllib.loads((REPO / "bench" / "examples" / "digits_cnn.toml").read_text())
    top, _ = parser(engine.make_plugins())
    lines = [line.split("#")[0].strip() for line in block_after("## Images", "bash").splitlines()]
    commands = [shlex.split(line)[3:] for line in lines if line.startswith("python -m engine ")]
    assert [command[0] for command in commands] == ["run", "evaluate", "predict", "export"]
    for command in commands:
        top.parse_args(command)  # exits 2 on an unknown option


def test_the_sweep_job_in_the_readme_is_the_digits_examples_and_valid():
    """The [sweep] of "Searching hyperparameters" is bench/examples/digits.toml's, which resolves
    (every value of its space is checked when the command runs: tests/plugins/test_sweep.py)."""
    shown = tomllib.loads(example("sweep-job", "toml"))
    digits = tomllib.loads((REPO / "bench" / "examples" / "digits.toml").read_text())
    assert shown["sweep"] == digits["sweep"]
    config, _ = engine.load_config(REPO / "bench" / "examples" / "digits.toml")
    assert config["sweep"]["space"] == digits["sweep"]["space"] and config["sweep"]["trials"] == 24


def test_the_contributing_guides_grouped_optimizer_decays_every_matrix_but_the_embeddings(write_plugin):
    write_plugin("grouped_optimizer", contributing_example("grouped_optimizer.py"))
    job = {
        "epochs": 1,
        "data": {"name": "tests.helpers:next_tokens"},
        "model": {"name": "tests.helpers:labels_keyword", "output": "logits"},  # embed, then a linear head
        "loss": {"name": "cross_entropy"},
        "optimizer": {"name": "no_decay_on_embeddings"},
    }
    trainer = engine.setup(job, plugins=["grouped_optimizer"])
    decayed, kept = trainer.optimizer.param_groups
    model = trainer.module
    assert [id(p) for p in decayed["params"]] == [id(model.head.weight)] and decayed["weight_decay"] == 0.1
    assert [id(p) for p in kept["params"]] == [id(model.embed.weight), id(model.head.bias)]
    assert kept["weight_decay"] == 0.0


def test_the_language_model_commands_are_valid_and_the_run_trains(tmp_path, monkeypatch):
    import shlex

    from engine.cli import parser

    top, _ = parser(engine.make_plugins())
    lines = [line.split("#")[0].strip() for line in block_after("## Language models", "bash").splitlines()]
    commands = [shlex.split(line)[3:] for line in lines if line.startswith("python -m engine ")]
    assert [command[0] for command in commands] == ["run", "sample", "evaluate", "export"]
    for command in commands:
        top.parse_args(command)
    monkeypatch.chdir(REPO)  # the job's path, as the README gives it
    text = tmp_path / "input.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 30)
    run = [*commands[0][1:], "--set", f"data.path={text}", "--set", "max_steps=3", "--set", f"runs_dir={tmp_path}"]
    assert main(["run", *run, "--quiet"]) == 0
    sample = [*commands[1][1:]]
    sample[0] = str(tmp_path / "shakespeare")
    assert main(["sample", *sample]) == 0
