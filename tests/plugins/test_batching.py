"""plugins/batching/loaders.py: tensors sliced from a seeded permutation per epoch, Datasets through
DataLoader, the validation split, and resuming an epoch at any batch."""

from __future__ import annotations

import pytest
import torch
from engine_plugins.batching.loaders import DatasetLoaders, TensorLoaders
from torch.utils.data import DataLoader

import engine
from tests.helpers import epoch_order, job


def loaders(**data) -> engine.Loaders:
    return engine.setup(job(data=data)).loaders


def test_full_batch_by_default_in_the_data_order():
    trainer = engine.setup(job())
    batches = list(trainer.loaders.train(1))
    assert len(batches) == 1 and trainer.batches_per_epoch == 1
    assert batches[0].x.shape == (100, 1) and batches[0].y.shape == (100, 1)
    x, y = trainer.loaders.x, trainer.loaders.y
    assert torch.equal(batches[0].x, x) and torch.equal(batches[0].y, y)


def test_each_epoch_is_a_seeded_permutation_sliced_into_batches():
    tensors = loaders(batch_size=32)
    assert isinstance(tensors, TensorLoaders)
    for epoch in (1, 2):
        order = epoch_order(42, epoch, 100)
        batches = list(tensors.train(epoch))
        assert [len(b.x) for b in batches] == [32, 32, 32, 4]
        assert torch.equal(torch.cat([b.x for b in batches]), tensors.x[order])
        assert torch.equal(torch.cat([b.y for b in batches]), tensors.y[order])
    assert not torch.equal(epoch_order(42, 1, 100), epoch_order(42, 2, 100))


def test_no_shuffle_and_drop_last():
    tensors = loaders(batch_size=32, shuffle=False, drop_last=True)
    batches = list(tensors.train(1))
    assert [len(b.x) for b in batches] == [32, 32, 32] and tensors.train_batches() == 3
    assert torch.equal(torch.cat([b.x for b in batches]), tensors.x[:96])


def test_an_epoch_resumes_at_any_batch():
    tensors = loaders(batch_size=16)
    whole = list(tensors.train(3))
    resumed = list(tensors.train(3, start=4))
    assert len(resumed) == len(whole) - 4
    assert all(torch.equal(a.x, b.x) for a, b in zip(resumed, whole[4:]))


def test_val_fraction_splits_off_a_seeded_validation_set():
    tensors = loaders(val_fraction=0.2, batch_size=30)
    order = epoch_order(0, 0, 100)  # drawn with data.split_seed (0), not the run's seed
    x, _ = engine.setup(job(data={"shuffle": False})).loaders.x, None
    assert torch.equal(tensors.val_data[0], x[order[:20]])
    assert torch.equal(tensors.x, x[order[20:]])
    assert tensors.info.n_train == 80 and tensors.info.n_val == 20
    assert [len(b.x) for b in tensors.val()] == [20]
    assert loaders().val() is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"batch_size": -1}, "data.batch_size: must be >= 0, got -1"),
        ({"val_fraction": 1.0}, r"data.val_fraction: must be < 1, got 1.0"),
        ({"batch_size": 200, "drop_last": True}, "data.batch_size: 200 with drop_last leaves no batch of 100 samples"),
        ({"n_samples": 0}, "data.n_samples: must be >= 1, got 0"),
    ],
)
def test_bad_batching_settings(data, message):
    with pytest.raises(engine.ConfigError) as raised:
        loaders(**data)
    assert str(raised.value) == message


def test_a_user_dataset_goes_through_a_dataloader():
    trainer = engine.setup(
        job(
            data={"name": "tests.helpers:blobs_dataset", "n_samples": 90, "batch_size": 16, "val_fraction": 0.1},
            loss={"name": "cross_entropy"},
        )
    )
    data = trainer.loaders
    assert isinstance(data, DatasetLoaders) and isinstance(data.loader, DataLoader)
    assert data.info == engine.DataInfo(4, 3, "classification", 81, 9, input_shape=(4,))
    batches = list(data.train(1))
    assert [len(b.x) for b in batches] == [16] * 5 + [1]
    assert batches[0].y.dtype == torch.long
    again = list(data.train(1))
    assert all(torch.equal(a.x, b.x) for a, b in zip(batches, again))  # the order depends only on (seed, epoch)
    assert all(torch.equal(a.x, b.x) for a, b in zip(list(data.train(1, start=2)), batches[2:]))
    assert sum(len(b.y) for b in data.val()) == 9


def test_a_user_dataset_trains_and_validates():
    result = engine.run(
        job(
            epochs=5,
            data={"name": "tests.helpers:blobs_dataset", "batch_size": 16, "val_fraction": 0.25},
            model={"name": "mlp", "hidden": [8]},
            loss={"name": "cross_entropy"},
            optimizer={"lr": 0.05},
        )
    )
    assert result.state.step == 5 * 5  # 72 training samples in batches of 16
    assert result.metrics["val_accuracy"] > 0.8


def test_a_dataset_with_classes_reports_their_count(monkeypatch):
    import tests.helpers as helpers

    def named(seed: int):
        dataset = helpers.blobs_dataset(seed)
        dataset.classes = ["a", "b", "c", "d", "e"]
        return dataset

    monkeypatch.setattr(helpers, "named_blobs", named, raising=False)
    trainer = engine.setup(job(data={"name": "tests.helpers:named_blobs"}, loss={"name": "cross_entropy"}))
    assert trainer.info.n_outputs == 5 and trainer.model.out_features == 5


def test_integer_targets_of_several_values_per_sample_are_a_sequence_task_with_token_ids_kept():
    tokens = job(data={"name": "tests.helpers:next_tokens"}, model={"name": "tests.helpers:token_model"})
    trainer = engine.setup({**tokens, "loss": {"name": "cross_entropy"}})
    assert trainer.info == engine.DataInfo(6, 5, "sequence", 64, input_shape=(6,))
    batch = trainer.loaders.sample()
    assert batch.x.dtype == torch.long and batch.y.shape == batch.x.shape  # ids, not features
    with pytest.raises(engine.ConfigError, match=r"^loss.name: 'mse' compares outputs with values, but the targets"):
        engine.setup(tokens)  # the default loss


def test_a_dataset_of_sequences_needs_no_classes_attribute():
    trainer = engine.setup(
        job(
            data={"name": "tests.helpers:next_tokens_dataset", "batch_size": 16},
            model={"name": "tests.helpers:token_model"},
            loss={"name": "cross_entropy"},
        )
    )
    assert (trainer.info.task, trainer.info.n_outputs, trainer.info.n_features) == ("sequence", 5, 6)
    batch = next(iter(trainer.loaders.train(1)))
    assert (batch.x.dtype, batch.y.dtype, tuple(batch.y.shape)) == (torch.long, torch.long, (16, 6))
