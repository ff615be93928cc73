"""What each process holds of the model: its parameters', gradients' and optimizer state's bytes
against the whole model's, reported once, after the run's first optimizer step (when the
gradients and the optimizer's state exist)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

import engine

KINDS = ("parameters", "gradients", "optimizer state")


def held(trainer: engine.TrainerView) -> list[torch.Tensor]:
    """Of each kind, the tensors this process holds: its shards when the model is sharded."""
    params = list(trainer.module.parameters())
    state = [value for values in trainer.optimizer.state.values() for value in values.values()]
    return [params, [p.grad for p in params if p.grad is not None], [v for v in state if isinstance(v, torch.Tensor)]]


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def whole_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)  # a DTensor's numel is its whole tensor's


def figures(trainer: engine.TrainerView) -> tuple[torch.Tensor, list[int]]:
    """Every process's bytes of each kind, one row a rank (one collective), and the whole model's."""
    kinds = held(trainer)
    rows = torch.zeros(trainer.world_size, len(KINDS), dtype=torch.float64, device=trainer.device)
    rows[trainer.rank] = torch.tensor([float(local_bytes(kind)) for kind in kinds], dtype=torch.float64)
    return trainer.distributed.all_reduce(rows).cpu(), [whole_bytes(kind) for kind in kinds]


def report(rows: torch.Tensor, whole: list[int], strategy: str) -> str:
    """``memory per process ...`` and one line per rank: what it holds, and its share of the whole."""
    lines = [
        f"memory per process after the first step ({strategy}, {len(rows)} process{'es' * (len(rows) > 1)}): "
        f"{' + '.join(KINDS)}; the whole model's: {' + '.join(size(b) for b in whole)} = {size(sum(whole))}"
    ]
    for rank, row in enumerate(rows.tolist()):
        share = sum(row) / sum(whole) if sum(whole) else 0.0
        lines.append(f"  rank {rank}: {' + '.join(size(b) for b in row)} = {size(sum(row))}, {share:.2f} of the whole")
    return "\n".join(lines)


def size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
