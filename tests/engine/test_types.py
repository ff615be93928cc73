"""engine/types.py: the accumulation windows, the loop state (its checkpoint form and the metrics it
monitors), the single process, the input transform in front of the model, and precision."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import engine
from engine.types import WithInputTransform

W = engine.Window


@pytest.mark.parametrize(
    ("shares", "accumulation", "expected"),
    [
        ([1.0] * 3, 1, [W(True, True, 1.0)] * 3),
        ([1.0] * 4, 2, [W(True, False, 0.5), W(False, True, 0.5)] * 2),
        # Windows never span two epochs: the last one of an epoch may be shorter, its scale larger.
        ([1.0] * 5, 2, [W(True, False, 0.5), W(False, True, 0.5)] * 2 + [W(True, True, 1.0)]),
        (
            [1.0] * 5,
            3,
            [
                W(True, False, 1 / 3),
                W(False, False, 1 / 3),
                W(False, True, 1 / 3),
                W(True, False, 0.5),
                W(False, True, 0.5),
            ],
        ),
        ([1.0] * 2, 8, [W(True, False, 0.5), W(False, True, 0.5)]),
        # With several processes, each batch's scale is this process's share of it.
        ([1.0, 1.0, 0.5], 2, [W(True, False, 0.5), W(False, True, 0.5), W(True, True, 0.5)]),
        ([], 2, []),
    ],
)
def test_windows_are_the_one_rule_of_gradient_accumulation(shares, accumulation, expected):
    assert engine.windows(shares, accumulation) == tuple(expected)


def test_a_window_is_hashable_so_compiled_steps_can_key_on_it():
    assert len({W(True, False, 0.5), W(True, False, 0.5), W(True, True, 0.5)}) == 2


def test_the_state_round_trips_its_position_losses_and_every_rng_stream():
    losses = [(2, 7, torch.tensor(0.5), {"mse": torch.tensor(0.5)})]
    state = engine.State(epoch=3, batch=2, step=12, metrics={"loss": 1.0}, val_step=10, seconds=4.5, losses=losses)
    saved = state.state_dict()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    restored = engine.State()
    restored.load_state_dict(saved)
    assert (restored.epoch, restored.batch, restored.step, restored.val_step) == (3, 2, 12, 10)
    assert (restored.metrics, restored.seconds) == ({"loss": 1.0}, 4.5)
    [(epoch, step, loss, terms)] = restored.losses
    assert (epoch, step, loss.item(), terms["mse"].item()) == (2, 7, 0.5, 0.5)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_the_state_saves_plain_values_and_tensors_only(tmp_path):
    """A checkpoint loads with torch.load(weights_only=True): no numpy array, no Python object."""
    torch.save(engine.State(losses=[(1, 1, torch.tensor(1.0), {})]).state_dict(), tmp_path / "state.pt")
    restored = engine.State()
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.losses[0][2].item() == 1.0


def test_monitored_reads_a_metric_measured_at_the_current_step():
    state = engine.State(step=20, metrics={"step": 30, "loss": 0.5}, val_metrics={"val_loss": 0.7}, val_step=20)
    assert state.monitored("val_loss", "k") == 0.7
    assert state.monitored("loss", "k") is None  # logged at step 30, not 20
    state.step = 30
    assert state.monitored("val_loss", "k") is None  # no validation at step 30
    assert state.monitored("loss", "k") == 0.5
    with pytest.raises(engine.TrainingError, match=r"^checkpoint\.monitor: 'val_acc' is not a metric of this run "):
        state.monitored("val_acc", "checkpoint.monitor")
    assert engine.State().monitored("val_acc", "k") is None  # nothing measured yet: no verdict


def test_a_checkpoint_of_before_steps_counted_validations_restores():
    saved = engine.State(step=4).state_dict()
    saved["val_epoch"] = saved.pop("val_step")
    restored = engine.State()
    restored.load_state_dict(saved)
    assert restored.step == 4 and restored.val_step == 0


def test_one_process_collectives_return_what_they_are_given():
    one = engine.OneProcess(torch.device("cpu"))
    tensor = torch.ones(2)
    assert (one.rank, one.world_size, one.device) == (0, 1, torch.device("cpu"))
    assert one.broadcast("x") == "x" and one.all_reduce(tensor) is tensor
    error = ValueError("x")
    assert one.failed(error) is error


def test_the_input_transform_runs_in_front_of_the_model_and_saves_with_it():
    class Shift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor([1.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x - self.mean

    model = nn.Linear(1, 1)
    both = WithInputTransform(Shift(), model)
    x = torch.tensor([[3.0]])
    torch.testing.assert_close(both(x), model(x - 1))
    assert list(both.state_dict()) == ["transform.mean", "model.weight", "model.bias"]


def test_full_precision_has_no_autocast_and_a_dtype_has_one():
    assert not torch.is_autocast_enabled("cpu")
    with engine.Precision("cpu").autocast():
        assert not torch.is_autocast_enabled("cpu")
    with engine.Precision("cpu", torch.bfloat16).autocast():
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
