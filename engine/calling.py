"""How the train step, validation and the sample check call the model, so that a model plugs in
as it is written (a `module:factory` returning it, no wrapper class):

- its inputs: ``model(x)``, or ``model(**x)`` when the batch's inputs are a dict (``input_ids``,
  ``attention_mask``: a Dataset of dict samples);
- its targets (``[model] targets``): not given (the ``[loss]`` component computes the loss from
  the output), the second positional argument (``"argument"``: nanoGPT's ``GPT(idx, targets)``),
  or a keyword (``"labels"``: a Hugging Face model's ``labels=``);
- what it returns (``[model] output``): the logits themselves, or a tuple, dict or dataclass
  holding them, picked by index (``"0"``) or by key or attribute (``"logits"``);
- its loss: a ``[loss]`` component that returns an `engine.ModelLoss` optimizes the loss the model
  returned (``loss.name = "model"``), picked the same way.

Resolved once at setup into a `Call`; a model called plainly (``model(x)`` returning its output,
the tutorial's) keeps the direct call in the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from .errors import ConfigError

# (model, batch) -> (the output the losses and metrics take, what the model returned)
Call = Callable[[torch.nn.Module, Any], tuple[Any, Any]]


class ModelLoss(NamedTuple):
    """What a ``loss`` factory returns to optimize the loss the model computes itself (given its
    targets: ``[model] targets``): `picked` out of what the model returns, as ``model.output`` picks
    the logits (an index, a key or an attribute)."""

    picked: str = "loss"

    def __call__(self, returned: Any) -> torch.Tensor:
        return pick(returned, self.picked, "loss.output")


def pick(returned: Any, spec: str, key: str) -> Any:
    """Item `spec` of what a model returned: an index of a tuple or list (``"0"``), else a key of a
    dict or an attribute (``"logits"``); a ConfigError naming the setting `key` when it has none."""
    try:
        if spec.lstrip("-").isdigit():
            return returned[int(spec)]
        return returned[spec] if isinstance(returned, Mapping) else getattr(returned, spec)
    except (IndexError, KeyError, AttributeError, TypeError):
        raise ConfigError(f"{key}: {spec!r} is not in what the model returns ({described(returned)})") from None


def described(returned: Any) -> str:
    """What a model returned, in words: ``a tuple of 2``, ``a dict with keys logits, loss``."""
    if isinstance(returned, Mapping):
        return f"a {type(returned).__name__} with keys {', '.join(map(str, returned))}"
    if isinstance(returned, (tuple, list)):
        return f"a {type(returned).__name__} of {len(returned)}"
    return f"a {type(returned).__name__}"


def output_of(spec: str) -> Callable[[Any], Any]:
    """What picks the logits (``model.output`` = `spec`) out of what the model returns."""
    if not spec:
        return lambda returned: returned
    return lambda returned: pick(returned, spec, "model.output")


def plain(model: torch.nn.Module, batch: Any) -> tuple[Any, Any]:
    """The tutorial's call: ``model(x)``, which returns the output itself."""
    output = model(batch.x)
    return output, output


def model_call(settings: Mapping[str, Any], keywords: bool) -> Call:
    """The call of the ``[model]`` `settings` (its ``targets`` and ``output``), for inputs that are
    a dict (`keywords`: unpacked into keyword arguments) or not: `plain` when there is nothing to
    add to ``model(x)``."""
    targets, output = settings["targets"], output_of(settings["output"])
    if not targets and not settings["output"] and not keywords:
        return plain
    if targets == "argument" and keywords:
        raise ConfigError(
            "model.targets: 'argument' (the second positional argument) cannot follow inputs given as keywords "
            "(the batches' inputs are a dict): name the keyword, as model.targets = 'labels'"
        )
    if not targets:
        called = (lambda model, batch: model(**batch.x)) if keywords else (lambda model, batch: model(batch.x))
    elif targets == "argument":
        called = lambda model, batch: model(batch.x, batch.y)  # noqa: E731
    elif keywords:
        called = lambda model, batch: model(**batch.x, **{targets: batch.y})  # noqa: E731
    else:
        called = lambda model, batch: model(batch.x, **{targets: batch.y})  # noqa: E731

    def call(model: torch.nn.Module, batch: Any) -> tuple[Any, Any]:
        returned = called(model, batch)
        return output(returned), returned

    return call
