"""Every exact method against the float64 oracle on the mask it claims to attend with."""

import pytest
import torch

import longattn
from longattn import masks
from conftest import assert_close_to_oracle, make_qkv, oracle_for, without_fused_kernels


def exact_methods(causal: bool, tq: int = 96, tk: int = 96):
    """(id, method object) for every exact method with small blocks so masks cut through blocks."""
    ids = torch.arange(tk) // 37  # documents that do not align with blocks
    cases = [
        ("dense", longattn.method("dense")),
        ("dense_chunked", longattn.method("dense_chunked", chunk=32, block=16)),
        ("window", longattn.method("window", window=20, block=16)),
        ("window_dilated", longattn.method("window", window=7, dilation=3, block=16)),
        ("a_shape", longattn.method("pattern", mask=masks.a_shape(5, 17), block=16)),
        ("triangle", longattn.method("pattern", mask=lambda a, b: masks.triangle(3, 11, 9, b), block=16)),
        ("power", longattn.method("pattern", mask=masks.power(8, sinks=4))),
        ("lsg", longattn.method("pattern", mask=masks.lsg(9, 3, 5, 8), block=16)),
        ("document", longattn.method("pattern", mask=masks.document(ids), block=16)),
        ("block_map", longattn.method("pattern", mask=masks.block_map(
            torch.rand(tq // 16 + 1, tk // 16 + 1, generator=torch.Generator().manual_seed(1)) > 0.6, 16, tk - tq))),
    ]
    if causal:
        cases.append(("streaming", longattn.method("streaming", sinks=3, window=13, block=16)))
    else:
        cases.append(("prefix_lm", longattn.method("pattern", mask=masks.prefix_lm(30), block=16)))
    return cases


CASES = [(c, name, m) for c in (False, True) for name, m in exact_methods(c)]


@pytest.mark.parametrize("causal,name,m", CASES, ids=[f"{n}-{'causal' if c else 'full'}" for c, n, _ in CASES])
def test_exact_method_matches_oracle_self_gqa(causal, name, m):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=96, tk=96, d=16)
    out, stats = longattn.attention(q, k, v, causal=causal, method=m, return_stats=True)
    ref_out, ref_lse = oracle_for(m, q, k, v, causal=causal)
    assert_close_to_oracle(out, ref_out)
    if stats.lse is not None:
        torch.testing.assert_close(stats.lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    assert 0 < stats.density <= 1.0 + 1e-9
    assert stats.path in ("sdpa", "tiled", "flex")


CROSS = [(c, name, m) for c in (False, True) for name, m in exact_methods(c, tq=40, tk=96)
         if name not in ("prefix_lm",)]


@pytest.mark.parametrize("causal,name,m", CROSS, ids=[f"{n}-{'causal' if c else 'full'}" for c, n, _ in CROSS])
def test_exact_method_matches_oracle_cross_mqa_with_padding(causal, name, m):
    q, k, v = make_qkv(b=2, hq=4, hk=1, tq=40, tk=96, d=16, seed=3)
    pad = torch.ones(2, 96, dtype=torch.bool)
    pad[1, :50] = False  # left padding in the second sequence: some causal rows see nothing
    out = longattn.attention(q, k, v, causal=causal, method=m, key_padding_mask=pad)
    ref_out, _ = oracle_for(m, q, k, v, causal=causal, key_padding_mask=pad)
    assert_close_to_oracle(out, ref_out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["dense", "dense_chunked", "window"])
def test_half_precision_inputs_compute_in_float32_and_return_input_dtype(dtype, name):
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=64, tk=64, d=16, dtype=dtype)
    m = longattn.method(name) if name != "window" else longattn.method("window", window=9, block=16)
    out = longattn.attention(q, k, v, causal=True, method=m)
    assert out.dtype == dtype
    ref, _ = oracle_for(m, q, k, v, causal=True)  # oracle on the same rounded inputs
    # the only error beyond float32 is the final rounding to the input dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_gqa_equals_dense_with_repeated_kv():
    q, k, v = make_qkv(b=1, hq=8, hk=2, tq=50, tk=50, d=16)
    for name in ("dense", "dense_chunked"):
        a = longattn.attention(q, k, v, causal=True, method=name)
        b = longattn.attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), causal=True, method=name)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,m", exact_methods(True, 80, 80), ids=[n for n, _ in exact_methods(True, 80, 80)])
def test_prefix_causality(name, m):
    """CAB's check: the output at position i equals running on the prefix [:i+1]."""
    if name in ("triangle", "block_map", "document"):
        pytest.skip("pattern defined for one sequence length (relative to its end, a fixed map, fixed ids)")
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=80, tk=80, d=16, seed=5)
    full = longattn.attention(q, k, v, causal=True, method=m)
    for i in (0, 15, 16, 47, 79):
        pre = longattn.attention(q[:, :, : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], causal=True, method=m)
        torch.testing.assert_close(pre[:, :, i], full[:, :, i], atol=2e-6, rtol=1e-5)


