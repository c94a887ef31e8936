"""RAT: a gated linear recurrence inside chunks, softmax attention across chunks.

Wei, Yadav, Pascanu, Gulcehre 2025, "RAT: Bridging RNN Efficiency and Attention Accuracy in
Language Modeling" (arXiv:2507.04416). The sequence is cut into chunks of ``L = chunk_size`` tokens.
Inside a chunk a diagonal linear recurrence runs over the keys and the values, restarting at every
chunk boundary (``k̃, ṽ = 0`` before a chunk's first token)::

    k̃_t = a_t ⊙ k̃_{t−1} + (1 − a_t) ⊙ k_t        a_t = exp(log_key_gate_t)   ∈ (0, 1]^Dk
    ṽ_t = f_t ⊙ ṽ_{t−1} + (1 − f_t) ⊙ v_t        f_t = exp(log_value_gate_t) ∈ (0, 1]^Dv

Across chunks, softmax attention: query ``q_t`` (scaled by ``1/sqrt(Dk)``) attends over the
*summary* of every previous chunk — the recurrence's value at that chunk's last token,
``(k̃_end, ṽ_end)`` — and over its own chunk's current ``(k̃_t, ṽ_t)``: ``t // L + 1`` keys::

    o_t = Σ_{n < c} w_n ṽ_end(n) + w_self ṽ_t,     c = t // L,
    w = softmax(scale · [q_t·k̃_end(0), …, q_t·k̃_end(c−1), q_t·k̃_t])

``L = 1`` is causal softmax attention over the keys ``(1 − a) ⊙ k`` and values ``(1 − f) ⊙ v``; ``L ≥ T``
leaves one key per query, so ``o_t = ṽ_t`` (a gated RNN over the values alone).

What this op covers of the paper's RAT layer, and what it leaves to the caller:

* The gates are explicit log-gate arguments, one for the keys (``[B, Hkv, T, Dk]``) and one for
  the values (``[B, Hkv, T, Dv]``). Where a model shares one forget gate between keys and values
  (``Dk == Dv``), pass the same tensor twice. (In a model: ``logsigmoid(x W)``.)
* The layer's input/output projections, any output gate on ``o_t`` and any positional encoding of
  the queries and chunk summaries are not part of this op: projections and an element-wise output
  gate are applied outside it; a positional encoding of the summaries would have to be added here.
* ``1 − a_t`` is computed as ``−expm1(log a_t)``, exact for gates near 1.

State (decoding, prefill in pieces): the summaries of the completed chunks, the running ``k̃, ṽ`` of
the current chunk and the position inside it. The state *grows by one summary per chunk*: after
``T`` tokens it holds ``T // L`` keys and values per key/value head — RAT's memory is ``T / L``,
between softmax attention's ``T`` and a fixed-size RNN state's ``1``.

Forms (see :mod:`longattn.recurrent`):

* :func:`rat_attention` — parallel. The intra-chunk recurrence is a log-depth (Hillis–Steele) scan
  inside each chunk: ``⌈log2 L⌉`` steps, each adding the partial sum ``d`` tokens back with the decay
  ``exp(Σ log a)`` over the ``d`` tokens in between. Those exponents are sums of log gates over a
  forward stretch (never differences of prefix sums), hence ``≤ 0`` and exact to rounding relative
  to themselves, whatever the gates. The summaries are the scan's last row per chunk, and the
  inter-chunk part is one masked softmax per group of chunks over the summaries so far, with the own
  ``k̃_t`` as one more key, in float32. No per-token Python loop.
* :func:`rat_attention_naive` — the equations above, one token at a time, in float64.
* :func:`rat_attention_step` — one token.

Grouped heads: ``k``, ``v`` and both gates have ``Hkv`` heads, each serving ``H / Hkv`` query heads
(query head ``h`` reads key/value head ``h // (H / Hkv)``); the state belongs to the key/value head.

Unlike the other ops of this package, whose ``chunk`` only tiles the computation, ``chunk_size`` is
part of the model here: different chunk sizes give different outputs, and a state must be
continued with the chunk size it was built with.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from longattn.core import validate
from longattn.recurrent import common
from longattn.recurrent.common import check_per_token, check_qkv, compute_dtype, initial_state_tuple

__all__ = [
    "RATState",
    "rat_attention",
    "rat_attention_naive",
    "rat_attention_step",
    "rat_state_size",
]

#: decay exponents are raised to at least this before ``exp`` (as in :mod:`longattn.recurrent.gated`):
#: ``exp(-60) ≈ 9e-27`` is as good as 0 against the weight 1 of the newest token, and exponents far
#: below it make ``exp`` return subnormals, which the CPU computes many times slower.
EXP_FLOOR = -60.0


class RATState(NamedTuple):
    """The RAT state after the tokens seen so far, float32 (float64 from the naive form, or when the
    inputs are float64).

    Fields:
        keys: ``[B, Hkv, N, Dk]`` the key summaries ``k̃_end`` of the ``N`` completed chunks.
        values: ``[B, Hkv, N, Dv]`` the value summaries ``ṽ_end``.
        k_run: ``[B, Hkv, Dk]`` the running ``k̃`` of the current, unfinished chunk (zeros at
            position 0).
        v_run: ``[B, Hkv, Dv]`` the running ``ṽ``.
        position: a 0-dim tensor (float dtype, like the other fields) holding the tokens seen modulo
            ``chunk_size``: how far into its chunk the next token is. At position 0 the next token
            starts a chunk and ``k_run, v_run`` are not read. A plain ``int`` is accepted on input.

    ``N`` grows by one per ``chunk_size`` tokens (see :func:`rat_state_size`).
    """

    keys: torch.Tensor
    values: torch.Tensor
    k_run: torch.Tensor
    v_run: torch.Tensor
    position: torch.Tensor


def rat_state_size(heads_kv: int, dk: int, dv: int, tokens: int, chunk_size: int) -> int:
    """Bytes of ``RATState`` per sequence (one layer) after ``tokens`` tokens: ``tokens // chunk_size``
    summaries plus the running pair, ``heads_kv · (N + 1) · (dk + dv)`` float32 values, and the
    4-byte position. Grows as ``tokens / chunk_size``."""
    heads_kv = validate.check_positive_int("heads_kv", heads_kv)
    dk = validate.check_positive_int("dk", dk)
    dv = validate.check_positive_int("dv", dv)
    tokens = validate.check_positive_int("tokens", tokens, allow_zero=True)
    chunk_size = validate.check_positive_int("chunk_size", chunk_size)
    return 4 * (heads_kv * (tokens // chunk_size + 1) * (dk + dv) + 1)


# -- argument checks ------------------------------------------------------------------------


def _check_inputs(q, k, v, log_key_gate, log_value_gate, *, step: bool) -> tuple[int, int, int, int, int, int]:
    """Check ``q [B, H, T, Dk]``, ``k [B, Hkv, T, Dk]``, ``v [B, Hkv, T, Dv]``,
    ``log_key_gate [B, Hkv, T, Dk]``, ``log_value_gate [B, Hkv, T, Dv]``; return ``(B, H, Hkv, T, Dk, Dv)``."""
    b, h, hkv, t, dk, dv = check_qkv(q, k, v, step=step)
    what = "finite and <= 0 (the log of a gate in (0, 1])"
    check_per_token("log_key_gate", log_key_gate, (b, hkv, t, dk), q.device, low=-math.inf, high=0.0, what=what,
                    layout="[batch, heads_kv, tokens, head_dim_k]", note=" (one gate per key channel, following k)")
    check_per_token("log_value_gate", log_value_gate, (b, hkv, t, dv), q.device, low=-math.inf, high=0.0, what=what,
                    layout="[batch, heads_kv, tokens, head_dim_v]", note=" (one gate per value channel, following v)")
    return b, h, hkv, t, dk, dv


def _initial(state, b: int, hkv: int, dk: int, dv: int, chunk_size: int, device, dtype, name: str
             ) -> tuple[RATState, int]:
    """The state to start from (the empty state for None) in ``dtype``, and its position as an int."""
    n = 0
    if isinstance(state, RATState):
        keys = state.keys
        if isinstance(keys, torch.Tensor) and keys.dim() == 4:
            n = keys.shape[2]
        pos = state.position
        if isinstance(pos, numbers.Integral) and not isinstance(pos, bool):
            state = state._replace(position=torch.tensor(float(pos), dtype=dtype, device=device))
    st = initial_state_tuple(
        name, state, RATState,
        {"keys": (b, hkv, n, dk), "values": (b, hkv, n, dv), "k_run": (b, hkv, dk), "v_run": (b, hkv, dv),
         "position": ()},
        device, dtype,
        layouts={"keys": "[batch, heads_kv, chunks, head_dim_k]", "values": "[batch, heads_kv, chunks, head_dim_v]",
                 "k_run": "[batch, heads_kv, head_dim_k]", "v_run": "[batch, heads_kv, head_dim_v]",
                 "position": "[] (a 0-dim tensor)"},
        note=" (keys and values must hold the same number of chunk summaries)",
    )
    p = float(st.position)
    if not (p.is_integer() and 0 <= p < chunk_size):
        raise ValueError(f"{name}.position must be an integer in [0, chunk_size) = [0, {chunk_size}) (tokens seen "
                         f"modulo the chunk size the state was built with), got {p!r}")
    return st, int(p)  # type: ignore[return-value]


# -- the three forms ------------------------------------------------------------------------


def _decay(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` for decay exponents ``x <= 0``, with ``x`` raised to ``EXP_FLOOR`` first."""
    return x.clamp(min=EXP_FLOOR).exp()


