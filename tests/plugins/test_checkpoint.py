"""plugins/checkpoint.py: the triggers, what is kept, the best checkpoints, the final model and
`engine.load`; what a checkpoint holds and that it loads without running code."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from engine_plugins import checkpoint as checkpoint_plugin

import engine
from tests.helpers import job, read_json

runs = engine.runs


def steps(run_dir) -> list[int]:
    return [step for step, _ in checkpoint_plugin.numbered(run_dir, "step")]


def test_by_default_the_run_keeps_its_final_checkpoint_and_model():
    result = engine.run(job(epochs=5))
    assert steps(result.run_dir) == [5]
    saved = runs.load(result.run_dir / "model.pt", runs.MODEL_FORMAT)
    for name, weight in result.model.state_dict().items():
        assert torch.equal(saved["model"][name], weight)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"every_steps": 4, "keep_last": 10}, [4, 8, 12, 16, 20, 24]),  # 24 steps in all: the end is step 24
        ({"every_epochs": 2, "keep_last": 10}, [8, 16, 24]),
        ({"every_steps": 5, "keep_last": 2}, [20, 24]),
        ({"every_steps": 5, "every_epochs": 3, "keep_last": 10}, [5, 10, 12, 15, 20, 24]),
    ],
)
def test_each_trigger_fires_on_its_own_and_keep_last_prunes(settings, expected):
    # 6 epochs of 4 batches (100 samples in batches of 25); no validation, so no best checkpoints.
    result = engine.run(job(epochs=6, data={"batch_size": 25}, checkpoint={"every_seconds": 0.0, **settings}))
    assert steps(result.run_dir) == expected


def test_the_time_trigger_fires_at_step_boundaries(monkeypatch):
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(checkpoint_plugin, "time", SimpleNamespace(monotonic=lambda: clock.now))

    class Slow:  # a step takes a quarter of a second of the plugin's clock, whatever the machine's speed
        @engine.hookimpl
        def after_step(self):
            clock.now += 0.25

    result = engine.run(
        job(epochs=2, data={"batch_size": 10}, checkpoint={"every_seconds": 1.0, "keep_last": 50}), plugins=[Slow]
    )
    assert steps(result.run_dir) == [4, 8, 12, 16, 20]  # once a second has passed, and the end


def test_a_checkpoint_holds_everything_a_resumed_run_needs_and_loads_without_pickled_code():
    result = engine.run(
        job(
            epochs=3,
            data={"name": "classification", "n_samples": 64, "batch_size": 16},
            model={"name": "mlp", "hidden": [8]},
            loss={"name": "cross_entropy"},
            scheduler={"name": "warmup_cosine", "warmup_steps": 3},
            precision={"name": "16-mixed"},
        )
    )
    path = checkpoint_plugin.Checkpoints().find_checkpoint(result.run_dir, "last")
    saved = torch.load(path, weights_only=True)  # raises on anything but tensors and plain values
    assert saved["format"] == runs.CHECKPOINT_FORMAT
    assert set(saved) == {
        "format",
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "state",
        "evaluated",
        "plugins",
        "course",
    }
    assert saved["evaluated"] is None  # validation evaluates the trained model here (no average)
    assert saved["course"]["config"]["precision.name"] == "16-mixed"  # what it trains with: engine/resuming.py
    assert saved["course"]["sizes"] == {"n_train": 64, "n_val": 0, "n_test": 0, "batches_per_epoch": 4}
    assert saved["scheduler"]["last_epoch"] == 12 and saved["scaler"]["scale"] > 0
    assert saved["state"]["epoch"] == 4 and saved["state"]["step"] == 12
    assert set(saved["state"]["rng"]) >= {"python", "numpy", "torch"}
    assert set(saved["plugins"]) == {"metrics_file", "checkpoint"}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_file_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as handle:
        pickle.dump({"format": runs.CHECKPOINT_FORMAT, "x": Payload()}, handle)
    with pytest.raises(engine.ConfigError, match=r"evil.pt' is not a readable engine.checkpoint/3 file"):
        runs.load(bad, runs.CHECKPOINT_FORMAT)


BEST_JOB = job(
    epochs=8,
    data={"name": "classification", "n_samples": 120, "batch_size": 20, "val_fraction": 0.25},
    model={"name": "mlp", "hidden": [16]},
    loss={"name": "cross_entropy"},
    optimizer={"lr": 0.05},
)


class ValLosses:
    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    @engine.hookimpl
    def on_epoch_end(self, state):
        self.by_step[state.step] = state.val_metrics["val_loss"]


@pytest.mark.parametrize(("mode", "keep"), [("min", 1), ("min", 3), ("max", 2)])
def test_the_best_checkpoints_are_ranked_by_the_monitored_metric(mode, keep):
    seen = ValLosses()
    result = engine.run(
        {**BEST_JOB, "checkpoint": {"every_seconds": 0.0, "monitor": "val_loss", "mode": mode, "keep_best": keep}},
        plugins=[seen],
    )
    ranked = sorted(seen.by_step.items(), key=lambda item: item[1], reverse=mode == "max")[:keep]
    index = json.loads((result.run_dir / "checkpoints" / "best.json").read_text())  # JSON a reader can use
    assert (index["monitor"], index["mode"]) == ("val_loss", mode)
    assert [(entry["step"], entry["value"]) for entry in index["ranking"]] == ranked
    assert [step for step, _ in checkpoint_plugin.numbered(result.run_dir, "best")] == sorted(
        step for step, _ in ranked
    )
    best = engine.load(result.run_dir, which="best")
    saved = torch.load(result.run_dir / "checkpoints" / f"best-{ranked[0][0]:09d}.pt", weights_only=True)
    for name, weight in best.state_dict().items():
        assert torch.equal(weight, saved["model"][name])


def test_engine_load_rebuilds_the_model_without_the_data(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    np.savez(tmp_path / "train.npz", x=x, y=(x @ rng.normal(size=(5, 2))).astype("float32"))
    result = engine.run(
        job(epochs=4, data={"name": "npz", "path": "train.npz"}, model={"name": "mlp", "hidden": [6]}, run_name="npz")
    )
    (tmp_path / "train.npz").unlink()  # the config records the sizes; the data is not needed
    final = engine.load("runs/npz")
    assert not final.training and not result.model.training  # both in eval mode
    for (name, mine), (_, theirs) in zip(final.state_dict().items(), result.model.state_dict().items()):
        assert torch.equal(mine, theirs), name
    last = engine.load("runs/npz", which="last")
    assert torch.equal(last[0].weight, final[0].weight)
    config = (result.run_dir / "config.toml").read_text()
    assert '[inferred]\nn_features = 5\nn_outputs = 2\ntask = "regression"' in config


@pytest.mark.parametrize(
    ("setup", "which", "message"),
    [
        (lambda: None, "final", "'nowhere' is not a run directory (it has no config.toml)"),
        (lambda: engine.run(job(epochs=2, run_name="plain")), "best", "has no best checkpoint"),
        (
            lambda: engine.run(job(epochs=2, run_name="plain")),
            "latest",
            "which: expected one of 'final', 'best', 'last', got 'latest'",
        ),
    ],
)
def test_engine_load_names_what_is_missing(setup, which, message):
    setup()
    with pytest.raises(engine.ConfigError, match=re.escape(message)):
        engine.load("runs/plain" if which != "final" else "nowhere", which=which)


def test_a_failed_run_keeps_its_checkpoints_but_writes_no_model():
    class FailAtNine:
        @engine.hookimpl
        def after_step(self, state):
            if state.step == 9:
                raise RuntimeError("disk on fire")

    with pytest.raises(engine.TrainingError, match="disk on fire"):
        engine.run(job(epochs=20, checkpoint={"every_steps": 4, "every_seconds": 0.0}), plugins=[FailAtNine])
    assert steps(Path("runs/quick")) == [4, 8]
    assert not (Path("runs/quick") / "model.pt").exists()
    assert read_json(Path("runs/quick/summary.json"))["status"] == "failed"


def test_checkpoint_settings_are_checked():
    with pytest.raises(engine.ConfigError, match=r"checkpoint.mode: expected one of 'min', 'max', got 'minimum'"):
        engine.load_config(job(checkpoint={"mode": "minimum"}))
    with pytest.raises(engine.ConfigError, match=r"checkpoint.keep_last: must be >= 1, got 0"):
        engine.load_config(job(checkpoint={"keep_last": 0}))


def test_a_monitor_the_run_does_not_produce_is_named():
    job = {"epochs": 3, "run_name": "typo", "data": {"val_fraction": 0.2}, "checkpoint": {"keep_best": 1}}
    with pytest.raises(engine.TrainingError, match=r"checkpoint.monitor: 'val_los' is not a metric of this run \("):
        engine.run({**job, "checkpoint": {"keep_best": 1, "monitor": "val_los"}})


def test_a_step_trigger_inside_an_accumulation_window_waits_for_its_end():
    # 4 batches an epoch in windows of 3 and 1: step 2 falls inside the first window, step 4 ends one.
    result = engine.run(
        job(
            epochs=2,
            grad_accumulation=3,
            data={"batch_size": 25},
            checkpoint={"every_steps": 2, "every_seconds": 0.0, "keep_last": 10},
        )
    )
    assert steps(result.run_dir) == [3, 4, 7, 8]
    saved = runs.load(checkpoint_plugin.checkpoint_path(result.run_dir, "step", 3), runs.CHECKPOINT_FORMAT)
    assert (saved["state"]["epoch"], saved["state"]["batch"]) == (1, 3)


def test_find_checkpoint_answers_last_and_best():
    result = engine.run({**BEST_JOB, "checkpoint": {"every_seconds": 0.0, "every_steps": 4, "keep_best": 2}})
    found = engine.make_plugins().hook.find_checkpoint
    ranking = read_json(result.run_dir / "checkpoints" / "best.json")["ranking"]
    assert found(run_dir=result.run_dir, which="last") == checkpoint_plugin.checkpoint_path(result.run_dir, "step", 40)
    assert found(run_dir=result.run_dir, which="best") == result.run_dir / "checkpoints" / ranking[0]["file"]
    assert ranking[0]["value"] <= ranking[1]["value"] and ranking[0]["step"] != 40  # the run overfits
    plain = engine.run(job(epochs=2, run_name="plain", checkpoint={"keep_best": 0}))
    assert found(run_dir=plain.run_dir, which="best") is None  # no validation: no best checkpoint
    assert found(run_dir=Path("nowhere"), which="last") is None


def test_without_the_checkpoint_plugin_the_run_keeps_its_model_and_engine_load_works():
    result = engine.run(job(epochs=3, run_name="bare"), blocked=["checkpoint"])
    assert sorted(path.name for path in result.run_dir.iterdir()) == [
        ".lock",
        "config.toml",
        "metrics.jsonl",
        "model.pt",
        "summary.json",
    ]
    assert read_json(result.run_dir / "summary.json")["status"] == "completed"
    assert torch.equal(engine.load(result.run_dir).weight, result.model.weight)
    with pytest.raises(engine.ConfigError, match=r"^run 'runs/bare' has no last checkpoint$"):
        engine.load(result.run_dir, which="last")
    with pytest.raises(engine.ConfigError, match=r"^--resume: no plugin implements find_checkpoint"):
        engine.setup(resume=result.run_dir, blocked=["checkpoint"])


def test_a_checkpoint_holds_the_state_other_plugins_updated_in_the_same_step_whatever_their_order(tmp_path):
    """The checkpoint's step and epoch hooks run last, so a plugin registered after it (which pluggy
    calls first otherwise) has updated its state when the checkpoint is taken: an average resumed
    from a mid-run checkpoint ends as the uninterrupted run's, bit for bit."""
    from engine_plugins.ema import WeightAveraging

    from tests.helpers import rewind

    whole = WeightAveraging()  # the checkpoint registered after it
    job_ = {"epochs": 4, "run_name": "whole", "ema": {"decay": 0.5}, "checkpoint": {"every_steps": 1, "keep_last": 9}}
    engine.run(job_, plugins=[whole, checkpoint_plugin.Checkpoints()], blocked=["ema", "checkpoint"])
    rewound = rewind(Path("runs/whole"), 2, tmp_path / "rewound")
    resumed = WeightAveraging()
    engine.run(resume=rewound, plugins=[resumed, checkpoint_plugin.Checkpoints()], blocked=["ema", "checkpoint"])
    for name, value in whole.average.state_dict().items():
        assert torch.equal(resumed.average.state_dict()[name], value), name


