"""Ring Attention across two processes on one machine (gloo), checked against one process
(docs/distributed.md)."""
import os
import tempfile

import torch
import torch.distributed as dist

import longattn
from longattn.distributed import ring_attention, shard, unshard


def worker(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 1000, 64, generator=g)       # every rank draws the same full sequence …
    k = torch.randn(1, 2, 1000, 64, generator=g)
    v = torch.randn(1, 2, 1000, 64, generator=g)
    mine = [shard(t, rank, world, "zigzag") for t in (q, k, v)]   # … and keeps its zigzag part
    out = ring_attention(*mine, causal=True, layout="zigzag")
    parts = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(parts, out)
    if rank == 0:
        full = unshard(parts, "zigzag")
        err = (full - longattn.attention(q, k, v, causal=True)).abs().max().item()
        print(f"{world} ranks, {out.shape[2]} of 1000 tokens each: max abs error vs one process {err:.1e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(worker, args=(2, os.path.join(tmp, "store")), nprocs=2)
