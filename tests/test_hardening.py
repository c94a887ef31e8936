"""Inputs that used to crash or answer wrongly: strided and empty tensors at torch's private fused
kernel, NaN/Inf in keys no query may see, the native decode kernel's stack and NaN handling,
flash-attn's bottom-right causal alignment for tokens_q > tokens_k, and scale <= 0."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import longattn
from longattn import masks
from longattn.core.merge import merge_partials
from longattn.kernels import native
from longattn.kernels.sdpa import fused_flash
from conftest import CASES, FULL, assert_close_to_oracle, full, make_qkv, oracle_for


def test_the_table_covers_every_registered_method():
    # every softmax method; the recurrent mixers (capability softmax False) have no softmax oracle
    # and are covered by test_recurrent_methods.py
    assert set(FULL) == {s.name for s in longattn.methods() if s.capabilities.softmax}


@pytest.mark.parametrize("name,causal", CASES)
def test_full_configuration_is_exact(name, causal):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=40, tk=40, d=16, seed=3)
    out = longattn.attention(q, k, v, causal=causal, method=full(name))
    assert_close_to_oracle(out, oracle_for(full(name), q, k, v, causal=causal)[0])


# --- strides at the private fused kernel -------------------------------------------------------

def strided_inputs(seed=0, b=2, hq=4, hk=2, t=40, d=16):
    """q with a stride-0 head dim (expanded), k and v every other element of a wider tensor."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, 1, generator=g).expand(b, hq, t, d)
    k = torch.randn(b, hk, t, 2 * d, generator=g)[..., ::2]
    v = torch.randn(b, hk, t, 2 * d, generator=g)[..., 1::2]
    return q, k, v


@pytest.mark.parametrize("name,causal", CASES)
def test_strided_head_dim_gives_the_answer_of_contiguous_inputs(name, causal):
    q, k, v = strided_inputs()
    assert q.stride(-1) == 0 and k.stride(-1) == 2
    out = longattn.attention(q, k, v, causal=causal, method=full(name))
    want = longattn.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal, method=full(name))
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    assert_close_to_oracle(out, oracle_for(full(name), q, k, v, causal=causal)[0])


@st.composite
def strided_problem(draw):
    """q, k, v of random strides: a (possibly stride-0 or stride-s) head dim, transposed
    [B, T, H, D] storage, expanded batch/head axes, and a random additive mask."""
    b, hk = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h = hk  # the fused kernel takes equal heads; callers fold GQA themselves
    m, n, d = draw(st.integers(1, 33)), draw(st.integers(1, 33)), draw(st.sampled_from([1, 3, 8, 16]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)

    def make(t):
        kind = draw(st.sampled_from(["contiguous", "stride0", "step", "transposed", "expanded"]))
        if kind == "stride0":
            return torch.randn(b, h, t, 1, generator=g).expand(b, h, t, d)
        if kind == "step":
            s = draw(st.integers(2, 3))
            return torch.randn(b, h, t, d * s, generator=g)[..., ::s]
        if kind == "transposed":
            return torch.randn(b, t, h, d, generator=g).transpose(1, 2)
        if kind == "expanded":
            return torch.randn(1, 1, t, d, generator=g).expand(b, h, t, d)
        return torch.randn(b, h, t, d, generator=g)

    q, k, v = make(m), make(n), make(n)
    mask = None
    if draw(st.booleans()):
        hidden = torch.rand(b, 1, m, n, generator=g) < 0.3
        mask = torch.zeros(b, 1, m, n).masked_fill(hidden, -math.inf)
    causal = mask is None and m == n and draw(st.booleans())
    return q, k, v, mask, causal


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strided_problem())
def test_fused_flash_equals_public_sdpa_for_any_strides(problem):
    q, k, v, mask, causal = problem
    out, lse = fused_flash(q, k, v, scale=0.3, causal=causal, attn_mask=mask)
    want = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=mask,
                                          is_causal=causal, scale=0.3)
    alive = torch.isfinite(lse)
    torch.testing.assert_close(out[alive], want[alive], atol=1e-5, rtol=1e-5)
    assert lse.dtype == torch.float32


def test_fused_flash_answers_empty_inputs_without_calling_the_op():
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=3, tk=0, d=8)
    out, lse = fused_flash(q, k, v, scale=0.5)
    assert out.shape == (1, 2, 3, 8) and not out.any() and torch.isneginf(lse).all()
    out, lse = fused_flash(q[:, :, :0], k, v, scale=0.5)
    assert out.shape == (1, 2, 0, 8) and lse.shape == (1, 2, 0)


