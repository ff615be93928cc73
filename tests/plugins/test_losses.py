"""plugins/losses.py: each loss equals torch's, its parameters come from [loss], shapes are checked."""

from __future__ import annotations

import pytest
import torch
from engine_plugins import losses
from torch.nn import functional as F

import engine
from tests.helpers import job

CPU = torch.device("cpu")
CLASSES = engine.DataInfo(n_features=3, n_outputs=4, task="classification", n_train=8)
REGRESSION = engine.DataInfo(n_features=1, n_outputs=1, task="regression", n_train=8)
TWO_COLUMNS = engine.DataInfo(n_features=2, n_outputs=2, task="regression", n_train=8)


@pytest.fixture
def regression():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 2, generator=generator), torch.randn(8, 2, generator=generator)


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=generator), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_regression_losses_equal_torchs(regression, reduction):
    output, target = regression
    pairs = [
        (losses.mse(TWO_COLUMNS, reduction=reduction), F.mse_loss(output, target, reduction=reduction)),
        (losses.l1(TWO_COLUMNS, reduction=reduction), F.l1_loss(output, target, reduction=reduction)),
        (
            losses.smooth_l1(TWO_COLUMNS, reduction=reduction, beta=0.5),
            F.smooth_l1_loss(output, target, reduction=reduction, beta=0.5),
        ),
        (
            losses.huber(TWO_COLUMNS, reduction=reduction, delta=0.3),
            F.huber_loss(output, target, reduction=reduction, delta=0.3),
        ),
    ]
    for loss, expected in pairs:
        torch.testing.assert_close(loss(output, target), expected)