def _chunk_scan(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``x, g [..., L, D] -> [..., L, D]``: ``y_t = exp(g_t) ⊙ y_{t−1} + x_t`` along ``L`` from
    ``y_{−1} = 0``, as a Hillis–Steele scan of ``⌈log2 L⌉`` steps.

    Before the step with offset ``d``, ``x_t`` holds ``Σ_{t−d<j≤t} exp(Σ_{j<s≤t} g_s) x_j`` and ``w_t``
    the decay ``exp(Σ_{t−d<s≤t} g_s)`` over the last ``d`` tokens; the step adds ``w_t ⊙ x_{t−d}`` and
    squares the stretch of ``w`` (``w_t ← w_t · w_{t−d}``). Every decay is a product of gates in
    ``(0, 1]`` over a forward stretch (no exponent above 0, no difference of prefix sums), each
    weight with relative rounding ``O(log L · ε)``; decays are kept at least ``exp(EXP_FLOOR)``."""
    length = x.shape[-2]
    w = _decay(g)
    floor = math.exp(EXP_FLOOR)
    d = 1
    while d < length:
        x_next = x.clone()
        x_next[..., d:, :].addcmul_(w[..., d:, :], x[..., :-d, :])
        x = x_next
        if 2 * d < length:
            w_next = w.clone()
            w_next[..., d:, :].mul_(w[..., :-d, :]).clamp_(min=floor)
            w = w_next
        d *= 2
    return x


def rat_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_key_gate: torch.Tensor,
    log_value_gate: torch.Tensor,
    *,
    chunk_size: int = 64,
    scale: float | None = None,
    initial_state: RATState | None = None,
) -> tuple[torch.Tensor, RATState]:
    """RAT, parallel form (prefill and training).

    Args:
        q: ``[B, H, T, Dk]``.
        k: ``[B, Hkv, T, Dk]``, ``H`` a multiple of ``Hkv``.
        v: ``[B, Hkv, T, Dv]``.
        log_key_gate: ``[B, Hkv, T, Dk]``, finite and ``<= 0``: ``log a_t`` per key channel.
        log_value_gate: ``[B, Hkv, T, Dv]``, finite and ``<= 0``: ``log f_t`` per value channel (the
            same tensor as ``log_key_gate`` for a shared gate).
        chunk_size: ``L``, tokens per chunk (part of the model; it need not divide ``T``).
        scale: multiplies ``q·k``; default ``1/sqrt(Dk)``.
        initial_state: the ``RATState`` after earlier tokens (built with the same ``chunk_size``; it
            may end mid-chunk); None starts a fresh sequence.

    Returns:
        ``(out [B, H, T, Dv]`` in the input dtype, ``RATState``). Sums, scores and the state are
        float32 (float64 for float64 inputs).
    """
    b, h, hkv, t, dk, dv = _check_inputs(q, k, v, log_key_gate, log_value_gate, step=False)
    scale = validate.check_scale(scale, dk)
    length = validate.check_positive_int("chunk_size", chunk_size)
    cdt = compute_dtype(q.dtype)
    st, p = _initial(initial_state, b, hkv, dk, dv, length, q.device, cdt, "initial_state")
    if t == 0:
        return q.new_zeros(b, h, 0, dv), RATState(*(x.clone() for x in st))
    grp = h // hkv
    n0 = st.keys.shape[2]
    total = p + t  # tokens from the start of the current chunk
    n_all = -(-total // length)
    back = n_all * length - total

    # the sequence aligned to chunk boundaries: ``p`` tokens in front stand for the current chunk's
    # earlier tokens — all zero but the last, which carries the running (k̃, ṽ) (no (1 − a) factor)
    # so that the scan decays it into the chunk's remaining tokens; zero tokens with log gate 0 behind.
    gates = torch.cat([log_key_gate.to(cdt), log_value_gate.to(cdt)], dim=-1)  # [B, Hkv, T, Dk + Dv]
    xs = (torch.expm1(gates) * torch.cat([k.to(cdt), v.to(cdt)], dim=-1)).neg_()  # (1 − a) ⊙ k | (1 − f) ⊙ v
    front = [xs.new_zeros(b, hkv, p - 1, dk + dv), torch.cat([st.k_run, st.v_run], -1)[:, :, None]] if p else []
    xs = torch.cat([*front, xs, xs.new_zeros(b, hkv, back, dk + dv)], dim=2).view(b, hkv, n_all, length, dk + dv)
    gs = torch.nn.functional.pad(gates, (0, 0, p, back)).view(b, hkv, n_all, length, dk + dv)
    qs = (torch.nn.functional.pad(q.to(cdt), (0, 0, p, back)) * scale).view(b, hkv, grp, n_all * length, dk)

    keys, values, runs, outs = [st.keys], [st.values], [], []
    step = max(1, common.GROUP_TOKENS // length)  # whole chunks a group at a time
    for a in range(0, n_all, step):
        e = min(a + step, n_all)
        run = _chunk_scan(xs[:, :, a:e], gs[:, :, a:e])  # [B, Hkv, n, L, Dk + Dv]: (k̃_t | ṽ_t)
        runs.append(run)
        # the summaries visible to this group's queries: those of every chunk before its last one
        seen_k = torch.cat(keys, dim=2)
        seen_v = torch.cat(values, dim=2)
        ends = run[:, :, :, -1]  # [B, Hkv, n, Dk + Dv]
        seen_k = torch.cat([seen_k, ends[:, :, :-1, :dk]], dim=2)
        seen_v = torch.cat([seen_v, ends[:, :, :-1, dk:]], dim=2)
        keys.append(ends[..., :dk])
        values.append(ends[..., dk:])

        run = run.flatten(2, 3)  # [B, Hkv, n·L, Dk + Dv]
        qg = qs[:, :, :, a * length:e * length]  # [B, Hkv, grp, n·L, Dk]
        scores = qg @ seen_k[:, :, None].transpose(-1, -2)  # [B, Hkv, grp, n·L, N]
        chunk_of = torch.arange(a, e, device=q.device).repeat_interleave(length)  # the chunk of every query
        visible = torch.arange(seen_k.shape[2], device=q.device)[None, :] < n0 + chunk_of[:, None]
        own = (qg * run[:, :, None, :, :dk]).sum(-1, keepdim=True)  # q_t · k̃_t
        logits = torch.cat([scores, own], dim=-1)
        logits[..., :-1].masked_fill_(~visible, -math.inf)  # the summaries of the query's chunk and later
        w = torch.softmax(logits, dim=-1)
        outs.append(w[..., :-1] @ seen_v[:, :, None] + w[..., -1:] * run[:, :, None, :, dk:])

    out = torch.cat(outs, dim=3)[:, :, :, p:p + t].reshape(b, h, t, dv)
    done = total // length  # chunks completed by the end of this call
    new_keys = torch.cat(keys, dim=2)[:, :, :n0 + done]
    new_values = torch.cat(values, dim=2)[:, :, :n0 + done]
    pos = total % length
    if pos:
        last = runs[-1][:, :, -1, pos - 1]  # the running (k̃, ṽ) after the last token
        k_run, v_run = last[..., :dk], last[..., dk:]
    else:
        k_run, v_run = torch.zeros_like(st.k_run), torch.zeros_like(st.v_run)
    position = torch.tensor(float(pos), dtype=cdt, device=q.device)
    return out.to(q.dtype), RATState(new_keys, new_values, k_run, v_run, position)


def rat_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_key_gate: torch.Tensor,
    log_value_gate: torch.Tensor,
    *,
    chunk_size: int = 64,
    scale: float | None = None,
    initial_state: RATState | None = None,
) -> tuple[torch.Tensor, RATState]:
    """RAT as the paper's equations, one token at a time in float64 (the specification the other
    forms are tested against): update the running ``k̃, ṽ``, attend over the summaries of the
    completed chunks and the running pair, and at a chunk's last token append the pair as its
    summary.

    Arguments as :func:`rat_attention`. Returns ``(out [B, H, T, Dv]`` float64, ``RATState``
    float64``)``.
    """
    b, h, hkv, t, dk, dv = _check_inputs(q, k, v, log_key_gate, log_value_gate, step=False)
    scale = validate.check_scale(scale, dk)
    length = validate.check_positive_int("chunk_size", chunk_size)
    f64 = torch.float64
    st, pos = _initial(initial_state, b, hkv, dk, dv, length, q.device, f64, "initial_state")
    keys, values = list(st.keys.unbind(2)), list(st.values.unbind(2))
    k_run, v_run = st.k_run, st.v_run
    q64 = q.to(f64).view(b, hkv, h // hkv, t, dk) * scale
    k64, v64 = k.to(f64), v.to(f64)
    a64, f64_gate = log_key_gate.to(f64).exp(), log_value_gate.to(f64).exp()
    outs = []
    for i in range(t):
        if pos == 0:  # a chunk starts: the recurrence restarts from zero
            k_run, v_run = torch.zeros_like(k_run), torch.zeros_like(v_run)
        a, f = a64[:, :, i], f64_gate[:, :, i]
        k_run = a * k_run + (1 - a) * k64[:, :, i]
        v_run = f * v_run + (1 - f) * v64[:, :, i]
        all_k = torch.stack([*keys, k_run], dim=2)  # [B, Hkv, N + 1, Dk]
        all_v = torch.stack([*values, v_run], dim=2)
        scores = q64[:, :, :, i] @ all_k.transpose(-1, -2)  # [B, Hkv, grp, N + 1]
        outs.append(torch.softmax(scores, dim=-1) @ all_v)  # [B, Hkv, grp, Dv]
        pos += 1
        if pos == length:  # the chunk's last token: its (k̃, ṽ) becomes the chunk's summary
            keys.append(k_run)
            values.append(v_run)
            k_run, v_run, pos = torch.zeros_like(k_run), torch.zeros_like(v_run), 0
    out = torch.stack(outs, dim=3) if t else q64.new_zeros(b, hkv, h // hkv, 0, dv)
    state = RATState(
        torch.stack(keys, dim=2) if keys else st.keys.clone(),
        torch.stack(values, dim=2) if values else st.values.clone(),
        k_run, v_run, torch.tensor(float(pos), dtype=f64, device=q.device),
    )
    return out.reshape(b, h, t, dv), state


def rat_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_key_gate: torch.Tensor,
    log_value_gate: torch.Tensor,
    state: RATState | None = None,
    *,
    chunk_size: int = 64,
    scale: float | None = None,
) -> tuple[torch.Tensor, RATState]:
    """One decoding step of RAT.

    Args:
        q: ``[B, H, 1, Dk]``; ``k [B, Hkv, 1, Dk]``; ``v [B, Hkv, 1, Dv]``;
        log_key_gate: ``[B, Hkv, 1, Dk]``; log_value_gate: ``[B, Hkv, 1, Dv]``, finite and ``<= 0``.
        state: the ``RATState`` so far (built with the same ``chunk_size``); None: the first token.
        chunk_size, scale: as in :func:`rat_attention`.

    Returns:
        ``(out [B, H, 1, Dv]`` in the input dtype, the next ``RATState``): when this token completes
        a chunk its ``(k̃, ṽ)`` is appended to the summaries and the position returns to 0.
    """
    b, h, hkv, _, dk, dv = _check_inputs(q, k, v, log_key_gate, log_value_gate, step=True)
    scale = validate.check_scale(scale, dk)
    length = validate.check_positive_int("chunk_size", chunk_size)
    cdt = compute_dtype(q.dtype)
    st, pos = _initial(state, b, hkv, dk, dv, length, q.device, cdt, "state")
    ga, gf = log_key_gate[:, :, 0].to(cdt), log_value_gate[:, :, 0].to(cdt)
    k_run = -torch.expm1(ga) * k[:, :, 0].to(cdt)
    v_run = -torch.expm1(gf) * v[:, :, 0].to(cdt)
    if pos:  # inside a chunk: decay the running pair into this token
        k_run = ga.exp() * st.k_run + k_run
        v_run = gf.exp() * st.v_run + v_run
    qs = q.to(cdt).view(b, hkv, h // hkv, dk) * scale
    scores = qs @ st.keys.transpose(-1, -2)  # [B, Hkv, grp, N]
    own = (qs * k_run[:, :, None]).sum(-1, keepdim=True)
    w = torch.softmax(torch.cat([scores, own], dim=-1), dim=-1)
    out = (w[..., :-1] @ st.values + w[..., -1:] * v_run[:, :, None]).view(b, h, 1, dv)
    pos += 1
    if pos == length:
        nxt = RATState(torch.cat([st.keys, k_run[:, :, None]], dim=2),
                       torch.cat([st.values, v_run[:, :, None]], dim=2),
                       torch.zeros_like(k_run), torch.zeros_like(v_run), torch.zeros((), dtype=cdt, device=q.device))
    else:
        nxt = RATState(st.keys, st.values, k_run, v_run, torch.tensor(float(pos), dtype=cdt, device=q.device))
    return out.to(q.dtype), nxt
