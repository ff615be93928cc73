"""What batching does before it batches (plugins/batching/): standardized inputs from the
training split's statistics, saved with the model; stratified splits drawn with split_seed; a test
split evaluated once at the end; binary labels; and the task of whole-number csv targets."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_plugins import inference
from engine_plugins.batching.splits import split_indices
from engine_plugins.datasets import looks_like_classes

import engine
from engine.cli import main
from tests.helpers import Pairs, job, read_json

# Features on very different scales (as in breast_cancer: areas in the thousands, ratios below 1).
SCALES = np.array([1000.0, 1.0, 0.01, 50.0], dtype=np.float32)


def scaled_classes(path: Path, n: int = 240, seed: int = 0) -> Path:
    """Three classes in proportions 3:2:1 (a rare class), features far from mean 0, std 1."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.5, 1 / 3, 1 / 6]).astype(np.int64)
    x = (rng.normal(size=(n, 4)) + y[:, None] * 1.5) * SCALES + 5.0
    np.savez(path, x=x.astype(np.float32), y=y)
    return path


def npz_job(path: Path, **data) -> dict:
    return job(
        epochs=30,
        data={"name": "npz", "path": str(path), "batch_size": 32, **data},
        loss={"name": "cross_entropy"},
        model={"name": "mlp", "hidden": [16]},
    )


def test_standardize_uses_the_training_split_alone_and_the_saved_model_takes_raw_features(tmp_path):
    path = scaled_classes(tmp_path / "data.npz")
    trainer = engine.setup({**npz_job(path, standardize=True, val_fraction=0.25, test_fraction=0.2), "epochs": 3})
    loaders, transform = trainer.loaders, trainer.loaders.input_transform
    assert transform.name == "standardize" and trainer.config["inferred"]["input_transform"] == "standardize"
    # The loaders give raw inputs; the model the run trains applies the transform first.
    assert isinstance(trainer.module, engine.types.WithInputTransform) and trainer.module.transform is transform.module
    standardized = transform.module(loaders.x)
    assert standardized.mean(0).abs().max() < 1e-4 and (standardized.std(0, correction=0) - 1).abs().max() < 1e-4
    raw = np.load(path)["x"]
    kept, val, test = split_indices(len(raw), torch.as_tensor(np.load(path)["y"]), trainer.config["data"])
    train_raw = torch.as_tensor(raw)[kept].double()
    assert torch.equal(loaders.x, torch.as_tensor(raw)[kept])
    assert torch.allclose(transform.module.mean.double(), train_raw.mean(0), rtol=1e-6)
    assert torch.allclose(transform.module.std.double(), train_raw.std(0, correction=0), rtol=1e-5)
    # Validation and test take the training statistics, not their own.
    assert torch.equal(loaders.val_data[0], torch.as_tensor(raw)[val])
    assert not torch.allclose(transform.module(loaders.val_data[0]).mean(0), torch.zeros(4), atol=1e-3)

    result = trainer.fit()
    model = engine.load(result.run_dir)  # Standardize in front: raw features in
    assert isinstance(model, engine.types.WithInputTransform)
    with torch.inference_mode():
        assert torch.allclose(model(torch.as_tensor(raw)[test]), result.model(loaders.test_data[0]), atol=1e-5)
    predicted = inference.predict(result.run_dir, raw[test.numpy()], backend="eager")
    assert predicted["class"].tolist() == model(torch.as_tensor(raw)[test]).argmax(1).tolist()


def test_standardize_reaches_what_unscaled_inputs_do_not(tmp_path):
    path = scaled_classes(tmp_path / "data.npz", n=400)
    short = {"epochs": 10, "optimizer": {"lr": 0.05}, "val_every": 10, "log": {"every": 10}}
    plain = engine.run({**npz_job(path, val_fraction=0.25), **short, "run_name": "plain"})
    scaled = engine.run({**npz_job(path, val_fraction=0.25, standardize=True), **short, "run_name": "scaled"})
    assert scaled.metrics["val_accuracy"] >= 0.9 > plain.metrics["val_accuracy"] + 0.1


