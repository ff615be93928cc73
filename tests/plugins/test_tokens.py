"""plugins/tokens: token files of every kind read alike and memory-mapped, windows at random positions
(seeded, exact on resume, sharded across processes) or in epochs, validation on the stream's tail
or its own file, the vocabulary inferred and saved, and a run killed with SIGKILL resumed exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_plugins.tokens.files import TokenFile

import engine
from tests.conftest import REPO

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


def ids(n: int = 3000, vocabulary: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(vocabulary, size=n).astype(np.uint16)


def job(path: Path, **data) -> dict:
    """A small GPT on the token file `path`, counted in steps."""
    return {
        "max_steps": 6,
        "run_name": "tokens",
        "data": {"name": "tokens", "path": str(path), "block_size": 8, "batch_size": 4, **data},
        "model": {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16},
        "loss": {"name": "cross_entropy"},
    }


def loaders(path: Path, rank: int = 0, world_size: int = 1, **data) -> engine.Loaders:
    trainer = engine.setup(job(path, **data))
    if world_size == 1:
        return trainer.loaders
    plugins = engine.make_plugins()
    source = engine.build_component(trainer.config, plugins, "data", seed=42, device=torch.device("cpu"), inferred={})
    return plugins.hook.build_loaders(
        data=source, config=trainer.config, seed=42, device=torch.device("cpu"), rank=rank, world_size=world_size
    )


@pytest.fixture
def bin_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.bin"
    ids().tofile(path)
    return path


def test_every_kind_of_token_file_reads_the_same_ids_memory_mapped(tmp_path, bin_file):
    tokens = ids()
    np.save(tmp_path / "ids.npy", tokens.astype(np.int32))
    np.savez(tmp_path / "stored.npz", tokens=tokens)
    np.savez_compressed(tmp_path / "packed.npz", other=tokens[:5], tokens=tokens)
    cases = [
        (bin_file, {}),
        (tmp_path / "ids.npy", {}),
        (tmp_path / "stored.npz", {}),
        (tmp_path / "packed.npz", {"key": "tokens"}),
    ]
    first = None
    for path, data in cases:
        made = loaders(path, windows="sequential", shuffle=False, **data)
        batch = next(iter(made.train(1)))
        file = made.train_stream.tokens
        assert isinstance(file, TokenFile) and file.map is not None  # mapped, not read into memory
        # Compressed: spooled to a temporary file first, which is gone once mapped (nothing is left
        # in $TMPDIR however the run ends); the others are mapped where they lie.
        assert (file.path == path) == (path.name != "packed.npz") and file.path.exists() == (file.path == path)
        assert made.info == engine.DataInfo(8, 50, "sequence", len(tokens) // 8 - (len(tokens) % 8 == 0), 0)
        first = batch if first is None else first
        assert torch.equal(batch.x, first.x) and torch.equal(batch.y, first.y)
        made.close()
    assert first.x.tolist() == [tokens[i : i + 8].tolist() for i in range(0, 32, 8)]
    assert first.y.tolist() == [tokens[i + 1 : i + 9].tolist() for i in range(0, 32, 8)]


def test_random_windows_depend_only_on_the_seed_and_the_batchs_place(bin_file):
    made = loaders(bin_file)
    assert made.train_batches() is None and list(made.shares()) == [1.0]  # endless
    stream = made.train(1)
    batches = [next(stream) for _ in range(5)]
    again = next(loaders(bin_file).train(1, start=3))  # a resumed run, from batch 3
    assert torch.equal(again.x, batches[3].x)
    tokens = torch.from_numpy(ids().astype(np.int64))
    for index, batch in enumerate(batches):  # nanoGPT's get_batch, from a generator of (seed, batch)
        generator = torch.Generator().manual_seed(42 * 1_000_003 + index)
        positions = torch.randint(int(len(tokens) * 1.0) - 8, (4,), generator=generator)
        assert torch.equal(batch.x, torch.stack([tokens[i : i + 8] for i in positions]))
        assert torch.equal(batch.y, torch.stack([tokens[i + 1 : i + 9] for i in positions]))


def test_processes_take_their_piece_of_every_global_batch_of_windows(bin_file):
    one = loaders(bin_file)
    pieces = [loaders(bin_file, rank, 2) for rank in (0, 1)]
    for index in range(3):
        whole = next(one.train(1, start=index))
        parts = [next(piece.train(1, start=index)) for piece in pieces]
        assert torch.equal(torch.cat([part.x for part in parts]), whole.x)
    val = [loaders(bin_file, rank, 2, val_fraction=0.1) for rank in (0, 1)]
    together = [batch.x for made in val for batch in made.val()]
    assert torch.equal(torch.cat(together), torch.cat([b.x for b in loaders(bin_file, val_fraction=0.1).val()]))
    with pytest.raises(engine.ConfigError, match=r"^data.batch_size: 4 is the global batch, split over 3 processes"):
        loaders(bin_file, 0, 3)


def test_sequential_windows_make_epochs_in_a_seeded_order(bin_file):
    made = loaders(bin_file, windows="sequential", drop_last=True)
    windows = (3000 - 1) // 8
    assert made.train_batches() == windows // 4
    first, second = (torch.cat([batch.x for batch in made.train(epoch)]) for epoch in (1, 2))
    assert len(first) == windows // 4 * 4 and not torch.equal(first, second)
    assert torch.equal(torch.cat([batch.x for batch in made.train(1, start=2)]), first[8:])


def test_validation_is_the_streams_tail_or_its_own_file_over_every_window_or_a_fixed_set(tmp_path, bin_file):
    tokens = ids()
    made = loaders(bin_file, val_fraction=0.1)
    end = int(3000 * 0.9)
    assert len(made.train_stream) == end and made.info.n_val == (3000 - end - 1) // 8
    every = torch.cat([batch.x for batch in made.val()])
    assert every.tolist() == [tokens[end + i : end + i + 8].tolist() for i in range(0, 8 * made.info.n_val, 8)]
    fixed = loaders(bin_file, val_fraction=0.1, val_windows=5)
    first, second = ([batch.x for batch in fixed.val()] for _ in range(2))
    assert fixed.info.n_val == 5 and torch.equal(torch.cat(first), torch.cat(second))  # the same windows each time
    ids(500, seed=1).tofile(tmp_path / "val.bin")
    own = loaders(bin_file, val_path=str(tmp_path / "val.bin"), val_fraction=0.1)
    assert len(own.train_stream) == 3000 and own.info.n_val == (500 - 1) // 8


def test_a_text_file_a_character_a_token_with_its_vocabulary_saved_with_the_run(tmp_path):
    (tmp_path / "input.txt").write_text(TEXT)
    result = engine.run(job(tmp_path / "input.txt", tokenizer="char"))
    vocabulary = tuple(sorted(set(TEXT)))
    assert result.config["inferred"]["classes"] == vocabulary
    recorded = engine.load_config(result.run_dir / "config.toml")[0]
    assert recorded["inferred"]["classes"] == vocabulary and recorded["inferred"]["n_outputs"] == len(vocabulary)
    first = engine.setup({**job(tmp_path / "input.txt", tokenizer="char"), "run_name": "again"}).loaders.sample()
    assert "".join(vocabulary[i] for i in first.x[0].tolist()) == TEXT[:8]
    (tmp_path / "other.txt").write_text("Zebras are not in the vocabulary of a run on the text above.\n")
    another_file = {**job(tmp_path / "other.txt", tokenizer="char"), "inferred": {"classes": list(vocabulary)}}
    with pytest.raises(engine.ConfigError, match=r"^data.path: '.*other.txt' holds the character 'Z', which the"):
        engine.setup({**another_file, "run_name": "z"})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tokenizer": "ids", "file": "input.txt"}, r"^data.path: '.*input.txt' is not a file of token ids"),
        ({"batch_size": 0}, r"^data.batch_size: give the windows of a batch"),
        ({"block_size": 3000}, r"^data.block_size: 3000, but the training tokens are 3000"),
        (
            {"dtype": "int64", "file": "odd.bin"},
            r"has 6002 bytes, not a whole number of int64 token ids \(data.dtype\)$",
        ),
        ({"dtype": "int64"}, r"^data: the largest token id is \d+: are the ids of dtype int64 \(data.dtype\)\?$"),
    ],
)
def test_token_data_that_does_not_fit_is_one_line(tmp_path, bin_file, data, message):
    (tmp_path / "input.txt").write_text(TEXT)
    ids(3001).tofile(tmp_path / "odd.bin")
    settings = dict(data)
    path = tmp_path / settings.pop("file") if "file" in settings else bin_file
    with pytest.raises(engine.ConfigError, match=message):
        engine.setup(job(path, **settings))


def test_random_windows_need_max_steps(bin_file):
    endless = {key: value for key, value in job(bin_file).items() if key != "max_steps"}
    with pytest.raises(engine.ConfigError, match=r"^max_steps: required, the training data is endless"):
        engine.setup(endless)


def test_a_token_run_trains_validates_and_logs_by_steps(bin_file):
    result = engine.run(
        {**job(bin_file, val_fraction=0.1, val_windows=8), "val_every_steps": 3, "log": {"every_steps": 2}}
    )
    assert result.state.step == 6 and result.state.epoch == 1
    assert {"val_loss", "val_perplexity", "val_accuracy"} <= set(result.metrics)
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6] and "val_loss" in lines[1]


# --- exact resume of a random-window run after SIGKILL ----------------------------------------------

KILLER = """
import os, signal, time

