"""Shared pieces of the benchmark suite: the jobs, the contenders, the device parametrization, the
measurement (with its ``extra_info``) and the ratio table printed at the end of a run.

A benchmark module uses them through fixtures: ``job`` and ``device`` say what runs where,
``contenders`` builds the hand-written loop, the engine and the data they share, and one fixture
per group (``loop_overhead``, ``data_path``, ``optimizer_group``, ``compiled``, ``inference``)
times a round and records it. bench/README.md shows how to add a group.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_plugins import datasets
from ratios import Record, format_table, latency_table, rows
from torch import nn

import engine

# One intra-op thread by default, as in the CPU targets: with more, the small tutorial
# ops pay thread-pool wake-ups and the figures swing with whatever else the machine runs.
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
# At most this many timed rounds per contender, when set: a quick run (bench/gpu.sh sets 5).
MAX_ROUNDS = int(os.environ.get("BENCH_ROUNDS", "0"))

# Groups and what their contenders compare. A group's name starts each benchmark's pytest-benchmark
# group ("loop-overhead:tutorial:cpu"), so that only contenders doing the same work are compared.
GROUPS = {
    "loop-overhead": "the same job trained by hand, by the engine, and by peers",
    "data-path": "one epoch of the MLP job fed by DataLoader or by in-memory tensor batching",
    "optimizer": "the optimizer step alone: torch's default, foreach and fused",
    "compiled": "the train step eager, under torch.compile and as a CUDA graph",
    "inference": "one forward pass eager, compiled and exported (AOTInductor, ONNX Runtime, TensorRT)",
    "checkpoint": "an epoch with a checkpoint at its end beside one without; saving and loading one",
    "logging": "an epoch logging to TensorBoard at its end beside one logging to the run files only",
    "distributed": "data-parallel training in two processes beside one, by hand (DDP) and by the engine",
    "tokens": "a language model on windows of a token file, in tokens per second, by hand and by the engine",
    "fsdp": "the model sharded over two processes (FSDP2; one per GPU), by hand and by the engine, rounds interleaved",
    "sharded-checkpoint": "an fsdp epoch with an async or a synchronous sharded checkpoint at its end beside none",
}


@dataclass(frozen=True, slots=True)
class Job:
    """A training job as the engine runs it (`config`) and as a hand-written loop builds it."""

    name: str
    config: dict[str, Any]  # the engine's job, shaped like its TOML file
    data: Callable[[], tuple[np.ndarray, np.ndarray]]
    model: Callable[[], nn.Module]
    loss: Callable[[], nn.Module]
    batch_size: int  # 0: the whole set in one batch
    epochs_per_round: int  # a round is long enough for the timer and short enough to repeat
    rounds: int
    warmup_rounds: int

    @property
    def seed(self) -> int:
        return self.config["seed"]

    @property
    def lr(self) -> float:
        return self.config["optimizer"]["lr"]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))


JOBS = {
    # The engine's default job, spelled out: y = 2x + 3 + noise, Linear(1, 1), MSE, Adam lr 0.01,
    # 100 samples in one batch. A round is 100 epochs of one step (a tenth of the tutorial).
    "tutorial": Job(
        name="tutorial",
        config={"seed": 42, "optimizer": {"name": "adam", "lr": 0.01}},
        data=lambda: datasets.linear_regression(seed=42, n_samples=100),
        model=lambda: nn.Linear(1, 1),
        loss=nn.MSELoss,
        batch_size=0,
        epochs_per_round=100,
        rounds=100,
        warmup_rounds=10,
    ),
    # 32 features -> 256 -> 256 -> 4 classes, ReLU, cross-entropy, Adam 1e-3, batch 32 of 8192
    # shuffled samples. A round is one epoch: 256 steps.
    "mlp": Job(
        name="mlp",
        config={
            "seed": 42,
            "data": {"name": "classification", "n_samples": 8192, "n_features": 32, "n_classes": 4, "batch_size": 32},
            "model": {"name": "mlp", "hidden": [256, 256], "activation": "relu"},
            "loss": {"name": "cross_entropy"},
            "optimizer": {"name": "adam", "lr": 1e-3},
        },
        data=lambda: datasets.classification(seed=42, n_samples=8192, n_features=32, n_classes=4),
        model=_mlp,
        loss=nn.CrossEntropyLoss,
        batch_size=32,
        epochs_per_round=1,
        rounds=25,
        warmup_rounds=3,
    ),
}


def torch_default_impl(device: str) -> str:
    """The engine's `optimizer.impl` that picks what torch picks when the loop names none."""
    return "foreach" if device.startswith("cuda") else "for_loop"


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(THREADS)
    # Fixed for good by the first parallel op of the process: then only the intra-op count counts.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(THREADS)


