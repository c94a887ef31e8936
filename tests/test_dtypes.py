"""Half-precision inputs: the compute-dtype rule, every method's accuracy in bf16/fp16 on both
compute paths, and no conversion of more of a cache than a kernel reads."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import longattn
from longattn.core import dtypes
from longattn.kernels import native as native_kernels
from longattn.sparse.summaries import BlockSummaries

from conftest import CASES, full, make_qkv, oracle_for, reload_kernel

HALF = [torch.bfloat16, torch.float16]


# -- the rule ------------------------------------------------------------------------------------

def _features(monkeypatch, flags: set[str]) -> None:
    monkeypatch.setattr(dtypes, "cpu_features", lambda: frozenset(flags))


@pytest.mark.parametrize("flags, bf16, fp16", [
    (set(), torch.float32, torch.float32),
    ({"avx2", "fma3"}, torch.float32, torch.float32),  # Zen 3: bf16 matmul ~100x slower than fp32
    ({"avx512_f", "avx512_bf16", "avx512_fp16"}, torch.bfloat16, torch.float32),  # fp16 at the fp32 rate there
    ({"avx512_f", "amx_bf16", "amx_tile"}, torch.bfloat16, torch.float32),
    ({"avx512_f", "amx_bf16", "amx_fp16"}, torch.bfloat16, torch.float16),
])
def test_auto_rule_follows_cpu_features(monkeypatch, flags, bf16, fp16):
    _features(monkeypatch, flags)
    monkeypatch.delenv(dtypes.ENV, raising=False)
    assert dtypes.compute_dtype(torch.bfloat16, "cpu") == bf16
    assert dtypes.compute_dtype(torch.float16, "cpu") == fp16
    assert dtypes.compute_dtype(torch.float32, "cpu") == torch.float32
    assert dtypes.compute_dtype(torch.float64, "cpu") == torch.float32


def test_accelerators_compute_half_in_its_own_dtype(monkeypatch):
    _features(monkeypatch, set())
    monkeypatch.delenv(dtypes.ENV, raising=False)
    assert dtypes.compute_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert dtypes.compute_dtype(torch.float16, torch.device("cuda", 0)) == torch.float16
    assert dtypes.compute_dtype(torch.float32, "cuda") == torch.float32


def test_forcing_by_argument_and_environment(monkeypatch):
    _features(monkeypatch, set())
    monkeypatch.delenv(dtypes.ENV, raising=False)
    assert dtypes.compute_dtype(torch.bfloat16, "cpu", "input") == torch.bfloat16
    assert dtypes.compute_dtype(torch.bfloat16, "cpu", torch.bfloat16) == torch.bfloat16
    assert dtypes.compute_dtype(torch.float16, "cpu", torch.bfloat16) == torch.float32
    monkeypatch.setenv(dtypes.ENV, "input")
    assert dtypes.compute_dtype(torch.float16, "cpu") == torch.float16
    assert dtypes.compute_dtype(torch.float16, "cpu", "float32") == torch.float32  # the argument wins
    _features(monkeypatch, {"amx_bf16", "avx512_bf16"})
    monkeypatch.setenv(dtypes.ENV, "float32")
    assert dtypes.compute_dtype(torch.bfloat16, "cpu") == torch.float32
    assert dtypes.compute_dtype(torch.bfloat16, "cuda") == torch.float32


@pytest.mark.parametrize("bad", ["fp8", "half", torch.int8, torch.float64, 1])
def test_bad_choice_is_refused(bad):
    q, k, v = make_qkv(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        longattn.attention(q, k, v, compute_dtype=bad)


def test_bad_environment_is_refused(monkeypatch):
    monkeypatch.setenv(dtypes.ENV, "fast")
    q, k, v = make_qkv(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="LONGATTN_COMPUTE_DTYPE must be one of"):
        longattn.attention(q, k, v)


@pytest.mark.parametrize("flags, isa", [
    ({"avx2", "fma3"}, "AVX2"), ({"avx2", "avx512_f"}, "AVX-512"), ({"avx512_f", "avx512_bf16"}, "AVX-512+BF16"),
    ({"avx512_f", "avx512_bf16", "amx_bf16"}, "AMX"), (set(), "baseline"),
])
def test_isa_names_the_widest_matmul_unit(monkeypatch, flags, isa):
    _features(monkeypatch, flags)
    assert dtypes.cpu_isa() == isa


def test_cpu_features_agree_with_torch():
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith(("AVX2", "AVX512")):  # torch dispatches AVX2/AVX-512 kernels: the flags must say so
        assert "avx2" in dtypes.cpu_features()
        assert dtypes.cpu_isa() != "baseline"


# -- accuracy: within flash attention's own rule -------------------------------------------------

def _sdpa_error(q, k, v, mask, ref) -> float:
    """Max abs error of torch SDPA in the inputs' dtype against the float64 reference."""
    g = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)
    if mask is not None:
        out = torch.where(mask.any(-1, keepdim=True), out, 0.0)  # rows that see nothing: zeros, as ours
    return float((out.double() - ref).abs().max())