import engine


@engine.hookimpl
def after_step(state):
    if state.step == int(os.environ.get("KILL_AT", 0)):
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_a_random_window_run_killed_with_sigkill_resumes_bit_for_bit(tmp_path, bin_file, monkeypatch):
    (tmp_path / "killer.py").write_text(KILLER)
    run = {
        **job(bin_file, val_fraction=0.1, val_windows=8),
        "max_steps": 12,
        "val_every_steps": 4,
        "log": {"every_steps": 2},
        "model": {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.1},
        "scheduler": {"name": "warmup_cosine", "warmup_steps": 3},
        "checkpoint": {"every_steps": 5},
        "plugins": ["killer.py"],
    }
    (tmp_path / "job.toml").write_text(engine.dump_toml(run))
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(tmp_path)
    whole = engine.run(tmp_path / "job.toml", overrides=["run_name=whole"])
    environment = {**os.environ, "PYTHONPATH": str(REPO), "KILL_AT": "8"}
    command = [sys.executable, "-m", "engine", "run", "job.toml", "--set", "run_name=killed"]
    killed = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = tmp_path / "runs" / "killed"
    assert sorted(path.name for path in (run_dir / "checkpoints").glob("step-*"))[-1] == "step-000000005.pt"
    resumed = engine.run(resume=run_dir, trust=True)  # its job names killer.py
    for name, weight in whole.model.state_dict().items():
        assert torch.equal(weight, resumed.model.state_dict()[name]), name

    def lines(run_dir: Path) -> list[dict]:
        rows = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [{key: value for key, value in json.loads(row).items() if key != "time"} for row in rows]

    assert lines(run_dir) == lines(whole.run_dir)


