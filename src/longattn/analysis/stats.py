"""Per-head attention statistics, computed from captured q/k a tile of queries at a time.

Each statistic is first a plain function of an attention matrix ``P [..., Tq, Tk]`` (rows sum to 1,
or to 0 for a query that sees no key) and returns one value per query row ``[..., Tq]``; the tests
check each against a hand-built pattern. :func:`head_statistics` then streams a layer's attention
through those functions in query tiles — the full ``Tq × Tk`` matrix of a head is never held, so an
8k-token analysis costs ``tile × Tk`` floats per head at a time — and averages them per head.

Sources:

* sink mass — the first token (Xiao et al. 2023, StreamingLLM) and other tokens that absorb a large
  share (Yu et al. 2024, "Unveiling and Harnessing Hidden Attention Sinks", ACT: a token is a sink
  when its attention averaged over every query row exceeds ``α / N``, ``N`` the number of keys —
  ``α`` times the share uniform attention would give it; causal rows that cannot see the token count
  as zero, as in the paper's averaged attention maps);
* entropy, mean attention distance, previous / same / next-token shares and special-token shares —
  Clark et al. 2019, "What Does BERT Look At? An Analysis of BERT's Attention".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor

#: ACT's sink threshold: a sink's attention averaged over the query rows exceeds ALPHA / (number of keys)
ACT_ALPHA = 5.0


# --------------------------------------------------------------------------------------------
# row statistics of an attention matrix


def first_token_mass(p: Tensor) -> Tensor:
    """Attention on key 0 (the first token, StreamingLLM's sink) per row: ``[..., Tq]``."""
    return p[..., 0]


def entropy(p: Tensor) -> Tensor:
    """Entropy of each row in nats, ``-Σ p log p`` with ``0 log 0 = 0``: ``[..., Tq]``. One-hot rows
    give 0; a row spread evenly over ``n`` keys gives ``log n``."""
    logp = torch.where(p > 0, p, torch.ones((), dtype=p.dtype, device=p.device)).log()
    return -(p * logp).sum(-1)


def attention_distance(p: Tensor, query_pos: Tensor) -> Tensor:
    """Mean distance ``Σ_j p_ij |pos_i − j|`` from each query to the keys it attends (Clark et al.'s
    locality), with queries at ``query_pos [Tq]`` and keys at ``0 … Tk−1``: ``[..., Tq]``."""
    keys = torch.arange(p.shape[-1], device=p.device, dtype=p.dtype)
    return (p * (query_pos.to(p.dtype)[:, None] - keys[None, :]).abs()).sum(-1)


def offset_share(p: Tensor, query_pos: Tensor, offset: int) -> Tensor:
    """Attention on the key at ``pos_i + offset`` (−1 previous, 0 same, +1 next token) per row;
    0 where that key does not exist: ``[..., Tq]``."""
    target = query_pos.to(torch.long) + int(offset)
    ok = (target >= 0) & (target < p.shape[-1])
    idx = target.clamp(0, p.shape[-1] - 1)
    picked = p.gather(-1, idx.view(*([1] * (p.dim() - 2)), -1, 1).expand(*p.shape[:-1], 1))[..., 0]
    return torch.where(ok, picked, torch.zeros((), dtype=p.dtype, device=p.device))


def token_share(p: Tensor, key_mask: Tensor) -> Tensor:
    """Attention on the keys where ``key_mask`` is True (a token class: [CLS], [SEP], punctuation,
    the needle …) per row. ``key_mask`` is ``[Tk]`` or broadcasts against ``p[..., 0, :]``
    (``[B, 1, Tk]`` for ``p [B, H, Tq, Tk]``): ``[..., Tq]``."""
    m = key_mask.to(p.dtype)
    return (p * m.unsqueeze(-2)).sum(-1)


def row_max(p: Tensor) -> Tensor:
    """The largest weight of each row (1 for one-hot attention): ``[..., Tq]``."""
    return p.amax(-1)


# --------------------------------------------------------------------------------------------
# streaming attention in query tiles


def visible_keys(n_queries: int, n_keys: int, causal: bool, device=None) -> Tensor:
    """bool ``[Tq, Tk]``: key ``j`` visible to query ``i`` (causal rows aligned at the end)."""
    if not causal:
        return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device)
    qpos = torch.arange(n_keys - n_queries, n_keys, device=device)
    return torch.arange(n_keys, device=device)[None, :] <= qpos[:, None]


