"""A low-rank (PCA) view of key space, kept up to date as keys are appended (Loki).

Per key head it keeps the running sum of keys and of their outer products, so the covariance —
and its top principal directions — can be recomputed at any time from ``O(D²)`` state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KeyPCA:
    """``sum [B, H, D]``, ``outer [B, H, D, D]`` (float64) and ``count`` keys seen."""

    sum: torch.Tensor
    outer: torch.Tensor
    count: int

    @classmethod
    def fit(cls, k: torch.Tensor) -> "KeyPCA":
        """From keys ``k [B, H, T, D]``."""
        k64 = k.to(torch.float64)
        return cls(k64.sum(2), k64.transpose(-1, -2) @ k64, k.shape[2])

    def append(self, k_new: torch.Tensor) -> None:
        k64 = k_new.to(torch.float64)
        self.sum = self.sum + k64.sum(2)
        self.outer = self.outer + k64.transpose(-1, -2) @ k64
        self.count += k_new.shape[2]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    def basis(self, rank: int) -> torch.Tensor:
        """``[B, H, D, rank]`` float32: the top-``rank`` principal directions (orthonormal)."""
        d = self.sum.shape[-1]
        if not 0 < rank <= d:
            raise ValueError(f"rank must be in 1..head_dim={d}, got {rank}")
        mean = self.mean
        cov = self.outer / max(self.count, 1) - mean[..., :, None] * mean[..., None, :]
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        return vecs[..., -rank:].flip(-1).to(torch.float32).contiguous()
