"""plugins/device.py: batches on the run's device before the forward pass."""

from __future__ import annotations

import pytest
import torch

import engine
from plugins import device
from tests.helpers import job


def test_batches_already_on_the_device_are_kept():
    trainer = engine.setup(job(device="cpu"))
    assert trainer.device == torch.device("cpu")
    batch = next(trainer.loaders.train(1))
    assert device.before_forward(batch, trainer) is None


def test_auto_is_cpu_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert engine.setup(job()).device == torch.device("cpu")
    with pytest.raises(engine.ConfigError, match="device: 'cuda' asked for, but CUDA is not available"):
        engine.setup(job(device="cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_default_job_on_cuda_matches_cpu():
    cpu = engine.run(job(epochs=50, device="cpu", run_name="cpu"))
    cuda = engine.run(job(epochs=50, device="cuda", run_name="cuda"))
    assert next(cuda.model.parameters()).device.type == "cuda"
    assert cuda.metrics["loss"] == pytest.approx(cpu.metrics["loss"], rel=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dataloader_batches_move_to_cuda():
    result = engine.run(
        job(
            device="cuda",
            data={"name": "tests.helpers:blobs_dataset", "batch_size": 16, "pin_memory": True},
            loss={"name": "cross_entropy"},
        )
    )
    assert result.metrics["loss"] > 0
