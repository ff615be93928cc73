"""fsdp and sharded-checkpoint: the model sharded over the processes (FSDP2), by hand and by the engine.

Contenders, in processes of their own (bench/ddp.py), one thread each; on the CPU two processes
(gloo), on CUDA one per GPU, up to two (NCCL; on a one-GPU machine, FSDP2 over one GPU):

- ``fsdp`` (the MLP job, global batch 32, and the wide job, global batch 512; fused Adam): the
  hand-written FSDP2 loop (the baseline: ``fully_shard`` on every layer holding parameters, then
  on the model, each rank its slice of every global batch) and the engine with ``distributed.
  strategy = "fsdp"``. Issue 20's target: the engine at 0.97x the hand-written loop's throughput
  or better.
- ``sharded-checkpoint`` (the MLP job): the engine's fsdp epoch without a checkpoint (the
  baseline), with a sharded checkpoint at its end written in the background (``dcp.async_save``:
  the target is at most 1.01) and written on the training thread (``dcp.save``).

All contenders of a group stay started for the whole module, and before each timed round of one
the others each run a round, untimed: the group's rounds interleave, so that a change in the
machine's load (other processes on its two cores) touches every contender alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import Group, Job
from ddp import DISTRIBUTED_JOBS, Processes

FSDP = {"by hand, fsdp": {"baseline": True}, "engine, fsdp": {"reference": "by hand, fsdp"}}
CHECKPOINTS = {
    "engine, fsdp": {"baseline": True},
    "engine, fsdp, async checkpoint": {"reference": "engine, fsdp"},
    "engine, fsdp, sync checkpoint": {"reference": "engine, fsdp"},
}


def processes_for(device: str) -> int:
    return min(2, torch.cuda.device_count()) if device == "cuda" else 2


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    return request.param


@pytest.fixture(params=list(DISTRIBUTED_JOBS))
def job(request: pytest.FixtureRequest) -> Job:
    return DISTRIBUTED_JOBS[request.param]


@pytest.fixture(scope="module")
def started() -> Iterator[dict[tuple[str, str, str], Processes]]:
    """Every contender's processes, started once for the module: (contender, job, device) -> them."""
    pool: dict[tuple[str, str, str], Processes] = {}
    yield pool
    for each in pool.values():
        each.close()


def rounds_of(started: dict, names: list[str], job: Job, device: str) -> list[Callable[[], None]]:
    found = []
    for name in names:
        key = (name, job.name, device)
        if key not in started:
            started[key] = Processes(name, job.name, device, processes_for(device))
        found.append(started[key].round)
    return found


def label(case: str, device: str) -> str:
    """The row's name: the contender and its number of processes."""
    count = processes_for(device)
    return f"{case}, {count} process{'es' if count > 1 else ''}"


def interleaved(started: dict, group: Group, cases: dict[str, dict], case: str, job: Job, device: str) -> None:
    """Time `case`'s rounds, each after a round of every other contender of `cases`."""
    (mine,) = rounds_of(started, [case], job, device)
    others = rounds_of(started, [name for name in cases if name != case], job, device)

    def between() -> None:
        for other in others:
            other()

    marks = dict(cases[case])
    if "reference" in marks:
        marks["reference"] = label(marks["reference"], device)
    group.measure(mine, label(case, device), between=between, **marks)


@pytest.mark.parametrize("case", list(FSDP))
def test_fsdp(started: dict, bench_group: Callable[[str], Group], job: Job, device: str, case: str) -> None:
    group = bench_group("fsdp")
    if group.benchmark.disabled and job.name != "mlp":
        pytest.skip("timed runs only: the MLP job's rows start the same processes (seconds each)")
    interleaved(started, group, FSDP, case, job, device)


@pytest.mark.parametrize("job", ["mlp"], indirect=True)
@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_sharded_checkpoint(
    started: dict, bench_group: Callable[[str], Group], job: Job, device: str, case: str
) -> None:
    group = bench_group("sharded-checkpoint")
    interleaved(started, group, CHECKPOINTS, case, job, device)
    # The direct figure, which the load of a shared machine moves less than a round's time: what
    # the training thread spent taking the checkpoint, the slowest process's median per epoch.
    seconds = max(started[(case, job.name, device)].call("saving"))
    group.benchmark.extra_info["training_thread_checkpoint_ms"] = round(seconds * 1e3, 3)