@pytest.mark.parametrize("mode", ["input", "float32"])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name, causal", CASES)
def test_every_method_in_half_precision(name, causal, dtype, mode):
    """Error against the float64 reference (on the rounded inputs) at most twice torch SDPA's in
    the same dtype, plus 1e-5, whichever compute path runs; the output keeps the input dtype."""
    m = full(name)
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=64, tk=64, d=16, dtype=dtype, seed=3)
    ref = oracle_for(m, q.double(), k.double(), v.double(), causal=causal)[0]
    vm = m.visible_mask(64, 64, causal)
    mask = None if vm is None else vm.dense(2, 4, 64, 64)
    bound = 2 * _sdpa_error(q, k, v, mask, ref) + 1e-5
    out, stats = longattn.attention(q, k, v, causal=causal, method=m, compute_dtype=mode, return_stats=True)
    assert out.dtype == dtype
    half_path = mode == "input" and m.capabilities.half_compute
    assert stats.compute_dtype == (str(dtype).removeprefix("torch.") if half_path else "float32")
    err = float((out.double() - ref).abs().max())
    assert err <= bound, f"{name}: error {err:.3g} > 2x SDPA's + 1e-5 = {bound:.3g} ({stats.compute_dtype})"


@pytest.mark.parametrize("name", ["dense", "window", "landmark", "quest"])
def test_half_compute_at_longer_lengths(name):
    """Several key chunks and query tiles (merged partial results) stay within the rule too."""
    kw = {"window": dict(window=700, block=64), "landmark": dict(budget=8192), "quest": dict(budget=8192)}
    m = longattn.method(name, **kw.get(name, {}))
    q, k, v = make_qkv(b=1, hq=4, hk=1, tq=1500, tk=1500, d=64, dtype=torch.bfloat16, seed=5)
    ref = oracle_for(m, q.double(), k.double(), v.double(), causal=True)[0]
    vm = m.visible_mask(1500, 1500, True)
    bound = 2 * _sdpa_error(q, k, v, vm.dense(1, 4, 1500, 1500), ref) + 1e-5
    out = longattn.attention(q, k, v, causal=True, method=m, compute_dtype="input")
    assert float((out.double() - ref).abs().max()) <= bound


def test_stats_name_the_compute_dtype():
    q, k, v = make_qkv()
    assert longattn.attention(q, k, v, return_stats=True)[1].compute_dtype == "float32"
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    assert longattn.attention(qb, kb, vb, return_stats=True, compute_dtype="input")[1].compute_dtype == "bfloat16"
    assert longattn.attention(qb, kb, vb, return_stats=True, compute_dtype="float32")[1].compute_dtype == "float32"
    # a method whose kernels are eager score paths computes half inputs in float32 and says so
    st = longattn.attention(qb, kb, vb, method="tokenselect", return_stats=True, compute_dtype="input")[1]
    assert st.compute_dtype == "float32"


# -- no conversion of more than is read ----------------------------------------------------------

class _CopyCounter(TorchDispatchMode):
    """Counts elements written by dtype conversions (``aten._to_copy``)."""

    def __init__(self):
        super().__init__()
        self.converted = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor):
            self.converted += out.numel()
        return out


@pytest.mark.parametrize("mode", ["float32", "input"])
@pytest.mark.parametrize("name", ["landmark", "quest"])
def test_decode_step_converts_only_what_it_reads(name, mode, monkeypatch):
    """A decode step over a bf16 cache with summaries kept converts the kept blocks at most, never
    the whole cache, on the native and on the gather path."""
    tokens, budget = 32768, 512
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=1, tk=tokens, d=32, dtype=torch.bfloat16, seed=1)
    m = longattn.method(name, budget=budget)
    summaries = BlockSummaries.build(k, m.block)
    ref = longattn.attention(q.float(), k.float(), v.float(), causal=True, method=m, summaries=summaries)
    for native in ("1", "0"):
        reload_kernel(monkeypatch, native_kernels.KERNEL)
        monkeypatch.setenv("LONGATTN_NATIVE", native)
        with _CopyCounter() as counter:
            out = longattn.attention(q, k, v, causal=True, method=m, summaries=summaries, compute_dtype=mode)
        read = 2 * budget * 4 * 32 + 1024  # kept keys and values per query head, and the query's few rows
        assert counter.converted <= read, f"converted {counter.converted} elements; the step reads {read}"
        assert counter.converted < k.numel() // 4
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


# -- the native decode kernel reads half caches as stored -----------------------------------------

native_missing = longattn.kernels.native.unavailable_reason()


