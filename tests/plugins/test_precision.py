"""plugins/precision.py: ``"32"`` (the default), ``"bf16-mixed"`` and ``"16-mixed"``; the mixed ones
follow float32 within their tolerance, fp16 scales the loss; without the plugin a run is full
precision."""

from __future__ import annotations

import pytest
import torch

import engine
from tests.plugins.accelerated import BF16, TUTORIAL, close, train


def test_bf16_mixed_follows_float32_within_bf16_tolerance():
    full, _ = train(TUTORIAL)
    half, _ = train(TUTORIAL, precision=BF16)
    close(half, full, rtol=2e-2)
    assert half != full  # the forward ran in bf16: not the float32 maths


def test_fp16_mixed_scales_the_loss_and_trains():
    trainer = engine.setup({**TUTORIAL, "precision": {"name": "16-mixed"}, "log": {"progress": False}})
    assert trainer.precision.dtype is torch.float16
    result = trainer.fit()
    scaler = trainer.precision.scaler
    assert isinstance(scaler, torch.amp.GradScaler)
    assert scaler.get_scale() < 65536.0  # the first steps overflowed fp16 and were skipped
    full, _ = train(TUTORIAL)
    assert result.metrics["loss"] == pytest.approx(full[-1], rel=0.1)


def test_the_default_is_float32_without_autocast():
    trainer = engine.setup(TUTORIAL)
    assert trainer.config["precision"]["name"] == "32"
    assert trainer.precision.dtype is None and trainer.precision.scaler is None


def test_unknown_precision_is_a_config_error():
    with pytest.raises(engine.ConfigError, match=r"precision.name: unknown precision '8' \(choose one of: 16-mixed"):
        engine.load_config({**TUTORIAL, "precision": {"name": "8"}})


def test_without_the_precision_plugin_the_run_is_full_precision():
    trainer = engine.setup(TUTORIAL, blocked=["precision"])
    assert trainer.config["precision"]["name"] is None
    assert trainer.precision.dtype is None and trainer.precision.scaler is None
