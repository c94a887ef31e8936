"""Found in the Middle (Hsieh et al. 2024, "Found in the Middle: Calibrating Positional Attention
Bias Improves Long Context Utilization").

The attention a document receives mixes two things: how relevant it is, and where it sits (a
positional bias, U-shaped in the paper's LLMs). The paper models it as
``attention(doc, k) = f(relevance(doc)) + bias(k)`` and measures ``bias(k)`` with an irrelevant
("dummy") document placed at each position ``k``; subtracting it leaves a calibrated relevance.
Two uses, both here:

* **ranking** — order documents by calibrated attention (:func:`calibrated_relevance`);
* **attention calibration** — during the answer, rescale the attention on each document's tokens so
  the document's share follows its calibrated relevance (:class:`PositionCalibration`), in every
  layer and head, for the query rows after the documents.

``bias`` is estimated per layer, head and document slot as the mean attention on documents that do
*not* answer the question (each an irrelevant document at that slot, averaged over samples).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from longattn.analysis.capture import attention_rows
from longattn.analysis.stats import attention_tiles
from longattn.analysis.subject import Attend, Site, Subject, dense_attend
from longattn.tasks.synthetic import DocumentsBatch

Tensor = torch.Tensor


def slot_attention(subject: Subject, batch: DocumentsBatch) -> Tensor:
    """``[n, layers, heads, n_docs]``: the attention mass each document slot receives from the query
    that predicts the first answer token."""
    rows = batch.answer_pos[:, :1] - 1
    probs = attention_rows(subject, batch.tokens, rows)
    out = torch.zeros(batch.n, subject.n_layers, subject.n_heads, batch.n_docs)
    for layer, p in probs.items():
        for i in range(batch.n_docs):
            out[:, layer, :, i] = p[:, :, 0, batch.doc_start(i):batch.doc_start(i + 1)].sum(-1)
    return out


def positional_bias(subject: Subject, batches: Sequence[DocumentsBatch]) -> Tensor:
    """``[layers, heads, n_docs]``: the mean attention on a document at each slot when it does not
    answer the question (the paper's dummy-document measurement, averaged over ``batches`` whose
    gold documents sit at varied slots)."""
    total, count = None, None
    for b in batches:
        att = slot_attention(subject, b)                                     # [n, L, H, D]
        irrelevant = torch.ones(b.n, b.n_docs)
        irrelevant[torch.arange(b.n), b.gold] = 0.0
        part = (att * irrelevant[:, None, None, :]).sum(0)
        total = part if total is None else total + part
        count = irrelevant.sum(0) if count is None else count + irrelevant.sum(0)
    if total is None:
        raise ValueError("positional_bias needs at least one batch")
    return total / count.clamp_min(1)


def calibrated_relevance(subject: Subject, batch: DocumentsBatch, bias: Tensor) -> tuple[Tensor, Tensor]:
    """``(raw, calibrated)``, each ``[n, n_docs]``: the attention each document receives (mean over
    layers and heads) and the same with the positional bias subtracted."""
    att = slot_attention(subject, batch)
    return att.mean((1, 2)), (att - bias[None]).mean((1, 2))


@dataclass
class PositionCalibration:
    """An ``Attend`` that applies Found-in-the-Middle's attention calibration.

    For every query row after the documents (the question and the answer), in every layer and
    head, the attention mass ``m_k`` on document ``k`` becomes ``max(m_k − bias_k, 0)``, rescaled so
    the documents keep their total share; the tokens of a document keep their proportions, other
    tokens (BOS, question) keep theirs. Rows before the end of the documents are the model's own.

    Attributes:
        bias: ``[layers, heads, n_docs]`` from :func:`positional_bias`.
        n_docs, doc_len: the layout (documents start at token 1).
        strength: the share of the bias subtracted (1 = the paper's calibration, 0 = none).
        inner: the attention elsewhere.
    """

    bias: Tensor
    n_docs: int
    doc_len: int
    strength: float = 1.0
    inner: Attend = dense_attend

    def __post_init__(self):
        if not isinstance(self.bias, torch.Tensor) or self.bias.dim() != 3 or self.bias.shape[-1] != self.n_docs:
            got = tuple(self.bias.shape) if isinstance(self.bias, torch.Tensor) else type(self.bias).__name__
            raise ValueError(f"bias must be [layers, heads, n_docs={self.n_docs}] (positional_bias), got {got}")
        if not bool(torch.isfinite(self.bias).all()):
            raise ValueError("bias holds non-finite values")
        if not 0.0 <= float(self.strength) <= 1.0:
            raise ValueError(f"strength must lie in [0, 1], got {self.strength}")

    def __call__(self, site: Site, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = self.inner(site, q, k, v)
        if self.strength == 0.0:
            return out
        tq, tk = q.shape[2], k.shape[2]
        end = 1 + self.n_docs * self.doc_len
        first_row = max(0, end - (tk - tq))                  # query rows at positions >= end
        if first_row >= tq:
            return out
        hq, hk = q.shape[1], k.shape[1]
        vf = v.float().repeat_interleave(hq // hk, dim=1)
        slot = torch.full((tk,), -1, dtype=torch.long, device=q.device)
        slot[1:end] = torch.arange(end - 1, device=q.device) // self.doc_len
        onehot = torch.nn.functional.one_hot(slot.clamp_min(0), self.n_docs).float() * (slot >= 0)[:, None]
        bias = self.bias[site.layer].to(q.device).float()     # [Hq, n_docs]
        out = out.clone()
        for i0, p, _ in attention_tiles(q[:, :, first_row:], k, scale=site.scale, causal=site.causal,
                                        key_padding_mask=site.key_padding_mask):
            mass = p @ onehot                                                    # [B, H, t, n_docs]
            cal = (mass - self.strength * bias[None, :, None, :]).clamp_min(0.0)
            total, total_cal = mass.sum(-1, keepdim=True), cal.sum(-1, keepdim=True)
            cal = torch.where(total_cal > 0, cal * total / total_cal.clamp_min(1e-30), mass)
            gain = torch.where(mass > 0, cal / mass.clamp_min(1e-30), torch.ones_like(mass))
            token_gain = gain @ onehot.T + (slot < 0).float()                  # [B, H, t, Tk]
            rows = slice(first_row + i0, first_row + i0 + p.shape[2])
            out[:, :, rows] = ((p * token_gain) @ vf).to(out.dtype)
        return out


def accuracy_by_position(subject: Subject, make: Callable[[int], DocumentsBatch], positions: Sequence[int],
                         attend: Attend | None = None,
                         transform: Callable[[DocumentsBatch], DocumentsBatch] | None = None) -> list[float]:
    """Task accuracy with the gold document at each of ``positions`` (``make(gold)`` builds the
    batch), optionally after ``transform`` (e.g. attention sorting) and with ``attend``."""
    from longattn.analysis.studies import task_accuracy

    out = []
    for g in positions:
        b = make(g)
        if transform is not None:
            b = transform(b)
        out.append(task_accuracy(subject, [b], attend))
    return out
