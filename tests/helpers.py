"""Shared test helpers: the hand-written PyTorch loops used as oracles, a hook recorder, and small
user components that jobs reference as ``"tests.helpers:factory"``."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import engine

# A short job for tests where the oracle is not at stake: few epochs, a named run.
QUICK: dict[str, Any] = {"epochs": 3, "run_name": "quick"}


def job(**sections: Any) -> dict[str, Any]:
    """QUICK merged with `sections` (``job(epochs=5, loss={"name": "l1"})``)."""
    return {**QUICK, **sections}


# --- the oracles: the tutorial's loop, written by hand -------------------------------------------


def tutorial_data(seed: int = 42, n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    np.random.seed(seed)
    x = np.random.randn(n, 1)
    y = 2 * x + 3 + 0.1 * np.random.randn(n, 1)
    return torch.from_numpy(x).float(), torch.from_numpy(y).float()


def tutorial_loop(epochs: int = 1000, lr: float = 0.01) -> tuple[float, nn.Linear]:
    """The classic tutorial, verbatim: its last loss and the trained model."""
    x, y = tutorial_data()
    torch.manual_seed(42)
    model = nn.Linear(1, 1)
    criterion = nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        outputs = model(x)
        loss = criterion(outputs, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item(), model


def classification_data(
    seed: int, n_samples: int, n_features: int, n_classes: int, separation: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs, generated the way the `classification` dataset documents it."""
    rng = np.random.RandomState(seed)
    centres = rng.randn(n_classes, n_features) * separation
    y = rng.randint(n_classes, size=n_samples)
    x = centres[y] + rng.randn(n_samples, n_features)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The documented shuffle: one permutation per epoch from a generator seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


# --- plugins for tests ---------------------------------------------------------------------------


class Recorder:
    """Records every hook the engine calls, in order, with the loop position."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.modes: list[tuple[str, bool, bool]] = []  # (hook, model.training, inference mode)
        self.lrs: list[float] = []  # the rate each training step ran with
        self.epoch_lrs: list[float] = []  # at each epoch's end: the rate the next epoch starts with

    def _mode(self, hook: str, trainer: engine.Trainer) -> None:
        self.modes.append((hook, trainer.model.training, torch.is_inference_mode_enabled()))

    @engine.hookimpl
    def on_run_start(self, trainer):
        self.calls.append("on_run_start")

    @engine.hookimpl
    def before_forward(self, batch, trainer):
        self.calls.append("before_forward")
        self._mode("before_forward", trainer)
        if trainer.model.training:
            self.lrs.append(trainer.optimizer.param_groups[0]["lr"])

    @engine.hookimpl
    def compute_loss(self, trainer):
        self.calls.append("compute_loss")

    @engine.hookimpl
    def before_optimizer_step(self, trainer):
        self.calls.append("before_optimizer_step")

    @engine.hookimpl
    def after_step(self, state, trainer):
        self.calls.append("after_step")

    @engine.hookimpl
    def compute_metrics(self, trainer):
        self.calls.append("compute_metrics")
        self._mode("compute_metrics", trainer)

    @engine.hookimpl
    def on_epoch_end(self, trainer):
        self.calls.append("on_epoch_end")
        self.epoch_lrs.append(trainer.optimizer.param_groups[0]["lr"])
        self._mode("on_epoch_end", trainer)

    @engine.hookimpl
    def on_log(self, metrics):
        self.calls.append("on_log")

    @engine.hookimpl
    def on_run_end(self, error):
        self.calls.append("on_run_end")


class LossOnly:
    """A stand-in for the built-in `losses` plugin: one loss component, `"sq"`, and its default."""

    @engine.hookimpl
    def register_components(self):
        return {"loss": {"sq": lambda: lambda output, target: ((output - target) ** 2).mean()}}


# --- user components referenced as "tests.helpers:..." -------------------------------------------


class Scaled(nn.Module):
    def __init__(self, n_in: int, n_out: int, scale: float) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


def scaled_model(info: engine.DataInfo, scale: float = 1.0) -> nn.Module:
    """A user model: its `scale` parameter becomes the setting ``model.scale``."""
    return Scaled(info.n_features, info.n_outputs, scale)


class Flat(nn.Module):
    def __init__(self, n_in: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)  # [N]: does not fit a [N, 1] target


def flat_model(info: engine.DataInfo) -> nn.Module:
    return Flat(info.n_features)


def broken_model(info: engine.DataInfo) -> nn.Module:
    raise ValueError("no weights file")


class Pairs(torch.utils.data.Dataset):
    """A map-style Dataset of (x, y) samples."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: list[str] | None = None) -> None:
        self.x, self.y = x, y
        if classes is not None:
            self.classes = classes

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