def test_evaluate_of_a_standardized_run_on_its_raw_validation_data_reproduces_its_figures(tmp_path, capsys):
    path = scaled_classes(tmp_path / "data.npz")
    trainer = engine.setup({**npz_job(path, standardize=True, val_fraction=0.25), "epochs": 5})
    result = trainer.fit()
    _, val, _ = split_indices(240, torch.as_tensor(np.load(path)["y"]), trainer.config["data"])
    raw = np.load(path)
    np.savez(tmp_path / "val.npz", x=raw["x"][val.numpy()], y=raw["y"][val.numpy()])
    assert main(["evaluate", str(result.run_dir), "--data", str(tmp_path / "val.npz"), "--backend", "eager"]) == 0
    evaluated = read_json(result.run_dir / "evaluations" / "val-final.json")
    for name in ("val_loss", "val_accuracy"):
        assert evaluated[name.removeprefix("val_")] == pytest.approx(result.metrics[name], rel=1e-5)


def test_the_split_is_drawn_with_split_seed_not_seed_and_keeps_the_class_proportions(tmp_path):
    path = scaled_classes(tmp_path / "data.npz")
    y = torch.as_tensor(np.load(path)["y"])

    def val_targets(**changes) -> torch.Tensor:
        job = npz_job(path, val_fraction=0.25, **changes.pop("data", {}))
        return engine.setup({**job, **changes}).loaders.val_data[1]

    first = val_targets()
    assert torch.equal(val_targets(seed=7), first)  # another seed trains differently on the same split
    assert not torch.equal(val_targets(data={"split_seed": 1}), first)
    counts, expected = torch.bincount(first, minlength=3), torch.bincount(y, minlength=3) * 0.25
    assert (counts - expected).abs().max() <= 1  # each class in proportion, the rare one too
    random = val_targets(data={"stratify": False})
    assert len(random) == len(first) == 60


def test_split_indices_share_every_sample_once():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3)
    settings = {"val_fraction": 0.2, "test_fraction": 0.1, "split_seed": 5}
    train, val, test = split_indices(len(labels), labels, settings)
    assert sorted(torch.cat([train, val, test]).tolist()) == list(range(len(labels)))
    assert (len(val), len(test)) == (16, 8)
    assert torch.bincount(labels[val], minlength=3).tolist() == [10, 6, 0]  # 20% of 50, 30 and 3, rounded
    message = "data.test_fraction: 0.5 and data.val_fraction: 0.9 of 83 samples leave none to train on"
    with pytest.raises(engine.ConfigError, match=re.escape(message)):
        split_indices(len(labels), None, {**settings, "val_fraction": 0.9, "test_fraction": 0.5})


def test_a_test_split_is_evaluated_once_at_the_end_into_the_summary(tmp_path, capsys):
    path = scaled_classes(tmp_path / "data.npz")
    result = engine.run({**npz_job(path, standardize=True, val_fraction=0.2, test_fraction=0.2), "epochs": 10})
    summary = read_json(result.run_dir / "summary.json")
    assert {"test_loss", "test_accuracy", "test_f1"} <= summary.keys()
    assert summary["test_accuracy"] == result.metrics["test_accuracy"]
    assert not any(name.startswith("test_") for name in (result.run_dir / "metrics.jsonl").read_text().split('"'))
    assert "Test: loss " in capsys.readouterr().out
    # The same figures as evaluating the saved model on those samples.
    trainer = engine.setup({**npz_job(path, standardize=True, val_fraction=0.2, test_fraction=0.2), "run_name": "t"})
    test_x, test_y = trainer.loaders.test_data
    model = engine.load(result.run_dir)
    with torch.inference_mode():  # the loaders' inputs are raw; the model standardizes them
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    assert accuracy == pytest.approx(summary["test_accuracy"], abs=1e-6)


def test_test_path_reads_a_test_file(tmp_path):
    train = scaled_classes(tmp_path / "train.npz", seed=1)
    test = scaled_classes(tmp_path / "test.npz", n=50, seed=2)
    result = engine.run({**npz_job(train, test_path=str(test), standardize=True), "epochs": 5})
    assert result.state.test_metrics.keys() >= {"test_loss", "test_accuracy"}
    assert engine.setup({**npz_job(train, test_path=str(test)), "run_name": "again"}).info.n_test == 50


