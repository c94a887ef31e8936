"""DeepSpeed-Ulysses sequence parallelism (Jacobs et al. 2023, "DeepSpeed Ulysses: System
Optimizations for Enabling Training of Extreme Long Sequence Transformer Models").

Each rank holds a part of the sequence for every head. One all-to-all turns that into every token
for ``1/W`` of the heads; each rank then runs *any* longattn method on the whole sequence of its
heads — sparse and content-based ones included, since every key is local — and a second all-to-all
returns each rank its own tokens for every head. Heads (query and key/value) must divide by the
group size.

Collectives per call: the shape check (one ``all_gather``), one ``all_to_all`` of q, k and v
packed together, one ``all_to_all`` of the outputs with their log-sum-exp. gloo needs equal-sized
pieces, so parts are padded to the longest rank's token count and trimmed on arrival.
"""

from __future__ import annotations

import torch

import longattn
from longattn.distributed.layout import check_layout, pieces
from longattn.distributed.ring import _handshake, _wait

Tensor = torch.Tensor


def _exchange(send: list[Tensor], group, timeout_s: float, what: str, rank: int) -> list[Tensor]:
    import torch.distributed as dist

    recv = [torch.empty_like(send[0]) for _ in send]
    _wait(dist.all_to_all(recv, [t.contiguous() for t in send], group=group, async_op=True), timeout_s, what, rank)
    return recv


class _AllToAll(torch.autograd.Function):
    """``all_to_all`` with its backward: the gradient of what came from rank ``j`` goes back to ``j``
    (another all-to-all). torch.distributed.nn's version scatters by global rank on gloo and fails
    in subgroups (the hybrid's grid)."""

    @staticmethod
    def forward(ctx, group, timeout_s, what, rank, *send):
        ctx.args = (group, timeout_s, what, rank)
        ctx.like = send[0]
        return tuple(_exchange(list(send), group, timeout_s, what, rank))

    @staticmethod
    def backward(ctx, *grads):
        group, timeout_s, what, rank = ctx.args
        back = _exchange([g if g is not None else torch.zeros_like(ctx.like) for g in grads], group, timeout_s,
                         f"{what} (backward)", rank)
        return (None, None, None, None, *back)


def _all_to_all(send: list[Tensor], group, timeout_s: float, what: str, rank: int) -> list[Tensor]:
    """``all_to_all`` of equal-shaped tensors with ``timeout_s`` on every wait; differentiable."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in send):
        return list(_AllToAll.apply(group, timeout_s, what, rank, *send))
    return _exchange(send, group, timeout_s, what, rank)


def _pad_tokens(x: Tensor, length: int) -> Tensor:
    if x.shape[2] == length:
        return x.contiguous()
    return torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[2])).contiguous()


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, causal: bool = False, method="dense",
                      scale: float | None = None, layout: str = "contiguous", timeout_s: float = 60.0,
                      return_lse: bool = False, inner=None, **config) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of a sequence split across ``group``, computed head-parallel (Ulysses).

    Args:
        q: ``[B, Hq, S_r, D]`` this rank's tokens (``layout.shard``); k, v: ``[B, Hkv, S_r, D]``.
            ``Hq`` and ``Hkv`` must be multiples of the group size.
        method: any longattn softmax method (name or object; ``**config`` its parameters when a
            name), run on the whole sequence of each rank's heads.
        causal, scale, layout, timeout_s, return_lse: as for ``ring_attention``.
        inner: ``(q, k, v) -> (out, lse)`` run on the gathered head groups instead of ``method``
            (the hybrid passes ring attention over the other axis of its grid).

    Returns:
        this rank's output ``[B, Hq, S_r, D]`` in q's dtype, and its float32 LSE when
        ``return_lse`` (the method's; None-free: methods without one are refused when asked).
    """
    import torch.distributed as dist

    check_layout(layout)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("Ulysses attention needs an initialised torch.distributed process group")
    m = longattn.method(method, **config) if isinstance(method, str) else method
    if config and not isinstance(method, str):
        raise TypeError(f"config {sorted(config)} given together with a method object")
    if not m.capabilities.softmax:
        raise ValueError(f"method {m.name!r} is not softmax attention; Ulysses merges nothing, but its outputs "
                         "must be attention over each head's whole sequence")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = _handshake(q, k, v, causal, layout, group, timeout_s)
    hq, hk = q.shape[1], k.shape[1]
    if hq % world or hk % world:
        raise ValueError(f"Ulysses splits heads across the {world} ranks: query heads ({hq}) and key/value heads "
                         f"({hk}) must both be multiples of {world}; use ring attention, or a group of fewer ranks")
    counts = [r[3] for r in rows]
    total, longest = sum(counts), max(counts)
    layout_pieces = pieces(total, world, layout)
    if q.shape[2] != counts[rank] or counts[rank] != sum(p.length for p in layout_pieces[rank]):
        raise ValueError(f"rank {rank} holds {q.shape[2]} tokens, but the {layout} layout of {total} tokens over "
                         f"{world} ranks gives it {sum(p.length for p in layout_pieces[rank])}")
    gq, gk = hq // world, hk // world
    # 1. sequence parts → head groups: q, k and v of head group j go to rank j in one tensor
    packed = torch.cat([q, k, v], 1)
    send = [_pad_tokens(torch.cat([packed[:, j * gq:(j + 1) * gq], packed[:, hq + j * gk:hq + (j + 1) * gk],
                                   packed[:, hq + hk + j * gk:hq + hk + (j + 1) * gk]], 1), longest)
            for j in range(world)]
    recv = _all_to_all(send, group, timeout_s, "the all-to-all to head groups", rank)
    # every token of my head group, in global order (rank i's part holds its layout pieces)
    chunks = []
    for i, part in enumerate(recv):
        at = 0
        for p in layout_pieces[i]:
            chunks.append((p.start, part[:, :, at:at + p.length]))
            at += p.length
    full = torch.cat([c for _, c in sorted(chunks, key=lambda sc: sc[0])], 2)
    qf, kf, vf = full[:, :gq], full[:, gq:gq + gk], full[:, gq + gk:]
    if inner is not None:  # the hybrid: these tokens are one part of a longer sequence (ring over it)
        out, lse = inner(qf, kf, vf)
    else:
        out, stats = longattn.attention(qf, kf, vf, causal=causal, method=m, scale=scale, return_stats=True)
        if return_lse and stats.lse is None:
            raise ValueError(f"method {m.name!r} ran on path {stats.path!r}, which gives no log-sum-exp; call "
                             "without return_lse")
        lse = stats.lse if stats.lse is not None else torch.zeros(out.shape[:-1])
    lse = lse.float()
    # 2. head groups → sequence parts: rank i gets its tokens of my head group, with the LSE
    both = torch.cat([out.float(), lse[..., None]], -1)                    # [B, gq, T, D + 1]
    back = []
    for i in range(world):
        idx = torch.cat([torch.arange(p.start, p.start + p.length) for p in layout_pieces[i]])
        back.append(_pad_tokens(both.index_select(2, idx.to(both.device)), longest))
    home = _all_to_all(back, group, timeout_s, "the all-to-all back to tokens", rank)
    mine = torch.cat([h[:, :, :counts[rank]] for h in home], 1)             # [B, Hq, S_r, D + 1]
    result = mine[..., :-1].to(q.dtype)
    return (result, mine[..., -1]) if return_lse else result


