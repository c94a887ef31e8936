"""The project's own tiny retrieval model: a Llama-architecture decoder trained on passkey /
needle / MQAR at <= 512 tokens (``longattn.models.train_retrieval``, through the training harness
``longattn.train``), so that every longattn method can be asked whether it extends retrieval far past
the trained length.

It is an instance of the project's one small-model implementation,
:class:`longattn.train.model.LanguageModel`, with the attention mixer and the synthetic tasks'
vocabulary: token embedding (tied with the output head), ``n_layers`` pre-norm blocks of RMSNorm →
causal self-attention with rotary positions and grouped-query heads → residual, RMSNorm → SwiGLU
feed-forward → residual; a final RMSNorm. No biases.

Attention always goes through ``longattn.attention(q, k, v, causal=True, method=...,
position=RoPE(...))`` with q/k *unrotated*: ``attention`` rotates them for ordinary methods and
hands the encoding to methods that place positions themselves (``own_positions``: LongHeads), so
every registered method runs inside the model unchanged.

A checkpoint is a directory with ``model.safetensors`` (float32 weights) and ``config.json`` (the
architecture, the vocabulary it was trained on, the training settings and seed, and its measured
accuracies). The shipped one lives in ``weights/retrieval-tiny`` next to this file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import longattn
from longattn.methods.base import Method
from longattn.models.bundled import retrieval_tiny
from longattn.tasks.synthetic import VOCAB, TaskBatch
from longattn.train import checkpoint
from longattn.train.data import Accuracy, evaluate
from longattn.train.data import answer_loss as _answer_loss
from longattn.train.model import LanguageModel, ModelConfig

Tensor = torch.Tensor
#: the format tag the shipped checkpoint carries (``longattn.train.checkpoint`` reads it and its own)
FORMAT = "longattn-retrieval"
#: the checkpoint bundled with the package (``longattn.models.retrieval_tiny()``)
SHIPPED = retrieval_tiny()

MethodArg = None | str | Method | Sequence[None | str | Method]

__all__ = ["SHIPPED", "Accuracy", "RetrievalConfig", "RetrievalModel", "answer_loss", "evaluate", "forward", "load",
           "read_config", "reference_forward", "save"]


@dataclass(frozen=True)
class RetrievalConfig(ModelConfig):
    """Architecture of the tiny retrieval model: :class:`longattn.train.model.ModelConfig` with the
    shipped model's sizes as defaults.

    Args:
        vocab_size: ids of ``longattn.tasks.VOCAB`` (176).
        dim: residual width, ``n_heads × head_dim``.
        n_layers: decoder blocks (2 suffice for an induction circuit: a previous-token head in
            block 0 feeding a copying head in block 1; Olsson et al. 2022).
        n_heads, n_kv_heads: query heads and key/value heads (GQA when fewer).
        hidden_dim: SwiGLU inner width.
        max_train_length: longest training sequence (the "trained length").
    """

    vocab_size: int = VOCAB.size
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 256
    max_train_length: int = 512


class RetrievalModel(LanguageModel):
    """The tiny Llama; run it with ``forward(model, tokens, method)`` (or ``model(tokens, method=...)``)."""

    def __init__(self, config: RetrievalConfig = RetrievalConfig(), *, seed: int = 0):
        super().__init__(config, seed=seed)


def forward(model: LanguageModel, tokens: Tensor, method: MethodArg = None, *,
            logits_at: Tensor | None = None) -> Tensor:
    """Logits of the model at positions ``0 … T-1``, every attention by ``method``.

    Args:
        tokens: int64 ``[B, T]``.
        method: None (= "dense"), a registered name (default hyper-parameters), a method object
            (``longattn.method("landmark", budget=512)``), or a list with one of those per layer.
        logits_at: optional int64 ``[B, m]``: return only the logits at these positions (the
            head is the largest tensor at long lengths).

    Returns:
        float32 ``[B, T, vocab]`` or ``[B, m, vocab]``. Differentiable (training uses "dense").
    """
    return model(tokens, method=method, logits_at=logits_at)


def reference_forward(model: LanguageModel, tokens: Tensor) -> Tensor:
    """The same model in float64 with the oracle ``longattn.reference_attention`` on the rotated
    q/k: ``[B, T, vocab]`` float64. For tests (materialises ``T × T`` scores)."""
    model.check_tokens(tokens)
    ref = type(model)(model.config)
    ref.load_state_dict(model.state_dict())
    ref = ref.to(torch.float64).eval()

    def oracle(layer, q, k, v):
        return longattn.reference_attention(q, k, v, causal=True)[0]

    with torch.no_grad():
        return ref(tokens, attention=oracle)


def answer_loss(model: LanguageModel, batch: TaskBatch, method: MethodArg = None) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over the answer tokens and the per-token hits ``[n, m]`` (bool)."""
    return _answer_loss(model, batch, method)


# --------------------------------------------------------------------------------------------
# checkpoints


def save(model: LanguageModel, directory: str | Path, *, training: dict[str, Any] | None = None,
         evaluation: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (float32) and ``config.json`` (architecture, vocabulary,
    ``training`` settings incl. the seed, ``evaluation`` results) into ``directory``."""
    return checkpoint.save_model(model, directory, training=training, evaluation=evaluation, format=FORMAT)


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory."""
    return checkpoint.read_config(directory)


def load(directory: str | Path = SHIPPED) -> RetrievalModel:
    """Load a checkpoint directory (default: the shipped ``retrieval-tiny``), in eval mode."""
    directory = Path(directory)
    meta = read_config(directory)
    vocab = meta.get("vocab", {})
    if vocab.get("size") != VOCAB.size:
        raise ValueError(f"{directory} was trained on a vocabulary of {vocab.get('size')} ids, but "
                         f"longattn.tasks.VOCAB has {VOCAB.size}")
    return checkpoint.load_model(directory, cls=RetrievalModel, config_cls=RetrievalConfig)
