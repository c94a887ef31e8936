"""``RetrievalMemory`` (RetrievalAttention over the paged memory): exact at full budget, the exact
top-``q·k`` tokens from the exact index, the planted key found through a real graph index, the
index covering exactly the retrievable tokens, the fast tier bounded, and save/load."""

import math

import pytest
import torch

from longattn.memory import KeyRotation, store
from longattn.memory.ann import available_backends
from longattn.memory.retrieval import RetrievalMemory
from conftest import DEVICE
from test_memory import D, INV, feed, qkv, reference, rope

GRAPHS = [b for b in available_backends() if b != "exact"]


@pytest.mark.parametrize("backend", available_backends())
def test_full_budget_is_exact_attention_with_gqa_and_padding(backend):
    q, k, v = qkv(150, b=2)
    pos = torch.arange(150)
    qr, kr = rope(q, pos), rope(k, pos)
    ok = torch.ones(2, 150, dtype=torch.bool)
    ok[1, :37] = False  # left padding
    mem = RetrievalMemory(2, KeyRotation(INV), retrieve=1000, page=16, sinks=16, window=32, backend=backend)
    got = feed(mem, qr, kr, v, chunk=13, ok=ok)
    want = reference(qr, kr, v, ok[:, None].expand(2, 2, 150), 150, 0.25)
    torch.testing.assert_close(got.double()[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double()[1, :, 37:], want[1, :, 37:], atol=1e-5, rtol=1e-5)


def test_exact_index_retrieves_the_top_keys_and_attends_over_exactly_the_layout():
    q, k, v = qkv(600, hq=4, h=2, seed=5)
    mem = RetrievalMemory(2, None, retrieve=24, page=16, sinks=16, window=48, backend="exact")
    feed(mem, q[:, :, :599], k[:, :, :599], v[:, :, :599], chunk=37)
    s_end, c_end = mem._regions(mem.seen)
    assert mem.indexed == c_end and len(mem.indexes[0][0]) == c_end - s_end  # the candidates, no more
    ql, kl, vl = q[:, :, 599:], k[:, :, 599:], v[:, :, 599:]
    _, _, tokens = mem._retrieve(ql, s_end, c_end, 0.25, D)
    for head in range(2):
        # brute force: each candidate's best q·k over the head's two query heads
        best = (ql[0, 2 * head:2 * head + 2, 0] @ k[0, head, s_end:c_end].T).amax(0)
        want = best.topk(24).indices.sort().values + s_end
        assert torch.equal(tokens[0, head], want)
    # a chunk of several queries: ranked exactly (default) = the index's union rule with the exact index
    chunk = q[:, :, 594:599]
    fast = mem._retrieve(chunk, s_end, c_end, 0.25, D)[2]
    mem.exact_chunks = False
    assert torch.equal(fast, mem._retrieve(chunk, s_end, c_end, 0.25, D)[2])
    best = (chunk[0, 2:4].reshape(-1, D) @ k[0, 1, s_end:c_end].T).amax(0)
    assert torch.equal(fast[0, 1], best.topk(24).indices.sort().values + s_end)
    mem.measure_recall = True
    out = mem.attend(ql, kl, vl, None, 0.25)
    assert mem.recall == 1.0 and mem.recall_total == 2 * 24
    # float64 attention over sinks + retrieved + window + the new token (positions original: no RoPE)
    for head in range(2):
        keep = torch.cat([torch.arange(s_end), tokens[0, head], torch.arange(c_end, 600)])
        ref = reference(ql[:, 2 * head:2 * head + 2], k[:, head:head + 1, keep], v[:, head:head + 1, keep],
                        torch.ones(1, 1, len(keep), dtype=torch.bool), 1, 0.25)
        torch.testing.assert_close(out[:, 2 * head:2 * head + 2].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not GRAPHS, reason="needs faiss-cpu or hnswlib (pip install 'longattn[ann]')")
@pytest.mark.parametrize("backend", GRAPHS)
def test_graph_index_finds_the_planted_keys_and_the_fast_tier_stays_in_budget(backend, tmp_path):
    q, k, v = qkv(3000, hq=2, h=1, seed=3)
    planted = torch.tensor([211, 1234, 2100])  # single tokens far outside the window
    k[:, :, planted] = q[:, :, -1:].mean(1, keepdim=True) * 3
    v[:, :, planted] = 5.0  # a value no random token has: the output shows whether they were found
    mem = RetrievalMemory(1, None, retrieve=32, page=16, sinks=16, window=64, backend=backend,
                          host_tokens=256, disk_dir=tmp_path, exact_chunks=False, measure_recall=True)
    out = feed(mem, q, k, v, chunk=100)
    assert 0.8 <= mem.recall <= 1.0  # measured 1.0 with both libraries (D=16, 3k keys)
    assert mem.peak_fast_tokens <= mem.fast_budget == 16 + 64 + 16
    nb = mem.nbytes()
    assert nb["disk"] > 0 and nb["fast"] <= mem.fast_budget * D * 4 * 2 and nb["index"] > 0
    s_end, c_end = mem._regions(mem.seen)
    _, _, tokens = mem._retrieve(q[:, :, -1:], s_end, c_end, 0.25, D)
    assert set(planted.tolist()) <= set(tokens[0, 0].tolist())
    assert out[0, :, -1].mean() > 2.0  # the planted values dominate the last token's output


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="retrieve"):
        RetrievalMemory(1, None, retrieve=-1)
    with pytest.raises(ValueError, match="backend"):
        RetrievalMemory(1, None, backend="annoy")
    with pytest.raises(ValueError, match="ef_search"):
        RetrievalMemory(1, None, ef_search=0)