def test_bce_with_logits_with_pos_weight(regression):
    output, _ = regression
    target = (output > 0.3).float()
    loss = losses.bce_with_logits(TWO_COLUMNS, CPU, pos_weight=(2.0, 0.5))
    expected = F.binary_cross_entropy_with_logits(output, target, pos_weight=torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(loss(output, target), expected)
    torch.testing.assert_close(
        losses.bce_with_logits(TWO_COLUMNS, CPU)(output, target), F.binary_cross_entropy_with_logits(output, target)
    )


def test_cross_entropy_with_label_smoothing_and_class_weights(logits):
    output, target = logits
    loss = losses.cross_entropy(CLASSES, CPU, label_smoothing=0.1, weight=(1.0, 2.0, 0.5, 1.0))
    expected = F.cross_entropy(output, target, weight=torch.tensor([1.0, 2.0, 0.5, 1.0]), label_smoothing=0.1)
    torch.testing.assert_close(loss(output, target), expected)
    sums = losses.cross_entropy(CLASSES, CPU, reduction="sum")(output, target)
    torch.testing.assert_close(sums, F.cross_entropy(output, target, reduction="sum"))


def test_cross_entropy_ignores_the_ignore_index(logits):
    output, target = logits
    target = target.clone()
    target[0] = -100
    torch.testing.assert_close(
        losses.cross_entropy(CLASSES, CPU)(output, target), F.cross_entropy(output[1:], target[1:])
    )


def test_nll_with_class_weights(logits):
    output, target = logits
    log_p = torch.log_softmax(output, dim=1)
    loss = losses.nll(CLASSES, CPU, weight=(1, 2, 3, 4))
    torch.testing.assert_close(loss(log_p, target), F.nll_loss(log_p, target, weight=torch.tensor([1.0, 2, 3, 4])))


def test_parameters_come_from_the_loss_section():
    trainer = engine.setup(
        job(
            data={"name": "classification", "n_samples": 32, "n_features": 3},
            loss={"name": "cross_entropy", "label_smoothing": 0.2, "weight": [1, 1, 2, 2], "reduction": "sum"},
        )
    )
    batch = next(trainer.loaders.train(1))
    output = trainer.model(batch.x)
    expected = F.cross_entropy(
        output, batch.y, weight=torch.tensor([1.0, 1, 2, 2]), label_smoothing=0.2, reduction="sum"
    )
    torch.testing.assert_close(trainer.loss_fn(output, batch.y), expected)


@pytest.mark.parametrize("name", ["mse", "l1", "smooth_l1", "huber", "bce_with_logits"])
def test_same_shape_losses_refuse_to_broadcast(name):
    loss = losses.bce_with_logits(REGRESSION, CPU) if name == "bce_with_logits" else getattr(losses, name)(REGRESSION)
    with pytest.raises(engine.TrainingError) as raised:
        loss(torch.zeros(5, 1), torch.zeros(5))
    assert str(raised.value).startswith(
        f"loss {name!r}: model output shape (5, 1) does not match target shape (5,) (it would broadcast); "
    )
    assert "trailing dimension of 1" in str(raised.value)


def test_a_shape_hint_for_class_indices_given_to_mse():
    with pytest.raises(engine.TrainingError, match="the targets are class indices: use loss cross_entropy"):
        losses.mse(REGRESSION)(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("name", ["mse", "l1", "smooth_l1", "huber", "bce_with_logits"])
def test_losses_on_values_refuse_class_indices_at_setup(name):
    with pytest.raises(engine.ConfigError) as raised:
        engine.setup(job(data={"name": "classification", "n_samples": 40}, loss={"name": name}))
    assert str(raised.value).startswith(
        f"loss.name: {name!r} compares outputs with values, but the targets were read as class indices (4 classes)"
    )
    assert 'data.task = "regression"' in str(raised.value)


@pytest.mark.parametrize("name", ["cross_entropy", "nll"])
def test_losses_on_class_indices_refuse_values_at_setup(name, tmp_path):
    # Whole-number values in a csv, read as values (the diabetes case): the loss names data.task.
    (tmp_path / "values.csv").write_text("x,y\n" + "".join(f"{i},{i * 7 + 25}\n" for i in range(40)))
    data = {"name": "csv", "path": str(tmp_path / "values.csv"), "target": "y"}
    with pytest.raises(engine.ConfigError) as raised:
        engine.setup(job(data=data, loss={"name": name}))
    assert str(raised.value) == (
        f"loss.name: {name!r} takes class indices, but the targets were read as values "
        '(data.task = "regression"): use a loss on values (mse, l1, huber), or if they are classes, set '
        'data.task = "classification"'
    )


@pytest.mark.parametrize("name", ["cross_entropy", "nll"])
def test_class_losses_check_logits_and_index_range(name):
    loss = getattr(losses, name)(CLASSES, CPU)
    with pytest.raises(engine.TrainingError, match=rf"loss '{name}': expects logits \[N, C\] and class indices \[N\]"):
        loss(torch.zeros(5, 4), torch.zeros(5, 1, dtype=torch.long))
    with pytest.raises(engine.TrainingError) as raised:
        loss(torch.zeros(5, 2), torch.zeros(5, dtype=torch.long))
    assert str(raised.value) == (
        f"loss '{name}': the targets hold class indices up to 3, but the model outputs only 2 classes"
    )


def test_the_default_loss_is_mse_and_all_eight_are_registered():
    plugins = engine.make_plugins()
    assert sorted(plugins.components["loss"]) == sorted(
        ["mse", "cross_entropy", "l1", "smooth_l1", "huber", "bce_with_logits", "nll", "model"]
    )
    assert (plugins.default("loss"), plugins.defaults["loss"].plugin) == ("mse", "losses")


def test_a_class_weight_per_class_or_a_config_error():
    with pytest.raises(engine.ConfigError, match=r"loss.weight: 3 weights given, but the data has 4 classes"):
        losses.cross_entropy(CLASSES, CPU, weight=(1.0, 1.0, 2.0))
    with pytest.raises(
        engine.ConfigError, match=r"loss.pos_weight: 1 weights given, but the data has 2 target columns"
    ):
        losses.bce_with_logits(TWO_COLUMNS, CPU, pos_weight=(2.0,))


@pytest.mark.parametrize("name", ["l1", "smooth_l1", "huber"])
def test_regression_losses_train_the_default_job(name):
    result = engine.run(job(epochs=20, loss={"name": name}, optimizer={"lr": 0.1}))
    first = engine.run(job(epochs=1, run_name="first", loss={"name": name})).metrics["loss"]
    assert result.metrics[name] == result.metrics["loss"] < first


# --- a sequence task: [N, T, C] logits, [N, T] targets ----------------------------------------------

SEQUENCE = engine.DataInfo(n_features=5, n_outputs=4, task="sequence", n_train=8)


@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_sequence_losses_equal_torchs_on_the_flattened_logits(ignore_index):
    generator = torch.Generator().manual_seed(2)
    output = torch.randn(3, 5, 4, generator=generator)
    target = torch.randint(0, 4, (3, 5), generator=generator)
    target[0, :2] = ignore_index  # padding: counts for nothing
    flat_output, flat_target = output.reshape(-1, 4), target.reshape(-1)
    cross = losses.cross_entropy(SEQUENCE, CPU, weight=(1.0, 2.0, 1.0, 0.5), ignore_index=ignore_index)
    weights = torch.tensor([1.0, 2.0, 1.0, 0.5])
    expected = F.cross_entropy(flat_output, flat_target, weight=weights, ignore_index=ignore_index)
    torch.testing.assert_close(cross(output, target), expected)
    assert cross(output, target) != F.cross_entropy(flat_output, flat_target.clamp_min(0), weight=weights)
    nll = losses.nll(SEQUENCE, CPU, ignore_index=ignore_index)
    log_probabilities = output.log_softmax(-1)
    expected = F.nll_loss(log_probabilities.reshape(-1, 4), flat_target, ignore_index=ignore_index)
    torch.testing.assert_close(nll(log_probabilities, target), expected)


def test_sequence_losses_check_the_shapes_and_the_vocabulary():
    cross = losses.cross_entropy(SEQUENCE, CPU)
    with pytest.raises(engine.TrainingError, match=r"expects logits \[N, T, C\] and class indices \[N, T\]"):
        cross(torch.randn(3, 4, 5), torch.zeros(3, 5, dtype=torch.long))  # (N, C, T): torch's own layout
    with pytest.raises(engine.TrainingError, match="the model outputs only 3 classes"):
        cross(torch.randn(3, 5, 3), torch.zeros(3, 5, dtype=torch.long))
