"""What the harness trains on: task recipes that turn a step number into a batch, and the
answer loss / accuracy every recipe shares.

A recipe is a frozen dataclass with ``batch(step, seed, tokens_per_step) -> TaskBatch``: the batch of
a step depends only on the seed and the step, never on what ran before, so a run resumed from a
checkpoint sees exactly the batches the uninterrupted run would have seen. Batches come from
:mod:`longattn.tasks.synthetic` (the project's vocabulary ``VOCAB``, 176 ids).

* :class:`RetrievalCurriculum` — the recipe of the shipped retrieval model: copy alone first (the
  induction circuit forms there), then the passkey / needle / MQAR / copy mixture with the longest
  length growing to ``max_length``.
* :class:`MQARTask` — multi-query associative recall as Zoology (Arora et al. 2023) trains it: one
  length, a number of key–value pairs drawn per step, power-law query gaps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from longattn.tasks import synthetic
from longattn.tasks.synthetic import TaskBatch

Tensor = torch.Tensor


def _step_rng(seed: int, step: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(step), int(salt)])


@dataclass(frozen=True)
class RetrievalCurriculum:
    """Copy warm-up, then the retrieval mixture with a growing length (the retrieval model's recipe).

    Args:
        steps: the run's total steps (the length ramp is a share of them).
        min_length, max_length: training lengths (multiples of 16 in between are drawn).
        copy_steps: the first steps train on the copy task alone (``synthetic.copy``) at
            ``min_length … start_length`` tokens. Every copied token needs the induction circuit,
            and with many short samples per step it forms in a few hundred steps (measured when the
            shipped model was trained: ~190 steps at 32 tokens × 128 samples, ~740 at 128 × 32,
            none within 1,500 at 128 × 16); the retrieval tasks alone, with their few answers,
            stayed on the loss plateau for 1,500 steps.
        start_length, ramp: after the copy steps, the longest length drawn grows linearly from
            ``start_length`` to ``max_length`` over the next ``ramp`` share of the steps.
        mixture_weights: probabilities of passkey, needle, MQAR, copy.
    """

    steps: int = 3000
    min_length: int = 32
    start_length: int = 64
    max_length: int = 512
    copy_steps: int = 300
    ramp: float = 0.4
    mixture_weights: tuple[float, float, float, float] = (0.3, 0.2, 0.2, 0.3)

    name = "retrieval"

    def __post_init__(self):
        if not 32 <= self.min_length <= self.start_length <= self.max_length:
            raise ValueError(f"need 32 <= min_length <= start_length <= max_length, got {self.min_length}, "
                             f"{self.start_length} and {self.max_length}")

    @property
    def longest(self) -> int:
        return self.max_length

    def batch(self, step: int, seed: int, tokens_per_step: int) -> TaskBatch:
        warm = step < self.copy_steps
        frac = 0.0 if warm else min(1.0, (step - self.copy_steps) / max(1.0, self.ramp * self.steps))
        top = self.start_length + (self.max_length - self.start_length) * frac
        lengths = np.arange(self.min_length // 16, self.max_length // 16 + 1) * 16
        allowed = lengths[lengths <= max(top, lengths[0])]
        length = int(_step_rng(seed, step, 1).choice(allowed))
        n = max(2, tokens_per_step // length)
        weights = (0.0, 0.0, 0.0, 1.0) if warm else self.mixture_weights
        return synthetic.mixture(length, n, seed=seed * 1_000_003 + step, weights=weights)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class MQARTask:
    """Zoology's MQAR: each step one pair count from ``pairs``, samples of ``length`` tokens.

    Args:
        length: tokens per sample (needs ``1 + 4 · max(pairs)``).
        pairs: key–value pair counts to draw from (each at most 64, the vocabulary's keys).
        power_a: the power-law exponent of the query gaps (``synthetic.mqar``).
        copy_steps: the first steps train on the copy task (``synthetic.copy``) at ``length``
            instead: every copied token needs an induction circuit, which MQAR's few answers per
            sample take far longer to form (the retrieval model's recipe does the same).
        pairs_ramp: a curriculum over the pair counts: during the ``pairs_ramp`` steps after the
            copy steps the counts drawn grow from the smallest of ``pairs`` alone to all of them
            (the first ``1 + ⌊(len(pairs) − 1) · step / pairs_ramp⌋`` in increasing order); 0: all
            from the start. Measured here: 2-layer Gated DeltaNet and GLA models of width 64 at 64
            tokens learn 2–4 pairs within 150 steps, but with 2–12 pairs from the first step they
            were still at the uniform guess after 400.
    """

    length: int = 256
    pairs: tuple[int, ...] = (4, 8, 16, 32)
    power_a: float = 0.01
    copy_steps: int = 0
    pairs_ramp: int = 0

    name = "mqar"

    def __post_init__(self):
        if not self.pairs or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in self.pairs):
            raise ValueError(f"pairs must be positive ints, got {self.pairs!r}")
        if self.length < 1 + 4 * max(self.pairs):
            raise ValueError(f"length={self.length} is too short for {max(self.pairs)} pairs and their queries: "
                             f"need >= {1 + 4 * max(self.pairs)}")
        for name in ("copy_steps", "pairs_ramp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int (steps), got {value!r}")

    def pairs_at(self, step: int) -> tuple[int, ...]:
        """The pair counts a step draws from (the ``pairs_ramp`` curriculum)."""
        if not self.pairs_ramp:
            return tuple(self.pairs)
        counts = tuple(sorted(set(self.pairs)))
        frac = min(1.0, max(0, step - self.copy_steps) / self.pairs_ramp)
        return counts[:1 + int((len(counts) - 1) * frac)]

    @property
    def longest(self) -> int:
        return self.length

    def batch(self, step: int, seed: int, tokens_per_step: int) -> TaskBatch:
        n = max(2, tokens_per_step // self.length)
        if step < self.copy_steps:
            return synthetic.copy(self.length, n, seed=seed * 1_000_003 + step)
        n_pairs = int(_step_rng(seed, step, 2).choice(np.asarray(self.pairs_at(step))))
        return synthetic.mqar(self.length, n_pairs, n, seed=seed * 1_000_003 + step, power_a=self.power_a)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self), "pairs": list(self.pairs)}


RECIPES = {"retrieval": RetrievalCurriculum, "mqar": MQARTask}


def _recipes() -> dict[str, type]:
    from longattn.train.landmarks import WithLandmarks

    return {**RECIPES, WithLandmarks.name: WithLandmarks}


def recipe_from_dict(data: dict[str, Any]):
    """The recipe a checkpoint's ``training.task`` describes."""
    data = dict(data)
    name = data.pop("name", None)
    recipes = _recipes()
    if name not in recipes:
        raise ValueError(f"unknown task recipe {name!r}; known: {sorted(recipes)}")
    for key in ("pairs", "mixture_weights"):
        if key in data:
            data[key] = tuple(data[key])
    return recipes[name](**data)


# --------------------------------------------------------------------------------------------
# loss and accuracy of the answer tokens


@dataclass
class Accuracy:
    """Exact-match retrieval accuracy of one method on one ``TaskBatch``.

    Attributes:
        accuracy: share of samples whose every answer token is the argmax (= greedy decode right).
        token_accuracy: share of answer tokens right.
        correct: bool ``[n]`` per sample.
        n: samples.
    """

    accuracy: float
    token_accuracy: float
    correct: Tensor
    n: int


def answer_loss(model, batch: TaskBatch, method=None, *, lm_weight: float = 0.0) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over the answer tokens (+ ``lm_weight`` × next-token cross-entropy of
    every token) and the per-answer hits ``[n, m]`` (bool; padding entries count as hits)."""
    if lm_weight:
        logits = model(batch.tokens, method=method)  # [B, T, V]
        lm = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.tokens[:, 1:].flatten())
        at = logits.gather(1, (batch.answer_pos - 1)[..., None].expand(-1, -1, logits.shape[-1]))
    else:
        lm = 0.0
        at = model(batch.tokens, method=method, logits_at=batch.answer_pos - 1)
    targets, mask = batch.targets, batch.answer_mask
    ce = torch.nn.functional.cross_entropy(at.transpose(1, 2), targets, reduction="none")
    hits = (at.argmax(-1) == targets) | ~mask
    return (ce * mask).sum() / mask.sum() + lm_weight * lm, hits


def evaluate(model, batch: TaskBatch, method=None, *, batch_size: int = 1) -> Accuracy:
    """Teacher-forced argmax on every answer token of ``batch`` with attention by ``method``; a
    sample counts as right only if all its answer tokens are. ``batch_size`` samples run at once
    (1 keeps memory low at 16k–32k tokens). No gradients."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    correct, hits_all = [], 0
    with torch.no_grad():
        for i in range(0, batch.n, batch_size):
            part = batch.take(i, i + batch_size)
            _, hits = answer_loss(model, part, method)
            correct.append(hits.all(-1))
            hits_all += int((hits & part.answer_mask).sum())
    correct = torch.cat(correct)
    return Accuracy(float(correct.float().mean()), hits_all / max(1, int(batch.answer_mask.sum())), correct, batch.n)


def mqar_scores(model, task: MQARTask, *, n: int = 64, seed: int = 99_991, batch_size: int = 64) -> dict[int, Accuracy]:
    """The :class:`Accuracy` of ``model`` per pair count of ``task`` at its length, on ``n`` fresh
    samples each (``seed`` differs from every training batch's): ``{8: Accuracy(...), …}``. Its
    ``token_accuracy`` is Zoology's measure (the share of queried values recalled), its
    ``accuracy`` the share of samples with every queried value right."""
    return {p: evaluate(model, synthetic.mqar(task.length, p, n, seed=seed + p, power_a=task.power_a),
                        batch_size=batch_size)
            for p in task.pairs}


def mqar_accuracy(model, task: MQARTask, *, n: int = 64, seed: int = 99_991, batch_size: int = 64,
                  per: str = "query") -> dict[str, float]:
    """MQAR accuracy per pair count (:func:`mqar_scores`) keyed ``"mqar@256/8pairs"``.

    ``per="query"`` (default) is Zoology's measure: the share of queried values predicted right
    (each key–value query counts once). ``per="sample"`` is stricter: the share of samples whose
    every queried value is right (with 12 queries per sample and 90% per query, about 28%)."""
    if per not in ("query", "sample"):
        raise ValueError(f"per must be 'query' or 'sample', got {per!r}")
    return {f"mqar@{task.length}/{p}pairs": acc.token_accuracy if per == "query" else acc.accuracy
            for p, acc in mqar_scores(model, task, n=n, seed=seed, batch_size=batch_size).items()}
