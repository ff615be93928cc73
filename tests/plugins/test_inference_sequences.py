"""After training a language model (plugins/inference, plugins/tokens/sampling.py): exports checked on
token ids of the run's own data, predictions and evaluation with the vocabulary on the last axis on
every backend, auto falling back to eager, and `engine sample`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_plugins.inference import exporting

import engine
from engine.cli import main
from tests.helpers import read_json

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n" * 30
MODEL = {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16}
BACKENDS = [
    "eager",
    "exported",
    pytest.param(
        "onnx",
        marks=pytest.mark.skipif(not __import__("importlib").util.find_spec("onnxruntime"), reason="needs onnxruntime"),
    ),
    pytest.param("aoti", marks=pytest.mark.slow),
]


def language_model(runs_dir: Path, text: Path, **changes) -> Path:
    job = {
        "max_steps": 30,
        "runs_dir": str(runs_dir),
        "data": {"name": "tokens", "path": str(text), "tokenizer": "char", "block_size": 16, "batch_size": 8},
        "model": MODEL,
        "loss": {"name": "cross_entropy"},
        "optimizer": {"name": "adamw", "lr": 0.01},
        **changes,
    }
    return engine.run(job, blocked=["console"]).run_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("language")
    (folder / "input.txt").write_text(TEXT)
    vocabulary = sorted(set(TEXT))
    ids = np.array([vocabulary.index(c) for c in TEXT[:600]], dtype=np.uint16)
    np.save(folder / "ids.npy", ids)
    return {
        "run": language_model(folder / "runs", folder / "input.txt", run_name="gpt"),
        "text": folder / "input.txt",
        "ids": folder / "ids.npy",
        "folder": folder,
    }


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_exports_are_checked_on_token_ids_of_the_runs_own_data(trained):
    run = exporting.Run.open(trained["run"])
    inputs = run.inputs()
    vocabulary = run.info.classes
    assert inputs.dtype == torch.long and inputs.shape[1] == 16
    assert "".join(vocabulary[i] for i in inputs[0].tolist()) == TEXT[:16]  # its first window


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_and_evaluate_put_the_vocabulary_on_the_last_axis_on_every_backend(trained, tmp_path, capsys, backend):
    run, ids = trained["run"], trained["ids"]
    out = tmp_path / "predicted.npz"
    code, _, err = run_cli(capsys, "predict", run, "--data", ids, "--out", out, "--backend", backend)
    assert code == 0, err
    predicted = np.load(out)
    windows = (600 - 1) // 16
    assert predicted["probability"].shape == (windows, 16, 31) and predicted["class"].shape == (windows, 16)
    np.testing.assert_allclose(predicted["probability"].sum(axis=-1), 1.0, rtol=1e-5)  # over the vocabulary
    x = torch.from_numpy(np.load(ids).astype(np.int64)[: windows * 16].reshape(windows, 16))
    with torch.no_grad():
        logits = engine.load(run)(x)
    np.testing.assert_allclose(predicted["probability"], logits.softmax(-1).numpy(), atol=1e-4)
    code, out_json, err = run_cli(capsys, "evaluate", run, "--data", ids, "--backend", backend)
    assert code == 0, err
    result = json.loads(out_json)
    with torch.no_grad():
        targets = torch.from_numpy(np.load(ids).astype(np.int64))
        y = torch.stack([targets[i + 1 : i + 17] for i in range(0, windows * 16, 16)])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 31), y.reshape(-1))
    assert result["backend"] == backend and result["samples"] == windows
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-4)
    assert result["perplexity"] == pytest.approx(loss.exp().item(), rel=1e-4)


def test_evaluate_reads_a_text_file_with_the_runs_vocabulary(trained, capsys, tmp_path):
    (tmp_path / "other.txt").write_text(TEXT[100:900])
    code, out, err = run_cli(capsys, "evaluate", trained["run"], "--data", tmp_path / "other.txt", "--backend", "eager")
    assert code == 0, err
    result = json.loads(out)
    assert result["samples"] == (800 - 1) // 16 and result["perplexity"] == pytest.approx(
        np.exp(result["loss"]), rel=1e-5
    )
    (tmp_path / "unknown.txt").write_text("Zounds! " * 20)
    code, _, err = run_cli(capsys, "evaluate", trained["run"], "--data", tmp_path / "unknown.txt", "--backend", "eager")
    assert code == 2 and len(err.splitlines()) == 1  # read before any backend is chosen: the error alone
    assert "unknown.txt' holds the character 'Z', which the vocabulary does not" in err


def test_export_writes_the_gpt_at_its_fixed_context_length(trained, capsys):
    code, out, err = run_cli(capsys, "export", trained["run"], "--format", "exported")
    assert code == 0, err
    record = read_json(Path(out.split(" written to ")[1].split(" (")[0] + ".json"))
    assert record["verified"]["batch_sizes"] == [1, 7, 256] and record["verified"]["max_abs_diff"] < 1e-4
    program = torch.export.load(trained["run"] / "exports" / "final-exported.pt2")
    assert program.module()(torch.zeros(3, 16, dtype=torch.long)).shape == (3, 16, 31)


def test_auto_serves_eagerly_a_model_no_export_can_take(trained, capsys):
    """A model returning (logits, loss) from its targets (nanoGPT's): evaluated eagerly, as it trained."""
    folder = trained["folder"]
    run = language_model(
        folder / "runs",
        trained["text"],
        run_name="targets",
        model={"name": "tests.helpers:targets_in_forward", "targets": "argument", "output": "0"},
        loss={"name": "model", "output": "1"},
    )
    code, out, err = run_cli(capsys, "evaluate", run, "--data", trained["ids"], "--trust-run")
    assert code == 0, err
    assert err.startswith("backend: eager (auto; the model takes its targets (model.targets = 'argument')")
    assert json.loads(out)["backend"] == "eager"
    code, _, err = run_cli(capsys, "evaluate", run, "--data", trained["ids"], "--backend", "exported", "--trust-run")
    assert (
        code == 2
        and err.startswith("error: --backend exported: the model takes its targets")
        and len(err.splitlines()) == 1
    )
    # Without targets it returns the last position's logits: predict serves that, on auto too.
    code, _, err = run_cli(capsys, "predict", run, "--data", trained["ids"], "--out", folder / "p.npz", "--trust-run")
    assert code == 0, err
    assert np.load(folder / "p.npz")["probability"].shape[1:] == (1, 31)


class Untraceable(torch.nn.Module):
    """Token ids in, logits out, with control flow on the data: torch.export cannot trace it."""

    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(vocabulary, 8), torch.nn.Linear(8, vocabulary)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(idx)
        return self.head(hidden if hidden.sum() > 0 else -hidden)


def untraceable(info: engine.DataInfo) -> Untraceable:
    return Untraceable(info.n_outputs)


def test_auto_falls_back_to_eager_when_no_export_can_be_made(trained, capsys):
    folder = trained["folder"]
    run = language_model(
        folder / "runs", trained["text"], run_name="untraceable", model={"name": f"{__name__}:untraceable"}
    )
    code, out, err = run_cli(capsys, "evaluate", run, "--data", trained["ids"], "--trust-run")
    assert code == 0, err
    assert err.startswith("backend: eager (auto; ") and "torch.export cannot trace it" in err
    assert "internal error" not in err and json.loads(out)["backend"] == "eager"


# --- engine sample ---------------------------------------------------------------------------------


def test_sample_prints_text_from_the_runs_vocabulary(trained, capsys):
    code, out, err = run_cli(
        capsys, "sample", trained["run"], "--prompt", "ROMEO:", "--tokens", "50", "--temperature", "0.8", "--top-k", "5"
    )
    assert code == 0, err
    assert out.startswith("ROMEO:") and len(out) == 6 + 50 and set(out) <= set(TEXT)
    again = run_cli(
        capsys, "sample", trained["run"], "--prompt", "ROMEO:", "--tokens", "50", "--temperature", "0.8", "--top-k", "5"
    )
    assert again[1] == out  # seeded
    other = run_cli(capsys, "sample", trained["run"], "--prompt", "ROMEO:", "--tokens", "50", "--seed", "2")[1]
    assert other != out
    code, _, err = run_cli(capsys, "sample", trained["run"], "--prompt", "Zounds")
    assert code == 2 and err.strip() == "error: --prompt: the character 'Z' is not in the run's vocabulary"


def test_sample_keeps_to_the_k_likeliest_tokens(trained, capsys):
    """With top-k 1 every token is the arg-max of the model's logits: greedy decoding, by hand."""
    code, out, _ = run_cli(capsys, "sample", trained["run"], "--prompt", "But", "--tokens", "20", "--top-k", "1")
    model, vocabulary = engine.load(trained["run"]), sorted(set(TEXT))
    ids = [vocabulary.index(c) for c in "But"]
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids[-16:]]))[0, -1].argmax()))
    assert code == 0 and out == "".join(vocabulary[i] for i in ids)


def test_sample_of_a_run_on_token_ids_takes_and_prints_ids(trained, capsys):
    folder = trained["folder"]
    data = {"name": "tokens", "path": str(trained["ids"]), "block_size": 16, "batch_size": 8}
    run = language_model(folder / "runs", trained["ids"], run_name="ids", data=data)
    code, out, err = run_cli(capsys, "sample", run, "--prompt", "3 4 5", "--tokens", "7")
    assert code == 0, err
    printed = [int(word) for word in out.split()]
    assert printed[:3] == [3, 4, 5] and len(printed) == 10 and max(printed) < 31
    code, _, err = run_cli(capsys, "sample", run, "--prompt", "ROMEO")
    assert code == 2 and "give ids, as '1 5 9'" in err
