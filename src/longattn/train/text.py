"""Next-token training and held-out NLL on a token stream (plain language modelling), for adapting a
pretrained model to a sparse attention method and measuring what that costs in perplexity.

The task recipes of :mod:`longattn.train.data` train on synthetic tasks from scratch; this module
fine-tunes an existing :class:`~longattn.train.model.LanguageModel` (stories260K through
``longattn.models.llama2c.as_language_model``) on windows of text with the method it will run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from longattn.train.loop import TrainSettings, make_optimizer, optimizer_step
from longattn.train.model import LanguageModel

Tensor = torch.Tensor


def _rows(tokens: Tensor, name: str) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 2 or tokens.shape[0] < 1:
        raise ValueError(f"{name} must be an int64 tensor [M, N] (M rows of text), got "
                         f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
    return tokens


def text_nll(model: LanguageModel, tokens: Tensor, method=None, *, length: int) -> float:
    """Mean next-token NLL (nats) of ``tokens [M, N]`` (rows of text) read in consecutive windows of
    ``length`` tokens per row (each window from its start; a row's shorter tail dropped), with
    ``method`` in every attention layer. No gradients."""
    tokens = _rows(tokens, "tokens")
    per_row = tokens.shape[1] // length
    if per_row == 0:
        raise ValueError(f"rows of {tokens.shape[1]} tokens hold no window of length={length}")
    windows = tokens[:, :per_row * length].reshape(-1, length)
    with torch.no_grad():
        total = 0.0
        for w in windows:
            logits = model(w[None], method=method)
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], w[1:]))
    return total / windows.shape[0]


def finetune_text(model: LanguageModel, corpus: Tensor, method=None, *, steps: int, length: int = 512,
                  tokens_per_step: int = 4096, lr: float = 1e-3, seed: int = 0,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` in place on random ``length``-token windows of ``corpus [M, N]`` (rows of
    text, ``N >= length``; a window lies within one row) with
    next-token cross-entropy, attention by ``method`` (its learned parts, if the model holds them,
    train too). AdamW with the harness's warm-up and cosine decay; the windows of step ``s`` depend
    on ``(seed, s)`` only.

    Returns:
        ``{"steps", "wall_s", "tokens_per_s", "losses"}``.
    """
    corpus = _rows(corpus, "corpus")
    if corpus.shape[1] < length:
        raise ValueError(f"corpus rows hold {corpus.shape[1]} tokens; need at least length={length}")
    settings = TrainSettings(seed=seed, steps=steps, lr=lr, warmup=max(1, steps // 10),
                             tokens_per_step=tokens_per_step)
    per = max(1, tokens_per_step // length)
    model.train().requires_grad_(True)
    opt = make_optimizer(model, settings)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        rows = torch.randint(0, corpus.shape[0], (per,), generator=gen)
        starts = torch.randint(0, corpus.shape[1] - length + 1, (per,), generator=gen)
        batch = torch.stack([corpus[r, s:s + length] for r, s in zip(rows.tolist(), starts.tolist())])
        logits = model(batch, method=method)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        losses.append(optimizer_step(model, opt, loss, settings, step))
        if log is not None and ((step + 1) % max(1, steps // 5) == 0 or step + 1 == steps):
            log(f"step {step + 1}/{steps}  loss {losses[-1]:.4f}")
    wall = time.perf_counter() - t0
    model.eval().requires_grad_(False)
    return {"steps": steps, "wall_s": wall, "tokens_per_s": steps * per * length / max(wall, 1e-9), "losses": losses}
