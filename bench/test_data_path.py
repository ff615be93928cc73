"""data-path: one epoch of the MLP job, fed by a DataLoader or by in-memory tensor batching.

Every contender trains with the same fused Adam (the engine's default), so that only the way the
batches are made differs:

- DataLoader: ``DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)`` in the tutorial's
  loop (the baseline);
- tensor slicing, by hand: one permutation per epoch, then slices (`EpochBatches`);
- engine: its in-memory tensor batching (the default for arrays and tensors);
- engine, Dataset: the engine given a ``TensorDataset``, which it batches through a DataLoader.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import torch
from conftest import Contenders, Group
from engine_plugins import datasets
from torch.utils.data import DataLoader, TensorDataset

import engine

pytestmark = pytest.mark.parametrize("job", ["mlp"], indirect=True)


def hand_written(contenders: Contenders, batches: Iterable[Any]) -> Any:
    model, loss_fn = contenders.model(), contenders.job.loss()
    optimizer = contenders.optimizer(model, fused=True)
    device = torch.device(contenders.device)

    def epoch() -> None:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return epoch


def dataset(contenders: Contenders) -> TensorDataset:
    x, y = (torch.as_tensor(a) for a in contenders.job.data())
    return TensorDataset(x, y)


def tensor_dataset(seed: int, n_samples: int = 8192, n_features: int = 32, n_classes: int = 4) -> TensorDataset:
    """The MLP job's data as a ``TensorDataset``, the way a user's own Dataset comes in."""
    x, y = datasets.classification(seed=seed, n_samples=n_samples, n_features=n_features, n_classes=n_classes)
    return TensorDataset(torch.as_tensor(x), torch.as_tensor(y))


def test_dataloader(contenders: Contenders, data_path: Group) -> None:
    generator = torch.Generator().manual_seed(contenders.job.seed)
    loader = DataLoader(dataset(contenders), batch_size=32, shuffle=True, generator=generator)
    data_path.measure(hand_written(contenders, loader), "DataLoader, by hand", baseline=True)


def test_tensor_slicing(contenders: Contenders, data_path: Group) -> None:
    data_path.measure(hand_written(contenders, contenders.batches()), "tensor slicing, by hand")


def test_engine_tensor_batching(contenders: Contenders, data_path: Group) -> None:
    trainer, run_round = contenders.engine()
    assert type(trainer.loaders).__name__ == "TensorLoaders"
    data_path.measure(run_round, "engine, tensor batching", reference="tensor slicing, by hand")


def test_engine_dataset(contenders: Contenders, data_path: Group) -> None:
    class TensorDatasetData:
        @engine.hookimpl
        def register_components(self) -> dict[str, Any]:
            return {"data": {"bench_tensor_dataset": tensor_dataset}}

    trainer, run_round = contenders.engine(overrides=["data.name=bench_tensor_dataset"], plugins=[TensorDatasetData])
    assert type(trainer.loaders).__name__ == "DatasetLoaders"
    data_path.measure(run_round, "engine, Dataset through DataLoader", reference="DataLoader, by hand")