def make_grid(ulysses: int, ring: int, *, timeout_s: float = 60.0):
    """The 2-D process grid of the hybrid (USP: Fang & Zhao 2024): the world's ranks as
    ``ring × ulysses``, rank ``= ring_index · ulysses + ulysses_index``. Returns
    ``(ulysses_group, ring_group)`` for this rank. Every rank must call it (``new_group`` is
    collective)."""
    from datetime import timedelta

    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if ulysses < 1 or ring < 1 or ulysses * ring != world:
        raise ValueError(f"ulysses × ring must equal the world size {world}, got {ulysses} × {ring}")
    mine_u = mine_r = None
    for r in range(ring):  # every rank creates every group, in the same order
        g = dist.new_group([r * ulysses + u for u in range(ulysses)], timeout=timedelta(seconds=timeout_s))
        if rank // ulysses == r:
            mine_u = g
    for u in range(ulysses):
        g = dist.new_group([r * ulysses + u for r in range(ring)], timeout=timedelta(seconds=timeout_s))
        if rank % ulysses == u:
            mine_r = g
    return mine_u, mine_r


def hybrid_shard(x: Tensor, rank: int, ulysses: int, ring: int, layout: str = "zigzag", dim: int = 2) -> Tensor:
    """Rank ``rank``'s tokens under the hybrid: the sequence split over the ring axis by ``layout``,
    each ring part split contiguously over the Ulysses axis."""
    from longattn.distributed.layout import shard

    part = shard(x, rank // ulysses, ring, layout, dim)
    return shard(part, rank % ulysses, ulysses, "contiguous", dim)


def hybrid_attention(q: Tensor, k: Tensor, v: Tensor, *, ulysses_group, ring_group, causal: bool = False,
                     method="dense", scale: float | None = None, layout: str = "zigzag", timeout_s: float = 60.0,
                     return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Ulysses inside, Ring Attention across (USP's hybrid): an all-to-all within ``ulysses_group``
    gathers each ring part's tokens for ``1/U`` of the heads, ring attention over ``ring_group`` runs
    them against every other ring part, and an all-to-all returns each rank its tokens.

    q/k/v are this rank's tokens from :func:`hybrid_shard`; ``method`` must be an exact positional
    one (ring attention's condition). Heads must divide by the Ulysses degree."""
    from longattn.distributed.ring import ring_attention

    def across(qf, kf, vf):
        return ring_attention(qf, kf, vf, group=ring_group, causal=causal, method=method, scale=scale,
                              layout=layout, timeout_s=timeout_s, return_lse=True)

    return ulysses_attention(q, k, v, group=ulysses_group, causal=causal, method=method, scale=scale,
                             layout="contiguous", timeout_s=timeout_s, return_lse=return_lse, inner=across)
