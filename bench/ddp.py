"""Processes for the `distributed` group and bench/profile_distributed.py: each contender runs in
its own processes (one, or one per rank), started with torch.multiprocessing and driven round by
round over pipes, so that the parent times a round of all of them together.

A contender is built in every one of its processes from its name:

- ``by hand``: the hand-written loop (``loss = loss_fn(model(x), y); opt.zero_grad();
  loss.backward(); opt.step()``) with fused Adam; with several processes the model is wrapped in
  ``DistributedDataParallel`` and each rank takes its slice of every global batch of the same
  seeded epoch order, as a careful hand-written DDP loop does.
- ``engine``: the engine's loop (`Trainer.loop`, one logging point per round); with several
  processes under the environment torchrun gives them, its `distributed` plugin does the rest.
- ``by hand, fsdp``: the hand-written loop with the model sharded by FSDP2 as the engine's
  ``fsdp`` strategy shards it (``fully_shard`` on every layer holding parameters, then on the
  model), fused Adam on the shards, each rank its slice of every global batch; with one process,
  a group of one.
- ``engine, fsdp``: the engine with ``distributed.strategy = "fsdp"`` and no checkpoint;
  ``engine, fsdp, async checkpoint`` and ``engine, fsdp, sync checkpoint``: with a sharded
  checkpoint at the end of every epoch, written by `dcp.async_save` or by `dcp.save`.
- ``by hand, no all-reduce`` and ``by hand, half batch``, for the profile: the hand-written loop
  on each rank's slice of every global batch without DDP (the processes compute side by side and
  never communicate), and on one slice in one process (half the batch, alone on the machine).

Each process uses one thread (torchrun sets ``OMP_NUM_THREADS=1`` for more than one process).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing
from conftest import JOBS, Job
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import engine


def _wide_512() -> Job:
    from test_compiled import WIDE

    config = {**WIDE.config, "data": {**WIDE.config["data"], "batch_size": 512}}
    return dataclasses.replace(WIDE, config=config, batch_size=512, rounds=10)


# The MLP job of the shared suite (global batch 32) and the wide job with global batch 512, as in
# the reference measurement: 128 -> 512 -> 512 -> 10, LayerNorm, GELU, fused Adam.
DISTRIBUTED_JOBS = {"mlp": JOBS["mlp"], "wide": _wide_512()}
# The engine contenders, by their overrides of the job.
# No training metrics (accuracy inside each step): the hand-written loop computes none.
SHARDED = [
    "distributed.strategy=fsdp",
    "checkpoint.every_seconds=0",
    "checkpoint.keep_best=0",
    "log.train_metrics=false",
]
ENGINES = {
    "engine": [],
    "engine, fsdp": SHARDED,
    "engine, fsdp, async checkpoint": [*SHARDED, "checkpoint.every_epochs=1"],
    "engine, fsdp, sync checkpoint": [*SHARDED, "checkpoint.every_epochs=1", "checkpoint.async_save=false"],
}
CONTENDERS = ("by hand", "by hand, no all-reduce", "by hand, half batch", "by hand, fsdp", *ENGINES)
SAVING: list[float] = []  # in an engine's process: the seconds each round spent taking checkpoints


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Processes:
    """The processes of one contender, each holding its round ready to run."""

    def __init__(self, contender: str, job: str, device: str, world_size: int) -> None:
        context = torch.multiprocessing.get_context("spawn")
        port = free_port()
        self.pipes, self.processes = [], []
        for rank in range(world_size):
            here, there = context.Pipe()
            process = context.Process(
                target=serve, args=(rank, world_size, port, contender, job, device, there), daemon=True
            )
            process.start()
            self.pipes.append(here)
            self.processes.append(process)
        self.receive()

    def round(self) -> None:
        """One round on every process; returns when the slowest has finished it."""
        for pipe in self.pipes:
            pipe.send("round")
        self.receive()

    def call(self, message: str) -> list[Any]:
        """Every process's answer to `message` (``"profile"``: a profiler table of one round)."""
        for pipe in self.pipes:
            pipe.send(message)
        return self.receive()

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time so far of the processes' threads, added up by thread name (Linux /proc): the
        main threads as ``main``, gloo's as ``gloo_tcp_loop`` and ``pt_gloo_runloop``."""
        totals: dict[str, float] = {}
        ticks = os.sysconf("SC_CLK_TCK")
        for process in self.processes:
            for task in Path(f"/proc/{process.pid}/task").iterdir():
                try:
                    stat = (task / "stat").read_text()
                except FileNotFoundError:  # the thread ended
                    continue
                name = "main" if task.name == str(process.pid) else stat[stat.index("(") + 1 : stat.rindex(")")]
                user, system = stat.rsplit(")", 1)[1].split()[11:13]
                totals[name] = totals.get(name, 0.0) + (int(user) + int(system)) / ticks
        return totals

    def receive(self) -> list[Any]:
        answers = [pipe.recv() for pipe in self.pipes]
        for answer in answers:
            if isinstance(answer, str) and answer.startswith("Traceback"):
                self.close()
                raise RuntimeError(f"a benchmark process failed:\n{answer}")
        return answers

    def close(self) -> None:
        for pipe, process in zip(self.pipes, self.processes):
            if process.is_alive():
                pipe.send("stop")
        for process in self.processes:
            process.join(timeout=60)


