"""Recycled Attention (Xu et al. 2024, "Recycled Attention: Efficient inference for long-context
language models"): most queries reuse the keys an earlier full-attention step found important.

Queries are taken in order in groups of ``stride`` (S). The first query of a group does a *full
step*: exact attention over every key it may see, from which each query head remembers its
``budget`` highest-scoring keys (top attention weights; the first ``sinks`` keys always among them).
The other S-1 queries of the group attend exactly to that remembered set plus, under causality,
the keys that arrived after the full step (positions after the full step's query up to their own).
In a decode loop this is one full step every S generated tokens; here one call with ``tokens_q``
queries runs the same schedule, starting with a full step at its first query (a caller decoding one
token per call would keep the schedule and the remembered set itself).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from longattn.kernels.eager import attend_scores, attend_visible, gather_tokens
from longattn.core import validate
from longattn.kernels.layout import dense_pairs
from longattn.kernels.sdpa import fused_available
from longattn.methods.base import Call, Capabilities, Method, Result, register


@register
@dataclass(frozen=True)
class Recycled(Method):
    """Recycled Attention (Xu et al. 2024): a full-attention step every ``stride`` queries; the
    queries in between attend only to the full step's top-``budget`` keys (per head) and the keys
    that arrived since.

    Args:
        stride: S, queries per group (1 = every query full = exact attention). A stride longer
            than the queries is one group of them all (one full step, at the first query).
        budget: keys remembered from a full step, sinks included. A recycled query attends to at
            most ``budget + stride - 1`` keys (the remembered ones and those after the full step).
        sinks: first keys always remembered (StreamingLLM's attention sinks); ``sinks <= budget``.

    Shapes: q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]``. Causal (prefill or several decode
    queries, ``Tq <= Tk``) and non-causal (no keys "arrive": recycled queries see the remembered
    set only). Causal per token: a full step remembers only keys it may see, so no query's output
    depends on a key after it.
    """

    stride: int = 16
    budget: int = 2048
    sinks: int = 0
    name = "recycled"
    capabilities = Capabilities(
        exact=False, score_bias=False,
        paper="Xu et al. 2024, Recycled Attention",
        cost="O(N·Tk/stride) full steps + O(N·(budget+stride))",
    )

    def __post_init__(self) -> None:
        validate.check_positive_int("stride", self.stride)
        validate.check_positive_int("budget", self.budget)
        validate.check_positive_int("sinks", self.sinks, allow_zero=True)
        if self.sinks > self.budget:
            raise ValueError(
                f"sinks={self.sinks} exceeds budget={self.budget}: the sinks are part of the remembered keys"
            )

    def run(self, q, k, v, call: Call) -> Result:
        if call.bias is not None or call.row_bias is not None:
            raise ValueError("method 'recycled' does not take a score bias")
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        g = hq // hk
        S = min(self.stride, tq)  # a longer group holds the same queries: capped, nothing is sized by it
        off = tk - tq
        dev = q.device
        causal = call.causal
        n_groups = math.ceil(tq / S)
        kept = min(self.budget, tk)
        fused = fused_available(q)
        k_pos = torch.arange(tk, device=dev)
        kpm = call.key_padding_mask
        q_pad = torch.nn.functional.pad(q, (0, 0, 0, n_groups * S - tq)).view(b, hq, n_groups, S, d)
        out = torch.empty(b, hq, n_groups, S, d, dtype=torch.float32, device=dev)
        lse = torch.empty(b, hq, n_groups, S, dtype=torch.float32, device=dev)
        # a recycled query sees the remembered keys, then the (at most S-1) keys after the full step
        n_keys = kept + (S - 1 if causal else 0)
        per_step = max(1, (1 << 22) // max(1, b * hq * max(tk, (S - 1) * n_keys, n_keys * d)))
        pairs = 0.0
        t_select = t_kernel = 0.0
        for g0 in range(0, n_groups, per_step):
            g1 = min(g0 + per_step, n_groups)
            G = g1 - g0
            t0 = time.perf_counter()
            # full steps: query g*S of each group, exact over every key it may see
            qf = q_pad[:, :, g0:g1, 0]  # [B, Hq, G, D]
            f_pos = torch.arange(g0, g1, device=dev) * S + off  # [G]
            s = torch.matmul(qf.reshape(b, hk, g * G, d), k.transpose(-1, -2)).view(b, hq, G, tk).mul_(call.scale)
            allowed = (k_pos[None, :] <= f_pos[:, None]) if causal else torch.ones(G, tk, dtype=torch.bool, device=dev)
            allowed = allowed[None, None]
            if kpm is not None:
                allowed = allowed & kpm[:, None, None, :]
            s = s.masked_fill(~allowed, -math.inf)
            o_full, l_full = attend_scores(s, v)
            out[:, :, g0:g1, 0] = o_full
            lse[:, :, g0:g1, 0] = l_full
            t1 = time.perf_counter()
            if call.want_stats:
                pairs += float(allowed.expand(b, hq, G, tk).sum()) / (b * hq)
            if S == 1:
                t_kernel += t1 - t0
                continue
            # remember each head's top keys by score (= by attention weight), sinks first
            rank = s.masked_fill((k_pos < self.sinks)[None, None, None, :] & allowed, math.inf)
            top_val, top_idx = rank.topk(kept, dim=-1)  # [B, Hq, G, kept]
            remembered = ~torch.isneginf(top_val)
            t2 = time.perf_counter()
            # recycled queries: remembered keys + (causal) keys after the full step
            rel = torch.arange(1, S, device=dev)  # query offsets in the group
            q_idx = torch.arange(g0, g1, device=dev)[:, None] * S + rel  # [G, S-1]
            real_q = q_idx < tq
            key_pos = [top_idx]
            vis = [remembered[:, :, :, None, :] & real_q[None, None, :, :, None]]
            if causal:
                new_pos = (f_pos[:, None] + rel).clamp(max=tk - 1)  # [G, S-1]: keys after the full step
                key_pos.append(new_pos.expand(b, hq, G, S - 1))
                # key f+1+t is visible to query f+1+u when t <= u (and it exists)
                new_vis = (rel[None, :] <= rel[:, None])[None] & ((f_pos[:, None] + rel) < tk)[:, None, :]
                new_vis = new_vis & real_q[:, :, None]  # [G, S-1 (query), S-1 (key)]
                new_vis = new_vis[None, None].expand(b, hq, G, S - 1, S - 1)
                if kpm is not None:
                    real_k = kpm.gather(1, new_pos.flatten()[None].expand(b, -1)).view(b, 1, G, 1, S - 1)
                    new_vis = new_vis & real_k
                vis.append(new_vis)
            key_pos = torch.cat(key_pos, -1)  # [B, Hq, G, n_keys]
            vis = torch.cat(vis, -1)  # [B, Hq, G, S-1, n_keys]
            n = key_pos.shape[-1]
            kg, vg = (x.view(b * hq * G, 1, n, d) for x in gather_tokens(k, v, key_pos))
            qr = q_pad[:, :, g0:g1, 1:].reshape(b * hq * G, 1, S - 1, d)
            o, l = attend_visible(qr, kg, vg, call.scale, vis.reshape(b * hq * G, 1, S - 1, n), fused)
            out[:, :, g0:g1, 1:] = o.view(b, hq, G, S - 1, d)
            lse[:, :, g0:g1, 1:] = l.view(b, hq, G, S - 1)
            t3 = time.perf_counter()
            t_select += t2 - t1
            t_kernel += (t1 - t0) + (t3 - t2)
            if call.want_stats:
                pairs += float(vis.sum()) / (b * hq)
        out = out.view(b, hq, n_groups * S, d)[:, :, :tq]
        lse = lse.view(b, hq, n_groups * S)[:, :, :tq]
        stats = {"selection_s": t_select, "kernel_s": t_kernel, "full_steps": n_groups}
        if call.want_stats:
            dense = dense_pairs(tq, tk, causal)
            stats["density"] = pairs / dense if dense else 0.0
        return Result(out, lse, "recycled", stats)
