"""Conventions users bring from flash-attn and FlexAttention / attention-gym, each checked against
that convention written out here (never against longattn's own masks):

* flash-attn's ``window_size=(left, right)``: ``masks.Band`` and ``method("window", window=(l, r))``,
  and attention-gym's ``generate_sliding_window(W)`` = ``window(W + 1)`` with ``causal=True``;
* FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` functions through ``masks.from_mask_mod``, with
  FlexAttention's top-left query indices, and conservative (here exact) block bounds;
* flash-attn's ``alibi_slopes`` (``[H]`` or ``[B, H]``): ``positions.ALiBi(heads, slopes=...)``.

Every output is compared with the float64 oracle on a dense mask (and bias) built here from the
convention's own definition.
"""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn import masks, positions
from longattn.core import masks as mask_module
from longattn.kernels import flex
from longattn.kernels.layout import block_bounds, build_layout
from conftest import assert_close_to_oracle, make_qkv


def grid(batch, heads, tokens_q, tokens_k):
    """FlexAttention's index grid: ``b [B,1,1,1]``, ``h [1,H,1,1]``, ``q_idx [Tq,1]`` from 0 (top-left),
    ``kv_idx [1,Tk]``."""
    return (torch.arange(batch).view(-1, 1, 1, 1), torch.arange(heads).view(1, -1, 1, 1),
            torch.arange(tokens_q).view(-1, 1), torch.arange(tokens_k).view(1, -1))


def dense_from_mod(mod, batch, heads, tokens_q, tokens_k):
    """What ``create_block_mask(mod, B, H, Tq, Tk)`` describes, as a bool ``[B, H, Tq, Tk]``."""
    return mod(*grid(batch, heads, tokens_q, tokens_k)).broadcast_to(batch, heads, tokens_q, tokens_k)


# =============================================================================================
# 1. flash-attn's window_size=(left, right)


def flash_window_mask(tokens_q, tokens_k, left, right, causal):
    """flash-attn's definition, pair by pair: query ``i`` sits at ``p = i + tokens_k - tokens_q``
    (bottom-right) and sees keys ``p - left … p + right``; ``-1`` leaves a side unbounded; with
    ``causal`` keys after ``p`` are hidden too."""
    m = torch.zeros(tokens_q, tokens_k, dtype=torch.bool)
    for i in range(tokens_q):
        p = i + tokens_k - tokens_q
        for j in range(tokens_k):
            ok = (left < 0 or j >= p - left) and (right < 0 or j <= p + right)
            m[i, j] = ok and (not causal or j <= p)
    return m


WINDOWS = [(0, 0), (3, 0), (0, 5), (4, 2), (7, -1), (-1, 3), (-1, -1), (20, 11)]