def test_decode_step_equals_last_row_of_prefill():
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=70, tk=70, d=16)
    for m in (longattn.method("dense"), longattn.method("streaming", sinks=2, window=9, block=16)):
        full = longattn.attention(q, k, v, causal=True, method=m)
        step = longattn.attention(q[:, :, -1:], k, v, causal=True, method=m)
        torch.testing.assert_close(step[:, :, 0], full[:, :, -1], atol=2e-6, rtol=1e-5)


def test_fully_masked_rows_give_zeros_never_nan():
    q, k, v = make_qkv(b=2, hq=2, hk=2, tq=8, tk=8, d=8)
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[0] = False
    for m in ("dense", "dense_chunked", longattn.method("window", window=3, block=4)):
        out, stats = longattn.attention(q, k, v, causal=False, method=m, key_padding_mask=pad, return_stats=True)
        assert not torch.isnan(out).any()
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert torch.isneginf(stats.lse[0]).all() and torch.isfinite(stats.lse[1]).all()


def test_streaming_attends_sinks_plus_window_keys_per_query():
    m = longattn.method("streaming", sinks=4, window=10, block=8)
    dense = m.visible_mask(64, 64, True).dense(1, 1, 64, 64)[0, 0]
    assert int(dense.sum(-1).max()) == 14
    assert dense[63, :4].all() and dense[63, 54:].all() and not dense[63, 4:54].any()


def test_window_density_reported_against_causal_triangle():
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=256, tk=256, d=8)
    _, stats = longattn.attention(q, k, v, causal=True, method=longattn.method("window", window=32, block=32),
                                  return_stats=True)
    expected = sum(min(i + 1, 32) for i in range(256)) / (256 * 257 / 2)
    assert stats.density == pytest.approx(expected)
    assert stats.computed_fraction >= stats.density


@pytest.mark.parametrize("fused", [True, False])
def test_tiled_kernel_fused_and_eager_chunks_match_oracle(fused):
    """Both chunk implementations (torch's fused CPU kernel, eager matmul) are exact, with a
    mask cutting through blocks, a positional bias, GQA, cross and dead rows."""
    from longattn.core.masks import Causal, KeyPadding, Window
    from longattn.kernels.layout import build_layout
    from longattn.kernels.tiled import tiled_attention

    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=50, tk=90, d=16)
    pad = torch.ones(2, 90, dtype=torch.bool)
    pad[1, :70] = False
    mask = Causal() & Window(13) & KeyPadding(pad)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]).view(1, 4, 1, 1)
    bias = lambda h, qp, kp: -slopes[0, h.flatten()].view(1, -1, 1, 1) * (qp - kp).abs()
    layout = build_layout(mask, 50, 90, 16)
    out, lse, info = tiled_attention(q, k, v, scale=0.25, layout=layout, mask=mask, bias=bias, key_chunk=32, fused=fused)
    assert info.fused == fused
    qp = torch.arange(50).view(-1, 1) + 40
    kp = torch.arange(90).view(1, -1)
    dense_bias = -slopes * (qp - kp).abs()
    ref, ref_lse = longattn.reference_attention(q, k, v, scale=0.25, mask=mask.dense(2, 4, 50, 90), bias=dense_bias)
    assert_close_to_oracle(out, ref)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_without_the_fused_cpu_kernel_still_gives_exact_out_and_lse(monkeypatch, causal):
    """Builds/devices without torch's fused CPU op take public SDPA plus a tiled LSE."""
    without_fused_kernels(monkeypatch)
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=40, tk=70, d=16)
    pad = torch.ones(2, 70, dtype=torch.bool)
    pad[1, :50] = False
    out, stats = longattn.attention(q, k, v, causal=causal, key_padding_mask=pad, return_stats=True)
    ref, ref_lse = oracle_for("dense", q, k, v, causal=causal, key_padding_mask=pad)
    assert_close_to_oracle(out, ref)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(stats.lse), ~fin)
    torch.testing.assert_close(stats.lse.double()[fin], ref_lse[fin], atol=2e-5, rtol=1e-5)


def test_gqa_dense_decode_folds_query_heads_instead_of_copying_the_cache():
    """A GQA decode step (non-causal piece) folds each group's query heads into one head's query
    axis: same result as the oracle, and no per-query-head copy of K/V (peak memory stays far
    below one copy of the cache)."""
    import torch

    from longattn.bench.harness import peak_memory

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 3, 32, generator=g)
    k = torch.randn(2, 2, 300, 32, generator=g)
    v = torch.randn(2, 2, 300, 32, generator=g)
    pad = torch.ones(2, 300, dtype=torch.bool)
    pad[1, :17] = False
    for kpm in (None, pad):
        out = longattn.attention(q, k, v, causal=True, key_padding_mask=kpm)
        mask = None if kpm is None else kpm[:, None, None, :]
        ref, _ = longattn.reference_attention(q, k, v, causal=True, mask=mask)
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    big_k = torch.randn(1, 2, 1 << 19, 64)  # 256 MiB of keys; a repeat to 8 heads would add 768 MiB
    big_v = torch.randn(1, 2, 1 << 19, 64)
    q1 = torch.randn(1, 8, 1, 64)
    _, peak = peak_memory(lambda: longattn.attention(q1, big_k, big_v, causal=True))
    if peak is not None:
        assert peak < 128 * 2**20, f"decode step grew RSS by {peak / 2**20:.0f} MiB"
