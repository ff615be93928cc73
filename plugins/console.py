"""The tutorial's console line at each logging point; at the end, the test figures, the learned
parameters of a small model (or its size) and where the run's files are.

Of a run's processes, rank 0 alone prints (the metrics are every process's).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

import engine

# A model with at most this many weights gets them printed at the end (the tutorial's w and b).
PRINT_PARAMETERS_UP_TO = 16
# The metrics the line shows, beside the loss and its terms: the rest are in metrics.jsonl.
LABELS = {
    "train_accuracy": "Acc",
    "val_loss": "Val Loss",
    "val_accuracy": "Val Acc",
    "val_perplexity": "Val PPL",
    "val_f1": "Val F1",
    "val_r2": "Val R2",
}
NOT_TERMS = ("epoch", "step", "loss", "lr")


def loss_terms(metrics: Mapping[str, float]) -> list[str]:
    """The names of the loss terms among a logging point's metrics."""
    return [name for name in metrics if name not in NOT_TERMS and not name.startswith(("val_", "train_"))]


@engine.hookimpl
def on_log(metrics: Mapping[str, float], trainer: engine.TrainerView) -> None:
    if trainer.rank:
        return
    if trainer.max_steps is None:
        line = f"Epoch [{metrics['epoch']}/{trainer.epochs}]"
    else:  # counted in steps: the train steps (batches), as the progress bar and checkpoints count them
        line = f"Step [{metrics['step']}/{trainer.length.batches}]"
    if "loss" in metrics:
        line += f", Loss: {metrics['loss']:.4f}"
    terms = loss_terms(metrics)
    if len(terms) > 1:
        line += "".join(f", {name}: {metrics[name]:.4f}" for name in terms)
    for name, value in metrics.items():
        validated_term = name.startswith("val_") and name[4:] in terms and len(terms) > 1
        if name in LABELS or validated_term:
            line += f", {LABELS.get(name, name)}: {value:.4f}"
    print(line, flush=True)


@engine.hookimpl
def on_run_end(trainer: engine.TrainerView, error: BaseException | None) -> None:
    if trainer.rank:
        return
    if error is None:
        if trainer.state.test_metrics:
            terms = loss_terms(trainer.state.metrics)
            hidden = {f"test_{terms[0]}"} if len(terms) == 1 else set()  # a single term is the loss itself
            shown = [(name[5:], value) for name, value in trainer.state.test_metrics.items() if name not in hidden]
            print("Test: " + ", ".join(f"{name} {value:.4f}" for name, value in shown))
        print(parameters(trainer.final_module, whole=not trainer.distributed.sharded))
    if trainer.run_dir is not None:
        print(f"Run files: {trainer.run_dir}")


def parameters(model: torch.nn.Module, whole: bool = True) -> str:
    """The learned parameters of a small model, by name (the tutorial's weight and bias); the count
    of a larger one, or of one sharded over the processes (not `whole`: this one holds a shard)."""
    named = list(model.named_parameters())
    count = sum(p.numel() for _, p in named)
    if count > PRINT_PARAMETERS_UP_TO or not whole:
        return f"Model: {count:,} parameters"
    return "Learned parameters: " + ", ".join(
        f"{name} = {_values(p.detach().cpu().flatten().tolist())}" for name, p in named
    )


def _values(values: list[float]) -> str:
    text = ", ".join(f"{v:.4f}" for v in values)
    return text if len(values) == 1 else f"[{text}]"