@pytest.mark.parametrize("tq,tk", [(64, 64), (40, 96)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("left,right", WINDOWS)
def test_window_tuple_is_flash_attn_window_size(left, right, causal, tq, tk):
    expected = flash_window_mask(tq, tk, left, right, causal)
    m = longattn.method("window", window=(left, right), block=16)
    assert torch.equal(m.visible_mask(tq, tk, causal).dense(1, 1, tq, tk)[0, 0], expected)
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=tq, tk=tk, d=16, seed=left * 31 + right)
    out = longattn.attention(q, k, v, causal=causal, method=m)
    ref, _ = longattn.reference_attention(q, k, v, mask=expected)
    assert_close_to_oracle(out, ref)


@pytest.mark.parametrize("left,right", WINDOWS + [(None, 2), (5, None)])
@pytest.mark.parametrize("block", [1, 5, 16])
def test_band_block_bounds_are_exact(left, right, block):
    """Interval arithmetic: a block has a visible pair / is full exactly when brute force says so."""
    tq, tk = 37, 70
    band = masks.band(left, right)
    m = band.dense(1, 1, tq, tk)[0, 0]
    layout = build_layout(band, tq, tk, block)
    qlo, qhi = block_bounds(tq, block)
    klo, khi = block_bounds(tk, block)
    for i, (a, z) in enumerate(zip(qlo.tolist(), qhi.tolist())):
        for j, (c, e) in enumerate(zip(klo.tolist(), khi.tolist())):
            cell = m[a:z + 1, c:e + 1]
            assert bool(layout.any[0, 0, i, j]) == bool(cell.any()), (i, j)
            assert bool(layout.all[0, 0, i, j]) == bool(cell.all()), (i, j)


def test_symmetric_int_window_is_the_band_of_reach_w_minus_1():
    for w in (1, 4, 9):
        for causal in (False, True):
            a = longattn.method("window", window=w).visible_mask(30, 50, causal).dense(1, 1, 30, 50)
            b = longattn.method("window", window=(w - 1, w - 1)).visible_mask(30, 50, causal).dense(1, 1, 30, 50)
            assert torch.equal(a, b)
    assert masks.Band(-1, -1) == masks.Band(None, None)  # flash-attn's -1 is stored as None
    assert torch.equal(masks.Band(None, 0).dense(1, 1, 20, 30), masks.Causal().dense(1, 1, 20, 30))


def test_attention_gym_sliding_window_is_window_w_plus_1_causal():
    W, T = 6, 64

    def sliding_window(b, h, q_idx, kv_idx):  # attention-gym's generate_sliding_window(W)
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= W)

    expected = dense_from_mod(sliding_window, 1, 1, T, T)[0, 0]
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=T, tk=T, d=16, seed=3)
    ref, _ = longattn.reference_attention(q, k, v, mask=expected)
    for window in (W + 1, (W, 0), (W, 5)):  # the right side does not matter under causal=True
        m = longattn.method("window", window=window, block=16)
        assert torch.equal(m.visible_mask(T, T, True).dense(1, 1, T, T)[0, 0], expected), window
        assert_close_to_oracle(longattn.attention(q, k, v, causal=True, method=m), ref)


@pytest.mark.parametrize("window,err,match", [
    ((1, 2, 3), TypeError, r"window must be .*\(left, right\).*got \(1, 2, 3\)"),
    ((1.5, 2), TypeError, r"window must be .*got \(1.5, 2\)"),
    ((True, 1), TypeError, r"window must be .*got \(True, 1\)"),
    ((-2, 0), ValueError, r"window must be .*ints >= -1.*got \(-2, 0\)"),
    ((3, -5), ValueError, r"window must be .*got \(3, -5\)"),
    (0, ValueError, "window must be a positive int, got 0"),
    (2.5, TypeError, "window must be an int, got float 2.5"),
])
def test_window_tuple_validation(window, err, match):
    with pytest.raises(err, match=match):
        longattn.method("window", window=window)


def test_window_tuple_refuses_dilation_and_band_validates_its_sides():
    with pytest.raises(ValueError, match=r"dilation must be 1 with a \(left, right\) window, got dilation=2"):
        longattn.method("window", window=(4, 4), dilation=2)
    assert longattn.method("window", window=[3, -1]).window == (3, -1)
    with pytest.raises(ValueError, match="left must be an int >= -1 or None.*got -3"):
        masks.Band(-3, 0)
    with pytest.raises(TypeError, match="right must be an int >= -1 or None.*got str '2'"):
        masks.Band(0, "2")


# =============================================================================================
# 2. FlexAttention mask_mods through masks.from_mask_mod (attention-gym's masks, written out)


def causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window_mod(window):
    def mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
    return mod


def prefix_lm_mod(prefix):  # prefix: [B] lengths, one per batch row
    def mod(b, h, q_idx, kv_idx):
        return (kv_idx < prefix[b]) | (q_idx >= kv_idx)
    return mod


def document_mod(doc):  # doc: [B, T] document id of every token (packed sequences)
    def mod(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)
    return mod


