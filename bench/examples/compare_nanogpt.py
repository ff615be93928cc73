"""The character-level GPT of shakespeare_char.toml beside nanoGPT's own train.py, on the same text.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT          # not part of this project
    python bench/examples/compare_nanogpt.py --text input.txt --nanogpt /tmp/nanoGPT   # markdown tables

Three runs of 2,000 steps with nanoGPT's baby-GPT CPU settings (its README's command line), each
on the same threads (``--threads``, 2 by default):

- nanoGPT's ``train.py``, unchanged, on the text prepared as its ``data/shakespeare_char/prepare.py``
  prepares it (a character a token, the last tenth for validation). It is given a config file
  that sets the README's settings and keeps a copy of each checkpoint it saves at an evaluation
  (its ``ckpt.pt`` is overwritten each time);
- the engine's job, shakespeare_char.toml (the built-in ``gpt``);
- the engine's job with nanoGPT's ``model.GPT`` itself (shakespeare_char_nanogpt_model.toml).

The loss at each evaluation is each model's mean cross-entropy over every window of the validation
text (1,742 windows of 64 characters on tiny Shakespeare), computed by the same function for all
three; nanoGPT's own estimate (20 random batches) is shown beside it. Wall time per step is the
median of each run's steps (nanoGPT's printed ``time``; the engine's from bench/examples/
step_times.py), over the whole runs and over short runs of each interleaved (``--rounds``), so that
the machine's load weighs on both alike. ``--auto`` also runs the job with ``accelerate.name =
"auto"`` and reports what it chose. The results go to ``--out`` as JSON too.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import engine

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BLOCK, BATCH = 64, 12
# The README's command line for a CPU, as a config file (nanoGPT's configurator executes it in
# train.py's namespace), and a copy of each checkpoint it saves: model-<iter>.pt.
NANOGPT_CONFIG = """
out_dir = {out_dir!r}
eval_interval = {eval_every}
eval_iters = 20
log_interval = 1
always_save_checkpoint = True
dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
learning_rate = 1e-3
max_iters = {steps}
lr_decay_iters = {steps}
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
device = "cpu"
compile = False
wandb_log = False

import os as _os
import torch as _torch

_save = _torch.save


def _keeping(obj, path, *args, **kwargs):
    _save(obj, path, *args, **kwargs)
    if isinstance(obj, dict) and "iter_num" in obj:
        _save(obj["model"], _os.path.join(out_dir, "model-%d.pt" % obj["iter_num"]))


