"""Shared helpers: seeded inputs and the oracle comparison every method test starts from, and the
device the suite runs on (``LONGATTN_TEST_DEVICE``)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import longattn
from longattn import masks

torch.set_num_threads(2)

#: the device the tests run on, read once: ``LONGATTN_TEST_DEVICE=cuda pytest tests`` runs the same
#: suite on a GPU (default ``cpu``). Off the CPU, factory calls in tests land there
#: (``torch.set_default_device``) and tests marked ``cpu_only`` are skipped.
DEVICE = torch.device(os.environ.get("LONGATTN_TEST_DEVICE", "cpu"))
ON_CPU = DEVICE.type == "cpu"


class SeededDrawsOnTheHost(TorchFunctionMode):
    """A factory call given a ``generator=`` and no ``device=`` draws on the generator's device (the
    tests' generators are CPU ones) and moves the result to ``device``: seeded tests see the same
    numbers on every device, where torch would refuse a CPU generator for a CUDA draw. Installed
    for the whole session when the test device is not the CPU."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gen = kwargs.get("generator")
        if gen is not None and kwargs.get("device") is None and func in _device_constructors():
            return func(*args, **{**kwargs, "device": gen.device}).to(self.device)
        return func(*args, **kwargs)


if not ON_CPU:
    torch.set_default_device(DEVICE)
    SeededDrawsOnTheHost(DEVICE).__enter__()  # stays on torch's mode stack for the session


def pytest_collection_modifyitems(config, items):
    """Off the CPU, skip the tests marked ``cpu_only`` (the marker's ``reason`` says why)."""
    if ON_CPU:
        return
    for item in items:
        mark = item.get_closest_marker("cpu_only")
        if mark is not None:
            why = mark.kwargs.get("reason") or (mark.args[0] if mark.args else "inherently CPU-only")
            item.add_marker(pytest.mark.skip(reason=f"CPU-only: {why} (LONGATTN_TEST_DEVICE={DEVICE})"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The test device (``LONGATTN_TEST_DEVICE``, default cpu)."""
    return DEVICE


#: the modules that choose one of torch's fused kernels where ``longattn.kernels.sdpa`` says one runs
FUSED_USERS = ("longattn.kernels.sdpa", "longattn.kernels.tiled", "longattn.sparse.kernel", "longattn.sparse.decode",
               "longattn.methods.longheads", "longattn.methods.recycled")


def without_fused_kernels(monkeypatch) -> None:
    """Report torch's fused kernels (CPU and CUDA) unavailable everywhere longattn asks: the paths
    a device or build without them takes (eager matmul + softmax where the fused op would run)."""
    import importlib

    for name in FUSED_USERS:
        module = importlib.import_module(name)
        for probe in ("fused_available", "fused_cpu_available", "fused_cuda_available"):
            if hasattr(module, probe):
                monkeypatch.setattr(module, probe, lambda q: False)


def make_qkv(b=2, hq=4, hk=2, tq=64, tk=64, d=16, dtype=torch.float32, seed=0):
    """Seeded ``q, k, v`` on the test device: drawn on the CPU (the same numbers on every device)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g, device=g.device).to(DEVICE, dtype)
    k = torch.randn(b, hk, tk, d, generator=g, device=g.device).to(DEVICE, dtype)
    v = torch.randn(b, hk, tk, d, generator=g, device=g.device).to(DEVICE, dtype)
    return q, k, v


def oracle_for(method, q, k, v, *, causal, key_padding_mask=None, scale=None):
    """Reference output/LSE on the exact mask the method claims to attend with."""
    m = longattn.method(method) if isinstance(method, str) else method
    b, hq, tq = q.shape[:3]
    tk = k.shape[2]
    vm = m.visible_mask(tq, tk, causal)
    mask = None if vm is None else vm.dense(b, hq, tq, tk)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]
        mask = pad if mask is None else mask & pad
    return longattn.reference_attention(q, k, v, causal=False, mask=mask, scale=scale)


def reload_kernel(monkeypatch, kernel, lib=None) -> None:
    """Make a native ``LazyKernel`` (``longattn.kernels.native*.KERNEL``) load again on its next
    use, under whatever the test set up (``LONGATTN_NATIVE``, the cache folder, the compiler) — or,
    given ``lib`` (a library already bound), use that one. Undone after the test."""
    monkeypatch.setattr(kernel, "lib", lib)
    monkeypatch.setattr(kernel, "reason", None)
    monkeypatch.setattr(kernel, "loaded", lib is not None)


