"""``longattn.hf.LongattnCache``: longattn memories as a transformers Cache — exact at full
budget inside ``generate``, real token dropping below it, positions within the kept cache (4k
tokens through the 512-token stories260K), save/load, and the refusals."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longattn.hf as hf  # noqa: E402
from longattn.hf import LongattnCache  # noqa: E402
from test_hf import FAMILIES, left_padded, tiny  # noqa: E402

BIG = 4096


def full_budget_caches(model):
    n_layers = model.config.num_hidden_layers
    n_kv = model.config.num_key_value_heads
    return {
        "full": lambda: LongattnCache(model, "full"),
        "streaming": lambda: LongattnCache(model, "streaming", budget=BIG),
        "h2o": lambda: LongattnCache(model, "h2o", budget=BIG),
        "tova": lambda: LongattnCache(model, "tova", budget=BIG),
        "snapkv": lambda: LongattnCache(model, "snapkv", budget=BIG),
        "heads": lambda: LongattnCache(model, "heads", head_map=[[h % 2 == 0 for h in range(n_kv)]] * n_layers,
                                       sinks=4, window=BIG),
        "blocks": lambda: LongattnCache(model, "blocks", page=8, sinks=8, window=8, topk=BIG),
        "longheads": lambda: LongattnCache(model, "longheads", page=8, sinks=8, window=8, topk=BIG),
        "retrieval": lambda: LongattnCache(model, "retrieval", page=8, sinks=8, window=8, retrieve=BIG),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_every_policy_at_full_budget_generates_what_dense_generates(family):
    model = tiny(family)
    ids, mask = left_padded([19, 11])
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        with hf.apply(model, "dense"):
            for name, make in full_budget_caches(model).items():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                     past_key_values=make())
                assert torch.equal(out, ref), name


def test_stories260k_full_budget_greedy_and_sampling_match_dense(stories):
    model, tok = stories
    ids = torch.tensor([[1] + tok.encode("Once upon a time, there was a little girl named Lily.")])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=40, do_sample=False)
        torch.manual_seed(7)
        ref_s = model.generate(ids, max_new_tokens=40, do_sample=True, top_k=20)
        with hf.apply(model, "dense"):
            for name, make in full_budget_caches(model).items():
                assert torch.equal(model.generate(ids, max_new_tokens=40, do_sample=False, past_key_values=make()), ref), name
            torch.manual_seed(7)
            got = model.generate(ids, max_new_tokens=40, do_sample=True, top_k=20,
                                 past_key_values=LongattnCache(model, "streaming", budget=BIG))
            assert torch.equal(got, ref_s)


def test_a_small_budget_drops_tokens_per_layer_and_head(stories):
    model, tok = stories
    ids = torch.tensor([[1] + tok.encode("Once upon a time, there was a little girl named Lily. She loved to play.")])
    with torch.no_grad(), hf.apply(model, "dense"):
        full = LongattnCache(model, "full")
        model.generate(ids, max_new_tokens=40, do_sample=False, past_key_values=full)
        for name in ("streaming", "h2o", "tova", "snapkv"):
            c = LongattnCache(model, name, budget=24)
            model.generate(ids, max_new_tokens=40, do_sample=False, past_key_values=c)
            s = c.stats()
            assert s["tokens"] == [[24] * 4] * 5, name
            assert s["kv_bytes"] == 5 * 2 * 4 * 24 * 8 * 4  # layers × (k, v) × heads × tokens × dim × fp32
            assert s["kv_bytes"] * 2 < full.stats()["kv_bytes"]


def test_4k_tokens_through_the_512_token_model_stay_within_1_1x_of_in_length(stories):
    """The bar: streaming, block retrieval, LongHeads and RetrievalAttention with positions
    inside the kept cache; dense (every key, original positions) is far off. (Retrieval runs its
    exact index here: this checks the policy and its positions; the graph indexes' effect on
    accuracy is measured by the memory benchmark.)"""
    from longattn.bench.tasks import stories_text

    model, _ = stories
    _, tokens = stories_text(4096, 0)

    def ppl(logits, toks):
        lp = torch.log_softmax(logits[0].double(), -1)
        return math.exp(float(-lp[:-1].gather(-1, toks[0, 1:, None]).mean()))

    with torch.no_grad():
        chunks = [model(tokens[:, i:i + 512]).logits for i in range(0, 4096, 512)]
        nll = torch.cat([-torch.log_softmax(c[0, :-1].double(), -1).gather(-1, tokens[0, i + 1:i + 512, None])[:, 0]
                         for c, i in zip(chunks, range(0, 4096, 512))])
        in_length = math.exp(float(nll.mean()))
        got = {}
        with hf.apply(model, "dense"):
            for name, kw in {"streaming": dict(sinks=4, window=444),
                             "blocks": dict(page=32, sinks=32, window=192, topk=6),
                             "longheads": dict(page=32, sinks=32, window=192, topk=6),
                             "retrieval": dict(page=32, sinks=32, window=192, retrieve=192, backend="exact"),
                             "dense": None}.items():
                cache = LongattnCache(model, "full") if kw is None else LongattnCache(model, name, **kw)
                got[name] = ppl(torch.cat([model(tokens[:, i:i + 64], past_key_values=cache).logits
                                           for i in range(0, 4096, 64)], 1), tokens)
    for name in ("streaming", "blocks", "longheads", "retrieval"):
        assert got[name] <= 1.1 * in_length, (name, got[name], in_length)
    assert got["dense"] > 3 * in_length


def test_saved_memory_reloads_to_bit_identical_next_token_logits(stories, tmp_path):
    model, tok = stories
    ids = torch.tensor([[1] + tok.encode("Once upon a time, there was a big red ball. Tom and Sue played with it.") * 6])
    nxt = torch.tensor([[tok.encode(" The")[0]]])
    with torch.no_grad(), hf.apply(model, "dense"):
        for name, kw in {"blocks": dict(page=16, sinks=16, window=32, topk=2, host_tokens=32,
                                        disk_dir=tmp_path / "tiers"),
                         "retrieval": dict(page=16, sinks=16, window=32, retrieve=24, host_tokens=32,
                                           disk_dir=tmp_path / "tiers-r"),
                         "h2o": dict(budget=64)}.items():
            a = LongattnCache(model, name, **kw)
            model(ids, past_key_values=a)
            path = tmp_path / f"{name}.safetensors"
            a.save(path)
            b = LongattnCache(model, name, **kw).load(path)
            assert b.get_seq_length() == ids.shape[1]
            la = model(nxt, past_key_values=a).logits
            lb = model(nxt, past_key_values=b).logits
            assert torch.equal(la, lb), name
        other = tiny("llama")
        with hf.apply(other, "dense"):
            with pytest.raises(ValueError, match="different model"):
                LongattnCache(other, "h2o", budget=64).load(tmp_path / "h2o.safetensors")
        with pytest.raises(ValueError, match="different model or cache"):
            LongattnCache(model, "h2o", budget=32).load(tmp_path / "h2o.safetensors")
        raw = bytearray((tmp_path / "h2o.safetensors").read_bytes())
        raw[len(raw) // 2] ^= 1
        (tmp_path / "tampered.safetensors").write_bytes(bytes(raw))
        with pytest.raises(ValueError, match="checksum"):
            LongattnCache(model, "h2o", budget=64).load(tmp_path / "tampered.safetensors")


def test_applied_new_cache_follows_the_method():
    model = tiny("llama")
    ids, mask = left_padded([23, 15], seed=2)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        for name, kw, policy in [("streaming", dict(sinks=4, window=BIG), "streaming"),
                                 ("quest", dict(budget=BIG, block=8, q_block=8, sinks=8, window=8), "blocks"),
                                 ("longheads", dict(window=BIG, chunk=8, local=8), "longheads"),
                                 ("dense", {}, "full")]:
            with hf.apply(model, name, **kw) as applied:
                cache = applied.new_cache()
                assert cache.spec["policy"] == policy
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                     past_key_values=cache)
                assert torch.equal(out, ref), name
        with hf.apply(model, "window", window=8) as applied, pytest.raises(NotImplementedError, match="no KV-memory"):
            applied.new_cache()


def test_refusals_are_clear():
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 10))
    with pytest.raises(RuntimeError, match="switched to longattn"):
        model(ids, past_key_values=LongattnCache(model, "full"))
    with hf.apply(model, "quest", budget=64, block=8, q_block=8, sinks=8, window=8):
        with pytest.raises(ValueError, match="decides which keys"):
            model(ids, past_key_values=LongattnCache(model, "full"))
    with pytest.raises(ValueError, match="policy must be one of"):
        LongattnCache(model, "lru")
    with pytest.raises(ValueError, match="needs a budget"):
        LongattnCache(model, "h2o")
    with pytest.raises(ValueError, match="head_map must be 2 layers"):
        LongattnCache(model, "heads", head_map=[[True, False]])
    with pytest.raises(ValueError, match="budget must be None"):
        LongattnCache(model, "full", budget=8)
    with pytest.raises(ValueError, match="policy 'retrieval' needs budget"):
        LongattnCache(model, "retrieval")
    with pytest.raises(ValueError, match="smaller than sinks"):
        LongattnCache(model, "retrieval", budget=100, sinks=64, window=64)
