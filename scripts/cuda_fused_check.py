"""``longattn.kernels.sdpa.fused_flash`` on a CUDA device against the float64 oracle: every dtype,
causal and not, additive masks with rows that see nothing, odd key counts (unaligned strides),
broadcast key heads, strided views, and gradients through out and LSE. Prints one line per case
and which torch kernel ran it (flash, memory-efficient, or the eager fallback), then a summary;
exits 1 when a case misses its tolerance.

    PYTHONPATH=src python scripts/cuda_fused_check.py [out.json]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from longattn.kernels import sdpa

#: relative error against float64 allowed per input dtype (bf16 operands land between 1e-3 and 1e-2)
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def reference(q, k, v, scale, causal, mask):
    """float64 ``(out, lse)``; rows that see nothing give 0 and -inf."""
    q, k, v = (t.double() for t in (q, k, v))
    s = q @ k.expand(q.shape[0], q.shape[1], -1, -1).transpose(-1, -2) * scale
    if mask is not None:
        s = s + mask.double()
    if causal:
        m, n = s.shape[-2:]
        s = s.masked_fill(torch.ones(m, n, dtype=torch.bool, device=s.device).triu(1), -math.inf)
    dead = torch.isneginf(s).all(-1, keepdim=True)
    safe = s.masked_fill(dead, 0.0)  # no NaN from an all -inf row, in values or gradients
    lse = torch.logsumexp(safe, -1, keepdim=True)
    out = (torch.exp(safe - lse) @ v.expand(q.shape[0], q.shape[1], -1, -1)).masked_fill(dead, 0.0)
    return out, lse.squeeze(-1).masked_fill(dead.squeeze(-1), -math.inf)


class Which:
    """Counts which private op ``fused_flash`` reached (by wrapping the ops it calls)."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self._saved = {}

    def __enter__(self):
        for name in ("_cuda_fused", "_eager_flash"):
            fn = getattr(sdpa, name)
            self._saved[name] = fn

            def wrapped(*a, _fn=fn, _name=name, **kw):
                self.counts[_name] = self.counts.get(_name, 0) + 1
                return _fn(*a, **kw)

            setattr(sdpa, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(sdpa, name, fn)


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    fin = torch.isfinite(b)
    if not bool(torch.equal(torch.isfinite(a), fin)):
        return math.inf
    return float((a[fin] - b[fin]).norm() / b[fin].norm().clamp_min(1e-30))


def case(dtype, causal, masked, n, *, kv_heads=4, strided=False, grad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    b, h, d = 2, 4, 64
    m = n if causal else 37
    q = torch.randn(b, h, m, d, device="cuda", generator=g, dtype=torch.float32)
    k = torch.randn(b, kv_heads, n + (5 if strided else 0), d, device="cuda", generator=g)
    v = torch.randn(b, kv_heads, n + (5 if strided else 0), d, device="cuda", generator=g)
    if strided:
        k, v = k[:, :, 5:], v[:, :, 5:]  # views with an offset start
    mask = None
    if masked:
        hidden = torch.rand(b, 1, m, n, device="cuda", generator=g) < 0.4
        hidden[0, 0, 3] = True  # a row that sees nothing
        mask = torch.zeros(hidden.shape, device="cuda").masked_fill(hidden, -math.inf)
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    if grad:
        qd, kd, vd = (t.detach().requires_grad_() for t in (qd, kd, vd))
    with Which() as which:
        out, lse = sdpa.fused_flash(qd, kd, vd, scale=0.125, causal=causal, attn_mask=mask)
    ref, ref_lse = reference(qd.detach(), kd.detach(), vd.detach(), 0.125, causal, mask)
    row = {"dtype": str(dtype).split(".")[-1], "causal": causal, "masked": masked, "n": n, "kv_heads": kv_heads,
           "strided": strided, "grad": grad, "ops": which.counts,
           "out_err": rel(out, ref), "lse_err": rel(lse, ref_lse)}
    tol = TOLERANCE[dtype]
    ok = row["out_err"] <= tol and row["lse_err"] <= tol
    if grad:
        go = torch.randn(out.shape, device="cuda", generator=g)
        gl = torch.randn(lse.shape, device="cuda", generator=g).masked_fill(torch.isinf(ref_lse), 0.0)
        got = torch.autograd.grad((out.float() * go).sum() + (lse.masked_fill(torch.isinf(lse), 0.0) * gl).sum(),
                                  (qd, kd, vd))
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (qd, kd, vd))
        r_out, r_lse = reference(q64, k64, v64, 0.125, causal, mask)
        want = torch.autograd.grad((r_out * go.double()).sum()
                                   + (r_lse.masked_fill(torch.isinf(r_lse), 0.0) * gl.double()).sum(), (q64, k64, v64))
        row["grad_err"] = max(rel(a, w) for a, w in zip(got, want))
        ok = ok and row["grad_err"] <= 4 * tol
    row["ok"] = ok
    return row


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for causal in (False, True):
            for masked in (False, True):
                for n in (64, 203):
                    rows.append(case(dtype, causal, masked, n))
        rows.append(case(dtype, False, True, 203, kv_heads=1))
        rows.append(case(dtype, True, False, 96, strided=True))
        rows.append(case(dtype, False, True, 77, grad=True))
        rows.append(case(dtype, True, False, 64, grad=True))
    for r in rows:
        print(json.dumps(r))
    bad = [r for r in rows if not r["ok"]]
    print(f"fused_flash on CUDA: {len(rows) - len(bad)}/{len(rows)} cases within tolerance")
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
