"""``[ema] decay``: an exponential moving average of the weights, which validation evaluates and
the run ends with (0, the default: off; 0.999 is usual).

After each optimizer step every averaged parameter moves toward the trained one by
``1 - decay`` (buffers, such as batch-norm statistics, are copied). The step trains the model as
always; validation calls the average (`wrap_model`: the wrapper runs the trained module in
training mode and the average in eval mode); the run ends with the average (`final_model`), so
``model.pt``, the test, `engine.load` and `export` have it. The average is checkpointed with the
run and restored on resume, so a resumed run reaches the uninterrupted one's average exactly.
With early stopping's ``restore_best`` the run ends with the best epoch's average.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import torch

import engine


@dataclass(frozen=True)
class Settings:
    decay: Annotated[float, engine.Range(ge=0, lt=1)] = 0.0  # 0: off


class Averaged(torch.nn.Module):
    """The module the step and validation call: the trained one in training, the average in eval."""

    def __init__(self, trained: torch.nn.Module, average: torch.nn.Module) -> None:
        super().__init__()
        self.trained, self.average = trained, average

    def forward(self, x: Any) -> Any:
        return self.trained(x) if self.training else self.average(x)


class WeightAveraging:
    def __init__(self) -> None:
        self.average: torch.nn.Module | None = None
        self.decay = 0.0

    @engine.hookimpl
    def register_settings(self):
        return {"ema": Settings}

    @engine.hookimpl
    def skip_per_step(self, trainer: engine.TrainerView) -> bool:
        return self.average is None

    @engine.hookimpl
    def wrap_model(self, model: torch.nn.Module, trainer: engine.TrainerView) -> torch.nn.Module | None:
        self.decay = trainer.config["ema"]["decay"]
        if not self.decay:
            return None
        if trainer.distributed.sharded:
            raise engine.ConfigError(
                "ema.decay: the average is a copy of the whole model, which a sharded one (distributed.strategy "
                "'fsdp') cannot make: set ema.decay = 0, or use strategy 'ddp'"
            )
        self.average = copy.deepcopy(trainer.module).requires_grad_(False)
        self.pairs = (
            list(self.average.parameters()),
            list(trainer.module.parameters()),
            list(self.average.buffers()),
            list(trainer.module.buffers()),
        )
        return Averaged(model, self.average)

    @engine.hookimpl
    def after_step(self, window: engine.Window) -> None:
        if window.last:  # the optimizer stepped
            averaged, trained, average_buffers, buffers = self.pairs
            with torch.no_grad():
                torch._foreach_lerp_(averaged, trained, 1 - self.decay)
                for average, buffer in zip(average_buffers, buffers):
                    average.copy_(buffer)

    @engine.hookimpl
    def final_model(self, module: torch.nn.Module, trainer: engine.TrainerView) -> torch.nn.Module | None:
        # The average of the trained weights, unless another plugin chose another model.
        return self.average if self.average is not None and module is trainer.module else None

    @engine.hookimpl
    def save_plugin_state(self) -> dict[str, Any] | None:
        return {"ema": self.average.state_dict()} if self.average is not None else None

    @engine.hookimpl
    def load_plugin_state(self, state: Mapping[str, Any], trainer: engine.TrainerView) -> None:
        if self.average is not None:  # a run that averages from its resume on starts from the restored weights
            self.average.load_state_dict(state["ema"] if "ema" in state else trainer.module.state_dict())