@pytest.mark.parametrize("backend", available_backends())
def test_save_load_gives_bit_identical_steps(backend, tmp_path):
    q, k, v = qkv(700, hq=4, h=2, seed=9)

    def make():
        return RetrievalMemory(2, KeyRotation(INV), retrieve=40, page=16, sinks=16, window=32, backend=backend,
                               host_tokens=64, disk_dir=tmp_path / f"disk{make.n}")
    make.n = 0
    a = make()
    feed(a, q[:, :, :690], k[:, :, :690], v[:, :, :690], chunk=29)
    path = tmp_path / "m.safetensors"
    store.save(path, [a.state()], {"model": "x"})
    make.n = 1
    b = make()
    (tensors, meta), = store.load(path, {"model": "x"})
    b.load_state(tensors, meta, DEVICE)
    assert b.indexed == a.indexed and len(b.indexes[0][1]) == len(a.indexes[0][1]) > 0
    if backend != "hnswlib":  # hnswlib rebuilds its graph on load: approximate answers may differ
        for i in range(690, 700):
            step = (q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], None, 0.25)
            assert torch.equal(a.attend(*step), b.attend(*step)), i
    with pytest.raises(ValueError, match="this cache uses"):
        RetrievalMemory(2, None, retrieve=41, page=16, sinks=16, window=32, backend=backend).load_state(
            tensors, meta, DEVICE)


def test_index_memory_is_reported_and_exactness_holds_past_the_full_budget_boundary():
    # exactly `retrieve` candidates: still every candidate, still exact
    q, k, v = qkv(16 + 64 + 32 + 1, hq=2, h=1, seed=2)
    mem = RetrievalMemory(1, None, retrieve=64, page=16, sinks=16, window=32, backend="exact")
    got = feed(mem, q, k, v, chunk=1)
    want = reference(q, k, v, torch.ones(1, 1, q.shape[2], dtype=torch.bool), q.shape[2], 0.25)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    s_end, c_end = mem._regions(q.shape[2] - 1)  # the last step's candidates: exactly `retrieve`
    assert c_end - s_end == 64
    assert mem.nbytes()["index"] == len(mem.indexes[0][0]) * D * 4
    assert not math.isnan(float(got.sum()))
