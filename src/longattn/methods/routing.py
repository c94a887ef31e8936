"""Routing attention (Roy et al. 2021, "Efficient Content-Based Sparse Attention with Routing
Transformers"): queries and keys are clustered with k-means, and each query attends exactly to the
keys routed to its own cluster.

Training-free form. The paper learns its centroids by online k-means during training; here they
are fitted per call by a few Lloyd iterations of *spherical* k-means on the unit directions of the
queries and keys together, per query head (keys from that head's key head). One set of
centroids routes both queries and keys, as in the paper, so a query and a key meet when they fall
in the same cluster; fitting it on both makes the clusters cover where queries *and* keys lie.
Unit directions make "nearest centroid" mean "largest cosine", so norms (which scale every score of
a query alike) do not decide the routing. The keys are centred first (their mean is subtracted):
that shifts all scores of a query by the same amount, so attention is unchanged, but in trained
models the keys sit in a cone away from the queries, and uncentred the two land in different
clusters and most queries see almost no key (on stories260K, 4 clusters kept 2% of the pairs and
missed most of the mass; centred, 21%).

Under causality the centroids must not see the future. Queries are processed in chunks of
``chunk``; the key mean and the centroids for a chunk are fitted (the centroids warm-started from
the previous chunk's) only on queries and keys at positions *before* the chunk's first query, then
the chunk's queries and the keys up to its last query are routed with them. A chunk with no
earlier tokens (the start of a prefill) starts from seeded random directions and uncentred keys.
So a query's output depends on no token after it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from longattn.kernels.eager import attend_scores, visible_rows
from longattn.core import validate
from longattn.kernels.layout import dense_pairs
from longattn.methods.base import Call, Capabilities, Method, Result, register


@register
@dataclass(frozen=True)
class Routing(Method):
    """Routing Transformer attention (Roy et al. 2021): exact attention within k-means clusters.

    Training-free: spherical k-means of the query and (centred) key directions, exact softmax over
    the keys of a query's own cluster, plus optional sinks and a local window.

    Args:
        clusters: k-means clusters per head (1: every key shares the query's cluster → exact); at
            most ``tokens_k`` (more would leave clusters that no key can fall in).
        iters: most Lloyd iterations per fit (per chunk under causality, warm-started); a fit stops
            early once the assignments repeat, since further iterations would change nothing.
        window: keys always kept: the last ``window`` keys up to the query (0: none). The paper
            pairs routing heads with local-attention heads; here each query keeps both, and with
            ``window >= 1`` under causality it always sees at least itself.
        sinks: the first ``sinks`` keys, always kept.
        chunk: queries routed at once (memory ``heads × chunk × tokens_k``); under causality also
            how often the centroids are refitted.
        seed: seeds the k-means initialisation, so a call is deterministic.

    Shapes: ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]``; returns ``out [B, Hq, Tq, D]`` and
    ``lse [B, Hq, Tq]``. A query whose cluster holds no visible key (and no window / sink key)
    gets output 0 and LSE -inf.
    """

    clusters: int = 8
    iters: int = 3
    window: int = 64
    sinks: int = 0
    chunk: int = 256
    seed: int = 0
    name = "routing"
    capabilities = Capabilities(
        exact=False, score_bias=False,
        paper="Roy et al. 2021, Efficient Content-Based Sparse Attention with Routing Transformers",
        cost="O(N·clusters·D·iters) k-means + O(N²/clusters·D) attention (masked densely here)",
    )

    def __post_init__(self) -> None:
        validate.check_positive_int("clusters", self.clusters)
        validate.check_positive_int("iters", self.iters, allow_zero=True)
        validate.check_positive_int("window", self.window, allow_zero=True)
        validate.check_positive_int("sinks", self.sinks, allow_zero=True)
        validate.check_positive_int("chunk", self.chunk)
        validate.check_seed("seed", self.seed)

    def run(self, q, k, v, call: Call) -> Result:
        if call.bias is not None or call.row_bias is not None:
            raise ValueError(f"method {self.name!r} does not take a score bias (its routing ignores it)")
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        if self.clusters > tk:
            raise ValueError(f"clusters={self.clusters} exceeds the number of keys, tokens_k={tk}: the extra clusters "
                             f"could hold no key; use clusters <= {tk}")
        g = hq // hk
        off = tk - tq
        dev = q.device
        gen = torch.Generator().manual_seed(self.seed)
        qn = torch.nn.functional.normalize(q, dim=-1)
        real = torch.ones(b, tk, device=dev) if call.key_padding_mask is None else call.key_padding_mask.float()
        k_w = real[:, None, :].expand(b, hq, tk)  # padded keys take no part in the fit
        k_pos = torch.arange(tk, device=dev)
        out = torch.empty(b, hq, tq, d, device=dev)
        lse = torch.empty(b, hq, tq, device=dev)
        t_route = t_kernel = 0.0
        visible_pairs = 0.0
        cent = None
        fitted = False
        if not call.causal:
            t0 = time.perf_counter()
            kn = _key_directions(k, real, tk, g)
            points = torch.cat([qn, kn], 2)
            weights = torch.cat([torch.ones(b, hq, tq, device=dev), k_w], 2)
            cent = _lloyd(points, weights, _init(points, weights, self.clusters, gen), self.iters)
            key_cluster = _assign(kn, cent)
            t_route += time.perf_counter() - t0
        for q0 in range(0, tq, self.chunk):
            q1 = min(q0 + self.chunk, tq)
            m = q1 - q0
            t0 = time.perf_counter()
            if call.causal:
                p0 = off + q0  # first key position this chunk's queries may see beyond the fit
                kn = _key_directions(k, real, p0, g)
                points = torch.cat([qn[:, :, :q0], kn[:, :, :p0]], 2)
                weights = torch.cat([torch.ones(b, hq, q0, device=dev), k_w[:, :, :p0]], 2)
                if not fitted:  # (re)start from data as soon as there is some; then warm-start
                    cent = _init(points, weights, self.clusters, gen)
                    fitted = points.shape[2] > 0
                cent = _lloyd(points, weights, cent, self.iters)
                key_cluster = _assign(kn, cent)
            q_cluster = _assign(qn[:, :, q0:q1], cent)  # [B, Hq, m]
            q_pos = torch.arange(q0, q1, device=dev)[:, None] + off
            keep = q_cluster[..., :, None] == key_cluster[..., None, :]  # [B, Hq, m, Tk]
            in_window = (k_pos[None, :] > q_pos - self.window) & (k_pos[None, :] <= q_pos)
            forced = (k_pos[None, :] < self.sinks) | in_window
            keep = keep | forced[None, None]
            keep = keep & visible_rows(q0, q1, tq, tk, call.causal, call.key_padding_mask, dev)
            t1 = time.perf_counter()
            s = torch.matmul(q[:, :, q0:q1].reshape(b, hk, g * m, d), k.transpose(-1, -2)).view(b, hq, m, tk)
            out[:, :, q0:q1], lse[:, :, q0:q1] = attend_scores((s * call.scale).masked_fill(~keep, -math.inf), v)
            t_route += t1 - t0
            t_kernel += time.perf_counter() - t1
            if call.want_stats:
                visible_pairs += float(keep.sum()) / (b * hq)
        stats = {"selection_s": t_route, "kernel_s": t_kernel}
        if call.want_stats:
            dense = dense_pairs(tq, tk, call.causal)
            stats["density"] = visible_pairs / dense if dense else 0.0
        return Result(out, lse, "routing", stats)


def _key_directions(k: torch.Tensor, real: torch.Tensor, upto: int, g: int) -> torch.Tensor:
    """Unit directions ``[B, Hq, Tk, D]`` of the keys minus the mean of the real keys before
    position ``upto`` (nothing subtracted when there are none), repeated for the ``g`` query heads
    of each key head."""
    w = real[:, None, :upto, None]
    mean = (k[:, :, :upto] * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp(min=1.0)
    return torch.nn.functional.normalize(k - mean, dim=-1).repeat_interleave(g, 1)


def _init(points: torch.Tensor, weights: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` starting centroids ``[B, H, n, D]``: seeded distinct points of the fit (real ones,
    weight > 0), topped up with seeded random unit directions when there are fewer than ``n``."""
    b, h, count, d = points.shape
    rand = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, device=gen.device), dim=-1).to(points.device)
    cent = rand.expand(b, h, n, d).clone()
    if count == 0:
        return cent
    # seeded random order of the points; real points first, so padding is never a centroid
    order = torch.rand(count, generator=gen, device=gen.device).to(points.device).expand(b, h, count)
    order = torch.where(weights > 0, order, order + 2.0).argsort(-1)[..., :n]  # [B, H, <=n]
    picked = points.gather(2, order[..., None].expand(-1, -1, -1, d))
    real = weights.gather(2, order) > 0
    take = order.shape[-1]
    cent[:, :, :take] = torch.where(real[..., None], picked, cent[:, :, :take])
    return cent


