"""Trainable sparse attention: gradients through the shared block-sparse kernel at partial
selections, trained Landmark Attention's grouped softmax (against the paper's formula, one query at
a time in float64), its retrieval and position layout, its data pipeline, and MoBA."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import longattn
import longattn.sparse.kernel as kernel
from longattn.core.positions import RoPE
from longattn.sparse.landmark import grouped_attention, grouped_reference, landmark_scores, select_landmark_blocks
from longattn.tasks import synthetic
from longattn.train.landmarks import LANDMARK_ID, WithLandmarks, insert_landmarks, landmark_index, with_landmarks
from test_sparse_kernel import mask_of, random_selection


def _qkv(b, hq, hk, tq, tk, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, tq, d, generator=g, dtype=dtype), torch.randn(b, hk, tk, d, generator=g, dtype=dtype),
            torch.randn(b, hk, tk, d, generator=g, dtype=dtype))


# ---------------------------------------------------------------- the block-sparse kernel's backward

@pytest.mark.parametrize("trial", range(6))
def test_sparse_kernel_gradients_at_a_partial_selection(trial, monkeypatch):
    """gradcheck of the gather kernel at a random selection, and its gradients equal the float64
    dense masked reference's on the mask that selection means. The kernel computes in float32
    (its partial results merge there), so finite differences take float32's step and tolerances
    (as ``test_gradients.test_gradcheck``)."""
    monkeypatch.setattr(kernel, "sparse_prefill_applies", lambda *a, **kw: False)
    g = torch.Generator().manual_seed(trial)
    causal = trial % 3 != 2
    hk, grp = 1 + trial % 2, 1 + (trial // 2) % 2
    block = 4
    q_block = block * (1 + trial % 2)
    tk = 21 + trial
    tq = tk - block * (trial % 2) if causal else 13
    q, k, v = _qkv(1, hk * grp, hk, tq, tk, 4, trial)
    n_blocks = math.ceil(tk / block)
    sel = random_selection(g, 1, hk * grp, tq, tk, q_block, block, max(q_block // block + 1, n_blocks - 2), causal)

    def run(q, k, v):
        return kernel.sparse_attention(q, k, v, sel, scale=0.4, causal=causal)[0]

    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.autograd.gradcheck(run, inputs, eps=1e-3, atol=2e-3, rtol=1e-2, nondet_tol=1e-6)
    vis = mask_of(sel, tq, tk, causal)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref, _ = longattn.reference_attention(*ref, scale=0.4, mask=vis)
    w = torch.randn(out_ref.shape, generator=g, dtype=torch.float64)
    (out_ref.nan_to_num(0.0) * w).sum().backward()
    out = run(*inputs)
    torch.testing.assert_close(out.double(), out_ref.nan_to_num(0.0), atol=2e-5, rtol=1e-4)
    (out * w).sum().backward()
    for mine, theirs in zip(inputs, ref):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=5e-5, rtol=1e-4)


# ------------------------------------------------------------------------- landmark grouped softmax

def test_grouped_softmax_on_a_hand_built_case():
    """Two blocks of L=3 (two ordinary tokens and a landmark), one query at position 4 (block 1):
    weights by hand from the paper's formula."""
    d = 2
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.5, 0.5], [0.0, 0.0]], dtype=torch.float64)
    v = torch.eye(5, dtype=torch.float64)[:, :d].clone()
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0], [3.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    q = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    s = (k @ q[0]).tolist()  # scale 1: [1, 2, 2, 1.5, 0]
    # direct set: landmark 2 of block 0, own tokens 3, 4
    direct = [math.exp(s[2]), math.exp(s[3]), math.exp(s[4])]
    z = sum(direct)
    inner = [math.exp(s[0]), math.exp(s[1])]
    zi = sum(inner)
    expected = (direct[0] / z) * (inner[0] / zi * v[0] + inner[1] / zi * v[1]) + direct[1] / z * v[3] + direct[2] / z * v[4]
    q4, k4, v4 = q[None, None], k[None, None], v[None, None]
    sel = select_landmark_blocks(landmark_scores(q4, k4, block=3, scale=1.0), first_block=1, top_k=None, local=1)
    out, lse = grouped_attention(q4, k4, v4, sel, block=3, scale=1.0)
    torch.testing.assert_close(out[0, 0, 0], expected)
    torch.testing.assert_close(lse[0, 0, 0].double(), torch.tensor(math.log(z), dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(grouped_reference(q4, k4, v4, block=3, scale=1.0)[0, 0, 0], expected)
    # the landmark's own value (row 2, 9s) never enters
    assert float(out.max()) < 3.0


@pytest.mark.parametrize("b,hq,hk,tq,tk,block", [(2, 4, 2, 37, 37, 8), (1, 2, 1, 5, 37, 8), (1, 2, 2, 16, 16, 4),
                                                 (1, 2, 1, 1, 33, 8), (1, 1, 1, 3, 3, 8), (1, 2, 1, 9, 40, 5)])
def test_grouped_softmax_matches_the_formula(b, hq, hk, tq, tk, block):
    q, k, v = _qkv(b, hq, hk, tq, tk, 8, tq * 7 + tk)
    sel = select_landmark_blocks(landmark_scores(q, k, block=block, scale=0.3), first_block=(tk - tq) // block,
                                 top_k=None, local=1)
    out, lse = grouped_attention(q, k, v, sel, block=block, scale=0.3)
    torch.testing.assert_close(out, grouped_reference(q, k, v, block=block, scale=0.3), atol=1e-12, rtol=1e-10)
    assert lse.shape == (b, hq, tq) and torch.isfinite(lse).all()


@pytest.mark.parametrize("top_k,local", [(1, 1), (2, 1), (3, 0), (2, 2)])
def test_retrieval_runs_the_formula_over_the_kept_blocks(top_k, local):
    """top-k retrieval = the paper's formula restricted to the selected blocks (per query block and
    head), the `local` nearest blocks always among them."""
    block, tq, tk = 6, 30, 45
    q, k, v = _qkv(1, 4, 2, tq, tk, 8, top_k * 10 + local)
    first = (tk - tq) // block
    sel = select_landmark_blocks(landmark_scores(q, k, block=block, scale=0.5), first_block=first, top_k=top_k,
                                 local=local)
    out, _ = grouped_attention(q, k, v, sel, block=block, scale=0.5)
    n_blocks = tk // block
    allowed = torch.zeros(1, 4, tq, n_blocks, dtype=torch.bool)
    for t in range(tq):
        c = (tk - tq + t) // block - first
        for h in range(4):
            kept = [j for j in sel[0, h, c].tolist() if j >= 0]
            assert len(kept) == min(top_k, (tk - tq + t) // block) or len(kept) == min(top_k, first + c)
            own = first + c
            assert all(j < own for j in kept)
            assert set(range(max(0, own - local), own)) <= set(kept)
            allowed[0, h, t, kept] = True
    ref = grouped_reference(q, k, v, block=block, scale=0.5, blocks=allowed)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)


def test_one_block_is_causal_softmax_attention():
    q, k, v = _qkv(2, 4, 2, 20, 50, 8, 3)
    out = longattn.attention(q, k, v, causal=True, method=longattn.method("landmark_trained", block=64))
    ref, _ = longattn.reference_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)  # attention() computes in float32


def test_rotary_layout_with_every_block_is_the_text_positions():
    """With every block kept the re-laid-out positions are the text's (landmarks sharing the next
    token's position) shifted by a constant: the same as rotating q/k there and running the formula."""
    from longattn.sparse.landmark import landmark_text_positions

    rope = RoPE(8)
    q, k, v = _qkv(1, 2, 1, 19, 40, 8, 4)
    m = longattn.method("landmark_trained", block=6)
    out = longattn.attention(q, k, v, causal=True, method=m, position=rope)
    pos = landmark_text_positions(torch.arange(40), 6)
    assert pos[:13].tolist() == [0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 10]  # landmarks at 5 and 11
    qr, kr = rope.rotate(q, k, pos[21:], pos)
    torch.testing.assert_close(out, grouped_reference(qr, kr, v, block=6, scale=8 ** -0.5), atol=1e-6, rtol=1e-5)


def test_rotary_retrieval_keeps_distances_inside_the_window():
    """With top_k blocks kept, a far block is attended as if it sat right before the query's block:
    moving the whole context far away (a long prefix of other blocks) leaves the output the same
    when the same blocks win."""
    rope = RoPE(8)
    block = 4
    q, k, v = _qkv(1, 1, 1, 4, 16, 8, 5)
    m = longattn.method("landmark_trained", block=block, top_k=3, local=3)
    near = longattn.attention(q, k, v, causal=True, method=m, position=rope)
    # the same last 3 blocks + own block after 40 unrelated blocks: local=3 keeps exactly them
    g = torch.Generator().manual_seed(9)
    pre_k = torch.randn(1, 1, 160, 8, generator=g, dtype=torch.float64)
    far = longattn.attention(q, torch.cat([pre_k, k], 2), torch.cat([pre_k, v], 2), causal=True, method=m, position=rope)
    torch.testing.assert_close(far, near, atol=1e-6, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(t=st.integers(2, 40), block=st.integers(2, 9), top_k=st.one_of(st.none(), st.integers(1, 4)),
       cut=st.integers(0, 39), seed=st.integers(0, 10_000))
def test_landmark_is_causal(t, block, top_k, cut, seed):
    """No key after a query reaches it, through the kernel or through the selection."""
    cut = min(cut, t - 1)
    q, k, v = _qkv(1, 2, 1, t, t, 4, seed)
    m = longattn.method("landmark_trained", block=block, top_k=top_k, local=min(1, top_k or 1))
    out = longattn.attention(q, k, v, causal=True, method=m, position=RoPE(4))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, cut + 1:] += 5.0
    v2[:, :, cut + 1:] -= 3.0
    out2 = longattn.attention(q, k2, v2, causal=True, method=m, position=RoPE(4))
    torch.testing.assert_close(out2[:, :, :cut + 1], out[:, :, :cut + 1], atol=1e-12, rtol=0)


def test_landmark_gradients():
    """gradcheck of the kernel in float64 at a top-k selection (with the rotary layout), and of the
    method through attention() (float32 compute: float32's step and tolerances)."""
    q, k, v = _qkv(1, 2, 1, 14, 14, 4, 6)
    rope = RoPE(4)
    sel = select_landmark_blocks(landmark_scores(q, k, block=4, scale=0.5, position=rope), first_block=0, top_k=2,
                                 local=1)
    assert bool((sel >= 0).sum(-1).max() == 2)
    assert torch.autograd.gradcheck(
        lambda q, k, v: grouped_attention(q, k, v, sel, block=4, scale=0.5, position=rope)[0],
        [t.clone().requires_grad_() for t in (q, k, v)])
    m = longattn.method("landmark_trained", block=4, top_k=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.autograd.gradcheck(
            lambda q, k, v: longattn.attention(q, k, v, causal=True, method=m, position=rope),
            [t.clone().requires_grad_() for t in (q, k, v)], eps=1e-3, atol=2e-3, rtol=1e-2)


def test_landmark_key_padding_and_dead_rows():
    """A padded ordinary key leaves its block's softmax; a block with its landmark padded takes no
    share; a row that sees nothing gives zeros, not NaN."""
    q, k, v = _qkv(1, 2, 1, 12, 12, 4, 7)
    pad = torch.ones(1, 12, dtype=torch.bool)
    pad[0, 1] = False  # an ordinary key of block 0
    m = longattn.method("landmark_trained", block=4)
    out = longattn.attention(q, k, v, causal=True, method=m, key_padding_mask=pad)
    keep = [i for i in range(12) if i != 1]
    # the same as the formula on block 0 with that key's score at -inf: drop it by zeroing its value
    # and moving it out of the softmax — checked against a manual grouped computation
    s = (q[0, 0, 5] @ k[0, 0].T) * 0.5
    inner = torch.softmax(s[[0, 2]], 0)
    z = torch.logsumexp(s[[3, 4, 5]], 0)
    expected = torch.exp(s[3] - z) * (inner @ v[0, 0, [0, 2]]) + torch.exp(s[4] - z) * v[0, 0, 4] + \
        torch.exp(s[5] - z) * v[0, 0, 5]
    torch.testing.assert_close(out[0, 0, 5], expected)
    assert keep
    dead = torch.zeros(1, 12, dtype=torch.bool)
    dead[0, 8:] = True
    out = longattn.attention(q, k, v, causal=True, method=m, key_padding_mask=dead)
    assert torch.isfinite(out).all() and float(out[0, :, :8].abs().max()) == 0.0


# ------------------------------------------------------------------------------- the data pipeline

def test_landmarks_are_inserted_every_block():
    tokens = torch.arange(20)[None] + 10
    out = insert_landmarks(tokens, block=4, landmark_id=99)
    assert out.shape == (1, 26)
    assert out[0, 3::4].tolist() == [99] * 6
    assert out[0][out[0] != 99].tolist() == tokens[0].tolist()
    torch.testing.assert_close(out[0, landmark_index(torch.arange(20), 4)], tokens[0])


def test_with_landmarks_moves_answers_with_their_tokens():
    batch = synthetic.passkey(200, 0.5, 3, seed=1)
    moved = with_landmarks(batch, block=8)
    assert moved.tokens.shape[1] == 200 + 200 // 7
    torch.testing.assert_close(moved.targets, batch.targets)
    assert bool((moved.tokens[:, 7::8] == LANDMARK_ID).all())
    recipe = WithLandmarks({"name": "mqar", "length": 64, "pairs": [4]}, block=16)
    assert recipe.longest == 64 + 64 // 15
    assert recipe.batch(3, 0, 512).tokens.shape[1] == recipe.longest
    from longattn.train.data import recipe_from_dict

    assert recipe_from_dict(recipe.to_dict()) == recipe


def test_landmark_method_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="block must be >= 2"):
        longattn.method("landmark_trained", block=1)
    with pytest.raises(ValueError, match="local=3"):
        longattn.method("landmark_trained", top_k=2, local=3)
    q, k, v = _qkv(1, 1, 1, 4, 4, 4, 0)
    with pytest.raises(ValueError, match="causal"):
        longattn.attention(q, k, v, causal=False, method="landmark_trained")


# -------------------------------------------------------------------------------------------- MoBA

def test_moba_full_selection_is_dense():
    q, k, v = _qkv(2, 4, 2, 50, 70, 8, 11, dtype=torch.float32)
    out = longattn.attention(q, k, v, causal=True, method=longattn.method("moba", block=8, top_k=16, q_block=8))
    ref, _ = longattn.reference_attention(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("q_block", [1, 8])
def test_moba_selection_and_gradients_equal_the_masked_reference(q_block):
    """Forward and gradients equal dense masked attention on the blocks MoBA kept; every query keeps
    its own block and at most top_k blocks."""
    q, k, v = _qkv(1, 2, 1, 40, 40, 4, q_block)
    m = longattn.method("moba", block=8, top_k=2, q_block=q_block)
    out, stats = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    idx = stats.extra["selected_blocks"]
    from longattn.sparse.select import Selection

    sel = Selection(idx, q_block, 8)
    for i in range(idx.shape[2]):
        own = (i * q_block) // 8
        assert bool((idx[..., i, :] == own).any(-1).all())
    assert stats.density < 0.8
    vis = mask_of(sel, 40, 40, True)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref, _ = longattn.reference_attention(*ref, scale=0.5, mask=vis)
    torch.testing.assert_close(out, out_ref, atol=2e-5, rtol=1e-4)  # the sparse kernel computes in float32
    w = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (out_ref * w).sum().backward()
    (longattn.attention(*mine, causal=True, method=m) * w).sum().backward()
    for a, b_ in zip(mine, ref):
        torch.testing.assert_close(a.grad, b_.grad, atol=5e-5, rtol=1e-4)


@settings(max_examples=15, deadline=None)
@given(t=st.integers(2, 48), cut=st.integers(0, 47), q_block=st.sampled_from([1, 4, 8]), seed=st.integers(0, 999))
def test_moba_is_causal(t, cut, q_block, seed):
    cut = min(cut, t - 1)
    q, k, v = _qkv(1, 2, 1, t, t, 4, seed)
    m = longattn.method("moba", block=4, top_k=3, q_block=q_block)
    out = longattn.attention(q, k, v, causal=True, method=m)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, cut + 1:] *= -4.0
    v2[:, :, cut + 1:] += 2.0
    out2 = longattn.attention(q, k2, v2, causal=True, method=m)
    torch.testing.assert_close(out2[:, :, :cut + 1], out[:, :, :cut + 1], atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------- NSA

def _nsa(**kw):
    base = dict(block=8, top_n=3, local=1, compress_block=8, compress_stride=4, window=6, q_block=8)
    return longattn.method("nsa", **{**base, **kw})


def _nsa_reference(q, k, v, m, selection, scale):
    """The three branches in float64 from their definitions (mean-pooled compression)."""
    b, hq, t, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    kk, vv = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    pos = torch.arange(t)
    l, st = m.compress_block, m.compress_stride
    starts = list(range(0, t - l + 1, st))
    kc = torch.stack([kk[:, :, s:s + l].mean(2) for s in starts], 2)
    vc = torch.stack([vv[:, :, s:s + l].mean(2) for s in starts], 2)
    ends = torch.tensor([s + l - 1 for s in starts])
    s_c = (q.double() @ kc.transpose(-1, -2)) * scale
    s_c = s_c.masked_fill(ends[None, :] > pos[:, None], -math.inf)
    o_c = torch.softmax(s_c, -1).nan_to_num(0.0) @ vc
    vis = mask_of(selection, t, t, True)
    o_s, _ = longattn.reference_attention(q.double(), k.double(), v.double(), scale=scale, mask=vis)
    win = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - m.window)
    o_w, _ = longattn.reference_attention(q.double(), k.double(), v.double(), scale=scale, mask=win)
    gc, gs, gw = m.gates
    return gc * o_c + gs * o_s + gw * o_w


def test_nsa_branches_equal_their_definitions():
    q, k, v = _qkv(1, 4, 2, 45, 45, 8, 21, dtype=torch.float32)
    m = _nsa(gates=(0.5, 0.3, 0.2))
    out, stats = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    from longattn.sparse.select import Selection

    idx = stats.extra["selected_blocks"]
    sel = Selection(idx, 8, 8)
    torch.testing.assert_close(out.double(), _nsa_reference(q, k, v, m, sel, 8 ** -0.5), atol=2e-5, rtol=1e-4)
    # one selection per key head (shared by its two query heads); the first and own block always in
    assert torch.equal(idx[:, 0], idx[:, 1]) and torch.equal(idx[:, 2], idx[:, 3])
    for i in range(idx.shape[2]):
        kept = set(idx[0, 0, i].tolist())
        assert {0, i} <= kept and len(kept - {-1}) <= 3


@settings(max_examples=15, deadline=None)
@given(t=st.integers(2, 48), cut=st.integers(0, 47), seed=st.integers(0, 999))
def test_nsa_is_causal_with_learned_parts(t, cut, seed):
    from longattn.methods.nsa import NSAParams

    cut = min(cut, t - 1)
    q, k, v = _qkv(1, 2, 1, t, t, 4, seed, dtype=torch.float32)
    params = NSAParams(4, 2, 1, compress_block=8)
    with torch.no_grad():
        for p in params.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    m = _nsa(learned=params, q_block=8)
    out = longattn.attention(q, k, v, causal=True, method=m)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, cut + 1:] *= -3.0
    v2[:, :, cut + 1:] += 1.0
    out2 = longattn.attention(q, k2, v2, causal=True, method=m)
    torch.testing.assert_close(out2[:, :, :cut + 1], out[:, :, :cut + 1], atol=1e-6, rtol=0)


def test_nsa_trains_end_to_end():
    """Gradients reach q, k, v and every learned part (φ's maps and embeddings, the gates)."""
    from longattn.methods.nsa import NSAParams

    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 40, 40, 4, 3, dtype=torch.float32))
    params = NSAParams(4, 2, 1, compress_block=8)
    with torch.no_grad():
        params.mix_k.normal_(0, 0.1)
        params.mix_v.normal_(0, 0.1)  # the embeddings reach the output only through the maps
        params.gate_w.normal_(0, 0.1)
    out = longattn.attention(q, k, v, causal=True, method=_nsa(learned=params))
    out.square().sum().backward()
    for name, p in [("q", q), ("k", k), ("v", v), *params.named_parameters()]:
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    with pytest.raises(ValueError, match="heads=2"):
        longattn.attention(*_qkv(1, 4, 1, 8, 8, 4, 0, dtype=torch.float32), causal=True, method=_nsa(learned=params))


