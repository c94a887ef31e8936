"""Kernels: exact attention over a selection of keys, each returning ``(out, lse)`` (float32),
and the native forward of chunked linear attention.

* ``sdpa``  — torch's fused flash kernels, CPU and CUDA (dense / causal / padding), with their LSE.
* ``tiled`` — eager block-sparse online softmax: skips empty blocks, masks only partial ones.
* ``flex``  — compiled FlexAttention over a ``BlockMask`` built from the same block layout.
* ``native`` — small C kernels built on first use with the system compiler (``decode_blocks``:
  one query per head over whole key blocks read in place, for decoding); optional, callers keep
  a torch path where no compiler is found.
* ``native_prefill`` — the block-sparse prefill kernel (``csrc/sparse_prefill.c``): every query
  tile walks its selected key blocks in place (no gathered copy), computes only the causal half of
  diagonal blocks and keeps its online softmax in float32 registers; bf16/fp16 read as stored.
* ``native_linear`` — the chunked causal linear-attention forward (``csrc/linear_chunked.c``)
  behind ``longattn.recurrent.linear_attention`` and ``lightning_attention`` when no gradient is
  wanted: each (batch, state head) walks its sequence once with the state in cache.

On CUDA ``sdpa.fused_flash`` runs torch's CUDA flash / memory-efficient kernels; on other devices
it gives the same ``(out, lse)`` from torch ops. The C kernels run on the CPU only and are not
chosen elsewhere.
"""
