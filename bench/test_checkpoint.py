"""checkpoint: what a checkpoint costs.

- The MLP job's epoch (256 steps) without checkpoints, and with one at the end of every epoch
  (`[checkpoint] every_epochs = 1`: the model, Adam's state, the RNGs, written atomically with
  fsync): the ratio is the cost per epoch. Issue 9's target: at most 1.03.
- Saving and loading one checkpoint of a 10M-parameter model with Adam's state (about 120 MB):
  `Trainer.checkpoint()` plus the atomic write, and the read (weights_only) plus the restore.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Contenders, Group

import engine
from engine.chain import restore

QUIET = ["checkpoint.every_seconds=0", "checkpoint.keep_best=0"]
# About 10M parameters: 1024 -> 2048 -> 2048 -> 2048 -> 10.
BIG = {
    "data": {"name": "classification", "n_samples": 64, "n_features": 1024, "n_classes": 10, "batch_size": 64},
    "model": {"name": "mlp", "hidden": [2048, 2048, 2048]},
    "loss": {"name": "cross_entropy"},
    "epochs": 1,
}


@pytest.mark.parametrize("job", ["mlp"], indirect=True)
def test_epoch_without_checkpoints(contenders: Contenders, checkpoint_group: Group) -> None:
    trainer, run_round = contenders.engine(overrides=QUIET)
    checkpoint_group.measure(run_round, "epoch, no checkpoint", baseline=True)
    assert not list((trainer.run_dir / "checkpoints").glob("step-*.pt"))


@pytest.mark.parametrize("job", ["mlp"], indirect=True)
def test_epoch_with_a_checkpoint(contenders: Contenders, checkpoint_group: Group) -> None:
    trainer, run_round = contenders.engine(overrides=[*QUIET, "checkpoint.every_epochs=1"])
    checkpoint_group.measure(run_round, "epoch + checkpoint", reference="epoch, no checkpoint")
    trainer.plugins.pm.get_plugin("checkpoint").wait()  # the last one is written in the background
    assert list((trainer.run_dir / "checkpoints").glob("step-*.pt"))


@pytest.mark.parametrize("job", ["mlp"], indirect=True)
@pytest.mark.parametrize("device", ["cpu"], indirect=True)
def test_save_10m(checkpoint_group: Group, tmp_path: Path) -> None:
    trainer = engine.setup(BIG, overrides=["runs_dir=" + str(tmp_path)])
    trainer.fit()  # one epoch: Adam's state exists
    path = tmp_path / "big.pt"

    def save() -> None:
        engine.runs.save(trainer.checkpoint(), path)

    checkpoint_group.measure(save, "save, 10M parameters + Adam", steps_per_round=1, rounds=5)
    assert sum(p.numel() for p in trainer.module.parameters()) > 9_900_000


@pytest.mark.parametrize("job", ["mlp"], indirect=True)
@pytest.mark.parametrize("device", ["cpu"], indirect=True)
def test_load_10m(checkpoint_group: Group, tmp_path: Path) -> None:
    trainer = engine.setup(BIG, overrides=["runs_dir=" + str(tmp_path)])
    trainer.fit()
    path = tmp_path / "big.pt"
    engine.runs.save(trainer.checkpoint(), path)

    def load() -> None:
        restore(trainer, engine.runs.load(path, engine.runs.CHECKPOINT_FORMAT), path)

    checkpoint_group.measure(load, "load, 10M parameters + Adam", steps_per_round=1, rounds=5)
