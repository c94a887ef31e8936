"""Every registered method on a CUDA device, against the float64 oracle on the CPU: forward,
gradients, and NaN in padding keys. A survey for the device-agnostic work (it asserts nothing;
it prints one line per case and writes the table as JSON).

    PYTHONPATH=src python scripts/cuda_check.py [out.json]
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import longattn  # noqa: E402
from conftest import CASES, full, make_qkv, oracle_for  # noqa: E402


def run_case(name: str, causal: bool, device: str) -> dict:
    m = full(name)
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=40, tk=40, d=16, seed=3)
    row: dict = {"method": name, "causal": causal}
    ref, _ = oracle_for(m, q, k, v, causal=causal)
    qd, kd, vd = (t.to(device).requires_grad_() for t in (q, k, v))
    t0 = time.perf_counter()
    try:
        out, stats = longattn.attention(qd, kd, vd, causal=causal, method=m, return_stats=True)
        row["path"] = stats.path
        row["device_out"] = out.device.type
        row["forward_err"] = float((out.detach().cpu().double() - ref).abs().max())
    except Exception as exc:  # a survey: record what broke
        row["forward_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        row["where"] = traceback.extract_tb(exc.__traceback__)[-1].filename.split("src/")[-1]
        return row
    try:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(out, (qd, kd, vd), g.to(device))
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        want = torch.autograd.grad(oracle_for(m, q64, k64, v64, causal=causal)[0], (q64, k64, v64), g.double())
        row["grad_err"] = max(float((a.cpu().double() - b).abs().max()) for a, b in zip(grads, want))
    except Exception as exc:
        row["grad_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    try:
        pad = torch.ones(2, 40, dtype=torch.bool)
        pad[1, :7] = False
        kb = k.clone()
        kb[1, :, :7] = math.nan
        with torch.no_grad():
            o = longattn.attention(q.to(device), kb.to(device), v.to(device), causal=causal, method=m,
                                   key_padding_mask=pad.to(device))
        want = oracle_for(m, q, k, v, causal=causal, key_padding_mask=pad)[0]
        row["nan_padding_err"] = float((o.cpu().double() - want).abs().max())
    except Exception as exc:
        row["nan_padding_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    row["time_s"] = round(time.perf_counter() - t0, 3)
    return row


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    rows = []
    for name, causal in CASES:
        row = run_case(name, causal, device)
        rows.append(row)
        print(json.dumps(row))
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps({"torch": torch.__version__, "device": device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
