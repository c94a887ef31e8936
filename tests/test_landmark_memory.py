"""Landmark Attention's memory (``longattn.memory.landmark``): reading a context chunk by chunk with
only the retrieved blocks hot equals ``landmark_trained`` over the whole context."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import longattn
from longattn.core.positions import RoPE
from longattn.memory import LandmarkMemory, landmark_memories
from longattn.memory.tiers import DiskTier
from longattn.tasks import synthetic
from longattn.train import LanguageModel, ModelConfig
from longattn.train.landmarks import LANDMARK_ID, memory_evaluation, with_landmarks


def _qkv(b, hq, hk, t, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g).to(torch.get_default_device()) for h in (hq, hk, hk)]


def _read_in_chunks(mem, q, k, v, cuts, position):
    """Feed ``q, k, v`` to ``mem`` split at ``cuts``; per chunk, the memory's output and the
    method's over the whole prefix."""
    method = longattn.method("landmark_trained", block=mem.block, top_k=mem.top_k, local=mem.local)
    bounds = [0, *sorted(set(cuts)), q.shape[2]]
    for a, z in zip(bounds, bounds[1:]):
        if z <= a:
            continue
        got = mem.attend(q[:, :, a:z], k[:, :, a:z], v[:, :, a:z], position=position)
        want = longattn.attention(q[:, :, a:z], k[:, :, :z], v[:, :, :z], causal=True, method=method,
                                  position=position)
        yield got, want


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 60), block=st.integers(2, 9), top_k=st.integers(1, 4), local=st.integers(0, 1),
       cuts=st.lists(st.integers(1, 59), max_size=6), group=st.sampled_from([1, 2]), rope=st.booleans(),
       host=st.one_of(st.none(), st.integers(0, 20)), seed=st.integers(0, 999))
def test_chunks_equal_the_method_over_the_whole_context(t, block, top_k, local, cuts, group, rope, host, seed):
    """Any split (decode steps, block-aligned or ragged chunks), GQA, with and without RoPE, with
    blocks spilled to disk: each chunk's output equals ``landmark_trained`` over the prefix."""
    q, k, v = _qkv(2, 2 * group, 2, t, 8, seed)
    mem = LandmarkMemory(block=block, top_k=top_k, local=min(local, top_k), host_tokens=host)
    position = RoPE(8, 10000.0) if rope else None
    try:
        for got, want in _read_in_chunks(mem, q, k, v, [c for c in cuts if c < t], position):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert mem.seen == t
        assert mem.fast_tokens == t % block
        assert mem.landmarks.shape[2] == t // block
    finally:
        mem.close()


def test_decode_keeps_only_the_retrieved_blocks_hot():
    """One query at a time over 40 blocks: a step holds at most the union of every head's top-k
    blocks plus the open block, and the closed blocks live on the host and disk."""
    b, hq, hk, block, top_k = 1, 2, 1, 8, 3
    q, k, v = _qkv(b, hq, hk, 320, 16, 0)
    mem = LandmarkMemory(block=block, top_k=top_k, host_tokens=64)
    try:
        worst = 0.0
        for got, want in _read_in_chunks(mem, q, k, v, list(range(1, 320)), RoPE(16, 10000.0)):
            worst = max(worst, float((got - want).abs().max()))
        assert worst < 1e-5
        assert mem.peak_hot_tokens <= b * hq * top_k * block + block
        sizes = mem.nbytes()
        assert sizes["host"] == 64 * hk * 16 * 4 * 2
        assert sizes["disk"] == (320 - 64) * hk * 16 * 4 * 2
        assert mem.fetched_blocks > 0
    finally:
        mem.close()


def test_a_failed_disk_write_loses_nothing(monkeypatch):
    q, k, v = _qkv(1, 2, 2, 48, 8, 3)

    def fail(self, pages):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DiskTier, "write", fail)
    mem = LandmarkMemory(block=4, top_k=2, host_tokens=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for got, want in _read_in_chunks(mem, q, k, v, list(range(4, 48, 4)), None):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert any(issubclass(w.category, RuntimeWarning) and "stay on the host" in str(w.message) for w in caught)
    assert len(mem.host) == 12  # every closed block kept
    mem.close()


def test_bad_input_is_refused_with_the_argument_named():
    q, k, v = _qkv(1, 2, 1, 8, 4, 0)
    mem = LandmarkMemory(block=4, top_k=2)
    with pytest.raises(ValueError, match="k_new and v_new"):
        mem.attend(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="multiple"):
        mem.attend(q[:, :1], k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1))
    with pytest.raises(ValueError, match="NaN or Inf"):
        mem.attend(q, k, v.clone().fill_(float("nan")))
    assert mem.seen == 0  # nothing stored by a refused call
    mem.attend(q, k, v)
    with pytest.raises(ValueError, match="does not continue"):
        mem.attend(torch.cat([q, q]), torch.cat([k, k]), torch.cat([v, v]))
    with pytest.raises(ValueError, match="empty"):
        mem.attend(q[:, :, :0], k[:, :, :0], v[:, :, :0])
    for kw, match in (({"block": 1}, "block"), ({"top_k": 0}, "top_k"), ({"top_k": 1, "local": 2}, "local"),
                      ({"host_tokens": -1}, "host_tokens")):
        with pytest.raises(ValueError, match=match):
            LandmarkMemory(**kw)