EMPTY_SCRIPT = """
import sys, torch, longattn
sys.path.insert(0, {tests!r})
from conftest import FULL, causal_modes
fails = []
for name in sorted(FULL):
    m = longattn.method(name, **FULL[name])
    for causal in causal_modes(name):
        for shape_q, shape_k in [((1, 2, 0, 8), (1, 2, 5, 8)), ((1, 2, 4, 8), (1, 2, 0, 8)),
                                 ((0, 2, 4, 8), (0, 2, 4, 8)), ((1, 0, 4, 8), (1, 0, 4, 8))]:
            q, k = torch.randn(shape_q), torch.randn(shape_k)
            out, stats = longattn.attention(q, k, k.clone(), causal=causal, method=m, return_stats=True)
            if out.shape != shape_q or bool(out.any()) or not bool(torch.isneginf(stats.lse).all()):
                fails.append((name, causal, shape_q, shape_k, tuple(out.shape)))
print("FAILS", fails)
"""


@pytest.mark.cpu_only(reason="runs its inputs on the CPU in a subprocess")
def test_empty_dimensions_give_empty_or_zero_outputs_for_every_method():
    # in a subprocess: torch's fused kernel used to kill the interpreter with SIGFPE here
    script = EMPTY_SCRIPT.format(tests=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FAILS []" in proc.stdout, proc.stdout[-2000:]


def test_head_dim_zero_is_a_clear_error():
    x = torch.randn(1, 2, 4, 0)
    with pytest.raises(ValueError, match="head_dim must be at least 1"):
        longattn.attention(x, x, x)


# --- NaN / Inf in keys a query may not see -----------------------------------------------------

@pytest.mark.parametrize("name,causal", CASES)
def test_nan_in_padding_keys_never_reaches_a_row(name, causal):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=40, tk=40, d=16, seed=5)
    pad = torch.ones(2, 40, dtype=torch.bool)
    pad[1, :7] = False  # left padding of row 1, holding garbage
    pad[0, 30:33] = False
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[1, :, :7] = math.nan
    v_bad[0, :, 30:33] = math.inf
    out = longattn.attention(q, k_bad, v_bad, causal=causal, method=full(name), key_padding_mask=pad)
    assert torch.isfinite(out).all()
    assert_close_to_oracle(out, oracle_for(full(name), q, k, v, causal=causal, key_padding_mask=pad)[0])


@pytest.mark.parametrize("name", sorted(n for n, c in CASES if c))
def test_inf_in_a_future_key_reaches_only_the_queries_that_see_it(name):
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=40, tk=40, d=16, seed=6)
    k_bad = k.clone()
    k_bad[0, 1, 25] = math.inf  # key 25 of key head 1: query heads 2 and 3
    k_bad[0, 0, 31, 3] = math.nan
    out = longattn.attention(q, k_bad, v, causal=True, method=full(name))
    vm = full(name).visible_mask(40, 40, True).dense(1, 4, 40, 40)
    sees = torch.zeros(1, 4, 40, dtype=torch.bool)
    sees[:, 2:] |= vm[:, 2:, :, 25]
    sees[:, :2] |= vm[:, :2, :, 31]
    assert torch.isnan(out[sees]).all()  # IEEE: a visible non-finite key makes the row NaN
    ref = oracle_for(full(name), q, k, v, causal=True)[0]
    assert_close_to_oracle(out[~sees], ref[~sees])


@pytest.mark.parametrize("name,causal", CASES)
def test_a_nan_query_makes_only_its_own_row_nan(name, causal):
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=40, tk=40, d=16, seed=7)
    q_bad = q.clone()
    q_bad[0, 1, 20, 5] = math.nan  # the fused kernel alone maps this row to a finite answer
    out = longattn.attention(q_bad, k, v, causal=causal, method=full(name))
    assert torch.isnan(out[0, 1, 20]).all()
    keep = torch.ones(1, 4, 40, dtype=torch.bool)
    keep[0, 1, 20] = False
    assert_close_to_oracle(out[keep], oracle_for(full(name), q, k, v, causal=causal)[0][keep])


def test_reference_propagates_nan_from_visible_keys_only():
    q, k, v = make_qkv(b=1, hq=1, hk=1, tq=6, tk=6, d=4)
    k[0, 0, 3] = math.nan
    v[0, 0, 4] = math.inf
    out, lse = longattn.reference_attention(q, k, v, causal=True)
    assert torch.isfinite(out[0, 0, :3]).all() and torch.isfinite(lse[0, 0, :3]).all()
    assert torch.isnan(out[0, 0, 3:]).all() and torch.isnan(lse[0, 0, 3:]).all()
    clean = longattn.reference_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], causal=True)[0]
    torch.testing.assert_close(out[:, :, :3], clean)


