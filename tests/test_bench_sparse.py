"""The sparse suite's accuracy-on-real-attention part, on a short capture."""

import json

import pytest
import torch

import longattn
from longattn.bench import sparse
from longattn.bench.suite import run_suite

pytestmark = pytest.mark.cpu_only(reason="the benchmark is a CPU program (longattn.bench takes no device)")


def test_recall_is_exp_lse_gap_and_oracle_is_the_upper_bound():
    layers, tokens = sparse.capture_real_qkv(n_tokens=768, seed=1)
    assert len(layers) == 5 and len(tokens) == 768 and tokens[0] == 1
    methods = sparse.accuracy_methods(block=32, blocks=4)
    records = sparse.evaluate_accuracy(layers, methods)
    rows = sparse.summarise(records)
    for name, row in rows.items():
        assert 0.0 < row["recall"] <= 1.0 and 0.0 < row["density"] < 0.5, (name, row)
    assert rows["block_oracle"]["recall"] >= max(rows["landmark"]["recall"], rows["quest"]["recall"]) - 1e-6
    # recall from the LSE gap equals the true mass inside the selection, computed directly
    q, k, v = layers[2]
    m = methods["streaming"]
    _, st = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    _, ref_st = longattn.attention(q, k, v, causal=True, return_stats=True)
    vm = m.visible_mask(768, 768, True).dense(1, 8, 768, 768)
    scores = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) / q.shape[-1] ** 0.5
    causal = torch.ones(768, 768, dtype=torch.bool).tril()
    p = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)  # the true attention
    direct = (p * vm).sum(-1)  # its mass inside the streaming mask
    torch.testing.assert_close(torch.exp(st.lse - ref_st.lse).double(), direct, atol=1e-4, rtol=1e-4)


def test_suite_writes_results_and_report(tmp_path, monkeypatch):
    res = run_suite(sparse.SUITE, tmp_path, methods=["block_oracle", "streaming"], seed=2, parts=("accuracy",),
                    accuracy_tokens=512)
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in data["records"]} == {"block_oracle", "streaming"}
    assert "| block_oracle |" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="unknown method"):
        run_suite(sparse.SUITE, tmp_path, methods=["nope"], parts=("accuracy",))
    assert {r["tokens"] for r in res["records"]} == {512} and res["status"] == "ok"


def test_speed_parts_run_small_and_report(tmp_path):
    res = run_suite(sparse.SUITE, tmp_path, parts=("prefill", "decode"), prefill_tokens=2048, decode_cache=4096)
    for dtype in ("float32", "bfloat16"):  # each against SDPA in the same dtype
        p = [r for r in res["records"] if r["part"] == "prefill" and r["dtype"] == dtype]
        d = [r for r in res["records"] if r["part"] == "decode" and r["dtype"] == dtype]
        assert p[0]["method"] == "sdpa" and p[0]["tokens"] == 2048 and p[0]["median_s"] > 0
        for r in p[1:]:
            assert r["finite"] and r["ratio_to_sdpa"] > 0 and 0 < r["density"] < 0.5, r
            assert r["sdpa_median_s"] == p[0]["median_s"]
            assert r["compute_dtype"] in ("float32", dtype)
        blocks = [r for r in p if r.get("registry_name") in ("landmark", "quest", "infllm", "hip")]
        assert all(abs(r["density"] - blocks[0]["density"]) < 1e-9 for r in blocks)  # same budget, same density
        assert [r["method"] for r in d] == ["sdpa", "landmark", "quest"]
        for r in d[1:]:
            assert 0 < r["recall"] <= 1 and r["step_s"] > 0
    text = (tmp_path / "report.md").read_text()
    assert "## Causal prefill at 10% density, 2048 tokens" in text and "SDPA bfloat16" in text
    assert "## Decode step over a long cache, 4096 tokens" in text
    with pytest.raises(ValueError, match="unknown part"):
        run_suite(sparse.SUITE, tmp_path, parts=("speed",))


def test_budget_for_density_matches_the_measured_density():
    from longattn.bench.sparse_speed import budget_for_density, causal_block_density, clustered_qkv

    budget = budget_for_density(4096, 0.2, block=64, q_block=256)
    q, k, v = clustered_qkv(4096, heads=2, head_dim=16)
    m = longattn.method("landmark", budget=budget, block=64, q_block=256, sinks=64, window=0, pooled=True)
    _, st = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    assert st.density == pytest.approx(causal_block_density(4096, budget // 64, 64, 256))
    assert 0.2 <= st.density < 0.2 + 1.5 * 64 * 4096 / (4096 * 4097 / 2)


def test_frontier_part_reports_every_family_and_withholds_speed_after_a_failed_gate(tmp_path, monkeypatch):
    from longattn.bench import sparse_speed

    good = sparse_speed.frontier_methods()["landmark (pooled)"]

    class Wrong:  # a "method" whose full budget is not exact: every output is scaled
        def __call__(self, budget):
            return good(budget)

    def broken_attention(q, k, v, **kw):
        out = real(q, k, v, **kw)
        if isinstance(kw.get("method"), str):
            return out
        return (out[0] * 1.5, out[1]) if isinstance(out, tuple) else out * 1.5

    fams = {"landmark (pooled)": good, "broken": Wrong()}
    recs = list(sparse_speed.run_frontier(2048, (0.1, 0.3), methods=fams, repeats=1))
    assert [(r["method"], r["target_density"]) for r in recs] == [
        ("sdpa", 1.0), ("landmark (pooled)", 0.1), ("landmark (pooled)", 0.3), ("broken", 0.1), ("broken", 0.3)]
    lm = recs[1:3]
    assert all(r["status"] == "ok" and r["ratio_to_sdpa"] > 0 and r["gate"]["passed"] for r in lm)
    assert lm[0]["density"] < lm[1]["density"] and lm[0]["rel_err"] > lm[1]["rel_err"]
    # now make every non-dense call wrong: the gate fails and no speed is given
    import longattn

    real = longattn.attention
    monkeypatch.setattr(longattn, "attention", broken_attention)
    _, r = sparse_speed.run_frontier(1024, (0.2,), methods={"broken": Wrong()}, repeats=1)
    assert r["status"].startswith("FAILED full-budget gate") and r["ratio_to_sdpa"] is None and r["median_s"] is None
    assert not r["gate"]["passed"]


def test_sparse_suite_frontier_in_report(tmp_path):
    res = run_suite(sparse.SUITE, tmp_path, parts=("frontier",), lengths=[1024])
    assert {r["part"] for r in res["records"]} == {"frontier"}
    text = (tmp_path / "report.md").read_text()
    assert "## Density ↔ error ↔ speed-up, causal prefill (1024 tokens: SDPA" in text
    for name in sparse_speed_families():
        assert f"| {name} |" in text


def sparse_speed_families():
    from longattn.bench.sparse_speed import frontier_methods

    return list(frontier_methods())