# --- the folder stays the run's ------------------------------------------------------------------


def test_a_checkpoints_folder_that_is_a_link_out_of_the_run_is_refused_and_nothing_there_deleted(tmp_path):
    """keep_last prunes old checkpoints: through a link it would delete another folder's files."""
    result = engine.run(job(epochs=3, checkpoint={"every_steps": 1}))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in ("step-000000001.pt", "step-000000002.pt", "notes.txt"):
        (outside / name).write_text("precious\n")
    (result.run_dir / "checkpoints").rename(tmp_path / "moved")
    (result.run_dir / "checkpoints").symlink_to(outside)
    with pytest.raises(engine.ConfigError, match=r"^checkpoint '.*step-000000002.pt' is outside run '.*quick'$"):
        engine.setup(resume=result.run_dir)  # what it would continue from is not the run's
    for name in ("step-000000001.pt", "step-000000002.pt"):
        (outside / name).unlink()
    # Nothing to continue from there: resume = "auto" starts the run again in its directory, whose
    # checkpoints/ is refused before anything is pruned or written through it.
    (outside / "best-000000009.pt").write_text("precious\n")  # what pruning a fresh start would delete
    with pytest.raises(
        engine.TrainingError, match=r"checkpoint' failed in hook on_run_start: .*checkpoints' is a link"
    ):
        engine.run(job(epochs=3, resume="auto"))
    assert sorted(path.read_text() for path in outside.iterdir()) == ["precious\n"] * 2
    assert read_json(result.run_dir / "summary.json")["status"] == "failed"


