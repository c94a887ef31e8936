"""Attention rollout and attention flow (Abnar & Zuidema 2020, "Quantifying Attention Flow in
Transformers").

Both treat the network as a graph whose nodes are the tokens at each layer and whose edges are the
layer's head-averaged attention mixed with the residual connection, ``Ã = r·I + (1 − r)·A`` (the
paper takes ``r = 0.5``), rows renormalised:

* **rollout** multiplies them: ``R = Ã_L ⋯ Ã_1``; ``R[i, j]`` is how much of output token ``i``
  comes from input token ``j`` when attention is linear mixing;
* **flow** treats the weights as edge capacities and takes, for each input token, the maximum flow
  from it (layer 0) to the output token (layer L) — networkx's max-flow, on small inputs (the
  graph has ``L·T²`` edges).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from longattn.analysis.capture import capture
from longattn.analysis.stats import head_average
from longattn.analysis.subject import Subject

Tensor = torch.Tensor

#: flow's input limit: the max-flow graph has layers × T² edges
MAX_FLOW_TOKENS = 256


def residual_mix(attention: Tensor, residual: float = 0.5) -> Tensor:
    """``r·I + (1 − r)·A`` with rows renormalised (rows of A that see nothing keep ``I``):
    ``A [..., T, T]`` → same shape, float64."""
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must lie in [0, 1], got {residual}")
    a = attention.double()
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"rollout and flow need square self-attention [..., T, T], got {tuple(a.shape)}")
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    m = residual * eye + (1.0 - residual) * a
    return m / m.sum(-1, keepdim=True)


def rollout(attentions: Iterable[Tensor], residual: float = 0.5) -> Tensor:
    """Attention rollout ``Ã_L ⋯ Ã_1`` of head-averaged layer attentions given first layer first,
    each ``[T, T]`` (or ``[B, T, T]``): float64 ``[…, T, T]``. Rows sum to 1."""
    out = None
    for a in attentions:
        m = residual_mix(a, residual)
        out = m if out is None else m @ out
    if out is None:
        raise ValueError("rollout needs at least one layer's attention")
    return out


def attention_flow(attentions: Sequence[Tensor], target: int, residual: float = 0.5) -> Tensor:
    """Attention flow to output token ``target``: for each input token ``j``, the maximum flow from
    node ``(0, j)`` to node ``(L, target)`` through the layer graph with capacities ``Ã_l[i, j]``
    on the edge ``(l−1, j) → (l, i)``. ``attentions``: ``[T, T]`` per layer, first layer first.
    Returns float64 ``[T]``."""
    import networkx as nx

    mats = [residual_mix(a, residual) for a in attentions]
    if not mats:
        raise ValueError("attention flow needs at least one layer's attention")
    t = mats[0].shape[-1]
    if any(m.dim() != 2 or m.shape != (t, t) for m in mats):
        raise ValueError("attention flow takes one [T, T] matrix per layer (a single input)")
    if t > MAX_FLOW_TOKENS:
        raise ValueError(f"attention flow solves a max-flow per input token on {len(mats)}·T² edges; T={t} is over "
                         f"{MAX_FLOW_TOKENS}: use rollout, or a shorter input")
    if not -t <= target < t:
        raise ValueError(f"target must index one of the {t} tokens, got {target}")
    target %= t
    graph = nx.DiGraph()
    for layer, m in enumerate(mats, start=1):
        rows, cols = (m > 0).nonzero(as_tuple=True)
        for i, j in zip(rows.tolist(), cols.tolist()):
            graph.add_edge((layer - 1, j), (layer, i), capacity=float(m[i, j]))
    sink = (len(mats), target)
    out = torch.zeros(t, dtype=torch.float64)
    for j in range(t):
        if graph.has_node((0, j)) and graph.has_node(sink):
            out[j] = nx.maximum_flow_value(graph, (0, j), sink)
    return out


def layer_attentions(subject: Subject, tokens: Tensor, **run_kwargs) -> Iterator[Tensor]:
    """Head-averaged attention ``[T, T]`` of every layer, first layer first, for one input
    ``tokens [1, T]``: one forward captures q/k (``[H, T, D]`` per layer), then each layer's
    matrix is computed when it is asked for, so rollout holds one ``T × T`` at a time."""
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"rollout and flow analyse one input: tokens must be [1, T], got {tuple(tokens.shape)}")
    for _, c in sorted(capture(subject, tokens, **run_kwargs).items()):
        yield head_average(c.q, c.k, scale=c.site.scale, causal=c.site.causal,
                           key_padding_mask=c.site.key_padding_mask)[0]


def relevance(subject: Subject, tokens: Tensor, target: int = -1, *, how: str = "rollout", residual: float = 0.5,
              **run_kwargs) -> Tensor:
    """Per-input-token relevance ``[T]`` (float64) for output token ``target`` of one input:
    ``how="rollout"`` (the rollout row) or ``"flow"`` (max-flow values)."""
    if how not in ("rollout", "flow"):
        raise ValueError(f"how must be 'rollout' or 'flow', got {how!r}")
    mats = layer_attentions(subject, tokens, **run_kwargs)
    if how == "flow":
        return attention_flow(list(mats), target, residual)
    return rollout(mats, residual)[target]