# --- resident memory: a token file larger than the pages a run keeps --------------------------------


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status here")


@pytest.mark.slow
def test_a_large_token_file_is_never_read_whole_into_memory(tmp_path):
    size = 256 * 2**20  # tokens of uint16: 512 MiB
    path = tmp_path / "large.bin"
    chunk = np.arange(2**20, dtype=np.uint16) % 1000
    with open(path, "wb") as handle:
        for _ in range(size // len(chunk)):
            chunk.tofile(handle)
    settings = {"windows": "sequential", "batch_size": 64, "block_size": 512, "val_fraction": 0.01}
    small = tmp_path / "small.bin"
    ids(100_000, vocabulary=1000).tofile(small)
    # What setting up such a run imports, and the sample check's activations, before measuring.
    engine.setup({**job(small, **settings), "run_name": "imports"}).loaders.close()
    before = resident_mb()
    trainer = engine.setup(job(path, **settings))
    made = trainer.loaders
    for index, _ in enumerate(made.train(1)):  # a tenth of the file's windows, and the whole validation
        if index == 800:
            break
    list(made.val())
    grown = resident_mb() - before
    assert made.info.n_outputs == 1000  # the largest id was read over the whole file
    assert grown < 64, f"resident memory grew by {grown:.0f} MB reading a 512 MiB token file"