def test_merge_keeps_nan_and_plus_inf_lse_visible():
    o = torch.ones(1, 3, 2)
    lse_a = torch.tensor([[0.0, math.nan, math.inf]])
    lse_b = torch.tensor([[0.0, 0.0, 0.0]])
    out, lse = merge_partials([o, o], [lse_a, lse_b])
    assert torch.isfinite(out[0, 0]).all()
    assert torch.isnan(out[0, 1:]).all() and not torch.isfinite(lse[0, 1:]).any()
    dead = torch.full((1, 3), -math.inf)
    out, lse = merge_partials([o, o], [dead, dead])
    assert not out.any() and torch.isneginf(lse).all()


# --- scale and causal alignment ----------------------------------------------------------------

@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_non_positive_scale_is_refused(scale):
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="scale must be > 0"):
        longattn.attention(x, x, x, causal=True, scale=scale)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES if c and full(n).capabilities.cross))
def test_causal_with_more_queries_than_keys_aligns_bottom_right(name):
    # flash-attn's convention: query i sees keys j <= i + tokens_k - tokens_q; the first
    # tokens_q - tokens_k queries see nothing and get zeros
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=40, tk=25, d=16, seed=8)
    out, stats = longattn.attention(q, k, v, causal=True, method=full(name), return_stats=True)
    assert not out[:, :, :15].any()
    if stats.lse is not None:
        assert torch.isneginf(stats.lse[:, :, :15]).all()
    # the method's own pattern (a window is relative to each query's bottom-right position)
    assert_close_to_oracle(out, oracle_for(full(name), q, k, v, causal=True)[0])


# --- the native decode kernel ------------------------------------------------------------------

needs_native = pytest.mark.skipif(native.unavailable_reason() is not None,
                                  reason=f"native kernel unavailable: {native.unavailable_reason()}")


@pytest.mark.cpu_only(reason="the native decode kernel takes CPU tensors")
@needs_native
def test_native_decode_with_a_16k_block_runs_on_a_small_thread_stack():
    script = textwrap.dedent("""
        import torch
        from longattn.kernels import native
        torch.set_num_threads(2)
        q = torch.randn(1, 4, 1, 64); k = torch.randn(1, 2, 16384, 64); v = torch.randn(1, 2, 16384, 64)
        blocks = torch.zeros(1, 4, 1, dtype=torch.long)
        out, lse = native.decode_blocks(q, k, v, blocks, 16384, 0.125)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), scale=0.125)
        print("ERR", float((out - ref).abs().max()))
    """)
    env = dict(os.environ, OMP_STACKSIZE="64K")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-1500:]}"
    assert float(proc.stdout.split("ERR")[1]) < 1e-5


