"""The layers of :mod:`longattn.recurrent.layers`: projections + recurrent op + output projection.

For every registered layer: shapes and dtype, finite outputs, gradients to every parameter,
prefill in pieces == one pass, decoding token by token == one pass, batch invariance,
deterministic init; and ``make_layer``'s errors."""

from __future__ import annotations

import pytest
import torch

from longattn.recurrent.layers import LAYERS, make_layer

D_MODEL, HEADS, HEAD_DIM = 32, 4, 8

# small op sizes so the chunked forms cross chunk boundaries (and RAT / Titans cross their
# model chunks) within the short test sequences
KW = {
    "linear": dict(chunk=8),
    "lightning": dict(chunk=8),
    "gla": dict(chunk=8),
    "deltanet": dict(chunk=8),
    "gated_deltanet": dict(chunk=8),
    "aaren": dict(chunk=8),
    "based": dict(feature_dim=4, window=5, chunk=8),
    "rat": dict(chunk_size=4),
    "titans": dict(chunk_size=4),
    "titans_mag": dict(window=5, persistent_tokens=2, chunk_size=4),
    "titans_mac": dict(segment=5, persistent_tokens=2, chunk_size=4),
    "titans_mal": dict(window=5, persistent_tokens=2, chunk_size=4),
}

NAMES = sorted(LAYERS)


