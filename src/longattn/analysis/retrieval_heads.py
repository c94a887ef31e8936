"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality").

A head *retrieves* when, while the model copies a needle from its context, the key the head attends
to most is the very token being copied. The retrieval score of a head is the share of the needle's
tokens that the model copied correctly while the head's top key was the source of that token;
heads above 0.1 are retrieval heads (the paper's threshold).

Here the copy is teacher-forced: the answer tokens are in the input, and at the query that predicts
answer token ``y`` (position ``answer_pos − 1``) the model's argmax must be ``y`` and the head's argmax
key must lie in the needle span and hold ``y``. A causal model's prediction depends only on earlier
tokens, so this equals greedy decoding of the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from longattn.analysis.capture import RowRecorder
from longattn.analysis.subject import Subject

Tensor = torch.Tensor

#: Wu et al.'s threshold: heads scoring above it are retrieval heads
RETRIEVAL_THRESHOLD = 0.1


@dataclass
class CopyProbe:
    """Inputs for the retrieval score.

    Attributes:
        tokens: int64 ``[B, T]``.
        answer_pos: int64 ``[B, m]``: positions of the copied tokens (the logits at
            ``answer_pos − 1`` predict them).
        answer_mask: bool ``[B, m]``: real answers.
        span: int64 ``[B, 2]``: the needle ``[start, end)`` the answers are copied from.
    """

    tokens: Tensor
    answer_pos: Tensor
    answer_mask: Tensor
    span: Tensor

    def __post_init__(self):
        if self.tokens.dim() != 2 or self.tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be int64 [B, T], got {self.tokens.dtype} {tuple(self.tokens.shape)}")
        b, t = self.tokens.shape
        if self.answer_pos.shape[0] != b or self.answer_mask.shape != self.answer_pos.shape or self.span.shape != (b, 2):
            raise ValueError(f"answer_pos / answer_mask must be [B, m] and span [B, 2] with B = {b}, got "
                             f"{tuple(self.answer_pos.shape)}, {tuple(self.answer_mask.shape)}, {tuple(self.span.shape)}")
        if self.answer_pos.numel() and (int(self.answer_pos.min()) < 1 or int(self.answer_pos.max()) >= t):
            raise ValueError(f"answer_pos must lie in [1, {t - 1}] (the logits at answer_pos - 1 predict them), got "
                             f"[{int(self.answer_pos.min())}, {int(self.answer_pos.max())}]")
        if bool((self.span[:, 0] < 0).any() | (self.span[:, 1] > t).any() | (self.span[:, 0] >= self.span[:, 1]).any()):
            raise ValueError(f"span must hold [start, end) with 0 <= start < end <= {t}, got {self.span.tolist()}")

    @classmethod
    def from_passkey(cls, batch, digits: int) -> "CopyProbe":
        """A probe from a ``tasks.synthetic.passkey`` batch: the needle is the ``digits`` passkey
        digits after the ``<passkey>`` marker at ``needle_pos``."""
        start = batch.needle_pos + 1
        return cls(batch.tokens, batch.answer_pos, batch.answer_mask, torch.stack([start, start + digits], 1))

    @classmethod
    def repeat(cls, haystack: Tensor, segment: Tensor, depths, *, prefix: Tensor | None = None) -> "CopyProbe":
        """A copy-paste probe for any language model: ``prefix + haystack[:d] + segment +
        haystack[d:] + segment`` for each depth (share of the haystack before the needle); the answers
        are the repeated segment's tokens after its first (the first cannot be known to be a copy).

        Args:
            haystack: int64 ``[H]`` filler tokens (e.g. the model's own text).
            segment: int64 ``[S]`` the needle, ``S >= 2``.
            depths: shares in ``[0, 1]``, one sample each.
            prefix: int64 tokens placed first (a BOS).
        """
        if segment.dim() != 1 or segment.numel() < 2:
            raise ValueError(f"segment must be a 1-D token tensor of >= 2 tokens, got shape {tuple(segment.shape)}")
        pre = prefix if prefix is not None else haystack.new_zeros(0)
        rows, spans = [], []
        for d in depths:
            if not 0.0 <= float(d) <= 1.0:
                raise ValueError(f"depths must lie in [0, 1], got {d}")
            off = int(round(float(d) * haystack.numel()))
            rows.append(torch.cat([pre, haystack[:off], segment, haystack[off:], segment]))
            spans.append([pre.numel() + off, pre.numel() + off + segment.numel()])
        tokens = torch.stack(rows)
        t, s = tokens.shape[1], segment.numel()
        pos = torch.arange(t - s + 1, t).expand(len(rows), -1).clone()
        return cls(tokens, pos, torch.ones_like(pos, dtype=torch.bool), torch.tensor(spans))


@dataclass
class RetrievalScores:
    """``scores [layers, heads]`` (Wu et al.'s retrieval score), the model's copy accuracy on the
    probe (``copied``: share of answer tokens predicted right) and how many answer tokens there were."""

    scores: Tensor
    copied: float
    n_tokens: int

    def retrieval_heads(self, threshold: float = RETRIEVAL_THRESHOLD) -> list[tuple[int, int]]:
        """``(layer, head)`` pairs scoring above ``threshold``, best first."""
        return [h for h in self.ranked() if float(self.scores[h]) > threshold]

    def ranked(self) -> list[tuple[int, int]]:
        """Every ``(layer, head)``, highest score first (ties: layer-major order)."""
        n_heads = self.scores.shape[1]
        order = np.argsort(-self.scores.flatten().numpy(), kind="stable")
        return [(int(i) // n_heads, int(i) % n_heads) for i in order]

    def head_map(self, n_kv_heads: int, share: float = 0.25) -> dict:
        """A head map for the ``heads`` KV policy (``LongattnCache(model, "heads", head_map=...)``,
        the format of ``longattn calibrate-heads``): scores averaged over each key head's query
        heads, the top ``share`` of (layer, key head) pairs marked retrieval (full cache), the rest
        streaming (sinks + window)."""
        from longattn.memory.calibrate import group_mean, select_retrieval

        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must lie in (0, 1], got {share}")
        per_kv = group_mean(self.scores.double(), n_kv_heads)
        return {"method": "retrieval_score", "retrieval": select_retrieval(per_kv, share).tolist(),
                "scores": per_kv.tolist(), "retrieval_share": share, "copied": self.copied,
                "n_tokens": self.n_tokens}

    def as_dict(self) -> dict:
        return {"scores": self.scores.tolist(), "copied": self.copied, "n_tokens": self.n_tokens,
                "threshold": RETRIEVAL_THRESHOLD, "retrieval_heads": self.retrieval_heads()}


def retrieval_scores(subject: Subject, probe: CopyProbe, *, batch_size: int = 4) -> RetrievalScores:
    """Wu et al.'s retrieval score of every head of ``subject`` on ``probe`` (see the module
    docstring), ``batch_size`` samples per forward."""
    if not subject.causal or not subject.has_logits:
        raise ValueError(f"retrieval scores need a causal language model with its LM head; {subject.name} is "
                         f"{'an encoder' if not subject.causal else 'a decoder without an LM head (load it as …ForCausalLM)'}")
    hits = torch.zeros(subject.n_layers, subject.n_heads)
    copied = total = 0
    for i0 in range(0, probe.tokens.shape[0], batch_size):
        tokens = probe.tokens[i0:i0 + batch_size]
        pos = probe.answer_pos[i0:i0 + batch_size]
        mask = probe.answer_mask[i0:i0 + batch_size]
        span = probe.span[i0:i0 + batch_size]
        rec = RowRecorder(pos - 1)
        logits = subject.run(tokens, rec)
        target = tokens.gather(1, pos)
        right = (logits.gather(1, (pos - 1)[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1) == target) & mask
        copied += int(right.sum())
        total += int(mask.sum())
        for layer, probs in rec.probs.items():
            top = probs.argmax(-1)                                          # [B, H, m]: each head's top key
            in_span = (top >= span[:, None, None, 0]) & (top < span[:, None, None, 1])
            same = tokens.gather(1, top.flatten(1)).view_as(top) == target[:, None, :]
            hits[layer] += (in_span & same & right[:, None, :]).sum((0, 2)).float()
    return RetrievalScores(hits / max(1, total), copied / max(1, total), total)