# --- what runs where --------------------------------------------------------------------------


def devices(gpus: int = 1) -> list[Any]:
    """The CPU, and CUDA marked ``cuda``, skipped on a machine with fewer than `gpus` GPUs."""
    reason = "no CUDA GPU on this machine" if gpus == 1 else f"needs {gpus} CUDA GPUs"
    skip = pytest.mark.skipif(torch.cuda.device_count() < gpus, reason=reason)
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, skip])]


@pytest.fixture(params=devices())
def device(request: pytest.FixtureRequest) -> str:
    """Every benchmark runs on the CPU, and on CUDA where a GPU is present."""
    return request.param


@pytest.fixture(params=list(JOBS))
def job(request: pytest.FixtureRequest) -> Job:
    """Both jobs; narrow it with ``@pytest.mark.parametrize("job", ["mlp"], indirect=True)``."""
    return JOBS[request.param]


# --- the contenders ---------------------------------------------------------------------------

Round = Callable[[], Any]


class EpochBatches:
    """One epoch of (x, y) batches per iteration: a seeded permutation, then slices of it.

    The in-memory batching a careful hand-written loop does, and what the peers are fed, so that
    the loop-overhead group compares loops rather than data paths.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y = x, y
        self.size = batch_size or len(x)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.x) // self.size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y, size = self.x, self.y, self.size
        if size < len(x):
            order = torch.randperm(len(x), generator=self.generator).to(x.device)
            x, y = x[order], y[order]
        for start in range(0, len(x), size):
            yield x[start : start + size], y[start : start + size]


@dataclass
class Contenders:
    """Builds the contenders of one (job, device): the same data, initial weights and optimizer."""

    job: Job
    device: str
    runs_dir: Path
    _teardown: list[Callable[[], None]] = field(default_factory=list)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (torch.as_tensor(a) for a in self.job.data())
        return x.to(self.device), y.to(self.device)

    def model(self) -> nn.Module:
        torch.manual_seed(self.job.seed)  # the engine seeds the same way right before its model
        return self.job.model().to(self.device)

    def optimizer(self, model: nn.Module, **impl: bool) -> torch.optim.Optimizer:
        """Adam at the job's learning rate; `impl` is ``fused=True`` or ``foreach=...``, else torch's choice."""
        return torch.optim.Adam(model.parameters(), lr=self.job.lr, **impl)

    def batches(self) -> EpochBatches:
        x, y = self.tensors()
        return EpochBatches(x, y, self.job.batch_size, self.job.seed)

    def hand_written(self, **impl: bool) -> tuple[nn.Module, Round]:
        """The tutorial's loop: ``loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward(); opt.step()``."""
        model, loss_fn = self.model(), self.job.loss()
        optimizer = self.optimizer(model, **impl)
        epochs = self.job.epochs_per_round
        if self.job.batch_size == 0:
            x, y = self.tensors()

            def full_batch() -> None:
                for _ in range(epochs):
                    loss = loss_fn(model(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()

            return model, full_batch
        batches = self.batches()

        def mini_batches() -> None:
            for _ in range(epochs):
                for x, y in batches:
                    loss = loss_fn(model(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()

        return model, mini_batches

    def engine(self, overrides: Sequence[str] = (), plugins: Sequence[Any] = ()) -> tuple[engine.Trainer, Round]:
        """The engine's loop over `epochs_per_round` epochs, with the job's logging cadence.

        The run's start and end (run files, summary) are paid once per run, not per step, so they
        happen outside the timed rounds; each round is `Trainer.loop` from the first epoch. The
        training metrics (accuracy inside each step, on by default) are off, so that the engine
        does the hand-written loop's work; loop-overhead prices them as a contender of their own.
        """
        epochs = self.job.epochs_per_round
        trainer = engine.setup(
            self.job.config,
            overrides=[
                f"device={self.device}",
                f"epochs={epochs}",
                f"log.every={epochs}",  # one logging point per round: the tutorial logs every 100 epochs
                f"runs_dir={self.runs_dir}",
                "log.train_metrics=false",
                *overrides,
            ],
            plugins=plugins,
        )
        trainer.start()
        self._teardown.append(lambda: finish(trainer))
        # A round is `epochs` epochs in the middle of a long run, never its last one (whose end
        # takes the run's final checkpoint): the loop runs on, and the round stops itself.
        trainer.last_step = 2**62
        trainer.length = trainer.length._replace(batches=trainer.last_step)  # what the checkpoint plugin reads
        trainer.plan()

        def end_round(epoch: int) -> None:
            trainer.state.stop = epoch == epochs

        trainer.epoch_end.append(end_round)

        def run_round() -> None:
            state = trainer.state
            state.epoch, state.batch, state.stop = 1, 0, False
            trainer.loop()

        return trainer, run_round

    def on_teardown(self, function: Callable[[], None]) -> None:
        self._teardown.append(function)

    def close(self) -> None:
        while self._teardown:
            self._teardown.pop()()


def finish(trainer: engine.Trainer) -> None:
    """The end of a run whose rounds were timed: `on_run_end`, the summary, the loaders released."""
    trainer.final_module = trainer.module
    trainer.end(None)


@pytest.fixture
def contenders(job: Job, device: str, tmp_path: Path) -> Iterator[Contenders]:
    built = Contenders(job, device, tmp_path / "runs")
    yield built
    built.close()


# --- measuring --------------------------------------------------------------------------------

RECORDS: list[Record] = []  # this session's results, for the ratio table


class Group:
    """Times the contenders of one group for one (job, device) and records what the table needs."""

    def __init__(self, name: str, benchmark: Any, job: Job, device: str) -> None:
        self.name, self.benchmark, self.job, self.device = name, benchmark, job, device

    def measure(
        self,
        run_round: Round,
        contender: str,
        *,
        baseline: bool = False,
        reference: str | None = None,
        steps_per_round: int | None = None,
        hook_calls_per_step: int = 0,
        rounds: int | None = None,
        samples_per_step: int = 0,
        between: Round | None = None,
    ) -> None:
        """Time `run_round` over the job's rounds, after its warm-up rounds (excluded).

        `steps_per_round` defaults to the job's optimizer steps in `epochs_per_round` epochs.
        `baseline` marks the contender the group's ratios are taken to (the hand-written loop);
        `reference` names a second contender to compare with, and `hook_calls_per_step` the extra
        hook calls per step over it, for a dispatch cost per call. `samples_per_step` (a forward
        pass's batch size, in the inference group) adds the 99th percentile of a round and the
        samples per second to the record, for the latency table. `between` runs, untimed, before
        each round: the other contenders' rounds, so that the group's rounds interleave and a
        change in the machine's load touches them alike.
        """
        steps = steps_per_round or self.job.epochs_per_round * batches_per_epoch(self.job)
        group = f"{self.name}:{self.job.name}:{self.device}"
        self.benchmark.group = group
        info = self.benchmark.extra_info
        info.update(
            contender=contender,
            job=self.job.name,
            device=self.device,
            device_name=device_name(self.device),
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            steps_per_round=steps,
            baseline=baseline,
            hook_calls_per_step=hook_calls_per_step,
        )
        if reference:
            info["reference"] = reference
        timed = run_round
        if self.device.startswith("cuda"):

            def timed() -> None:
                run_round()
                torch.cuda.synchronize()  # the round ends when the GPU is done, not when it was queued

        between = None if self.benchmark.disabled else between  # the smoke run times nothing
        rounds = min(rounds or self.job.rounds, MAX_ROUNDS or self.job.rounds)
        self.benchmark.pedantic(timed, setup=between, rounds=rounds, warmup_rounds=self.job.warmup_rounds, iterations=1)
        if self.benchmark.stats is not None:  # None under --benchmark-disable
            median = self.benchmark.stats.stats.median
            info["us_per_step"] = round(median / steps * 1e6, 3)
            info["steps_per_second"] = round(steps / median, 1)
            if samples_per_step:
                times = self.benchmark.stats.stats.sorted_data
                info["samples_per_step"] = samples_per_step
                info["p99_us_per_step"] = round(times[min(len(times) - 1, int(0.99 * len(times)))] / steps * 1e6, 3)
                info["samples_per_second"] = round(samples_per_step * steps / median, 1)
            RECORDS.append(Record.from_benchmark(group, median, info))


def batches_per_epoch(job: Job) -> int:
    samples = job.config.get("data", {}).get("n_samples", 100)
    return -(-samples // job.batch_size) if job.batch_size else 1


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@pytest.fixture
def bench_group(benchmark: Any, job: Job, device: str) -> Callable[[str], Group]:
    """A `Group` for any group name: the base of the per-group fixtures below."""

    def make(name: str) -> Group:
        if name not in GROUPS:
            raise ValueError(f"unknown benchmark group {name!r}; declare it in GROUPS in bench/conftest.py")
        return Group(name, benchmark, job, device)

    return make


@pytest.fixture
def loop_overhead(bench_group: Callable[[str], Group]) -> Group:
    return bench_group("loop-overhead")


@pytest.fixture
def data_path(bench_group: Callable[[str], Group]) -> Group:
    return bench_group("data-path")


@pytest.fixture
def optimizer_group(bench_group: Callable[[str], Group]) -> Group:
    return bench_group("optimizer")


@pytest.fixture
def compiled(bench_group: Callable[[str], Group]) -> Group:
    """For bench/test_compiled.py: eager vs torch.compile vs CUDA graphs (baseline: eager, by hand)."""
    return bench_group("compiled")


@pytest.fixture
def checkpoint_group(bench_group: Callable[[str], Group]) -> Group:
    """For bench/test_checkpoint.py: what checkpoints cost (baseline: the epoch without one)."""
    return bench_group("checkpoint")


@pytest.fixture
def logging_group(bench_group: Callable[[str], Group]) -> Group:
    """For bench/test_logging.py: what a logger costs (baseline: the epoch without it)."""
    return bench_group("logging")


@pytest.fixture
def inference(bench_group: Callable[[str], Group]) -> Group:
    """For bench/test_inference.py: eager vs compiled and exported forward passes (baseline: eager)."""
    return bench_group("inference")


# --- the ratio table --------------------------------------------------------------------------


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not RECORDS:
        return
    terminalreporter.section("engine benchmark ratios")
    terminalreporter.write_line(
        f"median time per optimizer step; vs baseline: ratio to the group's hand-written loop "
        f"(torch {torch.__version__}, {torch.get_num_threads()} thread(s), {cpu_model()})"
    )
    terminalreporter.write_line(format_table(rows(RECORDS)))
    latency = latency_table(RECORDS)
    if latency:
        terminalreporter.section("latency and throughput")
        terminalreporter.write_line(
            "per batch (inference: a forward pass; tokens: a train step, samples are tokens); "
            "speed-up: the group's baseline median / this median"
        )
        terminalreporter.write_line(latency)
