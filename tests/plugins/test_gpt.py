"""plugins/gpt.py: the causal transformer decoder against attention written out by hand, its
causality, weight tying and initialization, its sizes from the data, and a run that learns."""

from __future__ import annotations

import math

import pytest
import torch
from engine_plugins.gpt import gpt
from torch.nn import functional as F

import engine
from tests.helpers import job

INFO = engine.DataInfo(n_features=6, n_outputs=11, task="sequence", n_train=10)


def by_hand(model, idx: torch.Tensor) -> torch.Tensor:
    """The decoder's logits, its attention as softmax(q k^T / sqrt(d)) with the future masked."""
    time = idx.shape[1]
    x = model.tokens(idx) + model.positions.weight[:time]
    mask = torch.ones(time, time, dtype=torch.bool).tril()
    for block in model.blocks:
        attention = block.attention
        h = block.attention_norm(x)
        q, k, v = attention.qkv(h).split(x.shape[-1], dim=-1)
        heads = attention.heads
        q, k, v = (t.view(*t.shape[:2], heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(x.shape)
        x = x + attention.projection(attended)
        h = block.feed_forward_norm(x)
        x = x + block.feed_forward.projection(F.gelu(block.feed_forward.expand(h)))
    return model.head(model.norm(x))


@pytest.mark.parametrize("bias", [False, True])
def test_the_decoder_is_causal_attention_as_written_out(bias):
    torch.manual_seed(0)
    model = gpt(INFO, n_layer=2, n_head=2, n_embd=8, bias=bias).eval()
    idx = torch.randint(0, 11, (3, 6))
    logits = model(idx)
    assert logits.shape == (3, 6, 11)
    torch.testing.assert_close(logits, by_hand(model, idx), rtol=1e-5, atol=1e-5)
    changed = idx.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 11  # a later token changes nothing before it
    torch.testing.assert_close(model(changed)[:, :4], logits[:, :4])
    assert not torch.allclose(model(changed)[:, 4:], logits[:, 4:])
    torch.testing.assert_close(model(idx[:, :3]), logits[:, :3])  # a shorter context is a prefix


def test_weights_are_tied_and_start_as_gpt2s():
    torch.manual_seed(0)
    model = gpt(INFO, n_layer=4, n_head=4, n_embd=64)
    assert model.head.weight is model.tokens.weight
    names = {name for name, _ in model.named_parameters()}
    assert "head.weight" not in names  # counted once: tied
    assert sum(p.numel() for p in model.parameters()) == 11 * 64 + 6 * 64 + 4 * (12 * 64 * 64 + 2 * 64) + 64
    assert not any(name.endswith("bias") for name in names)  # bias = False: none at all
    assert model.blocks[0].attention.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    deep = torch.cat([b.feed_forward.projection.weight.flatten() for b in model.blocks])
    assert deep.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    untied = gpt(INFO, n_embd=16, n_head=2, tie_weights=False)
    assert untied.head.weight is not untied.tokens.weight


def test_sizes_come_from_the_data_unless_given_and_misfits_are_one_line():
    model = gpt(INFO, n_layer=1, n_head=1, n_embd=4)
    assert (model.block_size, model.tokens.num_embeddings) == (6, 11)
    larger = gpt(INFO, n_layer=1, n_head=1, n_embd=4, block_size=16, vocab_size=64)
    assert (larger.block_size, larger.tokens.num_embeddings) == (16, 64)
    with pytest.raises(engine.ConfigError, match=r"^model.n_embd: 10 must divide by model.n_head \(4\)$"):
        gpt(INFO, n_embd=10, n_head=4)
    with pytest.raises(engine.ConfigError, match=r"^model.block_size: 4, but the data's windows are 6 tokens long$"):
        gpt(INFO, block_size=4)
    with pytest.raises(engine.ConfigError, match=r"^model.vocab_size: 8, but the data's token ids go up to 10$"):
        gpt(INFO, vocab_size=8)
    with pytest.raises(ValueError, match="a sequence of 7 tokens is longer than the model's block_size"):
        model(torch.zeros(1, 7, dtype=torch.long))


@pytest.mark.slow
def test_a_gpt_run_learns_the_next_token():
    result = engine.run(
        job(
            epochs=30,
            data={"name": "tests.helpers:next_tokens", "batch_size": 16, "val_fraction": 0.25},
            model={"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16},
            loss={"name": "cross_entropy"},
            optimizer={"name": "adamw", "lr": 0.01, "decay": "matrices"},
        )
    )
    assert result.metrics["val_accuracy"] > 0.95 and result.metrics["val_perplexity"] < 1.5
