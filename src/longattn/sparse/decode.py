"""One decoding step of block retrieval with as few tensor operations as possible.

A single new query over a long cache costs little arithmetic — scoring one row of block
summaries, a gather of ``budget`` keys, one fused attention call — so the general selector and
kernel (built for many query blocks) spend most of a step in Python and small-op overhead. This
path computes the same thing for the common decoding case (one query, causal, no key padding, a
linear block estimator and full key blocks outside the forced ones):

* forced blocks: the sink blocks at the start and the local window's blocks at the end (which
  include the query's own block) — the same rule as ``select.forced_block_grid``;
* the remaining slots go to the highest-scoring blocks in between; for one query the top-k of its
  per-block estimates equals the top-k of their softmax, which the general path ranks by;
* the kept blocks (sinks, chosen blocks, window) read in place by the native kernel
  (``longattn.kernels.native.decode_blocks``), or else one gather of their keys into a reused
  buffer and one fused call without a mask.

``tests/test_sparse_decode.py`` checks it against ``select_blocks`` + ``sparse_attention``.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import torch

from longattn.kernels import native
from longattn.kernels.eager import gather_tokens
from longattn.kernels.sdpa import fused_available, fused_flash, needs_grad
from longattn.sparse.select import BlockEstimator, Selection
from longattn.sparse.summaries import BlockSummaries


class DecodeStep(NamedTuple):
    """What ``decode_step`` returns."""

    out: torch.Tensor  # [B, Hq, 1, D]
    lse: torch.Tensor  # [B, Hq, 1] float32
    selection: Selection | None  # the kept blocks, when asked for
    visible_keys: int  # keys attended per head
    kernel: str  # "native" (blocks read in place) or "gather" (gathered copy + fused call)


class _GatherBuffers(threading.local):
    """Per-thread buffers the step gathers its keys and values into, grown on demand. A step
    gathers a few MB; a fresh allocation that size is an ``mmap`` whose page faults cost about
    as much as the attention itself (0.55 against 0.35 ms measured for 1,536 keys × 8 heads)."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def get(self, numel: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ks = self.keys
        if ks is None or ks.numel() < numel or ks.dtype != like.dtype or ks.device != like.device:
            self.keys = torch.empty(numel, dtype=like.dtype, device=like.device)
            self.values = torch.empty(numel, dtype=like.dtype, device=like.device)
        return self.keys, self.values


_BUFFERS = _GatherBuffers()


def forced_ranges(tokens_k: int, block: int, sinks: int, window: int) -> tuple[int, int]:
    """``(n_sink_blocks, first_window_block)``: blocks ``[0, n_sink)`` and ``[first_window, n)``
    are always kept for a query at position ``tokens_k - 1``."""
    n = math.ceil(tokens_k / block)
    last = tokens_k - 1
    first_window = last // block
    if window > 0:
        # blocks whose last key is within the window: j·block + block − 1 ≥ last − window + 1
        first_window = min(first_window, max(0, math.ceil((last - window + 2 - block) / block)))
    n_sink = min(math.ceil(sinks / block), n)
    return n_sink, max(first_window, n_sink)


def applies(q: torch.Tensor, k: torch.Tensor, *, causal: bool, key_padding_mask, estimator) -> bool:
    return (q.shape[2] == 1 and causal and key_padding_mask is None and estimator is not None
            and fused_available(q))


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, summaries: BlockSummaries,
                estimator: BlockEstimator, *, scale: float, n_sel: int, sinks: int, window: int,
                want_selection: bool = True, native_decode: bool = True):
    """Attention of one query ``q [B, Hq, 1, D]`` over ``k, v [B, Hkv, T, D]`` through the blocks
    a block-top-k selector keeps. Returns a ``DecodeStep`` (out, lse, selection, visible_keys,
    kernel); ``selection`` is None unless
    ``want_selection`` (building it costs a sort per step). With ``native_decode`` (and the
    kernel built, see ``longattn.kernels.native``) the kept blocks are read in place by
    ``native.decode_blocks``; otherwise they are gathered into a reused buffer and attended by
    torch's fused kernel. Both give the same result."""
    b, hq = q.shape[:2]
    tk = k.shape[2]
    bs = summaries.block
    n = summaries.n_blocks
    n_sink, w0 = forced_ranges(tk, bs, sinks, window)
    free = n_sel - n_sink - (n - w0)
    candidates = w0 - n_sink
    if free <= 0 or candidates <= 0:
        chosen = torch.empty(b, hq, 0, dtype=torch.long, device=q.device)
    elif candidates > free:
        est = estimator(q, summaries, scale)[:, :, 0, n_sink:w0]  # [B, Hq, candidates]
        chosen = est.topk(free, dim=-1).indices + n_sink  # [B, Hq, free]
    else:  # every block fits: the step is dense
        chosen = torch.arange(n_sink, w0, device=q.device).expand(b, hq, -1)
    n_keys = n_sink * bs + chosen.shape[-1] * bs + (tk - w0 * bs)
    # the kept blocks: sinks, chosen, window (the last may be short); ascending except `chosen`
    blocks = torch.cat([torch.arange(n_sink, device=q.device).expand(b, hq, -1), chosen,
                        torch.arange(w0, n, device=q.device).expand(b, hq, -1)], dim=-1)
    if native_decode and native.decode_blocks_applies(q, k, v, bs):
        # the native kernel reads those blocks in place, with no gathered copy
        kernel = "native"
        out, lse = native.decode_blocks(q, k, v, blocks, bs, scale)
    else:
        kernel = "gather"
        positions = ((blocks * bs)[..., None] + torch.arange(bs, device=q.device)).flatten(-2)
        positions = positions[..., :n_keys]  # only the cache's last block can be short, and it comes last
        # the gathered keys live only until the fused call returns, so one buffer serves every step
        # — not under autograd: a buffer written with out= records no history, and when q needs a
        # gradient the gathered keys are saved for backward, so the next step must not overwrite them
        reuse = not needs_grad(q, k, v)
        buffers = _BUFFERS.get(positions.numel() * k.shape[-1], k) if reuse else None
        keys, values = gather_tokens(k, v, positions, out=buffers)
        # a cache stored in another dtype than the compute dtype converts only the gathered keys
        out, lse = fused_flash(q, keys.to(q.dtype), values.to(q.dtype), scale=scale)
    selection = Selection(blocks.sort(-1).values[:, :, None], 1, bs) if want_selection else None
    return DecodeStep(out, lse.float(), selection, n_keys, kernel)