def _tiny_landmark_model():
    cfg = ModelConfig(vocab_size=LANDMARK_ID + 1, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                      max_train_length=512)
    return LanguageModel(cfg, seed=1)


def test_a_model_reading_through_memories_equals_the_method_over_the_whole_sequence():
    """Block-aligned chunks through ``LanguageModel`` with one memory per layer give the logits of
    one forward with ``landmark_trained`` (the same queries choose the same blocks)."""
    model = _tiny_landmark_model()
    tokens = with_landmarks(synthetic.passkey(300, 0.3, 1, 0), block=16).tokens
    method = longattn.method("landmark_trained", block=16, top_k=2)
    with torch.no_grad():
        whole = model(tokens, method=method)
        mems = landmark_memories(2, block=16, top_k=2)
        parts = [model(tokens[:, s:s + 32], state=mems, method=method) for s in range(0, tokens.shape[1], 32)]
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="method must be None or that method"):
        model(tokens[:, :4], state=landmark_memories(2, block=16, top_k=2), method="dense")
    with pytest.raises(ValueError, match="capture"):
        model(tokens[:, :4], state=landmark_memories(2, block=16, top_k=2), capture=[])


def test_memory_evaluation_matches_evaluate_with_the_method():
    from longattn.train.data import evaluate

    model = _tiny_landmark_model()
    batch = with_landmarks(synthetic.passkey(200, 0.5, 3, 1), block=16)
    got = memory_evaluation(model, batch, block=16, top_k=2, host_tokens=32)
    want = evaluate(model, batch, longattn.method("landmark_trained", block=16, top_k=2), batch_size=1)
    assert got["accuracy"] == want.accuracy
    assert got["context_tokens"] == batch.tokens.shape[1]
    assert 0 < got["peak_hot_tokens"] < batch.tokens.shape[1]
    assert got["disk_bytes"] > 0
    with pytest.raises(ValueError, match="chunk"):
        memory_evaluation(model, batch, block=16, chunk=0)


def test_tied_landmark_scores_choose_alike_in_whole_and_chunked_calls():
    """Every landmark key the same (a first layer's: one token, no position): the choice among
    tied blocks goes to the later ones whatever the number of query blocks in the call (topk's own
    tie order depended on it, and chunked reads then differed from one pass)."""
    q, k, v = _qkv(1, 4, 2, 320, 8, 5)
    k[:, :, 15::16] = k[:, :, 15:16]
    method = longattn.method("landmark_trained", block=16, top_k=3)
    whole, st = longattn.attention(q, k, v, causal=True, method=method, return_stats=True)
    parts = [longattn.attention(q[:, :, s:s + 16], k[:, :, :s + 16], v[:, :, :s + 16], causal=True, method=method)
             for s in range(0, 320, 16)]
    torch.testing.assert_close(torch.cat(parts, 2), whole, atol=1e-5, rtol=1e-5)
    # the last query block: its forced nearest block and the two nearest of the tied others
    assert st.extra["selected_blocks"][0, 0, -1].tolist() == [16, 17, 18]


def test_capture_does_not_change_what_a_position_placing_method_computes():
    """``capture=`` records rotated q/k but runs the method as a plain forward does: with RoPE
    handed over, so ``landmark_trained`` lays out its positions (it ran without them before)."""
    model = _tiny_landmark_model()
    tokens = with_landmarks(synthetic.passkey(200, 0.5, 1, 2), block=16).tokens
    method = longattn.method("landmark_trained", block=16, top_k=2)
    with torch.no_grad():
        plain = model(tokens, method=method)
        cap: list = []
        captured = model(tokens, method=method, capture=cap)
    torch.testing.assert_close(captured, plain, atol=0, rtol=0)
    assert len(cap) == 2 and cap[0][0].shape == (1, 4, tokens.shape[1], 8)
