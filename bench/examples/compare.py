"""The example jobs beside scikit-learn's reference models, on the same split.

    pip install scikit-learn
    python bench/examples/export_sklearn.py
    python bench/examples/compare.py            # prints a markdown table

For each job, the engine trains its job file (bench/examples/<name>.toml: standardized
features, a stratified validation split, nothing done outside the engine), and scikit-learn's
reference models are fitted on the same training samples, standardized the same way (the
statistics of the training split), and scored on the same validation samples: accuracy for
classification, R² for regression. "within" says whether the engine's figure is at least the
lowest reference's. "unscaled" is the same job with ``data.standardize = false``.

digits_cnn trains a convolutional network on the digits as 1 x 8 x 8 images (each channel
standardized, random one-pixel shifts of the training batches): the same samples and the same
split as digits' MLP (its references are fitted on the 64 pixels, as digits' are).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import engine

HERE = Path(__file__).parent
# Each job file, and the data file (data/<name>.npz) it reads.
JOBS = {
    "digits": "digits",
    "digits_cnn": "digits_images",
    "breast_cancer": "breast_cancer",
    "wine": "wine",
    "diabetes": "diabetes",
}


def references(task: str) -> dict[str, object]:
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    if task == "regression":
        mlp = MLPRegressor(hidden_layer_sizes=(64,), max_iter=2000, random_state=0)
        return {"Ridge": Ridge(alpha=1.0), "MLPRegressor": mlp}
    return {
        "LogisticRegression": LogisticRegression(max_iter=5000),
        "MLPClassifier": MLPClassifier(hidden_layer_sizes=(64,), max_iter=2000, random_state=0),
    }


def split(trainer: engine.Trainer) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The run's training and validation samples, raw (the model standardizes them), in its split;
    images as rows of pixels."""
    loaders = trainer.loaders
    x, y = loaders.x.cpu(), loaders.y.cpu()
    vx, vy = loaders.val_data[0].cpu(), loaders.val_data[1].cpu()
    return x.flatten(1).numpy(), y.numpy().ravel(), vx.flatten(1).numpy(), vy.numpy().ravel()


def compare(name: str, runs_dir: Path) -> dict[str, object]:
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    trainer = engine.setup(HERE / f"{name}.toml", overrides=[f"runs_dir={runs_dir}"], blocked=["console", "progress"])
    x, y, vx, vy = split(trainer)
    result = trainer.fit()
    task = trainer.info.task
    metric = "r2" if task == "regression" else "accuracy"
    unscaled = engine.run(
        HERE / f"{name}.toml",
        overrides=[f"runs_dir={runs_dir}", "data.standardize=false"],
        blocked=["console", "progress"],
    )
    row: dict[str, object] = {
        "set": name,
        "metric": metric,
        "engine": result.metrics[f"val_{metric}"],
        "unscaled": unscaled.metrics[f"val_{metric}"],
    }
    for label, model in references(task).items():
        fitted = make_pipeline(StandardScaler(), model).fit(x, y)
        predicted = fitted.predict(vx)
        row[label] = r2_score(vy, predicted) if metric == "r2" else accuracy_score(vy, predicted)
    scores = [value for key, value in row.items() if key not in ("set", "metric", "engine", "unscaled")]
    row["within"] = row["engine"] >= min(scores)
    return row


def main() -> int:
    missing = [name for name in JOBS.values() if not (HERE / "data" / f"{name}.npz").is_file()]
    if missing:
        print(f"run bench/examples/export_sklearn.py first (missing: {', '.join(missing)})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as runs_dir:
        rows = [compare(name, Path(runs_dir)) for name in JOBS]
    print("| job | metric | engine | engine, unscaled | reference 1 | reference 2 | within the spread |")
    print("|---|---|---:|---:|---:|---:|---|")
    for row in rows:
        shown = ("set", "metric", "engine", "unscaled", "within")
        refs = [(key, value) for key, value in row.items() if key not in shown]
        cells = " | ".join(f"{value:.3f} ({key})" for key, value in refs)
        within = "yes" if row["within"] else "no"
        print(f"| {row['set']} | {row['metric']} | {row['engine']:.3f} | {row['unscaled']:.3f} | {cells} | {within} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
