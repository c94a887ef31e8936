"""NSA, Native Sparse Attention (Yuan et al. 2025, DeepSeek, "Native Sparse Attention:
Hardware-Aligned and Natively Trainable Sparse Attention").

Three branches over the same keys, mixed per query head by gates:

* **compressed** — each run of ``compress_block`` keys (stride ``compress_stride``) becomes one key
  and one value through a learned map φ (here: the run's mean plus a learned linear map of the run
  with an intra-block position embedding, zero at initialisation); a query attends to the
  compressed blocks that end at or before it;
* **selected** — the compressed branch's attention probabilities, summed onto the selection blocks
  of ``block`` keys they overlap and over the query heads of a GQA group (one selection per key
  head, as NSA shares it for its kernel), pick the top ``top_n`` blocks, the first block and the
  query's ``local`` nearest blocks always among them; exact attention over their keys (the shared
  block-sparse kernel, ``longattn.sparse.kernel``);
* **sliding window** — exact attention over the last ``window`` keys.

``out = g_cmp·o_cmp + g_slc·o_slc + g_win·o_win`` with sigmoid gates. In NSA the gates come from an
MLP of the layer input; a function of ``q, k, v`` sees the query instead, so here
``g = sigmoid(q·W_g + b_g)`` per query head (``NSAParams``; a query is a linear map of the input).
Without ``learned`` parameters the gates are the fixed ``gates`` and φ is the mean.

Causality: a compressed block enters a query's attention only once it has ended, and a query
block's selection uses only compressed blocks that end before its first query (so no key after a
query steers it); the selected and window branches mask per token.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from longattn.core import validate
from longattn.kernels.eager import attend_visible
from longattn.kernels.layout import dense_pairs
from longattn.kernels.sdpa import fused_available
from longattn.methods.base import Call, Capabilities, Method, Result, register
from longattn.sparse.kernel import sparse_attention
from longattn.sparse.select import Selection

Tensor = torch.Tensor


class NSAParams(nn.Module):
    """NSA's learned parts for one attention layer: φ (compression of keys and values) and the
    three gates.

    Args:
        head_dim: ``D``; heads: query heads; kv_heads: key/value heads (φ is per key head).
        compress_block: keys per compressed block.

    Parameters: ``pos_k, pos_v [kv_heads, l, D]`` intra-block position embeddings,
    ``mix_k, mix_v [kv_heads, l·D, D]`` (zero: φ starts as the mean), ``gate_w [heads, D, 3]`` and
    ``gate_b [heads, 3]`` (zero weight, bias 0: every gate starts at ½).
    """

    def __init__(self, head_dim: int, heads: int, kv_heads: int, compress_block: int = 32):
        super().__init__()
        for name, value in (("head_dim", head_dim), ("heads", heads), ("kv_heads", kv_heads),
                            ("compress_block", compress_block)):
            validate.check_positive_int(name, value)
        if heads % kv_heads:
            raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
        self.head_dim, self.heads, self.kv_heads, self.compress_block = head_dim, heads, kv_heads, compress_block
        l, d = compress_block, head_dim
        self.pos_k = nn.Parameter(torch.zeros(kv_heads, l, d))
        self.pos_v = nn.Parameter(torch.zeros(kv_heads, l, d))
        self.mix_k = nn.Parameter(torch.zeros(kv_heads, l * d, d))
        self.mix_v = nn.Parameter(torch.zeros(kv_heads, l * d, d))
        self.gate_w = nn.Parameter(torch.zeros(heads, d, 3))
        self.gate_b = nn.Parameter(torch.zeros(heads, 3))

    def compress(self, runs: Tensor, which: str) -> Tensor:
        """φ of ``runs [B, Hkv, n, l, D]`` → ``[B, Hkv, n, D]``: the mean plus the learned map."""
        pos, mix = (self.pos_k, self.mix_k) if which == "k" else (self.pos_v, self.mix_v)
        b, hk, n, l, d = runs.shape
        x = (runs + pos[None, :, None].to(runs.dtype)).reshape(b, hk, n, l * d)
        return runs.mean(3) + torch.einsum("bhnx,hxd->bhnd", x, mix.to(runs.dtype)) / math.sqrt(l)

    def gates(self, q: Tensor) -> Tensor:
        """``sigmoid(q·W_g + b_g)`` for ``q [B, Hq, T, D]`` → ``[B, Hq, T, 3]`` (cmp, slc, win)."""
        return torch.sigmoid(torch.einsum("bhtd,hdg->bhtg", q, self.gate_w.to(q.dtype))
                             + self.gate_b.to(q.dtype)[None, :, None])


@register
@dataclass(frozen=True, eq=False)
class NSA(Method):
    """NSA, Native Sparse Attention (Yuan et al. 2025, DeepSeek): compressed, selected and
    sliding-window branches mixed by gates; trainable end to end.

    Args:
        block: keys per selection block (NSA: 64).
        top_n: selection blocks per query block, the first and the ``local`` ones included (NSA: 16).
        local: nearest selection blocks always selected, the query's own included (NSA: 2).
        compress_block, compress_stride: compressed runs of keys and their stride (NSA: 32, 16).
        window: sliding-window keys (NSA: 512).
        q_block: queries sharing one selection (NSA selects per query; a multiple of ``block``
            keeps the shared kernel's batched path).
        gates: fixed (cmp, slc, win) weights when ``learned`` is None.
        learned: the learned φ and gates (``NSAParams``), or None.
    """

    block: int = 64
    top_n: int = 16
    local: int = 2
    compress_block: int = 32
    compress_stride: int = 16
    window: int = 512
    q_block: int = 64
    gates: tuple = (1.0, 1.0, 1.0)
    learned: NSAParams | None = None
    name = "nsa"
    capabilities = Capabilities(
        exact=False, score_bias=False, non_causal=False,
        paper="Yuan et al. 2025, Native Sparse Attention",
        cost="O(N²/stride) compressed + O(N·top_n·block) selected + O(N·window)",
    )

    def __post_init__(self) -> None:
        for name in ("block", "top_n", "compress_block", "compress_stride", "window", "q_block"):
            validate.check_positive_int(name, getattr(self, name))
        validate.check_positive_int("local", self.local)
        if self.local + 1 > self.top_n:
            raise ValueError(f"top_n={self.top_n} must hold the first block and local={self.local} nearest ones")
        if self.compress_stride > self.compress_block:
            raise ValueError(f"compress_stride={self.compress_stride} leaves keys out of every compressed block "
                             f"of compress_block={self.compress_block}: use compress_stride <= compress_block")
        if self.q_block > self.block * self.local:
            raise ValueError(f"q_block={self.q_block} spans more than the local={self.local} blocks of {self.block} "
                             "that are always selected: use q_block <= block * local")
        if not (isinstance(self.gates, tuple) and len(self.gates) == 3
                and all(isinstance(g, (int, float)) and math.isfinite(g) for g in self.gates)):
            raise ValueError(f"gates must be a tuple of 3 finite numbers (cmp, slc, win), got {self.gates!r}")
        if self.learned is not None and not isinstance(self.learned, NSAParams):
            raise TypeError(f"learned must be NSAParams or None, got {type(self.learned).__name__}")
        if self.learned is not None and self.learned.compress_block != self.compress_block:
            raise ValueError(f"learned was built for compress_block={self.learned.compress_block}, the method has "
                             f"{self.compress_block}")

    # -------------------------------------------------------------------------- compressed branch

    def compressed(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(k_cmp, v_cmp [B, Hkv, n, D], ends [n])``: φ of every complete run and its last position."""
        tk = k.shape[2]
        l, d = self.compress_block, self.compress_stride
        n = (tk - l) // d + 1 if tk >= l else 0
        starts = torch.arange(n, device=k.device) * d
        if n == 0:
            empty = k.new_zeros(k.shape[0], k.shape[1], 0, k.shape[3])
            return empty, empty, starts
        idx = (starts[:, None] + torch.arange(l, device=k.device)).flatten()
        runs_k = k[:, :, idx].unflatten(2, (n, l))
        runs_v = v[:, :, idx].unflatten(2, (n, l))
        if self.learned is None:
            return runs_k.mean(3), runs_v.mean(3), starts + l - 1
        return self.learned.compress(runs_k, "k"), self.learned.compress(runs_v, "v"), starts + l - 1

    # ------------------------------------------------------------------------------------ selection

    def select(self, p_qb: Tensor, ends: Tensor, tq: int, tk: int, hk: int) -> Selection:
        """Top ``top_n`` selection blocks per (key head, query block) from ``p_qb [B, Hq, n_qb, n]``
        (each query block's summed compressed-attention probabilities, :meth:`query_block_mass`),
        repeated over the group's query heads."""
        b, hq = p_qb.shape[:2]
        p_cmp = p_qb
        bs = min(self.block, tk)
        qbs = min(self.q_block, max(tq, 1))
        n_blocks = math.ceil(tk / bs)
        n_qb = math.ceil(tq / qbs)
        off = tk - tq
        starts = ends - (self.compress_block - 1)
        # which selection blocks each compressed block overlaps: [n, n_blocks]
        blk = torch.arange(n_blocks, device=p_cmp.device)
        overlap = ((starts[:, None] <= blk[None, :] * bs + bs - 1) & (ends[:, None] >= blk[None, :] * bs)).to(p_cmp.dtype)
        # a query block's score: its queries' probabilities, only of compressed blocks that end
        # before its first query (so the selection never reads a key after any of its queries)
        first = torch.arange(n_qb, device=p_cmp.device) * qbs + off
        p = p_cmp.masked_fill(ends[None, :] >= first[:, None], 0.0)
        scores = (p @ overlap).view(b, hk, hq // hk, n_qb, n_blocks).sum(2)  # shared by the group
        last = torch.clamp(torch.arange(n_qb, device=p.device) * qbs + qbs - 1, max=tq - 1) + off
        own_last = last // bs  # the block holding the query block's last query
        visible = blk[None, :] <= own_last[:, None]
        forced = ((blk[None, :] > own_last[:, None] - self.local) | (blk[None, :] == 0)) & visible
        scores = scores.masked_fill(~visible, -math.inf).masked_fill(forced, math.inf)
        n_sel = min(self.top_n, n_blocks)
        top = scores.topk(n_sel, dim=-1)
        idx = top.indices.masked_fill(torch.isneginf(top.values), -1).sort(-1).values
        return Selection(idx.repeat_interleave(hq // hk, dim=1), qbs, bs)

    def query_block_mass(self, q: Tensor, k_cmp: Tensor, l_cmp: Tensor, vis_cmp: Tensor, scale: float,
                         tk: int) -> Tensor:
        """Each query block's summed attention probabilities over the compressed keys,
        ``[B, Hq, n_qb, n]`` float32, computed a few query blocks at a time (the per-query
        probabilities ``[B, Hq, Tq, n]`` are never all held: at 32k tokens and stride 32 they
        would be a gigabyte)."""
        b, hq, tq, dh = q.shape
        hk, n = k_cmp.shape[1], k_cmp.shape[2]
        qbs = min(self.q_block, max(tq, 1))
        n_qb = math.ceil(tq / qbs)
        out = torch.zeros(b, hq, n_qb, n, dtype=torch.float32, device=q.device)
        kc = k_cmp.float().transpose(-1, -2)
        per = max(1, (1 << 22) // max(1, b * hq * qbs * n))
        for c0 in range(0, n_qb, per):
            c1 = min(n_qb, c0 + per)
            r0, r1 = c0 * qbs, min(c1 * qbs, tq)
            rows = q[:, :, r0:r1].float()
            s = torch.matmul(rows.reshape(b, hk, -1, dh), kc).view(b, hq, r1 - r0, n) * scale
            p = torch.exp(s - l_cmp[:, :, r0:r1, None]).masked_fill(~vis_cmp[..., r0:r1, :], 0.0).nan_to_num(0.0)
            p = torch.nn.functional.pad(p, (0, 0, 0, (c1 - c0) * qbs - (r1 - r0)))
            out[:, :, c0:c1] = p.view(b, hq, c1 - c0, qbs, n).sum(3)
        return out

    # ---------------------------------------------------------------------------------------- run

    def run(self, q, k, v, call: Call) -> Result:
        import longattn

        if call.bias is not None or call.row_bias is not None:
            raise ValueError("method 'nsa' does not take a score bias")
        b, hq, tq, dh = q.shape
        hk, tk = k.shape[1], k.shape[2]
        if self.learned is not None and (self.learned.heads != hq or self.learned.kv_heads != hk
                                        or self.learned.head_dim != dh):
            raise ValueError(f"learned was built for heads={self.learned.heads}, kv_heads={self.learned.kv_heads}, "
                             f"head_dim={self.learned.head_dim}; q/k have {hq}, {hk}, {dh}")
        kpm = call.key_padding_mask
        t0 = time.perf_counter()
        # compressed branch: q over the compressed keys that have ended
        k_cmp, v_cmp, ends = self.compressed(k, v)
        q_pos = torch.arange(tq, device=q.device) + (tk - tq)
        vis_cmp = (ends[None, :] <= q_pos[:, None])[None, None]  # [1, 1, Tq, n]
        if kpm is not None and ends.numel():
            # a compressed block counts only if every key in it is real
            padded = torch.nn.functional.pad((~kpm).cumsum(-1), (1, 0))  # padded keys before each position
            run_ok = (padded[:, ends + 1] - padded[:, ends + 1 - self.compress_block]) == 0  # [B, n]
            vis_cmp = vis_cmp & run_ok[:, None, None, :]
        g = hq // hk
        if ends.numel():
            qg = q.reshape(b, hk, g * tq, dh)
            vg = vis_cmp.expand(vis_cmp.shape[0], 1, tq, -1).repeat(1, 1, g, 1) if g > 1 else vis_cmp
            o_cmp, l_cmp = attend_visible(qg, k_cmp.to(q.dtype), v_cmp.to(q.dtype), call.scale, vg, fused_available(q))
            o_cmp, l_cmp = o_cmp.reshape(b, hq, tq, dh), l_cmp.reshape(b, hq, tq)
            with torch.no_grad():
                p_qb = self.query_block_mass(q, k_cmp, l_cmp, vis_cmp, call.scale, tk)
        else:
            o_cmp = q.new_zeros(b, hq, tq, v.shape[-1])
            p_qb = q.new_zeros(b, hq, math.ceil(tq / min(self.q_block, max(tq, 1))), 0, dtype=torch.float32)
        with torch.no_grad():
            selection = self.select(p_qb, ends, tq, tk, hk)
        t1 = time.perf_counter()
        o_slc, lse_slc, info = sparse_attention(q, k, v, selection, scale=call.scale, causal=True,
                                                key_padding_mask=kpm, count_pairs=call.want_stats)
        o_win = longattn.attention(q, k, v, causal=True, scale=call.scale, key_padding_mask=kpm,
                                   method=longattn.method("window", window=min(self.window, max(tk, 1))))
        if self.learned is None:
            gc, gs, gw = (torch.tensor(x, dtype=torch.float32, device=q.device) for x in self.gates)
        else:
            gate = self.learned.gates(q.float())
            gc, gs, gw = gate[..., 0:1], gate[..., 1:2], gate[..., 2:3]
        out = gc * o_cmp.float() + gs * o_slc.float() + gw * o_win.float()
        t2 = time.perf_counter()
        stats = {"selection_s": t1 - t0, "kernel_s": t2 - t1, "selected_blocks": selection.indices,
                 "blocks_per_query_block": selection.n_sel}
        if call.want_stats:
            dense = dense_pairs(tq, tk, True)
            stats["density"] = info.visible_pairs / dense if dense else 0.0
        # the LSE of the selected branch: the output is a gated sum of three attentions, so no one
        # LSE describes it (it is the softmax LSE when only the selected branch is on)
        return Result(out, lse_slc, "nsa", stats)
