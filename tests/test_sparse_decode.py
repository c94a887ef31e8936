"""The lean decoding path of block retrieval equals the general selector + kernel."""

import pytest
import torch

import longattn
from longattn.kernels import native
from longattn.sparse import decode
from longattn.sparse.summaries import BlockSummaries
from conftest import make_qkv


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
    monkeypatch.setattr(native, "_loaded", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setenv("LONGATTN_NATIVE", "0")
    assert native.unavailable_reason() == "disabled by LONGATTN_NATIVE=0"
    out, st = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    assert st.extra["path_detail"] == "decode (gather)"
    torch.testing.assert_close(out, with_native, atol=2e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="LONGATTN_NATIVE=0"):
        native.decode_blocks(q, k, v, torch.zeros(1, 4, 1, dtype=torch.long), 16, 1.0)
    # no compiler: the reason names what is missing
    monkeypatch.setattr(native, "_loaded", False)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.delenv("LONGATTN_NATIVE")
    monkeypatch.setenv("LONGATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert "no C compiler" in native.unavailable_reason()


@pytest.mark.cpu_only(reason="the native decode kernel takes CPU tensors")
def test_native_kernel_builds_into_the_cache_dir(monkeypatch, tmp_path):
    import shutil

    if native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(native, "_loaded", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setenv("LONGATTN_CACHE_DIR", str(tmp_path))
    assert native.unavailable_reason() is None, native.unavailable_reason()
    built = list((tmp_path / "native").glob("decode_blocks-*.so"))
    assert len(built) == 1 and not list((tmp_path / "native").glob("*.c"))
    assert shutil.which(native._compiler()) is not None