def attention_tiles(q: Tensor, k: Tensor, *, scale: float, causal: bool, key_padding_mask: Tensor | None = None,
                    tile: int = 256) -> Iterator[tuple[int, Tensor, Tensor]]:
    """The attention probabilities of ``q [B, Hq, Tq, D]`` over ``k [B, Hkv, Tk, D]`` (GQA:
    ``Hq % Hkv == 0``), ``tile`` query rows at a time, in float32.

    Yields ``(first_row, P [B, Hq, t, Tk], seen [B, 1, t, Tk])``: ``seen`` marks the keys each row
    may attend (causality and padding); rows that see no key are all zero (never NaN)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ValueError(f"q must be [B, Hq, Tq, D] and k [B, Hkv, Tk, D] with the same B and D, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    hq, hk = q.shape[1], k.shape[1]
    if hq % hk:
        raise ValueError(f"k has {hk} heads but q has {hq}: heads_q must be a multiple of heads_kv")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    for name, t in (("q", q), ("k", k)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds non-finite values (NaN or inf): attention statistics of such a layer "
                             "would be NaN; check the model's activations")
    kf = k.float().repeat_interleave(hq // hk, dim=1) if hq != hk else k.float()
    tq, tk = q.shape[2], k.shape[2]
    vis = visible_keys(tq, tk, causal, q.device)
    pad = None if key_padding_mask is None else key_padding_mask.to(torch.bool)[:, None, None, :]
    for i0 in range(0, tq, tile):
        qs = q[:, :, i0:i0 + tile].float()
        s = torch.matmul(qs, kf.transpose(-1, -2)) * scale
        seen = vis[None, None, i0:i0 + qs.shape[2]].expand(q.shape[0], 1, -1, -1)
        if pad is not None:
            seen = seen & pad
        s = s.masked_fill(~seen, float("-inf"))
        any_seen = seen.any(-1, keepdim=True)
        s = torch.where(any_seen, s, torch.zeros((), dtype=s.dtype, device=s.device))
        p = torch.softmax(s, -1) * any_seen
        yield i0, p, seen


@dataclass
class HeadStats:
    """Per-head means over every query row that sees at least one key (``[Hq]`` float tensors),
    for one layer of one input.

    Attributes:
        first_token: attention on the first token.
        sinks: attention on the other sink tokens (ACT's rule, ``sink_positions``).
        entropy: nats. distance: mean attention distance in tokens.
        previous, same, next: attention on the adjacent / own token.
        peak: the mean of each row's largest weight.
        shares: ``{class name: [Hq]}`` attention on each token class given to ``head_statistics``.
        sink_positions: per head, the key positions (≥ 1) ACT's rule flags.
        rows: the query rows averaged.
    """

    first_token: Tensor
    sinks: Tensor
    entropy: Tensor
    distance: Tensor
    previous: Tensor
    same: Tensor
    next: Tensor
    peak: Tensor
    shares: dict[str, Tensor] = field(default_factory=dict)
    sink_positions: list[list[int]] = field(default_factory=list)
    rows: int = 0

    def as_dict(self) -> dict:
        """Plain lists, for JSON."""
        out = {name: getattr(self, name).tolist() for name in
               ("first_token", "sinks", "entropy", "distance", "previous", "same", "next", "peak")}
        out["shares"] = {k: v.tolist() for k, v in self.shares.items()}
        out["sink_positions"] = self.sink_positions
        out["rows"] = self.rows
        return out


def sink_tokens(received: Tensor, rows: Tensor, key_padding_mask: Tensor | None, alpha: float = ACT_ALPHA) -> Tensor:
    """ACT's sinks: bool ``[B, H, Tk]``, key ``j ≥ 1`` whose attention ``received [B, H, Tk]``
    (summed over ``rows [B, 1, 1]`` query rows) averages more than ``alpha / N`` per row, ``N`` the
    real keys of that input. The first token is never flagged (it is the sink everyone keeps)."""
    n_keys = (torch.full_like(rows, received.shape[-1]) if key_padding_mask is None
              else key_padding_mask.to(torch.float32).sum(-1)[:, None, None].to(rows.device))
    flagged = received > alpha * rows.clamp_min(1) / n_keys.clamp_min(1)
    flagged[..., 0] = False
    return flagged


def head_statistics(q: Tensor, k: Tensor, *, scale: float, causal: bool, key_padding_mask: Tensor | None = None,
                    query_padding_mask: Tensor | None = None, classes: dict[str, Tensor] | None = None,
                    alpha: float = ACT_ALPHA, tile: int = 256) -> HeadStats:
    """The statistics of :class:`HeadStats` for one layer, streamed in query tiles.

    Args:
        q: ``[B, Hq, Tq, D]``; k: ``[B, Hkv, Tk, D]`` (after RoPE, as the layer uses them).
        scale: the layer's score scale. causal: causal rows, aligned at the last key.
        key_padding_mask: ``[B, Tk]`` bool, True = real key.
        query_padding_mask: ``[B, Tq]`` bool, True = a real query (padding queries are not averaged).
        classes: ``{name: bool [B, Tk]}`` token classes whose attention share to report.
        alpha: ACT's sink threshold: key ``j ≥ 1`` is a sink of a head (in one input) when its
            attention averaged over the query rows exceeds ``alpha / N`` (``N`` real keys).
        tile: query rows per tile.
    """
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    qpos = torch.arange(tk - tq, tk, device=q.device) if causal else torch.arange(tq, device=q.device)
    sums: dict[str, Tensor] = {}
    shares: dict[str, Tensor] = {}
    col = torch.zeros(b, hq, tk, dtype=torch.float32, device=q.device)       # attention received
    rows_of = torch.zeros(b, 1, 1, dtype=torch.float32, device=q.device)     # real rows per input
    rows = torch.zeros((), dtype=torch.float32)
    for i0, p, seen in attention_tiles(q, k, scale=scale, causal=causal, key_padding_mask=key_padding_mask, tile=tile):
        t = p.shape[2]
        pos = qpos[i0:i0 + t]
        real = seen.any(-1)                                       # [B, 1, t]
        if query_padding_mask is not None:
            real = real & query_padding_mask.to(torch.bool)[:, None, i0:i0 + t]
        w = real.to(torch.float32)
        values = {"first_token": first_token_mass(p), "entropy": entropy(p), "distance": attention_distance(p, pos),
                  "previous": offset_share(p, pos, -1), "same": offset_share(p, pos, 0),
                  "next": offset_share(p, pos, 1), "peak": row_max(p)}
        for name, val in values.items():
            sums[name] = sums.get(name, 0) + (val * w).sum((0, 2))
        for name, mask in (classes or {}).items():
            shares[name] = shares.get(name, 0) + (token_share(p, mask.to(q.device)[:, None, :]) * w).sum((0, 2))
        col += (p * w[..., None]).sum(2)
        rows_of += w.sum(-1, keepdim=True)
        rows += w.sum()
    n = rows.clamp_min(1.0)
    mean = {name: (s / n) if isinstance(s, Tensor) else torch.zeros(hq) for name, s in sums.items()}
    flagged = sink_tokens(col, rows_of, key_padding_mask, alpha)
    sink_mass = (col * flagged).sum((0, 2)) / n
    positions = [sorted({int(j) for j in flagged[:, h].nonzero()[:, 1].tolist()}) for h in range(hq)]
    return HeadStats(first_token=mean["first_token"], sinks=sink_mass, entropy=mean["entropy"],
                     distance=mean["distance"], previous=mean["previous"], same=mean["same"], next=mean["next"],
                     peak=mean["peak"], shares={name: s / n for name, s in shares.items()},
                     sink_positions=positions, rows=int(rows))


def head_average(q: Tensor, k: Tensor, *, scale: float, causal: bool, key_padding_mask: Tensor | None = None,
                 tile: int = 256) -> Tensor:
    """The layer's attention averaged over its heads, ``[B, Tq, Tk]`` float32 (the input of rollout
    and flow; one layer at a time)."""
    b, _, tq, _ = q.shape
    out = torch.zeros(b, tq, k.shape[2], dtype=torch.float32, device=q.device)
    for i0, p, _ in attention_tiles(q, k, scale=scale, causal=causal, key_padding_mask=key_padding_mask, tile=tile):
        out[:, i0:i0 + p.shape[2]] = p.mean(1)
    return out