def natten_mod(height, width, kernel_h, kernel_w):
    """2-D neighbourhood attention on a ``height × width`` image flattened row by row: each pixel
    sees the ``kernel_h × kernel_w`` window centred on it, shifted inwards at the borders so it
    always holds ``kernel_h · kernel_w`` pixels."""
    def mod(b, h, q_idx, kv_idx):
        q_r, q_c = q_idx // width, q_idx % width
        kv_r, kv_c = kv_idx // width, kv_idx % width
        centre_r = q_r.clamp(kernel_h // 2, height - 1 - kernel_h // 2)
        centre_c = q_c.clamp(kernel_w // 2, width - 1 - kernel_w // 2)
        return ((centre_r - kv_r).abs() <= kernel_h // 2) & ((centre_c - kv_c).abs() <= kernel_w // 2)
    return mod


def flamingo_mod(text_image, tokens_per_image):
    """Cross attention: text token ``q_idx`` sees only the tokens of the image it follows
    (``text_image[q_idx]``, -1 before the first image: nothing)."""
    def mod(b, h, q_idx, kv_idx):
        return text_image[q_idx] == kv_idx // tokens_per_image
    return mod


def shared_prefix_mod(prefix, suffix_id):
    """A shared prefix of ``prefix`` tokens followed by several continuations (``suffix_id``):
    each continuation sees the prefix and itself, causally."""
    def mod(b, h, q_idx, kv_idx):
        same = suffix_id[q_idx] == suffix_id[kv_idx]
        return (q_idx >= kv_idx) & ((kv_idx < prefix) | same)
    return mod


def per_head_window_mod(windows):  # windows: [H] a different reach per head
    def mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= windows[h]
    return mod


def _cases():
    doc = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 7 + [1] * 40 + [2] * 17])
    text_image = torch.tensor([-1] * 3 + [0] * 9 + [1] * 5 + [2] * 7)  # 24 text tokens, 3 images
    suffix = torch.tensor([0] * 16 + [1] * 20 + [2] * 28)
    return {
        # name: (mod, batch, heads, tokens_q, tokens_k)
        "causal": (causal_mod, 1, 1, 64, 64),
        "causal-top-left-cross": (causal_mod, 1, 1, 24, 80),
        "sliding-window": (sliding_window_mod(9), 1, 1, 64, 64),
        "prefix-lm": (prefix_lm_mod(torch.tensor([10, 37])), 2, 1, 64, 64),
        "document": (document_mod(doc), 2, 1, 64, 64),
        "natten-8x8-3x3": (natten_mod(8, 8, 3, 3), 1, 1, 64, 64),
        "flamingo-cross": (flamingo_mod(text_image, 16), 1, 1, 24, 48),
        "shared-prefix": (shared_prefix_mod(16, suffix), 1, 1, 64, 64),
        "per-head-window": (per_head_window_mod(torch.tensor([0, 3, 10, 70])), 1, 4, 64, 64),
    }


CASES = _cases()


def _brute_blocks(dense, tq, tk, block):
    """Per block: some / every pair visible, by brute force over ``dense [B, H, Tq, Tk]``."""
    qlo, qhi = block_bounds(tq, block)
    klo, khi = block_bounds(tk, block)
    b, h = dense.shape[:2]
    any_ = torch.zeros(b, h, qlo.numel(), klo.numel(), dtype=torch.bool)
    all_ = torch.zeros_like(any_)
    for i, (a, z) in enumerate(zip(qlo.tolist(), qhi.tolist())):
        for j, (c, e) in enumerate(zip(klo.tolist(), khi.tolist())):
            cell = dense[:, :, a:z + 1, c:e + 1]
            any_[:, :, i, j] = cell.flatten(2).any(-1)
            all_[:, :, i, j] = cell.flatten(2).all(-1)
    return any_, all_


@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_gym_mask_mods_match_the_oracle(name):
    mod, batch, heads, tq, tk = CASES[name]
    expected = dense_from_mod(mod, 2, 4, tq, tk)
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=tq, tk=tk, d=16, seed=len(name))
    m = longattn.method("pattern", mask=masks.from_mask_mod(mod, batch=batch, heads=heads), block=8)
    out, stats = longattn.attention(q, k, v, causal=False, method=m, return_stats=True)
    ref, _ = longattn.reference_attention(q, k, v, mask=expected)
    assert_close_to_oracle(out, ref)
    assert stats.density == pytest.approx(expected.double().mean().item())
    # exact block bounds: the kernel visits exactly the blocks holding a visible pair
    some, _ = _brute_blocks(expected, tq, tk, 8)
    assert stats.extra["blocks_visited"] == int(some.any(0).any(0).sum())


