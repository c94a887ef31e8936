"""The chunked and masked kernels never hold an N×N score matrix: peak memory of one call at
8k tokens stays far below the 2 GiB that 8 heads × 8192² float32 scores would take."""

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, sys, torch, longattn
from longattn import masks
torch.manual_seed(0)
n = int(sys.argv[1]); name = sys.argv[2]
q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
m = {
    "dense_chunked": lambda: longattn.method("dense_chunked"),
    "window": lambda: longattn.method("window", window=512, backend="tiled"),
    "streaming": lambda: longattn.method("streaming", sinks=64, window=512, backend="tiled"),
    "a_shape": lambda: longattn.method("pattern", mask=masks.a_shape(64, 512), backend="tiled"),
}[name]()
out = torch.empty_like(q)  # the output buffer is O(N) and allocated before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = longattn.attention(q, k, v, causal=True, method=m)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_extra_mib": (after - before) / 1024}))
"""


def peak_extra_mib(n: int, name: str) -> float:
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(n), name], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_mib"]


@pytest.mark.parametrize("name", ["dense_chunked", "window", "streaming", "a_shape"])
def test_no_quadratic_memory_at_8k(name):
    scores_mib = 8 * 8192 * 8192 * 4 / 2**20  # 2048 MiB
    extra = peak_extra_mib(8192, name)
    assert extra < scores_mib / 8, f"{name} used {extra:.0f} MiB extra at 8k tokens"
