"""``longattn.hf.apply`` across transformers model families, against each model's own eager attention.

Every family transformers builds from a tiny config with random weights runs ``apply(model, "dense")``
on a left-padded batch and must give eager's logits on the real tokens. The families exercise what
transformers hands the attention function besides q, k, v: logit soft-capping (Gemma 2), attention
sinks ``s_aux`` (GPT-OSS), bidirectional layers (BERT, a decoder with ``is_causal=False``), sliding
windows that cut (a 4-D mask). Per family a non-dense method is checked too: exact where it can
honour everything, else a clear error. ``kernels/softcap.py`` is checked against float64 formulas.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longattn  # noqa: E402
import longattn.hf as hf  # noqa: E402
from longattn.kernels.softcap import softcap_attention  # noqa: E402
from longattn.methods.base import Capabilities, Method, Result  # noqa: E402

VOCAB = 100
TOKENS = 12  # the long row; the other row is left-padded to it
SLIDING = 5  # a window that cuts at TOKENS keys: those layers get a 4-D mask

# family → (config class, model class, config overrides). Common: hidden 64, 2 layers, 4 query
# heads (2 key heads where the family has GQA), vocab 100; initializer_range 0.1 so that scores
# reach a few units and softcap, sinks and causality visibly change the result.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": SLIDING}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 16, "attn_logit_softcapping": 1.0, "final_logit_softcapping": None,
                "query_pre_attn_scalar": 16, "sliding_window": SLIDING,
                "layer_types": ["sliding_attention", "full_attention"]}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": SLIDING,
                     "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": SLIDING}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {"sliding_window": SLIDING}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM",
                {"sliding_window": SLIDING, "layer_types": ["sliding_attention", "full_attention"]}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": SLIDING,
                 "layer_types": ["sliding_attention", "full_attention"]}),
    "bert": ("BertConfig", "BertForMaskedLM", {"num_key_value_heads": None, "type_vocab_size": 1}),
}


def build(family: str, attn: str = "eager", seed: int = 0, **overrides):
    """A tiny random-initialised ``family`` model (float32, eval mode), or skip if this
    transformers version cannot build it."""
    cfg_name, model_name, extra = FAMILIES[family]
    cfg_cls, model_cls = getattr(transformers, cfg_name, None), getattr(transformers, model_name, None)
    if cfg_cls is None or model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cfg_name} / {model_name}")
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(extra)
    kw.update(overrides)
    kw = {k: v for k, v in kw.items() if v is not None}
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw, attn_implementation=attn)).eval()
    if family == "gpt_oss":  # sinks start at zero or near it: make them matter
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "sinks"):
                    m.sinks.copy_(torch.randn(m.sinks.shape) * 2)
    return model


def left_padded(lengths=(TOKENS, 7), seed=0):
    """``(input_ids, attention_mask)``: random rows left-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, L in enumerate(lengths):
        ids[i, n - L:] = torch.randint(3, VOCAB, (L,), generator=g)
        mask[i, n - L:] = 1
    return ids, mask


def max_error(model, method="dense", ids=None, mask=None, **call) -> float:
    """Max |logits| difference on real tokens between the model's eager attention and ``method``."""
    if ids is None:
        ids, mask = left_padded()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, **call).logits
        with hf.apply(model, method):
            got = model(ids, attention_mask=mask, **call).logits
    assert model.config._attn_implementation == "eager"  # switched back
    real = mask.bool()
    return float((got[real] - ref[real]).abs().max())


# -- dense equals eager in every family ---------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dense_equals_eager_with_left_padding(family):
    model = build(family)
    err = max_error(model)
    assert err < 1e-5, f"{family}: dense vs eager max error {err:.2e}"