def test_a_dataset_is_standardized_and_split_too():
    trainer = engine.setup(
        job(
            epochs=20,
            data={"name": "tests.helpers:blobs_dataset", "batch_size": 16, "test_fraction": 0.25, "standardize": True},
            loss={"name": "cross_entropy"},
        )
    )
    assert (trainer.info.n_train, trainer.info.n_test) == (72, 24)
    x = trainer.loaders.input_transform.module(torch.cat([batch.x for batch in trainer.loaders.train(1)]))
    assert x.mean(0).abs().max() < 1e-5 and (x.std(0, correction=0) - 1).abs().max() < 1e-4
    assert trainer.fit().state.test_metrics["test_accuracy"] > 0.5


def binary_file(path: Path, n: int = 200) -> Path:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=n)
    x = rng.normal(size=(n, 3)) + y[:, None] * 2.0
    np.savez(path, x=x.astype(np.float32), y=y)
    return path


def test_binary_labels_with_bce_with_logits_have_accuracy_metrics_and_predictions(tmp_path):
    path = binary_file(tmp_path / "binary.npz")
    binary = job(
        epochs=40,
        data={"name": "npz", "path": str(path), "task": "binary", "val_fraction": 0.25, "batch_size": 50},
        loss={"name": "bce_with_logits"},
    )
    trainer = engine.setup(binary)
    assert trainer.info.task == "binary" and trainer.info.n_outputs == 1
    assert trainer.loaders.y.shape == (150, 1) and trainer.loaders.y.dtype == torch.float32
    result = trainer.fit()
    assert {"train_accuracy", "val_accuracy", "val_f1", "val_auroc"} <= result.metrics.keys()
    assert result.metrics["val_accuracy"] > 0.8
    x, y = trainer.loaders.val_data
    with torch.inference_mode():
        logits = result.model(x)
    assert result.metrics["val_accuracy"] == pytest.approx(((logits > 0).float() == y).float().mean().item())
    matrix = read_json(result.run_dir / "confusion_matrix.json")["matrix"]
    assert len(matrix) == 2 and sum(map(sum, matrix)) == 50
    predicted = inference.predict(result.run_dir, x.numpy(), backend="eager")
    assert predicted["probability"].shape == (50,)
    assert torch.equal(predicted["class"], (torch.sigmoid(logits[:, 0]) > 0.5).long())


def test_the_binary_threshold_decides_accuracy_metrics_confusion_and_predictions(tmp_path):
    path = binary_file(tmp_path / "binary.npz")
    data = {"name": "npz", "path": str(path), "task": "binary", "val_fraction": 0.25, "batch_size": 50}
    trainer = engine.setup(job(epochs=3, data={**data, "threshold": 0.8}, loss={"name": "bce_with_logits"}))
    result = trainer.fit()
    x, y = trainer.loaders.val_data
    with torch.inference_mode():
        probability = torch.sigmoid(result.model(x)[:, 0])
    predicted = (probability > 0.8).long()
    assert predicted.sum() < (probability > 0.5).sum()  # the threshold changes some predictions here
    truth = y[:, 0].long()
    true_positives = ((predicted == 1) & (truth == 1)).sum().item()
    assert result.metrics["val_accuracy"] == pytest.approx((predicted == truth).float().mean().item())
    assert result.metrics["val_precision"] == pytest.approx(true_positives / max(predicted.sum().item(), 1))
    assert result.metrics["val_recall"] == pytest.approx(true_positives / truth.sum().item())
    matrix = read_json(result.run_dir / "confusion_matrix.json")["matrix"]
    assert matrix[1][1] == true_positives and matrix[0][1] == ((predicted == 1) & (truth == 0)).sum().item()
    assert torch.equal(inference.predict(result.run_dir, x.numpy(), backend="eager")["class"], predicted)
    np.savez(tmp_path / "val.npz", x=x.numpy(), y=truth.numpy())
    evaluated = inference.evaluate(result.run_dir, tmp_path / "val.npz", backend="eager")
    assert evaluated["accuracy"] == pytest.approx(result.metrics["val_accuracy"])
    with pytest.raises(engine.ConfigError, match=r"^data.threshold: "):
        engine.setup(job(run_name="one", data={**data, "threshold": 1.0}, loss={"name": "bce_with_logits"}))


