"""Retrofitting DSA's lightning indexer onto a frozen model by distillation (DeepSeek-V3.2's
warm-up stage), and the attention-mass recall of any token or block selection.

The model's queries and keys are captured once per layer (``longattn.analysis.capture``); each
layer's :class:`~longattn.methods.dsa.DSAIndexer` is then fitted to them alone: the loss is
``KL(p ‖ softmax(I))`` per query, with ``p`` the dense attention distribution averaged over the query
heads that share the indexer's selection (a GQA group) and ``I`` the indexer's scores over the keys
the query may see. The model never runs again, so a few hundred steps take seconds.

Recall: the share of a head's true attention mass that falls on the keys a selection keeps,
averaged over heads and over queries that have more earlier keys than the budget (with fewer the
selection keeps everything and recall is 1 by construction).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from longattn.methods.base import Call, Method
from longattn.methods.dsa import DSA, DSAIndexer

Tensor = torch.Tensor


@dataclass
class LayerQK:
    """One layer's captured ``q [B, Hq, T, D]`` and ``k [B, Hkv, T, D]`` (after RoPE) and its scale."""

    q: Tensor
    k: Tensor
    scale: float


def dense_probabilities(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Causal softmax attention ``[B, Hq, T, T]`` (float32; q and k the same length)."""
    b, hq, t, d = q.shape
    hk = k.shape[1]
    s = torch.matmul(q.reshape(b, hk, -1, d), k.transpose(-1, -2)).view(b, hq, t, t) * scale
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(s.masked_fill(~causal, -math.inf), -1)


def indexer_kl(indexer: DSAIndexer, q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Mean over queries of ``KL(p ‖ softmax(I))`` (``p``: dense attention averaged over each GQA
    group, the indexer's target). Differentiable in the indexer's parameters."""
    b, hq, t, _ = q.shape
    hk = k.shape[1]
    with torch.no_grad():
        p = dense_probabilities(q, k, scale).view(b, hk, hq // hk, t, t).mean(2)  # [B, Hkv, T, T]
    scores = indexer.scores(q, indexer.keys(k))  # [B, Hkv, T, T]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    log_q = torch.log_softmax(scores.masked_fill(~causal, -math.inf), -1)
    kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - log_q), torch.zeros_like(p))
    return kl.sum(-1).mean()


def distill_indexer(layers: Sequence[LayerQK], indexers: Sequence[DSAIndexer], *, steps: int = 300,
                    lr: float = 1e-2, batch: int = 2, seed: int = 0,
                    progress: Callable[[str], None] | None = None) -> list[dict]:
    """Fit each layer's indexer to its captured q/k (the model itself is not touched).

    Args:
        layers: per layer, the captured q/k of ``N`` sequences.
        indexers: one per layer (trained in place).
        steps: Adam steps per layer, each on ``batch`` sequences drawn with ``seed``.

    Returns:
        Per layer ``{"layer", "kl_before", "kl_after", "seconds"}`` (KL over all sequences).
    """
    if len(layers) != len(indexers):
        raise ValueError(f"got {len(layers)} layers of q/k but {len(indexers)} indexers")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    say = progress or (lambda msg: None)
    out = []
    for i, (qk, ix) in enumerate(zip(layers, indexers)):
        t0 = time.perf_counter()
        with torch.no_grad():
            before = float(indexer_kl(ix, qk.q, qk.k, qk.scale))
        opt = torch.optim.Adam(ix.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        n = qk.q.shape[0]
        for step in range(steps):
            pick = torch.randperm(n, generator=gen)[:batch]
            loss = indexer_kl(ix, qk.q[pick], qk.k[pick], qk.scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % max(1, steps // 4) == 0:
                say(f"layer {i}: step {step + 1}/{steps} KL {float(loss.detach()):.4f}")
        with torch.no_grad():
            after = float(indexer_kl(ix, qk.q, qk.k, qk.scale))
        out.append({"layer": i, "kl_before": before, "kl_after": after, "seconds": time.perf_counter() - t0})
        say(f"layer {i}: KL {before:.4f} -> {after:.4f}")
    return out


def kept_keys(method: Method, q: Tensor, k: Tensor, scale: float) -> Tensor:
    """The keys ``method`` attends for each query: bool ``[B, Hq, T, T]`` (causal, q and k the
    same length). Token selectors (``tokenselect``, ``loki``, ``dsa_indexer``) by their ranking,
    block selectors (``quest``, ``landmark``, ...) by their selection."""
    from longattn.methods.block_topk import BlockTopK
    from longattn.methods.token_topk import TokenTopK

    b, hq, t, d = q.shape
    hk = k.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    if isinstance(method, TokenTopK):
        s = torch.matmul(q.reshape(b, hk, -1, d), k.transpose(-1, -2)).view(b, hq, t, t) * scale
        allowed = causal[None, None].expand(b, hq, t, t)
        s = s.masked_fill(~allowed, -math.inf)
        state = method.prepare(q, k)
        rank = method.rank(state, q, k, s, allowed, scale).masked_fill(~allowed, -math.inf)
        pos = torch.arange(t, device=q.device)
        forced = (pos[None, :] < method.sinks) | ((pos[None, :] > pos[:, None] - method.window) & causal)
        rank = rank.masked_fill(forced[None, None] & allowed, math.inf)
        top = rank.topk(min(method.budget, t), dim=-1)
        keep = torch.zeros(b, hq, t, t, dtype=torch.bool, device=q.device)
        keep.scatter_(-1, top.indices, ~torch.isneginf(top.values))
        return keep & allowed
    if isinstance(method, BlockTopK):
        sel = method.select(q, k, Call(causal=True, scale=scale))
        idx = sel.indices  # [B, Hq, n_qb, n_sel]
        n_blocks = math.ceil(t / sel.block)
        blocks = torch.zeros(*idx.shape[:3], n_blocks + 1, dtype=torch.bool, device=q.device)
        blocks.scatter_(-1, idx.masked_fill(idx < 0, n_blocks), True)
        tok = blocks[..., :n_blocks].repeat_interleave(sel.block, -1)[..., :t]  # [B, Hq, n_qb, T]
        keep = tok.repeat_interleave(sel.q_block, 2)[:, :, :t]
        return keep & causal
    raise TypeError(f"kept_keys: method {method.name!r} is neither a token nor a block selector")


def mass_recall(q: Tensor, k: Tensor, scale: float, keep: Tensor, budget: int) -> float:
    """Mean share of each head's dense attention mass on the kept keys, over queries with more than
    ``budget`` earlier keys (queries ``budget … T-1``)."""
    p = dense_probabilities(q, k, scale)
    rec = (p * keep).sum(-1)  # [B, Hq, T]
    rows = rec[:, :, budget:]
    if rows.numel() == 0:
        raise ValueError(f"budget={budget} leaves no query with more earlier keys than the budget "
                         f"(sequences of {q.shape[2]} tokens)")
    return float(rows.mean())


def recall_of(method: Method, layers: Sequence[LayerQK], budget: int) -> float:
    """:func:`mass_recall` of ``method``'s selection, averaged over layers."""
    vals = [mass_recall(qk.q, qk.k, qk.scale, kept_keys(method, qk.q, qk.k, qk.scale), budget) for qk in layers]
    return sum(vals) / len(vals)


def dsa_for(indexer: DSAIndexer | None, budget: int) -> DSA:
    """The ``dsa_indexer`` method at ``budget`` with ``indexer`` (None: the identity indexer)."""
    return DSA(budget=budget, learned=indexer)
