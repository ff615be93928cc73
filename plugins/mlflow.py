"""``[mlflow] enabled = true``: the run in MLflow (the optional extra ``mlflow``): its config as
parameters, its metrics at their steps, and its config.toml, summary.json and model.pt as
artifacts; the MLflow run ends FINISHED, FAILED or KILLED (interrupted) with the engine's.

By default the store is local: ``mlruns/`` in the working directory holds the tracking database
(``mlruns/mlflow.db``) and the artifacts; ``tracking_uri`` points elsewhere (a server, another
database). MLflow's own log lines are kept to warnings while the run lasts.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import engine


@dataclass(frozen=True)
class Settings:
    enabled: Annotated[bool, engine.Changeable()] = False
    tracking_uri: Annotated[str, engine.Changeable()] = (
        ""  # default: sqlite:///mlruns/mlflow.db in the working directory
    )
    experiment: Annotated[str, engine.Changeable()] = "engine"

    def __post_init__(self) -> None:
        if self.enabled and importlib.util.find_spec("mlflow") is None:
            raise engine.ConfigError(
                "mlflow.enabled: the mlflow package is not installed (pip install 'torch-plugin-engine[mlflow]')"
            )


class MLflow:
    def __init__(self) -> None:
        self.client: Any = None  # the mlflow module, once the run started
        self.level = logging.NOTSET

    @engine.hookimpl
    def register_settings(self):
        return {"mlflow": Settings}

    @engine.hookimpl
    def on_run_start(self, trainer: engine.TrainerView) -> None:
        settings = trainer.config["mlflow"]
        if not settings["enabled"] or trainer.rank:  # of a run's processes, rank 0 logs
            return
        import mlflow

        quiet = logging.getLogger("mlflow")
        self.level = quiet.level
        quiet.setLevel(logging.WARNING)
        store = Path("mlruns").absolute()
        store.mkdir(exist_ok=True)
        mlflow.set_tracking_uri(settings["tracking_uri"] or f"sqlite:///{store / 'mlflow.db'}")
        mlflow.set_experiment(settings["experiment"])
        mlflow.start_run(run_name=trainer.run_dir.name)
        mlflow.log_params(flat(trainer.config))
        self.client = mlflow

    @engine.hookimpl
    def on_log(self, metrics: Mapping[str, float]) -> None:
        if self.client is not None:
            values = {name: value for name, value in metrics.items() if name not in ("epoch", "step")}
            self.client.log_metrics(values, step=int(metrics["step"]))

    @engine.hookimpl
    def on_run_end(self, trainer: engine.TrainerView, error: BaseException | None) -> None:
        if self.client is None:
            return
        try:
            for name in (engine.runs.CONFIG, engine.runs.MODEL):
                if (trainer.run_dir / name).is_file():
                    self.client.log_artifact(str(trainer.run_dir / name))
            status = "FINISHED" if error is None else "KILLED" if isinstance(error, engine.Interrupted) else "FAILED"
            self.client.end_run(status=status)
        finally:
            logging.getLogger("mlflow").setLevel(self.level)


def flat(config: Mapping[str, Any]) -> dict[str, str]:
    """``{"optimizer.lr": "0.01", ...}``: MLflow's parameters are flat strings."""
    found = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            found.update({f"{key}.{name}": str(item) for name, item in value.items()})
        else:
            found[key] = str(value)
    return found
