"""Ring Attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers for Near-Infinite
Context") on torch.distributed.

Each rank of a process group holds a part of the sequence (``longattn.distributed.layout``): its
queries and the keys / values of the same tokens. The key/value parts travel around the ring —
rank ``r`` sends what it holds to ``r + 1`` and receives from ``r − 1``, ``W − 1`` times, with the
next transfer posted (``batch_isend_irecv``) before the current part is computed, so communication
overlaps compute. Each step runs longattn's exact kernel on (local query piece, visiting key
piece) with the method's mask shifted to the pieces' global positions, skipping pairs the mask
leaves empty; the partial outputs merge by log-sum-exp in float32 (``longattn.merge_partials``),
the same merge every other piece of longattn uses.

Collectives per call: one ``all_gather`` of each rank's shapes (a check that every rank called
with matching inputs; it also gives the total length), then ``W − 1`` rounds of one send and one
receive of ``(k, v)``. Every wait has a timeout: a rank that fails makes the others raise within it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta

import torch

import longattn
from longattn.core.masks import Mask
from longattn.core.merge import merge_partials
from longattn.distributed.layout import Piece, check_layout, pieces

Tensor = torch.Tensor

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class Shifted(Mask):
    """``base`` (a mask over the whole sequence's global positions) seen from a pair of pieces: local
    query ``i`` is global ``q_start + i``, local key ``j`` is global ``k_start + j``."""

    base: Mask
    q_start: int
    k_start: int
    align: int = 0  # the kernel's alignment (tokens_k − tokens_q), set by for_sizes

    def for_sizes(self, tokens_q: int, tokens_k: int) -> "Shifted":
        return dataclasses.replace(self, align=tokens_k - tokens_q)

    def _q(self, q):
        return q - self.align + self.q_start

    def mask_mod(self, b, h, q_pos, k_pos):
        return self.base.mask_mod(b, h, self._q(q_pos), k_pos + self.k_start)

    def block_any(self, qlo, qhi, klo, khi):
        return self.base.block_any(self._q(qlo), self._q(qhi), klo + self.k_start, khi + self.k_start)

    def block_all(self, qlo, qhi, klo, khi):
        return self.base.block_all(self._q(qlo), self._q(qhi), klo + self.k_start, khi + self.k_start)


def _pair_class(mask: Mask | None, qp: Piece, kp: Piece) -> str:
    """"empty", "full" or "partial": how much of the pair (query piece × key piece) ``mask`` shows."""
    if mask is None:
        return "full"
    lo = torch.tensor([[qp.start]])
    hi = torch.tensor([[qp.start + qp.length - 1]])
    klo = torch.tensor([[kp.start]])
    khi = torch.tensor([[kp.start + kp.length - 1]])
    if not bool(mask.block_any(lo, hi, klo, khi).any()):
        return "empty"
    return "full" if bool(mask.block_all(lo, hi, klo, khi).all()) else "partial"


def _pair_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask | None, qp: Piece, kp: Piece, kind: str,
                    scale: float) -> tuple[Tensor, Tensor]:
    """Exact attention of a query piece over a key piece: ``(out float32, lse float32)``."""
    if kind == "full":
        out, stats = longattn.attention(q, k, v, scale=scale, return_stats=True)
    else:
        m = longattn.method("pattern", mask=Shifted(mask, qp.start, kp.start), backend="tiled")
        out, stats = longattn.attention(q, k, v, scale=scale, method=m, return_stats=True)
    if stats.lse is None:
        raise RuntimeError(f"the kernel ran path {stats.path!r}, which gives no log-sum-exp; ring attention "
                           "cannot merge it")
    return out.float(), stats.lse.float()


def _wait(work, timeout_s: float, what: str, rank: int) -> None:
    try:
        ok = work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as exc:  # gloo raises on a peer that went away or on the timeout
        raise RuntimeError(f"ring attention on rank {rank}: {what} failed or timed out after {timeout_s} s "
                           f"(a peer rank failed or left): {exc}") from exc
    if ok is False:
        raise RuntimeError(f"ring attention on rank {rank}: {what} timed out after {timeout_s} s")


def _handshake(q: Tensor, k: Tensor, v: Tensor, causal: bool, layout: str, group, timeout_s: float) -> list[list[int]]:
    """All-gather every rank's ``[B, Hq, Hkv, S, D, dtype, causal, layout]`` and check they agree."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"rank {rank}: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                         "[B, Hq, S, D] and [B, Hkv, S, D] for the same S tokens of this rank")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"rank {rank}: q, k and v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    mine = torch.tensor([q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3], _DTYPES.index(q.dtype),
                         int(causal), ("contiguous", "zigzag").index(layout)], dtype=torch.int64)
    got = [torch.empty_like(mine) for _ in range(world)]
    _wait(dist.all_gather(got, mine, group=group, async_op=True), timeout_s, "the shape check (all_gather)", rank)
    rows = [g.tolist() for g in got]
    names = ("batch", "query heads", "key/value heads", "tokens", "head_dim", "dtype", "causal", "layout")
    for col in (0, 1, 2, 4, 5, 6, 7):
        values = [r[col] for r in rows]
        if len(set(values)) > 1:
            shown = [(_DTYPES[x] if col == 5 else x) for x in values]
            raise ValueError(f"ring attention: ranks disagree on {names[col]}: {shown} (rank {rank} sees this on "
                             "every rank)")
    return rows


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, causal: bool = False, method="dense",
                   scale: float | None = None, layout: str = "zigzag", timeout_s: float = 60.0,
                   return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention of a sequence split across the ranks of ``group`` (Ring Attention).

    Args:
        q: ``[B, Hq, S_r, D]``, this rank's queries in ``layout`` (``layout.shard`` of the full
            sequence); k, v: ``[B, Hkv, S_r, D]`` for the same tokens (GQA: ``Hq % Hkv == 0``).
        group: the process group (default: the world).
        causal: causal self-attention over the whole sequence.
        method: an exact masked method (name or object) whose mask depends on positions only:
            ``dense``, ``window``, ``streaming``, ``head_windows``, ``pattern`` (document, prefix-LM,
            block maps …). Its mask is taken over the whole sequence and shifted to each pair.
        scale: score scale (default ``1/√D``).
        layout: ``"zigzag"`` (balanced causal work) or ``"contiguous"``.
        timeout_s: limit for every wait; a rank that fails makes the others raise within it.
        return_lse: also return the float32 log-sum-exp ``[B, Hq, S_r]``.

    Returns:
        this rank's output ``[B, Hq, S_r, D]`` in q's dtype (partials merged in float32), and its
        LSE when ``return_lse`` (``-inf`` for a row that sees no key; its output is 0).
    """
    import torch.distributed as dist

    check_layout(layout)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring attention needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    m = longattn.method(method) if isinstance(method, str) else method
    caps = m.capabilities
    if not caps.exact or not caps.softmax or caps.own_positions:
        raise ValueError(f"ring attention runs exact masked methods (dense, window, streaming, head_windows, "
                         f"pattern); {m.name!r} is not one (a content-based selection would need every key at once)")
    if causal and not caps.causal or not causal and not caps.non_causal:
        raise ValueError(f"method {m.name!r} does not support causal={causal}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = _handshake(q, k, v, causal, layout, group, timeout_s)
    total = sum(r[3] for r in rows)
    layout_pieces = pieces(total, world, layout)
    if q.shape[2] != sum(p.length for p in layout_pieces[rank]):
        raise ValueError(f"rank {rank} holds {q.shape[2]} tokens, but the {layout} layout of {total} tokens over "
                         f"{world} ranks gives it {sum(p.length for p in layout_pieces[rank])}")
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    gmask = m.visible_mask(total, total, causal)
    if gmask is not None:
        gmask = gmask.for_sizes(total, total)
    mine = layout_pieces[rank]
    q_parts, at = [], 0
    for p in mine:
        q_parts.append(q[:, :, at:at + p.length])
        at += p.length
    partial: list[list[tuple[Tensor, Tensor]]] = [[] for _ in mine]
    k_cur, v_cur = k.contiguous(), v.contiguous()
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    # P2POp takes global ranks: map the ring neighbours out of a subgroup
    to_next = nxt if group is None else dist.get_global_rank(group, nxt)
    from_prev = prv if group is None else dist.get_global_rank(group, prv)
    for step in range(world):
        src = (rank - step) % world
        pending = None
        if step < world - 1:  # post the next transfer before computing on the current part
            incoming = (rank - step - 1) % world
            n_in = sum(p.length for p in layout_pieces[incoming])
            k_next = k_cur.new_empty(k_cur.shape[:2] + (n_in, k_cur.shape[3]))
            v_next = v_cur.new_empty(k_next.shape)
            ops = [dist.P2POp(dist.isend, k_cur, to_next, group), dist.P2POp(dist.isend, v_cur, to_next, group),
                   dist.P2POp(dist.irecv, k_next, from_prev, group), dist.P2POp(dist.irecv, v_next, from_prev, group)]
            pending = dist.batch_isend_irecv(ops)
        at = 0
        for kp in layout_pieces[src]:
            ks, vs = k_cur[:, :, at:at + kp.length], v_cur[:, :, at:at + kp.length]
            at += kp.length
            for i, (qp, qs) in enumerate(zip(mine, q_parts)):
                if qp.length == 0 or kp.length == 0:
                    continue
                kind = _pair_class(gmask, qp, kp)
                if kind != "empty":
                    partial[i].append(_pair_attention(qs, ks, vs, gmask, qp, kp, kind, scale))
        if pending is not None:
            for work in pending:
                _wait(work, timeout_s, f"ring step {step + 1}/{world - 1} (send to {nxt}, receive from {prv})", rank)
            k_cur, v_cur = k_next, v_next
    outs, lses = [], []
    for qp, qs, parts in zip(mine, q_parts, partial):
        if parts:
            o, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
        else:  # no key visible to any query of this piece
            o = torch.zeros(qs.shape, dtype=torch.float32, device=qs.device)
            lse = torch.full(qs.shape[:-1], float("-inf"), device=qs.device)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs, 2).to(q.dtype)
    lse = torch.cat(lses, 2)
    return (out, lse) if return_lse else out