def _layer(name: str, seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = {**KW[name], **extra}
    return make_layer(name, D_MODEL, HEADS, HEAD_DIM, **kw).eval()


def _x(b: int = 2, t: int = 19, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, D_MODEL, generator=g)


def test_registry_covers_every_op():
    assert set(LAYERS) == {"linear", "lightning", "gla", "deltanet", "gated_deltanet", "aaren", "based", "rat",
                           "titans", "titans_mag", "titans_mac", "titans_mal"}
    for name, cls in LAYERS.items():
        assert cls.op_name == name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_shape_dtype_finite_and_gradients(name, kv_heads):
    layer = _layer(name, kv_heads=kv_heads).train()
    x = _x().requires_grad_(True)
    y, state = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert state is not None
    (y.square().mean()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
    assert torch.isfinite(x.grad).all()
    size = layer.state_size()
    assert isinstance(size, int) and size > 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("split", [1, 7, 12])
def test_prefill_in_pieces_equals_one_pass(name, split):
    layer = _layer(name, kv_heads=2)
    x = _x()
    with torch.no_grad():
        y, _ = layer(x)
        y1, st = layer(x[:, :split])
        y2, _ = layer(x[:, split:], st)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_decode_token_by_token_equals_one_pass(name):
    layer = _layer(name, kv_heads=2)
    x = _x()
    prefill = 6
    with torch.no_grad():
        y, _ = layer(x)
        outs = []
        yp, st = layer(x[:, :prefill])
        outs.append(yp)
        for t in range(prefill, x.shape[1]):  # T == 1 with a state: the step form
            yt, st = layer(x[:, t:t + 1], st)
            outs.append(yt)
    torch.testing.assert_close(torch.cat(outs, 1), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_decode_from_empty_state_equals_one_pass(name):
    """The first token alone (no state: the chunked form), then steps."""
    layer = _layer(name)
    x = _x(t=9)
    with torch.no_grad():
        y, _ = layer(x)
        yt, st = layer(x[:, :1])
        outs = [yt]
        for t in range(1, x.shape[1]):
            yt, st = layer(x[:, t:t + 1], st)
            outs.append(yt)
    torch.testing.assert_close(torch.cat(outs, 1), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_batch_invariance(name):
    layer = _layer(name, kv_heads=2)
    x = _x(b=3)
    with torch.no_grad():
        y, _ = layer(x)
        for i in range(x.shape[0]):
            yi, _ = layer(x[i:i + 1])
            torch.testing.assert_close(yi, y[i:i + 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_init(name):
    a, b = _layer(name, seed=3), _layer(name, seed=3)
    c = _layer(name, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert any(not torch.equal(sa[key], sc[key]) for key in sa if sa[key].is_floating_point()
               and key in dict(a.named_parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16(name):
    layer = _layer(name).to(torch.bfloat16)
    x = _x().to(torch.bfloat16)
    with torch.no_grad():
        y, st = layer(x)
        y1, _ = layer(x[:, :1], st)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and torch.isfinite(y1).all()


def test_make_layer_errors_name_the_argument():
    with pytest.raises(ValueError, match="name must be one of"):
        make_layer("mamba", D_MODEL, HEADS, HEAD_DIM)
    with pytest.raises(TypeError, match="name must be a str"):
        make_layer(3, D_MODEL, HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="d_model"):
        make_layer("linear", 0, HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="heads"):
        make_layer("gla", D_MODEL, -1, HEAD_DIM)
    with pytest.raises(ValueError, match="head_dim"):
        make_layer("deltanet", D_MODEL, HEADS, 0)
    with pytest.raises(ValueError, match="kv_heads"):
        make_layer("rat", D_MODEL, HEADS, HEAD_DIM, kv_heads=3)
    with pytest.raises(TypeError, match="window_size"):
        make_layer("based", D_MODEL, HEADS, HEAD_DIM, window_size=4)
    with pytest.raises(ValueError, match="chunk_size"):
        make_layer("titans", D_MODEL, HEADS, HEAD_DIM, chunk_size=0)
    with pytest.raises(ValueError, match="feature_map"):
        make_layer("linear", D_MODEL, HEADS, HEAD_DIM, feature_map="cosine")


@pytest.mark.parametrize("name", ["gla", "titans"])
def test_forward_errors_name_x(name):
    layer = _layer(name)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, 5, D_MODEL + 1))
    with pytest.raises(TypeError, match="x has dtype"):
        layer(torch.randn(2, 5, D_MODEL, dtype=torch.float64))


def test_performer_and_state_sizes():
    layer = _layer("linear", feature_map="performer", num_features=12)
    y, st = layer(_x())
    assert st.s.shape[-2] == 12 and torch.isfinite(y).all()
    assert layer.state_size() == HEADS * (12 * HEAD_DIM + 12) * 4
    rat = _layer("rat")
    assert rat.state_size(tokens=16) > rat.state_size(tokens=0)


def test_lightning_decays_follow_depth_and_stay_float32():
    first = _layer("lightning", layer=0, layers=4)
    last = _layer("lightning", layer=3, layers=4)
    assert (first.decay() < last.decay()).all()
    assert first.to(torch.bfloat16).decay().dtype == torch.float32
    with pytest.raises(ValueError, match="layer"):
        _layer("lightning", layer=4, layers=4)


# -- the output stage (per-head RMSNorm, SiLU gate) ---------------------------------------------

SIMPLE = [n for n in NAMES if not n.startswith("titans_")]  # the Titans combinations have their own gate


def test_output_stage_defaults_follow_the_papers():
    on = {n: (_layer(n).output_norm, _layer(n).output_gate) for n in SIMPLE}
    assert on["gla"] == on["gated_deltanet"] == on["titans"] == (True, True)
    assert on["deltanet"] == (True, False)
    assert on["linear"] == on["lightning"] == on["aaren"] == on["based"] == on["rat"] == (False, False)
    gla = _layer("gla")
    assert gla.out_norm_weight.shape == (HEAD_DIM,) and gla.g_proj.out_features == HEADS * HEAD_DIM
    assert not hasattr(_layer("linear"), "g_proj") and not hasattr(_layer("linear"), "out_norm_weight")


@pytest.mark.parametrize("name", SIMPLE)
@pytest.mark.parametrize("norm,gate", [(True, False), (False, True), (True, True), (False, False)])
def test_output_stage_keeps_pieces_decode_and_gradients(name, norm, gate):
    layer = _layer(name, output_norm=norm, output_gate=gate)
    x = _x()
    y, _ = layer(x)
    y1, st = layer(x[:, :7])
    y2, st = layer(x[:, 7:18], st)
    y3, _ = layer(x[:, 18:], st)
    torch.testing.assert_close(torch.cat([y1, y2, y3], 1), y, atol=2e-5, rtol=1e-4)
    layer.train().zero_grad()
    layer(x.requires_grad_(True))[0].square().sum().backward()
    for pname, p in layer.named_parameters():
        if pname in ("out_norm_weight", "g_proj.weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "titans"])
def test_output_norm_removes_the_value_scale(name):
    # q and k are L2-normalised inside these ops, so the op's output is linear in v: the per-head
    # norm must make the layer's output independent of v's scale (what lets small-init models learn)
    # (from a scale where the norm's eps no longer counts: ×100 against ×1000)
    layer = _layer(name, output_norm=True, output_gate=False)
    x = _x()
    with torch.no_grad():
        layer.v_proj.weight.mul_(100.0)
    y, _ = layer(x)
    with torch.no_grad():
        layer.v_proj.weight.mul_(10.0)
    y_big, _ = layer(x)
    torch.testing.assert_close(y_big, y, atol=1e-5, rtol=1e-4)
    plain = _layer(name, output_norm=False, output_gate=False)
    ref, _ = plain(x)
    with torch.no_grad():
        plain.v_proj.weight.mul_(1000.0)
    assert not torch.allclose(plain(x)[0], ref, rtol=1e-2)


def test_output_norm_computes_in_float32_for_bfloat16():
    layer = _layer("gla")
    x = _x()
    ref, _ = layer(x.double().float())
    y, _ = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert (y.float() - ref).norm() / ref.norm() < 0.05


@pytest.mark.parametrize("bad", [1, "yes", 0.0])
def test_output_stage_flags_must_be_bools(bad):
    with pytest.raises(TypeError, match="output_norm must be a bool"):
        _layer("gla", output_norm=bad)
    with pytest.raises(TypeError, match="output_gate must be a bool"):
        _layer("linear", output_gate=bad)