def blobs_dataset(seed: int, n_samples: int = 96, n_classes: int = 3) -> Pairs:
    """A user Dataset for classification (goes through DataLoader)."""
    x, y = classification_data(seed, n_samples, 4, n_classes, 3.0)
    return Pairs(x, y)


def scalar_target_dataset(seed: int) -> Pairs:
    """Regression samples whose target is a scalar: batches have y of shape [N]."""
    x, y = tutorial_data(seed, 40)
    return Pairs(x, y[:, 0])


def bar_images(seed: int, n_samples: int = 96, size: int = 8, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x C x size x size, pixels 0 to 16 as digits' are) of a bar at a random place on
    noise: horizontal (class 0), vertical (1) or both (2), what a small CNN tells apart and a
    shift of a pixel keeps."""
    rng = np.random.RandomState(seed)
    y = rng.randint(3, size=n_samples)
    x = rng.uniform(0, 4, size=(n_samples, channels, size, size))
    where = rng.randint(1, size - 1, size=(n_samples, 2))
    for i, (label, (row, column)) in enumerate(zip(y, where)):
        if label in (0, 2):
            x[i, :, row, :] = 16
        if label in (1, 2):
            x[i, :, :, column] = 16
    return x.astype(np.float32), y.astype(np.int64)


def bars_dataset(seed: int, n_samples: int = 48) -> Pairs:
    """A user Dataset of images (C x H x W samples, through DataLoader)."""
    x, y = bar_images(seed, n_samples)
    return Pairs(torch.from_numpy(x), torch.from_numpy(y))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def labelled_dataset(seed: int, labels: tuple[float, ...] = (0, 1, 2), n_samples: int = 40) -> Pairs:
    """A Dataset whose targets cycle through `labels` (as given: ints or floats); the last sample
    alone has label 3, a class that a split may hold without the training data."""
    y = torch.tensor([labels[i % len(labels)] for i in range(n_samples - 1)] + [3])
    x = torch.randn(n_samples, 4, generator=torch.Generator().manual_seed(seed))
    return Pairs(x, y)


def rewind(run_dir: Path, step: int, to: Path) -> Path:
    """A copy of the run at `to`, as a run killed soon after its checkpoint of `step` leaves its
    directory: the later checkpoints gone (the best ones and model.pt stay, as a resume must
    replace them). ``engine.run(resume=to)`` then continues from that checkpoint."""
    import shutil

    shutil.copytree(run_dir, to)
    later = [path for path in (to / "checkpoints").glob("step-*.pt") if int(path.stem.split("-")[1]) > step]
    for path in later:
        path.unlink()
    assert (to / "checkpoints" / f"step-{step:09d}.pt").is_file(), f"run '{run_dir}' has no checkpoint of step {step}"
    return to


# --- a sequence task: token ids in, a class per position out ---------------------------------------


def next_tokens(seed: int, n_samples: int = 64, length: int = 6, vocab: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [N, T] and their targets [N, T]: each position's next token, (x + 1) mod `vocab`."""
    rng = np.random.RandomState(seed)
    x = rng.randint(vocab, size=(n_samples, length)).astype(np.int64)
    return x, (x + 1) % vocab


def next_tokens_dataset(seed: int, n_samples: int = 64) -> Pairs:
    """`next_tokens` as a Dataset: each sample a [T] sequence and its [T] targets."""
    x, y = next_tokens(seed, n_samples)
    return Pairs(torch.from_numpy(x), torch.from_numpy(y))


def token_model(info: engine.DataInfo, width: int = 16) -> nn.Module:
    """Embedding then a linear head: [N, T] token ids in, [N, T, vocabulary] logits out."""
    return nn.Sequential(nn.Embedding(info.n_outputs, width), nn.Linear(width, info.n_outputs))


class TargetsInForward(nn.Module):
    """A model with nanoGPT's calling convention, ``forward(idx, targets=None) -> (logits, loss)``:
    every position's logits and their cross-entropy (padding -1 ignored) when given the targets,
    else the last position's logits alone, [N, 1, vocabulary] (its shortcut for sampling)."""

    def __init__(self, vocabulary: int, width: int = 16) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocabulary, width), nn.Linear(width, vocabulary)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        logits = self.head(self.embed(idx))
        if targets is None:
            return logits[:, [-1], :], None
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return logits, loss


