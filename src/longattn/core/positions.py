"""Position encodings, applied either as rotations of q/k or as a bias on the scores.

Every encoding is a ``PositionEncoding`` with a ``kind``:

* ``"rotary"`` — ``rotate(q, k, q_pos, k_pos) -> (q, k)``: RoPE (+ linear / NTK / YaRN scaling), xPos.
* ``"bias"``   — ``score_bias(h, q_pos, k_pos) -> Tensor``: ALiBi, T5 relative bias. Pure tensor ops
  on broadcastable integer tensors, so the same function serves the eager kernels and
  FlexAttention's ``score_mod``.
* ``"content"``— ``row_bias(q_rows, k, q_pos, k_pos) -> Tensor``: biases that depend on q and k
  (CoPE); only the eager tiled kernel can take them.
* ``"none"``   — NoPE.

``longattn.attention(..., position=enc)`` applies it with query positions
``tokens_k - tokens_q + i`` and key positions ``j``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

Tensor = torch.Tensor


class PositionEncoding:
    """Base class; see the module docstring for the contract of each ``kind``."""

    kind: ClassVar[str] = "none"

    def rotate(self, q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        """q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``, positions int64 ``[Tq]`` / ``[Tk]``."""
        return q, k

    def score_bias(self, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """``h``: query-head index, ``q_pos``, ``k_pos``: positions; all int64 and broadcastable
        (e.g. ``[1, H, 1, 1]``, ``[Tq, 1]``, ``[1, Tk]``). Returns float32 broadcastable to
        ``[*, H, Tq, Tk]``, added to the *scaled* scores."""
        raise NotImplementedError

    def row_bias(self, q_rows: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float) -> Tensor:
        """q_rows ``[B, Hq, bq, D]``, k ``[B, Hkv, Tk, D]``, q_pos ``[bq]``, k_pos ``[Tk]`` →
        ``[B, Hq, bq, Tk]`` float32 bias over all keys for these query rows."""
        raise NotImplementedError