_torch.save = _keeping
"""


def prepare(text: Path, work: Path) -> tuple[Path, np.ndarray, list[str]]:
    """The text as nanoGPT's data/shakespeare_char/prepare.py writes it: a character a token (the
    sorted characters), the first 90% for training; its folder, the validation ids, the vocabulary."""
    data = text.read_text(encoding="utf-8")
    characters = sorted(set(data))
    place = {character: index for index, character in enumerate(characters)}
    ids = np.array([place[character] for character in data], dtype=np.uint16)
    folder = work / "data" / "shakespeare_char"
    folder.mkdir(parents=True, exist_ok=True)
    cut = int(len(data) * 0.9)
    ids[:cut].tofile(folder / "train.bin")
    ids[cut:].tofile(folder / "val.bin")
    meta = {"vocab_size": len(characters), "itos": dict(enumerate(characters)), "stoi": place}
    with open(folder / "meta.pkl", "wb") as handle:
        pickle.dump(meta, handle)
    return folder, ids[cut:].astype(np.int64), characters


def environment(threads: int, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **extra}


def run_nanogpt(nanogpt: Path, work: Path, name: str, steps: int, eval_every: int, threads: int) -> dict[str, Any]:
    """nanoGPT's train.py in a folder of its own (links to its files, the prepared data): its
    per-iteration times (ms), its own validation estimates, and where its checkpoints are."""
    folder = work / name
    folder.mkdir()
    for file in ("train.py", "model.py", "configurator.py"):
        (folder / file).symlink_to(nanogpt / file)
    (folder / "data").symlink_to(work / "data")
    out_dir = folder / "out"
    (folder / "baby.py").write_text(NANOGPT_CONFIG.format(out_dir=str(out_dir), eval_every=eval_every, steps=steps))
    done = subprocess.run(
        [sys.executable, "train.py", "baby.py"], cwd=folder, env=environment(threads), capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"nanoGPT's train.py failed:\n{done.stderr[-3000:]}")
    times = [float(ms) for ms in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", done.stdout, re.M)]
    estimates = {
        int(step): float(val)
        for step, val in re.findall(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", done.stdout, re.M)
    }
    return {"ms": times[:steps], "estimates": estimates, "checkpoints": out_dir}


def run_engine(job: str, text: Path, work: Path, name: str, threads: int, overrides: list[str]) -> dict[str, Any]:
    # nanoGPT's folder is on the import path for its model (shakespeare_char_nanogpt_model.toml).
    """The engine's `job` on the text: its step times (ms), its validations, its run directory."""
    runs = work / "runs"
    command = [
        sys.executable, "-m", "engine", "run", str(HERE / job),
        "--set", f"data.path={text}", "--set", f"run_name={name}", "--set", f"runs_dir={runs}",
        "--set", "checkpoint.keep_last=1000", "--set", "checkpoint.keep_best=0",
        "--plugin", f"{HERE / 'step_times.py'}:StepTimes", "--block", "progress",
        *[item for override in overrides for item in ("--set", override)],
    ]  # fmt: skip
    path = os.pathsep.join([str(REPO), str(HERE), os.environ.get("NANOGPT_DIR", ""), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(command, cwd=HERE, env=environment(threads, PYTHONPATH=path), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the engine's run {name} failed:\n{done.stderr[-3000:]}")
    run_dir = runs / name
    times = json.loads((run_dir / "step_times.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validations = {line["step"]: line["val_loss"] for line in lines if "val_loss" in line}
    chosen = [line for line in done.stdout.splitlines() if line.startswith("accelerate auto:")]
    return {"ms": [t * 1000 for t in times], "estimates": validations, "run_dir": run_dir, "auto": chosen}


@torch.inference_mode()
def every_window_loss(logits_of, val: np.ndarray) -> float:
    """The mean cross-entropy over every non-overlapping window of the validation ids."""
    starts = np.arange((len(val) - 1) // BLOCK) * BLOCK
    total, count = 0.0, 0
    for first in range(0, len(starts), 128):
        chosen = starts[first : first + 128]
        windows = torch.from_numpy(val[chosen[:, None] + np.arange(BLOCK + 1)])
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        logits = logits_of(x, y)
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
        ).item()
        count += y.numel()
    return total / count


def engine_losses(run_dir: Path, val: np.ndarray, every: int) -> dict[int, float]:
    """Every-window validation loss of each step checkpoint of an engine run at a multiple of `every`."""
    # The run's model, its architecture from its config.toml, which names code of ours (the
    # step_times plugin, nanoGPT's model): a run we trust.
    module = engine.load(run_dir, trust=True)
    takes_targets = bool(engine.load_config(run_dir / "config.toml")[0]["model"]["targets"])
    found: dict[Any, float] = {"model": f"{type(module).__module__}.{type(module).__qualname__}"}
    for path in sorted((run_dir / "checkpoints").glob("step-*.pt")):
        step = int(path.stem.split("-")[1])
        if step % every:
            continue
        module.load_state_dict(engine.runs.load(path, engine.runs.CHECKPOINT_FORMAT)["model"])
        module.eval()
        found[step] = every_window_loss(lambda x, y: module(x, y)[0] if takes_targets else module(x), val)
    return found


def nanogpt_losses(nanogpt: Path, checkpoints: Path, val: np.ndarray, vocabulary: int) -> dict[int, float]:
    """Every-window validation loss of each of nanoGPT's kept checkpoints, its own model called."""
    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig  # nanoGPT's

    config = GPTConfig(
        block_size=BLOCK, vocab_size=vocabulary, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False
    )
    model = GPT(config).eval()
    found: dict[Any, float] = {"model": f"{GPT.__module__}.{GPT.__qualname__}"}
    for path in sorted(checkpoints.glob("model-*.pt"), key=lambda p: int(p.stem.split("-")[1])):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        found[int(path.stem.split("-")[1])] = every_window_loss(lambda x, y: model(x, y)[0], val)
    return found


def median_ms(times: list[float], skip: int = 10) -> float:
    return statistics.median(times[skip:])


def interleaved(args: argparse.Namespace, work: Path) -> dict[str, list[float]]:
    """Short runs of nanoGPT and of the engine in turn, `args.rounds` each: each one's median step."""
    found: dict[str, list[float]] = {"nanogpt": [], "engine": []}
    for index in range(args.rounds):
        nanogpt = run_nanogpt(args.nanogpt, work, f"nanogpt-round-{index}", args.round_steps, 10**6, args.threads)
        found["nanogpt"].append(median_ms(nanogpt["ms"]))
        overrides = [f"max_steps={args.round_steps}", "val_every_steps=0"]
        ours = run_engine("shakespeare_char.toml", args.text, work, f"round-{index}", args.threads, overrides)
        found["engine"].append(median_ms(ours["ms"]))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, required=True, help="a text file (tiny Shakespeare: nanoGPT's input.txt)")
    parser.add_argument("--nanogpt", type=Path, default=os.environ.get("NANOGPT_DIR"), help="nanoGPT's folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (0: none)")
    parser.add_argument("--round-steps", type=int, default=150)
    parser.add_argument("--auto", action="store_true", help="also run the job with accelerate.name = auto")
    parser.add_argument("--out", type=Path, default=Path("compare_nanogpt.json"))
    args = parser.parse_args()
    if args.rounds and args.round_steps <= 100:
        parser.error("--round-steps: more than the 100 warm-up steps of nanoGPT's schedule, which divides by the rest")
    if args.nanogpt is None or not (args.nanogpt / "train.py").is_file():
        parser.error("--nanogpt: the folder of nanoGPT's repository (with train.py), or set NANOGPT_DIR")
    args.nanogpt, args.text = args.nanogpt.resolve(), args.text.resolve()
    os.environ["NANOGPT_DIR"] = str(args.nanogpt)  # for the engine's runs of its model
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"threads": args.threads, "steps": args.steps, "started": time.strftime("%F %T")}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        _, val, vocabulary = prepare(args.text, work)
        steps = [
            f"max_steps={args.steps}",
            f"val_every_steps={args.eval_every}",
            f"checkpoint.every_steps={args.eval_every}",
        ]
        runs = {
            "nanoGPT train.py": run_nanogpt(args.nanogpt, work, "nanogpt", args.steps, args.eval_every, args.threads),
            "engine, gpt": run_engine("shakespeare_char.toml", args.text, work, "gpt", args.threads, steps),
            "engine, nanoGPT's model.GPT": run_engine(
                "shakespeare_char_nanogpt_model.toml", args.text, work, "nanogpt-model", args.threads, steps
            ),
        }  # fmt: skip
        if args.auto:
            auto = [*steps, "accelerate.name=auto"]
            runs["engine, gpt, accelerate auto"] = run_engine(
                "shakespeare_char.toml", args.text, work, "auto", args.threads, auto
            )
        for run in runs.values():
            if "checkpoints" in run:
                run["every_window"] = nanogpt_losses(args.nanogpt, run["checkpoints"], val, len(vocabulary))
            else:
                run["every_window"] = engine_losses(run["run_dir"], val, args.eval_every)
        results["runs"] = {
            name: {key: run[key] for key in ("estimates", "every_window", "auto") if key in run}
            | {"ms_per_step": median_ms(run["ms"])}
            for name, run in runs.items()
        }
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # kept should the rounds fail
        if args.rounds:
            results["interleaved_ms_per_step"] = interleaved(args, work)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results)
    return 0


def print_tables(results: dict[str, Any]) -> None:
    runs = results["runs"]
    names = list(runs)
    print("| step | " + " | ".join(f"{name}: every window (own estimate)" for name in names) + " |")
    print("|---:|" + "---:|" * len(names))
    steps = sorted({int(step) for run in runs.values() for step in run["every_window"] if str(step).isdigit()})
    for step in steps:
        cells = []
        for run in runs.values():
            every = run["every_window"].get(step, run["every_window"].get(str(step)))
            own = run["estimates"].get(step, run["estimates"].get(str(step)))
            cells.append(("—" if every is None else f"{every:.4f}") + ("" if own is None else f" ({own:.4f})"))
        print(f"| {step} | " + " | ".join(cells) + " |")
    print()
    print("| run | ms per step (median, whole run) |")
    print("|---|---:|")
    for name, run in runs.items():
        print(f"| {name} | {run['ms_per_step']:.1f} |")
    if "interleaved_ms_per_step" in results:
        rounds = results["interleaved_ms_per_step"]
        print()
        print(
            "| interleaved rounds | "
            + " | ".join(f"round {i + 1}" for i in range(len(rounds["nanogpt"])))
            + " | median |"
        )
        print("|---|" + "---:|" * (len(rounds["nanogpt"]) + 1))
        for name, values in rounds.items():
            print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {statistics.median(values):.1f} |")
    for name, run in runs.items():
        print(f"\n{name}: model {run['every_window']['model']}", *run.get("auto", []), sep="\n")


if __name__ == "__main__":
    sys.exit(main())
