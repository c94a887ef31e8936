"""Block-mass estimates from a strided sample of the score matrix.

A block selector needs, per query block and key block, the share of the block's attention that
falls in the key block. The full score matrix costs as much as attention; these estimates read
about one score in ``stride`` and turn it into block masses:

* ``antidiagonal_mass`` — XAttention (Xu et al. 2025): inside every ``stride × stride`` square of
  the score matrix take the antidiagonal. ``mode="sum"`` is the paper's form: queries and keys
  are regrouped by ``stride`` (the queries of a group in reverse order), so one matmul of the
  regrouped tensors gives every square's antidiagonal *sum of logits*; the softmax runs over
  those sums, one row per query group. ``mode="entries"``: each antidiagonal entry is its own
  softmax term (query ``i`` scores every ``stride``-th key, at the phase its antidiagonal
  crosses), so a single strong key is not averaged with ``stride − 1`` weak ones.
* ``strided_row_mass`` — every ``stride``-th query of each query block attends to *every* key
  with the exact softmax, and its block masses are summed: the block oracle on a sample of
  queries. Same cost as the antidiagonal forms (``Tq/stride × Tk`` scores).

All three compute in float32 whatever the inputs' dtype (the sampled rows and the regrouped
queries are small; the keys, which every estimate reads, are converted once), in chunks of query
rows (memory ``O(rows · Tk)``), and never read a key after the last query of the query block a
score is credited to. Under causality a key enters a sampled row only if that query sees it
(per token for ``"entries"`` and rows; per group for ``"sum"``, whose diagonal groups lie
inside the query block); padded keys never enter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

#: score elements computed at once per chunk (bounds the estimators' working memory)
CHUNK_ELEMENTS = 1 << 23


def _grouped_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [B, Hq, m, E] · k [B, Hkv, n, E]ᵀ · scale`` → ``[B, Hq, m, n]`` (GQA: a group's query
    heads are stacked along rows, keys are not copied)."""
    b, hq, m, e = q.shape
    hk = k.shape[1]
    # the scale goes on the (smaller) query side: no extra pass over the scores
    s = torch.matmul((q * scale).reshape(b, hk, (hq // hk) * m, e), k.transpose(-1, -2))
    return s.view(b, hq, m, k.shape[2])


def as_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def sampled_rows(tokens_q: int, q_block: int, stride: int, device) -> torch.Tensor:
    """Indices of the sampled queries: in each query block of ``q_block`` rows, rows
    ``stride−1, 2·stride−1, …``; a block shorter than ``stride`` contributes its last row."""
    i = torch.arange(tokens_q, device=device)
    within = i % q_block
    rows = torch.clamp(tokens_q - (i // q_block) * q_block, max=q_block)  # rows of i's block
    keep = (within % stride == stride - 1) | ((rows < stride) & (within == rows - 1))
    return i[keep]


def row_scores(q: torch.Tensor, k32: torch.Tensor, rows: torch.Tensor, *, scale: float, causal: bool,
               key_padding_mask: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Exact scaled scores of the queries ``rows`` (indices into ``q``) against every key they may
    see, in chunks of rows.

    Yields ``(rows_chunk [m], scores [B, Hq, m, hi], hi)`` float32: ``hi`` is the number of leading
    keys the chunk may see (under causality, up to its last query); keys a row may not see (later
    ones, padding) score ``-inf``."""
    b, hq, tq, _ = q.shape
    tk = k32.shape[2]
    off = tk - tq
    per = max(1, CHUNK_ELEMENTS // max(1, b * hq * tk))
    for a in range(0, rows.numel(), per):
        r = rows[a:a + per]
        hi = min(int(r[-1]) + off + 1, tk) if causal else tk
        if hi <= 0:
            yield r, q.new_zeros((b, hq, r.numel(), 0), dtype=torch.float32), 0
            continue
        s = _grouped_scores(as_float32(q[:, :, r]), k32[:, :, :hi], scale)
        lo = int(r[0]) + off + 1  # every row sees the keys before this one: mask only the tail
        if causal and lo < hi:
            tail = s[..., max(lo, 0):]
            tail.masked_fill_(torch.arange(max(lo, 0), hi, device=q.device)[None, :] > (r + off)[:, None], -math.inf)
        if key_padding_mask is not None:
            s.masked_fill_(~key_padding_mask[:, None, None, :hi], -math.inf)
        yield r, s, hi


def row_probabilities(q: torch.Tensor, k32: torch.Tensor, rows: torch.Tensor, *, scale: float, causal: bool,
                      key_padding_mask: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """``row_scores`` turned into softmax rows: ``(rows_chunk, probs [B, Hq, m, hi], hi)``; a row
    that sees no key is all zeros."""
    off = k32.shape[2] - q.shape[2]
    for r, s, hi in row_scores(q, k32, rows, scale=scale, causal=causal, key_padding_mask=key_padding_mask):
        if hi:
            s = torch.softmax(s, dim=-1)
            if key_padding_mask is not None or int(r[0]) + off < 0:  # a row may see no key: NaN → 0
                s = s.nan_to_num_(0.0)
        yield r, s, hi


def block_sums(p: torch.Tensor, block: int, n_blocks: int) -> torch.Tensor:
    """``p [..., t]`` (``t <= n_blocks·block``) summed per key block → ``[..., n_blocks]``."""
    t = p.shape[-1]
    if t == n_blocks * block:
        return p.reshape(*p.shape[:-1], n_blocks, block).sum(-1)
    whole = t // block
    out = p.new_zeros((*p.shape[:-1], n_blocks))
    out[..., :whole] = p[..., :whole * block].reshape(*p.shape[:-1], whole, block).sum(-1)
    if t > whole * block:
        out[..., whole] = p[..., whole * block:].sum(-1)
    return out


def strided_row_mass(q: torch.Tensor, k: torch.Tensor, *, stride: int, q_block: int, block: int, scale: float,
                     causal: bool, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Block masses from the exact attention of every ``stride``-th query of each query block.

    Args:
        q: ``[B, Hq, Tq, D]`` (query ``i`` at position ``i + Tk − Tq``); k: ``[B, Hkv, Tk, D]``; any
            float dtype (computed in float32).

    Returns:
        ``[B, Hq, ceil(Tq/q_block), ceil(Tk/block)]`` float32: per query block, the summed
        attention probability its sampled queries give each key block (each sampled row sums to
        1, or 0 when it sees no key).
    """
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    n_qb, n = math.ceil(tq / q_block), math.ceil(tk / block)
    mass = torch.zeros(b, hq, n_qb, n, dtype=torch.float32, device=q.device)
    k32 = as_float32(k)
    rows = sampled_rows(tq, q_block, stride, q.device)
    for r, p, hi in row_probabilities(q, k32, rows, scale=scale, causal=causal, key_padding_mask=key_padding_mask):
        if hi == 0:
            continue
        nb = math.ceil(hi / block)
        mass[..., :nb].index_add_(2, r // q_block, block_sums(p, block, nb))
    return mass


def antidiagonal_mass(q: torch.Tensor, k: torch.Tensor, *, stride: int, q_block: int, block: int, scale: float,
                      causal: bool, key_padding_mask: torch.Tensor | None = None, mode: str = "sum") -> torch.Tensor:
    """XAttention's antidiagonal block masses.

    Query groups are ``stride`` consecutive queries (``[S·a, S·a+S)`` by index), key groups
    ``stride`` consecutive keys (``[S·c, S·c+S)`` by position); the antidiagonal of square
    ``(a, c)`` pairs query ``S·a + S−1−r`` with key ``S·c + r``.

    Args:
        q: ``[B, Hq, Tq, D]``; k: ``[B, Hkv, Tk, D]``; any float dtype (computed in float32).
        stride: ``S``; capped at ``min(Tq, Tk)``.
        mode: ``"sum"`` — the paper's estimate: softmax over key groups of the antidiagonal's
            summed logits (``scale/S`` per entry, i.e. their mean), one row per query group; a
            key group enters a query group's row when its last key is at or before the group's
            last query. ``"entries"`` — every antidiagonal entry a softmax term of its own query's
            row (per-token causality).

    Returns:
        ``[B, Hq, ceil(Tq/q_block), ceil(Tk/block)]`` float32: per query block the summed
        probabilities of its groups (``"sum"``: credited to the query block of the group's last
        query) or queries (``"entries"``) in each key block (a group straddling two key blocks is
        credited to the first).
    """
    if mode not in ("sum", "entries"):
        raise ValueError(f"mode must be 'sum' or 'entries', got {mode!r}")
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    n_qb, n = math.ceil(tq / q_block), math.ceil(tk / block)
    mass = torch.zeros(b, hq, n_qb, n, dtype=torch.float32, device=q.device)
    if tq == 0 or tk == 0:
        return mass
    s_ = max(1, min(stride, tq, tk))
    off = tk - tq
    dev = q.device
    k32 = as_float32(k)
    if key_padding_mask is not None:
        k32 = k32.masked_fill(~key_padding_mask[:, None, :, None], 0.0)
    if mode == "entries":
        return _antidiagonal_entries(q, k32, mass, s_, q_block, block, scale, causal, key_padding_mask)
    mq, mk = math.ceil(tq / s_), math.ceil(tk / s_)
    q32 = torch.nn.functional.pad(as_float32(q), (0, 0, 0, mq * s_ - tq))
    qr = q32.reshape(b, hq, mq, s_, d).flip(3).reshape(b, hq, mq, s_ * d)
    kr = torch.nn.functional.pad(k32, (0, 0, 0, mk * s_ - tk)).reshape(b, hk, mk, s_ * d)
    c = torch.arange(mk, device=dev)
    last_key = torch.clamp(c * s_ + s_, max=tk) - 1
    key_block = (c * s_) // block
    alive = None
    if key_padding_mask is not None:
        pad_mask = torch.nn.functional.pad(key_padding_mask, (0, mk * s_ - tk))
        alive = pad_mask.reshape(b, mk, s_).any(-1)  # [B, mk]: the group holds a real key
    per = max(1, CHUNK_ELEMENTS // max(1, b * hq * mk))
    for a0 in range(0, mq, per):
        a = torch.arange(a0, min(a0 + per, mq), device=dev)
        last_q = torch.clamp(a * s_ + s_, max=tq) - 1
        hi = min(int(torch.searchsorted(last_key, last_q[-1:] + off, right=True)), mk) if causal else mk
        if hi == 0:
            continue
        s = _grouped_scores(qr[:, :, a0:a0 + a.numel()], kr[:, :, :hi], scale / s_)
        if causal:
            s = s.masked_fill(last_key[None, :hi] > (last_q + off)[:, None], -math.inf)
        if alive is not None:
            s = s.masked_fill(~alive[:, None, None, :hi], -math.inf)
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # [B, Hq, m, hi]
        mass.index_add_(2, last_q // q_block, _groups_to_blocks(p, key_block[:hi], block, s_, n))
    return mass


def _antidiagonal_entries(q, k32, mass, s_: int, q_block: int, block: int, scale: float, causal: bool,
                          key_padding_mask) -> torch.Tensor:
    b, hq, tq, _ = q.shape
    tk = k32.shape[2]
    off = tk - tq
    dev = q.device
    n = mass.shape[-1]
    i = torch.arange(tq, device=dev)
    for r in range(s_):
        rows = i[i % s_ == s_ - 1 - r]  # these queries' antidiagonals cross keys of phase r
        keys = torch.arange(r, tk, s_, device=dev)
        if rows.numel() == 0 or keys.numel() == 0:
            continue
        k_r = k32[:, :, keys]
        kb = keys // block
        per = max(1, CHUNK_ELEMENTS // max(1, b * hq * keys.numel()))
        for a in range(0, rows.numel(), per):
            rr = rows[a:a + per]
            s = _grouped_scores(as_float32(q[:, :, rr]), k_r, scale)
            if causal:
                s = s.masked_fill(keys[None, :] > (rr + off)[:, None], -math.inf)
            if key_padding_mask is not None:
                s = s.masked_fill(~key_padding_mask[:, None, None, keys], -math.inf)
            p = torch.softmax(s, dim=-1).nan_to_num_(0.0)
            mass.index_add_(2, rr // q_block, _groups_to_blocks(p, kb, block, s_, n, first=r))
    return mass


def _groups_to_blocks(p: torch.Tensor, key_block: torch.Tensor, block: int, s_: int, n: int,
                      first: int = 0) -> torch.Tensor:
    """``p [..., g]`` over key groups (or sampled keys) ``first + s_·c`` summed per key block
    (``key_block [g]``) → ``[..., n]``: a reshape when ``s_`` divides ``block``, else a scatter."""
    if block % s_ == 0 and first < s_:
        out = p.new_zeros((*p.shape[:-1], n))
        per = block // s_
        nb = math.ceil(p.shape[-1] / per)
        out[..., :nb] = block_sums(p, per, nb)
        return out
    out = p.new_zeros((*p.shape[:-1], n))
    return out.index_add_(p.dim() - 1, key_block, p)