def _assign(x: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
    """Nearest centroid by cosine (both unit): ``x [B, H, T, D]`` → ``[B, H, T]`` int64."""
    return torch.matmul(x, cent.transpose(-1, -2)).argmax(-1)


def _lloyd(points: torch.Tensor, weights: torch.Tensor, cent: torch.Tensor, iters: int) -> torch.Tensor:
    """Spherical k-means: up to ``iters`` Lloyd steps from ``cent [B, H, C, D]`` on unit ``points
    [B, H, N, D]`` weighted by ``weights [B, H, N]``; an empty cluster keeps its centroid. Stops
    when the assignments repeat: the step would recompute the centroids from the same assignments,
    and so would every later one."""
    if points.shape[2] == 0:
        return cent
    b, h, n, d = points.shape
    c = cent.shape[2]
    wp = points * weights[..., None]
    previous = None
    for _ in range(iters):
        a = _assign(points, cent)
        if previous is not None and torch.equal(a, previous):
            break
        previous = a
        sums = torch.zeros(b, h, c, d, device=points.device).scatter_add_(2, a[..., None].expand(-1, -1, -1, d), wp)
        counts = torch.zeros(b, h, c, device=points.device).scatter_add_(2, a, weights)
        cent = torch.where((counts > 0)[..., None], torch.nn.functional.normalize(sums, dim=-1), cent)
    return cent
