"""DSA, DeepSeek Sparse Attention (DeepSeek-V3.2, 2025): a small "lightning indexer" scores every
earlier token for every query, ``I[t, s] = Σ_j w[t, j] · ReLU(q_I[t, j] · k_I[s])`` with a few indexer
heads ``j``, and attention runs exactly over each query's top-``budget`` tokens. The indexer of an
existing model is fitted by distillation: with the model frozen, its top-k should carry the dense
attention's mass (KL of the indexer's softmax to the dense attention distribution, summed over the
heads that share the selection).

Here the indexer reads the attention's own q and k (a function of q, k, v and its learned
projections, so it drops into any model through ``longattn.attention``): for each key head,
``q_I`` and ``w`` are linear maps of the concatenated queries of its GQA group, ``k_I`` a linear map
of its key; the selection is shared by the group's query heads (DSA shares it across all heads).
Without learned projections the indexer is ``Σ_{h ∈ group} ReLU(q_h · k)`` (identity maps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from longattn.core import validate
from longattn.methods.base import Capabilities, register
from longattn.methods.token_topk import TokenTopK

Tensor = torch.Tensor


class DSAIndexer(nn.Module):
    """The lightning indexer's projections for one attention layer.

    Args:
        head_dim: ``D``; heads, kv_heads: query and key/value heads of the layer.
        index_heads: indexer heads ``H_I`` (DSA: 64 on a 128-head model; a few here).
        index_dim: indexer head width ``D_I``.
        seed: seeds the initial projections.

    Parameters: ``wq [kv_heads, g·D, H_I·D_I]``, ``ww [kv_heads, g·D, H_I]``, ``wk [kv_heads, D, D_I]``
    (``g = heads / kv_heads``).
    """

    def __init__(self, head_dim: int, heads: int, kv_heads: int, *, index_heads: int = 4, index_dim: int = 16,
                 seed: int = 0):
        super().__init__()
        for name, value in (("head_dim", head_dim), ("heads", heads), ("kv_heads", kv_heads),
                            ("index_heads", index_heads), ("index_dim", index_dim)):
            validate.check_positive_int(name, value)
        if heads % kv_heads:
            raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
        self.head_dim, self.heads, self.kv_heads = head_dim, heads, kv_heads
        self.index_heads, self.index_dim = index_heads, index_dim
        g = heads // kv_heads
        gen = torch.Generator().manual_seed(seed)
        # small at first (INIT_GAIN): the indexer's softmax starts near uniform and distillation
        # moves it from there; at unit gain the first scores span hundreds of nats and the fit
        # stalled (stories260K layer 1: KL 1.4 and 81% mass recall at 64 of 512 keys, against 0.20
        # and 99.6% from the small start)
        gain = self.INIT_GAIN
        self.wq = nn.Parameter(torch.randn(kv_heads, g * head_dim, index_heads * index_dim, generator=gen)
                               * gain / math.sqrt(g * head_dim))
        self.ww = nn.Parameter(torch.randn(kv_heads, g * head_dim, index_heads, generator=gen)
                               * gain / math.sqrt(g * head_dim))
        self.wk = nn.Parameter(torch.randn(kv_heads, head_dim, index_dim, generator=gen) * gain / math.sqrt(head_dim))

    #: scale of the initial projections
    INIT_GAIN = 0.1

    def keys(self, k: Tensor) -> Tensor:
        """``k [B, Hkv, Tk, D]`` → indexer keys ``[B, Hkv, Tk, D_I]``."""
        return torch.einsum("bhtd,hde->bhte", k, self.wk.to(k.dtype))

    def scores(self, q: Tensor, k_index: Tensor) -> Tensor:
        """Indexer scores of ``q [B, Hq, m, D]`` against ``k_index [B, Hkv, Tk, D_I]`` →
        ``[B, Hkv, m, Tk]`` (one row per key head: shared by its query heads)."""
        b, hq, m, d = q.shape
        hk = self.kv_heads
        qin = q.reshape(b, hk, hq // hk, m, d).permute(0, 1, 3, 2, 4).reshape(b, hk, m, -1)  # group concatenated
        qi = torch.einsum("bhmx,hxe->bhme", qin, self.wq.to(q.dtype)).view(b, hk, m, self.index_heads, self.index_dim)
        w = torch.einsum("bhmx,hxj->bhmj", qin, self.ww.to(q.dtype))
        dots = torch.relu(torch.einsum("bhmje,bhte->bhmjt", qi, k_index))
        return torch.einsum("bhmj,bhmjt->bhmt", w, dots)


def identity_index_scores(q: Tensor, k: Tensor) -> Tensor:
    """The parameter-free indexer ``Σ_{h ∈ group} ReLU(q_h · k)``: ``[B, Hkv, m, Tk]``."""
    b, hq, m, d = q.shape
    hk = k.shape[1]
    dots = torch.matmul(q.reshape(b, hk, hq // hk * m, d), k.transpose(-1, -2)).view(b, hk, hq // hk, m, -1)
    return torch.relu(dots).sum(2)


@register
@dataclass(frozen=True, eq=False)
class DSA(TokenTopK):
    """DSA (DeepSeek-V3.2, 2025): a ReLU lightning indexer scores every earlier token; exact
    attention over each query's top-``budget`` tokens, the selection shared by a GQA group.

    Args:
        budget: tokens per query (DSA: 2048), ``sinks`` and ``window`` included.
        sinks, window: tokens always kept (first ``sinks``, last ``window`` up to the query).
        chunk: queries scored at once.
        learned: the indexer's projections (``DSAIndexer``), or None for the identity indexer.

    Gradients reach q, k, v through the kept tokens' attention; the indexer is trained by
    ``longattn.calibrate.indexer.distill_indexer`` (the top-k choice carries no gradient).
    """

    learned: DSAIndexer | None = None
    name = "dsa_indexer"
    capabilities = Capabilities(
        exact=False, score_bias=False,
        paper="DeepSeek-AI 2025, DeepSeek-V3.2 (DeepSeek Sparse Attention)",
        cost="O(N²·H_I·D_I) indexer + O(N·budget) attention",
    )

    def __post_init__(self):
        super().__post_init__()
        if self.learned is not None and not isinstance(self.learned, DSAIndexer):
            raise TypeError(f"learned must be a DSAIndexer or None, got {type(self.learned).__name__}")

    def prepare(self, q, k):
        if self.learned is None:
            return None
        ix = self.learned
        if ix.heads != q.shape[1] or ix.kv_heads != k.shape[1] or ix.head_dim != q.shape[-1]:
            raise ValueError(f"learned indexer was built for heads={ix.heads}, kv_heads={ix.kv_heads}, "
                             f"head_dim={ix.head_dim}; q/k have {q.shape[1]}, {k.shape[1]}, {q.shape[-1]}")
        with torch.no_grad():
            return ix.keys(k.float())

    def rank(self, state, q_rows, k, scores, allowed, scale):
        b, hq, m, _ = q_rows.shape
        hk = k.shape[1]
        with torch.no_grad():
            if state is None:
                index = identity_index_scores(q_rows.float(), k.float())
            else:
                index = self.learned.scores(q_rows.float(), state)
        # one ranking per key head, shared by its query heads
        return index.repeat_interleave(hq // hk, dim=1).to(scores.dtype)