def serve(rank: int, world_size: int, port: int, contender: str, job: str, device: str, pipe: Any) -> None:
    """A contender's process: build its round, then run it whenever the parent asks."""
    try:
        torch.set_num_threads(1)
        run_round, finish = build(rank, world_size, port, contender, DISTRIBUTED_JOBS[job], device)
        pipe.send("ready")
        while (message := pipe.recv()) != "stop":
            if message == "profile":
                pipe.send(profiled(run_round, device))
                continue
            if message == "saving":
                pipe.send(statistics.median(SAVING) if SAVING else 0.0)
                continue
            run_round()
            if device == "cuda":
                torch.cuda.synchronize()
            pipe.send("done")
        finish()
    except Exception:
        pipe.send(traceback.format_exc())


def build(
    rank: int, world_size: int, port: int, contender: str, job: Job, device: str
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The round and the teardown of `contender` in process `rank`."""
    if contender in ENGINES:
        return engine_round(rank, world_size, port, job, device, ENGINES[contender])
    sharded = contender == "by hand, fsdp"
    communicate = sharded or (contender == "by hand" and world_size > 1)
    slices = 2 if contender == "by hand, half batch" else world_size  # of each global batch
    if communicate:
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    where = torch.device(device, rank) if device == "cuda" else torch.device(device)
    if device == "cuda":
        torch.cuda.set_device(where)
    torch.manual_seed(job.seed)  # the engine seeds the same way right before its model
    model = job.model()
    if sharded:  # each layer holding parameters a unit, then the model; fully_shard moves the shards to the device
        mesh = init_device_mesh(device, (world_size,))
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        model = model.to(where)
    if communicate and not sharded:
        model = DistributedDataParallel(model, device_ids=[rank] if device == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=job.lr, fused=True)
    loss_fn = job.loss()
    x, y = (torch.as_tensor(a).to(where) for a in job.data())
    size, local = job.batch_size, job.batch_size // slices
    batches = len(x) // size
    # This rank's positions in an epoch's order: its slice of every global batch.
    positions = torch.arange(batches * size).view(batches, size)[:, rank * local : (rank + 1) * local].reshape(-1)
    generator = torch.Generator().manual_seed(job.seed)

    def run_round() -> None:
        for _ in range(job.epochs_per_round):
            order = torch.randperm(len(x), generator=generator)[positions].to(where)
            xs, ys = x[order], y[order]
            for start in range(0, len(order), local):
                loss = loss_fn(model(xs[start : start + local]), ys[start : start + local])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    return run_round, (dist.destroy_process_group if communicate else lambda: None)


def engine_round(
    rank: int, world_size: int, port: int, job: Job, device: str, overrides: list[str]
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The engine's loop from the first epoch, as bench/conftest.py's `Contenders.engine` runs it:
    a round is epochs in the middle of a long run (its last epoch would take the run's final
    checkpoint)."""
    if world_size > 1:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    epochs = job.epochs_per_round
    trainer = engine.setup(
        job.config,
        overrides=[
            f"device={device}",
            f"epochs={epochs}",
            f"log.every={epochs}",
            f"runs_dir={tempfile.mkdtemp()}",
            *overrides,
        ],
        blocked=["console"],
    )
    trainer.start()
    # A round is `epochs` epochs in the middle of a long run, never its last step (where the
    # checkpoint plugin takes the run's final checkpoint): the round stops itself.
    trainer.epochs = trainer.last_step = 2**62
    trainer.length = trainer.length._replace(batches=trainer.last_step)
    trainer.plan()

    def end_round(epoch: int) -> None:
        trainer.state.stop = epoch == epochs

    trainer.epoch_end.append(end_round)
    checkpoints = trainer.plugins.pm.get_plugin("checkpoint")
    save, saving = checkpoints.save, [0.0]

    def timed_save(*args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        save(*args, **kwargs)
        saving[0] += time.perf_counter() - started

    checkpoints.save = timed_save  # what the training thread spends taking checkpoints

    def run_round() -> None:  # the run again from its start: its epochs, and its steps
        state = trainer.state
        state.epoch, state.batch, state.step, state.stop = 1, 0, 0, False
        saving[0] = 0.0
        trainer.loop()
        SAVING.append(saving[0])

    def finish() -> None:
        trainer.final_module = trainer.module
        trainer.end(None)  # on_run_end, the summary, and the processes' group left

    return run_round, finish


def profiled(run_round: Callable[[], None], device: str) -> str:
    """torch.profiler's table of one round, by the operators' own time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        run_round()
    return profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
