"""Titans' memory combined with attention — Behrouz, Zhong, Mirrokni 2025, "Titans: Learning to
Memorize at Test Time", §4.1 (memory as a context, MAC), §4.2 (memory as a gate, MAG) and §4.3
(memory as a layer, MAL).

The layers are :class:`longattn.recurrent.layers.TitansMAGLayer`,
:class:`longattn.recurrent.layers.TitansMACLayer` and :class:`~longattn.recurrent.layers.TitansMALLayer`; this module holds their states, the attention
and gating pieces they share, their state sizes and the float64 references the tests compare them
with. The neural memory itself is :mod:`longattn.recurrent.titans` (linear or two-layer MLP memory,
gradient of ``‖M(k) − v‖²`` with momentum and forgetting, mini-batches of ``chunk_size`` tokens).

Notation: ``x [B, T, d_model]``, ``H`` query heads and ``Hkv`` key/value heads of ``D = head_dim``;
``P_k, P_v [Hkv, Np, D]`` the learned persistent memory tokens (keys and values, the same for every
sequence, seen by every query); ``merge`` joins the heads ``[B, H, T, D] -> [B, T, H·D]``;
``norm`` is an RMS norm over each head's ``D`` values with a learned gain per channel. Both
layers end with the paper's gate — normalised outputs, a sigmoid on the memory side::

    o = W_o merge( norm_y(y) ⊙ σ(norm_m(m)) )

**MAG** (memory as a gate). Two branches over the same input:

* ``y``: sliding-window softmax attention of ``q, k, v = W_q x, W_k x, W_v x`` where each query
  sees its last ``window`` tokens (itself included) and the ``Np`` persistent tokens (the paper's
  ``SW-Attn*`` over ``[P ‖ x]``), scale ``1/sqrt(D)``. Computed by ``longattn.attention`` with the
  exact ``window`` method, or with ``streaming`` (``sinks = Np``) when there are persistent
  tokens: the persistent tokens are placed first, as the sinks.
* ``m``: the neural memory over ``x``: written with ``k̂_t = W_k' x_t``, ``v_t = W_v' x_t`` and read
  with ``q̂_t = W_q' x_t`` after token ``t``'s update (``titans_memory``), the gates ``η, θ, α``
  from ``x`` as :class:`~longattn.recurrent.layers.TitansLayer` makes them.

The persistent tokens feed the attention only (the paper also runs the memory over them; a learned
initial memory plays that part here). State :class:`TitansMAGState`: the memory state and the last
``window − 1`` keys and values (all a query's window needs besides its own token).

**MAL** (memory as a layer, §4.3). The two in sequence: the neural memory over ``x`` (as in MAG:
written with token ``t``, read after it, ``m_t``), then the same sliding-window attention over the
memory's read-out::

    u = merge(norm_m(m)),   q, k, v = W_q u, W_k u, W_v u,   o = W_o merge(norm_y(SW-Attn*(q, k, v)))

(the RMS norms, gains ``memory_norm_weight`` and ``attn_norm_weight``, keep the memory's read-out
and the attention output of order 1 whatever the memory's scale). No gate. State
:class:`TitansMALState`: as MAG's — the memory state and the window's last keys and values.

**MAC** (memory as a context). The sequence is cut into segments of ``segment`` tokens on a grid
from its first token. For a token ``i`` of the segment that starts at ``s``:

* retrieve ``h_i = M*_{s−1}(W_r x_i)``: the memory as it was before the segment, read without an
  update (:func:`~longattn.recurrent.titans.titans_memory_read`), mapped back to a token
  ``x^h_i = W_h merge(h_i)`` ``[d_model]``;
* attend, with ``q_i = W_q x_i``, over the persistent tokens, the retrieved tokens
  ``W_k x^h_j, W_v x^h_j`` and the segment's tokens ``W_k x_j, W_v x_j`` for ``s ≤ j ≤ i``:
  ``y_i``, scale ``1/sqrt(D)``;
* write the memory with the attention output (``k̂, v, η, θ, α`` from ``merge(y_i)``) and read it
  after the write, ``m_i = M_i(W_q' merge(y_i))``; ``o_i`` by the gate above.

Causality: the paper prepends the whole segment's retrieved tokens to the segment, so a query would
see ``h_j = M(W_r x_j)`` of later tokens ``j > i`` of its segment, a function of the future. Here the
retrieved tokens take the segment's causal mask (``h_j`` is visible to ``i`` only for ``j ≤ i``),
which keeps the layer causal, so it can decode. The memory is written token by token (the chunked
form within segments), so ``M_i`` includes token ``i`` and nothing after it.

State :class:`TitansMACState`: the memory state, the memory's weights at the start of the current
segment (the retrieval reads them until the segment ends) and the keys and values (of the tokens and
of their retrieved tokens) of the current segment's tokens so far, at most ``segment − 1`` of each.
A sequence may therefore be split anywhere, mid-segment included, and continued exactly with no
recomputation: the attention is causal within the segment, so earlier outputs never change, and
later tokens need only these keys and values.

Cost per token: MAG ``O(window + Np)`` attention plus the memory's ``O(D²)`` (linear) or
``O(D·Dh)`` (MLP); MAC ``O(segment + Np)`` attention (the retrieved tokens double the keys), two
memory reads and one write. MAC runs its segments one after the other (each retrieval needs the
memory after the previous segment); MAG runs the memory over the whole input at once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

import longattn
from longattn.core import validate
from longattn.core.reference import reference_attention
from longattn.recurrent.titans import TitansMLPState, TitansState, titans_state_size

__all__ = [
    "NORM_EPS",
    "TitansMACState",
    "TitansMAGState",
    "TitansMALState",
    "persistent_window_attention",
    "segment_attention",
    "titans_gate",
    "titans_norm",
    "titans_mac_naive",
    "titans_mac_state_size",
    "titans_mag_naive",
    "titans_mag_state_size",
    "titans_mal_naive",
    "titans_mal_state_size",
]

#: added to the mean square in the RMS norms of the gate
NORM_EPS = 1e-6

#: the L2 normalisation of the memory's keys and queries (``titans.NORM_EPS``): ``x / sqrt(|x|² + ε)``
_L2_EPS = 1e-6


class TitansMAGState(NamedTuple):
    """The state of :class:`~longattn.recurrent.layers.TitansMAGLayer`.

    Fields:
        memory: the neural memory's ``TitansState`` (``memory="linear"``) or ``TitansMLPState``.
        k_window: ``[B, Hkv, n, D]`` float32 (float64 for float64 inputs): the attention keys of
            the last ``n = min(window − 1, tokens so far)`` tokens, oldest first.
        v_window: ``[B, Hkv, n, D]``: their values.
    """

    memory: TitansState | TitansMLPState
    k_window: torch.Tensor
    v_window: torch.Tensor


class TitansMALState(NamedTuple):
    """The state of :class:`~longattn.recurrent.layers.TitansMALLayer`: the fields of
    :class:`TitansMAGState` (the memory's state; the window's keys and values, here projections of
    the memory's read-out)."""

    memory: TitansState | TitansMLPState
    k_window: torch.Tensor
    v_window: torch.Tensor


class TitansMACState(NamedTuple):
    """The state of :class:`~longattn.recurrent.layers.TitansMACLayer`.

    Fields:
        memory: the neural memory's state after the last token (``TitansState`` or ``TitansMLPState``).
        segment_memory: the memory's weights at the start of the current segment, which the
            retrieval reads: ``(w,)`` (linear, ``[B, Hkv, D, D]``) or ``(w1, w2)`` (MLP,
            ``[B, Hkv, Dh, D]`` and ``[B, Hkv, D, Dh]``). The current weights when ``n = 0``.
        k_tokens, v_tokens: ``[B, Hkv, n, D]`` float32 (float64 for float64 inputs): the attention
            keys and values of the current segment's ``n`` tokens so far (``0 ≤ n < segment``).
        k_retrieved, v_retrieved: ``[B, Hkv, n, D]``: those of their retrieved memory tokens.
    """

    memory: TitansState | TitansMLPState
    segment_memory: tuple[torch.Tensor, ...]
    k_tokens: torch.Tensor
    v_tokens: torch.Tensor
    k_retrieved: torch.Tensor
    v_retrieved: torch.Tensor


# -- state sizes -------------------------------------------------------------------------------


def titans_mag_state_size(heads_kv: int, head_dim: int, window: int, *, hidden: int | None = None) -> int:
    """Bytes of :class:`TitansMAGState` per sequence (one layer, Zoology's convention: everything
    carried to continue): the memory's state (:func:`~longattn.recurrent.titans.titans_state_size`,
    ``hidden=None`` for the linear memory) plus the window's float32 key/value cache of
    ``window − 1`` tokens, ``heads_kv · (window − 1) · 2 · head_dim`` values. The persistent tokens
    are parameters (the same for every sequence) and not counted."""
    heads_kv = validate.check_positive_int("heads_kv", heads_kv)
    head_dim = validate.check_positive_int("head_dim", head_dim)
    window = validate.check_positive_int("window", window)
    memory = titans_state_size(heads_kv, head_dim, head_dim, hidden=hidden)
    return memory + 4 * heads_kv * (window - 1) * 2 * head_dim


def titans_mal_state_size(heads_kv: int, head_dim: int, window: int, *, hidden: int | None = None) -> int:
    """Bytes of :class:`TitansMALState` per sequence: the same as MAG's
    (:func:`titans_mag_state_size`)."""
    return titans_mag_state_size(heads_kv, head_dim, window, hidden=hidden)


def titans_mac_state_size(heads_kv: int, head_dim: int, segment: int, *, hidden: int | None = None) -> int:
    """Bytes of :class:`TitansMACState` per sequence at its largest (one layer): the memory's state,
    the segment-start weights (``heads_kv · D²`` float32 values for the linear memory,
    ``heads_kv · 2 · Dh · D`` for the MLP) and the float32 keys and values of up to
    ``segment − 1`` tokens and as many retrieved tokens, ``heads_kv · (segment − 1) · 4 · D``."""
    heads_kv = validate.check_positive_int("heads_kv", heads_kv)
    head_dim = validate.check_positive_int("head_dim", head_dim)
    segment = validate.check_positive_int("segment", segment)
    memory = titans_state_size(heads_kv, head_dim, head_dim, hidden=hidden)
    weights = head_dim * head_dim if hidden is None else 2 * validate.check_positive_int("hidden", hidden) * head_dim
    return memory + 4 * heads_kv * (weights + (segment - 1) * 4 * head_dim)


# -- the pieces the layers share ---------------------------------------------------------------


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """RMS norm over the last dim with a gain ``weight`` broadcast against ``x``."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + NORM_EPS) * weight


def titans_gate(y: torch.Tensor, m: torch.Tensor, y_weight: torch.Tensor, m_weight: torch.Tensor,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """The gate both layers end with: ``norm_y(y) ⊙ σ(norm_m(m))`` per head.

    ``y, m [B, H, T, D]``, ``y_weight, m_weight [H·D]`` (the norms' gains, head-major); computed in
    float32 (float64 if ``dtype`` or ``y`` is float64), returned in ``dtype`` (default ``y``'s)."""
    b, h, t, d = y.shape
    dtype = y.dtype if dtype is None else dtype
    cdt = torch.float64 if torch.float64 in (y.dtype, dtype) else torch.float32
    wy, wm = y_weight.to(cdt).view(h, 1, d), m_weight.to(cdt).view(h, 1, d)
    return (_rms(y.to(cdt), wy) * torch.sigmoid(_rms(m.to(cdt), wm))).to(dtype)


def titans_norm(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The per-head RMS norm of MAL: ``z [B, H, T, D]``, ``weight [H·D]`` (head-major) -> float32
    (float64 for float64 ``z``), ``[B, H, T, D]``."""
    b, h, t, d = z.shape
    cdt = torch.float64 if z.dtype == torch.float64 else torch.float32
    return _rms(z.to(cdt), weight.to(cdt).view(h, 1, d))


def _persistent(p: torch.Tensor | None, b: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``[Hkv, Np, D] -> [B, Hkv, Np, D]`` in ``dtype`` (None without persistent tokens)."""
    if p is None:
        return None
    return p.to(dtype).unsqueeze(0).expand(b, *p.shape)


def persistent_window_attention(q, k, v, persistent_k, persistent_v, cache_k, cache_v, window: int):
    """MAG's attention: each query sees its last ``window`` tokens (the cache's included) and the
    persistent tokens.

    Args:
        q: ``[B, H, T, D]``; k, v: ``[B, Hkv, T, D]``: the new tokens.
        persistent_k, persistent_v: ``[Hkv, Np, D]`` or None.
        cache_k, cache_v: ``[B, Hkv, n, D]`` (``n ≤ window − 1``) in the state's dtype: the keys and
            values of the tokens just before.
        window: the sliding window.

    Returns:
        ``(out [B, H, T, D]`` in ``q``'s dtype, the new caches (the last ``window − 1`` tokens) in the
        caches' dtype).
    """
    b, h, t, d = q.shape
    sdt = cache_k.dtype
    keys, values = torch.cat([cache_k, k.to(sdt)], dim=2), torch.cat([cache_v, v.to(sdt)], dim=2)
    first = keys.shape[2] - min(window - 1, keys.shape[2])
    new_k, new_v = keys[:, :, first:], values[:, :, first:]
    if t == 0:
        return q.new_zeros(b, h, 0, v.shape[3]), new_k, new_v
    np_ = 0 if persistent_k is None else persistent_k.shape[1]
    if np_:
        # the persistent tokens go first and are the streaming method's sinks: every query sees them
        # and its last `window` keys (a window reaching back over them only sees them again)
        keys = torch.cat([_persistent(persistent_k, b, sdt), keys], dim=2)
        values = torch.cat([_persistent(persistent_v, b, sdt), values], dim=2)
        method = longattn.method("streaming", sinks=np_, window=window)
    else:
        method = longattn.method("window", window=window)
    scale = 1.0 / math.sqrt(d)
    # the cache is kept in float32 and holds values of the input dtype: the cast back is exact
    kk, vv = keys.to(q.dtype), values.to(q.dtype)
    if q.dtype == torch.float64:
        # longattn.attention computes float64 in float32; gradient checks need float64: the
        # reference on the method's own mask (the same keys)
        tk = kk.shape[2]
        mask = method.visible_mask(t, tk, True).dense(b, h, t, tk, device=q.device)
        out, _ = reference_attention(q, kk, vv, mask=mask, scale=scale)
    else:
        out = longattn.attention(q, kk, vv, causal=True, method=method, scale=scale)
    return out, new_k, new_v


def segment_attention(q, k_tokens, v_tokens, k_retrieved, v_retrieved, persistent_k, persistent_v):
    """MAC's attention for the last ``L`` tokens of the segment so far.

    Args:
        q: ``[B, H, L, D]``: the queries of the segment's tokens ``n − L .. n − 1``.
        k_tokens, v_tokens, k_retrieved, v_retrieved: ``[B, Hkv, n, D]``: keys and values of the
            segment's first ``n`` tokens and of their retrieved memory tokens.
        persistent_k, persistent_v: ``[Hkv, Np, D]`` or None.

    Query ``i`` (segment position ``n − L + i``) sees the persistent tokens and the tokens and
    retrieved tokens at positions ``≤ n − L + i``; scale ``1/sqrt(D)``. Computed and returned
    (``[B, H, L, D]``) in float32 (float64 for float64 ``q``): the layer rounds it to its dtype only
    where a projection reads it.
    """
    b, h, length, d = q.shape
    hkv, n = k_tokens.shape[1], k_tokens.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    parts_k, parts_v = [k_retrieved, k_tokens], [v_retrieved, v_tokens]
    np_ = 0 if persistent_k is None else persistent_k.shape[1]
    if np_:
        parts_k.insert(0, _persistent(persistent_k, b, cdt))
        parts_v.insert(0, _persistent(persistent_v, b, cdt))
    keys = torch.cat([p.to(cdt) for p in parts_k], dim=2)  # [B, Hkv, Np + 2n, D]
    values = torch.cat([p.to(cdt) for p in parts_v], dim=2)
    qg = q.to(cdt).reshape(b, hkv, h // hkv * length, d)
    scores = (qg @ keys.transpose(-1, -2)) * (1.0 / math.sqrt(d))  # [B, Hkv, G·L, Np + 2n]
    pos = torch.arange(length, device=q.device) + (n - length)
    seen = torch.arange(n, device=q.device)[None, :] <= pos[:, None]  # [L, n]
    visible = torch.cat([seen.new_ones(length, np_), seen, seen], dim=1).repeat(h // hkv, 1)
    probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
    return (probs @ values).reshape(b, h, length, d)


# -- the float64 references -----------------------------------------------------------------------


def _lin(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    y = x @ linear.weight.detach().double().T
    return y if linear.bias is None else y + linear.bias.detach().double()


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + _L2_EPS)


class _NaiveMemory:
    """The neural memory one token at a time, float64, with its gradient taken by autograd (not the
    closed forms of :mod:`~longattn.recurrent.titans`): per key/value head, ``M(x) = W x`` or
    ``W2 silu(W1 x)``; at each chunk start the weights ``W_c`` are frozen; token ``t``:
    ``S ← η S − θ ∇_W ‖M_{W_c}(k̂) − v‖²``, ``W ← (1 − α) W + S``."""

    def __init__(self, layer, batch: int):
        hkv, d = layer.kv_heads, layer.head_dim
        if layer.memory == "mlp":
            self.w = [layer.memory_w1.detach().double().expand(batch, -1, -1, -1).clone(),
                      layer.memory_w2.detach().double().expand(batch, -1, -1, -1).clone()]
        else:
            self.w = [torch.zeros(batch, hkv, d, d, dtype=torch.float64, device=layer.o_proj.weight.device)]
        self.s = [torch.zeros_like(w) for w in self.w]
        self.frozen = [w.clone() for w in self.w]
        self.chunk, self.count, self.group = layer.chunk_size, 0, layer.heads // hkv

    @staticmethod
    def apply(weights, x: torch.Tensor) -> torch.Tensor:
        """``x [B, Hkv, D] -> [B, Hkv, Dv]``."""
        out = (weights[0] @ x[..., None])[..., 0]
        if len(weights) == 2:
            out = (weights[1] @ F.silu(out)[..., None])[..., 0]
        return out

    def read(self, weights, q: torch.Tensor) -> torch.Tensor:
        """Query heads ``q [B, H, D]`` (normalised here) read their key/value head: ``[B, H, Dv]``."""
        return self.apply([w.repeat_interleave(self.group, dim=1) for w in weights], _l2(q))

    def write_read(self, layer, z: torch.Tensor) -> torch.Tensor:
        """Write the memory with the token ``z [B, in]`` (keys, values and gates from the layer's
        memory projections of ``z``) and read it after the write: ``[B, H, Dv]``."""
        b, h, hkv, d = z.shape[0], layer.heads, layer.kv_heads, layer.head_dim
        self.write(_lin(z, layer.mem_k_proj).view(b, hkv, d), _lin(z, layer.mem_v_proj).view(b, hkv, d),
                   *_gates(layer, z))
        return self.read(self.w, _lin(z, layer.mem_q_proj).view(b, h, d))

    def write(self, k, v, eta, theta, alpha) -> None:
        """``k, v [B, Hkv, D]``, gates ``[B, Hkv]``."""
        if self.count % self.chunk == 0:
            self.frozen = [w.clone() for w in self.w]
        with torch.enable_grad():
            at = [w.clone().requires_grad_(True) for w in self.frozen]
            loss = (self.apply(at, _l2(k)) - v).square().sum()  # rows and heads are independent
            grads = torch.autograd.grad(loss, at)
        e, th, a = (g[..., None, None] for g in (eta, theta, alpha))
        self.s = [e * s - th * g for s, g in zip(self.s, grads)]
        self.w = [(1.0 - a) * w + s for w, s in zip(self.w, self.s)]
        self.count += 1


def _gates(layer, z: torch.Tensor):
    """``η, θ, α [B, Hkv]`` from ``z`` (x for MAG, the attention output for MAC)."""
    g = _lin(z, layer.gate_proj)
    e, th, a = g.split(layer.kv_heads, dim=-1)
    return torch.sigmoid(e), layer.theta_scale * F.softplus(th), torch.sigmoid(a)


def _attend(q, keys, values, group: int) -> torch.Tensor:
    """``q [B, H, D]`` over ``keys, values [B, Hkv, n, D]``, every key visible: ``[B, H, D]``."""
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    p = torch.softmax((keys @ q[..., None])[..., 0] / math.sqrt(q.shape[-1]), dim=-1)
    return (p[..., None, :] @ values)[..., 0, :]


def _norm_naive(z: torch.Tensor, weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head RMS norm of ``z [B, H, D]`` with the gain ``weight [H·D]``."""
    w = weight.detach().double().view(heads, -1)
    return z / torch.sqrt(z.square().mean(-1, keepdim=True) + NORM_EPS) * w


def _gate_naive(layer, y, m) -> torch.Tensor:
    """``y, m [B, H, D]`` -> ``o_proj(merge(norm(y) ⊙ σ(norm(m))))`` ``[B, d_model]``."""
    h = layer.heads
    gated = _norm_naive(y, layer.attn_norm_weight, h) * torch.sigmoid(_norm_naive(m, layer.memory_norm_weight, h))
    return _lin(gated.flatten(1), layer.o_proj)


def _window_attend_naive(layer, z: torch.Tensor, keys: list, values: list, persistent) -> torch.Tensor:
    """MAG's and MAL's attention for the newest token: ``q, k, v`` projected from ``z [B, in]``
    (its key and value appended to ``keys`` / ``values``), attending over the persistent tokens and
    the last ``window`` keys: ``[B, H, D]``."""
    b, h, hkv, d = z.shape[0], layer.heads, layer.kv_heads, layer.head_dim
    q = _lin(z, layer.q_proj).view(b, h, d)
    keys.append(_lin(z, layer.k_proj).view(b, hkv, 1, d))
    values.append(_lin(z, layer.v_proj).view(b, hkv, 1, d))
    lo = max(0, len(keys) - layer.window)
    kk, vv = torch.cat(keys[lo:], dim=2), torch.cat(values[lo:], dim=2)
    pk, pv = persistent
    if pk is not None:
        kk, vv = torch.cat([pk, kk], dim=2), torch.cat([pv, vv], dim=2)
    return _attend(q, kk, vv, h // hkv)


def _persistent_naive(layer, b: int):
    if layer.persistent_tokens == 0:
        return None, None
    return (layer.persistent_k.detach().double().expand(b, -1, -1, -1),
            layer.persistent_v.detach().double().expand(b, -1, -1, -1))


def titans_mag_naive(layer, x: torch.Tensor) -> torch.Tensor:
    """The specification of :class:`~longattn.recurrent.layers.TitansMAGLayer`, one token at a time in
    float64 with plain torch ops, from the layer's parameters: for token ``t``, softmax attention over
    the persistent tokens and the keys of tokens ``max(0, t − window + 1) .. t``; the memory written
    with token ``t`` and read after it; the gate. ``x [B, T, d_model]`` (a fresh sequence);
    returns ``y [B, T, d_model]`` float64."""
    b, t, _ = x.shape
    x64 = x.detach().double()
    mem = _NaiveMemory(layer, b)
    persistent = _persistent_naive(layer, b)
    keys, values, outs = [], [], []
    for i in range(t):
        xi = x64[:, i]
        y = _window_attend_naive(layer, xi, keys, values, persistent)
        outs.append(_gate_naive(layer, y, mem.write_read(layer, xi)))
    return torch.stack(outs, dim=1) if outs else x64.new_zeros(b, 0, layer.d_model)


def titans_mal_naive(layer, x: torch.Tensor) -> torch.Tensor:
    """The specification of :class:`~longattn.recurrent.layers.TitansMALLayer`, one token at a time in
    float64 with plain torch ops: the memory written with token ``t`` and read after it; the read-out
    normalised per head; its projections attend over the persistent tokens and the last ``window``
    tokens' keys; the attention output normalised per head and projected. ``x [B, T, d_model]`` (a
    fresh sequence); returns ``y [B, T, d_model]`` float64."""
    b, t, _ = x.shape
    h = layer.heads
    x64 = x.detach().double()
    mem = _NaiveMemory(layer, b)
    persistent = _persistent_naive(layer, b)
    keys, values, outs = [], [], []
    for i in range(t):
        xi = x64[:, i]
        u = _norm_naive(mem.write_read(layer, xi), layer.memory_norm_weight, h).flatten(1)  # [B, H·D]
        y = _window_attend_naive(layer, u, keys, values, persistent)
        outs.append(_lin(_norm_naive(y, layer.attn_norm_weight, h).flatten(1), layer.o_proj))
    return torch.stack(outs, dim=1) if outs else x64.new_zeros(b, 0, layer.d_model)


def titans_mac_naive(layer, x: torch.Tensor) -> torch.Tensor:
    """The specification of :class:`~longattn.recurrent.layers.TitansMACLayer`, one token at a time in
    float64 with plain torch ops: at each segment start the memory's weights are kept for retrieval;
    token ``i`` retrieves ``h_i`` from them, attends over the persistent tokens and the segment's
    tokens and retrieved tokens up to itself, writes the memory with its attention output, reads it
    back, and gates. ``x [B, T, d_model]`` (a fresh sequence); returns ``y [B, T, d_model]`` float64."""
    b, t, _ = x.shape
    h, hkv, d = layer.heads, layer.kv_heads, layer.head_dim
    x64 = x.detach().double()
    mem = _NaiveMemory(layer, b)
    pk, pv = _persistent_naive(layer, b)
    outs = []
    for i in range(t):
        if i % layer.segment == 0:
            held = [w.clone() for w in mem.w]
            keys, values = [], []  # this segment's: retrieved tokens and tokens, in any order
        xi = x64[:, i]
        retrieved = mem.read(held, _lin(xi, layer.retrieve_q_proj).view(b, h, d))
        token = _lin(retrieved.flatten(1), layer.retrieve_proj)  # [B, d_model]
        for z in (token, xi):
            keys.append(_lin(z, layer.k_proj).view(b, hkv, 1, d))
            values.append(_lin(z, layer.v_proj).view(b, hkv, 1, d))
        kk, vv = torch.cat(keys, dim=2), torch.cat(values, dim=2)
        if pk is not None:
            kk, vv = torch.cat([pk, kk], dim=2), torch.cat([pv, vv], dim=2)
        y = _attend(_lin(xi, layer.q_proj).view(b, h, d), kk, vv, h // hkv)
        outs.append(_gate_naive(layer, y, mem.write_read(layer, y.flatten(1))))
    return torch.stack(outs, dim=1) if outs else x64.new_zeros(b, 0, layer.d_model)
