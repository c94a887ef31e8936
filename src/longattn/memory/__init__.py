"""The KV memory: what a layer keeps of its keys and values, where it keeps them, and how a query
finds them again (the ``memory`` layer).

* ``policies`` — eviction policies (StreamingLLM, H2O, TOVA, SnapKV, full).
* ``evicting`` — ``EvictingMemory``: bounded per-head-group storage under those policies
  (DuoAttention/RazorAttention head maps are two groups).
* ``paged`` — ``PagedMemory``: every token kept in pages with live summaries, across device, host
  and disk tiers, with per-head block retrieval (Quest/InfLLM, LongHeads).
* ``landmark`` — ``LandmarkMemory``: Landmark Attention's memory for a model trained with landmark
  tokens; only landmark keys and the open block stay hot, blocks are fetched by landmark retrieval.
* ``tiers`` — the disk tier (memory-mapped safetensors segments).
* ``rotation`` — moving RoPE keys to positions within the kept layout.
* ``kernel`` — exact attention of a chunk over a layout.
* ``store`` — save / load with a checksum.
* ``ann`` — optional approximate-nearest-neighbour key index (faiss / hnswlib, lazy).
* ``calibrate`` — head scoring for DuoAttention/RazorAttention head maps.

transformers models use these through ``longattn.hf.LongattnCache``.
"""

from longattn.memory.evicting import EvictingMemory
from longattn.memory.landmark import LandmarkMemory, landmark_memories
from longattn.memory.paged import PagedMemory
from longattn.memory.policies import H2O, TOVA, EvictionPolicy, FullKV, SnapKV, StreamingLLM, make_policy
from longattn.memory.rotation import KeyRotation

__all__ = ["EvictingMemory", "EvictionPolicy", "FullKV", "H2O", "KeyRotation", "LandmarkMemory", "PagedMemory", "SnapKV",
           "StreamingLLM", "TOVA", "landmark_memories", "make_policy"]
