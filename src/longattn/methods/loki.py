"""Loki (Singhania et al. 2024, "Loki: Low-Rank Keys for Efficient Sparse Attention"): keys
live near a low-dimensional subspace, so ranking them by ``q·k`` computed in the top-``rank``
principal directions of key space finds nearly the same top keys at ``rank/head_dim`` of the
cost; attention over the kept keys is then exact in full dimension."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.core import validate
from longattn.methods.base import Capabilities, register
from longattn.methods.token_topk import TokenTopK
from longattn.sparse.lowrank import KeyPCA


@register
@dataclass(frozen=True)
class Loki(TokenTopK):
    """Per-query top-k keys ranked in a PCA projection of key space (Loki), exact softmax over them.

    Args:
        budget, sinks, window, chunk: as for ``TokenTopK``.
        rank_dims: principal directions used for ranking (per key head, from the keys of the call);
            at or above ``head_dim`` every direction is used, so keys are ranked by their full
            ``q·k`` (in a rotated basis).
    """

    rank_dims: int = 16
    name = "loki"
    capabilities = Capabilities(
        exact=False, score_bias=False,
        paper="Singhania et al. 2024, Loki", cost="O(N²·rank) scoring + O(N·budget·D)",
    )

    def __post_init__(self):
        super().__post_init__()
        validate.check_positive_int("rank_dims", self.rank_dims)

    def prepare(self, q, k):
        basis = KeyPCA.fit(k).basis(min(self.rank_dims, k.shape[-1]))  # [B, Hkv, D, r]: no more than D directions
        return basis, torch.matmul(k, basis)  # keys projected once per call: [B, Hkv, Tk, r]

    def rank(self, state, q_rows, k, scores, allowed, scale):
        basis, k_low = state
        b, hq, m, d = q_rows.shape
        hk = k.shape[1]
        g = hq // hk
        q_low = torch.matmul(q_rows.reshape(b, hk, g * m, d), basis)
        return torch.matmul(q_low, k_low.transpose(-1, -2)).view(b, hq, m, -1)
