"""Exact kernels over a selection of keys, each returning ``(out, lse)`` (float32).

* ``sdpa``  — torch's fused CPU flash kernel (dense / causal / padding), with its LSE.
* ``tiled`` — eager block-sparse online softmax: skips empty blocks, masks only partial ones.
* ``flex``  — compiled FlexAttention over a ``BlockMask`` built from the same block layout.
* ``native`` — small C kernels built on first use with the system compiler (``decode_blocks``:
  one query per head over whole key blocks read in place, for decoding); optional, callers keep
  a torch path where no compiler is found.
"""