def test_top_left_counts_queries_from_zero_and_bottom_right_from_the_end():
    """FlexAttention (top-left) and flash-attn / longattn (bottom-right) place the same causal mod
    differently when tokens_q < tokens_k."""
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=24, tk=80, d=16, seed=1)
    top = dense_from_mod(causal_mod, 1, 1, 24, 80)  # query i sees keys 0 … i
    assert torch.equal(masks.from_mask_mod(causal_mod).dense(1, 1, 24, 80), top)
    m = longattn.method("pattern", mask=masks.from_mask_mod(causal_mod), block=16)
    ref, _ = longattn.reference_attention(q, k, v, mask=top)
    assert_close_to_oracle(longattn.attention(q, k, v, method=m), ref)
    # bottom_right: the mod receives query positions i + tk - tq, i.e. flash-attn's causal
    m = longattn.method("pattern", mask=masks.from_mask_mod(causal_mod, align="bottom_right"), block=16)
    ref, _ = longattn.reference_attention(q, k, v, causal=True)
    assert_close_to_oracle(longattn.attention(q, k, v, method=m), ref)


def _random_mod(batch, heads, tq, tk, cell, seed):
    """A mask with empty, full and mixed ``cell × cell`` tiles, per batch row and head, read from a
    table (FlexAttention calls such a mod with tensor indices)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 3, (batch, heads, tq // cell + 1, tk // cell + 1), generator=g)
    kind = coarse.repeat_interleave(cell, 2).repeat_interleave(cell, 3)[:, :, :tq, :tk]
    noise = torch.rand(batch, heads, tq, tk, generator=g) < 0.5
    table = (kind == 2) | ((kind == 1) & noise)  # 0: hidden, 2: visible, 1: random

    def mod(b, h, q_idx, kv_idx):
        return table[b, h, q_idx, kv_idx]
    return mod


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("tq,tk,block", [(50, 70, 8), (64, 64, 16), (70, 30, 4)])
def test_from_mask_mod_block_bounds_equal_brute_force(monkeypatch, tq, tk, block, chunk):
    if chunk is not None:  # tiny evaluation steps: rows and key columns both split
        monkeypatch.setattr(mask_module, "MOD_CHUNK_PAIRS", chunk)
    mod = _random_mod(2, 3, tq, tk, block, seed=tq + tk)
    mask = masks.from_mask_mod(mod, batch=2, heads=3).for_sizes(tq, tk)
    layout = build_layout(mask, tq, tk, block)
    want_any, want_all = _brute_blocks(dense_from_mod(mod, 2, 3, tq, tk), tq, tk, block)
    assert torch.equal(layout.any, want_any)
    assert torch.equal(layout.all, want_all)
    assert want_all.any() and (want_any & ~want_all).any() and (~want_any).any()  # all three kinds occur


def test_from_mask_mod_bounds_stay_conservative_beyond_the_exact_limit_and_combined(monkeypatch):
    tq, tk, block = 50, 70, 8
    mod = _random_mod(2, 3, tq, tk, 4, seed=5)
    dense = dense_from_mod(mod, 2, 3, tq, tk)
    want_any, want_all = _brute_blocks(dense, tq, tk, block)
    q, k, v = make_qkv(b=2, hq=3, hk=3, tq=tq, tk=tk, d=16, seed=5)
    ref, _ = longattn.reference_attention(q, k, v, mask=dense)
    monkeypatch.setattr(mask_module, "MOD_EXACT_PAIRS", 1000)  # far fewer than the 21,000 pairs here
    mask = masks.from_mask_mod(mod, batch=2, heads=3)
    layout = build_layout(mask.for_sizes(tq, tk), tq, tk, block)
    assert layout.any.all() and not layout.all.any()  # every block partial: any over-, all under-reports
    m = longattn.method("pattern", mask=mask, block=block)
    assert_close_to_oracle(longattn.attention(q, k, v, method=m), ref)
    monkeypatch.undo()
    # combined with other masks: still never the wrong way round
    for combo in (mask & masks.Window(9), mask | masks.Sinks(3), (mask | masks.Sinks(3)) & masks.Causal()):
        bound = combo.for_sizes(tq, tk)
        layout = build_layout(bound, tq, tk, block)
        truth_any, truth_all = _brute_blocks(combo.dense(2, 3, tq, tk), tq, tk, block)
        assert not (truth_any & ~layout.any).any()
        assert not (layout.all & ~truth_all).any()


def test_for_sizes_binds_top_left_masks_and_passes_through_and_or():
    mod_mask = masks.from_mask_mod(causal_mod)
    with pytest.raises(ValueError, match=r"align='top_left'.*for_sizes\(tokens_q, tokens_k\)"):
        mod_mask.mask_mod(*grid(1, 1, 4, 8))
    combo = (mod_mask | masks.Sinks(2)) & masks.Window(3)
    bound = combo.for_sizes(4, 8)
    assert bound is not combo and bound.a.a.sizes == (4, 8)
    assert bound.for_sizes(4, 8) is bound  # already bound: no copy
    assert masks.Window(3).for_sizes(4, 8) == masks.Window(3)
    assert masks.from_mask_mod(causal_mod, align="bottom_right").for_sizes(4, 8).sizes is None
    with pytest.raises(ValueError, match=r"bound to \(tokens_q, tokens_k\) = \(4, 8\).*\(5, 8\)"):
        mod_mask.for_sizes(4, 8).check(1, 5, 8)


def test_from_mask_mod_errors_name_what_is_wrong():
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=16, tk=16, d=8)
    with pytest.raises(TypeError, match="mask_mod must be a callable"):
        masks.from_mask_mod("causal")
    with pytest.raises(ValueError, match="align must be 'top_left'.*'bottom_right'.*got 'top-left'"):
        masks.from_mask_mod(causal_mod, align="top-left")
    with pytest.raises(ValueError, match="heads must be a positive int, got 0"):
        masks.from_mask_mod(causal_mod, heads=0)
    with pytest.raises(ValueError, match=r"from_mask_mod\(batch=3\) cannot serve inputs of batch 2"):
        longattn.attention(q, k, v, method=longattn.method("pattern", mask=masks.from_mask_mod(causal_mod, batch=3)))
    with pytest.raises(ValueError, match=r"from_mask_mod\(heads=2\) is evaluated on 4 query heads"):
        longattn.attention(q, k, v, method=longattn.method("pattern", mask=masks.from_mask_mod(causal_mod, heads=2)))
    not_bool = masks.from_mask_mod(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs())
    with pytest.raises(TypeError, match="mask_mod must return a bool tensor.*got dtype torch.int64"):
        longattn.attention(q, k, v, method=longattn.method("pattern", mask=not_bool))


def test_from_mask_mod_under_vmap_as_flex_attention_calls_it():
    """FlexAttention evaluates a mask_mod on 0-d int32 tensors under vmap."""
    doc = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])
    mask = masks.from_mask_mod(document_mod(doc), batch=2).for_sizes(12, 12)
    f = mask.mask_mod
    for dim in range(4):
        f = torch.vmap(f, tuple(0 if d == 3 - dim else None for d in range(4)))
    idx = [torch.arange(n, dtype=torch.int32) for n in (2, 3, 12, 12)]
    assert torch.equal(f(*idx), dense_from_mod(document_mod(doc), 2, 3, 12, 12))


# =============================================================================================
# 3. flash-attn's alibi_slopes: [H] or [B, H]


def alibi_bias(slopes, batch, heads, tokens_q, tokens_k):
    """flash-attn's ALiBi in float64: ``-slope · |i + tokens_k - tokens_q - j|`` (bottom-right),
    ``[B|1, H, Tq, Tk]``."""
    s = slopes.to(torch.float64).reshape(-1, heads, 1, 1)
    i = torch.arange(tokens_q, dtype=torch.float64).view(-1, 1) + (tokens_k - tokens_q)
    j = torch.arange(tokens_k, dtype=torch.float64).view(1, -1)
    return -s * (i - j).abs()


METHODS = {
    "dense": lambda: longattn.method("dense"),
    "dense_chunked": lambda: longattn.method("dense_chunked", chunk=16, block=8),
    "window": lambda: longattn.method("window", window=(9, 4), block=8),
    "pattern": lambda: longattn.method("pattern", mask=masks.from_mask_mod(sliding_window_mod(12)), block=16),
}


@pytest.mark.parametrize("per_batch", [False, True], ids=["slopes[H]", "slopes[B,H]"])
@pytest.mark.parametrize("tq,tk", [(48, 48), (32, 72)])
@pytest.mark.parametrize("name,causal", [(n, c) for n in sorted(METHODS) for c in (False, True)
                                         if not (n == "pattern" and c)])  # that mod carries its own causality
def test_alibi_user_slopes_match_flash_attn_bias(name, causal, tq, tk, per_batch):
    b, h = 2, 4
    g = torch.Generator().manual_seed(7)
    slopes = torch.rand(b, h, generator=g) * 0.5 if per_batch else torch.rand(h, generator=g) * 0.5
    q, k, v = make_qkv(b=b, hq=h, hk=2, tq=tq, tk=tk, d=16, seed=11)
    m = METHODS[name]()
    vm = m.visible_mask(tq, tk, causal)
    mask = None if vm is None else vm.dense(b, h, tq, tk)
    out = longattn.attention(q, k, v, causal=causal, method=m, position=positions.ALiBi(h, slopes=slopes))
    ref, _ = longattn.reference_attention(q, k, v, causal=causal, mask=mask, bias=alibi_bias(slopes, b, h, tq, tk))
    assert_close_to_oracle(out, ref)


def test_alibi_slopes_as_given_and_per_batch_rows_differ():
    default = positions.ALiBi(8)
    same = positions.ALiBi(8, slopes=default.slopes.double())
    q, k, v = make_qkv(b=2, hq=8, hk=2, tq=32, tk=32, d=16)
    a = longattn.attention(q, k, v, causal=True, position=default)
    torch.testing.assert_close(longattn.attention(q, k, v, causal=True, position=same), a, atol=1e-6, rtol=1e-6)
    assert positions.ALiBi(8, slopes=default.slopes[None]).slopes.shape == (8,)  # [1, H] is [H]
    # per batch row: row 0 with the default slopes, row 1 with none at all
    rows = torch.stack([default.slopes, torch.zeros(8)])
    out = longattn.attention(q, k, v, causal=True, position=positions.ALiBi(8, slopes=rows))
    torch.testing.assert_close(out[0], a[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[1], longattn.attention(q, k, v, causal=True)[1], atol=1e-6, rtol=1e-6)


def test_alibi_per_batch_score_bias_under_vmap_and_without_b():
    slopes = torch.tensor([[0.5, 0.25, 0.125], [1.0, 0.0, 2.0]])
    enc = positions.ALiBi(3, slopes=slopes)
    f = lambda b, h, q, k: enc.score_bias(h, q, k, b=b)  # noqa: E731 - FlexAttention's argument order
    for dim in range(4):
        f = torch.vmap(f, tuple(0 if d == 3 - dim else None for d in range(4)))
    idx = [torch.arange(n, dtype=torch.int32) for n in (2, 3, 5, 7)]
    i = torch.arange(5).view(-1, 1)
    j = torch.arange(7).view(1, -1)
    expected = -slopes.view(2, 3, 1, 1) * (i - j).abs().float()
    torch.testing.assert_close(f(*idx), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"per-batch slopes \[2, 3\]: score_bias needs the batch index b"):
        enc.score_bias(torch.arange(3).view(1, 3, 1, 1), i, j)


@pytest.mark.parametrize("slopes,err,match", [
    ([0.5, 0.25], TypeError, "slopes must be a torch.Tensor, got list"),
    (torch.ones(4, dtype=torch.bool), TypeError, "slopes must be a real tensor, got dtype torch.bool"),
    (torch.ones(3), ValueError, r"slopes has shape \(3,\), expected \[heads\] = \[4\] or \[batch, heads\] = \[B, 4\]"),
    (torch.ones(2, 5), ValueError, r"slopes has shape \(2, 5\), expected"),
    (torch.ones(2, 2, 4), ValueError, "slopes must have rank 1 or 2, got rank 3"),
    (torch.tensor([0.5, float("nan"), 0.1, float("inf")]), ValueError, "slopes must be finite, got 2 NaN/Inf"),
])
def test_alibi_slopes_validation(slopes, err, match):
    with pytest.raises(err, match=match):
        positions.ALiBi(4, slopes=slopes)


def test_alibi_per_batch_slopes_must_match_the_batch():
    enc = positions.ALiBi(4, slopes=torch.rand(3, 4))
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=16, tk=16, d=8)
    with pytest.raises(ValueError, match=r"q has batch 2 but .*slopes have shape \[3, 4\].*expected batch 3"):
        longattn.attention(q, k, v, causal=True, position=enc)
    with pytest.raises(ValueError, match="q has 4 heads but this ALiBi was built for heads=2"):
        longattn.attention(q, k, v, causal=True, position=positions.ALiBi(2, slopes=torch.rand(2, 2)))
    # rows of different key lengths run in groups, which per-batch slopes cannot follow
    per_row = positions.ALiBi(4, slopes=torch.rand(2, 4))
    with pytest.raises(ValueError, match="cannot take per-batch slopes"):
        longattn.attention(q, k, v, causal=True, position=per_row, seqlens_k=torch.tensor([16, 9]))


@pytest.mark.flex
@pytest.mark.skipif(flex.flex_unavailable_reason() is not None, reason=str(flex.flex_unavailable_reason()))
def test_flex_takes_per_batch_alibi_slopes():
    b, h, tq, tk = 2, 4, 128, 256
    slopes = torch.rand(b, h, generator=torch.Generator().manual_seed(3))
    q, k, v = make_qkv(b=b, hq=h, hk=2, tq=tq, tk=tk, d=16, seed=4)
    m = longattn.method("window", window=(40, 8), backend="flex")
    out, stats = longattn.attention(q, k, v, causal=True, method=m, position=positions.ALiBi(h, slopes=slopes),
                                    return_stats=True)
    assert stats.path == "flex"
    mask = m.visible_mask(tq, tk, True).dense(b, h, tq, tk)
    ref, _ = longattn.reference_attention(q, k, v, mask=mask, bias=alibi_bias(slopes, b, h, tq, tk))
    assert_close_to_oracle(out, ref)


@pytest.mark.flex
@pytest.mark.skipif(flex.flex_unavailable_reason() is not None, reason=str(flex.flex_unavailable_reason()))
def test_flex_runs_a_top_left_cross_attention_mask_mod():
    """Compiled FlexAttention gets longattn positions and the adapter turns them back into
    FlexAttention's top-left q_idx: Flamingo-style cross attention, tokens_q != tokens_k."""
    text_image = torch.tensor([-1] * 10 + [0] * 50 + [1] * 40 + [2] * 28)  # 128 text tokens
    mod = flamingo_mod(text_image, 64)
    q, k, v = make_qkv(b=2, hq=4, hk=2, tq=128, tk=192, d=16, seed=6)
    m = longattn.method("pattern", mask=masks.from_mask_mod(mod), backend="flex")
    out, stats = longattn.attention(q, k, v, method=m, return_stats=True)
    assert stats.path == "flex"
    ref, _ = longattn.reference_attention(q, k, v, mask=dense_from_mod(mod, 2, 4, 128, 192))
    assert_close_to_oracle(out, ref)
