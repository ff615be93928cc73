"""``[tensorboard] enabled = true``: the run's metrics, config and final model in TensorBoard event
files (``torch.utils.tensorboard``; the optional extra ``tensorboard``).

Every logged metric is a scalar at its step; the config is a text entry; at the end of a
completed or interrupted run the model's summary is a text entry and each weight tensor a
histogram. The files go to ``dir`` (default: ``tensorboard/`` in the run directory); view them
with ``tensorboard --logdir runs``. Writing happens at logging points only (in TensorBoard's own
background thread), never per step.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import engine


@dataclass(frozen=True)
class Settings:
    enabled: Annotated[bool, engine.Changeable()] = False
    dir: Annotated[engine.FilePath, engine.Changeable()] = ""  # default: <run directory>/tensorboard

    def __post_init__(self) -> None:
        if self.enabled and importlib.util.find_spec("tensorboard") is None:
            raise engine.ConfigError(
                "tensorboard.enabled: the tensorboard package is not installed "
                "(pip install 'torch-plugin-engine[tensorboard]')"
            )


class TensorBoard:
    def __init__(self) -> None:
        self.writer: Any = None

    @engine.hookimpl
    def register_settings(self):
        return {"tensorboard": Settings}

    @engine.hookimpl
    def on_run_start(self, trainer: engine.TrainerView) -> None:
        settings = trainer.config["tensorboard"]
        if not settings["enabled"] or trainer.rank:  # of a run's processes, rank 0 writes
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(settings["dir"] or str(trainer.run_dir / "tensorboard"))
        self.writer.add_text("config", "```toml\n" + engine.dump_toml(trainer.config) + "```", global_step=0)

    @engine.hookimpl
    def on_log(self, metrics: Mapping[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in metrics.items():
            if name not in ("epoch", "step"):
                self.writer.add_scalar(name, value, global_step=metrics["step"])

    @engine.hookimpl
    def on_run_end(self, trainer: engine.TrainerView, error: BaseException | None) -> None:
        if self.writer is None:
            return
        if error is None or isinstance(error, engine.Interrupted):
            step = trainer.state.step
            self.writer.add_text("model", "```\n" + str(trainer.module) + "\n```", global_step=step)
            # model.pt's weights: the model the run ended with, whole on rank 0 even when sharded.
            final = engine.runs.load(trainer.run_dir / engine.runs.MODEL, engine.runs.MODEL_FORMAT)
            for name, weight in final["model"].items():
                if weight.is_floating_point():
                    self.writer.add_histogram(f"weights/{name}", weight.detach().float().cpu(), global_step=step)
        self.writer.close()
