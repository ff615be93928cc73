"""``[early_stopping]``: end the run when a validation metric stops improving.

After each validation, ``monitor`` (``val_loss`` by default; a logged metric such as ``loss`` when
the run does not validate every epoch) is compared with the best so far: an improvement by more
than ``min_delta`` in the direction of ``mode`` resets the count; ``patience`` validations without
one end the run after that epoch. With ``restore_best`` the run ends with the best epoch's model
(`final_model`): ``model.pt``, the test and `engine.load` get it, while the checkpoints keep the
trained weights that go with the optimizer's state, so a resumed run continues the same training.
The best epoch's model is what `trainer.final_model()` gave then: with weight averaging, the best
average. ``patience = 0`` (the default) switches it off.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch

import engine


@dataclass(frozen=True)
class Settings:
    patience: Annotated[int, engine.Range(ge=0), engine.Changeable()] = (
        0  # validations without improvement; 0: off (may change on resume)
    )
    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    min_delta: Annotated[float, engine.Range(ge=0)] = 0.0
    restore_best: bool = True


class EarlyStopping:
    def __init__(self) -> None:
        self.best: float | None = None
        self.best_epoch = 0
        self.waited = 0  # validations since the best
        self.model: torch.nn.Module | None = None  # the best epoch's final model, with restore_best

    @engine.hookimpl
    def register_settings(self):
        return {"early_stopping": Settings}

    @engine.hookimpl
    def skip_per_step(self, trainer: engine.TrainerView) -> bool:
        return trainer.config["early_stopping"]["patience"] == 0

    @engine.hookimpl
    def on_epoch_end(self, epoch: int, state: engine.State, trainer: engine.TrainerView) -> None:
        settings = trainer.config["early_stopping"]
        value = state.monitored(epoch, settings["monitor"], "early_stopping.monitor")
        if value is None:
            return
        delta = settings["min_delta"]
        if self.best is None or (value < self.best - delta if settings["mode"] == "min" else value > self.best + delta):
            self.best, self.best_epoch, self.waited = value, epoch, 0
            if settings["restore_best"]:
                self.model = None  # so that the chain gives this epoch's model, not the best so far
                self.model = copy.deepcopy(trainer.final_model())
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
    def final_model(self, trainer: engine.TrainerView) -> torch.nn.Module | None:
        if self.model is not None and trainer.rank == 0:
            monitored = f"{trainer.config['early_stopping']['monitor']} {self.best:.4f}"
            print(f"early stopping: the run ends with the model of epoch {self.best_epoch} ({monitored})")
        return self.model

    @engine.hookimpl
    def save_plugin_state(self, trainer: engine.TrainerView) -> dict[str, Any] | None:
        if trainer.config["early_stopping"]["patience"] == 0:
            return None
        weights = self.model.state_dict() if self.model is not None else None
        return {
            "early_stopping": {"best": self.best, "epoch": self.best_epoch, "waited": self.waited, "model": weights}
        }

    @engine.hookimpl
    def load_plugin_state(self, state: dict[str, Any], trainer: engine.TrainerView) -> None:
        saved = state.get("early_stopping")
        if saved is None:
            return
        self.best, self.best_epoch, self.waited = saved["best"], saved["epoch"], saved["waited"]
        if saved["model"] is not None:
            self.model = None
            self.model = copy.deepcopy(trainer.final_model())  # its structure; the weights are the saved ones
            self.model.load_state_dict(saved["model"])
