"""Two trainable attentions with learned parameters beside q, k, v:

* ``shaw`` — relative position representations (Shaw, Uszkoreit & Vaswani 2018, "Self-Attention
  with Relative Position Representations"): learned embeddings of the clipped distance
  ``r = clip(j - i, -K, K)`` added to the keys (``e_ij = q_i · (k_j + a^K_r) · scale``) and to the
  values (``z_i = Σ_j p_ij (v_j + a^V_r)``), shared across heads as in the paper;
* ``lowrank_mha`` — low-rank factorised multi-head attention (Mehta et al. 2019, "Low Rank
  Factorization for Compact Multi-Head Self-Attention"): each head scores keys against a context
  vector through a rank-``r`` bilinear map ``s_ij = (c_i U_h) · (k_j V_h) · scale``, the context
  ``c_i`` being the query itself or (the paper's global context vector) the mean of the queries up to
  ``i``.

Both compute exactly what they define, a query block at a time in float32 (O(N²) like dense eager
attention; their use is training at modest lengths), and both are differentiable in q, k, v and
their parameters. Without learned parameters ``shaw`` is softmax attention (zero embeddings) and
``lowrank_mha`` with ``context="query"`` too (``U = V = I``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from longattn.core import validate
from longattn.kernels.eager import visible_rows
from longattn.kernels.layout import dense_pairs
from longattn.methods.base import Call, Capabilities, Method, Result, register

Tensor = torch.Tensor

#: query rows per step
CHUNK = 256


class ShawParams(nn.Module):
    """Shaw et al.'s relative embeddings: ``emb_k, emb_v [2K+1, D]`` for distances ``-K … K``
    (initialised N(0, 0.02))."""

    def __init__(self, head_dim: int, max_distance: int, *, seed: int = 0):
        super().__init__()
        validate.check_positive_int("head_dim", head_dim)
        validate.check_positive_int("max_distance", max_distance)
        self.head_dim, self.max_distance = head_dim, max_distance
        gen = torch.Generator().manual_seed(seed)
        self.emb_k = nn.Parameter(torch.randn(2 * max_distance + 1, head_dim, generator=gen) * 0.02)
        self.emb_v = nn.Parameter(torch.randn(2 * max_distance + 1, head_dim, generator=gen) * 0.02)


def _softmax_rows(s: Tensor) -> tuple[Tensor, Tensor]:
    """``(p, lse)`` of scores with ``-inf`` = hidden; rows that see nothing give p = 0, lse = -inf."""
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    return p, lse


def _attend_in_chunks(call: Call, shape: tuple[int, int, int, int], device, scores, read) -> Result:
    """Softmax attention a query block (``CHUNK`` rows) at a time from a method's own scores:
    ``scores(q0, q1) -> [B, Hq, m, Tk]`` (scaled), ``read(q0, q1, p) -> [B, Hq, m, D]`` from the
    probabilities; causality and key padding are applied here, with the density for the stats."""
    b, hq, tq, tk = shape
    outs, lses, pairs = [], [], 0.0
    for q0 in range(0, tq, CHUNK):
        q1 = min(q0 + CHUNK, tq)
        visible = visible_rows(q0, q1, tq, tk, call.causal, call.key_padding_mask, device)
        p, lse = _softmax_rows(scores(q0, q1).masked_fill(~visible, -math.inf))
        outs.append(read(q0, q1, p))
        lses.append(lse)
        if call.want_stats:
            pairs += float(visible.expand(b, hq, q1 - q0, tk).sum()) / (b * hq)
    stats = {}
    if call.want_stats:
        dense = dense_pairs(tq, tk, call.causal)
        stats["density"] = pairs / dense if dense else 0.0
    return Result(torch.cat(outs, 2), torch.cat(lses, 2), "eager", stats)


@register
@dataclass(frozen=True, eq=False)
class Shaw(Method):
    """Relative position representations (Shaw et al. 2018): learned key and value embeddings of
    the distance clipped to ``max_distance``.

    Args:
        max_distance: ``K``; distances beyond share the last embedding.
        learned: the embeddings (``ShawParams``); None: zero embeddings (softmax attention).

    Positions: query ``t`` sits at ``t + Tk - Tq`` (bottom-right, as every longattn method).
    """

    max_distance: int = 16
    learned: ShawParams | None = None
    name = "shaw"
    capabilities = Capabilities(exact=False, score_bias=False, half_compute=False,
                                paper="Shaw et al. 2018, Self-Attention with Relative Position Representations",
                                cost="O(N²·D) (eager, a query block at a time)")

    def __post_init__(self):
        validate.check_positive_int("max_distance", self.max_distance)
        if self.learned is not None:
            if not isinstance(self.learned, ShawParams):
                raise TypeError(f"learned must be ShawParams or None, got {type(self.learned).__name__}")
            if self.learned.max_distance != self.max_distance:
                raise ValueError(f"learned was built for max_distance={self.learned.max_distance}, the method has "
                                 f"{self.max_distance}")

    def run(self, q, k, v, call: Call) -> Result:
        if call.bias is not None or call.row_bias is not None:
            raise ValueError("method 'shaw' does not take a score bias (its relative embeddings are its positions)")
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        g = hq // hk
        K = self.max_distance
        if self.learned is not None and self.learned.head_dim != d:
            raise ValueError(f"learned was built for head_dim={self.learned.head_dim}, q has {d}")
        q, k, v = q.float(), k.float(), v.float()
        emb_k = emb_v = None
        if self.learned is not None:
            emb_k, emb_v = self.learned.emb_k.float(), self.learned.emb_v.float()
        k_pos = torch.arange(tk, device=q.device)

        def distances(q0: int, q1: int) -> Tensor:
            """Clipped relative distance of keys to queries ``q0 … q1-1`` as an index ``[m, Tk]`` in 0 … 2K."""
            q_pos = torch.arange(q0, q1, device=q.device) + (tk - tq)
            return (k_pos[None, :] - q_pos[:, None]).clamp(-K, K) + K

        def scores(q0: int, q1: int) -> Tensor:
            m, rows = q1 - q0, q[:, :, q0:q1]
            s = torch.matmul(rows.reshape(b, hk, g * m, d), k.transpose(-1, -2)).view(b, hq, m, tk)
            if emb_k is not None:
                qa = torch.matmul(rows, emb_k.T)  # [B, Hq, m, 2K+1]
                s = s + torch.gather(qa, 3, distances(q0, q1)[None, None].expand(b, hq, m, tk))
            return s * call.scale

        def read(q0: int, q1: int, p: Tensor) -> Tensor:
            m = q1 - q0
            out = torch.matmul(p.reshape(b, hk, g * m, tk), v).view(b, hq, m, d)
            if emb_v is not None:
                buckets = torch.zeros(b, hq, m, 2 * K + 1, device=q.device, dtype=p.dtype)
                buckets = buckets.scatter_add(3, distances(q0, q1)[None, None].expand(b, hq, m, tk), p)
                out = out + torch.matmul(buckets, emb_v)
            return out

        return _attend_in_chunks(call, (b, hq, tq, tk), q.device, scores, read)


class LowRankParams(nn.Module):
    """Per query head the factors ``U_h, V_h [D, rank]`` of the bilinear score map (initialised to
    the first ``rank`` columns of the identity: at full rank the map is ``q · k``)."""

    def __init__(self, head_dim: int, heads: int, rank: int):
        super().__init__()
        for name, value in (("head_dim", head_dim), ("heads", heads), ("rank", rank)):
            validate.check_positive_int(name, value)
        if rank > head_dim:
            raise ValueError(f"rank={rank} exceeds head_dim={head_dim}")
        self.head_dim, self.heads, self.rank = head_dim, heads, rank
        eye = torch.eye(head_dim)[:, :rank]
        self.u = nn.Parameter(eye.expand(heads, -1, -1).clone())
        self.v = nn.Parameter(eye.expand(heads, -1, -1).clone())


#: what a head scores keys against in ``lowrank_mha``
CONTEXTS = ("query", "mean")


@register
@dataclass(frozen=True, eq=False)
class LowRankMHA(Method):
    """Low-rank factorised multi-head attention (Mehta et al. 2019): ``s_ij = (c_i U_h)·(k_j V_h)``
    with rank-``rank`` factors per head and a context vector ``c_i``.

    Args:
        context: ``"query"`` — ``c_i = q_i``; ``"mean"`` — the paper's global context vector, the
            mean of the queries a query may see (causal: positions up to ``i``; else all).
        learned: the factors (``LowRankParams``); None: ``U = V = I`` (full rank).
    """

    context: str = "query"
    learned: LowRankParams | None = None
    name = "lowrank_mha"
    capabilities = Capabilities(exact=False, score_bias=False, half_compute=False,
                                paper="Mehta et al. 2019, Low Rank Factorization for Compact Multi-Head Self-Attention",
                                cost="O(N²·rank) (eager, a query block at a time)")

    def __post_init__(self):
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {self.context!r}")
        if self.learned is not None and not isinstance(self.learned, LowRankParams):
            raise TypeError(f"learned must be LowRankParams or None, got {type(self.learned).__name__}")

    def run(self, q, k, v, call: Call) -> Result:
        if call.bias is not None or call.row_bias is not None:
            raise ValueError("method 'lowrank_mha' does not take a score bias")
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        g = hq // hk
        q, k, v = q.float(), k.float(), v.float()
        if self.context == "mean":
            if call.causal:
                q = q.cumsum(2) / torch.arange(1, tq + 1, device=q.device, dtype=q.dtype)[:, None]
            else:
                q = q.mean(2, keepdim=True).expand(-1, -1, tq, -1)
        kk = k.repeat_interleave(g, 1)  # per query head: each has its own key factor
        if self.learned is not None:
            lr = self.learned
            if lr.heads != hq or lr.head_dim != d:
                raise ValueError(f"learned was built for heads={lr.heads}, head_dim={lr.head_dim}; q has {hq}, {d}")
            q = torch.einsum("bhtd,hdr->bhtr", q, lr.u.float())
            kk = torch.einsum("bhtd,hdr->bhtr", kk, lr.v.float())
        vv = v.repeat_interleave(g, 1)
        return _attend_in_chunks(call, (b, hq, tq, tk), q.device,
                                 lambda q0, q1: torch.matmul(q[:, :, q0:q1], kk.transpose(-1, -2)) * call.scale,
                                 lambda q0, q1, p: torch.matmul(p, vv))
