"""The exact sparse kernel: its batched path (all query blocks at once) against the per-query-block
path and the float64 oracle, on random selections (including unused slots and partial blocks)."""

import itertools
import math

import pytest
import torch

import longattn.sparse.kernel as kernel
from longattn.sparse.select import Selection
from conftest import assert_close_to_oracle, make_qkv


def random_selection(g, b, hq, tq, tk, q_block, block, n_sel, causal):
    """Random sorted block indices: under causality the query block's own blocks are always in
    (as every selector forces them), the rest random among the visible, some slots left unused."""
    off = tk - tq
    n_blocks, n_qb = math.ceil(tk / block), math.ceil(tq / q_block)
    idx = torch.full((b, hq, n_qb, n_sel), -1, dtype=torch.long)
    for bb, h, i in itertools.product(range(b), range(hq), range(n_qb)):
        qlo, qhi = i * q_block + off, min((i + 1) * q_block, tq) - 1 + off
        visible = math.ceil((qhi + 1) / block) if causal else n_blocks
        forced = list(range(qlo // block, visible)) if causal else []
        others = [j for j in range(visible) if j not in forced]
        take = max(0, n_sel - len(forced) - int(torch.randint(0, 2, (), generator=g)))
        chosen = torch.tensor(others, dtype=torch.long)[torch.randperm(len(others), generator=g)][:take]
        pick = sorted(set(forced) | set(chosen.tolist()))
        assert len(pick) <= n_sel
        idx[bb, h, i, :len(pick)] = torch.tensor(pick, dtype=torch.long)
    return Selection(idx.sort(-1).values, q_block, block)


def mask_of(selection, tq, tk, causal):
    """The token visibility ``[B, Hq, Tq, Tk]`` a selection means."""
    b, hq, n_qb, _ = selection.indices.shape
    vis = torch.zeros(b, hq, tq, tk, dtype=torch.bool)
    for bb, h, i in itertools.product(range(b), range(hq), range(n_qb)):
        q0, q1 = i * selection.q_block, min((i + 1) * selection.q_block, tq)
        for j in selection.indices[bb, h, i].tolist():
            if j >= 0:
                vis[bb, h, q0:q1, j * selection.block:(j + 1) * selection.block] = True
    if causal:
        vis &= torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    return vis


@pytest.mark.parametrize("trial", range(24))
def test_batched_path_matches_oracle_and_per_block_path(trial, monkeypatch):
    g = torch.Generator().manual_seed(trial)
    causal = trial % 3 != 0
    hk, grp = 1 + trial % 2, 1 + (trial // 2) % 2
    hq, b, d = hk * grp, 1 + trial % 2, 16
    block = (8, 16)[trial % 2]
    q_block = block * (1 + (trial // 4) % 2)
    tk = int(torch.randint(40, 160, (), generator=g))
    tq = tk - block * (trial % 3) if causal else int(torch.randint(10, 160, (), generator=g))
    q, k, v = (torch.randn(b, h, t, d, generator=g) for h, t in ((hq, tq), (hk, tk), (hk, tk)))
    n_blocks = math.ceil(tk / block)
    # at least the query block's own key blocks fit (selectors guarantee it: they force them)
    n_sel = int(torch.randint(min(n_blocks, q_block // block + 1), n_blocks + 1, (), generator=g))
    sel = random_selection(g, b, hq, tq, tk, q_block, block, n_sel, causal)
    assert kernel.batched_path_applies(sel, tq, tk, causal, None, True) or sel.indices.shape[2] < 2
    # the torch paths themselves (the native kernel, chosen first where built, has its own tests)
    monkeypatch.setattr(kernel, "sparse_prefill_applies", lambda *a, **kw: False)

    out, lse, info = kernel.sparse_attention(q, k, v, sel, scale=0.3, causal=causal, count_pairs=True)
    vis = mask_of(sel, tq, tk, causal)
    ref, ref_lse = longattn_reference(q, k, v, vis)
    assert_close_to_oracle(out, ref)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = ~torch.isinf(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=2e-5, rtol=1e-5)
    assert info.visible_pairs == pytest.approx(float(vis.sum()) / (b * hq))

    monkeypatch.setattr(kernel, "batched_path_applies", lambda *a: False)
    out2, lse2, info2 = kernel.sparse_attention(q, k, v, sel, scale=0.3, causal=causal, count_pairs=True)
    torch.testing.assert_close(out, out2, atol=2e-6, rtol=1e-5)
    assert info2.visible_pairs == pytest.approx(info.visible_pairs)


def longattn_reference(q, k, v, vis):
    import longattn

    return longattn.reference_attention(q, k, v, scale=0.3, mask=vis)


@pytest.mark.parametrize("causal", [True, False])
def test_flex_backend_runs_the_same_selection(causal):
    """Compiled FlexAttention over a selection's block mask equals the gather kernel."""
    from longattn.kernels.flex import flex_unavailable_reason

    if flex_unavailable_reason() is not None:
        pytest.skip(flex_unavailable_reason())
    import longattn

    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=256, tk=256, d=16, seed=11)
    common = dict(budget=128, block=32, q_block=32, sinks=32, window=0)
    ref, st_ref = longattn.attention(q, k, v, causal=causal, method=longattn.method("landmark", **common), return_stats=True)
    out, st = longattn.attention(q, k, v, causal=causal, method=longattn.method("landmark", backend="flex", **common),
                                 return_stats=True)
    assert st.path == "flex" and st_ref.path == "sparse"
    assert torch.equal(st.extra["selected_blocks"], st_ref.extra["selected_blocks"])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert st.density == pytest.approx(st_ref.density)


def test_flex_backend_refuses_what_it_cannot_do():
    import longattn

    with pytest.raises(ValueError, match="q_block == block"):
        longattn.method("quest", backend="flex", block=32, q_block=64, budget=256)
    with pytest.raises(ValueError, match="backend must be"):
        longattn.method("quest", backend="cuda")
    q, k, v = make_qkv(b=1, hq=2, hk=2, tq=64, tk=64, d=8)
    m = longattn.method("quest", backend="flex", block=16, q_block=16, budget=64, sinks=16, window=0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        longattn.attention(q, k, v, causal=True, method=m, key_padding_mask=torch.ones(1, 64, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("m,n", [(4, 8), (3, 7), (64, 130), (33, 300)])
def test_fused_flash_reads_a_float32_mask_right_in_every_input_dtype(dtype, m, n):
    """Regression: torch's CPU flash op took a float32 mask with float64 inputs and read it as
    float64 (4 queries over 8 keys: off by 0.45), which made the sparse kernel's per-block path
    silently wrong on float64 inputs."""
    from longattn.kernels.sdpa import fused_flash

    g = torch.Generator().manual_seed(m * n)
    q, k, v = (torch.randn(2, 2, t, 16, generator=g).to(dtype) for t in (m, n, n))
    vis = torch.arange(n)[None, :] <= torch.arange(m)[:, None] + (n - m)
    add = torch.zeros(1, 1, m, n).masked_fill(~vis, -math.inf)
    out, _ = fused_flash(q, k, v, scale=0.4, attn_mask=add)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.4
    ref = torch.softmax(s.masked_fill(~vis, -math.inf), -1) @ v.double()
    tol = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
