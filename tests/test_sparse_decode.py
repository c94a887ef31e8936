"""The lean decoding path of block retrieval equals the general selector + kernel."""

import platform

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import longattn
from longattn.kernels import native
from longattn.sparse import decode
from longattn.sparse.summaries import BlockSummaries
from conftest import make_qkv, reload_kernel


def general(monkeypatch, q, k, v, m, summaries=None):
    with monkeypatch.context() as mp:
        mp.setattr(decode, "applies", lambda *a, **kw: False)
        return longattn.attention(q, k, v, causal=True, method=m, return_stats=True, summaries=summaries)


def kernel_mode(monkeypatch, kernel):
    """Force the decode step's kernel: "native" (skipped where it cannot be built) or "gather"."""
    if kernel == "native":
        reason = native.unavailable_reason()
        if reason is not None:
            pytest.skip(f"native decode kernel unavailable: {reason}")
    else:
        monkeypatch.setattr(native, "decode_blocks_applies", lambda *a, **kw: False)


@pytest.mark.cpu_only(reason="the lean decode path runs on CPU tensors (torch's fused CPU kernel, the native one)")
@pytest.mark.parametrize("kernel", ["native", "gather"])
@pytest.mark.parametrize("name", ["landmark", "quest"])
@pytest.mark.parametrize("tk,sinks,window,budget", [(300, 16, 32, 96), (257, 0, 0, 64), (512, 20, 40, 160),
                                                    (100, 16, 16, 112), (64, 16, 16, 96)])
def test_decode_path_equals_general_path(monkeypatch, kernel, name, tk, sinks, window, budget):
    kernel_mode(monkeypatch, kernel)
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=1, tk=tk, d=16, seed=tk)
    m = longattn.method(name, budget=budget, block=16, q_block=1, sinks=sinks, window=window)
    summaries = BlockSummaries.build(k, 16)
    out, st = longattn.attention(q, k, v, causal=True, method=m, return_stats=True, summaries=summaries)
    assert st.extra.get("path_detail") == f"decode ({kernel})"
    ref, ref_st = general(monkeypatch, q, k, v, m, summaries)
    assert "path_detail" not in ref_st.extra
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(st.lse, ref_st.lse, atol=2e-6, rtol=1e-5)
    assert torch.equal(st.extra["selected_blocks"], ref_st.extra["selected_blocks"])
    assert st.density == pytest.approx(ref_st.density)