def test_the_families_exercise_what_they_should():
    """The checks above are only worth something if the kwargs really arrive and really matter."""
    g2 = build("gemma2")
    assert g2.model.layers[0].self_attn.attn_logit_softcapping == 1.0
    nocap = build("gemma2", attn_logit_softcapping=None)
    ids, mask = left_padded()
    with torch.no_grad():
        a, b = g2(ids, attention_mask=mask).logits, nocap(ids, attention_mask=mask).logits
    assert float((a - b)[mask.bool()].abs().max()) > 1e-2  # softcap changes these logits
    assert not build("bert").bert.encoder.layer[0].attention.self.is_causal


# -- what non-dense methods do per family -------------------------------------------------------

BIG = dict(sliding_window=64)  # a window that does not cut: no 4-D mask, every method may run
# methods with their own pattern that see every key here: exact vs eager
WINDOW = longattn.method("window", window=64)
TOKENSELECT = longattn.method("tokenselect", budget=64)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("gemma2", "bert")])
def test_window_method_at_full_size_equals_eager(family):
    overrides = BIG if "sliding_window" in FAMILIES[family][2] else {}
    model = build(family, **overrides)
    assert max_error(model, WINDOW) < 1e-5
    assert max_error(model, TOKENSELECT) < 1e-5


@pytest.mark.parametrize("make", [lambda: WINDOW, lambda: longattn.method("dense_chunked", chunk=4),
                                  lambda: longattn.method("pattern", mask=longattn.masks.a_shape(64, 64))],
                         ids=["window", "dense_chunked", "pattern"])
def test_gemma2_softcap_is_followed_by_every_exact_method(make):
    assert max_error(build("gemma2", **BIG), make()) < 1e-5


def test_gemma2_softcap_is_refused_by_approximate_methods():
    model = build("gemma2", **BIG)
    ids, mask = left_padded()
    for method in (TOKENSELECT, longattn.method("landmark", budget=64, block=4, q_block=4, sinks=4, window=4)):
        with torch.no_grad(), hf.apply(model, method):
            with pytest.raises(ValueError, match=f"method '{method.name}' cannot apply logit soft-capping"):
                model(ids, attention_mask=mask)


def test_gemma2_softcap_on_the_4d_path():
    """The sliding window cuts, so layer 0 gets a 4-D mask: dense and dense_chunked follow it with
    the softcap; a method with its own pattern is refused there as for any 4-D mask."""
    model = build("gemma2")
    assert max_error(model, "dense_chunked") < 1e-5
    ids, mask = left_padded()
    with torch.no_grad(), hf.apply(model, "window"):
        with pytest.raises(NotImplementedError, match="cannot also follow a general 4-D attention mask"):
            model(ids, attention_mask=mask)


def test_gpt_oss_sinks_fold_into_every_method_with_an_lse():
    model = build("gpt_oss", **BIG)
    for method in (WINDOW, longattn.method("dense_chunked", chunk=4),
                   longattn.method("landmark", budget=64, block=4, q_block=4, sinks=4, window=4)):
        assert max_error(model, method) < 1e-5, method.name


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_generation_with_softcap_or_sinks_matches_eager(family):
    """Greedy generation token for token: softcap (Gemma 2) and sinks (GPT-OSS) through the cache."""
    model = build(family)
    model.generation_config.pad_token_id = 0
    ids, mask = left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    ref = model.generate(ids, **kw)
    with hf.apply(model, "dense"):
        got = model.generate(ids, **kw)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name", ["dense", "dense_chunked"])
def test_gpt_oss_sinks_under_a_cutting_window_4d_mask(name):
    assert max_error(build("gpt_oss"), name) < 1e-5


@pytest.mark.parametrize("name", ["window", "tokenselect"])
def test_cutting_sliding_window_is_refused_by_pattern_methods(name):
    model = build("mistral")
    ids, mask = left_padded()
    with torch.no_grad(), hf.apply(model, name):
        with pytest.raises(NotImplementedError, match="cannot also follow a general 4-D attention mask"):
            model(ids, attention_mask=mask)


