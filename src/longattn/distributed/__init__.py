"""Context parallelism on torch.distributed: a sequence split across ranks, attended exactly.

* ``ring_attention`` — Ring Attention: key/value parts travel around the ring, partials merge by
  log-sum-exp (the merge every part of longattn uses); zigzag or contiguous layout.
* ``ulysses_attention`` — DeepSpeed-Ulysses: all-to-all from sequence parts to head groups, any
  longattn method (sparse ones included) on the whole sequence, all-to-all back.
* ``hybrid_attention`` — the two together on a 2-D grid (``make_grid``): Ulysses within a group,
  Ring Attention across groups.
* ``ShardedKVCache`` — a decode cache dealt page by page across ranks; each step attends over every
  rank's slice and merges by LSE in one collective.
* ``hf.context_parallel`` — a transformers model's attention layers through ring / Ulysses, each
  rank running the model on its tokens.
* ``layout`` — the helpers that split a full sequence into each rank's part and join it back.
"""

from longattn.distributed.kv import ShardedKVCache
from longattn.distributed.layout import LAYOUTS, Piece, pieces, positions, shard, unshard
from longattn.distributed.ring import Shifted, ring_attention
from longattn.distributed.ulysses import hybrid_attention, hybrid_shard, make_grid, ulysses_attention

__all__ = ["LAYOUTS", "Piece", "ShardedKVCache", "Shifted", "hybrid_attention", "hybrid_shard", "make_grid", "pieces", "positions",
           "ring_attention", "shard", "ulysses_attention", "unshard"]
