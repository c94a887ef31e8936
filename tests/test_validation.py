"""Bad input gets a ValueError/TypeError naming the argument, what it got and what was expected."""

import pytest
import torch

import longattn
from longattn import masks


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def test_rank_must_be_4():
    with pytest.raises(ValueError, match=r"q must have rank 4 \[batch, heads, tokens, head_dim\], got rank 3"):
        longattn.attention(t(2, 8, 16), t(2, 2, 8, 16), t(2, 2, 8, 16))


def test_mismatched_batch_and_head_dim():
    with pytest.raises(ValueError, match="q has batch 2 but k has batch 3"):
        longattn.attention(t(2, 4, 8, 16), t(3, 4, 8, 16), t(3, 4, 8, 16))
    with pytest.raises(ValueError, match="q has head_dim 16 but k has head_dim 8"):
        longattn.attention(t(2, 4, 8, 16), t(2, 4, 8, 8), t(2, 4, 8, 8))


def test_heads_q_must_be_multiple_of_heads_kv():
    with pytest.raises(ValueError, match="k has 3 heads but q has 8: heads_q must be a multiple of heads_kv"):
        longattn.attention(t(1, 8, 4, 16), t(1, 3, 4, 16), t(1, 3, 4, 16))



@pytest.mark.parametrize("name,param,value", [
    ("window", "window", 0), ("window", "window", -3), ("window", "dilation", 0),
    ("streaming", "sinks", 0), ("streaming", "window", -1), ("dense_chunked", "chunk", 0),
])
def test_non_positive_sizes(name, param, value):
    with pytest.raises(ValueError, match=f"{param} must be a positive int, got {value}"):
        longattn.method(name, **{param: value})


def test_size_of_wrong_type():
    with pytest.raises(TypeError, match="window must be an int, got float 2.5"):
        longattn.method("window", window=2.5)


def test_padding_mask_shape_and_dtype():
    q = t(2, 2, 4, 8)
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(2, 5\), expected \[batch, tokens_k\] = \[2, 4\]"):
        longattn.attention(q, q, q, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must have dtype torch.bool"):
        longattn.attention(q, q, q, key_padding_mask=torch.ones(2, 4))


def test_tensors_on_different_devices():
    q = t(1, 2, 4, 8)
    meta = torch.empty(1, 2, 4, 8, device="meta")
    with pytest.raises(ValueError, match="q, k and v must be on one device, got q on cpu, k on meta"):
        longattn.attention(q, meta, q)


def test_integer_dtypes_rejected():
    q = torch.ones(1, 2, 4, 8, dtype=torch.int64)
    with pytest.raises(TypeError, match="q has dtype torch.int64; expected a floating dtype"):
        longattn.attention(q, q.float(), q.float())


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="method 'flash9' is not registered; known methods: .*dense.*window"):
        longattn.attention(t(1, 2, 4, 8), t(1, 2, 4, 8), t(1, 2, 4, 8), method="flash9")


def test_unknown_parameter_lists_accepted_ones():
    with pytest.raises(TypeError, match="method 'window' got unknown parameter\\(s\\) windw; it accepts: window=1024"):
        longattn.method("window", windw=5)


def test_method_of_wrong_type():
    with pytest.raises(TypeError, match="method must be a registered name"):
        longattn.attention(t(1, 2, 4, 8), t(1, 2, 4, 8), t(1, 2, 4, 8), method=3)


def test_capability_checks():
    x = t(1, 2, 4, 8)
    with pytest.raises(ValueError, match="method 'streaming' supports only causal=True"):
        longattn.attention(x, x, x, causal=False, method="streaming")
    with pytest.raises(ValueError, match="prefix-LM.*causal=False"):
        longattn.attention(x, x, x, causal=True, method=longattn.method("pattern", mask=masks.prefix_lm(2)))


def test_pattern_needs_a_mask_and_backend_is_checked():
    with pytest.raises(TypeError, match=r"method 'pattern' needs parameter\(s\) mask"):
        longattn.method("pattern")
    with pytest.raises(TypeError, match="mask must be a longattn.masks.Mask or a callable, got int"):
        longattn.method("pattern", mask=3)
    with pytest.raises(ValueError, match="backend must be one of auto, tiled, flex, got 'cuda'"):
        longattn.method("window", backend="cuda")


def test_scale_must_be_finite_number():
    x = t(1, 2, 4, 8)
    with pytest.raises(TypeError, match="scale must be a finite real number or None, got nan"):
        longattn.attention(x, x, x, scale=float("nan"))