@pytest.mark.cpu_only(reason="the native decode kernel takes CPU tensors")
@pytest.mark.skipif(native_missing is not None, reason=f"native kernel unavailable: {native_missing}")
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_native_decode_reads_half_cache_exactly(dtype):
    """Widening in the kernel equals converting the cache first (float32 arithmetic; the vector
    reduction order may differ by an ulp)."""
    from longattn.kernels import native

    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 1, 40, generator=g)
    cache_k = torch.randn(2, 2, 700, 48, generator=g).to(dtype)
    cache_v = torch.randn(2, 2, 700, 48, generator=g).to(dtype)
    k, v = cache_k[..., 4:44], cache_v[..., :40]  # views: strided rows, contiguous last dim
    cache_k[1, 0, 130, 10] = float("nan")  # block 2 of batch 1, kv head 0: only rows selecting it see it
    blocks = torch.tensor([[0, 3, 10], [1, -1, 2]]).repeat(2, 2, 1)[:, :, :3].contiguous()
    blocks[0, 1] = torch.tensor([10, 5, -1])
    out, lse = native.decode_blocks(q, k, v, blocks, 64, 0.125)
    ref_out, ref_lse = native.decode_blocks(q, k.float(), v.float(), blocks, 64, 0.125)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-6, equal_nan=True)
    # batch 1: head 1 selects block 2 (its kv head 0 holds the NaN key), head 0 does not
    assert torch.isnan(out[1, 1]).all() and torch.isfinite(out[1, 0]).all() and torch.isfinite(out[0]).all()
    # and the float64 reference for a row that selects ordinary blocks
    sel = torch.cat([torch.arange(0, 64), torch.arange(192, 256), torch.arange(640, 700)])
    r = longattn.reference_attention(q[:1, :1].double(), k[:1, :1, sel].double(), v[:1, :1, sel].double(),
                                     scale=0.125)[0]
    torch.testing.assert_close(out[:1, :1].double(), r, atol=2e-6, rtol=1e-5)


@pytest.mark.cpu_only(reason="the native decode kernel takes CPU tensors")
@pytest.mark.skipif(native_missing is not None, reason=f"native kernel unavailable: {native_missing}")
def test_hand_written_half_conversion_matches_the_compilers(tmp_path):
    """Compilers without ``_Float16`` take the kernel's own IEEE-half widening: build that variant
    and check it on normal, subnormal, infinite and NaN values."""
    import ctypes
    import subprocess
    from longattn.kernels import native

    src = native.source_with_headers("decode_blocks.c")  # with its vec8.h pasted in, as the build does
    c = tmp_path / "k.c"
    c.write_bytes(src)
    so = tmp_path / "k.so"
    cc = native._compiler()
    proc = subprocess.run([cc, *native.FLAGS, "-DLONGATTN_NO_FLOAT16", str(c), "-o", str(so), "-lm"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lib = ctypes.CDLL(str(so))
    fn = lib.decode_blocks
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 15 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    special = torch.tensor([6e-8, -6e-8, 3e-5, 65504.0, -2.0, 0.0, -0.0, 1.0], dtype=torch.float16)
    k = torch.randn(1, 1, 64, 8).to(torch.float16)
    v = torch.randn(1, 1, 64, 8).to(torch.float16)
    v[0, 0, 5] = special
    q = torch.zeros(1, 1, 1, 8)  # uniform weights: out is the mean of v, which shows every value read
    blocks = torch.zeros(1, 1, 1, dtype=torch.int64)
    outs = []
    for values in (v, torch.where(torch.arange(64)[:, None] == 9, float("inf"), v[0, 0]).view(1, 1, 64, 8).half()):
        out = torch.empty(1, 1, 1, 8)
        lse = torch.empty(1, 1, 1)
        assert fn(q.data_ptr(), k.data_ptr(), values.data_ptr(), blocks.data_ptr(), out.data_ptr(), lse.data_ptr(),
                  1, 1, 1, 8, 64, 64, 1, 8, 8, 512, 512, 8, 512, 512, 8, 1.0, 1, 2) == 0
        ref, _ = native.decode_blocks(q, k, values, blocks, 64, 1.0)
        torch.testing.assert_close(out, ref, atol=0, rtol=0, equal_nan=True)
        outs.append(out)
    assert torch.isinf(outs[1]).all()


@pytest.mark.parametrize("name", ["hip", "landmark", "xattention", "pbs", "anchor"])
def test_block_selection_with_half_queries_at_a_real_budget(name):
    """The selectors score in float32 when the queries arrive in bf16 (the fast compute path, as on
    a GPU) and the budget leaves them choosing: HiP's descent matmul'd bf16 queries with float32
    block means (a RuntimeError, found on an H200). The selection equals the float32 path's on
    the same rounded inputs, so the outputs differ by the half-precision kernels' rounding only."""
    m = longattn.method(name, budget=256, block=32, sinks=32, window=64, q_block=32)
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=1024, tk=1024, d=32, dtype=torch.bfloat16, seed=9)
    out, st = longattn.attention(q, k, v, causal=True, method=m, compute_dtype="input", return_stats=True)
    want, st32 = longattn.attention(q, k, v, causal=True, method=m, compute_dtype="float32", return_stats=True)
    assert st.compute_dtype == "bfloat16" and st32.compute_dtype == "float32"
    assert st.density < 0.5  # a real budget: blocks were chosen, not all kept
    torch.testing.assert_close(out.float(), want.float(), atol=3e-2, rtol=3e-2)