def test_decode_path_at_full_budget_is_exact_and_follows_appended_keys():
    q, k, v = make_qkv(b=1, hq=4, hk=4, tq=1, tk=200, d=16, seed=3)
    m = longattn.method("landmark", budget=208, block=16, q_block=1, sinks=16, window=16)
    out = longattn.attention(q, k, v, causal=True, method=m)
    ref, _ = longattn.reference_attention(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    # a decode loop keeps the summaries current by appending; the result matches rebuilt ones
    s = BlockSummaries.build(k[:, :, :190], 16)
    s.append(k[:, :, 190:])
    small = longattn.method("landmark", budget=64, block=16, q_block=1, sinks=16, window=16)
    a = longattn.attention(q, k, v, causal=True, method=small, summaries=s)
    b = longattn.attention(q, k, v, causal=True, method=small)
    torch.testing.assert_close(a, b)


def test_forced_ranges_match_the_general_rule():
    from longattn.sparse.select import forced_block_grid

    for tk, bs, sinks, window in [(300, 16, 16, 32), (257, 16, 0, 0), (64, 16, 40, 100), (1000, 64, 64, 256)]:
        n = -(-tk // bs)
        j = torch.arange(n)
        grid = forced_block_grid(torch.tensor([[tk - 1]]), torch.tensor([[tk - 1]]), (j * bs)[None], (j * bs + bs - 1)[None],
                                 sinks, window, True)[0]
        n_sink, w0 = decode.forced_ranges(tk, bs, sinks, window)
        expect = (j < n_sink) | (j >= w0)
        assert torch.equal(grid, expect), (tk, bs, sinks, window)


def test_reused_gather_buffers_never_alias_results_or_break_autograd():
    """Steps gather into one per-thread buffer: an earlier step's output must not change when a
    later step (of another size) reuses it, and under autograd the step must still give grads."""
    m = longattn.method("landmark", budget=64, block=16, q_block=1, sinks=16, window=16)
    q1, k1, v1 = make_qkv(b=1, hq=4, hk=2, tq=1, tk=300, d=16, seed=5)
    first = longattn.attention(q1, k1, v1, causal=True, method=m)
    kept = first.clone()
    q2, k2, v2 = make_qkv(b=2, hq=4, hk=2, tq=1, tk=500, d=16, seed=6)
    wide = longattn.method("landmark", budget=128, block=16, q_block=1, sinks=16, window=16)
    longattn.attention(q2, k2, v2, causal=True, method=wide)
    assert torch.equal(first, kept)
    again = longattn.attention(q1, k1, v1, causal=True, method=m)
    assert torch.equal(again, kept)
    k1g = k1.clone().requires_grad_(True)
    out = longattn.attention(q1, k1g, v1, causal=True, method=m)
    torch.testing.assert_close(out.detach(), kept)
    out.sum().backward()
    assert k1g.grad is not None and torch.isfinite(k1g.grad).all() and k1g.grad.abs().sum() > 0


def test_gather_tokens_into_buffers_equals_fresh_gather():
    from longattn.kernels.eager import gather_tokens

    _, k, v = make_qkv(b=2, hq=4, hk=2, tq=1, tk=50, d=8, seed=1)
    pos = torch.randint(0, 50, (2, 4, 3, 7), generator=torch.Generator().manual_seed(0))
    bufs = (torch.full((2000,), float("nan")), torch.full((2000,), float("nan")))
    a = gather_tokens(k, v, pos)
    b = gather_tokens(k, v, pos, out=bufs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert b[0].data_ptr() == bufs[0].data_ptr()


# -- the native decode kernel (longattn.kernels.native) ----------------------------------------


def blocks_reference(q, k, v, blocks, bs, scale):
    """float64 attention of each query head over the tokens of its listed blocks."""
    b, hq, _, d = q.shape
    hk, t = k.shape[1], k.shape[2]
    out = torch.zeros(b, hq, 1, d, dtype=torch.float64)
    lse = torch.full((b, hq, 1), float("-inf"), dtype=torch.float64)
    for i in range(b):
        for h in range(hq):
            pos = [p for j in blocks[i, h].tolist() if j >= 0 for p in range(j * bs, min(j * bs + bs, t))]
            if not pos:
                continue
            kk = k[i, h // (hq // hk), pos].double()
            vv = v[i, h // (hq // hk), pos].double()
            s = (kk @ q[i, h, 0].double()) * scale
            lse[i, h, 0] = torch.logsumexp(s, 0)
            out[i, h, 0] = torch.softmax(s, 0) @ vv
    return out, lse


@pytest.mark.cpu_only(reason="the native decode kernel takes CPU tensors")
def test_native_decode_blocks_equals_float64_reference():
    if native.unavailable_reason() is not None:
        pytest.skip(f"native decode kernel unavailable: {native.unavailable_reason()}")
    g = torch.Generator().manual_seed(0)
    big_k = torch.randn(2, 3, 2, 150, 40, generator=g)  # a view into a larger cache: strided, not contiguous
    big_v = torch.randn(2, 3, 2, 150, 40, generator=g)
    k, v = big_k[:, 1, :, :137], big_v[:, 2, :, :137]
    assert not k.is_contiguous()
    q = torch.randn(2, 6, 1, 40, generator=g) * 3
    bs = 16  # 9 blocks, the last holds 9 tokens
    blocks = torch.tensor([[[0, 3, 8], [2, -1, 5], [-1, -1, -1], [8, -1, 1], [4, 5, 6], [7, 0, -1]],
                           [[1, 2, 3], [8, 7, 6], [0, -1, -1], [5, 4, -1], [-1, 8, -1], [3, 6, 0]]])
    out, lse = native.decode_blocks(q, k, v, blocks, bs, 0.2)
    ref, ref_lse = blocks_reference(q, k, v, blocks, bs, 0.2)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    live = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[live], ref_lse[live], atol=1e-5, rtol=1e-5)
    # a row with no block: zeros and -inf, never NaN
    assert torch.isneginf(lse[0, 2]).all() and (out[0, 2] == 0).all()
    assert torch.isfinite(out).all()


@pytest.mark.cpu_only(reason="the native decode kernel takes CPU tensors")
def test_native_decode_blocks_rejects_bad_input():
    if native.unavailable_reason() is not None:
        pytest.skip(f"native decode kernel unavailable: {native.unavailable_reason()}")
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=1, tk=64, d=8, seed=0)
    good = torch.zeros(1, 4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="cache has 4 blocks"):
        native.decode_blocks(q, k, v, good + 4, 16, 1.0)
    with pytest.raises(ValueError, match="blocks must be"):
        native.decode_blocks(q, k, v, good[:, :2], 16, 1.0)
    with pytest.raises(ValueError, match="float32"):
        native.decode_blocks(q.double(), k.double(), v.double(), good, 16, 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        native.decode_blocks(q, k[..., :4].contiguous(), v[..., :4].contiguous(), good, 16, 1.0)


@pytest.mark.cpu_only(reason="the native decode kernel takes CPU tensors")
def test_without_the_native_kernel_decoding_keeps_its_torch_path(monkeypatch, tmp_path):
    """LONGATTN_NATIVE=0 (or no compiler) leaves the gather path: same result, reason stated."""
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=1, tk=300, d=16, seed=2)
    m = longattn.method("quest", budget=96, block=16, q_block=1, sinks=16, window=32)
    with_native = longattn.attention(q, k, v, causal=True, method=m)
    reload_kernel(monkeypatch, native.KERNEL)
    monkeypatch.setenv("LONGATTN_NATIVE", "0")
    assert native.unavailable_reason() == "disabled by LONGATTN_NATIVE=0"
    out, st = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    assert st.extra["path_detail"] == "decode (gather)"
    torch.testing.assert_close(out, with_native, atol=2e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="LONGATTN_NATIVE=0"):
        native.decode_blocks(q, k, v, torch.zeros(1, 4, 1, dtype=torch.long), 16, 1.0)
    # no compiler: the reason names what is missing
    reload_kernel(monkeypatch, native.KERNEL)
    monkeypatch.delenv("LONGATTN_NATIVE")
    monkeypatch.setenv("LONGATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert "no C compiler" in native.unavailable_reason()


@pytest.mark.cpu_only(reason="the native decode kernel takes CPU tensors")
def test_native_kernel_builds_into_the_cache_dir(monkeypatch, tmp_path):
    import shutil

    if native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    reload_kernel(monkeypatch, native.KERNEL)
    monkeypatch.setenv("LONGATTN_CACHE_DIR", str(tmp_path))
    assert native.unavailable_reason() is None, native.unavailable_reason()
    built = list((tmp_path / "native").glob("decode_blocks-*.so"))
    assert len(built) == 1 and not list((tmp_path / "native").glob("*.c"))
    assert shutil.which(native._compiler()) is not None


# -- the vectorised native kernel's edges: head-dim tails, short blocks, half caches, strides, NaN --

needs_native = pytest.mark.skipif(native.unavailable_reason() is not None,
                                  reason=f"native decode kernel unavailable: {native.unavailable_reason()}")
KV_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def strided_cache(g, b, hk, t, d, dtype, pad):
    """k, v ``[b, hk, t, d]`` of ``dtype`` as views into larger caches: with ``pad`` the token stride
    is ``d + pad`` (rows not adjacent) and the view starts ``pad`` elements into each row."""
    big_k = torch.randn(b, hk, t + 1, d + pad, generator=g).to(dtype)
    big_v = torch.randn(b, hk, t + 1, d + pad, generator=g).to(dtype)
    k, v = big_k[:, :, :t, pad:], big_v[:, :, 1:, :d]
    assert k.stride(-1) == 1 and (pad == 0 or k.stride(2) == d + pad)
    return k, v


def random_blocks(g, b, hq, n_blocks, n_sel, p_unused=0.25):
    """unique block indices per row in random order, some slots -1 (never all of them)"""
    out = torch.full((b, hq, n_sel), -1, dtype=torch.long)
    for i in range(b):
        for h in range(hq):
            take = min(n_sel, n_blocks)
            row = torch.randperm(n_blocks, generator=g)[:take]
            keep = torch.rand(take, generator=g) >= p_unused
            keep[0] = True
            out[i, h, :take] = torch.where(keep, row, -1)
            out[i, h] = out[i, h][torch.randperm(n_sel, generator=g)]
    return out


def assert_matches_reference(q, k, v, blocks, bs, scale, out, lse):
    ref, ref_lse = blocks_reference(q, k, v, blocks, bs, scale)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, equal_nan=True)
    live = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[live], ref_lse[live], atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


@pytest.mark.cpu_only(reason="the native decode kernel takes CPU tensors")
@needs_native
@pytest.mark.parametrize("dtype", KV_DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("d", [1, 3, 8, 17, 24, 40, 64, 72, 80, 88, 128, 136])
def test_native_decode_head_dim_tails_and_short_blocks(dtype, d):
    """Every head_dim layout the kernel splits differently (scalar tail only, one vector, bf16
    even/odd pairs, a lone natural vector after them, a second 64-dim panel) against float64, with
    blocks whose length is not a multiple of 8 (bs = 20), a short last block (T = 151), unused slots,
    GQA and a strided token axis."""
    g = torch.Generator().manual_seed(d)
    b, hq, hk, t, bs = 2, 6, 2, 151, 20
    k, v = strided_cache(g, b, hk, t, d, dtype, pad=5)
    q = torch.randn(b, hq, 1, d, generator=g) * 2
    blocks = random_blocks(g, b, hq, -(-t // bs), 5)
    blocks[0, 0] = torch.tensor([7, -1, 3, -1, 0])  # block 7 holds the 11 tokens 140..150
    out, lse = native.decode_blocks(q, k, v, blocks, bs, 0.3)
    assert_matches_reference(q, k, v, blocks, bs, 0.3, out, lse)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.cpu_only(reason="the native decode kernel takes CPU tensors")
@needs_native
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), hk=st.integers(1, 2), grp=st.integers(1, 3), d=st.integers(1, 140),
       t=st.integers(1, 300), bs=st.integers(1, 80), n_sel=st.integers(0, 6), pad=st.sampled_from([0, 3]),
       dtype=st.sampled_from(KV_DTYPES), scale=st.sampled_from([0.05, 0.3, 2.0]), seed=st.integers(0, 2 ** 16))
def test_property_native_decode_equals_float64_reference(b, hk, grp, d, t, bs, n_sel, pad, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    hq = hk * grp
    k, v = strided_cache(g, b, hk, t, d, dtype, pad)
    q = torch.randn(b, hq, 1, d, generator=g)
    blocks = random_blocks(g, b, hq, -(-t // bs), n_sel) if n_sel else torch.zeros(b, hq, 0, dtype=torch.long)
    out, lse = native.decode_blocks(q, k, v, blocks, bs, scale)
    assert_matches_reference(q, k, v, blocks, bs, scale, out, lse)


@pytest.mark.cpu_only(reason="the native decode kernel takes CPU tensors")
@needs_native
@pytest.mark.parametrize("dtype", KV_DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("d", [3, 17, 64, 80])
def test_native_decode_nan_and_minus_inf_blocks(dtype, d):
    """A NaN in one key (at any head dim, the scalar tail included) makes exactly the rows that
    select its block NaN, out and lse; a NaN value only its own output dim. Blocks scoring -inf
    everywhere add nothing, before or after finite ones; a row of nothing else gives 0 and -inf."""
    g = torch.Generator().manual_seed(d)
    b, hq, hk, t, bs = 1, 8, 2, 100, 16  # 7 blocks, the last holds 4 tokens
    k, v = strided_cache(g, b, hk, t, d, dtype, pad=2)
    q = torch.rand(b, hq, 1, d, generator=g) + 0.1  # positive: a key row of -inf scores -inf
    k[0, 0, 16:32] = float("-inf")  # kv head 0, block 1
    k[0, 0, 97] = float("-inf")  # and block 6 (short): all of it
    k[0, 0, 96], k[0, 0, 98], k[0, 0, 99] = float("-inf"), float("-inf"), float("-inf")
    k[0, 1, 37, d - 1] = float("nan")  # kv head 1, block 2, last head dim
    v[0, 1, 70, d // 2] = float("nan")  # kv head 1, block 4: one value
    blocks = torch.tensor([[[1, 0, 3], [0, 1, -1], [1, 6, -1], [-1, 6, 1],  # kv head 0
                            [2, 0, 5], [0, 5, 2], [0, 5, 6], [4, -1, 1]]])  # kv head 1
    out, lse = native.decode_blocks(q, k, v, blocks, bs, 0.5)
    ref, ref_lse = blocks_reference(q, k, v, blocks, bs, 0.5)
    for h in (0, 1):  # -inf blocks skipped, wherever they come
        torch.testing.assert_close(out[0, h].double(), ref[0, h], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[0, h].double(), ref_lse[0, h], atol=1e-5, rtol=1e-5)
    for h in (2, 3):  # every key scores -inf: "saw no keys"
        assert (out[0, h] == 0).all() and torch.isneginf(lse[0, h]).all()
    for h in (4, 5):  # the NaN key's block: the whole row NaN
        assert torch.isnan(out[0, h]).all() and torch.isnan(lse[0, h]).all()
    torch.testing.assert_close(out[0, 6].double(), ref[0, 6], atol=1e-5, rtol=1e-5)
    nan_dim = torch.arange(d) == d // 2  # the NaN value: its dim only, lse finite
    assert torch.isnan(out[0, 7, 0, nan_dim]).all() and torch.isfinite(lse[0, 7]).all()
    torch.testing.assert_close(out[0, 7, 0, ~nan_dim].double(), ref[0, 7, 0, ~nan_dim], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[0, 7].double(), ref_lse[0, 7], atol=1e-5, rtol=1e-5)


@pytest.mark.cpu_only(reason="the native decode kernel takes CPU tensors")
@needs_native
def test_native_decode_exp_is_accurate_to_a_float32_ulp():
    """The decode kernel's polynomial exp over the range it is used on (x <= 0): relative error
    under 1.5e-7, exactly 0 for -inf and deep underflow, 1 at 0, NaN kept."""
    import ctypes

    fn = native.KERNEL.lib.decode_blocks_exp
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    x = torch.cat([torch.linspace(-87.0, 0.0, 1_000_001), -torch.rand(100_000) * 1e-3,
                   torch.tensor([0.0, -0.0, -88.0, -100.0, -1e30, float("-inf"), float("nan")])])
    y = torch.empty_like(x)
    fn(x.data_ptr(), y.data_ptr(), x.numel() - 3)  # a tail shorter than a vector too
    fn(x[-3:].data_ptr(), y[-3:].data_ptr(), 3)
    ref = torch.exp(x.double())
    body = x > -87.0
    assert float(((y.double() - ref).abs() / ref)[body].max()) < 1.5e-7
    assert y[-7:-1].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0] and bool(torch.isnan(y[-1]))


@pytest.mark.cpu_only(reason="the native decode kernel takes CPU tensors")
@needs_native
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 flags")
def test_native_decode_portable_build_without_avx(tmp_path):
    """The source's generic branches (no AVX / F16C / FMA: the portable max, element-wise fp16
    widening, vectors lowered to SSE) built and checked against float64 too."""
    import ctypes
    import subprocess
    cc = native._compiler()
    src = tmp_path / "decode_blocks.c"
    src.write_bytes(native.source_with_headers("decode_blocks.c"))  # with its vec8.h, as the build does
    so = tmp_path / "decode_blocks_portable.so"
    flags = ["-O2", "-mno-avx", "-mno-avx2", "-mno-fma", "-mno-f16c", "-fopenmp", "-std=gnu11", "-shared", "-fPIC"]
    proc = subprocess.run([cc, *flags, str(src), "-o", str(so), "-lm"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    fn = ctypes.CDLL(str(so)).decode_blocks
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 15 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    g = torch.Generator().manual_seed(5)
    for dtype in KV_DTYPES:
        for d in (3, 24, 72):
            b, hq, hk, t, bs = 1, 4, 2, 90, 16
            k, v = strided_cache(g, b, hk, t, d, dtype, pad=3)
            k[0, 1, 40, 0] = float("nan")  # kv head 1, block 2
            q = torch.randn(b, hq, 1, d, generator=g)
            blocks = torch.tensor([[[0, 5, -1], [3, -1, 1], [2, 4, -1], [5, 1, 0]]])
            out, lse = torch.empty(b, hq, 1, d), torch.empty(b, hq, 1)
            assert fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), blocks.data_ptr(), out.data_ptr(), lse.data_ptr(),
                      b, hq, hk, d, t, bs, 3, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
                      v.stride(0), v.stride(1), v.stride(2), 0.4, 2, native.DTYPE_CODES[dtype]) == 0
            assert_matches_reference(q, k, v, blocks, bs, 0.4, out, lse)
            assert torch.isnan(out[0, 2]).all() and torch.isfinite(out[0, 3]).all()
    x = torch.tensor([0.0, -1.5, -87.5, -88.0, -1e30, float("-inf"), float("nan"), -20.0, -3.0])
    y = torch.empty_like(x)
    exp = ctypes.CDLL(str(so)).decode_blocks_exp
    exp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    exp(x.data_ptr(), y.data_ptr(), x.numel())
    expected = torch.exp(x.double()).masked_fill(x <= -88.0, 0.0).float()
    torch.testing.assert_close(y, expected, atol=0, rtol=2e-7, equal_nan=True)
