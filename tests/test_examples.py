"""bench/examples: the scikit-learn job files run as written (on stand-in data of the same shapes
and kinds: the real sets come from scikit-learn, which CI does not install), and the task each one
gets is the one its comment says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import engine
from tests.conftest import REPO

EXAMPLES = REPO / "bench" / "examples"
# name: (one sample's shape, labels or None for values, expected task)
SHAPES = {
    "digits": ((64,), 10, "classification"),
    "digits_cnn": ((1, 8, 8), 10, "classification"),
    "breast_cancer": ((30,), 2, "binary"),
    "wine": ((13,), 3, "classification"),
    "diabetes": ((10,), None, "regression"),
}


def stand_in(path: Path, shape: tuple[int, ...], classes: int | None) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, *shape)).astype(np.float32) * 100
    y = rng.integers(0, classes, size=120) if classes else rng.integers(25, 347, size=120).astype(np.float64)
    np.savez(path, x=x, y=y)


@pytest.mark.parametrize("name", list(SHAPES))
def test_each_example_job_runs_with_its_task(name, tmp_path):
    shape, classes, task = SHAPES[name]
    stand_in(tmp_path / "data.npz", shape, classes)
    result = engine.run(
        EXAMPLES / f"{name}.toml", overrides=["epochs=2", f"data.path={tmp_path / 'data.npz'}", f"run_name={name}"]
    )
    assert result.config["inferred"]["task"] == task
    assert result.config["inferred"]["input_shape"] == shape
    assert result.config["data"]["standardize"] in (True, "channels")
    assert (result.run_dir / "model.pt").is_file()


# --- the character-level GPT of nanoGPT's baby-GPT settings -------------------------------------------

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n" * 40
# nanoGPT's model.py as the job imports it (`from model import GPT, GPTConfig`), stood in for by its
# calling convention: nanoGPT is not a dependency of this project.
NANOGPT_STAND_IN = """
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size)
        print("number of parameters: ...")

    def forward(self, idx, targets=None):
        logits = self.head(self.embed(idx))
        if targets is None:
            return logits[:, [-1], :], None
        return logits, nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
"""


def test_the_character_gpt_job_has_nanogpts_baby_gpt_settings(tmp_path):
    (tmp_path / "input.txt").write_text(TEXT)
    config, _ = engine.load_config(EXAMPLES / "shakespeare_char.toml", [f"data.path={tmp_path / 'input.txt'}"])
    assert (config["max_steps"], config["data"]["block_size"], config["data"]["batch_size"]) == (2000, 64, 12)
    model = config["model"]
    assert (model["n_layer"], model["n_head"], model["n_embd"], model["dropout"]) == (4, 4, 128, 0.0)
    optimizer = config["optimizer"]
    assert (optimizer["name"], optimizer["lr"], optimizer["betas"], optimizer["weight_decay"]) == (
        "adamw",
        1e-3,
        (0.9, 0.99),
        0.1,
    )
    assert optimizer["decay"] == "matrices" and config["grad_clip"]["max_norm"] == 1.0
    assert (config["scheduler"]["warmup_steps"], config["scheduler"]["min_ratio"]) == (100, 0.1)
    result = engine.run(config, overrides=["max_steps=4", "val_every_steps=2", "run_name=shakespeare"])
    assert result.metrics["step"] == 4 and "val_perplexity" in result.metrics


def test_the_nanogpt_model_job_trains_its_gpt_through_a_factory(tmp_path, monkeypatch):
    (tmp_path / "input.txt").write_text(TEXT)
    (tmp_path / "model.py").write_text(NANOGPT_STAND_IN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    overrides = [f"data.path={tmp_path / 'input.txt'}", "max_steps=4", "val_every_steps=2", "run_name=nanogpt"]
    result = engine.run(EXAMPLES / "shakespeare_char_nanogpt_model.toml", overrides=overrides)
    assert type(result.model).__name__ == "GPT" and result.metrics["step"] == 4
    assert result.metrics["val_loss"] > 0 and "val_perplexity" in result.metrics