@pytest.mark.parametrize(
    ("file", "data", "loss", "message"),
    [
        (scaled_classes, {"task": "binary"}, "bce_with_logits", "data.task = 'binary': the training targets hold 2"),
        (scaled_classes, {}, "bce_with_logits", 'For 0/1 labels: data.task = "binary"'),
        (binary_file, {"task": "binary"}, "cross_entropy", 'data.task = "binary" gives 0/1 labels with one output'),
        (scaled_classes, {"val_fraction": 0.6, "test_fraction": 0.4}, "cross_entropy", "of 240 samples leave none"),
    ],
)
def test_task_errors_name_data_task(tmp_path, file, data, loss, message):
    path = file(tmp_path / "data.npz")
    with pytest.raises(engine.ConfigError, match=re.escape(message)):
        engine.setup({**npz_job(path, **data), "loss": {"name": loss}})


def test_whole_number_csv_targets_with_many_values_are_regression(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(442, 2))
    progression = np.round(150 + 60 * x[:, 0] + 10 * x[:, 1]).clip(25, 346)  # like the diabetes targets
    rows = [f"{a:.4f},{b:.4f},{int(t)}" for (a, b), t in zip(x, progression)]
    (tmp_path / "d.csv").write_text("a,b,target\n" + "\n".join(rows) + "\n")
    trainer = engine.setup(job(data={"name": "csv", "path": str(tmp_path / "d.csv"), "target": "target"}))
    assert trainer.info.task == "regression" and trainer.info.n_outputs == 1
    assert looks_like_classes(np.array([0, 1, 2, 1, 0, 2, 2, 1, 0, 1.0] * 3))
    assert not looks_like_classes(np.array([0.5, 1, 2]))
    assert not looks_like_classes(np.array([-1, 0, 1] * 10))


@pytest.mark.parametrize("seed", range(20))
def test_stratified_splits_have_their_exact_sizes_and_each_class_within_one_of_its_share(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = torch.as_tensor(rng.integers(0, int(rng.integers(1, 8)), size=n))
    val_fraction, test_fraction = rng.uniform(0, 0.45, size=2).round(2)
    settings = {"val_fraction": float(val_fraction), "test_fraction": float(test_fraction), "split_seed": seed}
    train, val, test = split_indices(n, labels, settings)
    held = [part for part in (val, test) if part is not None]
    assert sorted(torch.cat([train, *held]).tolist()) == list(range(n))
    for part, fraction in ((val, val_fraction), (test, test_fraction)):
        if part is None:
            continue
        assert len(part) == max(1, int(n * fraction))
        expected = torch.bincount(labels, minlength=8).double() * len(part) / n
        assert (torch.bincount(labels[part], minlength=8) - expected).abs().max() < 2


# --- a Dataset's labels are checked like in-memory targets; the evaluate of a csv run ------------


def test_a_class_held_out_only_is_counted_on_the_dataset_path_too():
    data = {"name": "tests.helpers:labelled_dataset", "batch_size": 8, "test_fraction": 0.25, "split_seed": 0}
    setup = engine.setup(job(epochs=2, data=data, loss={"name": "cross_entropy"}))
    held_out = [int(y) for batch in setup.loaders.test() for y in batch.y]
    assert 3 in held_out and setup.info.n_outputs == 4  # the only class-3 sample is in the test split
    assert "test_accuracy" in setup.fit().state.test_metrics


@pytest.mark.parametrize(
    ("labels", "task", "message"),
    [
        ((0, 1, 2), "binary", "data.task = 'binary': the training targets hold 2"),
        ((0, 0.5, 1), "classification", "data.task = 'classification': the training targets are not whole"),
    ],
)
def test_a_datasets_labels_are_checked_as_data_task_takes_them(labels, task, message):
    data = {"name": "tests.helpers:labelled_dataset", "labels": list(labels), "task": task, "batch_size": 8}
    with pytest.raises(engine.ConfigError, match=re.escape(message)):
        engine.setup(job(data=data, loss={"name": "bce_with_logits" if task == "binary" else "cross_entropy"}))


def test_test_metrics_without_a_validation_split():
    path = scaled_classes(Path("data.npz"))
    metrics = engine.run({**npz_job(path, test_fraction=0.2), "epochs": 2}).state.test_metrics
    assert {"test_accuracy", "test_f1", "test_auroc"} <= metrics.keys()


def test_a_test_file_with_float_labels_meets_int_training_labels_under_an_explicit_task(tmp_path):
    train = binary_file(tmp_path / "train.npz")
    loaded = np.load(train)
    np.savez(tmp_path / "test.npz", x=loaded["x"][:20], y=loaded["y"][:20].astype(np.float32))
    data = {"name": "npz", "path": str(train), "test_path": str(tmp_path / "test.npz"), "task": "binary"}
    trainer = engine.setup(job(data=data, loss={"name": "bce_with_logits"}))
    assert trainer.info.n_test == 20 and trainer.loaders.test_data[1].shape == (20, 1)


def test_evaluate_of_a_csv_classification_run_on_a_few_rows(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, size=400)
    rows = [f"{rng.normal() + label:.4f},{label}" for label in labels]
    (tmp_path / "train.csv").write_text("a,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "few.csv").write_text("a,label\n" + "\n".join(rows[:10]) + "\n")  # 10 rows: no longer "few values"
    data = {"name": "csv", "path": str(tmp_path / "train.csv"), "target": "label"}
    result = engine.run(job(epochs=2, data=data, loss={"name": "cross_entropy"}))
    assert result.config["inferred"]["task"] == "classification"
    code = main(["evaluate", str(result.run_dir), "--data", str(tmp_path / "few.csv"), "--backend", "eager"])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "bool"])