def rel_rmse(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMSE of ``a`` against ``ref`` in float64 (flash-linear-attention's error measure)."""
    a, ref = a.double(), ref.double()
    return ((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-300)).item()


def assert_close_scaled(a: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    """The recurrent ops' agreement rule: same shape, finite, max abs error <= ``tol`` on the scale
    of the reference (``max(1, max|ref|)``) and relative RMSE <= ``tol``."""
    assert a.shape == ref.shape, (tuple(a.shape), tuple(ref.shape))
    assert torch.isfinite(a).all(), "non-finite values"
    if not ref.numel():
        return
    err = (a.double() - ref.double()).abs().max().item()
    scale = max(1.0, ref.double().abs().max().item())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:g} * {scale:.3g}"
    assert rel_rmse(a, ref) <= tol, f"relative RMSE {rel_rmse(a, ref):.3g} > {tol:g}"


def assert_close_to_oracle(out, ref, *, atol=2e-5, rtol=1e-4):
    assert not torch.isnan(out).any(), "output has NaN"
    torch.testing.assert_close(out.to(torch.float64), ref, atol=atol, rtol=rtol)


#: log-gate draws for the recurrent ops: near 0 (almost no forgetting), strongly negative (−2.5 …
#: −5 per step) and per-channel mixed (−exp(N(0, 2)): from ~−0.002 to ~−50 within one head)
GATES = ("near0", "strong", "mixed")


def draw_gate(shape, level, g):
    """A float64 log gate of ``shape`` at one of ``GATES`` (or "grad": away from 0, so gradcheck's
    perturbations stay in range)."""
    if level == "near0":
        return -0.01 * torch.rand(shape, generator=g, dtype=torch.float64)
    if level == "strong":
        return -2.5 - 2.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    if level == "mixed":
        return -torch.exp(2.0 * torch.randn(shape, generator=g, dtype=torch.float64))
    if level == "grad":
        return -0.1 - 1.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    raise AssertionError(level)


@pytest.fixture
def qkv():
    return make_qkv()


@pytest.fixture(scope="module")
def stories():
    """stories260K as ``(LlamaForCausalLM, tokenizer)`` through ``longattn.hf.load_llama2c``, one
    per test module (tests switch its attention); the model ships with the package, so this never
    skips for want of it (only without transformers)."""
    pytest.importorskip("transformers")
    import longattn.hf as hf

    model, tok = hf.load_llama2c()
    return model.to(DEVICE), tok


# -- every registered method at a configuration that is exact on small inputs ------------------

SMALL_BLOCKS = dict(block=16, q_block=16, sinks=16, window=16)

#: every registered method, configured so that on inputs of <= 64 tokens it is exact (full budget)
FULL: dict[str, dict] = {
    "anchor": dict(budget=4096, theta=float("inf"), **SMALL_BLOCKS),
    "block_oracle": dict(budget=4096, **SMALL_BLOCKS),
    "cca": dict(group=1, window=4, chunk=32),
    "dense": {},
    "dense_chunked": dict(chunk=16, block=8),
    "dsa_indexer": dict(budget=4096),
    "flexprefill": dict(budget=4096, gamma=1.0, **SMALL_BLOCKS),  # gamma < 1 may stop short of every block
    "hip": dict(budget=4096, **SMALL_BLOCKS),
    "hyper": dict(block=128, samples=8, min_seq=128),
    "infllm": dict(budget=4096, **SMALL_BLOCKS),
    "landmark": dict(budget=4096, **SMALL_BLOCKS),
    # one block longer than every test input: the grouped softmax is then causal softmax
    "landmark_trained": dict(block=256),
    "linformer": dict(proj=500),
    "loki": dict(budget=4096, rank_dims=16),
    "longheads": dict(window=512, chunk=16, local=16),
    "minference": dict(budget=4096, block=16, sinks=16, window=16, last_q=16),
    "moba": dict(block=16, top_k=64, q_block=16),
    # every block selected and only the selected branch on: dense attention
    "nsa": dict(block=16, top_n=64, local=1, compress_block=8, compress_stride=4, window=4, q_block=16,
                gates=(0.0, 1.0, 0.0)),
    "pattern": dict(mask=masks.a_shape(4, 12), block=8),
    "pbs": dict(budget=4096, segment=32, **SMALL_BLOCKS),
    "quest": dict(budget=4096, **SMALL_BLOCKS),
    "recycled": dict(stride=4, budget=4096),
    "routing": dict(clusters=1, chunk=32),
    "shaw": {},  # zero relative embeddings: softmax attention
    "lowrank_mha": {},  # the query as context, U = V = I: softmax attention
    "streaming": dict(sinks=4, window=12, block=8),
    "head_windows": dict(windows=(12,), sinks=4, block=8),
    "tokenselect": dict(budget=4096),
    "window": dict(window=9, block=8),
    "xattention": dict(budget=4096, threshold=1.0, **SMALL_BLOCKS),
}


def full(name: str):
    return longattn.method(name, **FULL[name])


def causal_modes(name: str) -> list[bool]:
    caps = longattn.method(name, **FULL[name]).capabilities
    return [c for c, ok in ((True, caps.causal), (False, caps.non_causal)) if ok]


CASES = [(n, c) for n in sorted(FULL) for c in causal_modes(n)]