@pytest.mark.parametrize("name", ["../../victim.pt", "/tmp/victim.pt", "step-000000003.pt", 3])
def test_a_ranking_that_names_what_is_not_a_best_checkpoint_of_the_folder_is_refused(name):
    result = engine.run(job(epochs=3, data={"val_fraction": 0.2}))
    ranking = result.run_dir / "checkpoints" / "best.json"
    recorded = read_json(ranking)
    recorded["ranking"][0]["file"] = name
    ranking.write_text(json.dumps(recorded))
    with pytest.raises(engine.ConfigError, match=r"best.json' ranks .* which is not a best checkpoint's file name"):
        engine.load(result.run_dir, which="best")


def test_a_checkpoint_whose_ranking_names_a_file_outside_the_folder_is_refused_before_anything_is_deleted(tmp_path):
    """The ranking a checkpoint carries decides what the resumed run deletes when it drops one."""
    result = engine.run(job(epochs=3, data={"val_fraction": 0.2}, checkpoint={"keep_last": 5}))
    victim = tmp_path / "victim.pt"
    victim.write_text("precious\n")
    [last] = [path for _, path in checkpoint_plugin.numbered(result.run_dir, "step")][-1:]
    saved = runs.load(last, runs.CHECKPOINT_FORMAT)
    saved["plugins"]["checkpoint"]["best"][0]["file"] = "../../../victim.pt"
    runs.save(saved, last)
    with pytest.raises(engine.ConfigError, match=r"ranks '../../../victim.pt', which is not a best checkpoint's"):
        engine.setup(resume=result.run_dir, overrides=["epochs=5"])
    assert victim.read_text() == "precious\n"