def test_zero_one_targets_of_any_dtype_with_bce_with_logits_are_binary_under_auto(tmp_path, dtype):
    path = binary_file(tmp_path / "binary.npz")
    y = np.load(path)["y"]
    np.savez(path, x=np.load(path)["x"], y=y.astype(dtype))
    data = {"name": "npz", "path": str(path), "val_fraction": 0.25, "batch_size": 50}
    trainer = engine.setup(job(epochs=2, data=data, loss={"name": "bce_with_logits"}))
    assert trainer.info.task == "binary" and trainer.info.n_outputs == 1
    assert trainer.loaders.y.dtype == torch.float32  # what bce_with_logits takes, whatever the file held
    result = trainer.fit()
    assert {"val_accuracy", "val_f1", "val_auroc"} <= result.metrics.keys() and "val_r2" not in result.metrics


def test_soft_labels_and_other_losses_keep_their_task_under_auto(tmp_path):
    path = binary_file(tmp_path / "binary.npz")
    x, y = np.load(path)["x"], np.load(path)["y"]
    np.savez(path, x=x, y=np.where(y == 1, 0.9, 0.1).astype(np.float32))  # probabilities, not labels
    soft = engine.setup(job(data={"name": "npz", "path": str(path)}, loss={"name": "bce_with_logits"}))
    assert soft.info.task == "regression"
    np.savez(path, x=x, y=y.astype(np.float32))
    assert engine.setup(job(data={"name": "npz", "path": str(path)})).info.task == "regression"  # mse: values


def zero_one_dataset(seed: int, soft: bool = False) -> Pairs:
    """A Dataset of float labels 0 and 1 (or, `soft`, probabilities near them)."""
    x = torch.randn(60, 3, generator=torch.Generator().manual_seed(seed))
    y = (x[:, 0] > 0).float()
    return Pairs(x, y * 0.8 + 0.1 if soft else y)


def test_a_datasets_zero_one_float_targets_with_bce_with_logits_are_binary_unless_they_are_soft():
    data = {"name": f"{__name__}:zero_one_dataset", "batch_size": 20}
    trainer = engine.setup(job(data=data, loss={"name": "bce_with_logits"}))
    assert trainer.info.task == "binary" and trainer.info.n_outputs == 1
    soft = engine.setup(job(data={**data, "soft": True}, loss={"name": "bce_with_logits"}))
    assert soft.info.task == "regression"  # its first sample is no 0 or 1 either; read all the same