def targets_in_forward(info: engine.DataInfo, width: int = 16) -> TargetsInForward:
    return TargetsInForward(info.n_outputs, width)


@dataclass
class LanguageModelOutput:
    """What a model of Hugging Face's convention returns: a dataclass with the loss and the logits."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class LabelsKeyword(nn.Module):
    """A model with Hugging Face's calling convention: ``forward(input_ids, attention_mask=None,
    labels=None)`` returning a `LanguageModelOutput`."""

    def __init__(self, vocabulary: int, width: int = 16) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocabulary, width), nn.Linear(width, vocabulary)

    def forward(self, input_ids, attention_mask=None, labels=None) -> LanguageModelOutput:
        hidden = self.embed(input_ids)
        if attention_mask is not None:
            hidden = hidden * attention_mask[..., None]
        logits = self.head(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return LanguageModelOutput(loss, logits)


def labels_keyword(info: engine.DataInfo, width: int = 16) -> LabelsKeyword:
    return LabelsKeyword(info.n_outputs, width)


class TokenDicts(torch.utils.data.Dataset):
    """`next_tokens` as a Dataset of dict samples: ``input_ids``, ``attention_mask``, ``labels``."""

    def __init__(self, seed: int, n_samples: int = 64) -> None:
        x, y = next_tokens(seed, n_samples)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[index], "attention_mask": torch.ones(len(self.x[index])), "labels": self.y[index]}


def normed_token_model(info: engine.DataInfo, width: int = 8) -> nn.Module:
    """Embedding, LayerNorm, a linear head: parameters of 1 and 2 dimensions, for weight decay's groups."""
    return nn.Sequential(nn.Embedding(info.n_outputs, width), nn.LayerNorm(width), nn.Linear(width, info.n_outputs))


# --- forged files: what a run directory received from elsewhere may hold ----------------------------


class Payload:
    """What a forged file runs if it is unpickled: a marker file."""

    def __init__(self, marker: Path | str) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def forged_program(source: Path, target: Path, marker: Path | str) -> None:
    """`source` (a torch.export archive) with its first weight replaced by a pickle that runs
    `Payload`, which torch.export.load unpickles with weights_only=False as the archive says."""
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config_name = next(name for name in members if name.endswith("_weights_config.json"))
    config = json.loads(members[config_name])
    entry = next(iter(config["config"].values()))
    entry["use_pickle"] = True
    members[config_name] = json.dumps(config).encode()
    buffer = io.BytesIO()
    torch.save({"weight": Payload(marker)}, buffer)
    members[f"{config_name.rsplit('/', 1)[0]}/{entry['path_name']}"] = buffer.getvalue()
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
