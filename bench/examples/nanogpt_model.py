"""nanoGPT's own model (its ``model.py``, ``GPT``), built as a component of the engine: a factory,
no wrapper class. Put nanoGPT's folder on the import path (``PYTHONPATH=path/to/nanoGPT``) and
run bench/examples/shakespeare_char_nanogpt_model.toml from this folder.

nanoGPT's ``GPT.forward(idx, targets)`` returns ``(logits, loss)``, every position's logits and
their cross-entropy when it is given the targets: the job says so with ``[model] targets =
"argument"`` and ``output = "0"``, and ``[loss] name = "model"`` and ``output = "1"``.
"""

from __future__ import annotations

import contextlib
import io

import engine


def gpt(
    info: engine.DataInfo,
    n_layer: int = 4,
    n_head: int = 4,
    n_embd: int = 128,
    dropout: float = 0.0,
    bias: bool = False,
):
    """nanoGPT's GPT with the data's window length and vocabulary."""
    from model import GPT, GPTConfig  # nanoGPT's model.py

    config = GPTConfig(
        block_size=info.n_features,
        vocab_size=info.n_outputs,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        dropout=dropout,
        bias=bias,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
        return GPT(config)
