"""tokens: a language model's training, in tokens per second: nanoGPT's baby GPT (the built-in ``gpt``:
4 layers, 4 heads, 128 wide) on windows of 64 tokens at random positions of a token file, 12 a batch.

Contenders, the same model, initial weights, data and optimizer (AdamW, fused where the device has
it, weight decay on the matrices; gradients clipped at 1.0):

- hand-written: nanoGPT's ``get_batch`` (windows gathered from an ``np.memmap`` of the file at
  positions drawn by ``torch.randint``) and its loop (the baseline);
- engine: ``data.name = "tokens"``, the same windows (a generator per batch), through the engine's
  loop with one logging point per round.

A round is 20 optimizer steps (768 tokens each); the latency table gives tokens per second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Group, Job, finish
from engine_plugins.gpt import gpt

import engine

STEPS, BATCH, BLOCK, VOCABULARY = 20, 12, 64, 65
INFO = engine.DataInfo(BLOCK, VOCABULARY, "sequence", 0)
CONFIG = {
    "seed": 42,
    "max_steps": 10**9,
    "data": {"name": "tokens", "block_size": BLOCK, "batch_size": BATCH},
    "model": {"name": "gpt", "n_layer": 4, "n_head": 4, "n_embd": 128},
    "loss": {"name": "cross_entropy"},
    "optimizer": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.1, "decay": "matrices"},
    "grad_clip": {"max_norm": 1.0},
    "log": {"train_metrics": False},
}


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "train.bin"
    np.random.RandomState(0).randint(VOCABULARY, size=1_000_000).astype(np.uint16).tofile(path)
    return path


@pytest.fixture
def job() -> Job:
    """This group's job: the token file's GPT (the jobs of bench/conftest.py are the tutorial's and the MLP's)."""
    return Job("gpt", CONFIG, lambda: None, lambda: None, lambda: None, BATCH, 1, rounds=10, warmup_rounds=2)


def tokens_group(bench_group: Any) -> Group:
    return bench_group("tokens")


def hand_written(path: Path, device: str) -> Any:
    torch.manual_seed(42)
    model = gpt(INFO).to(device)
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = {"fused": True} if device == "cpu" or device.startswith("cuda") else {}
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), **fused)
    data = np.memmap(path, dtype=np.uint16, mode="r")

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:  # nanoGPT's
        ix = torch.randint(len(data) - BLOCK, (BATCH,))
        x = torch.stack([torch.from_numpy(data[i : i + BLOCK].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + BLOCK].astype(np.int64)) for i in ix])
        return x.to(device), y.to(device)

    def run_round() -> None:
        for _ in range(STEPS):
            x, y = get_batch()
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCABULARY), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss.item()  # the round's one sync, as the engine's logging point

    return run_round


def engine_round(path: Path, device: str, runs_dir: Path) -> tuple[engine.Trainer, Any]:
    overrides = [f"device={device}", f"data.path={path}", f"runs_dir={runs_dir}", f"log.every_steps={STEPS}"]
    trainer = engine.setup(CONFIG, overrides=overrides, blocked=["progress", "console"])
    trainer.start()

    def run_round() -> None:  # the loop runs on, STEPS more steps: a round ends at a logging point
        trainer.last_step = trainer.state.step + STEPS
        trainer.plan()
        trainer.loop()

    return trainer, run_round


def test_hand_written(token_file: Path, device: str, bench_group: Any) -> None:
    tokens_group(bench_group).measure(
        hand_written(token_file, device), "hand-written (nanoGPT's get_batch)", baseline=True,
        steps_per_round=STEPS, samples_per_step=BATCH * BLOCK,
    )  # fmt: skip


def test_engine(token_file: Path, device: str, bench_group: Any, tmp_path: Path) -> None:
    trainer, run_round = engine_round(token_file, device, tmp_path / "runs")
    try:
        tokens_group(bench_group).measure(
            run_round, "engine (data.name = tokens)", reference="hand-written (nanoGPT's get_batch)",
            steps_per_round=STEPS, samples_per_step=BATCH * BLOCK,
        )  # fmt: skip
    finally:
        finish(trainer)
    assert trainer.optimizer.defaults["weight_decay"] == 0.1 and len(trainer.optimizer.param_groups) == 2
