"""``model.name = "gpt"``: a causal transformer decoder for language models, written for this engine.

Token ids ``[N, T]`` in, logits ``[N, T, vocabulary]`` out, for every position: a token and a
position embedding, ``n_layer`` pre-norm blocks (causal self-attention with ``n_head`` heads
through ``scaled_dot_product_attention``, then a 4x wide GELU feed-forward layer, each added to
the residual stream), a final LayerNorm and a linear head whose weight is the token embedding's
(``tie_weights``). The weights start from N(0, 0.02), the biases from 0, and the projections
back into the residual stream from N(0, 0.02 / sqrt(2 n_layer)), as GPT-2 does, so that the
stream's variance does not grow with depth.

``block_size`` (the longest context) and ``vocab_size`` are the data's unless set: the token
data's window length and its vocabulary (`engine.DataInfo` ``n_features`` and ``n_outputs``).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import nn
from torch.nn import functional as F

import engine

Count = Annotated[int, engine.Range(ge=1)]
Inferred = Annotated[int, engine.Range(ge=0)]  # 0: from the data
Rate = Annotated[float, engine.Range(ge=0, lt=1)]


class CausalSelfAttention(nn.Module):
    """Every position attends to itself and the positions before it, in `heads` heads."""

    def __init__(self, width: int, heads: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width, bias=bias)  # queries, keys and values in one matmul
        self.projection = nn.Linear(width, width, bias=bias)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        # [N, T, 3 x width] -> 3 of [N, heads, T, width / heads]
        q, k, v = self.qkv(x).view(batch, time, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.residual_dropout(self.projection(attended.transpose(1, 2).reshape(batch, time, width)))


class FeedForward(nn.Module):
    def __init__(self, width: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.expand = nn.Linear(width, 4 * width, bias=bias)
        self.projection = nn.Linear(4 * width, width, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.projection(F.gelu(self.expand(x))))


class Block(nn.Module):
    """Pre-norm: each sublayer sees the normalized stream and adds its result to it."""

    def __init__(self, width: int, heads: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width, bias=bias)
        self.attention = CausalSelfAttention(width, heads, dropout, bias)
        self.feed_forward_norm = nn.LayerNorm(width, bias=bias)
        self.feed_forward = FeedForward(width, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.feed_forward_norm(x))


class GPT(nn.Module):
    """The decoder: token ids [N, T] (T up to `block_size`) to logits [N, T, `vocab_size`]."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        dropout: float,
        bias: bool,
        tie_weights: bool,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tokens = nn.Embedding(vocab_size, n_embd)
        self.positions = nn.Embedding(block_size, n_embd)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:  # one matrix embeds tokens and scores them: fewer weights, and it learns from both
            self.head.weight = self.tokens.weight
        self.initialize(n_layer)

    def initialize(self, n_layer: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # what each block adds to the residual stream: scaled by depth
            for projection in (block.attention.projection, block.feed_forward.projection):
                nn.init.normal_(projection.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        time = idx.shape[1]
        if time > self.block_size:
            raise ValueError(f"a sequence of {time} tokens is longer than the model's block_size ({self.block_size})")
        x = self.dropout(self.tokens(idx) + self.positions.weight[:time])
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def gpt(
    info: engine.DataInfo,
    n_layer: Count = 4,
    n_head: Count = 4,
    n_embd: Count = 128,
    block_size: Inferred = 0,
    vocab_size: Inferred = 0,
    dropout: Rate = 0.0,
    bias: bool = False,
    tie_weights: bool = True,
) -> GPT:
    """A causal transformer decoder (see the module docstring); `block_size` and `vocab_size` 0:
    the data's window length and vocabulary. `bias`: in the linear layers and LayerNorms."""
    if n_embd % n_head:
        raise engine.ConfigError(f"model.n_embd: {n_embd} must divide by model.n_head ({n_head})")
    vocabulary, context = vocab_size or info.n_outputs, block_size or info.n_features
    if info.n_outputs > vocabulary:
        raise engine.ConfigError(
            f"model.vocab_size: {vocabulary}, but the data's token ids go up to {info.n_outputs - 1}"
        )
    if info.n_features > context:
        raise engine.ConfigError(
            f"model.block_size: {context}, but the data's windows are {info.n_features} tokens long"
        )
    return GPT(vocabulary, context, n_layer, n_head, n_embd, dropout, bias, tie_weights)


@engine.hookimpl
def register_components():
    return {"model": {"gpt": gpt}}