def gather_decode(q, k, v, blocks, bs, scale):
    """The torch path's answer: the selected blocks gathered, attended by the reference."""
    b, hq = q.shape[:2]
    g = hq // k.shape[1]
    outs, lses = torch.empty(b, hq, 1, q.shape[-1], dtype=torch.float64), torch.empty(b, hq, 1, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            pos = torch.cat([torch.arange(j * bs, min((j + 1) * bs, k.shape[2])) for j in blocks[bi, h].tolist() if j >= 0])
            o, l = longattn.reference_attention(q[bi:bi + 1, h:h + 1], k[bi:bi + 1, h // g:h // g + 1, pos],
                                                v[bi:bi + 1, h // g:h // g + 1, pos], scale=scale)
            outs[bi, h], lses[bi, h] = o[0, 0], l[0, 0]
    return outs, lses


@pytest.mark.cpu_only(reason="the native decode kernel takes CPU tensors")
@needs_native
def test_native_decode_propagates_nan_and_skips_blocks_scoring_minus_inf():
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=1, tk=64, d=8, seed=9)
    q = q.abs() + 0.1
    blocks = torch.tensor([[[0, 2, 3], [0, 2, 3], [1, 3, -1], [0, 1, 2]]])
    k[0, 0, 0:16] = -math.inf  # block 0 of key head 0 scores -inf for every (positive) query
    k[0, 1, 20, 2] = math.nan  # block 1 of key head 1: query head 2 reads it, head 3 too
    out, lse = native.decode_blocks(q, k, v, blocks, 16, 0.3)
    ref_out, ref_lse = gather_decode(q, k, v, blocks, 16, 0.3)
    for h in (0, 1):  # first kept block all -inf: the rest of the row still counts
        torch.testing.assert_close(out[0, h].double(), ref_out[0, h], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[0, h].double(), ref_lse[0, h], atol=1e-5, rtol=1e-5)
    assert torch.isnan(out[0, 2:]).all() and torch.isnan(lse[0, 2:]).all()  # not "saw no keys"
    assert torch.isnan(ref_out[0, 2:]).all()


# --- decode steps check their result, not the whole cache --------------------------------------


def test_a_decode_step_does_not_read_the_whole_cache_to_screen_it(monkeypatch):
    from longattn.core import nonfinite
    from longattn.sparse.summaries import BlockSummaries

    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=1, tk=4096, d=16, seed=12)
    read = []
    real = nonfinite.all_finite
    monkeypatch.setattr(nonfinite, "all_finite", lambda *ts: read.extend(t.numel() for t in ts) or real(*ts))
    m = longattn.method("landmark", budget=256, block=32, q_block=32, sinks=32, window=64)
    longattn.attention(q, k, v, causal=True, method=m, summaries=BlockSummaries.build(k, 32))
    assert read and max(read) < k.numel(), read  # q, the summaries and the output: never k or v
    read.clear()
    # an exact decode step reads the keys once (its kernel would turn a NaN/Inf score into a finite
    # row), never the values (a bad value always reaches its output)
    longattn.attention(q, k, v, causal=True, method="dense")
    assert read.count(k.numel()) == 1 and sum(read) < k.numel() + v.numel(), read
    read.clear()
    longattn.attention(q, k, v, causal=True, method=m)  # no summaries: the keys are screened first
    assert k.numel() in read


@pytest.mark.parametrize("poison", [math.nan, math.inf])
@pytest.mark.parametrize("tk", [1, 5])
def test_an_exact_decode_step_never_turns_a_bad_score_into_a_finite_row(poison, tk):
    """Regression: torch's fused CPU kernel gives 0 (LSE 0) for a row whose every visible key scores
    NaN or ±inf and a finite row when one key scores +inf; a one-query dense call returned that
    without a NaN. A row that may see a non-finite key is NaN (longattn.core.nonfinite)."""
    q, k, v = make_qkv(b=1, hq=2, hk=1, tq=1, tk=tk, d=16, seed=21)
    q = q.abs()  # every score against an inf channel is +inf
    kb = k.clone()
    kb[0, 0, 0, 0] = poison
    out, st = longattn.attention(q, kb, v, causal=True, method="dense", return_stats=True)
    assert torch.isnan(out).all() and torch.isnan(st.lse).all()


@pytest.mark.parametrize("method", ["dense", "window"])
def test_a_decode_step_with_nan_padding_keys_is_answered_as_if_screened(method):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=1, tk=64, d=16, seed=13)
    pad = torch.ones(2, 64, dtype=torch.bool)
    pad[1, :10] = False
    kb = k.clone()
    kb[1, :, :10] = math.nan  # garbage in the padding: the fused kernel alone turns the row NaN
    m = longattn.method(method) if method == "dense" else longattn.method("window", window=80)
    out = longattn.attention(q, kb, v, causal=True, method=m, key_padding_mask=pad)
    assert_close_to_oracle(out, oracle_for(m, q, k, v, causal=True, key_padding_mask=pad)[0])


def test_a_decode_step_over_summaries_sees_a_nan_key_or_value_it_reads():
    from longattn.sparse.summaries import BlockSummaries

    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=1, tk=512, d=16, seed=14)
    m = longattn.method("quest", budget=192, block=32, q_block=32, sinks=32, window=32)
    kb = k.clone()
    kb[0, 0, 200, 3] = math.nan  # a key anywhere: the summaries show it, the keys are screened
    out = longattn.attention(q, kb, v, causal=True, method=m, summaries=BlockSummaries.build(kb, 32))
    assert torch.isnan(out[0, :2]).all() and torch.isfinite(out[0, 2:]).all()
    vb = v.clone()
    vb[0, 1, 510, 0] = math.inf  # a value in the window, which every step reads
    out = longattn.attention(q, k, vb, causal=True, method=m, summaries=BlockSummaries.build(k, 32))
    assert torch.isnan(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all()


def test_summaries_know_whether_their_keys_are_finite_through_appends():
    from longattn.sparse.summaries import BlockSummaries

    k = torch.randn(1, 2, 100, 8)
    s = BlockSummaries.build(k, 16)
    assert s.keys_finite
    s.append(torch.randn(1, 2, 3, 8))
    s.extend(torch.randn(1, 2, 40, 8))
    assert s.keys_finite
    bad = torch.randn(1, 2, 1, 8)
    bad[0, 1, 0, 2] = math.inf
    s.append(bad)
    assert not s.keys_finite
    s.extend(torch.randn(1, 2, 5, 8))
    assert not s.keys_finite  # once a bad key is in, it stays in
    k2 = k.clone()
    k2[0, 0, 50, 0] = math.nan
    assert not BlockSummaries.build(k2, 16).keys_finite
