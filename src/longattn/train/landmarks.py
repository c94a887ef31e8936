"""Landmark tokens in the data (Mohtashami & Jaggi 2023, "Landmark Attention"): after every
``block - 1`` ordinary tokens a landmark token is inserted, so position ``b·block + block - 1`` of
the new sequence holds block ``b``'s landmark — the layout ``landmark_trained`` attends with.

A model learns to use them when trained on batches passed through :func:`with_landmarks` (or the
:class:`WithLandmarks` recipe) with ``method="landmark_trained"``; the landmark id is one id past
the task vocabulary (the model's ``vocab_size`` grows by one). The loss stays on the answer tokens:
an answer's position moves with the tokens inserted before it, and when a landmark falls right
before an answer, the landmark's logits predict it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from longattn.core import validate
from longattn.tasks.synthetic import VOCAB, TaskBatch

#: the landmark token of the synthetic tasks' vocabulary (one past ``VOCAB``'s ids)
LANDMARK_ID = VOCAB.size


def landmark_index(positions: torch.Tensor, block: int) -> torch.Tensor:
    """Where original positions land once landmarks are inserted: ``p + p // (block - 1)``."""
    return positions + positions // (block - 1)


def insert_landmarks(tokens: torch.Tensor, *, block: int, landmark_id: int = LANDMARK_ID) -> torch.Tensor:
    """``tokens [n, T]`` with a landmark after every ``block - 1`` tokens → ``[n, T + T // (block-1)]``
    (a trailing partial block gets no landmark: it is still being read)."""
    validate.check_positive_int("block", block)
    if block < 2:
        raise ValueError(f"block must be >= 2 (ordinary tokens and a landmark), got {block}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [n, T], got shape {tuple(tokens.shape)}")
    n, t = tokens.shape
    length = t + t // (block - 1)
    out = torch.full((n, length), landmark_id, dtype=tokens.dtype, device=tokens.device)
    out[:, landmark_index(torch.arange(t, device=tokens.device), block)] = tokens
    return out


def with_landmarks(batch: TaskBatch, *, block: int, landmark_id: int = LANDMARK_ID) -> TaskBatch:
    """``batch`` with landmark tokens inserted and its answer / needle positions moved with them."""
    needle = torch.where(batch.needle_pos >= 0, landmark_index(batch.needle_pos.clamp_min(0), block), batch.needle_pos)
    return TaskBatch(batch.task, insert_landmarks(batch.tokens, block=block, landmark_id=landmark_id),
                     landmark_index(batch.answer_pos, block), batch.answer_mask, needle, batch.depth)


def with_landmarks_length(length: int, block: int) -> int:
    """The length of a ``length``-token sequence once landmarks are inserted."""
    return length + length // (block - 1)


@dataclass(frozen=True)
class WithLandmarks:
    """A training recipe whose every batch carries landmark tokens (:func:`with_landmarks`).

    Args:
        task: the recipe's ``to_dict()`` (``RetrievalCurriculum``, ``MQARTask``), so the wrapper
            stays a plain frozen dataclass that serialises into a checkpoint.
        block: the landmark method's block (ordinary tokens + the landmark).
    """

    task: dict
    block: int = 64
    landmark_id: int = LANDMARK_ID

    name = "landmarks"

    def __post_init__(self):
        validate.check_positive_int("block", self.block)
        if self.block < 2:
            raise ValueError(f"block must be >= 2 (ordinary tokens and a landmark), got {self.block}")
        self.inner  # names a bad inner recipe now

    @property
    def inner(self):
        from longattn.train.data import recipe_from_dict

        return recipe_from_dict(self.task)

    @property
    def longest(self) -> int:
        return with_landmarks_length(self.inner.longest, self.block)

    def batch(self, step: int, seed: int, tokens_per_step: int) -> TaskBatch:
        return with_landmarks(self.inner.batch(step, seed, tokens_per_step), block=self.block,
                              landmark_id=self.landmark_id)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


def landmark_evaluation(model, *, block: int, seed: int = 12345, n: int = 32,
                        landmark_id: int = LANDMARK_ID) -> dict[str, Any]:
    """A landmark model's accuracies at its trained lengths (``train_retrieval.final_evaluation``'s
    cells, with landmarks inserted and ``landmark_trained`` over every earlier block)."""
    import time

    from longattn.methods.landmark_trained import LandmarkTrained
    from longattn.tasks import synthetic
    from longattn.train.data import evaluate

    method = LandmarkTrained(block=block)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"method": "landmark_trained", "n_per_cell": n, "seed": seed}

    def acc(batch: TaskBatch) -> float:
        return evaluate(model, with_landmarks(batch, block=block, landmark_id=landmark_id), method, batch_size=n).accuracy

    for length in (256, 512):
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            out[f"passkey@{length}/depth{depth:g}"] = acc(synthetic.passkey(length, depth, n, seed))
        out[f"needle@{length}/depth0.5"] = acc(synthetic.needle(length, 0.5, n, seed))
    out["mqar@512/8pairs"] = acc(synthetic.mqar(512, 8, n, seed))
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def memory_evaluation(model, batch: TaskBatch, *, block: int, top_k: int = 4, local: int = 1,
                      chunk: int | None = None, host_tokens: int | None = None, disk_dir=None) -> dict[str, Any]:
    """A landmark model reading ``batch`` (landmarks already inserted) through one
    ``LandmarkMemory`` per layer, ``chunk`` tokens per step (default: one block), one sample at a
    time: teacher-forced answer accuracy (as :func:`longattn.train.data.evaluate`) and what the
    memory kept hot.

    Returns:
        ``accuracy``; ``peak_hot_tokens`` (most k/v tokens one step of one layer held on the fast
        tier: the fetched blocks, the open block and the chunk), ``context_tokens`` (the sequence
        length), ``host_bytes`` / ``disk_bytes`` (per layer, last sample) and ``ms_per_token``.
    """
    import time

    from longattn.memory.landmark import landmark_memories

    chunk = block if chunk is None else chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    correct, peak, tiers = [], 0, {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(batch.n):
            tokens = batch.tokens[i:i + 1]
            memories = landmark_memories(model.config.n_layers, block=block, top_k=top_k, local=local,
                                         host_tokens=host_tokens, disk_dir=disk_dir)
            try:
                logits = torch.cat([model(tokens[:, s:s + chunk], state=memories)
                                    for s in range(0, tokens.shape[1], chunk)], 1)
                peak = max(peak, *(m.peak_hot_tokens for m in memories))
                tiers = memories[0].nbytes()
            finally:
                for m in memories:
                    m.close()
            pos, mask = batch.answer_pos[i], batch.answer_mask[i]
            hits = (logits[0, pos - 1].argmax(-1) == tokens[0, pos]) | ~mask
            correct.append(bool(hits.all()))
    wall = time.perf_counter() - t0
    return {"accuracy": sum(correct) / max(1, len(correct)), "peak_hot_tokens": peak,
            "context_tokens": int(batch.tokens.shape[1]), "host_bytes": tiers.get("host", 0),
            "disk_bytes": tiers.get("disk", 0), "ms_per_token": 1e3 * wall / max(1, batch.tokens.numel())}
