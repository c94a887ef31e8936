"""Position encodings: each checked against a direct formula or against the float64 oracle with the
bias / rotation materialised densely."""

from __future__ import annotations

import math

import pytest
import torch

import longattn
from longattn.core.positions import (
    ALiBi,
    CoPE,
    LinearScaling,
    NoPE,
    NTKScaling,
    RoPE,
    T5RelativeBias,
    XPos,
    YaRNScaling,
)

ATOL = 2e-5


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _positions(tq, tk):
    return torch.arange(tq) + (tk - tq), torch.arange(tk)


# ---------------------------------------------------------------------------------------------
# RoPE / xPos against direct formulas


def _complex_rotate(x, pos, inv_freq):
    """Independent RoPE: channel pairs (i, i + D/2) as complex numbers times exp(i·pos·ω)."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    rot = torch.polar(torch.ones(len(pos), half, dtype=torch.float64), pos.double()[:, None] * inv_freq[None, :])
    zr = z * rot
    return torch.cat((zr.real, zr.imag), dim=-1)


def test_rope_matches_complex_rotation():
    d = 16
    rope = RoPE(d, theta=500.0)
    q, k = _rand(2, 3, 7, d, seed=1), _rand(2, 3, 9, d, seed=2)
    q_pos, k_pos = torch.arange(7) + 40, torch.arange(9) * 3
    qr, kr = rope.rotate(q, k, q_pos, k_pos)
    inv = 500.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(qr.double(), _complex_rotate(q, q_pos, inv), atol=1e-5, rtol=0)
    torch.testing.assert_close(kr.double(), _complex_rotate(k, k_pos, inv), atol=1e-5, rtol=0)
    assert qr.dtype == torch.float32 and qr.shape == q.shape


@pytest.mark.parametrize("enc", [RoPE(32), RoPE(32, scaling=YaRNScaling(4.0, 64)), XPos(32, scale_base=64)],
                         ids=["rope", "yarn", "xpos"])
def test_rotary_scores_depend_only_on_relative_position(enc):
    q, k = _rand(1, 2, 12, 32, seed=3), _rand(1, 2, 12, 32, seed=4)
    pos = torch.arange(12)
    s0 = torch.matmul(*[t if i == 0 else t.transpose(-1, -2) for i, t in enumerate(enc.rotate(q, k, pos, pos))])
    s1 = torch.matmul(*[t if i == 0 else t.transpose(-1, -2) for i, t in enumerate(enc.rotate(q, k, pos + 1000, pos + 1000))])
    torch.testing.assert_close(s1, s0, atol=2e-4, rtol=1e-4)


def test_xpos_matches_direct_formula():
    d, base = 8, 32.0
    xpos = XPos(d, theta=100.0, scale_base=base)
    q, k = _rand(1, 1, 6, d, seed=5), _rand(1, 1, 10, d, seed=6)
    q_pos, k_pos = _positions(6, 10)
    qr, kr = xpos.rotate(q, k, q_pos, k_pos)
    scores = (qr @ kr.transpose(-1, -2))[0, 0].double()
    half = d // 2
    i = torch.arange(half, dtype=torch.float64)
    omega = 100.0 ** (-2 * i / d)
    zeta = (2 * i / d + 0.4) / 1.4
    zq = torch.complex(q[0, 0, :, :half].double(), q[0, 0, :, half:].double())
    zk = torch.complex(k[0, 0, :, :half].double(), k[0, 0, :, half:].double())
    rel = (q_pos[:, None] - k_pos[None, :]).double()[..., None]  # [Tq, Tk, 1]
    # Re(z_q · conj(z_k) · e^{i(n-m)ω}) · ζ^{(n-m)/base}, summed over pairs
    term = zq[:, None, :] * zk.conj()[None, :, :] * torch.polar(torch.ones_like(rel * omega), rel * omega)
    expected = (term.real * zeta ** (rel / base)).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_xpos_centring_keeps_long_positions_finite_and_rejects_overflow():
    xpos = XPos(16)  # scale_base 512
    q, k = _rand(1, 1, 4, 16, seed=7), _rand(1, 1, 4, 16, seed=8)
    far = torch.arange(4) + 60_000  # uncentred factors would be exp(±147): inf / 0 in float32
    qr, kr = xpos.rotate(q, k, far, far)
    q0, k0 = xpos.rotate(q, k, torch.arange(4), torch.arange(4))
    torch.testing.assert_close(qr @ kr.transpose(-1, -2), q0 @ k0.transpose(-1, -2), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="scale_base"):
        xpos.rotate(q, k, torch.tensor([0, 1, 2, 80_000]), torch.arange(4))


def test_linear_scaling_at_scaled_position_equals_plain_rope():
    f = 4.0
    plain, lin = RoPE(16), RoPE(16, scaling=LinearScaling(f))
    n = torch.arange(0, 300, 7)
    for a, b in zip(lin.cos_sin(n.double() * f), plain.cos_sin(n)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_ntk_scaling_changes_theta_as_stated():
    d, f, theta = 16, 8.0, 10000.0
    ntk = RoPE(d, theta, scaling=NTKScaling(f))
    direct = RoPE(d, theta * f ** (d / (d - 2)))
    torch.testing.assert_close(ntk.inv_freq, direct.inv_freq, rtol=1e-12, atol=0)
    # highest frequency untouched, lowest one interpolated by exactly f
    plain = RoPE(d, theta)
    assert ntk.inv_freq[0] == plain.inv_freq[0] == 1.0
    assert math.isclose(ntk.inv_freq[-1].item(), plain.inv_freq[-1].item() / f, rel_tol=1e-12)


def test_yarn_factor_one_is_plain_rope_and_ramp_ends():
    plain = RoPE(32)
    yarn1 = RoPE(32, scaling=YaRNScaling(1.0, original_max_position=256))
    pos = torch.arange(0, 5000, 13)
    for a, b in zip(yarn1.cos_sin(pos), plain.cos_sin(pos)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    s = YaRNScaling(16.0, original_max_position=256)
    yarn = RoPE(32, scaling=s)
    turns = 256 * plain.inv_freq / (2 * math.pi)
    fast, slow = turns >= 32, turns <= 1
    assert fast.any() and slow.any() and (~fast & ~slow).any()
    torch.testing.assert_close(yarn.inv_freq[fast], plain.inv_freq[fast], rtol=0, atol=0)
    torch.testing.assert_close(yarn.inv_freq[slow], plain.inv_freq[slow] / 16.0, rtol=1e-12, atol=0)
    mid = ~fast & ~slow
    assert ((yarn.inv_freq[mid] < plain.inv_freq[mid]) & (yarn.inv_freq[mid] > plain.inv_freq[mid] / 16)).all()
    # temperature: q·k at equal positions scaled by (0.1 ln s + 1)^2 = 1/t
    q, k = _rand(1, 1, 1, 32, seed=9), _rand(1, 1, 1, 32, seed=10)
    p = torch.zeros(1, dtype=torch.int64)
    qr, kr = yarn.rotate(q, k, p, p)
    assert math.isclose((qr * kr).sum().item(), (q * k).sum().item() * (0.1 * math.log(16) + 1) ** 2, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------
# ALiBi, T5


def test_alibi_slopes():
    assert torch.equal(ALiBi(8).slopes, torch.tensor([2.0 ** -i for i in range(1, 9)]))
    # 12 heads: the 8-head sequence, then every other slope of the 16-head sequence
    s16 = [2.0 ** (-0.5 * i) for i in range(1, 17)]
    expected = [2.0 ** -i for i in range(1, 9)] + s16[0::2][:4]
    torch.testing.assert_close(ALiBi(12).slopes, torch.tensor(expected), rtol=1e-6, atol=0)
    for heads in (1, 3, 8, 12):
        enc = ALiBi(heads)
        torch.testing.assert_close(enc.slope(torch.arange(heads)), enc.slopes, rtol=1e-6, atol=0)


def test_alibi_bias_formula_and_symmetry():
    enc = ALiBi(4)
    h = torch.arange(4).view(1, 4, 1, 1)
    q_pos, k_pos = torch.arange(6).view(-1, 1), torch.arange(6).view(1, -1)
    bias = enc.score_bias(h, q_pos, k_pos)
    expected = -enc.slopes.view(1, 4, 1, 1) * (q_pos - k_pos).abs().float()
    torch.testing.assert_close(bias, expected, atol=0, rtol=0)
    assert bias.dtype == torch.float32
    torch.testing.assert_close(bias, bias.transpose(-1, -2))


def _t5_reference_bucket(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """Scalar, loop-free statement of the T5 bucketing rule."""
    offset = 0
    if bidirectional:
        num_buckets //= 2
        if rel > 0:
            offset = num_buckets
        n = abs(rel)
    else:
        n = max(-rel, 0)
    exact = num_buckets // 2
    if n < exact:
        return offset + n
    b = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (num_buckets - exact))
    return offset + min(b, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets(bidirectional):
    enc = T5RelativeBias(2, num_buckets=32, max_distance=128, bidirectional=bidirectional)
    rel = torch.arange(-400, 401)
    got = enc.bucket(torch.tensor(0), rel)
    expected = torch.tensor([_t5_reference_bucket(r, bidirectional, 32, 128) for r in rel.tolist()])
    assert torch.equal(got, expected)
    before = enc.bucket(torch.tensor(0), -torch.arange(0, 400))  # keys at distance 0, 1, ... before
    assert (before.diff() >= 0).all() and before[0] == 0 and before[-1] == (15 if bidirectional else 31)
    if bidirectional:
        after = enc.bucket(torch.tensor(0), torch.arange(1, 400))
        assert (after.diff() >= 0).all()
        assert torch.equal(after - 16, before[1:])  # same distance, mirrored half
    else:
        assert (enc.bucket(torch.tensor(0), torch.arange(1, 50)) == 0).all()


def test_t5_table_lookup_and_validation():
    table = torch.arange(32 * 3, dtype=torch.float32).view(32, 3)
    enc = T5RelativeBias(3, table=table)
    h = torch.arange(3).view(1, 3, 1, 1)
    q_pos, k_pos = torch.arange(5).view(-1, 1), torch.arange(9).view(1, -1)
    bias = enc.score_bias(h, q_pos, k_pos)
    expected = table[enc.bucket(q_pos, k_pos)].permute(2, 0, 1)[None]
    assert torch.equal(bias, expected)
    with pytest.raises(ValueError, match="table"):
        T5RelativeBias(3, table=torch.zeros(16, 3))
    with pytest.raises(ValueError, match="num_buckets"):
        T5RelativeBias(3, num_buckets=7)
    with pytest.raises(ValueError, match="max_distance"):
        T5RelativeBias(3, num_buckets=32, max_distance=8)
    a, b = T5RelativeBias(3, seed=1), T5RelativeBias(3, seed=1)
    assert torch.equal(a.table, b.table)


@pytest.mark.parametrize("enc", [ALiBi(6), T5RelativeBias(6), T5RelativeBias(6, bidirectional=False)],
                         ids=["alibi", "t5", "t5-causal"])
def test_score_bias_under_vmap_matches_broadcast(enc):
    """FlexAttention calls score_bias on 0-d (int32) tensors under vmap."""
    f = lambda h, q, k: enc.score_bias(h, q, k)  # noqa: E731
    g = torch.vmap(torch.vmap(torch.vmap(f, (None, None, 0)), (None, 0, None)), (0, None, None))
    h, qp, kp = torch.arange(6, dtype=torch.int32), torch.arange(150, 157, dtype=torch.int32), torch.arange(0, 300, 7, dtype=torch.int32)
    dense = enc.score_bias(h.long().view(1, 6, 1, 1), qp.long().view(-1, 1), kp.long().view(1, -1))[0]
    torch.testing.assert_close(g(h, qp, kp), dense, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# CoPE


def _cope_loop(enc: CoPE, q, k, scale):
    """Scalar loops over one batch element: the paper's definition read literally."""
    hq, tq, d = q.shape
    tk = k.shape[1]
    g = hq // k.shape[0]
    out = torch.zeros(hq, tq, tk, dtype=torch.float64)
    e = enc.embeddings.double()
    for h in range(hq):
        for i in range(tq):
            n = i + tk - tq
            qi = q[h, i].double()
            gates = [torch.sigmoid((qi @ k[h // g, t].double()) * (scale if enc.scaled_gates else 1.0)) for t in range(tk)]
            for j in range(n + 1):
                p = min(sum(gates[j : n + 1]).item(), enc.npos_max - 1)
                lo, hi = math.floor(p), math.ceil(p)
                out[h, i, j] = (1 - (p - lo)) * (qi @ e[h, lo]) + (p - lo) * (qi @ e[h, hi])
    return out


@pytest.mark.parametrize("scaled_gates", [False, True])
def test_cope_dense_bias_matches_loop(scaled_gates):
    enc = CoPE(8, heads=4, npos_max=5, scaled_gates=scaled_gates)
    q, k = _rand(1, 4, 5, 8, seed=11), _rand(1, 2, 7, 8, seed=12)
    got = enc.dense_bias(q.double(), k.double())[0]
    torch.testing.assert_close(got, _cope_loop(enc, q[0], k[0], 8 ** -0.5), atol=1e-10, rtol=0)


def test_cope_row_bias_equals_dense_bias_rows():
    enc = CoPE(16, heads=4, npos_max=8)
    q, k = _rand(2, 4, 20, 16, seed=13), _rand(2, 2, 30, 16, seed=14)
    dense = enc.dense_bias(q.double(), k.double())
    q_pos, k_pos = _positions(20, 30)
    for q0, q1 in ((0, 7), (7, 16), (16, 20)):
        rows = enc.row_bias(q[:, :, q0:q1], k, q_pos[q0:q1], k_pos, 0.25)
        assert rows.shape == (2, 4, q1 - q0, 30) and rows.dtype == torch.float32
        torch.testing.assert_close(rows.double(), dense[:, :, q0:q1], atol=1e-5, rtol=1e-5)


def test_cope_positions_count_tokens_when_gates_are_one():
    d, tq, tk = 4, 6, 10
    q = torch.full((1, 2, tq, d), 10.0)
    k = torch.full((1, 1, tk, d), 10.0)  # q·k = 400: sigmoid is 1 in float32
    q_pos, k_pos = _positions(tq, tk)
    enc = CoPE(d, heads=2, npos_max=64)
    p = enc.positions(q, k, q_pos, k_pos)
    counts = (q_pos[:, None] - k_pos[None, :] + 1).clamp(min=0).float()
    assert torch.equal(p, counts.expand_as(p))
    small = CoPE(d, heads=2, npos_max=4)
    p4 = small.positions(q, k, q_pos, k_pos)
    assert torch.equal(p4, counts.clamp(max=3).expand_as(p4))
    # integer positions: the bias is q·e[p] exactly, 0 after the query
    bias = small.row_bias(q, k, q_pos, k_pos, 0.5)[0]
    e = small.embeddings
    idx = counts.clamp(max=3).long()
    expected = torch.einsum("hid,hijd->hij", q[0], e[:, idx]) * (counts > 0)
    torch.testing.assert_close(bias, expected, atol=1e-5, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# through longattn.attention against the oracle


METHODS = {
    "dense": "dense",
    "dense_chunked": "dense_chunked",
    "dense_chunked-16": longattn.method("dense_chunked", chunk=16, block=16),
    "window": longattn.method("window", window=16, block=16, backend="tiled"),
    "streaming": longattn.method("streaming", sinks=2, window=16, block=16, backend="tiled"),
}

ENCODINGS = {
    "rope": lambda d, h: RoPE(d),
    "rope-yarn": lambda d, h: RoPE(d, scaling=YaRNScaling(4.0, original_max_position=16)),
    "rope-ntk": lambda d, h: RoPE(d, scaling=NTKScaling(2.0)),
    "xpos": lambda d, h: XPos(d, scale_base=32),
    "alibi": lambda d, h: ALiBi(h),
    "t5": lambda d, h: T5RelativeBias(h, num_buckets=16, max_distance=32),
    "t5-causal": lambda d, h: T5RelativeBias(h, num_buckets=16, max_distance=32, bidirectional=False),
    "cope": lambda d, h: CoPE(d, h, npos_max=12),
    "nope": lambda d, h: NoPE(),
}


def _oracle(enc, q, k, v, m, causal):
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    method_obj = longattn.method(m) if isinstance(m, str) else m
    mm = method_obj.visible_mask(tq, tk, causal)
    mask = None if mm is None else mm.dense(b, hq, tq, tk)
    q_pos, k_pos = _positions(tq, tk)
    bias = None
    if enc.kind == "rotary":
        q, k = enc.rotate(q, k, q_pos, k_pos)
    elif enc.kind == "bias":
        bias = enc.score_bias(torch.arange(hq).view(1, hq, 1, 1), q_pos.view(-1, 1), k_pos.view(1, -1))
    elif enc.kind == "content":
        bias = enc.dense_bias(q.double(), k.double())
    out, _ = longattn.reference_attention(q, k, v, causal=causal, mask=mask, bias=bias)
    return out


@pytest.mark.parametrize("shape", [(2, 4, 2, 40, 40), (1, 4, 2, 24, 40)], ids=["gqa-self", "gqa-cross"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("enc_name", list(ENCODINGS))
def test_attention_with_position_matches_oracle(enc_name, method, shape):
    b, hq, hk, tq, tk = shape
    d = 16
    enc = ENCODINGS[enc_name](d, hq)
    q, k, v = _rand(b, hq, tq, d, seed=20), _rand(b, hk, tk, d, seed=21), _rand(b, hk, tk, d, seed=22)
    m = METHODS[method]
    out = longattn.attention(q, k, v, causal=True, method=m, position=enc)
    torch.testing.assert_close(out.double(), _oracle(enc, q, k, v, m, True), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["dense", "window"])
@pytest.mark.parametrize("enc_name", ["alibi", "t5", "rope", "cope"])
def test_attention_non_causal_matches_oracle(enc_name, method):
    b, hq, hk, t, d = 1, 4, 2, 40, 16
    enc = ENCODINGS[enc_name](d, hq)
    q, k, v = _rand(b, hq, t, d, seed=23), _rand(b, hk, t, d, seed=24), _rand(b, hk, t, d, seed=25)
    m = METHODS[method]
    out = longattn.attention(q, k, v, causal=False, method=m, position=enc)
    torch.testing.assert_close(out.double(), _oracle(enc, q, k, v, m, False), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# validation


def test_rope_validation():
    with pytest.raises(ValueError, match="head_dim.*7"):
        RoPE(7)
    with pytest.raises(TypeError, match="head_dim"):
        RoPE(8.0)
    with pytest.raises(ValueError, match="theta"):
        RoPE(8, theta=1.0)
    with pytest.raises(TypeError, match="scaling"):
        RoPE(8, scaling=2.0)
    with pytest.raises(ValueError, match="head_dim 16"):
        RoPE(8).rotate(torch.zeros(1, 1, 2, 16), torch.zeros(1, 1, 2, 16), torch.arange(2), torch.arange(2))
    with pytest.raises(ValueError, match="q_pos"):
        RoPE(8).rotate(torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8), torch.arange(3), torch.arange(2))
    with pytest.raises(ValueError, match="head_dim"):
        XPos(5)


@pytest.mark.parametrize("make", [LinearScaling, NTKScaling, lambda f: YaRNScaling(f, 128)],
                         ids=["linear", "ntk", "yarn"])
@pytest.mark.parametrize("factor", [0.5, 0.0, -2.0, float("nan"), float("inf")])
def test_bad_scaling_factor_raises(make, factor):
    with pytest.raises(ValueError, match="factor"):
        make(factor)


def test_other_validation():
    with pytest.raises(TypeError, match="factor"):
        LinearScaling("2")
    with pytest.raises(ValueError, match="beta_fast"):
        YaRNScaling(2.0, 128, beta_fast=1.0, beta_slow=2.0)
    with pytest.raises(ValueError, match="original_max_position"):
        YaRNScaling(2.0, 0)
    with pytest.raises(ValueError, match="heads"):
        ALiBi(0)
    with pytest.raises(ValueError, match="embeddings"):
        CoPE(8, 2, npos_max=4, embeddings=torch.zeros(2, 5, 8))
    with pytest.raises(ValueError, match="heads"):
        CoPE(8, 2).row_bias(torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 5, 8), torch.arange(2, 5), torch.arange(5), 1.0)
    with pytest.raises(ValueError, match="heads=8"):
        ALiBi(8).check(torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 3, 8))
    assert NoPE().kind == "none"
    q, k = _rand(1, 2, 3, 4), _rand(1, 2, 3, 4)
    assert NoPE().rotate(q, k, torch.arange(3), torch.arange(3)) == (q, k)
