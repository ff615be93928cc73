"""engine/calling.py: models as they are written. nanoGPT's convention (targets as the second
argument, a tuple of logits and loss), Hugging Face's (dict inputs as keywords, ``labels=``, a
dataclass with ``logits`` and ``loss``) and a plain module train through a ``module:factory`` with
no wrapper class, against the hand-written loop."""

from __future__ import annotations

import pytest
import torch

import engine
from engine.calling import ModelLoss, model_call, pick
from tests.helpers import TargetsInForward, epoch_order, job, next_tokens

CROSS_ENTROPY = {"name": "cross_entropy"}
TOKENS = {"name": "tests.helpers:next_tokens", "batch_size": 16}
# nanoGPT's model.GPT: model(idx, targets) -> (logits, loss)
NANOGPT = {
    "model": {"name": "tests.helpers:targets_in_forward", "targets": "argument", "output": "0"},
    "loss": {"name": "model", "output": "1"},
}


def test_a_model_taking_its_targets_and_returning_its_loss_trains_as_its_own_loop_trains_it():
    seed, lr, epochs = 42, 0.05, 3
    x, y = (torch.from_numpy(array) for array in next_tokens(seed))
    torch.manual_seed(seed)
    model = TargetsInForward(5)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(1, epochs + 1):
        order = epoch_order(seed, epoch, len(x))
        for start in range(0, len(x), 16):
            index = order[start : start + 16]
            _, loss = model(x[index], y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    result = engine.run(job(epochs=epochs, data=TOKENS, optimizer={"lr": lr}, **NANOGPT))
    for mine, theirs in zip(result.model.parameters(), model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)


def test_validation_calls_the_model_as_training_does_so_its_metrics_see_every_position():
    trainer = engine.setup(job(epochs=2, data={**TOKENS, "val_fraction": 0.25}, **NANOGPT))
    result = trainer.fit()
    x, y = trainer.loaders.val_data
    with torch.no_grad():
        logits, loss = trainer.module.eval()(x, y)  # given its targets: every position's logits
    assert result.metrics["val_loss"] == pytest.approx(loss.item(), abs=1e-6)
    assert result.metrics["val_perplexity"] == pytest.approx(loss.exp().item(), rel=1e-5)
    assert result.metrics["val_accuracy"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())


def test_a_hugging_face_style_model_takes_dict_batches_as_keywords_and_labels():
    labels = job(
        epochs=3,
        data={"name": "tests.helpers:TokenDicts", "batch_size": 16, "val_fraction": 0.25},
        model={"name": "tests.helpers:labels_keyword", "targets": "labels", "output": "logits"},
        loss={"name": "model"},  # LanguageModelOutput.loss
        run_name="labels",
    )
    trainer = engine.setup(labels)
    batch = trainer.loaders.sample()
    assert set(batch.x) == {"input_ids", "attention_mask"} and batch.x["attention_mask"].dtype == torch.float32
    result = trainer.fit()
    # The same model, its logits taken and the loss computed by the [loss] component: the same run.
    plain = engine.run(
        {
            **labels,
            "model": {"name": "tests.helpers:labels_keyword", "output": "logits"},
            "loss": {"name": "cross_entropy"},
            "run_name": "plain",
        }
    )
    for mine, theirs in zip(result.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert result.metrics["val_loss"] == pytest.approx(plain.metrics["val_loss"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"model": {"name": "tests.helpers:targets_in_forward", "targets": "argument"}, "loss": CROSS_ENTROPY},
            r"^model 'tests.helpers:targets_in_forward' returns a tuple of 2, whose output is not a tensor: pick its "
            r'logits with model.output \(an index, "0", or a key or attribute, "logits"\)$',
        ),
        (
            {
                "model": {"name": "tests.helpers:targets_in_forward", "targets": "argument", "output": "logits"},
                "loss": CROSS_ENTROPY,
            },
            r"^model.output: 'logits' is not in what the model returns \(a tuple of 2\)$",
        ),
        (
            {**NANOGPT, "loss": {"name": "model", "output": "loss"}},
            r"^loss.output: 'loss' is not in what the model returns \(a tuple of 2\)$",
        ),
    ],
)
def test_what_does_not_fit_the_models_convention_is_one_line_at_setup(changes, message):
    with pytest.raises(engine.ConfigError, match=message):
        engine.setup(job(data=TOKENS, **changes))


def test_calls_resolved_once():
    settings = {"targets": "", "output": ""}
    assert model_call(settings, keywords=False).__name__ == "plain"
    batch = engine.Batch({"input_ids": torch.zeros(1, 3)}, torch.zeros(1, 3))
    call = model_call({"targets": "labels", "output": "0"}, keywords=True)
    assert call(lambda **given: (sorted(given), "loss"), batch) == (
        ["input_ids", "labels"],
        (["input_ids", "labels"], "loss"),
    )
    with pytest.raises(
        engine.ConfigError, match=r"^model.targets: 'argument' .* cannot follow inputs given as keywords"
    ):
        model_call({"targets": "argument", "output": ""}, keywords=True)
    assert pick({"logits": 1}, "logits", "k") == 1 and pick((1, 2), "-1", "k") == 2
    assert ModelLoss("1")((torch.ones(1), torch.zeros(()))) == 0