class _NoLse(Method):
    """dense, but from a path that gives no LSE (as compiled FlexAttention on CPU)."""

    name = "no_lse"
    capabilities = Capabilities(exact=True)

    def run(self, q, k, v, call):
        res = longattn.method("dense").run(q, k, v, call)
        return Result(res.out, None, "flex", res.stats)


def test_sinks_with_a_method_that_gives_no_lse_are_refused():
    model = build("gpt_oss", **BIG)
    ids, mask = left_padded()
    with torch.no_grad(), hf.apply(model, _NoLse()):
        with pytest.raises(ValueError, match="'no_lse' ran on path 'flex', which gives no log-sum-exp"):
            model(ids, attention_mask=mask)


def test_bert_is_bidirectional_for_methods_that_support_it():
    model = build("bert")
    assert max_error(model, WINDOW) < 1e-5
    assert max_error(model, longattn.method("dense_chunked", chunk=4)) < 1e-5


@pytest.mark.parametrize("name", ["streaming", "minference"])
def test_bert_refuses_causal_only_methods(name):
    model = build("bert")
    ids, mask = left_padded()
    with torch.no_grad(), hf.apply(model, name):
        with pytest.raises(ValueError, match=f"method '{name}' supports only causal attention"):
            model(ids, attention_mask=mask)


def test_bert_without_padding_is_bidirectional_too():
    model = build("bert")
    ids, _ = left_padded((TOKENS, TOKENS))
    assert max_error(model, "dense", ids, torch.ones_like(ids)) < 1e-5


@pytest.mark.parametrize("padded", [True, False])
def test_a_decoder_with_config_is_causal_false_runs_bidirectional(padded):
    model = build("llama")
    model.config.is_causal = False  # transformers then builds bidirectional masks
    ids, mask = left_padded() if padded else left_padded((TOKENS, TOKENS))
    assert max_error(model, "dense", ids, mask) < 1e-5
    causal = build("llama")
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = causal(ids, attention_mask=mask).logits
    assert float((a - b)[mask.bool()].abs().max()) > 1e-2  # bidirectional really differs


def test_is_causal_false_keyword_is_honoured():
    """``model(..., is_causal=False)`` (transformers' documented switch) runs bidirectional, as
    SDPA and flash attention do; it equals eager on a bidirectional config."""
    ids, mask = left_padded()
    bidi = build("llama")
    bidi.config.is_causal = False
    with torch.no_grad():
        ref = bidi(ids, attention_mask=mask).logits
    model = build("llama")
    with torch.no_grad(), hf.apply(model, "dense"):
        got = model(ids, attention_mask=mask, is_causal=False).logits
    real = mask.bool()
    assert float((got[real] - ref[real]).abs().max()) < 1e-5


def test_is_causal_false_with_a_4d_mask_follows_eager_or_is_refused():
    """A sliding window that cuts gives a 4-D mask. Newer transformers build it bidirectional for
    ``is_causal=False`` (then longattn must equal eager); older ones build it causal, and following
    it would silently drop the request, so longattn refuses."""
    model = build("mistral")
    ids, mask = left_padded()
    with torch.no_grad():
        causal = model(ids, attention_mask=mask).logits
        eager = model(ids, attention_mask=mask, is_causal=False).logits
    real = mask.bool()
    if float((eager - causal)[real].abs().max()) > 1e-4:  # transformers honoured is_causal=False
        assert max_error(model, "dense", ids, mask, is_causal=False) < 1e-5
        return
    with torch.no_grad(), hf.apply(model, "dense"):
        with pytest.raises(ValueError, match="is_causal=False was passed, but the 4-D attention mask"):
            model(ids, attention_mask=mask, is_causal=False)


