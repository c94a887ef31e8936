"""Moving a RoPE-rotated key to another position without ever un-rotating it for storage.

A memory keeps keys exactly as the model rotated them, at the position they were written at (their
cache index, up to a per-row padding offset that cancels in ``q·k``). To assign positions *within
the kept cache* (StreamingLLM, Xiao et al. 2024; LongHeads, Lu et al. 2024) a key read at layout
slot ``j`` is rotated on the fly by ``δ = new − old``: RoPE rotations compose, ``R(old + δ) =
R(δ)·R(old)``. Stored keys are never overwritten with re-rotated ones, so errors never accumulate
over a long decode.

The angles are computed in float64 from the model's own ``inv_freq`` (transformers' rotate-half
layout: pairs ``(i, i + D/2)``), so any RoPE whose frequencies do not depend on the sequence length
works (default, linear, llama3, YaRN: their ``attention_scaling`` already sits in the stored key
and is untouched by a unit rotation). Dynamic-NTK and LongRoPE change frequencies with the
length; re-rotating under them would be wrong, so ``from_model`` refuses them.
"""

from __future__ import annotations

import torch

#: rope types whose inverse frequencies change with the sequence length
_LENGTH_DEPENDENT = ("dynamic", "longrope")


class KeyRotation:
    """Rotates keys ``[B, H, N, D]`` by per-key position deltas ``[B, H, N]`` (rotate-half RoPE)."""

    def __init__(self, inv_freq: torch.Tensor):
        if inv_freq.ndim != 1:
            raise ValueError(f"inv_freq must be 1-D [head_dim / 2], got shape {tuple(inv_freq.shape)}")
        self.inv_freq = inv_freq.detach().to("cpu", torch.float64)

    @property
    def head_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "KeyRotation | None":
        """The rotation of a transformers decoder (``model.model.rotary_emb``), or None when it has
        no rotary embedding (then positions cannot be reassigned; keys stay where they were)."""
        rotary = None
        for m in model.modules():
            if type(m).__name__.endswith("RotaryEmbedding") and hasattr(m, "inv_freq"):
                rotary = m
                break
        if rotary is None:
            return None
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type in _LENGTH_DEPENDENT:
            raise NotImplementedError(
                f"rope_type={rope_type!r} changes its frequencies with the sequence length, so a stored key "
                "cannot be moved to a new position exactly: use positions='original' for this model")
        inv = getattr(rotary, "original_inv_freq", None)
        inv = rotary.inv_freq if inv is None else inv
        return cls(inv)

    def rotate(self, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``k [B, H, N, D]`` rotated by ``delta [B, H, N]`` (int) positions; ``k`` untouched."""
        if k.shape[-1] != self.head_dim:
            raise ValueError(f"key head_dim {k.shape[-1]} does not match the rotation's {self.head_dim}")
        if not bool(delta.any()):
            return k
        ang = delta.to(torch.float64)[..., None] * self.inv_freq.to(k.device)  # [B, H, N, D/2]
        cos, sin = torch.cos(ang).to(k.dtype), torch.sin(ang).to(k.dtype)
        half = k.shape[-1] // 2
        k1, k2 = k[..., :half], k[..., half:]
        # (k1, k2) -> (k1 cos − k2 sin, k2 cos + k1 sin): rotate-half layout
        return torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
