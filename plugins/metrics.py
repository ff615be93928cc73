"""Validation metrics over the whole validation set, with torchmetrics: precision, recall, F1 and
AUROC (``average`` over the classes) and the confusion matrix for classification; MAE, RMSE and R²
for regression; for a sequence task (a language model) the perplexity (the exponential of the
mean cross-entropy per position, padding left out) and no per-class metric unless ``sequence``
asks for them (over every position). Logged as ``val_<name>``.

The metrics accumulate on the device across the validation batches (`compute_metrics`) and are
computed once at the end (`after_validation`): no sync per batch, and none at all per training
step. Under torch.distributed, torchmetrics reduces their states across ranks when computing.
The confusion matrix of the last validation is written to ``confusion_matrix.json`` in the run
directory at the end of its epoch. torchmetrics is imported at the first validation: it takes 1.4 s, which a run without
validation data never pays.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch

import engine

Classification = Literal["precision", "recall", "f1", "auroc"]
IGNORED = -100  # the target torchmetrics leaves out: a sequence's padding (any negative target) becomes it
Regression = Literal["mae", "rmse", "r2"]


@dataclass(frozen=True)
class Settings:
    # Which whole-set figures are computed: a resumed run may log others (not `average`, which
    # changes what a figure means).
    classification: Annotated[tuple[Classification, ...], engine.Changeable()] = ("precision", "recall", "f1", "auroc")
    regression: Annotated[tuple[Regression, ...], engine.Changeable()] = ("mae", "rmse", "r2")
    # A sequence task's per-class metrics over every position (a vocabulary's F1 means little):
    # none unless asked; the perplexity always.
    sequence: Annotated[tuple[Classification, ...], engine.Changeable()] = ()
    average: Literal["macro", "micro", "weighted"] = "macro"
    confusion_matrix: Annotated[bool, engine.Changeable()] = True


class Metrics:
    def __init__(self) -> None:
        self.built = False  # at the first validation
        self.collection: Any = None  # a torchmetrics MetricCollection
        self.confusion: Any = None
        self.matrix: torch.Tensor | None = None  # the last validation's confusion matrix, on the device
        self.perplexity: Any = None  # a sequence task's

    @engine.hookimpl
    def register_settings(self):
        return {"metrics": Settings}

    @engine.hookimpl
    def skip_per_step(self, trainer: engine.TrainerView) -> bool:
        return trainer.loaders.val() is None and trainer.loaders.test() is None

    @engine.hookimpl
    def compute_metrics(self, batch: engine.Batch, output: torch.Tensor, trainer: engine.TrainerView) -> None:
        if trainer.model.training:
            return  # whole-set metrics are for validation; training logs the per-batch ones
        if not self.built:
            self.build(trainer)
        output, target = output.float(), batch.y
        if trainer.info.task == "sequence":  # every position a sample; negative targets (padding) ignored
            target = torch.where(target < 0, IGNORED, target)
            if self.perplexity is not None:
                self.perplexity.update(output, target)
            output, target = output.reshape(-1, output.shape[-1]).softmax(dim=1), target.reshape(-1)
        elif trainer.info.task == "classification":
            output = output.softmax(dim=1)
        elif trainer.info.task == "binary":  # torchmetrics' binary metrics take [N] probabilities and labels
            output, target = output.sigmoid().reshape(-1), target.reshape(-1).long()
        if self.collection is not None:
            self.collection.update(output, target)
        if self.confusion is not None:
            self.confusion.update(output, target)

    @engine.hookimpl
    def after_validation(self, trainer: engine.TrainerView) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        if self.perplexity is not None:
            found["perplexity"] = self.perplexity.compute()
            self.perplexity.reset()
        if self.collection is not None:
            with warnings.catch_warnings():
                # A class absent from the set (a small validation set; the setup's check of a few
                # samples) scores 0 by torchmetrics' convention, and it warns at every validation.
                warnings.filterwarnings("ignore", "No positive samples in targets", UserWarning)
                found = dict(self.collection.compute())
            self.collection.reset()
        if self.confusion is not None:
            self.matrix = self.confusion.compute()  # read back by rank 0 alone, when it writes the file
            self.confusion.reset()
        return found

    @engine.hookimpl
    def on_epoch_end(self, epoch: int, state: engine.State, trainer: engine.TrainerView) -> None:
        self.write_matrix(state, trainer)

    @engine.hookimpl
    def on_interval_end(self, state: engine.State, trainer: engine.TrainerView) -> None:
        self.write_matrix(state, trainer)

    def write_matrix(self, state: engine.State, trainer: engine.TrainerView) -> None:
        """confusion_matrix.json, after a validation at this step (rank 0 writes it)."""
        if self.matrix is not None and state.val_step == state.step and trainer.rank == 0:
            record = {"epoch": state.epoch - (state.batch == 0), "step": state.step}
            record.update(rows="target", columns="prediction", matrix=self.matrix.tolist())
            engine.runs.write_text(trainer.run_dir / "confusion_matrix.json", json.dumps(record) + "\n")

    def build(self, trainer: engine.TrainerView) -> None:
        import torchmetrics
        import torchmetrics.text

        settings, info = trainer.config["metrics"], trainer.info
        self.built = True
        made, confusion = MADE[info.task](settings, info)
        if info.task == "sequence":
            self.perplexity = torchmetrics.text.Perplexity(ignore_index=IGNORED).to(trainer.device)
        if confusion is not None and settings["confusion_matrix"]:
            self.confusion = confusion.to(trainer.device)
        if made:
            self.collection = torchmetrics.MetricCollection(made).to(trainer.device)


def multiclass(names: tuple[str, ...], average: str, info: engine.DataInfo) -> dict[str, Any]:
    """The whole-set metrics `names` of class indices, averaged over the classes by `average`."""
    from torchmetrics import classification

    common = {"num_classes": info.n_outputs, "ignore_index": IGNORED}
    averaged = {**common, "average": average}
    # AUROC is defined per class against the rest, never "micro" in torchmetrics.
    auroc_average = "macro" if average == "micro" else average
    made = {
        "precision": lambda: classification.MulticlassPrecision(**averaged),
        "recall": lambda: classification.MulticlassRecall(**averaged),
        "f1": lambda: classification.MulticlassF1Score(**averaged),
        "auroc": lambda: classification.MulticlassAUROC(**common, average=auroc_average),
    }
    return {name: made[name]() for name in names}


def classification_metrics(settings: Any, info: engine.DataInfo) -> tuple[dict[str, Any], Any]:
    """The chosen whole-set metrics of class indices, and their confusion matrix."""
    from torchmetrics import classification

    chosen = multiclass(settings["classification"], settings["average"], info)
    return chosen, classification.MulticlassConfusionMatrix(num_classes=info.n_outputs, ignore_index=IGNORED)


def sequence_metrics(settings: Any, info: engine.DataInfo) -> tuple[dict[str, Any], None]:
    """The per-class metrics a sequence task asks for (``sequence``), over every position; no
    confusion matrix (a vocabulary's would be vocabulary x vocabulary)."""
    return multiclass(settings["sequence"], settings["average"], info), None


def binary_metrics(settings: Any, info: engine.DataInfo) -> tuple[dict[str, Any], Any]:
    """The chosen whole-set metrics of 0/1 labels (a probability above data.threshold predicts 1),
    and their 2x2 confusion matrix."""
    from torchmetrics import classification

    threshold = {"threshold": info.threshold}
    made = {
        "precision": lambda: classification.BinaryPrecision(**threshold),
        "recall": lambda: classification.BinaryRecall(**threshold),
        "f1": lambda: classification.BinaryF1Score(**threshold),
        "auroc": classification.BinaryAUROC,  # over every threshold
    }
    chosen = {name: made[name]() for name in settings["classification"]}
    return chosen, classification.BinaryConfusionMatrix(**threshold)


def regression_metrics(settings: Any, info: engine.DataInfo) -> tuple[dict[str, Any], None]:
    """The chosen whole-set metrics of values."""
    from torchmetrics import regression

    if "r2" in settings["regression"]:
        for split, count in (("validation", info.n_val), ("test", info.n_test)):
            if count == 1:  # (evaluate's file is the validation data)
                raise engine.ConfigError(
                    f"metrics.regression: r2 needs at least 2 samples, but the {split} data has 1: "
                    "more samples, or metrics.regression without r2"
                )

    class R2Score(regression.R2Score):
        """NaN below 2 samples, where torchmetrics raises: only the setup's check of a batch of 1
        sees it (a split of 1 is refused above). The count is every process's."""

        def compute(self) -> torch.Tensor:
            if self.total < 2:
                return torch.tensor(float("nan"), device=self.total.device)
            return super().compute()

    made = {
        "mae": regression.MeanAbsoluteError,
        "rmse": lambda: regression.MeanSquaredError(squared=False),
        "r2": lambda: R2Score(multioutput="uniform_average"),
    }
    return {name: made[name]() for name in settings["regression"]}, None


# The whole-set metrics of each task, by the function that builds them.
MADE = {
    "classification": classification_metrics,
    "binary": binary_metrics,
    "regression": regression_metrics,
    "sequence": sequence_metrics,
}
