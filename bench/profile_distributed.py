"""Where the ideal 2x of two processes goes, per global batch (optimizer step), CPU, one thread
per process: the same hand-written loop measured five ways, then torch.profiler's table of one
round of the hand-written DDP loop on rank 0.

    python bench/profile_distributed.py [JOB ...]     # mlp, wide (default: both)

- 1 process, whole batch: t1; the ideal for two processes is t1 / 2.
- 1 process, half batch: what a process's share costs alone. Above t1 / 2 by what does not halve
  with the batch: the optimizer step over every parameter, the loop's and the kernels' fixed costs.
- 2 processes, half batch each, no all-reduce: side by side on the machine, never waiting for
  each other. Above the previous line by contention (memory bandwidth, caches, the other's threads).
- 2 processes, DDP: adds the gradient all-reduce (gloo, over TCP on this machine) and the waits
  for the slower process.
- engine, 2 processes: the engine's loop over the same.

Then the CPU time of the DDP loop's threads per step (Linux): gloo's threads move the gradients
while the main threads compute, and on two cores they take their time from the computation.

Rounds of the contenders alternate (in one order, then the reverse), so that a change in the
machine's load touches them alike.
"""

from __future__ import annotations

import statistics
import sys
import time

from ddp import DISTRIBUTED_JOBS, Processes

ROWS = {
    "1 process, whole batch": ("by hand", 1),
    "1 process, half batch": ("by hand, half batch", 1),
    "2 processes, half batch each, no all-reduce": ("by hand, no all-reduce", 2),
    "2 processes, DDP": ("by hand", 2),
    "engine, 2 processes": ("engine", 2),
}
ROUNDS = 20


def profile(job_name: str) -> None:
    job = DISTRIBUTED_JOBS[job_name]
    steps = job.epochs_per_round * (len(job.data()[0]) // job.batch_size)
    started = {row: Processes(contender, job_name, "cpu", world) for row, (contender, world) in ROWS.items()}
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    ddp = started["2 processes, DDP"]
    try:
        for processes in started.values():
            processes.round()  # warm-up
        cpu_before = ddp.cpu_seconds()
        for round_ in range(ROUNDS):
            order = list(started.items())
            for row, processes in order if round_ % 2 else reversed(order):
                begin = time.perf_counter()
                processes.round()
                times[row].append((time.perf_counter() - begin) / steps)
        cpu_after = ddp.cpu_seconds()
        cpu = {name: (cpu_after[name] - cpu_before.get(name, 0.0)) / (ROUNDS * steps) for name in cpu_after}
        table = ddp.call("profile")[0]
    finally:
        for processes in started.values():
            processes.close()
    median = {row: statistics.median(seconds) * 1e6 for row, seconds in times.items()}
    whole = median["1 process, whole batch"]
    print(f"\n{job_name}: global batch {job.batch_size}, {steps} steps a round, median of {ROUNDS} rounds")
    print(f"{'':48} {'us/step':>9} {'vs ideal':>9} {'scaling':>8}")
    print(f"{'ideal: 1 process / 2':48} {whole / 2:9.1f} {1:9.2f} {2:8.2f}")
    for row, us in median.items():
        print(f"{row:48} {us:9.1f} {us / (whole / 2):9.2f} {whole / us:8.2f}")
    half, side, ddp = (median[row] for row in list(ROWS)[1:4])
    print(
        f"where the rest goes, us/step: what does not halve {half - whole / 2:.1f}, "
        f"contention {side - half:.1f}, all-reduce and waits {ddp - side:.1f}"
    )
    threads = ", ".join(f"{name} {seconds * 1e6:.0f}" for name, seconds in sorted(cpu.items()) if seconds * 1e6 >= 1)
    print(f"CPU per step of the DDP loop's two processes, by thread, us: {threads}")
    print(f"torch.profiler, one round of the DDP loop on rank 0 ({steps} steps):\n{table}")


if __name__ == "__main__":
    for name in sys.argv[1:] or list(DISTRIBUTED_JOBS):
        profile(name)
