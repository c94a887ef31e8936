"""HyperAttention (Han et al. 2023, "HyperAttention: Long-context Attention in Near-Linear Time").

Two cheap estimates stand in for the dense score matrix:

* **sortLSH** finds the large entries. Queries and keys are hashed with the same random
  hyperplanes (angular LSH, ``lsh_bits`` sign bits); the bucket ids are ranked in Gray-code
  order, so neighbouring buckets differ in one bit, and queries and keys are sorted by that rank.
  Near-parallel queries and keys then sit at about the same place in their sorted orders, so each
  block of consecutive sorted queries attends exactly to the block of sorted keys at the same place
  (a block-diagonal mask after sorting).
* **uniform column sampling** covers the rest. ``samples`` key columns are drawn uniformly without
  replacement; for each query the sampled columns inside its own key block are dropped (already
  counted exactly) and the others enter with weight ``tokens_k / samples``, the inverse of their
  inclusion probability, so the estimated softmax denominator over the keys outside the block is
  unbiased.

The two parts merge by log-sum-exp. Causal attention uses the paper's recursion: split the
sequence in halves; the lower-left quarter (every key before every query) is non-causal
HyperAttention, the two diagonal halves recurse, and pieces of at most ``min_seq`` keys are exact
causal attention.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from longattn.kernels.eager import attend_scores
from longattn.core import validate
from longattn.core.merge import merge_partials, row_logsumexp
from longattn.kernels.layout import dense_pairs
from longattn.kernels.sdpa import sdpa_attention
from longattn.methods.base import Call, Capabilities, Method, Result, register

_MAX_BITS = 31


@register
@dataclass(frozen=True)
class Hyper(Method):
    """HyperAttention (Han et al. 2023): sortLSH blocks plus importance-weighted column samples.

    Block-diagonal attention in sortLSH order and uniformly sampled key columns, merged by LSE;
    causal by recursive halving.

    Args:
        lsh_bits: random hyperplanes of the angular LSH (``2**lsh_bits`` buckets).
        block: sorted keys per block; each block of sorted queries attends exactly to one block of
            sorted keys. ``block >= tokens_k`` makes every piece exact.
        samples: uniformly sampled key columns per (batch, key head) added to every query (0: none).
        min_seq: under causality, pieces with at most this many keys are attended exactly (as the
            whole call when ``tokens_k <= min_seq``, or ``tokens_k <= block``).
        seed: seeds the hyperplanes and the column samples, so a call is deterministic.

    Defaults follow the paper's long-context setting (7 bits, blocks and samples of 256, exact
    below 4096 tokens).

    Shapes: ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]``. Cross attention (``Tq != Tk``) aligns
    sorted ranks proportionally: the query at sorted rank ``r`` uses key block
    ``floor(r · n_blocks / Tq)``. Causal cross attention (decode) splits off the first
    ``Tk - Tq`` keys, which every query sees, as one non-causal piece.

    Causality: a query's output never depends on keys or values after it. Which keys it is paired
    with in a non-causal piece depends on the ranks of the other queries of that piece (the sort is
    over all of them), as in the paper; queries are not ranked against later *keys*.
    """

    lsh_bits: int = 7
    block: int = 256
    samples: int = 256
    min_seq: int = 4096
    seed: int = 0
    name = "hyper"
    capabilities = Capabilities(
        exact=False, score_bias=False,
        paper="Han et al. 2023, HyperAttention: Long-context Attention in Near-Linear Time",
        cost="O(N·(block+samples)·D) + O(N log N) sort",
    )

    def __post_init__(self) -> None:
        validate.check_positive_int("lsh_bits", self.lsh_bits)
        if self.lsh_bits > _MAX_BITS:
            raise ValueError(f"lsh_bits must be at most {_MAX_BITS} (bucket ids are int64 Gray ranks), "
                             f"got {self.lsh_bits}")
        validate.check_positive_int("block", self.block)
        validate.check_positive_int("samples", self.samples, allow_zero=True)
        validate.check_positive_int("min_seq", self.min_seq)
        validate.check_seed("seed", self.seed)

    def run(self, q, k, v, call: Call) -> Result:
        if call.bias is not None or call.row_bias is not None:
            raise ValueError(f"method {self.name!r} does not take a score bias (its hashing ignores it)")
        tq, tk = q.shape[2], k.shape[2]
        gen = torch.Generator().manual_seed(self.seed)
        planes = torch.randn(q.shape[-1], self.lsh_bits, generator=gen, device=gen.device).to(q.device)
        pad = call.key_padding_mask
        t0 = time.perf_counter()
        if call.causal:
            out, lse, pairs = self._causal(q, k, v, pad, call.scale, planes, gen)
        else:
            out, lse, pairs = self._non_causal(q, k, v, pad, call.scale, planes, gen)
        stats = {"kernel_s": time.perf_counter() - t0}
        if call.want_stats:
            dense = dense_pairs(tq, tk, call.causal)
            stats["density"] = pairs / dense if dense else 0.0
        return Result(out, lse, "hyper", stats)

    # -- causal recursion ------------------------------------------------------------------------

    def _causal(self, q, k, v, pad, scale, planes, gen):
        """Causal (bottom-right aligned) attention → ``(out, lse, pairs per head)``."""
        tq, tk = q.shape[2], k.shape[2]
        # with tk <= block every piece of the recursion would be one exact sortLSH block (and
        # sample nothing): the result is exact causal attention, attended here in one call
        if tk <= max(self.min_seq, self.block):
            out, lse = sdpa_attention(q, k, v, scale=scale, causal=True, key_padding_mask=pad)
            return out, lse, float(dense_pairs(tq, tk, True))
        off = tk - tq
        if off > 0:
            # keys before the first query are visible to all queries: one non-causal piece; the
            # last tq keys form a causal square.
            o1, l1, p1 = self._non_causal(q, k[:, :, :off], v[:, :, :off], _cut(pad, 0, off), scale, planes, gen)
            o2, l2, p2 = self._causal(q, k[:, :, off:], v[:, :, off:], _cut(pad, off, tk), scale, planes, gen)
            out, lse = merge_partials([o1, o2], [l1, l2])
            return out, lse, p1 + p2
        h = tq // 2
        o_top, l_top, p_top = self._causal(q[:, :, :h], k[:, :, :h], v[:, :, :h], _cut(pad, 0, h), scale, planes, gen)
        q_bot = q[:, :, h:]
        o_bl, l_bl, p_bl = self._non_causal(q_bot, k[:, :, :h], v[:, :, :h], _cut(pad, 0, h), scale, planes, gen)
        o_br, l_br, p_br = self._causal(q_bot, k[:, :, h:], v[:, :, h:], _cut(pad, h, tk), scale, planes, gen)
        o_bot, l_bot = merge_partials([o_bl, o_br], [l_bl, l_br])
        return torch.cat([o_top, o_bot], 2), torch.cat([l_top, l_bot], 2), p_top + p_bl + p_br

    # -- non-causal HyperAttention ---------------------------------------------------------------

    def _non_causal(self, q, k, v, pad, scale, planes, gen):
        """Every query may see every key: sortLSH blocks + sampled columns → ``(out, lse, pairs)``."""
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        g = hq // hk
        if tk == 0:
            return torch.zeros_like(q), torch.full((b, hq, tq), -math.inf, device=q.device), 0.0
        bs = min(self.block, tk)
        n_blocks = math.ceil(tk / bs)
        if n_blocks == 1:
            # one block holds every key: exact, and there is nothing left to sample
            out, lse = sdpa_attention(q, k, v, scale=scale, causal=False, key_padding_mask=pad)
            return out, lse, float(tq * tk)

        k_perm = _gray_rank(k, planes).argsort(dim=-1, stable=True)  # [B, Hkv, Tk] sorted order
        q_perm = _gray_rank(q, planes).argsort(dim=-1, stable=True)  # [B, Hq, Tq]
        # query at sorted rank r uses key block floor(r * n_blocks / tq) (block-diagonal when tq == tk)
        q_block_of_rank = torch.arange(tq, device=q.device) * n_blocks // tq
        out_b, lse_b, pairs_b = self._block_part(q, k, v, pad, scale, k_perm, q_perm, q_block_of_rank, bs, n_blocks)
        if self.samples == 0:
            return out_b, lse_b, pairs_b

        m = min(self.samples, tk)
        cols = torch.rand(b, hk, tk, generator=gen, device=gen.device).argsort(-1)[..., :m].to(q.device)  # uniform, no replacement
        k_rank = k_perm.argsort(-1)  # sorted position of each key
        col_block = (k_rank.gather(-1, cols) // bs).repeat_interleave(g, 1)  # [B, Hq, m]
        q_block = q_block_of_rank[q_perm.argsort(-1)]  # [B, Hq, Tq] key block of each query
        ks = k.gather(2, cols[..., None].expand(-1, -1, -1, d))
        vs = v.gather(2, cols[..., None].expand(-1, -1, -1, d))
        s = torch.matmul(q.reshape(b, hk, g * tq, d), ks.transpose(-1, -2)).view(b, hq, tq, m) * scale
        drop = q_block[..., :, None] == col_block[..., None, :]  # counted exactly in the block part
        if pad is not None:
            drop = drop | ~pad.gather(1, cols.reshape(b, hk * m)).view(b, hk, m).repeat_interleave(g, 1)[..., None, :]
        s = s.masked_fill(drop, -math.inf)
        out_s, lse_s = attend_scores(s, vs)
        # Horvitz-Thompson weight: each column is kept with probability m / tk
        lse_s = lse_s + math.log(tk / m)
        out, lse = merge_partials([out_b, out_s], [lse_b, lse_s])
        return out, lse, pairs_b + float((~drop).sum()) / (b * hq)

    def _block_part(self, q, k, v, pad, scale, k_perm, q_perm, q_block_of_rank, bs, n_blocks):
        """Exact attention of each block of sorted queries to its block of sorted keys."""
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        g = hq // hk
        dev = q.device
        # sorted keys, padded to whole blocks: [B, Hkv, n_blocks, bs, D]
        fill = n_blocks * bs - tk
        ks = _pad_tokens(k.gather(2, k_perm[..., None].expand(-1, -1, -1, d)), fill).view(b, hk, n_blocks, bs, d)
        vs = _pad_tokens(v.gather(2, k_perm[..., None].expand(-1, -1, -1, d)), fill).view(b, hk, n_blocks, bs, d)
        k_ok = torch.ones(b, hk, tk, dtype=torch.bool, device=dev)
        if pad is not None:
            k_ok = pad[:, None, :].expand(b, hk, tk).gather(-1, k_perm)
        k_ok = torch.cat([k_ok, torch.zeros(b, hk, fill, dtype=torch.bool, device=dev)], -1).view(b, hk, n_blocks, bs)
        # the sorted ranks served by each key block, padded to the largest count
        lo = torch.searchsorted(q_block_of_rank, torch.arange(n_blocks, device=dev))
        hi = torch.searchsorted(q_block_of_rank, torch.arange(n_blocks, device=dev), right=True)
        q_max = int((hi - lo).max())
        ranks = lo[:, None] + torch.arange(q_max, device=dev)[None, :]  # [n_blocks, q_max]
        q_ok = ranks < hi[:, None]
        ranks = ranks.clamp(max=tq - 1)
        q_sorted = q.gather(2, q_perm[..., None].expand(-1, -1, -1, d))
        qb = q_sorted[:, :, ranks.reshape(-1)].view(b, hk, g, n_blocks, q_max, d)
        s = torch.matmul(qb, ks[:, :, None].transpose(-1, -2)) * scale  # [B, Hkv, g, n_blocks, q_max, bs]
        visible = q_ok[None, None, None, :, :, None] & k_ok[:, :, None, :, None, :]
        s = s.masked_fill(~visible, -math.inf)
        lse = row_logsumexp(s)
        p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
        o = torch.matmul(p, vs[:, :, None])  # [B, Hkv, g, n_blocks, q_max, D]
        # back from (block, slot) to sorted rank, then to the original query order
        keep = q_ok.reshape(-1)
        rank_idx = ranks.reshape(-1)[keep]
        o_sorted = torch.empty(b, hq, tq, d, device=dev)
        l_sorted = torch.empty(b, hq, tq, device=dev)
        o_sorted[:, :, rank_idx] = o.reshape(b, hq, n_blocks * q_max, d)[:, :, keep]
        l_sorted[:, :, rank_idx] = lse.reshape(b, hq, n_blocks * q_max)[:, :, keep]
        out = torch.empty_like(o_sorted).scatter_(2, q_perm[..., None].expand(-1, -1, -1, d), o_sorted)
        lse_out = torch.empty_like(l_sorted).scatter_(2, q_perm, l_sorted)
        pairs = float(visible.expand(b, hk, g, n_blocks, q_max, bs).sum()) / (b * hq)
        return out, lse_out, pairs


def _gray_rank(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Bucket of each row of ``x [..., T, D]`` under sign-of-projection LSH, as its rank in the
    Gray-code order (consecutive ranks differ in one hyperplane): ``[..., T]`` int64."""
    bits = (torch.matmul(x, planes) > 0).to(torch.int64)
    code = (bits << torch.arange(planes.shape[1], device=x.device)).sum(-1)
    rank = code.clone()
    shift = 1
    while shift < planes.shape[1]:
        rank ^= rank >> shift  # inverse Gray code: prefix XOR of the higher bits
        shift <<= 1
    return rank


def _cut(pad, lo: int, hi: int):
    return None if pad is None else pad[:, lo:hi]


def _pad_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:2], n, x.shape[3])], 2)

