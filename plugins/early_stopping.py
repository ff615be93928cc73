"""``[early_stopping]``: end the run when a validation metric stops improving.

After each validation, ``monitor`` (``val_loss`` by default; a logged metric such as ``loss`` when
the run does not validate every epoch) is compared with the best so far: an improvement by more
than ``min_delta`` in the direction of ``mode`` resets the count; ``patience`` validations without
one end the run after that epoch. With ``restore_best`` the model gets the best epoch's weights
back when the run ends (early or not), so ``model.pt`` and `engine.load` hold them; the
checkpoints keep the weights that go with the optimizer's state, so a resumed run continues the
same training. The judgement comes first in ``on_epoch_end`` and the restore last: in between,
the checkpoint plugin takes the end-of-run checkpoint (it sees ``state.stop``) of the trained
weights. ``patience = 0`` (the default) switches it off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch

import engine


@dataclass(frozen=True)
class Settings:
    patience: Annotated[int, engine.Range(ge=0)] = 0  # validations without improvement; 0: off
    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    min_delta: Annotated[float, engine.Range(ge=0)] = 0.0
    restore_best: bool = True


class EarlyStopping:
    def __init__(self) -> None:
        self.best: float | None = None
        self.best_epoch = 0
        self.waited = 0  # validations since the best
        self.weights: dict[str, torch.Tensor] | None = None  # the best epoch's, with restore_best

    @engine.hookimpl
    def register_settings(self):
        return {"early_stopping": Settings}

    @engine.hookimpl
    def skip_per_step(self, trainer: engine.Trainer) -> bool:
        return trainer.config["early_stopping"]["patience"] == 0

    @engine.hookimpl(specname="on_epoch_end", tryfirst=True)  # the stop known to the epoch's other plugins
    def judge_epoch(self, epoch: int, state: engine.State, trainer: engine.Trainer) -> None:
        settings = trainer.config["early_stopping"]
        value = state.monitored(epoch, settings["monitor"], "early_stopping.monitor")
        if value is not None:
            self.judge(value, epoch, state, trainer, settings)

    @engine.hookimpl(specname="on_epoch_end", trylast=True)  # after the checkpoint took the trained weights
    def restore_at_the_end(self, epoch: int, state: engine.State, trainer: engine.Trainer) -> None:
        settings = trainer.config["early_stopping"]
        if settings["restore_best"] and self.weights is not None and (state.stop or epoch == trainer.epochs):
            trainer.module.load_state_dict(self.weights)  # on every process: they hold the same weights
            if trainer.rank == 0:
                monitored = f"{settings['monitor']} {self.best:.4f}"
                print(f"early stopping: weights of epoch {self.best_epoch} restored ({monitored})")

    def judge(self, value: float, epoch: int, state: engine.State, trainer: engine.Trainer, settings: Any) -> None:
        delta = settings["min_delta"]
        better = self.best is None or (
            value < self.best - delta if settings["mode"] == "min" else value > self.best + delta
        )
        if better:
            self.best, self.best_epoch, self.waited = value, epoch, 0
            if settings["restore_best"]:
                self.weights = {name: tensor.detach().clone() for name, tensor in trainer.module.state_dict().items()}
            return
        self.waited += 1
        if self.waited >= settings["patience"]:
            state.stop = True  # every process judges the same reduced metrics: all stop at this epoch
            if trainer.rank == 0:
                print(
                    f"early stopping at epoch {epoch}: {settings['monitor']} has not improved for "
                    f"{self.waited} validations (best {self.best:.4f} at epoch {self.best_epoch})",
                    flush=True,
                )

    @engine.hookimpl
    def state_dict(self, trainer: engine.Trainer) -> dict[str, Any] | None:
        if trainer.config["early_stopping"]["patience"] == 0:
            return None
        return {"best": self.best, "best_epoch": self.best_epoch, "waited": self.waited, "weights": self.weights}

    @engine.hookimpl
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.waited = state["best"], state["best_epoch"], state["waited"]
        self.weights = state["weights"]
