import torch
from hypothesis import given, settings, strategies as st

import longattn
from conftest import make_qkv


@settings(max_examples=60, deadline=None)
@given(tk=st.integers(1, 40), parts=st.integers(1, 6), seed=st.integers(0, 10_000), causal=st.booleans())
def test_merging_any_partition_of_keys_equals_full_attention(tk, parts, seed, causal):
    q, k, v = make_qkv(b=1, hq=4, hk=2, tq=min(7, tk), tk=tk, d=8, seed=seed)
    full_out, full_lse = longattn.reference_attention(q, k, v, causal=causal)
    # a random partition of the keys into disjoint (not necessarily contiguous) sets
    g = torch.Generator().manual_seed(seed)
    owner = torch.randint(0, parts, (tk,), generator=g)
    tq = q.shape[2]
    causal_mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq) if causal else torch.ones(tq, tk, dtype=torch.bool)
    outs, lses = [], []
    for p in range(parts):
        o, l = longattn.reference_attention(q, k, v, mask=causal_mask & (owner == p)[None, :])
        outs.append(o)
        lses.append(l)
    out, lse = longattn.merge_partials(outs, lses)
    torch.testing.assert_close(out, full_out)
    torch.testing.assert_close(lse, full_lse)


def test_merge_of_pieces_that_saw_nothing_gives_zero_and_minus_inf():
    o = torch.randn(1, 1, 3, 4)
    l = torch.full((1, 1, 3), float("-inf"))
    out, lse = longattn.merge_partials([o, o], [l, l])
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_merge_rejects_mismatched_pieces():
    import pytest

    o = torch.zeros(1, 1, 3, 4)
    with pytest.raises(ValueError, match="one lse per output"):
        longattn.merge_partials([o, o], [torch.zeros(1, 1, 3)])
    with pytest.raises(ValueError, match=r"lses\[0\] has shape"):
        longattn.merge_partials([o], [torch.zeros(1, 1, 4)])
