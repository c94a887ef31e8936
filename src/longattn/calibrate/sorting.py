"""Attention sorting (Peysakhovich & Lerer 2023, "Attention Sorting Combats Recency Bias In Long
Context Language Models").

A model given several documents attends more to the ones it will use, but answers better from
documents placed late in the context. Attention sorting runs the model once, measures how much
attention each document receives at the step that starts the answer (averaged over every layer and
head), re-orders the documents so the most attended come last, repeats a few rounds, then answers.
Only the order of the documents changes; no weight and no attention value is touched.
"""

from __future__ import annotations

import torch

from longattn.analysis.capture import attention_rows
from longattn.analysis.subject import Subject
from longattn.tasks.synthetic import DocumentsBatch

Tensor = torch.Tensor


def document_attention(subject: Subject, batch: DocumentsBatch) -> Tensor:
    """``[n, n_docs]`` float32: the attention mass each document receives from the query that
    predicts the first answer token, averaged over every layer and head."""
    rows = batch.answer_pos[:, :1] - 1
    probs = attention_rows(subject, batch.tokens, rows)
    mass = torch.zeros(batch.n, batch.n_docs)
    for p in probs.values():                                        # [n, H, 1, T]
        p = p[:, :, 0].mean(1)                                      # [n, T]
        for i in range(batch.n_docs):
            mass[:, i] += p[:, batch.doc_start(i):batch.doc_start(i + 1)].sum(-1)
    return mass / len(probs)


def attention_sort(subject: Subject, batch: DocumentsBatch, rounds: int = 2) -> DocumentsBatch:
    """``batch`` with each sample's documents re-ordered ``rounds`` times by the attention they
    receive, least attended first and most attended last (a stable sort: ties keep their order)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    for _ in range(rounds):
        mass = document_attention(subject, batch)
        order = torch.argsort(mass, dim=1, stable=True)
        batch = batch.permuted(order)
    return batch