def test_is_causal_false_against_a_causal_4d_mask_is_refused():
    """Called directly with a causal 4-D mask and ``is_causal=False``: refused, whatever the
    transformers version (the mask contradicts the request)."""
    model = build("llama")
    attn = model.model.layers[0].self_attn
    q = torch.randn(2, 4, 6, 16)
    k = v = torch.randn(2, 2, 6, 16)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    causal = causal.expand(2, 1, 6, 6).clone()
    causal[1, 0, :2] = False  # left padding: the padding queries see nothing
    causal[1, 0, :2, 2] = True  # (transformers may open the first real key to them)
    causal[1, 0, :, :2] = False
    with hf.apply(model, "dense"):
        fwd = hf.attention.longattn_attention_forward
        with pytest.raises(ValueError, match="is_causal=False was passed, but the 4-D attention mask"):
            fwd(attn, q, k, v, causal, is_causal=False)
        bidirectional = torch.ones(2, 1, 6, 6, dtype=torch.bool)
        out, _ = fwd(attn, q, k, v, bidirectional, is_causal=False)
        assert out.shape == (2, 6, 4, 16)


def test_kwargs_that_would_change_the_math_are_refused():
    model = build("llama")
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16)
    k = v = torch.randn(1, 2, 3, 16)
    with hf.apply(model, "dense"):
        fwd = hf.attention.longattn_attention_forward
        with pytest.raises(ValueError, match="position_bias"):
            fwd(attn, q, k, v, None, position_bias=torch.zeros(1, 4, 3, 3))
        with pytest.raises(TypeError, match="keyword argument\\(s\\) indices"):
            fwd(attn, q, k, v, None, indices=torch.zeros(3, dtype=torch.long))
        with pytest.raises(RuntimeError, match="sliding window of 2 tokens but its attention mask does not carry it"):
            fwd(attn, q, k, v, None, sliding_window=2)
        with pytest.raises(ValueError, match="one sink logit per query head \\(4\\)"):
            fwd(attn, q, k, v, None, s_aux=torch.zeros(2))
        # harmless ones pass, None for anything
        out, _ = fwd(attn, q, k, v, None, position_ids=torch.arange(3)[None], output_attentions=True, foo=None)
        assert out.shape == (1, 3, 4, 16)


def test_longattn_cache_refuses_softcap_sinks_and_bidirectional():
    model = build("llama")
    ids, mask = left_padded()
    attn = model.model.layers[0].self_attn
    with torch.no_grad(), hf.apply(model, "dense"):
        cache = hf.LongattnCache(model, "full")
        layer = cache.layers[0]
        q = torch.randn(2, 4, TOKENS, 16)
        for kw, what in ((dict(softcap=1.0), "softcap"), (dict(s_aux=torch.zeros(4)), "sinks"),
                         (dict(is_causal=False), "non-causal")):
            k, v = layer.update(torch.randn(2, 2, TOKENS, 16), torch.randn(2, 2, TOKENS, 16))
            with pytest.raises(NotImplementedError, match=f"cannot apply .*{what}"):
                hf.attention.longattn_attention_forward(attn, q, k, v, None, **kw)


# -- kernels/softcap.py against float64 ---------------------------------------------------------


def reference(q, k, v, softcap, scale, visible):
    """float64: softcap·tanh(s/softcap) (or s), hidden pairs dropped; dead rows 0 and -inf."""
    g = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(g, dim=1) for t in (k, v))
    s = torch.matmul(q.double(), k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0)[..., None])
    return p @ v, lse


def qkv(b=2, hq=4, hk=2, tq=9, tk=9, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, tq, d, generator=g) * 2, torch.randn(b, hk, tk, d, generator=g) * 2,
            torch.randn(b, hk, tk, d, generator=g))


