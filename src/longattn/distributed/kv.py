"""A KV cache sharded across ranks, for decoding over a context no single machine holds.

The cache is cut into pages of ``page`` tokens dealt round-robin: page ``p`` lives on rank
``p mod W``, so every rank holds about ``1/W`` of the keys and values (and their memory). A decode
step gives the new query to every rank; each attends over its own slice — exactly (``dense``) or
through a block-retrieval method (``quest``, ``landmark`` …) over its own pages — and the partial
outputs merge by log-sum-exp: one ``all_gather`` of ``(out, lse)``, after which every rank holds
the step's output. Merging partials over disjoint key sets is exact, so with ``dense`` the result
equals attention over the whole cache in one process.
"""

from __future__ import annotations

import torch

import longattn
from longattn.core.merge import merge_partials
from longattn.distributed.ring import _wait

Tensor = torch.Tensor


class ShardedKVCache:
    """This rank's slice of a KV cache spread over ``group``.

    Args:
        group: the process group (default: the world).
        page: tokens per page (the unit dealt to ranks).
        timeout_s: limit for every collective.

    Every rank calls :meth:`append` with the same new keys and values (each keeps the pages that are
    its own) and :meth:`attend` with the same query.
    """

    def __init__(self, group=None, *, page: int = 64, timeout_s: float = 60.0):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedKVCache needs an initialised torch.distributed process group")
        if isinstance(page, bool) or not isinstance(page, int) or page < 1:
            raise ValueError(f"page must be a positive int, got {page!r}")
        self.group, self.page, self.timeout_s = group, page, timeout_s
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.seen = 0

    @property
    def local_tokens(self) -> int:
        return 0 if self.k is None else int(self.k.shape[2])

    def append(self, k: Tensor, v: Tensor) -> None:
        """Add ``k, v [B, Hkv, n, D]`` (the next ``n`` tokens of the sequence, after RoPE); this rank
        keeps those that fall on its pages."""
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(f"k and v must be [B, Hkv, n, D] of one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if self.k is not None and (k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3]
                                   or k.dtype != self.k.dtype):
            raise ValueError(f"new keys {tuple(k.shape)} {k.dtype} do not match the cache's "
                             f"{tuple(self.k.shape)} {self.k.dtype}")
        pos = torch.arange(self.seen, self.seen + k.shape[2])
        own = ((pos // self.page) % self.world) == self.rank
        idx = own.nonzero()[:, 0].to(k.device)
        kk, vv = k.index_select(2, idx), v.index_select(2, idx)
        self.k = kk if self.k is None else torch.cat([self.k, kk], 2)
        self.v = vv if self.v is None else torch.cat([self.v, vv], 2)
        self.seen += k.shape[2]

    def attend(self, q: Tensor, *, method="dense", scale: float | None = None, **config) -> Tensor:
        """Attention of ``q [B, Hq, m, D]`` (the newest queries, after every cached key) over the
        whole sharded cache: each rank over its slice with ``method``, merged by LSE in one
        ``all_gather``. Returns ``[B, Hq, m, D]`` on every rank, in q's dtype."""
        import torch.distributed as dist

        if self.k is None and self.seen == 0:
            raise ValueError("the cache is empty: append keys and values first")
        m = longattn.method(method, **config) if isinstance(method, str) else method
        b, hq, mq, d = q.shape
        if self.local_tokens:
            out, stats = longattn.attention(q, self.k, self.v, causal=False, method=m, scale=scale, return_stats=True)
            if stats.lse is None:
                raise ValueError(f"method {m.name!r} ran on path {stats.path!r}, which gives no log-sum-exp to merge")
            lse = stats.lse.float()
        else:  # a rank without pages yet contributes nothing
            out = torch.zeros(b, hq, mq, d, device=q.device)
            lse = torch.full((b, hq, mq), float("-inf"), device=q.device)
        mine = torch.cat([out.float(), lse[..., None]], -1).contiguous()
        got = [torch.empty_like(mine) for _ in range(self.world)]
        _wait(dist.all_gather(got, mine, group=self.group, async_op=True), self.timeout_s,
              "the decode merge (all_gather)", self.rank)
        merged, _ = merge_partials([g[..., :-1] for g in got], [g[..., -1] for g in got])
        return merged.to(q.dtype)
