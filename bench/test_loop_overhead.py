"""loop-overhead: what the engine's loop costs over the tutorial's hand-written loop.

Contenders, for the tutorial and the MLP job:

- hand-written: the tutorial's loop with torch's default Adam (the group's baseline);
- hand-written, fused Adam: the same loop with the optimizer the engine picks by default;
- engine: its defaults (fused Adam where the device has it), compared with the fused loop above,
  without the training metrics (which the hand-written loop does not compute);
- engine, training accuracy: the same with ``log.train_metrics`` on (the default), on the MLP job
  (the tutorial's regression has no training metric);
- engine, torch-default Adam: the engine with the baseline's optimizer, compared with the baseline;
- engine + 10 no-op plugins: every per-step hook implemented ten times, to price hook dispatch;
- ignite and lightning (lean), when installed, on the baseline's optimizer and data.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from typing import Any

import pytest
import torch
from conftest import Contenders, Group, Job, torch_default_impl

import engine

NO_OP_PLUGINS = 10
PER_STEP_HOOKS = ("before_forward", "compute_loss", "before_optimizer_step", "after_step")


def test_hand_written(contenders: Contenders, loop_overhead: Group) -> None:
    _, run_round = contenders.hand_written()
    loop_overhead.measure(run_round, "hand-written", baseline=True)


def test_hand_written_fused(contenders: Contenders, loop_overhead: Group) -> None:
    _, run_round = contenders.hand_written(fused=True)
    loop_overhead.measure(run_round, "hand-written, fused Adam")


def test_engine(contenders: Contenders, loop_overhead: Group) -> None:
    trainer, run_round = contenders.engine()
    assert trainer.optimizer.defaults["fused"], "the engine's default Adam is expected to be fused here"
    loop_overhead.measure(run_round, "engine", reference="hand-written, fused Adam")


@pytest.mark.parametrize("job", ["mlp"], indirect=True)
def test_engine_training_accuracy(contenders: Contenders, loop_overhead: Group) -> None:
    trainer, run_round = contenders.engine(overrides=["log.train_metrics=true"])
    loop_overhead.measure(run_round, "engine, training accuracy logged", reference="engine")
    run_round()
    assert "train_accuracy" in trainer.state.metrics


def test_engine_torch_default_adam(contenders: Contenders, loop_overhead: Group, device: str) -> None:
    _, run_round = contenders.engine(overrides=[f"optimizer.impl={torch_default_impl(device)}"])
    loop_overhead.measure(run_round, "engine, torch-default Adam", reference="hand-written")


class NoOp:
    """Implements every per-step hook and does nothing: what remains is the cost of calling it."""

    @engine.hookimpl
    def before_forward(self) -> None:
        return None

    @engine.hookimpl
    def compute_loss(self) -> None:
        return None

    @engine.hookimpl
    def before_optimizer_step(self) -> None:
        return None

    @engine.hookimpl
    def after_step(self) -> None:
        return None

    @engine.hookimpl
    def compute_metrics(self) -> None:  # validation only: never called in these jobs
        return None


def test_engine_no_op_plugins(contenders: Contenders, loop_overhead: Group) -> None:
    # Distinct classes, because the engine names a plugin object after its class.
    plugins = [type(f"NoOp{index}", (NoOp,), {}) for index in range(NO_OP_PLUGINS)]
    _, run_round = contenders.engine(plugins=plugins)
    loop_overhead.measure(
        run_round,
        f"engine + {NO_OP_PLUGINS} no-op plugins",
        reference="engine",
        hook_calls_per_step=NO_OP_PLUGINS * len(PER_STEP_HOOKS),
    )


def test_engine_matches_hand_written(contenders: Contenders, job: Job) -> None:
    """The defaults target holds only with the same result: the engine's weights after a round
    equal the fused hand-written loop's (bit for bit on one device), and the torch-default loop's
    to float tolerance."""
    if job.batch_size:
        pytest.skip("mini-batch orders differ between the engine and the hand-written loop by design")
    trainer, engine_round = contenders.engine()
    fused, fused_round = contenders.hand_written(fused=True)
    plain, plain_round = contenders.hand_written()
    for run_round in (engine_round, fused_round, plain_round):
        run_round()
    for ours, by_hand, by_default in zip(trainer.model.parameters(), fused.parameters(), plain.parameters()):
        torch.testing.assert_close(ours, by_hand, rtol=0, atol=0)
        torch.testing.assert_close(ours, by_default, rtol=1e-5, atol=1e-5)


# --- peers, when installed ----------------------------------------------------------------------


def needs(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


@needs("ignite")
def test_ignite(contenders: Contenders, loop_overhead: Group, job: Job) -> None:
    from ignite.engine import create_supervised_trainer

    logging.getLogger("ignite").setLevel(logging.WARNING)
    model = contenders.model()
    trainer = create_supervised_trainer(
        model, contenders.optimizer(model), job.loss(), device=torch.device(contenders.device)
    )
    batches = contenders.batches()

    def run_round() -> None:
        trainer.run(batches, max_epochs=job.epochs_per_round)  # a finished run restarts from epoch 1

    loop_overhead.measure(run_round, "ignite", reference="hand-written")


class Gate:
    """Runs Lightning's `fit` in a thread and lets it through `epochs_per_round` epochs per round.

    A `fit` per round would time Lightning's setup (strategy, callbacks, data connectors) with the
    loop; one long `fit` paused between rounds times its steady state only, as for the others.
    """

    def __init__(self, epochs_per_round: int) -> None:
        self.epochs_per_round = epochs_per_round
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.epochs, self.stopping = 0, False
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def callback(self) -> Any:
        from lightning.pytorch.callbacks import Callback

        gate = self

        class Paced(Callback):
            def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
                if gate.epochs % gate.epochs_per_round == 0 and not gate.stopping:
                    gate.go.acquire()
                if gate.stopping:
                    trainer.should_stop = True

            def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
                gate.epochs += 1
                if gate.epochs % gate.epochs_per_round == 0:
                    gate.done.release()

        return Paced()

    def start(self, fit: Any) -> None:
        def run() -> None:
            try:
                fit()
            except BaseException as error:
                self.error = error
            finally:
                self.done.release()

        self.thread = threading.Thread(target=run, name="lightning-fit", daemon=True)
        self.thread.start()

    def round(self) -> None:
        self.go.release()
        if not self.done.acquire(timeout=300) or self.error is not None:
            raise RuntimeError(f"Lightning's fit stopped: {self.error!r}")

    def stop(self) -> None:
        self.stopping = True
        self.go.release()
        if self.thread is not None:
            self.thread.join(timeout=60)


@needs("lightning")
def test_lightning(contenders: Contenders, loop_overhead: Group, job: Job) -> None:
    import lightning.pytorch as pl

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    model, loss_fn = contenders.model(), job.loss()

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
            x, y = batch
            return loss_fn(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return contenders.optimizer(self.model)

    gate = Gate(job.epochs_per_round)
    trainer = pl.Trainer(
        accelerator="gpu" if contenders.device.startswith("cuda") else "cpu",
        devices=1,
        max_epochs=-1,
        # Lean: no checkpointing, logger, progress bar, model summary or validation.
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[gate.callback()],
        default_root_dir=str(contenders.runs_dir),
    )
    gate.start(lambda: trainer.fit(Module(), train_dataloaders=contenders.batches()))
    contenders.on_teardown(gate.stop)
    loop_overhead.measure(gate.round, "lightning (lean)", reference="hand-written")
