"""``longattn.memory.calibrate``: DuoAttention / RazorAttention head maps from synthetic passkey
data — shape, share, determinism, the JSON that ``LongattnCache(model, "heads")`` reads, a planted
echo head on a tiny Llama, the duo proxy on hand-built probabilities, refusals and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longattn.hf as hf  # noqa: E402
from longattn.hf import LongattnCache  # noqa: E402
from longattn.memory.calibrate import (  # noqa: E402
    calibrate_heads,
    duo_scores,
    group_mean,
    passkey_batch,
    razor_scores,
    save_head_map,
)
from longattn.models import stories260k  # noqa: E402

SMALL = dict(n_samples=2, length=128, span=8)


@pytest.fixture(scope="module")
def stories_model(stories):
    return stories[0]


@pytest.fixture(scope="module")
def razor(stories_model):
    return calibrate_heads(stories_model, seed=0, **SMALL)


def test_passkey_batch_plants_the_repeat():
    ids, depth = passkey_batch(4, 100, 8, 50, seed=3, sinks=4, window=20)
    assert ids.shape == (4, 100) and depth.shape == (4,)
    assert (ids[:, 0] == 1).all() and (ids[:, 1:] >= 3).all() and (ids < 50).all()
    for i in range(4):
        d = int(depth[i])
        assert 4 <= d <= 100 - 16 - 20
        assert torch.equal(ids[i, d:d + 8], ids[i, -8:])


def test_stories_map_shape_share_and_scores(stories_model, razor):
    assert razor["method"] == "razor" and razor["model"] == "llama"
    assert {k: razor[k] for k in ("n_samples", "length", "span", "seed", "retrieval_share")} == \
        {**SMALL, "seed": 0, "retrieval_share": 0.25}
    ret, scores = razor["retrieval"], razor["scores"]
    assert len(ret) == 5 and all(len(r) == 4 and all(isinstance(x, bool) for x in r) for r in ret)
    assert len(scores) == 5 and all(len(r) == 4 for r in scores)
    assert sum(map(sum, ret)) == math.ceil(0.25 * 20)
    flat = torch.tensor(scores).flatten()
    assert torch.isfinite(flat).all() and (flat >= 0).all() and (flat <= 1).all()
    # echo + induction are the score, and every retrieval head outscores every streaming head
    assert torch.allclose(torch.tensor(razor["echo"]) + torch.tensor(razor["induction"]), torch.tensor(scores))
    sel = torch.tensor(ret).flatten()
    assert flat[sel].min() >= flat[~sel].max() and flat[sel].min() >= flat.median()
    # the model is left as it was: sdpa, eval
    assert stories_model.config._attn_implementation == "sdpa" and not stories_model.training


def test_deterministic_for_a_seed(stories_model, razor):
    assert calibrate_heads(stories_model, seed=0, **SMALL) == razor
    assert calibrate_heads(stories_model, seed=1, **SMALL)["scores"] != razor["scores"]


def test_duo_on_stories_and_restores_longattn(stories_model):
    with hf.apply(stories_model, "dense"):
        res = calibrate_heads(stories_model, method="duo", retrieval_share=0.1, seed=0, **SMALL)
        assert stories_model.config._attn_implementation == "longattn"
    assert res["method"] == "duo" and sum(map(sum, res["retrieval"])) == 2
    flat = torch.tensor(res["scores"]).flatten()
    assert torch.isfinite(flat).all() and (flat >= 0).all()


def test_json_round_trip_drives_the_heads_cache(stories_model, razor, tmp_path):
    path = save_head_map(razor, tmp_path / "maps" / "heads.json")
    assert json.loads(path.read_text()) == razor
    assert path.read_text().startswith('{\n  "method"')  # indent 2
    sinks, window, n = 4, 28, 64
    cache = LongattnCache(stories_model, "heads", head_map=str(path), sinks=sinks, window=window)
    ids = torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(0))
    with hf.apply(stories_model, "dense"), torch.no_grad():
        out = stories_model(ids, past_key_values=cache)
    assert torch.isfinite(out.logits).all()
    tokens = cache.stats()["tokens"]
    for row_t, row_r in zip(tokens, razor["retrieval"]):
        for t, is_retrieval in zip(row_t, row_r):
            assert t == (n if is_retrieval else sinks + window)


def _planted_echo_llama():
    """2-layer Llama without positions (RoPE frequencies zeroed) where key head 0 of layer 0 is a
    pure echo head: token ``3 + j`` embeds as channel ``j`` and that head's q/k read those 32
    channels, so its queries attend (equally) to every earlier occurrence of their own token."""
    cfg = transformers.LlamaConfig(vocab_size=35, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        rot = model.model.rotary_emb
        rot.inv_freq.zero_()
        rot.original_inv_freq.zero_()
        emb = model.model.embed_tokens.weight
        emb.zero_()
        for tok in range(35):
            emb[tok, tok - 3 if tok >= 3 else 32 + tok] = 1.0
        attn = model.model.layers[0].self_attn
        hd = attn.head_dim  # 32
        attn.k_proj.weight[:hd].zero_()
        attn.k_proj.weight[:hd, :hd] = torch.eye(hd)
        attn.q_proj.weight[:2 * hd].zero_()  # query heads 0 and 1 read key head 0
        attn.q_proj.weight[:hd, :hd] = torch.eye(hd)
        attn.q_proj.weight[hd:2 * hd, :hd] = torch.eye(hd)
    return model


def test_planted_echo_head_is_found_by_razor_and_lossless_for_duo():
    model = _planted_echo_llama()
    res = calibrate_heads(model, n_samples=2, length=128, span=8, retrieval_share=0.25)
    assert res["retrieval"] == [[True, False], [False, False]]
    scores = torch.tensor(res["scores"]).flatten()
    assert res["echo"][0][0] > 0.1 and scores[0] > 4 * scores[1:].max()
    # its far matches carry the same value as the query's own token (layer 0, values are
    # embeddings), so restricting it to sinks + window changes nothing: DuoAttention's proxy
    # rightly calls it streaming, unlike the diffuse random heads
    duo = calibrate_heads(model, method="duo", n_samples=2, length=128, span=8, retrieval_share=0.25)
    assert duo["scores"][0][0] < 1e-6 < duo["scores"][0][1]
    assert not duo["retrieval"][0][0]


def test_duo_and_razor_scores_on_hand_built_probabilities():
    # one sample, L = 12, the repeat is the last 2 queries; query head 0 splits its mass between
    # a far key (3) and itself, query head 1 looks only at the sink and the window
    L, span = 12, 2
    attn = torch.zeros(1, 2, L, L)
    for t in (10, 11):
        attn[0, 0, t, 3] = attn[0, 0, t, t] = 0.5
        attn[0, 1, t, 0] = 0.25
        attn[0, 1, t, t - 1] = 0.75
    values = torch.zeros(1, 1, L, 2)
    values[0, 0, 3] = torch.tensor([1.0, 0.0])
    values[0, 0, 10] = values[0, 0, 11] = torch.tensor([0.0, 1.0])
    got = duo_scores(attn, values, span, sinks=1, window=4)
    # head 0: full (0.5, 0.5), streaming (0, 1): ‖(0.5, -0.5)‖ / ‖(0.5, 0.5)‖ = 1
    assert torch.allclose(got, torch.tensor([1.0, 0.0], dtype=torch.float64))
    echo, induction = razor_scores(attn, torch.tensor([2]), span)  # passkey at 2, 3; repeat at 10, 11
    assert torch.allclose(echo, torch.tensor([0.25, 0.0], dtype=torch.float64))       # key 3 for query 11
    assert torch.allclose(induction, torch.tensor([0.25, 0.0], dtype=torch.float64))  # key 3 for query 10
    assert torch.equal(group_mean(torch.tensor([[1.0, 3.0, 5.0, 7.0]]), 2), torch.tensor([[2.0, 6.0]]))


@pytest.mark.parametrize("kwargs, words", [
    (dict(retrieval_share=0), ["retrieval_share", "(0, 1]", "0"]),
    (dict(retrieval_share=1.5), ["retrieval_share", "1.5"]),
    (dict(retrieval_share=float("nan")), ["retrieval_share", "nan"]),
    (dict(span=43), ["span", "length/3", "43"]),
    (dict(span=0), ["span", ">= 1"]),
    (dict(method="h2o"), ["method", "razor", "'h2o'"]),
    (dict(n_samples=0), ["n_samples", ">= 1"]),
    (dict(length=1024, span=16), ["length", "max_position_embeddings", "512", "1024"]),
    (dict(length=90, span=16), ["length", "sinks + 2*span + window", "100", "90"]),
])
def test_bad_arguments_are_refused_by_name(stories_model, kwargs, words):
    args = {**SMALL, **kwargs}
    with pytest.raises(ValueError) as err:
        calibrate_heads(stories_model, **args)
    for w in words:
        assert w in str(err.value)
    assert stories_model.config._attn_implementation == "sdpa"


def test_save_head_map_refuses_a_non_result(tmp_path):
    with pytest.raises(ValueError, match="retrieval"):
        save_head_map({"scores": [[0.1]]}, tmp_path / "x.json")


def test_cli_writes_the_map(stories_model, tmp_path):
    from typer.testing import CliRunner

    from longattn.cli import app

    runner = CliRunner()
    out = tmp_path / "heads.json"
    res = runner.invoke(app, ["calibrate-heads", "--out", str(out), "--model", str(stories260k()),
                              "--samples", "2", "--length", "128", "--span", "8", "--share", "0.25", "--seed", "0"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert sum(map(sum, doc["retrieval"])) == 5 and len(doc["scores"]) == 5
    assert "★" in res.output and "sample 2/2" in res.output and "wrote" in res.output
    res = runner.invoke(app, ["calibrate-heads", "--out", str(tmp_path / "y.json"), "--share", "0"])
    assert res.exit_code != 0 and "--share" in res.output and "retrieval_share" in res.output
    res = runner.invoke(app, ["calibrate-heads", "--out", str(tmp_path / "y.json"), "--span", "200"])
    assert res.exit_code != 0 and "--span" in res.output and "200" in res.output
    assert not (tmp_path / "y.json").exists()
