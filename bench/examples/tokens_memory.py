"""Resident memory of a run on a token file larger than the pages it keeps: the baby GPT of
shakespeare_char.toml on a 1 GiB file of uint16 token ids (512 Mi tokens), trained as a user runs
it (``python -m engine run``, a process of its own), its peak resident set read from the kernel.

    python bench/examples/tokens_memory.py            # --gib 1 --steps 300

The file is written in the system's temporary folder and removed afterwards. The same job on a
1 MiB file is run first: the difference is what the large file costs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
JOB = HERE / "shakespeare_char.toml"


def write_tokens(path: Path, tokens: int, vocabulary: int = 65) -> None:
    chunk = (np.arange(min(tokens, 1 << 20), dtype=np.int64) * 7919 % vocabulary).astype(np.uint16)
    with open(path, "wb") as handle:
        for _ in range(tokens // len(chunk)):
            chunk.tofile(handle)


def peak_mb(path: Path, steps: int, runs_dir: Path, name: str) -> tuple[float, float]:
    """The peak resident memory (MB) of a run on `path`, and its wall time (s)."""
    command = [sys.executable, "-m", "engine", "run", str(JOB), "--quiet"]
    settings = [f"data.path={path}", "data.tokenizer=ids", "data.dtype=uint16", "data.val_windows=240"]
    settings += [f"max_steps={steps}", f"val_every_steps={steps}", f"runs_dir={runs_dir}", f"run_name={name}"]
    settings += ["checkpoint.every_seconds=0"]
    for setting in settings:
        command += ["--set", setting]
    # Through a wrapper process of its own: the largest resident set of its children is the run's.
    wrapper = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
    wrapper += "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapper, *command], check=True, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    return int(done.stdout.split()[-1]) / 1024, seconds  # ru_maxrss is in KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="the large file's size (default 1 GiB)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each run (default 300)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        small, large = folder / "small.bin", folder / "large.bin"
        write_tokens(small, 1 << 19)
        write_tokens(large, int(args.gib * (1 << 29)))
        small_mb, small_s = peak_mb(small, args.steps, folder / "runs", "small")
        large_mb, large_s = peak_mb(large, args.steps, folder / "runs", "large")
    size = f"{args.gib:g} GiB"
    print(f"| token file | peak resident memory | {args.steps} steps |")
    print("|---|---:|---:|")
    print(f"| 1 MiB | {small_mb:.0f} MB | {small_s:.1f} s |")
    print(f"| {size} | {large_mb:.0f} MB | {large_s:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
