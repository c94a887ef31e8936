"""longattn inside transformers models: ``longattn.hf.apply`` through AttentionInterface +
AttentionMaskInterface, and ``load_llama2c`` (stories260K as a LlamaForCausalLM)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longattn  # noqa: E402
import longattn.hf as hf  # noqa: E402
from longattn.models import llama2c as l2c  # noqa: E402
from longattn.models import stories260k  # noqa: E402


def tiny(family: str, seed: int = 0, **overrides):
    """A tiny random-initialised causal LM of ``family`` (float32, eval mode)."""
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    if family == "mistral":
        common.setdefault("sliding_window", None)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**common)).eval()
    model.generation_config.pad_token_id = 0
    return model


FAMILIES = ["llama", "mistral", "qwen2"]


def left_padded(lengths, vocab=128, seed=0):
    """``(input_ids, attention_mask)`` of random rows of ``lengths``, left-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, L in enumerate(lengths):
        ids[i, n - L:] = torch.randint(3, vocab, (L,), generator=g)
        mask[i, n - L:] = 1
    return ids, mask


def full_budget_methods(tokens: int):
    """Methods that see every key at ``tokens`` tokens: each must equal dense attention."""
    b = max(128, 1 << (tokens - 1).bit_length())
    return [
        longattn.method("dense"),
        longattn.method("dense_chunked", chunk=16),
        longattn.method("streaming", sinks=4, window=b),
        longattn.method("landmark", budget=b, block=16, q_block=16, sinks=16, window=16),
        longattn.method("quest", budget=b, block=16, q_block=16, sinks=16, window=16),
        longattn.method("tokenselect", budget=b),
    ]


# -- load_llama2c ------------------------------------------------------------------------------


def test_llama2c_logits_match_the_float64_checkpoint_forward(stories):
    model, tok = stories
    ids = torch.tensor([tok.encode("Once upon a time, there was a little dog named Max. He liked to run.")])
    ref = l2c.forward(l2c.load_checkpoint(stories260k() / "stories260K.bin"), ids.cpu())  # float64 on the CPU
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got.double().cpu(), ref, atol=1e-4, rtol=1e-4)


def test_llama2c_greedy_text_from_bos_begins_once_upon_a_time(stories):
    model, tok = stories
    bos = torch.tensor([[tok.bos_token_id]])
    out = model.generate(bos, attention_mask=torch.ones_like(bos), max_new_tokens=24, do_sample=False)
    assert tok.decode(out[0]).startswith("Once upon a time")


def test_llama2c_tokenizer_pads_left_and_round_trips(stories):
    _, tok = stories
    enc = tok(["Once upon a time", "Lily"])
    assert enc["input_ids"].shape == enc["attention_mask"].shape
    assert enc["attention_mask"][1, 0] == 0 and enc["attention_mask"][1, -1] == 1  # left padding
    assert tok.decode(enc["input_ids"][0]) == "Once upon a time"
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
        tok(["a"], padding_side="middle")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        hf.load_llama2c("/nonexistent/stories")


