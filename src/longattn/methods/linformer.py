"""Linformer (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity"): keys and
values are projected along the sequence to ``proj`` rows, ``K' = E K`` and ``V' = E V`` with a
fixed ``E [proj, Tk]``, and every query attends to those ``proj`` rows: ``softmax(q K'ᵀ) V'``.
Linformer learns ``E``; this training-free form offers two fixed projections:

* ``kind="pool"``: row ``p`` of ``E`` is the mean over a contiguous segment of ``n_p`` keys, and
  ``log n_p`` is added to the score of pooled key ``p``. A segment then carries
  ``n_p · exp(q·k̄_p)``, the softmax mass its ``n_p`` keys would have if each scored like their
  mean, instead of the mass of one key (without the term a long segment would count as little as
  a one-key segment). Exact when every segment holds one key (``proj >= Tk``) or when the keys of
  each segment are equal.
* ``kind="random"``: ``E`` has seeded i.i.d. Gaussian entries, a Johnson-Lindenstrauss projection
  as in Linformer's analysis, shared by keys and values (the paper's key-value sharing). The
  variance is ``1/Tk`` rather than the analysis' ``1/proj``: it keeps a projected key at about the
  norm of a single key, so scores keep their scale instead of growing with ``sqrt(Tk/proj)``.
  Without training it is a random mixture of keys, not an approximation of attention; it is here
  to reproduce the mechanism, and its error does not go to zero as ``proj`` grows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from longattn.kernels.eager import attend_scores
from longattn.core import validate
from longattn.methods.base import Call, Capabilities, Method, Result, register

KINDS = ("pool", "random")


@register
@dataclass(frozen=True)
class Linformer(Method):
    """Linformer (Wang et al. 2020): attention to ``proj`` sequence-projected keys/values; non-causal.

    Args:
        proj: rows of the projection (pooled / mixed keys each query attends to).
        kind: "pool" (mean over contiguous segments, log-size corrected; exact when
            ``proj >= tokens_k``, where a segment is one key and ``proj`` is capped at ``tokens_k``)
            or "random" (seeded Gaussian projection; ``proj > tokens_k`` is refused: more mixtures
            than keys add no information and cost ``proj × tokens_k``).
        seed: seeds the "random" projection.

    Shapes: ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]`` → ``out [B, Hq, Tq, D]``, ``lse
    [B, Hq, Tq]`` (the log-sum-exp over the ``proj`` projected scores, log-size terms included).
    Padded keys are left out of every segment (pool) or get a zero column in ``E`` (random).
    """

    proj: int = 256
    kind: str = "pool"
    seed: int = 0
    name = "linformer"
    capabilities = Capabilities(
        exact=False, causal=False, score_bias=False,
        paper="Wang et al. 2020, Linformer: Self-Attention with Linear Complexity",
        cost="O(N·proj·D)",
    )

    def __post_init__(self) -> None:
        validate.check_positive_int("proj", self.proj)
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {self.kind!r}")
        validate.check_seed("seed", self.seed)

    def run(self, q, k, v, call: Call) -> Result:
        if call.causal:
            raise ValueError(f"method {self.name!r} does not support causal=True")
        if call.bias is not None or call.row_bias is not None:
            raise ValueError(f"method {self.name!r} does not take a score bias (its keys are projected)")
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        g = hq // hk
        pad = call.key_padding_mask
        real = torch.ones(b, tk, device=q.device) if pad is None else pad.to(torch.float32)
        t0 = time.perf_counter()
        if self.kind == "pool":
            kp, vp, log_mass = self._pool(k, v, real)
        else:
            kp, vp, log_mass = self._random(k, v, real)
        n = kp.shape[2]
        t1 = time.perf_counter()
        s = torch.matmul(q.reshape(b, hk, g * tq, d), kp.transpose(-1, -2)).view(b, hq, tq, n) * call.scale
        s = s + log_mass[:, None, None, :]  # -inf for projected rows with no real key
        out, lse = attend_scores(s, vp)
        stats = {"projection_s": t1 - t0, "kernel_s": time.perf_counter() - t1}
        if call.want_stats:
            stats["density"] = n / tk if tk else 0.0  # every query scores n projected rows of tk keys
        return Result(out, lse, "linformer", stats)

    def _pool(self, k, v, real):
        """Mean of the real keys/values of ``proj`` contiguous segments → ``[B, Hkv, P, D]`` twice
        and ``log`` of each segment's real-key count ``[B, P]`` (-inf when it has none)."""
        b, hk, tk, d = k.shape
        n = min(self.proj, tk)
        seg = torch.arange(tk, device=k.device) * n // tk  # segment of each position, sizes differ by <= 1
        w = real[:, None, :, None]
        ks = torch.zeros(b, hk, n, d, device=k.device).index_add_(2, seg, k * w)
        vs = torch.zeros(b, hk, n, d, device=k.device).index_add_(2, seg, v * w)
        count = torch.zeros(b, n, device=k.device).index_add_(1, seg, real)
        denom = count.clamp(min=1.0)[:, None, :, None]
        return ks / denom, vs / denom, torch.log(count)

    def _random(self, k, v, real):
        """Seeded Gaussian ``E [P, Tk]`` (padded columns zeroed) applied to keys and values."""
        b, hk, tk, d = k.shape
        if self.proj > tk:
            raise ValueError(f"proj={self.proj} exceeds tokens_k={tk}: a random projection mixes the keys into at "
                             f"most as many independent rows as there are keys; use proj <= {tk} (or kind='pool', "
                             "which caps proj at tokens_k)")
        gen = torch.Generator().manual_seed(self.seed)
        e = (torch.randn(self.proj, tk, generator=gen, device=gen.device) / math.sqrt(max(tk, 1))).to(k.device)
        e = e[None] * real[:, None, :]  # [B, P, Tk]
        kp = torch.einsum("bpt,bhtd->bhpd", e, k)
        vp = torch.einsum("bpt,bhtd->bhpd", e, v)
        # a batch row with no real key sees nothing (output 0, LSE -inf)
        log_mass = torch.where(real.sum(-1, keepdim=True) > 0, 0.0, -math.inf).expand(b, self.proj)
        return kp, vp, log_mass