def check(out, lse, ref_out, ref_lse):
    assert out.dtype == lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    dead = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), dead)
    torch.testing.assert_close(lse.double()[~dead], ref_lse[~dead], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tile", [None, 1, 4])
@pytest.mark.parametrize("tq,tk", [(9, 9), (3, 11), (1, 7), (11, 5)])
def test_softcap_kernel_causal_cross_and_gqa(tq, tk, tile):
    q, k, v = qkv(tq=tq, tk=tk)
    scale, cap = 0.4, 1.5
    visible = torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + (tk - tq)  # bottom-right
    out, lse = softcap_attention(q, k, v, softcap=cap, scale=scale, causal=True, tile=tile)
    check(out, lse, *reference(q, k, v, cap, scale, visible))
    out, lse = softcap_attention(q, k, v, softcap=cap, scale=scale, causal=False, tile=tile)
    check(out, lse, *reference(q, k, v, cap, scale, torch.ones(tq, tk, dtype=torch.bool)))


def test_softcap_kernel_padding_fully_masked_rows_and_an_arbitrary_mask():
    q, k, v = qkv(tq=6, tk=10)
    pad = torch.ones(2, 10, dtype=torch.bool)
    pad[0, :6] = False  # left padding: with causal cross, row 0's first query sees nothing
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(2, 1, 6, 10, generator=g) > 0.4
    mask[1, :, 2] = False  # a row hidden by the mask
    causal = torch.arange(10)[None, :] <= torch.arange(6)[:, None] + 4
    visible = causal & pad[:, None, None, :] & mask
    out, lse = softcap_attention(q, k, v, softcap=2.0, scale=0.3, causal=True, key_padding_mask=pad, mask=mask, tile=2)
    check(out, lse, *reference(q, k, v, 2.0, 0.3, visible))
    assert torch.isinf(lse[0, :, 0]).all() and (out[0, :, 0] == 0).all()
    assert torch.isinf(lse[1, :, 2]).all() and (out[1, :, 2] == 0).all()
    # the same as an additive float mask (transformers' eager form: 0 or finfo.min)
    add = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    out2, lse2 = softcap_attention(q, k, v, softcap=2.0, scale=0.3, causal=True, key_padding_mask=pad, mask=add)
    check(out2, lse2, *reference(q, k, v, 2.0, 0.3, visible))


def test_softcap_none_is_plain_attention_and_small_caps_matter():
    q, k, v = qkv()
    ones = torch.ones(9, 9, dtype=torch.bool)
    out, lse = softcap_attention(q, k, v, softcap=None)
    check(out, lse, *reference(q, k, v, None, 8 ** -0.5, ones))
    plain = longattn.reference_attention(q, k, v)[0]
    torch.testing.assert_close(out.double(), plain.double(), atol=1e-5, rtol=1e-5)
    capped, _ = softcap_attention(q, k, v, softcap=0.5)
    assert float((capped - out).abs().max()) > 1e-2


def test_softcap_kernel_tiles_bound_the_scores_held():
    q, k, v = qkv(b=1, hq=2, hk=1, tq=64, tk=64)
    import longattn.kernels.softcap as sc

    old = sc.TILE_ELEMENTS
    try:
        sc.TILE_ELEMENTS = 2 * 64 * 8  # 8 queries per tile
        out, lse = softcap_attention(q, k, v, softcap=3.0, causal=True)
    finally:
        sc.TILE_ELEMENTS = old
    visible = torch.ones(64, 64, dtype=torch.bool).tril()
    check(out, lse, *reference(q, k, v, 3.0, 8 ** -0.5, visible))


def test_softcap_kernel_checks_its_arguments():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="softcap must be > 0"):
        softcap_attention(q, k, v, softcap=0.0)
    with pytest.raises(TypeError, match="softcap must be a finite real number"):
        softcap_attention(q, k, v, softcap=float("inf"))
    with pytest.raises(ValueError, match="does not broadcast"):
        softcap_attention(q, k, v, softcap=1.0, mask=torch.ones(2, 1, 9, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be bool"):
        softcap_attention(q, k, v, softcap=1.0, mask=torch.ones(2, 1, 9, 9, dtype=torch.long))
    out, lse = softcap_attention(q, k[:, :, :0], v[:, :, :0], softcap=1.0)
    assert (out == 0).all() and torch.isinf(lse).all()