# ------------------------------------------------------------------ Shaw et al. and low-rank MHA

def _shaw_reference(q, k, v, emb_k, emb_v, K, scale, causal):
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    g = hq // hk
    out = torch.zeros(b, hq, tq, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for t in range(tq):
                i = t + tk - tq
                js = [j for j in range(tk) if not causal or j <= i]
                r = [min(max(j - i, -K), K) + K for j in js]
                s = torch.stack([q[bi, h, t] @ (k[bi, h // g, j] + emb_k[rr]) for j, rr in zip(js, r)]) * scale
                p = torch.softmax(s, 0)
                out[bi, h, t] = sum(pj * (v[bi, h // g, j] + emb_v[rr]) for pj, j, rr in zip(p, js, r))
    return out


@pytest.mark.parametrize("causal,tq,tk", [(True, 9, 9), (True, 3, 11), (False, 7, 10)])
def test_shaw_matches_its_formula(causal, tq, tk):
    from longattn.methods.relative import ShawParams

    q, k, v = _qkv(1, 4, 2, tq, tk, 6, tq + tk)
    params = ShawParams(6, 3, seed=1)
    with torch.no_grad():
        params.emb_k.mul_(20.0)
        params.emb_v.mul_(20.0)
    out = longattn.attention(q, k, v, causal=causal, method=longattn.method("shaw", max_distance=3, learned=params))
    ref = _shaw_reference(q, k, v, params.emb_k.double(), params.emb_v.double(), 3, 6 ** -0.5, causal)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)  # computed in float32


def test_shaw_trains_and_refuses_mismatched_parameters():
    from longattn.methods.relative import ShawParams

    params = ShawParams(4, 2)
    q, k, v = (t.float().requires_grad_() for t in _qkv(1, 2, 1, 8, 8, 4, 0))
    out = longattn.attention(q, k, v, causal=True, method=longattn.method("shaw", max_distance=2, learned=params))
    out.square().sum().backward()
    assert float(params.emb_k.grad.abs().sum()) > 0 and float(params.emb_v.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="max_distance=2"):
        longattn.method("shaw", max_distance=3, learned=params)


@pytest.mark.parametrize("context", ["query", "mean"])
@pytest.mark.parametrize("causal", [True, False])
def test_lowrank_mha_matches_its_formula(context, causal):
    from longattn.methods.relative import LowRankParams

    q, k, v = _qkv(1, 4, 2, 12, 12, 8, 5)
    params = LowRankParams(8, 4, rank=3)
    with torch.no_grad():
        params.u.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
        params.v.normal_(0, 1.0, generator=torch.Generator().manual_seed(4))
    m = longattn.method("lowrank_mha", context=context, learned=params)
    out = longattn.attention(q, k, v, causal=causal, method=m)
    u, w = params.u.double(), params.v.double()
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    if context == "mean":
        c = q.cumsum(2) / torch.arange(1, 13, dtype=torch.float64)[:, None] if causal else q.mean(2, keepdim=True).expand_as(q)
    else:
        c = q
    s = torch.einsum("bhtr,bhsr->bhts", torch.einsum("bhtd,hdr->bhtr", c, u), torch.einsum("bhsd,hdr->bhsr", kk, w))
    s = s * 8 ** -0.5
    if causal:
        s = s.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), -math.inf)
    torch.testing.assert_close(out, torch.softmax(s, -1) @ vv, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="rank=9"):
        LowRankParams(8, 4, rank=9)


@settings(max_examples=15, deadline=None)
@given(t=st.integers(2, 40), cut=st.integers(0, 39), budget=st.integers(1, 12), seed=st.integers(0, 999))
def test_dsa_is_causal_with_a_learned_indexer(t, cut, budget, seed):
    """The indexer ranks only keys a query may see: changing later keys changes no earlier row."""
    from longattn.methods.dsa import DSAIndexer

    cut = min(cut, t - 1)
    q, k, v = _qkv(1, 4, 2, t, t, 8, seed, dtype=torch.float32)
    m = longattn.method("dsa_indexer", budget=budget, learned=DSAIndexer(8, 4, 2, index_heads=2, index_dim=4, seed=seed))
    out = longattn.attention(q, k, v, causal=True, method=m)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, cut + 1:] *= 5.0
    v2[:, :, cut + 1:] -= 1.0
    out2 = longattn.attention(q, k2, v2, causal=True, method=m)
    torch.testing.assert_close(out2[:, :, :cut + 1], out[:, :, :cut + 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", [longattn.method("landmark_trained", block=8, top_k=2),
                                    longattn.method("longheads", chunk=8, window=32, local=8)])
def test_methods_placing_rotary_positions_refuse_other_position_kinds(method):
    """A bias or content encoding never reaches them (the API refuses it, naming it); behind the API
    ``methods.base.rotary_position`` (shared by both) refuses any kind but rotary by name."""
    from types import SimpleNamespace

    from longattn.methods.base import rotary_position

    q = torch.randn(1, 2, 32, 8)
    for position, name in ((longattn.positions.ALiBi(heads=2), "ALiBi"), (longattn.positions.CoPE(8, 2), "CoPE")):
        with pytest.raises(ValueError, match=f"score bias \\({name}\\)"):
            longattn.attention(q, q, q, causal=True, method=method, position=position)
        call = SimpleNamespace(bias=None, row_bias=None, position=position)
        with pytest.raises(ValueError, match=f"{method.name}.*rotary positions only.*kind '{position.kind}'"):
            rotary_position(call, method.name, "it places rotary positions")
    rope = longattn.positions.RoPE(8)
    assert rotary_position(SimpleNamespace(bias=None, row_bias=None, position=rope), method.name, "") is rope
    assert rotary_position(SimpleNamespace(bias=None, row_bias=None, position=None), method.name, "") is None
