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
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

import longattn
from longattn.core.masks import Causal, Mask
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
    elif isinstance(mask, Causal) and qp == kp:  # a piece against itself under plain causality: the fused causal kernel
        out, stats = longattn.attention(q, k, v, causal=True, scale=scale, return_stats=True)
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
                   return_lse: bool = False, stats: dict | None = None) -> Tensor | tuple[Tensor, Tensor]:
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
        stats: a dict to fill with this rank's forward figures: ``compute_s`` and ``compute_cpu_s``
            (wall and thread CPU time in the pair kernels), ``wait_s`` (time blocked on transfers
            after computing: communication not hidden), ``bytes_sent``, ``bytes_received``,
            ``pairs`` (query–key pairs in the non-empty piece pairs computed), ``steps``.

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
    ring = _Ring(group, world, rank, layout_pieces, gmask, scale, timeout_s, stats)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out, lse = _RingFunction.apply(q, k, v, ring)
    else:
        out, lse = ring.forward(q, k, v)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


@dataclass
class _Ring:
    """One call's ring: the group, this rank, every rank's pieces, the global mask, the scale."""

    group: object
    world: int
    rank: int
    layout_pieces: list
    gmask: Mask | None
    scale: float
    timeout_s: float
    stats: dict | None = None

    def _add(self, key: str, value) -> None:
        if self.stats is not None:
            self.stats[key] = self.stats.get(key, 0) + value

    def neighbours(self) -> tuple[int, int]:
        """The global ranks to send to and receive from (P2POp takes global ranks)."""
        import torch.distributed as dist

        nxt, prv = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        if self.group is None:
            return nxt, prv
        return dist.get_global_rank(self.group, nxt), dist.get_global_rank(self.group, prv)

    def pass_along(self, tensors: list[Tensor], incoming_tokens: int, step: int):
        """Post sending ``tensors`` ([B, H, S, D] each) to the next rank and receiving the previous
        rank's (``incoming_tokens`` long); returns ``(works, received)``."""
        import torch.distributed as dist

        to_next, from_prev = self.neighbours()
        received = [t.new_empty(t.shape[:2] + (incoming_tokens, t.shape[3])) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), to_next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, from_prev, self.group) for r in received]
        self._add("bytes_sent", sum(t.numel() * t.element_size() for t in tensors))
        self._add("bytes_received", sum(r.numel() * r.element_size() for r in received))
        return dist.batch_isend_irecv(ops), received

    def wait(self, works, what: str) -> None:
        t0 = time.perf_counter()
        for work in works:
            _wait(work, self.timeout_s, what, self.rank)
        self._add("wait_s", time.perf_counter() - t0)

    def q_pieces(self, x: Tensor) -> list[tuple[Piece, Tensor]]:
        out, at = [], 0
        for p in self.layout_pieces[self.rank]:
            out.append((p, x[:, :, at:at + p.length]))
            at += p.length
        return out

    def kv_pieces(self, src: int) -> list[tuple[Piece, int]]:
        out, at = [], 0
        for p in self.layout_pieces[src]:
            out.append((p, at))
            at += p.length
        return out

    def tokens(self, rank: int) -> int:
        return sum(p.length for p in self.layout_pieces[rank])

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``(out float32, lse float32)`` of this rank's queries over the whole ring."""
        mine = self.q_pieces(q)
        partial: list[list[tuple[Tensor, Tensor]]] = [[] for _ in mine]
        k_cur, v_cur = k.contiguous(), v.contiguous()
        for step in range(self.world):
            src = (self.rank - step) % self.world
            works = None
            if step < self.world - 1:  # post the next transfer before computing on the current part
                works, (k_next, v_next) = self.pass_along([k_cur, v_cur], self.tokens((self.rank - step - 1) % self.world),
                                                          step)
            for kp, at in self.kv_pieces(src):
                ks, vs = k_cur[:, :, at:at + kp.length], v_cur[:, :, at:at + kp.length]
                for i, (qp, qs) in enumerate(mine):
                    if qp.length == 0 or kp.length == 0:
                        continue
                    kind = _pair_class(self.gmask, qp, kp)
                    if kind != "empty":
                        t0, c0 = time.perf_counter(), time.thread_time()
                        partial[i].append(_pair_attention(qs, ks, vs, self.gmask, qp, kp, kind, self.scale))
                        self._add("compute_s", time.perf_counter() - t0)
                        self._add("compute_cpu_s", time.thread_time() - c0)
                        self._add("pairs", qp.length * kp.length)
            self._add("steps", 1)
            if works is not None:
                self.wait(works, f"ring step {step + 1}/{self.world - 1}")
                k_cur, v_cur = k_next, v_next
        outs, lses = [], []
        for (qp, qs), parts in zip(mine, partial):
            if parts:
                o, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
            else:  # no key visible to any query of this piece
                o = torch.zeros(qs.shape, dtype=torch.float32, device=qs.device)
                lse = torch.full(qs.shape[:-1], float("-inf"), device=qs.device)
            outs.append(o.float())
            lses.append(lse.float())
        return torch.cat(outs, 2), torch.cat(lses, 2)

    def backward(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The backward ring: key/value parts travel as in the forward, each with the gradient
        accumulated for it so far; after the last step the gradients take one more hop home.
        Per pair, flash attention's backward with the forward's LSE (``P = exp(S − lse)``)."""
        hq, hk = q.shape[1], k.shape[1]
        g = hq // hk
        qf, dof = q.float(), dout.float()
        delta = (dof * out).sum(-1)                                         # [B, Hq, S]
        dq = torch.zeros_like(qf)
        k_cur, v_cur = k.float().contiguous(), v.float().contiguous()
        dk_cur, dv_cur = torch.zeros_like(k_cur), torch.zeros_like(v_cur)
        mine = self.q_pieces(qf)
        starts = [0]
        for p, _ in mine[:-1]:
            starts.append(starts[-1] + p.length)
        for step in range(self.world):
            src = (self.rank - step) % self.world
            for kp, at in self.kv_pieces(src):
                if kp.length == 0:
                    continue
                ks = k_cur[:, :, at:at + kp.length].repeat_interleave(g, 1)
                vs = v_cur[:, :, at:at + kp.length].repeat_interleave(g, 1)
                for (qp, qs), q0 in zip(mine, starts):
                    if qp.length == 0:
                        continue
                    kind = _pair_class(self.gmask, qp, kp)
                    if kind == "empty":
                        continue
                    rows = slice(q0, q0 + qp.length)
                    s = (qs @ ks.transpose(-1, -2)) * self.scale
                    p = torch.exp(s - lse[:, :, rows, None])
                    if kind == "partial":
                        seen = Shifted(self.gmask, qp.start, kp.start).dense(q.shape[0], hq, qp.length, kp.length,
                                                                             device=q.device)
                        p = p * seen
                    p = torch.nan_to_num(p, nan=0.0, posinf=0.0)                # rows with lse = -inf
                    do = dof[:, :, rows]
                    dp = do @ vs.transpose(-1, -2)
                    ds = p * (dp - delta[:, :, rows, None])
                    dq[:, :, rows] += (ds @ ks) * self.scale
                    dkp = (ds.transpose(-1, -2) @ qs) * self.scale               # [B, Hq, n, D]
                    dvp = p.transpose(-1, -2) @ do
                    dk_cur[:, :, at:at + kp.length] += dkp.view(dkp.shape[0], hk, g, *dkp.shape[2:]).sum(2)
                    dv_cur[:, :, at:at + kp.length] += dvp.view(dvp.shape[0], hk, g, *dvp.shape[2:]).sum(2)
            incoming = self.tokens((self.rank - step - 1) % self.world)
            if step < self.world - 1:
                works, (k_cur, v_cur, dk_cur, dv_cur) = self.pass_along([k_cur, v_cur, dk_cur, dv_cur], incoming, step)
                self.wait(works, f"backward ring step {step + 1}/{self.world - 1}")
            elif self.world > 1:  # the gradients of the part held now go home: one more hop
                works, (dk_cur, dv_cur) = self.pass_along([dk_cur, dv_cur], self.tokens(self.rank), step)
                self.wait(works, "backward ring, gradients home")
        return dq, dk_cur, dv_cur


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: _Ring):
        out, lse = ring.forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = ring
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        ctx.ring.stats = None  # the caller's stats are the forward's
        dq, dk, dv = ctx.ring.backward(q, k, v, out, lse, dout)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None
