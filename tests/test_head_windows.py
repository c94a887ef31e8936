"""head_windows: sinks + a window per head (MoA's elastic windows), exact on its per-head mask on
both kernels, windows given per query head, per key/value head or one for all; and
``hf.apply_head_map`` runs a head map in a transformers model as the project's own model does."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longattn
from longattn.core.masks import HeadWindow
from conftest import make_qkv


def per_head_oracle(q, k, v, windows, sinks):
    """Float64 attention where query head h sees the first ``sinks`` keys and its last
    ``windows[h]`` keys (0: all), causal."""
    b, hq, t, _ = q.shape
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    masks = []
    for w in windows:
        m = j <= i
        if w:
            m = m & ((j < sinks) | (i - j < w))
        masks.append(m)
    return longattn.reference_attention(q, k, v, mask=torch.stack(masks)[None].expand(b, hq, t, t))[0]


@settings(max_examples=20, deadline=None)
@given(t=st.integers(1, 70), seed=st.integers(0, 2**16), sinks=st.integers(0, 5),
       windows=st.lists(st.integers(0, 30), min_size=4, max_size=4), block=st.sampled_from([8, 16, None]))
def test_head_windows_equal_the_per_head_oracle(t, seed, sinks, windows, block):
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=t, tk=t, d=8, seed=seed)
    m = longattn.method("head_windows", windows=tuple(windows), sinks=sinks, block=block, backend="tiled")
    out = longattn.attention(q, k, v, causal=True, method=m)
    torch.testing.assert_close(out.double(), per_head_oracle(q, k, v, windows, sinks), atol=2e-6, rtol=0)


def test_windows_per_kv_head_apply_to_their_query_heads_and_one_applies_to_all():
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=50, tk=50, d=8, seed=1)
    per_kv = longattn.attention(q, k, v, causal=True, method=longattn.method("head_windows", windows=(6, 0), sinks=2))
    per_q = longattn.attention(q, k, v, causal=True, method=longattn.method("head_windows", windows=(6, 6, 0, 0), sinks=2))
    assert torch.equal(per_kv, per_q)
    one = longattn.attention(q, k, v, causal=True, method=longattn.method("head_windows", windows=(9,), sinks=2))
    stream = longattn.attention(q, k, v, causal=True, method=longattn.method("streaming", window=9, sinks=2))
    torch.testing.assert_close(one, stream, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="3 windows"):
        longattn.attention(q, k, v, causal=True, method=longattn.method("head_windows", windows=(1, 2, 3)))


@pytest.mark.flex
def test_head_windows_on_flexattention_match_the_oracle():
    from longattn.kernels import flex

    if flex.flex_unavailable_reason() is not None:
        pytest.skip(flex.flex_unavailable_reason())
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=160, tk=160, d=16, seed=2)
    m = longattn.method("head_windows", windows=(5, 0, 40, 3), sinks=2, block=16, backend="flex")
    out, stats = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    assert stats.path == "by_width"   # each width its own run: the windows on FlexAttention, 0 on SDPA
    one = longattn.method("head_windows", windows=(40,), sinks=2, block=16, backend="flex")
    assert longattn.attention(q, k, v, causal=True, method=one, return_stats=True)[1].path == "flex"
    torch.testing.assert_close(out.double(), per_head_oracle(q, k, v, (5, 0, 40, 3), 2), atol=2e-6, rtol=0)


def test_bad_windows_are_named():
    with pytest.raises(ValueError, match="windows"):
        longattn.method("head_windows", windows=(4, -1))
    with pytest.raises(ValueError, match="windows"):
        longattn.method("head_windows", windows=())
    with pytest.raises(ValueError, match="windows"):
        HeadWindow.of([True])


def test_apply_head_map_runs_a_map_like_policy_attend_on_stories260k():
    pytest.importorskip("transformers")
    import longattn.hf as hf
    from longattn.analysis import stories260k_subject
    from longattn.calibrate.heads import policy_attend

    model, tok = hf.load_llama2c()
    subject = stories260k_subject()
    ids = torch.tensor([tok.encode("Once upon a time, there was a little girl named Lily. She loved to play in "
                                   "the park with her dog, and every day they ran to the big old tree.")])
    head_map = [[True, 8, False, 16]] + [[4, True, True, 32]] * 4
    want = subject.run(ids, policy_attend(head_map, 5, 4, sinks=2, window=12))
    with torch.no_grad(), hf.apply_head_map(model, head_map, sinks=2, window=12) as applied:
        got = model(ids).logits
        cache = applied.new_cache()
    assert cache.spec["policy"] == "heads"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    with torch.no_grad():
        dense = model(ids).logits                       # switched back on exit
    assert not torch.allclose(dense, got, atol=1e-3)
    with pytest.raises(ValueError, match="5 layers"):
        hf.apply_head_map(model, [[True] * 4])


def test_grouped_widths_give_the_gradients_of_one_masked_run():
    from longattn.core.masks import Sinks

    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=48, tk=48, d=8, seed=5)
    ws = (6, 0, 20, 3)
    one_mask = longattn.method("pattern", mask=Sinks(2) | HeadWindow.of(ws), backend="tiled")
    grads = []
    for m in (longattn.method("head_windows", windows=ws, sinks=2), one_mask):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = longattn.attention(*leaves, causal=True, method=m)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
