"""bench/gpu.sh, the prepared GPU check, on the CPU: everything but its GPU calls. Its dry run
checks what the machine lacks, resolves the install, and collects exactly the tests and benchmark
rows a GPU machine would run; a missing dependency stops it in one line naming it; steps that
would overrun the check's deadline are cut short or skipped and reported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "bench" / "gpu.sh"


def check(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args, str(out)], cwd=REPO, env=environment, capture_output=True, text=True, timeout=600
    )


def summary(out: Path) -> dict[str, str]:
    lines = (out / "summary.txt").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines)


@pytest.mark.slow
def test_the_dry_run_collects_what_a_gpu_machine_runs(tmp_path):
    done = check(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    statuses = summary(tmp_path)
    assert list(statuses) == ["install", "import", "tests", "compiled", "fsdp"]
    assert all(status.startswith("ok, ") for status in statuses.values()), statuses
    assert "Would install torch-plugin-engine" in (tmp_path / "01-install.log").read_text()
    tests = (tmp_path / "03-tests.log").read_text()
    for expected in (
        "tests/plugins/test_fsdp.py::test_fsdp_on_one_gpu_over_nccl_trains_as_the_whole_model_does_and_resumes[bf16-mixed]",
        "tests/plugins/test_cudagraph.py::",
        "tests/plugins/test_compile.py::",
        "tests/engine/test_resume.py::test_a_run_killed_at_a_random_step_resumes_exactly[cuda-mlp]",
    ):
        assert expected in tests, expected
    assert "test_border.py" not in tests  # -m cuda: the CUDA tests alone
    compiled = (tmp_path / "04-compiled.log").read_text()
    rows = ("engine cudagraph", "engine compile]", "engine bf16-mixed", "engine 16-mixed", "hand_written_cuda_graph")
    for row in rows:
        assert row in compiled, row
    assert "-cpu" not in compiled and "reduce-overhead" not in compiled and "engine auto" not in compiled
    assert compiled.count("[mlp-cuda") == 8
    fsdp = (tmp_path / "05-fsdp.log").read_text()
    assert "test_fsdp[mlp-cuda-by hand, fsdp]" in fsdp and "test_fsdp[wide-cuda-engine, fsdp]" in fsdp
    assert "test_sharded_checkpoint[cuda-engine, fsdp, async checkpoint-mlp]" in fsdp
    environment = (tmp_path / "environment.txt").read_text()
    assert "torch: " in environment and "dry run: nothing ran on a GPU" in environment


@pytest.mark.slow
def test_steps_past_the_deadline_are_skipped_and_fail_the_check(tmp_path):
    # A step starts only with 20 s left: with 30 the first ones run and the last ones (20 s of steps
    # here) cannot, from a fast machine to one that takes 10 s to start the check.
    done = check(tmp_path, "--dry-run", DEADLINE="30")
    assert done.returncode == 1
    statuses = list(summary(tmp_path).values())
    ran = [status for status in statuses if status.startswith("ok, ")]
    assert ran and len(ran) < len(statuses), statuses
    assert statuses == ran + ["skipped (out of time)"] * (len(statuses) - len(ran))


@pytest.mark.slow
def test_a_missing_dependency_stops_the_check_in_one_line_naming_it(tmp_path):
    shadow = tmp_path / "shadow" / "tqdm"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    out = tmp_path / "out"
    done = check(out, PYTHONPATH=str(shadow.parent))
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == "gpu check: missing: tqdm (a runtime dependency of the engine)"
    assert summary(out) == {"missing": "tqdm"}
    assert not (out / "environment.txt").exists()


def test_it_takes_one_folder(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr == "usage: bash bench/gpu.sh [--dry-run] OUT_DIR\n"
