"""The sparse suite's 32k prefill and 128k decode tables on a CUDA device, float32 and bf16, each
against torch SDPA in the same dtype and run (``longattn.bench.sparse_speed``). Writes the
records as JSON and prints one line per record.

    PYTHONPATH=src python scripts/cuda_sparse_speed.py out.json [tokens] [cache]

(``LONGATTN_BENCH_DEVICE=cpu`` runs it on the CPU, to try it small.)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from longattn.bench import harness, sparse_speed


def main() -> None:
    out = Path(sys.argv[1])
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
    cache = int(sys.argv[3]) if len(sys.argv) > 3 else 131072
    device = harness.use_device(os.environ.get("LONGATTN_BENCH_DEVICE", "cuda"))
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    records = []

    def keep(rec):
        records.append(rec)
        out.write_text(json.dumps(records, indent=1))  # partial results survive a timeout
        print(json.dumps({k: rec.get(k) for k in ("part", "dtype", "method", "density", "recall", "rel_err",
                                                      "median_s", "step_s", "ratio_to_sdpa", "compute_dtype",
                                                      "path_detail", "status")}), flush=True)

    for dtype in ("bfloat16", "float32"):
        t0 = time.perf_counter()
        for rec in sparse_speed.run_prefill(tokens, 0.10, dtype=dtype):
            keep({"part": "prefill", **rec})
        print(f"prefill {dtype}: {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        for rec in sparse_speed.run_decode(cache, 2048, dtype=dtype):
            keep({"part": "decode", **rec})
        print(f"decode {dtype}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
