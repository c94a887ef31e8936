"""ACT (longattn.calibrate.act): the re-weighting against a float64 hand computation, factor 1
changes nothing, heads and layers it does not name stay bitwise unchanged, and the head choice keeps
exactly the heads that lower the loss."""

from __future__ import annotations

import pytest
import torch

from longattn.analysis import Site, dense_attend, retrieval_subject
from longattn.analysis.subject import Subject
from longattn.calibrate import ACT, calibrated_attention, select_heads


def reference_act(q, k, v, *, scale, factor, alpha):
    """ACT by its definition on full float64 matrices (causal, one batch row, MHA)."""
    q, k, v = q.double(), k.double(), v.double()
    t = q.shape[2]
    s = (q @ k.transpose(-1, -2)) * scale
    seen = torch.ones(t, t, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~seen, float("-inf")), -1)           # [B, H, T, T]
    sinks = p.mean(2) > alpha / t                     # mean over the rows of the attention received
    sinks[..., 0] = False
    out = torch.empty_like(q[..., :v.shape[-1]])
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            m = sinks[b, h].double()
            for i in range(t):
                row = p[b, h, i]
                on = float((row * m).sum())
                rest = float(row.sum()) - on
                new = row.clone() if rest <= 0 else row * (m * factor + (1 - m) * (1 + (1 - factor) * on / rest))
                out[b, h, i] = new @ v[b, h]
    return out, sinks


def sink_inputs(seed=0, t=48, d=16, heads=3):
    """Random q/k/v where key 11 is a strong sink for every head."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u = 2.0 * u / u.norm()                                   # a direction every query shares
    q = torch.randn(1, heads, t, d, generator=g) * 0.5 + u
    k = torch.randn(1, heads, t, d, generator=g) * 0.3
    k[:, :, 11] = u * 3.0
    v = torch.randn(1, heads, t, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("factor", [0.0, 0.4, 0.9])
def test_calibrated_attention_matches_its_definition(factor):
    q, k, v = sink_inputs()
    got, sinks = calibrated_attention(q, k, v, scale=0.25, causal=True, heads=[0, 1, 2], factor=factor, alpha=5.0,
                                      tile=7)
    ref, ref_sinks = reference_act(q, k, v, scale=0.25, factor=factor, alpha=5.0)
    assert torch.equal(sinks, ref_sinks)
    assert bool(sinks[..., 11].all()), "the planted sink is found in every head"
    assert torch.allclose(got.double(), ref, atol=1e-5)


def test_factor_one_and_unnamed_heads_change_nothing():
    q, k, v = sink_inputs()
    site = Site(0, 0.25, True)
    base = dense_attend(site, q, k, v)
    assert torch.equal(ACT([(0, 1)], factor=1.0)(site, q, k, v), base)
    out = ACT([(0, 1)], factor=0.4)(site, q, k, v)
    assert torch.equal(out[:, [0, 2]], base[:, [0, 2]])          # heads it does not name: bitwise
    assert not torch.allclose(out[:, 1], base[:, 1], atol=1e-3)   # the named head moved
    assert torch.equal(ACT([(1, 1)], factor=0.4)(site, q, k, v), base)  # another layer: untouched


def test_act_on_a_model_leaves_it_unchanged_at_factor_one():
    subject = retrieval_subject()
    ids = torch.randint(16, 48, (1, 64), generator=torch.Generator().manual_seed(0))
    assert torch.equal(subject.run(ids, ACT(subject.heads(), factor=1.0)), subject.run(ids))


def test_act_refuses_a_factor_outside_0_1():
    with pytest.raises(ValueError, match="factor"):
        ACT([(0, 0)], factor=1.5)


class TwoHeads(Subject):
    name, n_layers, n_heads, n_kv_heads, head_dim, causal = "stub", 1, 3, 3, 4, True


def test_select_heads_keeps_only_heads_that_lower_the_loss():
    # a loss that ACT on head 1 lowers, on head 2 lowers alone but not on top of head 1, on head 0 raises
    def loss(attend):
        heads = set(getattr(attend, "heads", []) or [])
        value = 1.0
        if (0, 1) in heads:
            value -= 0.10
        if (0, 2) in heads:
            value -= 0.05 if (0, 1) not in heads else -0.01
        if (0, 0) in heads:
            value += 0.20
        return value

    kept, gains = select_heads(TwoHeads(), loss, min_gain=1e-4)
    assert kept == [(0, 1)]
    assert gains[(0, 1)] == pytest.approx(0.10) and gains[(0, 0)] == pytest.approx(-0.20)
