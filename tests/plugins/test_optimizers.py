"""plugins/optimizers.py: sgd, adam and adamw with their settings, equal to torch's own, and the
choice of implementation (fused where the device has it)."""

from __future__ import annotations

import pytest
import torch
from engine_plugins import optimizers
from torch import nn

import engine
from tests.helpers import job, tutorial_data


def hand_written(make_optimizer, epochs: int = 5) -> nn.Linear:
    x, y = tutorial_data()
    torch.manual_seed(42)
    model = nn.Linear(1, 1)
    optimizer = make_optimizer(model.parameters())
    for _ in range(epochs):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.mark.parametrize(
    ("section", "make"),
    [
        ({"name": "sgd", "lr": 0.05}, lambda p: torch.optim.SGD(p, lr=0.05)),
        (
            {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        ),
        ({"name": "adam", "betas": [0.8, 0.9]}, lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.9))),
        ({"name": "adam", "amsgrad": True}, lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True)),
        ({"name": "adamw", "lr": 0.02}, lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.01)),
    ],
)
def test_each_optimizer_matches_torchs(section, make):
    result = engine.run(job(epochs=5, optimizer=section))
    expected = hand_written(make)
    torch.testing.assert_close(result.model.weight, expected.weight)
    torch.testing.assert_close(result.model.bias, expected.bias)


def test_settings_reach_the_optimizer():
    trainer = engine.setup(job(optimizer={"name": "sgd", "lr": 0.3, "momentum": 0.9, "nesterov": True}))
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    defaults = trainer.optimizer.defaults
    assert (defaults["lr"], defaults["momentum"], defaults["nesterov"]) == (0.3, 0.9, True)
    adamw = engine.setup(job(optimizer={"name": "adamw"})).optimizer
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.01


def test_auto_picks_the_fused_kernel_on_cpu():
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    if "cpu" not in _get_fused_kernels_supported_devices():
        pytest.skip("this torch has no fused CPU optimizers")
    for name in ("sgd", "adam", "adamw"):
        assert engine.setup(job(optimizer={"name": name})).optimizer.defaults["fused"] is True, name


@pytest.mark.parametrize(
    ("impl", "expected"),
    [("fused", {"fused": True}), ("foreach", {"foreach": True}), ("for_loop", {"foreach": False})],
)
def test_impl_can_be_chosen(impl, expected):
    defaults = engine.setup(job(optimizer={"impl": impl})).optimizer.defaults
    assert {key: defaults[key] for key in expected} == expected


def test_auto_leaves_integer_or_empty_parameter_lists_to_torch():
    assert optimizers.implementation("auto", []) == {}
    assert optimizers.implementation("auto", [torch.zeros(2, dtype=torch.long)]) == {}


def test_an_unknown_impl_is_a_config_error():
    with pytest.raises(
        engine.ConfigError, match=r"optimizer.impl: expected one of 'auto', 'fused', 'foreach', 'for_loop', got 'fast'"
    ):
        engine.setup(job(optimizer={"impl": "fast"}))


def test_the_default_learning_rate_is_the_tutorials():
    config, _ = engine.load_config()
    assert config["optimizer"]["name"] == "adam" and config["optimizer"]["lr"] == 0.01


# --- parameter groups: weight decay on matrices alone ----------------------------------------------


class Tied(nn.Module):
    """Embeddings tied to the output layer, a norm and biases: what a transformer's groups split."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm = nn.Embedding(7, 4), nn.LayerNorm(4)
        self.hidden, self.head = nn.Linear(4, 4), nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.norm(self.embed(idx)))))


def nanogpt_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's rule (model.py, GPT.configure_optimizers), written out: every parameter of 2 or
    more dimensions is decayed (the weights of matmuls, the embeddings), the others are not."""
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return [
        {"params": [p for p in named.values() if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in named.values() if p.dim() < 2], "weight_decay": 0.0},
    ]


@pytest.mark.parametrize("factory", [optimizers.sgd, optimizers.adam, optimizers.adamw])
def test_decay_matrices_makes_nanogpts_groups_for_every_optimizer(factory):
    model = Tied()
    built = factory(list(model.parameters()), weight_decay=0.1, decay="matrices")
    expected = nanogpt_groups(model, 0.1)
    assert [[id(p) for p in group["params"]] for group in built.param_groups] == [
        [id(p) for p in group["params"]] for group in expected
    ]
    assert [group["weight_decay"] for group in built.param_groups] == [0.1, 0.0]
    assert len(built.param_groups[0]["params"]) == 2  # the tied weight once, and the hidden layer's
    everything = factory(list(model.parameters()), weight_decay=0.1)  # decay = "all": one group
    assert [group["weight_decay"] for group in everything.param_groups] == [0.1]


def test_adamw_with_matrices_decayed_trains_as_nanogpts_groups_do():
    from tests.helpers import epoch_order, next_tokens

    seed, lr = 42, 0.01
    x, y = (torch.from_numpy(array) for array in next_tokens(seed))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(5, 8), nn.LayerNorm(8), nn.Linear(8, 5))
    optimizer = torch.optim.AdamW(nanogpt_groups(model, 0.5), lr=lr, betas=(0.9, 0.99), fused=True)
    for epoch in (1, 2):
        order = epoch_order(seed, epoch, len(x))
        for start in range(0, len(x), 16):
            index = order[start : start + 16]
            loss = nn.functional.cross_entropy(model(x[index]).reshape(-1, 5), y[index].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    result = engine.run(
        job(
            epochs=2,
            data={"name": "tests.helpers:next_tokens", "batch_size": 16},
            model={"name": "tests.helpers:normed_token_model"},
            loss={"name": "cross_entropy"},
            optimizer={"name": "adamw", "lr": lr, "betas": [0.9, 0.99], "weight_decay": 0.5, "decay": "matrices"},
        )
    )
    for mine, theirs in zip(result.model.parameters(), model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    plain = engine.run(
        job(
            epochs=2,
            data={"name": "tests.helpers:next_tokens", "batch_size": 16},
            model={"name": "tests.helpers:normed_token_model"},
            loss={"name": "cross_entropy"},
            optimizer={"name": "adamw", "lr": lr, "betas": [0.9, 0.99], "weight_decay": 0.5},
            run_name="all",
        )
    )
    assert not torch.equal(plain.model[1].weight, result.model[1].weight)  # the norm was decayed there


def test_an_optimizer_of_a_plugins_own_groups_them_by_name():
    seen = {}

    def grouped(params, named_params, lr: float = 0.01):
        seen["names"] = [name for name, _ in named_params]
        biases = [p for name, p in named_params if name.endswith("bias")]
        weights = [p for name, p in named_params if not name.endswith("bias")]
        return torch.optim.SGD([{"params": weights}, {"params": biases, "lr": lr * 10}], lr=lr)

    class Grouping:
        @engine.hookimpl
        def register_components(self):
            return {"optimizer": {"grouped": grouped}}

    trainer = engine.setup(job(optimizer={"name": "grouped"}), plugins=[Grouping()])
    assert seen["names"] == ["weight", "bias"]
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [0.01, 0.1]
