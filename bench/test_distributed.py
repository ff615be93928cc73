"""distributed: data-parallel training in two processes against one, by hand and by the engine.

Contenders, for the MLP job (global batch 32) and the wide job (128 -> 512 -> 512 -> 10 with
LayerNorm and GELU, global batch 512), fused Adam, each process with one thread:

- by hand, 1 process: the hand-written loop (the scaling's reference);
- engine, 1 process: the engine's loop in one process;
- by hand, 2 processes: the hand-written DDP loop on gloo, each rank its slice of every global
  batch (the group's baseline: issue 13's target is the engine at 0.97x its throughput or better);
- engine, 2 processes: the engine under the environment torchrun gives its processes.

Every contender runs in processes of its own (bench/ddp.py), one round at a time, so the time of
a round is the slowest process's. A row's time is per global batch (optimizer step), so the 1- to
2-process ratio of one loop is its scaling. Where the rest of the ideal 2x goes:
``python bench/profile_distributed.py``. The CUDA rows need two GPUs (NCCL), and skip otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from conftest import Group, Job, devices
from ddp import DISTRIBUTED_JOBS, Processes


@pytest.fixture(params=list(DISTRIBUTED_JOBS))
def job(request: pytest.FixtureRequest) -> Job:
    return DISTRIBUTED_JOBS[request.param]


@pytest.fixture(params=devices(2))
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def distributed(bench_group: Callable[[str], Group]) -> Group:
    return bench_group("distributed")


@pytest.fixture
def processes(job: Job, device: str) -> Iterator[Callable[[str, int], Processes]]:
    started: list[Processes] = []

    def start(contender: str, world_size: int) -> Processes:
        started.append(Processes(contender, job.name, device, world_size))
        return started[-1]

    yield start
    for each in started:
        each.close()


CASES = {
    "by hand, 1 process": ("by hand", 1, {}),
    "engine, 1 process": ("engine", 1, {"reference": "by hand, 1 process"}),
    "by hand, 2 processes": ("by hand", 2, {"baseline": True, "reference": "by hand, 1 process"}),
    "engine, 2 processes": ("engine", 2, {"reference": "engine, 1 process"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_distributed(processes: Callable[[str, int], Processes], distributed: Group, case: str) -> None:
    if distributed.benchmark.disabled and distributed.job.name != "mlp":
        pytest.skip("timed runs only: the MLP job's rows start the same processes (seconds each)")
    contender, world_size, marks = CASES[case]
    distributed.measure(processes(contender, world_size).round, case, **marks)