# -- apply: exactness --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_through_longattn_equals_the_models_sdpa_with_left_padding(family):
    model = tiny(family)
    ids, mask = left_padded([37, 20, 5])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        with hf.apply(model, "dense"):
            assert model.config._attn_implementation == "longattn"
            got = model(ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "sdpa"  # switched back on exit
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_reaches_the_attention(family):
    """A padded row must give what the same row gives alone (the mask function carries padding:
    without it transformers would hand the attention None and padding would leak in)."""
    model = tiny(family, seed=1)
    ids, mask = left_padded([30, 9], seed=2)
    with torch.no_grad(), hf.apply(model, "landmark", budget=64, block=8, q_block=8, sinks=8, window=8):
        batch = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, -9:], attention_mask=mask[1:, -9:]).logits
    torch.testing.assert_close(batch[1, -9:], alone[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_methods_generate_what_dense_generates(family):
    model = tiny(family, seed=3)
    ids, mask = left_padded([24, 11], seed=4)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    ref = model.generate(ids, **kw)
    for m in full_budget_methods(ids.shape[1] + 12):
        with hf.apply(model, m):
            got = model.generate(ids, **kw)
        assert torch.equal(got, ref), m


def test_full_budget_methods_on_stories260k_generate_what_dense_generates(stories):
    model, tok = stories
    enc = tok(["Once upon a time, there was a", "Tom had a red"])
    kw = dict(max_new_tokens=20, do_sample=False)
    ref = model.generate(**enc, **kw)
    for m in full_budget_methods(enc["input_ids"].shape[1] + 20):
        with hf.apply(model, m):
            got = model.generate(**enc, **kw)
        assert torch.equal(got, ref), m


def test_sampling_follows_the_same_draws(stories):
    model, tok = stories
    enc = tok(["The cat"])
    torch.manual_seed(5)
    ref = model.generate(**enc, max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0)
    with hf.apply(model, "dense_chunked", chunk=8):
        torch.manual_seed(5)
        got = model.generate(**enc, max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_with_a_cache_equals_one_pass(family):
    model = tiny(family, seed=6)
    ids, mask = left_padded([48, 30], seed=7)
    with torch.no_grad(), hf.apply(model, "landmark", budget=64, block=8, q_block=8, sinks=8, window=8):
        whole = model(ids, attention_mask=mask).logits
        cache = transformers.DynamicCache(config=model.config)
        parts = []
        for s in range(0, ids.shape[1], 16):
            out = model(ids[:, s:s + 16], attention_mask=mask[:, :s + 16], past_key_values=cache, use_cache=True)
            parts.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, 1)[real], whole[real], atol=2e-5, rtol=1e-5)


def test_a_small_budget_changes_the_output():
    """The method really runs: at a budget far below the context the logits differ from dense."""
    model = tiny("llama", seed=8)
    ids, mask = left_padded([96])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        with hf.apply(model, "streaming", sinks=4, window=12):
            got = model(ids, attention_mask=mask).logits
    assert float((got - ref).abs().max()) > 1e-3
    torch.testing.assert_close(got[:, :16], ref[:, :16], atol=2e-5, rtol=1e-5)  # inside the window: exact


# -- apply: switching, masks the method cannot take, bad input ---------------------------------


def test_permanent_switch_nesting_and_two_models():
    a, b = tiny("llama", seed=9), tiny("qwen2", seed=9)
    ids, mask = left_padded([20])
    with torch.no_grad():
        ref_a = a(ids, attention_mask=mask).logits
    handle = hf.apply(a, "streaming", sinks=2, window=4)  # permanent until remove()
    hf.apply(b, "dense")
    with torch.no_grad():
        small = a(ids, attention_mask=mask).logits
        with hf.apply(a, "dense"):  # nested: dense inside, streaming again after
            torch.testing.assert_close(a(ids, attention_mask=mask).logits, ref_a, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(a(ids, attention_mask=mask).logits, small)
    assert a.config._attn_implementation == "longattn"
    handle.remove()
    assert a.config._attn_implementation == "sdpa" and b.config._attn_implementation == "longattn"
    assert "removed" in repr(handle)


def test_sliding_window_that_cuts_runs_exactly_with_dense_and_is_refused_by_patterned_methods():
    model = tiny("mistral", seed=10, sliding_window=16)
    ids, mask = left_padded([40, 25])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        with hf.apply(model, "dense"):
            got = model(ids, attention_mask=mask).logits
        # methods with their own pattern would silently lose it on the dense 4-D path: refused
        for m in (longattn.method("landmark", budget=64, block=8, q_block=8, sinks=8, window=8),
                  longattn.method("window", window=8)):
            with hf.apply(model, m), pytest.raises(
                    NotImplementedError, match=f"method '{m.name}' attends with its own pattern.*sliding window"):
                model(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=2e-5, rtol=1e-5)


def test_bad_arguments_are_named():
    model = tiny("llama")
    with pytest.raises(TypeError, match=r"config \['budget'\] given together with a method object"):
        hf.apply(model, longattn.method("dense"), budget=3)
    with pytest.raises(TypeError, match="method 'landmark' got unknown parameter"):
        hf.apply(model, "landmark", bugdet=3)
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel, got Linear"):
        hf.apply(torch.nn.Linear(2, 2), "dense")
    with pytest.raises(TypeError, match="method must be a registered name"):
        hf.apply(model, 3)
    assert model.config._attn_implementation == "sdpa"  # nothing half-applied
