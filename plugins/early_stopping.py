"""``[early_stopping]``: end the run when a validation metric stops improving.

After each validation, at an epoch's end or at a point counted in steps (``val_every_steps``),
``monitor`` (``val_loss`` by default; a logged metric such as ``loss`` when the run does not
validate there) is compared with the best so far: an improvement by more than ``min_delta`` in the
direction of ``mode`` resets the count; ``patience`` validations without one end the run there.
With ``restore_best`` the run ends with the best epoch's (or step's) model
(`final_model`): ``model.pt``, the test and `engine.load` get it, while the checkpoints keep the
trained weights that go with the optimizer's state, so a resumed run continues the same training.
The best epoch's model is what `trainer.final_model()` gave then, the model validation
evaluated: with weight averaging, the best average. ``patience = 0`` (the default) switches it off.
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
        self.best_at = ""  # where the best was measured: "epoch 3", "step 500"
        self.waited = 0  # validations since the best
        self.model: torch.nn.Module | None = None  # the best point's final model, with restore_best

    @engine.hookimpl
    def register_settings(self):
        return {"early_stopping": Settings}

    @engine.hookimpl
    def skip_per_step(self, trainer: engine.TrainerView) -> bool:
        settings = trainer.config["early_stopping"]
        if settings["patience"] and settings["restore_best"] and trainer.distributed.sharded:
            # Checked here, in the setup chain: the best epoch's model is a copy of the whole model.
            raise engine.ConfigError(
                "early_stopping.restore_best: the best epoch's model is a copy of the whole model, which a sharded "
                "one (distributed.strategy 'fsdp') cannot make: set it to false (the run then ends with the last "
                "epoch's model; checkpoint.keep_best keeps the best checkpoints)"
            )
        return settings["patience"] == 0

    @engine.hookimpl
    def on_epoch_end(self, epoch: int, state: engine.State, trainer: engine.TrainerView) -> None:
        self.judge(f"epoch {epoch}", state, trainer)

    @engine.hookimpl
    def on_interval_end(self, step: int, state: engine.State, trainer: engine.TrainerView) -> None:
        self.judge(f"step {step}", state, trainer)

    def judge(self, where: str, state: engine.State, trainer: engine.TrainerView) -> None:
        """Compare the monitored metric measured here (at `where`: an epoch's end, a point counted
        in steps) with the best; stop the run after `patience` validations without improvement."""
        settings = trainer.config["early_stopping"]
        value = state.monitored(settings["monitor"], "early_stopping.monitor")
        if value is None:
            return
        delta = settings["min_delta"]
        if self.best is None or (value < self.best - delta if settings["mode"] == "min" else value > self.best + delta):
            self.best, self.best_at, self.waited = value, where, 0
            if settings["restore_best"]:
                self.model = copy.deepcopy(trainer.final_model())
            return
        self.waited += 1
        if self.waited >= settings["patience"]:
            state.stop = True  # every process judges the same reduced metrics: all stop here
            if trainer.rank == 0:
                print(
                    f"early stopping at {where}: {settings['monitor']} has not improved for "
                    f"{self.waited} validations (best {self.best:.4f} at {self.best_at})",
                    flush=True,
                )

    @engine.hookimpl
    def final_model(self, ending: bool, trainer: engine.TrainerView) -> torch.nn.Module | None:
        if not ending or self.model is None:
            return None
        if trainer.rank == 0:
            monitored = f"{trainer.config['early_stopping']['monitor']} {self.best:.4f}"
            print(f"early stopping: the run ends with the model of {self.best_at} ({monitored})")
        return self.model

    @engine.hookimpl
    def save_plugin_state(self, trainer: engine.TrainerView) -> dict[str, Any] | None:
        if trainer.config["early_stopping"]["patience"] == 0:
            return None
        weights = self.model.state_dict() if self.model is not None else None
        return {"early_stopping": {"best": self.best, "at": self.best_at, "waited": self.waited, "model": weights}}

    @engine.hookimpl
    def load_plugin_state(self, state: dict[str, Any], trainer: engine.TrainerView) -> None:
        saved = state.get("early_stopping")
        if saved is None:
            return
        self.best, self.waited = saved["best"], saved["waited"]
        self.best_at = saved["at"] if "at" in saved else f"epoch {saved['epoch']}"  # a checkpoint of before steps
        if saved["model"] is not None:
            self.model = copy.deepcopy(trainer.final_model())  # its structure; the weights are the saved ones
            self.model.load_state_dict(saved["model"])
