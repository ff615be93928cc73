"""logging: what the TensorBoard plugin costs the MLP job at one logging point per epoch (issue
11's target: at most 1.02), beside the same epoch logging to the run files only."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import Contenders, Group


@pytest.mark.parametrize("job", ["mlp"], indirect=True)
def test_epoch_run_files_only(contenders: Contenders, logging_group: Group) -> None:
    _, run_round = contenders.engine()
    logging_group.measure(run_round, "epoch, run files", baseline=True)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
@pytest.mark.parametrize("job", ["mlp"], indirect=True)
def test_epoch_tensorboard(contenders: Contenders, logging_group: Group) -> None:
    trainer, run_round = contenders.engine(overrides=["tensorboard.enabled=true"])
    logging_group.measure(run_round, "epoch + TensorBoard", reference="epoch, run files")
    assert list((trainer.run_dir / "tensorboard").iterdir())
